"""A synthetic PACS export: a site's volumes as DICOM studies, with the series and names a hospital's export has.

`export_site` turns the patients of a manifest (the synthetic cohort's, or any other) into a DICOM tree as a
hospital's PACS exports it: per study a localiser, a pre-contrast series, the arterial, portal-venous and delayed
phases under one scanner vendor's names (or one dynamic series holding the four temporal phases), T2, DWI and a
subtraction; some studies in one folder per series, others all in one folder; tumour masks as DICOM SEG
(highdicom) or RTSTRUCT (pydicom). The voxels are exactly those of the manifest's files, so `tace-client import`
can be compared with the manifest it came from. Deterministic for a seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from tace.common.manifest import PatientRecord, parse_manifest

#: Series descriptions as four vendors' liver protocols name them: (pre, arterial, portal venous, delayed, dynamic,
#: T2, DWI, localiser, subtraction).
VENDORS: dict[str, dict[str, str]] = {
    "siemens": {"pre": "t1_vibe_fs_tra_pre", "arterial": "t1_vibe_fs_tra_art", "portal_venous": "t1_vibe_fs_tra_pv",
                "delayed": "t1_vibe_fs_tra_delay_3min", "dynamic": "t1_vibe_fs_tra_dyn_4phases", "t2": "t2_haste_tra_mbh",
                "dwi": "ep2d_diff_b50_400_800_tra", "localiser": "localizer", "subtraction": "t1_vibe_fs_tra_art_SUB"},
    "ge": {"pre": "Ax LAVA-Flex PRE", "arterial": "Ax LAVA-Flex Late Arterial", "portal_venous": "Ax LAVA-Flex Portal Venous 70s",
           "delayed": "Ax LAVA-Flex Delayed 3 min", "dynamic": "Ax LAVA Multiphase", "t2": "Ax SSFSE T2", "dwi": "Ax DWI b800",
           "localiser": "3-Plane Loc", "subtraction": "SUB Ax LAVA-Flex Arterial"},
    "philips": {"pre": "T1 eTHRIVE native", "arterial": "eTHRIVE arterial", "portal_venous": "eTHRIVE venous",
                "delayed": "eTHRIVE late equilibrium", "dynamic": "eTHRIVE_dyn", "t2": "T2W_SPAIR", "dwi": "DWI_b0_800",
                "localiser": "Survey", "subtraction": "eTHRIVE subtraction"},
    "canon": {"pre": "Quick3D plain", "arterial": "Quick3D HAP", "portal_venous": "Quick3D PVP", "delayed": "Quick3D equilibrium",
              "dynamic": "Quick3D dynamic", "t2": "FASE T2 tra", "dwi": "DWI b1000", "localiser": "Locator",
              "subtraction": "Quick3D SUB HAP"},
}  # fmt: skip
#: Seconds from the contrast injection to each phase's acquisition (pre-contrast: before it).
DELAYS_S = {"pre": -60.0, "arterial": 35.0, "portal_venous": 70.0, "delayed": 180.0}
_ROOT_UID = "1.2.826.0.1.3680043.8.498."
_MR = "1.2.840.10008.5.1.4.1.1.4"
_RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"


@dataclass
class ExportedPatient:
    """What `export_site` wrote for one manifest row: its DICOM PatientID and where each phase went."""

    record_id: str
    dicom_patient_id: str
    vendor: str
    dynamic: bool
    phases: dict[str, str] = field(default_factory=dict)  # phase -> SeriesInstanceUID ("" for none)
    missing: tuple[str, ...] = ()
    mask: str = ""  # "seg", "rtstruct" or ""
    mask_file: str = ""  # relative to the export's root


@dataclass
class PacsExport:
    root: Path
    patients: list[ExportedPatient]
    n_series: int
    n_files: int


def uid(*parts: object) -> str:
    """A deterministic DICOM UID from `parts`."""
    digest = int(hashlib.sha256("/".join(str(p) for p in parts).encode()).hexdigest()[:30], 16)
    return f"{_ROOT_UID}{digest}"[:64]


def _time(seconds: float) -> str:
    seconds = seconds % 86400
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{int(h):02d}{int(m):02d}{s:09.6f}"


def export_site(
    manifest: Path | str,
    out: Path | str,
    seed: int = 0,
    *,
    dynamic_every: int = 3,
    missing_phase: dict[int, str] | None = None,
    delayed_grid: Sequence[int] = (),
    masks: str = "alternate",
    patients: int | None = None,
) -> PacsExport:
    """Write the patients of `manifest` as a PACS export under `out`.

    Parameters
    ----------
    manifest : path
        A site manifest (NIfTI/NRRD/MetaImage/DICOM images; the voxels must be integers).
    out : path
        Folder for the export (created).
    seed : int
        Chooses the PatientIDs, UIDs and each study's vendor.
    dynamic_every : int
        Every n-th patient (0-based index divisible by n) gets one dynamic series holding the pre-contrast,
        arterial, portal-venous and delayed temporal phases instead of four series (0: none).
    missing_phase : {row index: phase}
        Patients whose export lacks a phase (as when a series was not sent to PACS).
    delayed_grid : indices
        Patients whose delayed phase is acquired on its own grid (2/3 of the slices, 1.5 times thicker, shifted).
    masks : "alternate", "seg", "rtstruct" or "none"
        Tumour masks in the export: DICOM SEG on the arterial phase, RTSTRUCT on the portal-venous phase, or
        alternating between them.
    patients : int, optional
        Export only the first `patients` rows.
    """
    parsed = parse_manifest(manifest)
    if parsed.problems:
        raise ValueError(f"{manifest}: {len(parsed.problems)} problems; export_site needs a valid manifest")
    out = Path(out)
    rng = np.random.default_rng(seed)
    missing_phase = missing_phase or {}
    result = PacsExport(out, [], 0, 0)
    vendors = sorted(VENDORS)
    for i, record in enumerate(parsed.records[:patients]):
        vendor = vendors[int(rng.integers(len(vendors)))]
        pid = f"MRN{seed:02d}{int(rng.integers(10**6, 10**7))}"
        kind = masks if masks != "alternate" else ("seg", "rtstruct")[i % 2]
        patient = ExportedPatient(record.patient_id, pid, vendor, bool(dynamic_every) and i % dynamic_every == 0,
                                  missing=(missing_phase[i],) if i in missing_phase else (), mask="" if kind == "none" else kind)  # fmt: skip
        _export_patient(record, parsed.root, out, patient, seed, i in delayed_grid, i % 2 == 1, result)
        result.patients.append(patient)
    return result


def _export_patient(record: PatientRecord, root: Path, out: Path, patient: ExportedPatient, seed: int, own_grid: bool,
                    one_folder: bool, result: PacsExport) -> None:  # fmt: skip
    names = VENDORS[patient.vendor]
    images = {seq: sitk.ReadImage(str(root / rel)) for seq, rel in record.images.items()}
    mask = sitk.ReadImage(str(root / record.mask))
    if own_grid:
        images["delayed"] = _regrid(images["delayed"])
    study = {"PatientID": patient.dicom_patient_id, "PatientName": f"TEST^{patient.dicom_patient_id}", "PatientSex": "O",
             "PatientBirthDate": "19600101", "StudyInstanceUID": uid(seed, patient.dicom_patient_id, "study"), "StudyDate": "20240312",
             "StudyTime": "101500", "AccessionNumber": f"ACC{patient.dicom_patient_id[-5:]}", "StudyID": "1",
             "ReferringPhysicianName": "", "FrameOfReferenceUID": uid(seed, patient.dicom_patient_id, "for"),
             "Manufacturer": patient.vendor.upper(), "StudyDescription": "MRI LIVER DYNAMIC"}  # fmt: skip
    folder = out / patient.dicom_patient_id / ("" if one_folder else "study1")
    injection = 10 * 3600 + 20 * 60.0
    pre = sitk.Cast(sitk.Cast(images["arterial"], sitk.sitkFloat32) * 0.6, sitk.sitkInt16)
    series: list[tuple[str, list[tuple[sitk.Image, float | None, str]], tuple[str, ...]]] = []
    series.append((names["localiser"], [], ("ORIGINAL", "PRIMARY", "LOCALIZER")))
    phases = {"pre": pre, **{p: images[p] for p in ("arterial", "portal_venous", "delayed")}}
    present = [p for p in phases if p not in patient.missing]
    if patient.dynamic:
        series.append((names["dynamic"], [(phases[p], DELAYS_S[p], p) for p in present], ("ORIGINAL", "PRIMARY")))
    else:
        series += [(names[p], [(phases[p], DELAYS_S[p], p)], ("ORIGINAL", "PRIMARY")) for p in present]
    series.append((names["subtraction"], [(images["arterial"], DELAYS_S["arterial"], "sub")], ("DERIVED", "SECONDARY", "SUBTRACTION")))
    series.append((names["t2"], [(images.get("t2", images["portal_venous"]), None, "t2")], ("ORIGINAL", "PRIMARY")))
    series.append((names["dwi"], [(images.get("dwi", images["portal_venous"]), None, "dwi")], ("ORIGINAL", "PRIMARY", "DIFFUSION")))
    written: dict[str, list[Any]] = {}
    for number, (description, volumes, image_type) in enumerate(series, start=1):
        series_uid = uid(seed, patient.dicom_patient_id, "series", number)
        target = folder if one_folder else folder / f"{number:03d}"
        if not volumes:
            datasets = _localiser(images["arterial"], study, series_uid, number, description, image_type)
        else:
            datasets = []
            for position, (image, delay, name) in enumerate(volumes, start=1):
                timing: dict[str, Any] = {"AcquisitionTime": _time(injection + (delay if delay is not None else -300.0))}
                if delay is not None and delay > 0:
                    timing.update(ContrastBolusAgent="Gd-EOB-DTPA", ContrastBolusStartTime=_time(injection))
                if len(volumes) > 1:
                    timing.update(TemporalPositionIdentifier=position, NumberOfTemporalPositions=len(volumes))
                datasets += _slices(image, {**study, **timing}, series_uid, number, description, image_type, len(datasets))
                if name in ("arterial", "portal_venous", "delayed"):
                    patient.phases[name] = series_uid
                    written[name] = datasets[-image.GetDepth() :]
        for k, ds in enumerate(datasets):
            _save(ds, target / f"IM{number:03d}{k + 1:04d}.dcm" if one_folder else target / f"IM{k + 1:04d}")
        result.n_series += 1
        result.n_files += len(datasets)
    if patient.mask == "seg" and "arterial" in written:
        target = folder / "SEG" / "seg.dcm"
        _save(seg_dataset(written["arterial"], mask, "Tumour", seed), target)
    elif patient.mask == "rtstruct" and "portal_venous" in written:
        target = folder / "RTSTRUCT" / "rs.dcm"
        _save(rtstruct_dataset(written["portal_venous"], mask, "GTV_tumour", seed), target)
    else:
        patient.mask = ""
        return
    patient.mask_file = target.relative_to(out).as_posix()
    result.n_series += 1
    result.n_files += 1


def _regrid(image: sitk.Image) -> sitk.Image:
    """The same anatomy on another grid: 1.5 times thicker slices, 2/3 of them, shifted half a slice."""
    spacing = list(image.GetSpacing())
    size = list(image.GetSize())
    spacing[2] *= 1.5
    size[2] = max(2, (size[2] * 2) // 3 + 1)
    grid = sitk.Image(size, sitk.sitkInt16)
    grid.SetSpacing(spacing)
    grid.SetDirection(image.GetDirection())
    grid.SetOrigin(image.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, 0.25)))
    return sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkInt16)


def _geometry(image: sitk.Image, k: int) -> dict[str, Any]:
    d = image.GetDirection()
    return {
        "ImagePositionPatient": [round(v, 6) for v in image.TransformIndexToPhysicalPoint((0, 0, k))],
        "ImageOrientationPatient": [round(v, 6) for v in (d[0], d[3], d[6], d[1], d[4], d[7])],
        "PixelSpacing": [round(image.GetSpacing()[1], 6), round(image.GetSpacing()[0], 6)],
        "SliceThickness": round(image.GetSpacing()[2], 6),
        "SpacingBetweenSlices": round(image.GetSpacing()[2], 6),
    }


def _mr(attrs: dict[str, Any], pixels: np.ndarray, series_uid: str, number: int, description: str, image_type: Sequence[str],
        instance: int) -> Any:  # fmt: skip
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_uid = uid(series_uid, instance)
    ds.file_meta.MediaStorageSOPClassUID = UID(_MR)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = _MR, sop_uid, "MR"
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = series_uid, number, description, instance
    ds.ImageType = list(image_type)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    return ds


def _slices(image: sitk.Image, attrs: dict[str, Any], series_uid: str, number: int, description: str, image_type: Sequence[str],
            first: int) -> list[Any]:  # fmt: skip
    array = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkInt16))
    return [
        _mr({**attrs, **_geometry(image, k)}, array[k], series_uid, number, description, image_type, first + k + 1)
        for k in range(image.GetDepth())
    ]


def _localiser(image: sitk.Image, attrs: dict[str, Any], series_uid: str, number: int, description: str,
               image_type: Sequence[str]) -> list[Any]:  # fmt: skip
    """Three single slices in three orientations (axial, coronal, sagittal), as a 3-plane localiser is."""
    array = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkInt16))
    centre = [s // 2 for s in image.GetSize()]
    out = []
    for k, (pixels, orientation) in enumerate(
        (
            (array[centre[2]], (1, 0, 0, 0, 1, 0)),
            (array[:, centre[1], :], (1, 0, 0, 0, 0, -1)),
            (array[:, :, centre[0]], (0, 1, 0, 0, 0, -1)),
        )
    ):
        geometry = {**_geometry(image, centre[2]), "ImageOrientationPatient": list(orientation), "AcquisitionTime": _time(36000 + k)}
        out.append(_mr({**attrs, **geometry}, pixels, series_uid, number, description, image_type, k + 1))
    return out


def _save(ds: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def seg_dataset(source: Sequence[Any], mask: sitk.Image, label: str, seed: int = 0, extra: dict[str, sitk.Image] | None = None) -> Any:
    """A DICOM SEG (highdicom) of `mask` (on the grid of the `source` slices) named `label`; `extra` adds further
    segments by name (for example the liver), each on the same grid."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    segments = {label: mask, **(extra or {})}
    arrays = [sitk.GetArrayFromImage(m) > 0 for m in segments.values()]
    pixels = np.stack(arrays, axis=-1).astype(np.uint8)  # (frames, rows, columns, segments)
    algorithm = hd.AlgorithmIdentificationSequence(name="synthetic", version="1", family=codes.cid7162.ArtificialIntelligence)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1, segment_label=name, segmented_property_category=codes.cid7150.Tissue,
            segmented_property_type=codes.cid7166.ConnectiveTissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for i, name in enumerate(segments)
    ]  # fmt: skip
    series_uid = uid(seed, source[0].SeriesInstanceUID, "seg")
    return hd.seg.Segmentation(
        source_images=list(source), pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=series_uid, series_number=90,
        sop_instance_uid=uid(series_uid, 1), instance_number=1, manufacturer="TACE-FL", manufacturer_model_name="pacs-export",
        software_versions="1", device_serial_number="0",
    )  # fmt: skip


