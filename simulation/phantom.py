"""Rendering synthetic multi-phase liver MRI: anatomy defined in physical space, sampled on a scanner's grid.

Anatomy (body, liver, vessels, tumours) is a set of analytic shapes in LPS millimetres, so the same patient can
be rendered on any grid (spacing, field of view, orientation) and still be the same patient. Tumour appearance
per phase follows the phenotype in `TumourSpec`; the scanner adds a bias field, Rician noise and its own
intensity scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

PHASES = ("arterial", "portal_venous", "delayed")

# Relative signal per phase of each tissue (liver parenchyma in the arterial phase = 1).
TISSUE = {
    "air": (0.02, 0.02, 0.02),
    "body": (0.75, 0.85, 0.85),
    "liver": (1.0, 1.35, 1.25),
    "aorta": (3.2, 1.8, 1.4),
    "portal": (1.1, 2.3, 1.6),
    "necrosis": (0.35, 0.38, 0.40),
}


@dataclass(frozen=True)
class Acquisition:
    """A centre's scanner protocol: grid, orientation, intensity scale, noise and bias field, file format."""

    spacing: tuple[float, float, float]
    size: tuple[int, int, int]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    intensity_scale: float = 1000.0
    noise_sd: float = 0.04
    bias_strength: float = 0.15
    table_offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    fmt: str = "nii.gz"


@dataclass(frozen=True)
class TumourSpec:
    """One tumour: position and radii (mm) and its phenotype.

    aphe : arterial-phase hyperenhancement, fraction above liver. washout : portal/delayed hypointensity
    (fraction below liver). necrosis : radius fraction of the non-enhancing core. capsule : delayed-phase rim
    enhancement. heterogeneity : amplitude of internal texture.
    """

    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    aphe: float
    washout: float
    necrosis: float
    capsule: float
    heterogeneity: float
    lobulation: float = 0.08
    texture_seed: int = 0


@dataclass(frozen=True)
class Anatomy:
    """The patient: body cylinder, liver, vessels and tumours (the first tumour is the target)."""

    body_centre: tuple[float, float]
    body_radii: tuple[float, float]
    liver_centre: tuple[float, float, float]
    liver_radii: tuple[float, float, float]
    liver_shape_seed: int
    vessels: tuple[tuple[tuple[float, float, float], tuple[float, float, float], float], ...]
    aorta: tuple[float, float, float]
    tumours: tuple[TumourSpec, ...] = field(default_factory=tuple)


