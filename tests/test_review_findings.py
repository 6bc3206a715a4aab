"""Regression tests for inputs found by review: detached data files, label maps, damaged caches, odd CSVs."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tace.client.cache import PreprocessCache
from tace.common import imageio
from tace.common.imageio import write_image
from tace.common.manifest import parse_manifest
from tace.common.preprocess import PreprocessConfig
from tace.common.validate import check_site
from tests.conftest import TINY_CONFIG
from tests.helpers import read_rows, set_cell, write_rows


def kinds(manifest: Path, deep: bool = False) -> list[tuple[str, int | None, str | None]]:
    return [(p.kind, p.row, p.column) for p in check_site(manifest, deep=deep).problems]


def _detached(manifest: Path, suffix: str) -> Path:
    """Store row 2's arterial phase as a header + detached voxel file; return the voxel file."""
    record = parse_manifest(manifest).records[0]
    image = sitk.ReadImage(str(manifest.parent / record.images["arterial"]))
    rel = f"images/{record.patient_id}/arterial_detached{suffix}"
    sitk.WriteImage(image, str(manifest.parent / rel), useCompression=False)
    set_cell(manifest, 0, "arterial_path", rel)
    data = [
        f for f in (manifest.parent / rel).parent.iterdir() if f.name.startswith("arterial_detached") and f.suffix not in (".mhd", ".nhdr")
    ]
    assert len(data) == 1
    return data[0]


@pytest.mark.parametrize("suffix", [".mhd", ".nhdr"])
def test_cache_key_covers_detached_voxel_files(site_copy, tmp_path, suffix):
    manifest = site_copy()
    raw = _detached(manifest, suffix)
    assert check_site(manifest, deep=True).ok
    cache = PreprocessCache(tmp_path / "cache", TINY_CONFIG)
    m = parse_manifest(manifest)
    first = cache.load(m.records[0], m.root)
    assert cache.load(m.records[0], m.root).hit
    data = np.fromfile(raw, dtype=np.int16)
    (data[::-1].copy()).tofile(raw)
    os.utime(raw, ns=(raw.stat().st_atime_ns, raw.stat().st_mtime_ns + 10**9))
    again = cache.load(m.records[0], m.root)
    assert not again.hit and not np.array_equal(again.array, first.array)


def test_detached_data_file_that_is_a_folder(site_copy):
    manifest = site_copy()
    raw = _detached(manifest, ".mhd")
    raw.unlink()
    raw.mkdir()
    assert kinds(manifest, deep=True) == [("unreadable", 2, "arterial_path")]


def test_multi_label_mask_is_rejected(site_copy):
    manifest = site_copy()
    record = parse_manifest(manifest).records[0]
    path = manifest.parent / record.mask
    mask = sitk.ReadImage(str(path))
    liver = sitk.Cast(sitk.ReadImage(str(manifest.parent / record.images["arterial"])) > 0, sitk.sitkUInt8)
    sitk.WriteImage(sitk.Cast(liver + mask, mask.GetPixelID()), str(path))
    (p,) = check_site(manifest).problems
    assert (p.kind, p.row, p.column) == ("multi-label-mask", 2, "mask_path") and "binary" in p.hint


def test_empty_cache_entry_is_recomputed_and_entries_are_shared_readable(site_copy, tmp_path):
    manifest = site_copy()
    cache = PreprocessCache(tmp_path / "cache", TINY_CONFIG)
    m = parse_manifest(manifest)
    cache.load(m.records[0], m.root)
    entry = cache.entry_path(cache.key(m.records[0], m.root))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o666 & ~umask
    entry.write_bytes(b"")
    assert cache.load(m.records[0], m.root).hit is False
    assert cache.load(m.records[0], m.root).hit is True


def test_equal_configs_share_a_fingerprint():
    a = PreprocessConfig(spacing_mm=(2, 2, 3))  # type: ignore[arg-type]
    b = PreprocessConfig.from_mapping({"spacing-mm": [2.0, 2.0, 3.0], "box-voxels": [48.0, 48.0, 32.0]})
    assert a.fingerprint() == b.fingerprint() == PreprocessConfig().fingerprint()


def test_manifest_without_header_does_not_echo_values(site_copy):
    manifest = site_copy()
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[1:]) + "\n")
    (p,) = parse_manifest(manifest).problems
    assert p.kind == "missing-header" and p.row == 1 and p.column is None
    first_cells = lines[1].split(",")
    assert not any(len(c) >= 2 and c in p.format() for c in first_cells)