def contours_of(mask: sitk.Image) -> list[np.ndarray]:
    """Closed planar contours (LPS mm, shape (n, 3)) whose filling gives back `mask` exactly: per slice, one
    rectangle around each horizontal run of tumour voxels (their edges run between voxel centres)."""
    array = sitk.GetArrayFromImage(mask) > 0
    out = []
    for k, y, x in zip(*np.nonzero(array & ~np.pad(array, ((0, 0), (0, 0), (1, 0)))[:, :, :-1]), strict=True):
        end = x
        while end + 1 < array.shape[2] and array[k, y, end + 1]:
            end += 1
        corners = [(x - 0.5, y - 0.5), (end + 0.5, y - 0.5), (end + 0.5, y + 0.5), (x - 0.5, y + 0.5)]
        out.append(np.array([mask.TransformContinuousIndexToPhysicalPoint((float(cx), float(cy), float(k))) for cx, cy in corners]))
    return out


def rtstruct_dataset(source: Sequence[Any], mask: sitk.Image, roi: str, seed: int = 0,
                     extra: dict[str, list[np.ndarray]] | None = None) -> Any:  # fmt: skip
    """A DICOM RTSTRUCT (pydicom) with one ROI `roi` whose contours fill back to `mask`, referencing the `source`
    series; `extra` adds ROIs by name from their contours (LPS mm)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import UID, ExplicitVRLittleEndian

    first = source[0]
    ds = Dataset()
    sop_uid = uid(seed, first.SeriesInstanceUID, "rtstruct")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = UID(_RTSTRUCT), UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = _RTSTRUCT, sop_uid, "RTSTRUCT"
    for key in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID"):
        setattr(ds, key, first.get(key, ""))
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.StructureSetLabel = uid(sop_uid, "series"), 91, "TACE"
    ref_series = Dataset()
    ref_series.SeriesInstanceUID = first.SeriesInstanceUID
    ref_series.ContourImageSequence = DicomSequence([Dataset() for _ in source])  # each item names one slice
    for item, sl in zip(ref_series.ContourImageSequence, source, strict=True):
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sl.SOPClassUID, sl.SOPInstanceUID
    ref_study = Dataset()
    ref_study.ReferencedSOPClassUID, ref_study.ReferencedSOPInstanceUID = "1.2.840.10008.3.1.2.3.1", first.StudyInstanceUID
    ref_study.RTReferencedSeriesSequence = DicomSequence([ref_series])
    ref_for = Dataset()
    ref_for.FrameOfReferenceUID = first.FrameOfReferenceUID
    ref_for.RTReferencedStudySequence = DicomSequence([ref_study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([ref_for])
    rois = {roi: contours_of(mask), **(extra or {})}
    ds.StructureSetROISequence, ds.ROIContourSequence = DicomSequence(), DicomSequence()
    for number, (name, contours) in enumerate(rois.items(), start=1):
        item = Dataset()
        item.ROINumber, item.ROIName, item.ReferencedFrameOfReferenceUID = number, name, first.FrameOfReferenceUID
        item.ROIGenerationAlgorithm = "MANUAL"
        ds.StructureSetROISequence.append(item)
        contour_item = Dataset()
        contour_item.ReferencedROINumber = number
        contour_item.ContourSequence = DicomSequence()
        for points in contours:
            c = Dataset()
            c.ContourGeometricType, c.NumberOfContourPoints = "CLOSED_PLANAR", len(points)
            c.ContourData = [round(float(v), 4) for v in np.asarray(points).ravel()]
            contour_item.ContourSequence.append(c)
        ds.ROIContourSequence.append(contour_item)
    return ds
