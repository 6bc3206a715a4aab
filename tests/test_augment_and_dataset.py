"""Training augmentation (MONAI) and the site dataset."""

from __future__ import annotations

import torch

from tace.client.cache import PreprocessCache
from tace.client.data import SiteDataset
from tace.common.augment import train_transforms
from tace.common.manifest import parse_manifest
from tests.conftest import TINY_CONFIG


def dataset(tiny_cohort, tmp_path, transform=None) -> SiteDataset:
    m = parse_manifest(tiny_cohort / "sites/site-b/manifest.csv")
    return SiteDataset(m.records, m.root, PreprocessCache(tmp_path / "cache", TINY_CONFIG), transform)


def test_dataset_items(tiny_cohort, tmp_path):
    ds = dataset(tiny_cohort, tmp_path)
    item = ds[0]
    assert item["image"].shape == TINY_CONFIG.shape and item["image"].dtype == torch.float32
    assert item["label"].item() in (0.0, 1.0) and item["index"] == 0
    assert torch.equal(ds[0]["image"], item["image"])  # no augmentation at evaluation
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, *TINY_CONFIG.shape)


def test_augmentation_is_seeded_and_shape_preserving(tiny_cohort, tmp_path):
    plain = dataset(tiny_cohort, tmp_path)
    a = dataset(tiny_cohort, tmp_path, train_transforms(seed=1))
    b = dataset(tiny_cohort, tmp_path, train_transforms(seed=1))
    c = dataset(tiny_cohort, tmp_path, train_transforms(seed=2))
    xs_a = [a[i % 8]["image"] for i in range(12)]
    xs_b = [b[i % 8]["image"] for i in range(12)]
    xs_c = [c[i % 8]["image"] for i in range(12)]
    assert all(type(x) is torch.Tensor and x.shape == TINY_CONFIG.shape for x in xs_a)
    assert all(torch.equal(x, y) for x, y in zip(xs_a, xs_b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(xs_a, xs_c, strict=True))
    assert sum(not torch.equal(xs_a[i], plain[i % 8]["image"]) for i in range(12)) >= 6
