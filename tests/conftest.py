"""Shared fixtures: a tiny synthetic cohort generated once per session, and copies of it to break."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tace.common.preprocess import PreprocessConfig
from tace.simulation.cohort import generate_cohort, make_preset

#: Small preprocessing for tests on the tiny cohort (its volumes are <= 16^3 voxels of ~12 mm).
TINY_CONFIG = PreprocessConfig(spacing_mm=(8.0, 8.0, 8.0), box_voxels=(8, 8, 8))

#: The MSigDB Hallmark gene sets (v7.0), shipped with the tests under CC BY 4.0 (attribution in its NOTICE.md).
HALLMARK_GMT = Path(__file__).resolve().parent / "data" / "msigdb" / "h.all.v7.0.symbols.gmt"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run tests marked slow (always on when CI is set)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--slow") or bool(os.environ.get("CI"))
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_gpu = False
    keep, drop = [], []
    for item in items:
        if ("slow" in item.keywords and not run_slow) or ("gpu" in item.keywords and not has_gpu):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` preset, seed 7. Read-only: copy a site with `site_copy` before modifying anything."""
    out = tmp_path_factory.mktemp("tiny") / "cohort"
    generate_cohort(out, make_preset("tiny"), seed=7)
    return out


@pytest.fixture
def site_copy(tiny_cohort: Path, tmp_path: Path):
    """Return a function copying one tiny site into this test's tmp folder; yields the copied manifest path."""

    def copy(site: str = "site-a") -> Path:
        dest = tmp_path / site
        shutil.copytree(tiny_cohort / "sites" / site, dest)
        return dest / "manifest.csv"

    return copy


@pytest.fixture(scope="session")
def tiny_pacs(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory):
    """site-a of the tiny cohort as a PACS export (`tace.simulation.pacs.export_site`, seed 3): row 5 (index 4) has no
    delayed phase, row 3's delayed phase is on its own grid, masks alternate SEG / RTSTRUCT. Read-only."""
    from tace.simulation.pacs import export_site

    return export_site(tiny_cohort / "sites" / "site-a" / "manifest.csv", tmp_path_factory.mktemp("pacs") / "export", seed=3,
                       missing_phase={4: "delayed"}, delayed_grid=[2])  # fmt: skip
