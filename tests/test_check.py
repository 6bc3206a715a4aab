"""Site checks on images: every corrupt, truncated, misaligned or empty input is found, located and explained."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tace.common.imageio import write_image
from tace.common.manifest import parse_manifest
from tace.common.validate import GeometryTolerance, check_site
from tests.helpers import set_cell, tree_digest


def problem_kinds(manifest: Path, deep: bool = False) -> list[tuple[str, int | None, str | None]]:
    return [(p.kind, p.row, p.column) for p in check_site(manifest, deep=deep).problems]


def image_of(manifest: Path, index: int, column: str) -> Path:
    record = parse_manifest(manifest).records[index]
    return manifest.parent / (record.mask if column == "mask_path" else record.images[column.removesuffix("_path")])


@pytest.mark.parametrize("site", ["site-a", "site-c", "site-d", "site-e"])
def test_generated_sites_pass_deep_check(site_copy, site):
    report = check_site(site_copy(site), deep=True)
    assert report.ok, [p.format() for p in report.problems]
    assert report.summary is not None and report.summary.n_patients == report.n_rows


def test_missing_file(site_copy):
    manifest = site_copy()
    image_of(manifest, 1, "portal_venous_path").unlink()
    assert problem_kinds(manifest) == [("missing-file", 3, "portal_venous_path")]


@pytest.mark.parametrize(
    ("site", "column"),
    [("site-e", "arterial_path"), ("site-a", "delayed_path"), ("site-c", "arterial_path"), ("site-d", "portal_venous_path")],
)
def test_truncated_image_found_without_deep(site_copy, site, column):
    """SimpleITK reads these files without error, filling the missing voxels with 0."""
    manifest = site_copy(site)
    path = image_of(manifest, 2, column)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - max(50, len(data) // 4)])
    sitk.ReadImage(str(path)) if site in ("site-e", "site-a") else None  # the trap: no error from SimpleITK
    expected = [("truncated", 4, column)]
    found = problem_kinds(manifest, deep=site in ("site-c", "site-d"))  # compressed NRRD/MHA need the deep read
    assert found == expected


def test_truncated_message_gives_sizes_and_hint(site_copy):
    manifest = site_copy("site-e")
    path = image_of(manifest, 0, "arterial_path")
    path.write_bytes(path.read_bytes()[:-100])
    (p,) = check_site(manifest).problems
    assert "header promises" in p.message and "re-export" in p.hint and p.file == "images/site-e-0001/arterial.nii"


def test_corrupt_file(site_copy):
    manifest = site_copy()
    image_of(manifest, 0, "arterial_path").write_bytes(b"this is not an image" * 10)
    kinds = problem_kinds(manifest)
    assert kinds[0][1:] == (2, "arterial_path") and kinds[0][0] in ("unreadable", "corrupt")


def test_unsupported_format(site_copy):
    manifest = site_copy()
    set_cell(manifest, 0, "arterial_path", "images/site-a-0001/arterial.png")
    (manifest.parent / "images/site-a-0001/arterial.png").write_bytes(b"\x89PNG")
    assert problem_kinds(manifest) == [("unsupported-format", 2, "arterial_path")]


def test_non_3d_image(site_copy):
    manifest = site_copy()
    path = image_of(manifest, 0, "delayed_path")
    image = sitk.ReadImage(str(path))
    sitk.WriteImage(image[:, :, 3], str(path))
    assert problem_kinds(manifest) == [("not-3d", 2, "delayed_path")]


@pytest.mark.parametrize("aspect", ["size", "spacing", "origin", "direction"])
def test_phase_on_another_grid_is_accepted_when_it_covers_the_tumour(site_copy, aspect):
    """Preprocessing resamples every phase in physical space: another slice count, spacing, origin or orientation is
    fine as long as the tumour is inside the phase."""
    manifest = site_copy()
    path = image_of(manifest, 0, "portal_venous_path")
    image = sitk.ReadImage(str(path))
    grid = sitk.Image(image.GetSize(), image.GetPixelID())
    grid.CopyInformation(image)
    if aspect == "size":
        grid = sitk.Image([*image.GetSize()[:2], image.GetSize()[2] + 3], image.GetPixelID())
        grid.SetSpacing(image.GetSpacing())
        grid.SetDirection(image.GetDirection())
        grid.SetOrigin(image.TransformIndexToPhysicalPoint((0, 0, -1)))
    elif aspect == "spacing":
        grid.SetSpacing(tuple(s * 0.8 for s in image.GetSpacing()))
    elif aspect == "origin":
        grid.SetOrigin(tuple(o + 0.4 * s for o, s in zip(image.GetOrigin(), image.GetSpacing(), strict=True)))
    else:  # the same field of view stored the other way round (x and y flipped about its centre)
        centre = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()])
        d = np.array(image.GetDirection()).reshape(3, 3) @ np.diag([-1.0, -1.0, 1.0])
        grid.SetDirection(tuple(d.ravel()))
        half = d @ (np.array(image.GetSpacing()) * (np.array(image.GetSize()) - 1) / 2)
        grid.SetOrigin(tuple(np.array(centre) - half))
    sitk.WriteImage(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0, image.GetPixelID()), str(path))
    report = check_site(manifest, deep=True)
    assert report.ok, [p.format() for p in report.problems]


def test_phase_that_misses_the_tumour_is_refused_with_the_extent(site_copy):
    manifest = site_copy()
    path = image_of(manifest, 0, "portal_venous_path")
    image = sitk.ReadImage(str(path))
    shift = image.GetSpacing()[2] * (image.GetSize()[2] + 2)  # the whole field of view moved past the tumour
    image.SetOrigin((image.GetOrigin()[0], image.GetOrigin()[1], image.GetOrigin()[2] + shift))
    sitk.WriteImage(image, str(path))
    (p,) = check_site(manifest).problems
    assert (p.kind, p.row, p.column) == ("not-covered", 2, "portal_venous_path")
    assert re.search(r"beyond this image by \d+\.\d mm along z \(slices\)", p.message) and "field of view" in p.hint


def test_mask_that_misses_every_image_blames_the_mask(site_copy):
    manifest = site_copy()
    path = image_of(manifest, 0, "mask_path")
    mask = sitk.ReadImage(str(path))
    mask.SetOrigin(tuple(o + 500.0 for o in mask.GetOrigin()))
    sitk.WriteImage(mask, str(path))
    (p,) = check_site(manifest).problems
    assert (p.kind, p.column) == ("not-covered", "mask_path") and "outside every image" in p.message


def test_geometry_within_tolerance_shares_the_arterial_coverage(site_copy):
    manifest = site_copy()
    path = image_of(manifest, 0, "mask_path")
    image = sitk.ReadImage(str(path))
    image.SetOrigin(tuple(o + 0.05 * image.GetSpacing()[0] for o in image.GetOrigin()))
    sitk.WriteImage(image, str(path))
    assert check_site(manifest).ok
    assert check_site(manifest, tolerance=GeometryTolerance(origin_voxels=0.01)).ok


def test_empty_mask(site_copy):
    manifest = site_copy()
    path = image_of(manifest, 4, "mask_path")
    mask = sitk.ReadImage(str(path))
    sitk.WriteImage(mask * 0, str(path))
    assert problem_kinds(manifest) == [("empty-mask", 6, "mask_path")]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_non_finite_voxels_found_by_deep_check(site_copy, suffix):
    manifest = site_copy()
    record = parse_manifest(manifest).records[0]
    image = sitk.Cast(sitk.ReadImage(str(manifest.parent / record.images["arterial"])), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[2, 3, 4] = np.nan
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(image)
    rel = f"images/{record.patient_id}/arterial_float{suffix}"
    write_image(bad, manifest.parent / rel)
    set_cell(manifest, 0, "arterial_path", rel)
    if suffix.startswith(".nii"):
        # The trap this check exists for: SimpleITK hands back 0 where the file holds NaN.
        assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(manifest.parent / rel)))).all()
    assert check_site(manifest).ok
    assert problem_kinds(manifest, deep=True) == [("non-finite", 2, "arterial_path")]


def test_constant_image_found_by_deep_check(site_copy):
    manifest = site_copy()
    path = image_of(manifest, 0, "arterial_path")
    image = sitk.ReadImage(str(path))
    sitk.WriteImage(image * 0 + 100, str(path))
    assert problem_kinds(manifest, deep=True) == [("constant-image", 2, "arterial_path")]


def _dicom_site(manifest: Path) -> Path:
    """Turn row 2's arterial phase into a DICOM series folder; return the folder."""
    record = parse_manifest(manifest).records[0]
    image = sitk.ReadImage(str(manifest.parent / record.images["arterial"]))
    rel = f"images/{record.patient_id}/arterial_dicom"
    write_image(image, manifest.parent / rel)
    set_cell(manifest, 0, "arterial_path", rel)
    return manifest.parent / rel