def grid_points(acq: Acquisition, centre: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Coordinates (3, z, y, x) of the voxel centres of a grid centred on `centre`, and the origin to write."""
    size = np.array(acq.size)
    spacing = np.array(acq.spacing)
    d = np.array(acq.direction).reshape(3, 3)
    half = d @ ((size - 1) / 2 * spacing)
    origin = centre - half
    ix = np.arange(size[0])[None, None, :] * spacing[0]
    iy = np.arange(size[1])[None, :, None] * spacing[1]
    iz = np.arange(size[2])[:, None, None] * spacing[2]
    pts = np.stack([origin[k] + d[k, 0] * ix + d[k, 1] * iy + d[k, 2] * iz for k in range(3)])
    # The scanner's own coordinate frame is shifted by its table offset: anatomy and mask move together.
    written = origin + np.array(acq.table_offset_mm)
    return pts, (float(written[0]), float(written[1]), float(written[2]))


def _soft(inside: np.ndarray, width: float) -> np.ndarray:
    """Soft indicator from a signed 'inside' distance (positive inside), mimicking partial-volume edges."""
    return 1.0 / (1.0 + np.exp(-np.clip(inside / width, -30, 30)))


def _waves(pts: np.ndarray, seed: int, n: int, wavelength: tuple[float, float]) -> np.ndarray:
    """A smooth random field (sum of plane waves), roughly unit variance."""
    rng = np.random.default_rng(seed)
    out = np.zeros(pts.shape[1:])
    for _ in range(n):
        k = rng.normal(size=3)
        k *= 2 * np.pi / rng.uniform(*wavelength) / np.linalg.norm(k)
        out += np.cos(k[0] * pts[0] + k[1] * pts[1] + k[2] * pts[2] + rng.uniform(0, 2 * np.pi))
    return out * np.sqrt(2.0 / n)


def _tumour_radius(pts: np.ndarray, t: TumourSpec) -> np.ndarray:
    """Normalised ellipsoidal radius (1 on the surface), lobulated by a low-frequency field."""
    rel = (pts - np.array(t.centre)[:, None, None, None]) / np.array(t.radii)[:, None, None, None]
    r = np.sqrt((rel**2).sum(axis=0))
    return r * (1 + t.lobulation * _waves(pts, t.texture_seed + 1, 3, (30.0, 60.0)))


def render(anatomy: Anatomy, acq: Acquisition, fov_centre: np.ndarray, seed: int) -> tuple[dict[str, sitk.Image], sitk.Image]:
    """Render the three contrast phases and the target-tumour mask on the acquisition's grid.

    Returns images as int16 SimpleITK images (scaled by the centre's intensity scale) and a uint8 mask.
    """
    rng = np.random.default_rng(seed)
    pts, origin = grid_points(acq, fov_centre)
    bx, by = anatomy.body_centre
    ra, rb = anatomy.body_radii
    body = _soft(1 - np.sqrt(((pts[0] - bx) / ra) ** 2 + ((pts[1] - by) / rb) ** 2), 0.01)
    lrel = (pts - np.array(anatomy.liver_centre)[:, None, None, None]) / np.array(anatomy.liver_radii)[:, None, None, None]
    lr = np.sqrt((lrel**2).sum(axis=0)) * (1 + 0.07 * _waves(pts, anatomy.liver_shape_seed, 4, (80.0, 160.0)))
    liver = _soft(1 - lr, 0.02) * body
    # Tissue weights (soft, summing to <= 1 per voxel); later structures overwrite earlier ones.
    signal = [np.full(pts.shape[1:], TISSUE["air"][p]) for p in range(3)]
    for p in range(3):
        signal[p] = signal[p] * (1 - body) + TISSUE["body"][p] * body
        signal[p] = signal[p] * (1 - liver) + TISSUE["liver"][p] * liver
    ax, ay, ar = anatomy.aorta
    aorta = _soft(ar - np.sqrt((pts[0] - ax) ** 2 + (pts[1] - ay) ** 2), 1.0)
    for p in range(3):
        signal[p] = signal[p] * (1 - aorta) + TISSUE["aorta"][p] * aorta
    for start, direction, radius in anatomy.vessels:
        s, v = np.array(start)[:, None, None, None], np.array(direction)[:, None, None, None]
        rel = pts - s
        along = (rel * v).sum(axis=0)
        dist = np.sqrt(np.maximum((rel**2).sum(axis=0) - along**2, 0))
        vessel = _soft(radius - dist, 0.8) * liver
        for p in range(3):
            signal[p] = signal[p] * (1 - vessel) + TISSUE["portal"][p] * vessel
    mask = np.zeros(pts.shape[1:], dtype=np.uint8)
    for i, t in enumerate(anatomy.tumours):
        r = _tumour_radius(pts, t)
        inside = _soft(1 - r, 0.04)
        core = _soft(t.necrosis - r, 0.04) if t.necrosis > 0 else np.zeros_like(r)
        rim_width = 2.5 / float(np.mean(t.radii))  # a ~2.5 mm capsule, in normalised-radius units
        rim = np.exp(-(((r - 1.0) / rim_width) ** 2)) * t.capsule
        texture = 1 + t.heterogeneity * _waves(pts, t.texture_seed, 14, (5.0, 25.0))
        liver_sig = [TISSUE["liver"][p] for p in range(3)]
        tumour_sig = [
            liver_sig[0] * (1 + t.aphe) * texture,
            liver_sig[1] * (1 - 0.5 * t.washout) * texture,
            liver_sig[2] * (1 - t.washout) * texture + 0.6 * rim,
        ]
        for p in range(3):
            sig = tumour_sig[p] * (1 - core) + TISSUE["necrosis"][p] * core
            signal[p] = signal[p] * (1 - inside) + sig * inside
        if i == 0:
            mask = (r < 1.0).astype(np.uint8)
            if not mask.any():  # a tumour smaller than a voxel: a reader would still mark the voxel holding it
                mask.flat[int(np.argmin(r))] = 1
    # Scanner: smooth multiplicative bias field, Rician noise, intensity scale, int16 storage.
    centred = (pts - fov_centre[:, None, None, None]) / 150.0
    coeff = rng.normal(size=4)
    bias = np.exp(
        acq.bias_strength * (coeff[0] * centred[0] + coeff[1] * centred[1] + coeff[2] * centred[2] + coeff[3] * centred[0] * centred[1])
    )
    images = {}
    for p, name in enumerate(PHASES):
        clean = signal[p] * bias
        noisy = np.sqrt((clean + rng.normal(0, acq.noise_sd, clean.shape)) ** 2 + rng.normal(0, acq.noise_sd, clean.shape) ** 2)
        images[name] = _to_image(np.clip(noisy * acq.intensity_scale, 0, 32767).astype(np.int16), acq, origin)
    return images, _to_image(mask, acq, origin)


def _to_image(array: np.ndarray, acq: Acquisition, origin: tuple[float, float, float]) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in acq.spacing))
    image.SetDirection(tuple(float(d) for d in acq.direction))
    image.SetOrigin(origin)
    return image