def test_cr_only_line_endings_and_oversized_cell(site_copy):
    manifest = site_copy()
    manifest.write_bytes(manifest.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r"))
    m = parse_manifest(manifest)
    assert m.problems == [] and len(m.records) == 8
    header, rows = read_rows(site_copy("site-b"))
    rows[0]["tace_type"] = '"' + "x" * 200_000
    target = Path(str(manifest).replace("site-a", "site-b"))
    target.write_text(",".join(header) + "\n" + ",".join(rows[0].values()) + "\n")
    assert [p.kind for p in parse_manifest(target).problems] == ["unreadable-file"]


def test_row_numbers_count_records_not_lines(site_copy):
    manifest = site_copy()
    header, rows = read_rows(manifest)
    write_rows(manifest, header, rows)
    text = manifest.read_text().splitlines()
    # a quoted cell with a line break on data row 2 (spreadsheet row 3)
    cells = text[2].split(",")
    cells[header.index("tace_type")] = '"conven\ntional"'
    text[2] = ",".join(cells)
    cells = text[3].split(",")
    cells[header.index("age")] = "200"
    text[3] = ",".join(cells)
    manifest.write_text("\n".join(text) + "\n")
    assert sorted((p.kind, p.row) for p in parse_manifest(manifest).problems) == [("out-of-range", 4), ("unknown-category", 3)]


@pytest.mark.parametrize("value", ["6_2", "0x3e", "infinity", "62,5", "1e3e3"])
def test_numbers_are_plain_decimals(site_copy, value):
    manifest = site_copy()
    set_cell(manifest, 0, "age", value)
    assert [p.kind for p in parse_manifest(manifest).problems] == ["wrong-type"]


def test_backslash_paths_open(site_copy):
    manifest = site_copy()
    record = parse_manifest(manifest).records[0]
    set_cell(manifest, 0, "arterial_path", record.images["arterial"].replace("/", "\\"))
    assert check_site(manifest).ok


def test_permission_problems_are_located(site_copy, monkeypatch):
    manifest = site_copy()
    target = str(manifest.parent / parse_manifest(manifest).records[1].images["delayed"])
    real = os.access
    monkeypatch.setattr(imageio.os, "access", lambda p, mode: False if str(p) == target else real(p, mode))
    assert kinds(manifest) == [("permission-denied", 3, "delayed_path")]


def test_dicom_arterial_missing_slices_is_refused_only_where_the_tumour_is_cut(site_copy):
    """A series short of a slice at the edge still holds the tumour (accepted); one short of the tumour's slices
    is refused on its own column with the extent missing."""
    manifest = site_copy()
    record = parse_manifest(manifest).records[0]
    image = sitk.ReadImage(str(manifest.parent / record.images["arterial"]))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(manifest.parent / record.mask)))
    slices = np.nonzero(mask.any(axis=(1, 2)))[0]
    folder = manifest.parent / f"images/{record.patient_id}/arterial_dicom"
    write_image(image, folder)
    files = sorted(folder.iterdir())
    set_cell(manifest, 0, "arterial_path", f"images/{record.patient_id}/arterial_dicom")
    edge = 0 if slices.min() > 0 else len(files) - 1
    files[edge].unlink()
    assert check_site(manifest).ok
    for f in files[: slices.max() + 1]:
        f.unlink(missing_ok=True)
    (p,) = check_site(manifest).problems
    assert (p.kind, p.column) == ("not-covered", "arterial_path") and "along z (slices)" in p.message


def _client(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tace.client.cli", *args], capture_output=True, text=True, timeout=120)


def test_preprocess_reports_missing_sequence_and_located_read_errors(site_copy, tmp_path):
    manifest = site_copy("site-c")
    out = _client("preprocess", "--manifest", str(manifest), "--cache", str(tmp_path / "c"), "--sequences", "arterial,t2")
    assert out.returncode == 1 and "missing-sequence" in out.stderr and "Traceback" not in out.stderr
    path = manifest.parent / parse_manifest(manifest).records[2].images["portal_venous"]
    path.write_bytes(path.read_bytes()[:-300])  # compressed NRRD: only reading the voxels notices
    out = _client("preprocess", "--manifest", str(manifest), "--cache", str(tmp_path / "d"), "--box", "8,8,8", "--spacing", "8,8,8")
    assert out.returncode == 1
    assert "row 4, column portal_venous_path, file images/site-c-0003/portal_venous.nrrd" in out.stderr


def test_unwritable_json_report_is_a_usage_error(site_copy, tmp_path):
    out = _client("check", "--manifest", str(site_copy()), "--json", str(tmp_path / "missing-folder" / "r.json"))
    assert out.returncode == 2 and "--json" in out.stderr and "Traceback" not in out.stderr


def test_config_replace_keeps_types():
    cfg = replace(TINY_CONFIG, spacing_mm=(8, 8, 8))  # type: ignore[arg-type]
    assert cfg.fingerprint() == TINY_CONFIG.fingerprint()