def test_dicom_series_passes_and_missing_slice_is_found(site_copy):
    manifest = site_copy()
    folder = _dicom_site(manifest)
    assert check_site(manifest, deep=True).ok
    sorted(folder.iterdir())[5].unlink()
    assert ("uneven-slices", 2, "arterial_path") in problem_kinds(manifest)


def test_dicom_folder_with_two_series(site_copy):
    manifest = site_copy()
    folder = _dicom_site(manifest)
    image = sitk.ReadImage(str(image_of(manifest, 1, "arterial_path")))
    write_image(image, folder.parent / "other_series")
    for f in (folder.parent / "other_series").iterdir():
        shutil.move(f, folder / ("b_" + f.name))
    (p,) = [p for p in check_site(manifest).problems if p.column == "arterial_path"]
    assert p.kind == "multiple-series" and "own folder" in p.hint


def test_empty_dicom_folder(site_copy):
    manifest = site_copy()
    (manifest.parent / "images/empty").mkdir()
    set_cell(manifest, 0, "arterial_path", "images/empty")
    assert problem_kinds(manifest) == [("unreadable", 2, "arterial_path")]


def test_all_problems_of_a_site_reported_and_nothing_modified(site_copy):
    manifest = site_copy()
    image_of(manifest, 0, "arterial_path").unlink()
    mask = image_of(manifest, 5, "mask_path")
    set_cell(manifest, 3, "age", "12")
    sitk.WriteImage(sitk.ReadImage(str(mask)) * 0, str(mask))
    before = tree_digest(manifest.parent)
    report = check_site(manifest, deep=True)
    assert tree_digest(manifest.parent) == before
    assert [(p.kind, p.row) for p in report.problems] == [("missing-file", 2), ("out-of-range", 5), ("empty-mask", 7)]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tace.client.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_exit_codes_and_messages(site_copy, tmp_path):
    manifest = site_copy()
    ok = _cli("check", "--manifest", str(manifest))
    assert ok.returncode == 0, ok.stderr
    assert "passed all checks" in ok.stdout and "patients" in ok.stdout and "responders" in ok.stdout
    # the summary is aggregate: no patient id appears
    assert "site-a-0001" not in ok.stdout

    image_of(manifest, 2, "delayed_path").write_bytes(b"garbage")
    set_cell(manifest, 1, "sex", "Q")
    report_json = tmp_path / "report.json"
    bad = _cli("check", "--manifest", str(manifest), "--json", str(report_json))
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    assert "row 3, column sex" in bad.stderr and "row 4, column delayed_path, file images/site-a-0003/delayed.nii.gz" in bad.stderr
    assert '"ok": false' in report_json.read_text()

    missing = _cli("check", "--manifest", str(tmp_path / "nope.csv"))
    assert missing.returncode == 1 and "manifest file not found" in missing.stderr and "Traceback" not in missing.stderr
    usage = _cli("check")
    assert usage.returncode == 2 and "--manifest" in usage.stderr


def test_plain_nifti_named_nii_gz_is_accepted_and_short_file_is_truncated(site_copy):
    manifest = site_copy("site-a")
    path = image_of(manifest, 0, "arterial_path")
    sitk.WriteImage(sitk.ReadImage(str(path)), str(path.with_name("plain.nii")))
    path.write_bytes(path.with_name("plain.nii").read_bytes())  # uncompressed bytes under a .nii.gz name
    assert check_site(manifest, deep=True).ok
    path.write_bytes(path.read_bytes()[:200])
    assert problem_kinds(manifest)[0][0] in ("truncated", "unreadable")
    assert "Traceback" not in str(check_site(manifest).problems)
