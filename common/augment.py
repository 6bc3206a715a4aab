"""Training-time augmentation with MONAI dictionary transforms (flips, small rotations, intensity jitter).

Evaluation uses no augmentation at all. Randomness enters through `seed` only.
"""

from __future__ import annotations

import math
from typing import Any


def train_transforms(seed: int, keys: tuple[str, ...] = ("image",)) -> Any:
    """A MONAI `Compose` for a `{"image": (C, D, H, W) tensor}` sample, deterministic for `seed`.

    Flips along each spatial axis (p = 0.5 each), rotation up to 10 degrees about each axis (p = 0.5),
    per-channel intensity scaling by up to +-10 % and shifts by up to 0.1 (in the input's units: a tenth of the liver's
    intensity with the default liver reference), and mild
    Gaussian noise (p = 0.2). Shapes are preserved.
    """
    from monai.transforms import (
        Compose,
        RandFlipd,
        RandGaussianNoised,
        RandRotated,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    angle = math.radians(10)
    compose = Compose(
        [
            RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=2),
            RandRotated(keys=keys, range_x=angle, range_y=angle, range_z=angle, prob=0.5, keep_size=True, padding_mode="zeros"),
            RandScaleIntensityd(keys=keys, factors=0.1, prob=0.5, channel_wise=True),
            RandShiftIntensityd(keys=keys, offsets=0.1, prob=0.5, channel_wise=True),
            RandGaussianNoised(keys=keys, prob=0.2, std=0.05),
        ]
    )
    compose.set_random_state(seed=seed)
    return compose
