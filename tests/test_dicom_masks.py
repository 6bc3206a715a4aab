"""Tumour masks as hospitals store them: DICOM SEG and RTSTRUCT in mask_path, mask_label, polygon filling."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from tace.common.dicom import fill_contours, fill_polygon
from tace.common.imageio import image_info
from tace.common.manifest import parse_manifest
from tace.common.preprocess import preprocess_record
from tace.common.validate import check_site
from tace.simulation.pacs import contours_of, rtstruct_dataset, seg_dataset
from tests.conftest import TINY_CONFIG
from tests.helpers import read_rows, set_cell, write_rows


def _use_mask(manifest: Path, index: int, source: Path, label: str | None = None) -> str:
    """Copy a DICOM mask file into the site and point row `index` at it (with `mask_label` when given)."""
    rel = f"masks/{index}-{source.name}"
    (manifest.parent / "masks").mkdir(exist_ok=True)
    shutil.copy(source, manifest.parent / rel)
    header, rows = read_rows(manifest)
    if "mask_label" not in header:
        header.append("mask_label")
    rows[index]["mask_path"] = rel
    for i, row in enumerate(rows):
        row.setdefault("mask_label", "")
        if i == index:
            row["mask_label"] = label or ""
    write_rows(manifest, header, rows)
    return rel


def _tensor(manifest: Path, index: int) -> np.ndarray:
    parsed = parse_manifest(manifest)
    assert not parsed.problems, [p.format() for p in parsed.problems]
    return preprocess_record(parsed.records[index], parsed.root, TINY_CONFIG)[0]


@pytest.mark.parametrize("kind", ["seg", "rtstruct"])
def test_dicom_mask_gives_the_same_tensor_as_the_nifti_mask(site_copy, tiny_pacs, kind):
    """SEG drawn on the arterial phase, RTSTRUCT on the portal-venous one: each filled back onto a grid gives the
    NIfTI mask's voxels, so the preprocessed tensor is identical."""
    manifest = site_copy()
    index = next(i for i, p in enumerate(tiny_pacs.patients) if p.mask == kind)
    expected = _tensor(manifest, index)
    _use_mask(manifest, index, tiny_pacs.root / tiny_pacs.patients[index].mask_file)
    report = check_site(manifest, deep=True)
    assert report.ok, [p.format() for p in report.problems]
    np.testing.assert_allclose(_tensor(manifest, index), expected, atol=1e-5)


def _two_segment_seg(tmp_path: Path, tiny_pacs, site: Path) -> tuple[Path, int]:
    """A SEG holding 'Tumour' (1) and 'Liver' (2) on row `index`'s arterial series."""
    index = next(i for i, p in enumerate(tiny_pacs.patients) if p.mask == "seg")
    patient = tiny_pacs.patients[index]
    series = sorted((tiny_pacs.root / patient.mask_file).parent.parent.rglob("*"))
    source = [d for d in (pydicom.dcmread(f) for f in series if f.is_file()) if d.SeriesInstanceUID == patient.phases["arterial"]]
    source = [d for d in source if int(getattr(d, "TemporalPositionIdentifier", 2)) == 2]  # a dynamic series: its arterial phase
    source.sort(key=lambda d: int(d.InstanceNumber))
    record = parse_manifest(site).records[index]
    mask = sitk.ReadImage(str(site.parent / record.mask))
    liver = sitk.Cast(mask * 0 + 1, sitk.sitkUInt8)
    path = tmp_path / "two.dcm"
    seg_dataset(source, mask, "Tumour", extra={"Liver": liver}).save_as(path, enforce_file_format=True)
    return path, index


def test_seg_with_several_segments_needs_mask_label(site_copy, tiny_pacs, tmp_path):
    manifest = site_copy()
    path, index = _two_segment_seg(tmp_path, tiny_pacs, manifest)
    expected = _tensor(manifest, index)
    rel = _use_mask(manifest, index, path)
    (p,) = check_site(manifest).problems
    assert (p.kind, p.row, p.column, p.file) == ("mask-label", index + 2, "mask_path", rel)
    assert "2 segments (1 'Tumour', 2 'Liver')" in p.message and "mask_label" in p.hint
    for label in ("Tumour", "tumour", "1"):
        set_cell(manifest, index, "mask_label", label)
        assert check_site(manifest).ok
        np.testing.assert_allclose(_tensor(manifest, index), expected, atol=1e-5)
    set_cell(manifest, index, "mask_label", "Lesion")
    (p,) = check_site(manifest).problems
    assert p.kind == "mask-label" and "names no segment" in p.message and "1 'Tumour', 2 'Liver'" in p.message


def test_rtstruct_with_several_rois_and_a_grid_it_does_not_fit(site_copy, tiny_pacs, tmp_path):
    manifest = site_copy()
    index = next(i for i, p in enumerate(tiny_pacs.patients) if p.mask == "rtstruct")
    record = parse_manifest(manifest).records[index]
    mask = sitk.ReadImage(str(manifest.parent / record.mask))
    original = pydicom.dcmread(tiny_pacs.root / tiny_pacs.patients[index].mask_file)
    source = [pydicom.Dataset()]
    for key in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "PatientID"):
        setattr(source[0], key, original.get(key) or original.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID)
    source[0].SOPClassUID, source[0].SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.4", "1.2.3"
    body = contours_of(sitk.Cast(mask * 0 + 1, sitk.sitkUInt8))
    path = tmp_path / "rs.dcm"
    rtstruct_dataset(source, mask, "GTV", extra={"Body": body}).save_as(path, enforce_file_format=True)
    _use_mask(manifest, index, path)
    (p,) = check_site(manifest).problems
    assert p.kind == "mask-label" and "2 ROIs (1 'GTV', 2 'Body')" in p.message
    set_cell(manifest, index, "mask_label", "GTV")
    assert check_site(manifest).ok
    half_slice = [c + np.array([0.0, 0.0, 0.5 * mask.GetSpacing()[2]]) for c in contours_of(mask)]
    rtstruct_dataset(source, mask, "GTV", extra={"shifted": half_slice}).save_as(path, enforce_file_format=True)
    _use_mask(manifest, index, path, label="shifted")
    (p,) = check_site(manifest).problems
    assert p.kind == "rtstruct-grid" and "arterial_path" in p.message and "another series" in p.hint


