"""The site's training/evaluation data: manifest rows -> cached tensors (+ augmentation when training)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from tace.client.cache import PreprocessCache
from tace.common.manifest import PatientRecord


class SiteDataset(Dataset[dict[str, Any]]):
    """Preprocessed patients of one site, read through the site's cache.

    Parameters
    ----------
    records : sequence of PatientRecord
        Rows to serve (e.g. one split).
    manifest_root : Path
        Folder the manifest's image paths are relative to.
    cache : PreprocessCache
    transform : callable, optional
        Applied to ``{"image": tensor}`` (training augmentation); None at evaluation.

    Each item is ``{"image": float32 (C, D, H, W), "label": float32 scalar (NaN if unlabeled), "index": int}``.
    The patient id stays in `records`: batches carry only an index into it.
    """

    def __init__(
        self,
        records: Sequence[PatientRecord],
        manifest_root: Path,
        cache: PreprocessCache,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.records = list(records)
        self.root = Path(manifest_root)
        self.cache = cache
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        array = self.cache.load(record, self.root).array
        sample: dict[str, Any] = {"image": torch.from_numpy(np.ascontiguousarray(array))}
        if self.transform is not None:
            sample = self.transform(sample)
            image = sample["image"]
            # MONAI returns MetaTensors; hand the training loop a plain tensor.
            sample["image"] = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        label = float("nan") if record.response is None else float(record.response)
        sample["label"] = torch.tensor(label, dtype=torch.float32)
        sample["index"] = index
        return sample
