"""Values that must never reach the cache: NaN, infinite and constant images are refused by preprocessing (and so by
training), nothing is written for them; `check --deep` lists every problem of a file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tace.client.cache import PreprocessCache
from tace.common.errors import ImageReadError
from tace.common.imageio import write_image
from tace.common.manifest import parse_manifest
from tace.common.validate import check_site
from tests.conftest import TINY_CONFIG
from tests.helpers import set_cell, tree_digest


def _poison(manifest: Path, kind: str, suffix: str) -> str:
    """Row 2's arterial phase rewritten as float with NaN, +inf, or one constant value; returns its path."""
    record = parse_manifest(manifest).records[0]
    image = sitk.Cast(sitk.ReadImage(str(manifest.parent / record.images["arterial"])), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    if kind == "constant":
        array[:] = 250.0
    else:
        array[1, 2, 3] = np.nan if kind == "nan" else np.inf
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(image)
    rel = f"images/{record.patient_id}/arterial_{kind}{suffix}"
    write_image(bad, manifest.parent / rel)
    set_cell(manifest, 0, "arterial_path", rel)
    return rel


@pytest.mark.parametrize(("kind", "suffix", "code"), [("nan", ".nii.gz", "non-finite"), ("nan", ".nii", "non-finite"),
                                                      ("inf", ".nrrd", "non-finite"), ("constant", ".nii.gz", "constant-image")])  # fmt: skip
def test_preprocessing_refuses_and_caches_nothing(site_copy, tmp_path, kind, suffix, code):
    manifest = site_copy()
    rel = _poison(manifest, kind, suffix)
    parsed = parse_manifest(manifest)
    cache = PreprocessCache(tmp_path / "cache", TINY_CONFIG)
    with pytest.raises(ImageReadError) as info:
        cache.load(parsed.records[0], parsed.root)
    assert (info.value.kind, info.value.column, info.value.file) == (code, "arterial_path", rel)
    assert not list((tmp_path / "cache").rglob("*.npz"))
    assert cache.load(parsed.records[1], parsed.root).hit is False  # the other patients go on
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 1


def test_preprocess_command_lists_the_refused_patient(site_copy, tmp_path):
    manifest = site_copy()
    _poison(manifest, "nan", ".nii.gz")
    before = tree_digest(manifest.parent)
    out = subprocess.run([sys.executable, "-m", "tace.client.cli", "preprocess", "--manifest", str(manifest), "--cache", str(tmp_path / "c"),
                          "--spacing", "8,8,8", "--box", "8,8,8"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "row 2, column arterial_path" in out.stderr and "[non-finite]" in out.stderr
    n = len(parse_manifest(manifest).records)
    assert len(list((tmp_path / "c").rglob("*.npz"))) == n - 1
    assert tree_digest(manifest.parent) == before


def test_deep_check_lists_every_problem_of_a_file(site_copy):
    """NaN voxels and a field of view that misses the tumour, in one file: both reported."""
    manifest = site_copy()
    rel = _poison(manifest, "nan", ".nrrd")
    path = manifest.parent / rel
    image = sitk.ReadImage(str(path))
    image.SetOrigin((image.GetOrigin()[0], image.GetOrigin()[1], image.GetOrigin()[2] + 500.0))
    sitk.WriteImage(image, str(path))
    kinds = sorted((p.kind, p.column) for p in check_site(manifest, deep=True).problems)
    assert kinds == [("non-finite", "arterial_path"), ("not-covered", "arterial_path")]
    assert [p.kind for p in check_site(manifest).problems] == ["not-covered"]  # NaN needs --deep