def test_an_image_file_as_mask_and_a_label_map(site_copy, tiny_pacs):
    manifest = site_copy()
    slice_file = next(f for f in sorted(tiny_pacs.root.rglob("IM*")) if f.is_file())
    _use_mask(manifest, 0, slice_file)
    (p,) = check_site(manifest).problems
    assert p.kind == "unsupported-format" and "modality MR" in p.message and "SEG or RTSTRUCT" in p.hint
    # A label map (liver 1, tumour 2): refused as multi-label, accepted with mask_label 2, same tensor.
    manifest = site_copy("site-b")
    expected = _tensor(manifest, 0)
    record = parse_manifest(manifest).records[0]
    mask = sitk.ReadImage(str(manifest.parent / record.mask))
    labels = sitk.Cast(mask > 0, sitk.sitkUInt8) + 1
    sitk.WriteImage(labels, str(manifest.parent / "labels.nii.gz"))
    set_cell(manifest, 0, "mask_path", "labels.nii.gz")
    assert [p.kind for p in check_site(manifest).problems] == ["multi-label-mask"]
    _use_mask(manifest, 0, manifest.parent / "labels.nii.gz", label="2")
    assert check_site(manifest).ok
    np.testing.assert_allclose(_tensor(manifest, 0), expected, atol=1e-5)
    set_cell(manifest, 0, "mask_label", "3")
    (p,) = check_site(manifest).problems
    assert p.kind == "mask-label" and "labels found: 1, 2" in p.message


def test_check_cli_names_the_file_and_segments_without_traceback(site_copy, tiny_pacs, tmp_path):
    manifest = site_copy()
    path, index = _two_segment_seg(tmp_path, tiny_pacs, manifest)
    rel = _use_mask(manifest, index, path)
    out = subprocess.run([sys.executable, "-m", "tace.client.cli", "check", "--manifest", str(manifest)], capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"file {rel}" in out.stderr and "'Tumour'" in out.stderr and "mask_label" in out.stderr
    assert tiny_pacs.patients[index].dicom_patient_id not in out.stdout + out.stderr


# Polygon filling against shapes whose voxels are known.


def test_fill_polygon_rectangle_triangle_circle_and_hole():
    rect = np.array([[1.5, 2.5], [6.5, 2.5], [6.5, 4.5], [1.5, 4.5]])
    expected = np.zeros((8, 10), bool)
    expected[3:5, 2:7] = True
    np.testing.assert_array_equal(fill_polygon(rect, (8, 10)), expected)
    # Triangle x >= 0, y >= 0, x + y <= 10 (vertices off the grid): centres strictly inside or on no edge.
    tri = np.array([[-0.01, -0.01], [10.02, -0.01], [-0.01, 10.02]])
    yy, xx = np.mgrid[0:12, 0:12]
    np.testing.assert_array_equal(fill_polygon(tri, (12, 12)), (xx + yy <= 10))
    # Circle of radius 20 around (32.3, 31.7), 180 vertices: the voxel count is the area within the boundary's pixels.
    t = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    circle = np.stack([32.3 + 20 * np.cos(t), 31.7 + 20 * np.sin(t)], axis=1)
    filled = fill_polygon(circle, (64, 64))
    yy, xx = np.mgrid[0:64, 0:64]
    distance = np.hypot(xx - 32.3, yy - 31.7)
    assert filled[distance < 19.9].all() and not filled[distance > 20.0].any()
    assert abs(filled.sum() - np.pi * 20**2) / (np.pi * 20**2) < 0.01
    # A square with a square hole: two contours on one slice, filled by the even-odd rule.
    outer = np.array([[-0.5, -0.5], [9.5, -0.5], [9.5, 9.5], [-0.5, 9.5]])
    inner = np.array([[2.5, 2.5], [6.5, 2.5], [6.5, 6.5], [2.5, 6.5]])
    grid = sitk.Image([10, 10, 3], sitk.sitkUInt8)
    grid.SetSpacing((2.0, 2.0, 5.0))
    grid.SetOrigin((-10.0, 4.0, 30.0))
    to_mm = lambda c: np.array([grid.TransformContinuousIndexToPhysicalPoint((x, y, 1.0)) for x, y in c])  # noqa: E731
    ring = fill_contours([to_mm(outer), to_mm(inner)], image_info(grid))
    assert ring is not None
    array = sitk.GetArrayFromImage(ring)
    assert array[1].sum() == 100 - 16 and array[1, 3:7, 3:7].sum() == 0 and array[0].sum() == array[2].sum() == 0
    assert fill_contours([to_mm(outer) + np.array([0, 0, 2.0])], image_info(grid)) is None  # between two slices
