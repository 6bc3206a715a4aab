"""DICOM beyond image series: header facts (frame of reference, patient) and tumour masks stored as DICOM SEG
(highdicom) or RTSTRUCT (contours filled onto the grid of the image they were drawn on).

`read_mask` and `examine_mask` are the one way the rest of the code reads a mask, whatever its format: a NIfTI,
NRRD or MetaImage mask (optionally a label map, with `mask_label` picking one label), a DICOM SEG or an RTSTRUCT.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from tace.common.errors import ImageReadError
from tace.common.imageio import Examined, ImageInfo, continuous_index, examine_image, voxel_problems

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
#: How far (in slices) a contour may lie from a slice plane and still count as drawn on it.
SLICE_TOLERANCE = 0.1
_MASK_HINT = "mask_path takes a DICOM SEG or RTSTRUCT file, or a NIfTI (.nii/.nii.gz), NRRD or MetaImage mask"


@dataclass(frozen=True)
class DicomFacts:
    """What a DICOM header says about where an image belongs. `patient` is a digest of the PatientID (the ID itself
    is never kept), None when the header has none."""

    frame_of_reference: str | None
    patient: str | None


def is_dicom_file(path: Path) -> bool:
    """A single DICOM file: a `.dcm` name or the 'DICM' marker after the 128-byte preamble."""
    if not path.is_file():
        return False
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _dcmread(path: Path, **kwargs: Any) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings(action="ignore"):  # pydicom warns about vendors' small deviations from the standard
            return pydicom.dcmread(path, **kwargs)
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ImageReadError("unreadable", f"not a readable DICOM file ({type(exc).__name__})", _MASK_HINT) from None


def header_facts(path: Path) -> DicomFacts | None:
    """The frame of reference and patient of a DICOM series folder (its first readable file) or DICOM file; None
    for other formats or when no file reads."""
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file())
    elif is_dicom_file(path):
        files = [path]
    else:
        return None
    for f in files:
        try:
            ds = _dcmread(
                f, stop_before_pixels=True, specific_tags=["FrameOfReferenceUID", "PatientID", "ReferencedFrameOfReferenceSequence"]
            )
        except (ImageReadError, OSError):
            continue
        pid = str(ds.get("PatientID", "") or "")
        frame = str(ds.get("FrameOfReferenceUID", "") or "")
        referenced = ds.get("ReferencedFrameOfReferenceSequence") or []
        if not frame and len(referenced) == 1:  # an RTSTRUCT names the frame of reference of the image it was drawn on
            frame = str(referenced[0].get("FrameOfReferenceUID", "") or "")
        return DicomFacts(frame or None, hashlib.sha256(pid.encode()).hexdigest() if pid else None)
    return None


def read_mask(path: Path | str, label: str | None = None, grids: Sequence[tuple[str, ImageInfo]] = ()) -> sitk.Image:
    """The tumour mask at `path` as a SimpleITK image (non-zero inside the target tumour).

    Parameters
    ----------
    path : path
        A NIfTI/NRRD/MetaImage mask or label map, a DICOM SEG file or a DICOM RTSTRUCT file.
    label : str, optional
        The manifest's `mask_label`: the segment or ROI (number or name) of a SEG/RTSTRUCT, or the label value of
        a label map. Needed when the file holds more than one.
    grids : sequence of (column, ImageInfo)
        The patient's images, in the manifest's order: an RTSTRUCT's contours are filled onto the first of them on
        whose slices they lie.

    Raises
    ------
    ImageReadError
        The first problem `examine_mask` finds.
    """
    examined = examine_mask(path, label, grids)
    if examined.problems:
        raise examined.problems[0]
    assert examined.image is not None
    return examined.image


def examine_mask(path: Path | str, label: str | None = None, grids: Sequence[tuple[str, ImageInfo]] = ()) -> Examined:
    """Every problem of a mask (read whole, every voxel), with its header and voxels when it could be read."""
    path = Path(path)
    if not is_dicom_file(path):
        if label is None:
            return examine_image(path, deep=True, is_mask=True)
        examined = examine_image(path, deep=True, is_mask=False)  # a label map: several labels are expected
        examined.problems = [p for p in examined.problems if p.kind != "constant-image"]
        if examined.image is None or examined.problems:
            return examined
        try:
            examined.image = _pick_label(examined.image, label)
        except ImageReadError as exc:
            examined.problems.append(exc)
            return examined
        examined.problems += voxel_problems(sitk.GetArrayViewFromImage(examined.image), is_mask=True)
        return examined
    try:
        image = _read_dicom_mask(path, label, grids)
    except ImageReadError as exc:
        return Examined(None, [exc])
    except OSError as exc:
        return Examined(None, [ImageReadError("unreadable", f"file cannot be read ({exc.strerror or type(exc).__name__})", _MASK_HINT)])
    info = ImageInfo(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()),
                     3, 1, sitk.GetPixelIDValueAsString(image.GetPixelID()), "dicom-mask")  # fmt: skip
    return Examined(info, voxel_problems(sitk.GetArrayViewFromImage(image), is_mask=True), image)


def _pick_label(image: sitk.Image, label: str) -> sitk.Image:
    """Voxels equal to `label` (an integer) of a label map, as a binary mask."""
    array = sitk.GetArrayViewFromImage(image)
    values = [int(v) for v in np.unique(array[array != 0])[:21]]
    try:
        value = float(label)
    except ValueError:
        value = float("nan")
    if value not in values:
        found = ", ".join(map(str, values[:20])) + (" ..." if len(values) > 20 else "") if values else "none"
        raise ImageReadError("mask-label", f"mask_label is not one of the labels of this label map (labels found: {found})",
                             "write the target tumour's label value in column mask_label, or leave it empty for a binary mask")  # fmt: skip
    out = sitk.Cast(image == value, sitk.sitkUInt8)
    return out


def _read_dicom_mask(path: Path, label: str | None, grids: Sequence[tuple[str, ImageInfo]]) -> sitk.Image:
    ds = _dcmread(path)
    sop = str(ds.get("SOPClassUID", ""))
    if sop == SEG_SOP_CLASS:
        return _read_seg(ds, label)
    if sop == RTSTRUCT_SOP_CLASS:
        return _read_rtstruct(ds, label, grids)
    modality = str(ds.get("Modality", "") or "unknown")
    raise ImageReadError("unsupported-format", f"a DICOM file of modality {modality}, neither SEG nor RTSTRUCT", _MASK_HINT)


def _choose(entries: list[tuple[int, str]], label: str | None, what: str) -> int:
    """The number of the segment or ROI that `label` names (by number or name, case-insensitive); the only one
    when there is one and no label is given; else a `mask-label` error listing what the file holds."""
    listing = ", ".join(f"{n} '{name}'" for n, name in entries) if entries else "none"
    kinds = f"{what}s" if len(entries) != 1 else what
    hint = (f"write the target tumour's {what} number or name in column mask_label "
            f"(for example {entries[-1][0]} or {entries[-1][1]})" if entries else "export the structure set again with the tumour in it")  # fmt: skip
    if label is None or not label.strip():
        if len(entries) == 1:
            return entries[0][0]
        raise ImageReadError(
            "mask-label", f"the file holds {len(entries)} {kinds} ({listing}) and mask_label does not say which is the target tumour", hint
        )
    text = label.strip()
    for number, name in entries:
        if text == str(number) or text.casefold() == name.strip().casefold():
            return number
    raise ImageReadError("mask-label", f"mask_label names no {what} of this file, which holds {len(entries)} {kinds} ({listing})", hint)


def _read_seg(ds: Any, label: str | None) -> sitk.Image:
    import highdicom as hd

    try:
        with warnings.catch_warnings(action="ignore"):
            seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
            entries = [(int(n), str(seg.get_segment_description(n).segment_label)) for n in seg.segment_numbers]
            number = _choose(entries, label, "segment")
            volume = seg.get_volume(segment_numbers=[number], combine_segments=True, dtype=np.uint8)
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - highdicom raises many kinds on frames that do not form one volume
        raise ImageReadError("unreadable", f"the DICOM SEG cannot be read as one 3D volume ({type(exc).__name__})",
                             "export the segmentation again from the series it was drawn on") from None  # fmt: skip
    array = np.asarray(volume.array)  # (slices, rows, columns)
    affine = np.asarray(volume.affine, dtype=float)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)  # per array axis
    image = sitk.GetImageFromArray((array > 0).astype(np.uint8))
    # SimpleITK's (x, y, z) are the array's (columns, rows, slices): its direction columns are the affine's in reverse.
    axes = affine[:3, [2, 1, 0]] / spacing[[2, 1, 0]]
    image.SetSpacing(tuple(float(s) for s in spacing[[2, 1, 0]]))
    image.SetOrigin(tuple(float(v) for v in affine[:3, 3]))
    image.SetDirection(tuple(float(v) for v in axes.ravel()))
    return image


def _read_rtstruct(ds: Any, label: str | None, grids: Sequence[tuple[str, ImageInfo]]) -> sitk.Image:
    names = {int(r.ROINumber): str(r.get("ROIName", "")) for r in ds.get("StructureSetROISequence", [])}
    number = _choose(sorted(names.items()), label, "ROI")
    contours = []
    for item in ds.get("ROIContourSequence", []):
        if int(item.get("ReferencedROINumber", -1)) != number:
            continue
        for c in item.get("ContourSequence", []):
            if str(c.get("ContourGeometricType", "CLOSED_PLANAR")).upper() == "CLOSED_PLANAR":
                points = np.asarray(c.ContourData, dtype=float).reshape(-1, 3)
                if len(points) >= 3:
                    contours.append(points)
    if not contours:
        raise ImageReadError(
            "empty-mask", f"ROI {number} '{names[number]}' has no closed contour", "draw the target tumour's contours in it"
        )
    if not grids:
        raise ImageReadError("rtstruct-grid", "an RTSTRUCT needs an image to be filled onto and this row has none that reads",
                             "fix the row's image problems first")  # fmt: skip
    for _, info in grids:
        mask = fill_contours(contours, info)
        if mask is not None:
            return mask
    columns = ", ".join(c for c, _ in grids)
    raise ImageReadError(
        "rtstruct-grid", f"the RTSTRUCT's contours lie on the slices of none of this patient's images ({columns})",
        "the structure set was drawn on another series (or a reformat): put that series in a phase column, or export the contours "
        "from one of these series",
    )  # fmt: skip


def fill_contours(contours: Sequence[np.ndarray], grid: ImageInfo) -> sitk.Image | None:
    """Fill closed planar contours (LPS mm, each ``(n, 3)``) onto `grid`: a voxel is inside when its centre is inside
    an odd number of the contours of its slice (so a contour inside another makes a hole). None when a contour does not
    lie on one of the grid's slices (within `SLICE_TOLERANCE`)."""
    nx, ny, nz = (int(s) for s in grid.size)
    out = np.zeros((nz, ny, nx), dtype=bool)
    for points in contours:
        index = continuous_index(grid, points)
        k = float(np.round(np.median(index[:, 2])))
        if np.max(np.abs(index[:, 2] - k)) > SLICE_TOLERANCE or not 0 <= k < nz:
            return None
        out[int(k)] ^= fill_polygon(index[:, :2], (ny, nx))
    image = sitk.GetImageFromArray(out.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in grid.spacing))
    image.SetOrigin(tuple(float(o) for o in grid.origin))
    image.SetDirection(tuple(float(d) for d in grid.direction))
    return image


def fill_polygon(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels of a ``(rows, columns)`` grid whose centre (integer x, y) lies inside the polygon `points` (``(n, 2)``,
    continuous x, y index), by the even-odd rule: a scan line per row, crossings counted to the left of each centre."""
    ny, nx = shape
    out = np.zeros(shape, dtype=bool)
    x0, y0 = points[:, 0], points[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    columns = np.arange(nx)
    for y in range(max(0, int(np.ceil(y0.min()))), min(ny - 1, int(np.floor(y0.max()))) + 1):
        crossing = (y0 <= y) != (y1 <= y)  # half-open: a vertex on the scan line counts once
        if not crossing.any():
            continue
        xa, ya, xb, yb = x0[crossing], y0[crossing], x1[crossing], y1[crossing]
        xs = np.sort(xa + (y - ya) * (xb - xa) / (yb - ya))
        out[y] = np.searchsorted(xs, columns, side="left") % 2 == 1
    return out
