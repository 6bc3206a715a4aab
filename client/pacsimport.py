"""`tace-client import`: a PACS export (a tree of DICOM files) becomes a site folder: compressed NIfTI (or links to
the DICOM series), a draft manifest with site pseudonyms, and a report of every series and the phase it got, and why.

The tree is walked once and only headers are read. Files are grouped into series (SeriesInstanceUID), series into
temporal phases (TemporalPositionIdentifier, else acquisition time at repeated slice positions), patients
(PatientID) into studies; `tace.client.phaserules` names each series' phase. A phase is assigned only when exactly
one series fits it: a missing or ambiguous phase is left empty in the manifest and listed, never guessed. The
PatientID never reaches the manifest unless asked (`keep_patient_id`); the pseudonym key stays in the site folder.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tace.client.phaserules import PHASE_NAMES, Rules
from tace.common.errors import ConfigError, Problem, TaceError
from tace.common.manifest import (
    CLINICAL_COLUMNS,
    COLUMNS,
    REQUIRED_SEQUENCES,
    SEQUENCE_COLUMNS,
    PatientRecord,
    is_patient_id,
    write_manifest,
)

_TAGS = ["SOPClassUID", "Modality", "PatientID", "StudyInstanceUID", "StudyDate", "SeriesInstanceUID", "SeriesNumber",
         "SeriesDescription", "ImageType", "ImagePositionPatient", "ImageOrientationPatient", "TemporalPositionIdentifier",
         "AcquisitionTime", "ContentTime", "ContrastBolusAgent", "ContrastBolusStartTime", "InstanceNumber", "NumberOfFrames"]  # fmt: skip
_MASK_CLASSES = {"1.2.840.10008.5.1.4.1.1.66.4": "DICOM SEG", "1.2.840.10008.5.1.4.1.1.481.3": "RTSTRUCT"}
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
#: Columns a --clinical table may fill (besides its key column).
CLINICAL_JOIN_COLUMNS = ("split", *CLINICAL_COLUMNS, "response", "pfs_days", "pfs_event", "mask_label")


@dataclass
class Slice:
    path: Path
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    temporal: int | None
    time_s: float | None
    instance: int


@dataclass
class Volume:
    """One 3D volume of a series (a series of a dynamic acquisition holds several) and what the rules made of it."""

    series: Series
    index: int
    slices: list[Slice]
    status: str = ""  # phase, ignored, ambiguous, refused (a phase, but broken), mask
    phase: str = ""
    reason: str = ""

    @property
    def time_s(self) -> float | None:
        times = [s.time_s for s in self.slices if s.time_s is not None]
        return min(times) if times else None


@dataclass
class Series:
    uid: str
    patient: str  # the PatientID: kept in memory only, written to the pseudonym key alone
    study: str
    study_date: str
    number: int
    description: str
    modality: str
    sop_class: str
    image_type: tuple[str, ...]
    bolus_start_s: float | None
    multiframe: bool
    slices: list[Slice] = field(default_factory=list)
    volumes: list[Volume] = field(default_factory=list)


@dataclass
class PatientResult:
    """One patient (one manifest row): the volume chosen per phase, what is missing or ambiguous, the mask."""

    pseudonym: str
    patient: str
    study: str = ""
    phases: dict[str, Volume] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)  # manifest column -> why it is empty
    mask: Series | None = None
    paths: dict[str, str] = field(default_factory=dict)  # manifest column -> path written


@dataclass
class ImportResult:
    site_dir: Path
    manifest: Path
    n_files: int
    n_skipped: int
    series: list[Series]
    patients: list[PatientResult]
    seconds: dict[str, float]

    @property
    def incomplete(self) -> list[PatientResult]:
        return [p for p in self.patients if p.problems]


def _seconds(text: Any) -> float | None:
    """DICOM TM ('HHMMSS.ffffff', parts may be missing) as seconds after midnight."""
    value = str(text or "").strip().replace(":", "")
    if len(value) < 2 or not value[:2].isdigit():
        return None
    try:
        hours = int(value[:2])
        minutes = int(value[2:4]) if len(value) >= 4 else 0
        seconds = float(value[4:]) if len(value) > 4 else 0.0
    except ValueError:
        return None
    return hours * 3600 + minutes * 60 + seconds


def scan(root: Path, progress: Callable[[Iterable[Path], int], Iterable[Path]] | None = None) -> tuple[list[Series], int, int]:
    """Read the header of every file under `root` once; group DICOM files into series.

    Returns the series, the number of files read and the number skipped (not DICOM, a DICOMDIR, unreadable).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = sorted(Path(d) / f for d, _, names in os.walk(root) for f in names)
    series: dict[str, Series] = {}
    skipped = 0
    for path in progress(files, len(files)) if progress else files:
        try:
            with warnings.catch_warnings(action="ignore"):
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError, AttributeError):
            skipped += 1
            continue
        sop = str(ds.get("SOPClassUID", ""))
        uid = str(ds.get("SeriesInstanceUID", ""))
        if not uid or sop == _DICOMDIR_CLASS:
            skipped += 1
            continue
        s = series.get(uid)
        if s is None:
            s = series[uid] = Series(
                uid, str(ds.get("PatientID", "") or ""), str(ds.get("StudyInstanceUID", "") or ""), str(ds.get("StudyDate", "") or ""),
                int(ds.get("SeriesNumber") or 0), str(ds.get("SeriesDescription", "") or ""), str(ds.get("Modality", "") or ""), sop,
                tuple(str(t).upper() for t in (ds.get("ImageType") or ())), _seconds(ds.get("ContrastBolusStartTime")),
                int(ds.get("NumberOfFrames") or 1) > 1,
            )  # fmt: skip
        if s.bolus_start_s is None:
            s.bolus_start_s = _seconds(ds.get("ContrastBolusStartTime"))
        position = ds.get("ImagePositionPatient")
        orientation = ds.get("ImageOrientationPatient")
        temporal = ds.get("TemporalPositionIdentifier")
        s.slices.append(Slice(
            path, tuple(float(v) for v in position) if position and len(position) == 3 else None,  # type: ignore[arg-type]
            tuple(round(float(v), 4) for v in orientation) if orientation and len(orientation) == 6 else None,
            int(temporal) if temporal not in (None, "") else None,
            _seconds(ds.get("AcquisitionTime")) if ds.get("AcquisitionTime") else _seconds(ds.get("ContentTime")),
            int(ds.get("InstanceNumber") or 0),
        ))  # fmt: skip
    for s in series.values():
        s.volumes = _volumes(s)
    ordered = sorted(series.values(), key=lambda s: (s.patient, s.study_date, s.study, s.number, s.uid))
    return ordered, len(files), skipped


def _normal(orientation: tuple[float, ...]) -> np.ndarray:
    return np.cross(np.array(orientation[:3]), np.array(orientation[3:]))


def _volumes(s: Series) -> list[Volume]:
    """The series' 3D volumes: one per temporal position, else one per repeat of the slice positions (ordered by
    acquisition time), else one."""
    slices = s.slices
    temporal = {sl.temporal for sl in slices if sl.temporal is not None}
    groups: list[list[Slice]]
    if len({sl.orientation for sl in slices}) > 1:  # a localiser: one volume, refused below
        groups = [slices]
    elif len(temporal) > 1 and all(sl.temporal is not None for sl in slices):
        groups = [[sl for sl in slices if sl.temporal == t] for t in sorted(temporal)]
    else:
        by_position: dict[tuple[float, ...], list[Slice]] = {}
        for sl in slices:
            by_position.setdefault(tuple(np.round(sl.position, 2)) if sl.position else (sl.instance,), []).append(sl)
        counts = {len(v) for v in by_position.values()}
        if len(counts) == 1 and counts != {1}:
            n = counts.pop()
            ordered = [sorted(v, key=lambda sl: (sl.time_s if sl.time_s is not None else 0.0, sl.instance)) for v in by_position.values()]
            groups = [[v[j] for v in ordered] for j in range(n)]
        else:
            groups = [slices]
    out = []
    for j, group in enumerate(groups, start=1):
        orientation = next((sl.orientation for sl in group if sl.orientation), None)
        if orientation is not None and all(sl.position for sl in group):
            normal = _normal(orientation)
            group = sorted(group, key=lambda sl: float(np.dot(normal, sl.position)))  # type: ignore[arg-type]
        out.append(Volume(s, j, group))
    return out


def classify(series: list[Series], rules: Rules) -> None:
    """Give every volume of every series its status (phase, ignored, ambiguous, mask), phase and reason."""
    dynamic_candidates: dict[tuple[str, str], list[Volume]] = {}
    for s in series:
        for v in s.volumes:
            _classify_volume(s, v, rules, dynamic_candidates)
    # Several single-volume series named as a dynamic acquisition in one study: its temporal phases, by time.
    for volumes in dynamic_candidates.values():
        if len(volumes) == 1:
            volumes[0].status, volumes[0].reason = "ignored", "the only series of its name in the study; no rule names its phase"
            continue
        _name_dynamic(sorted(volumes, key=lambda v: v.time_s or 0.0), rules, "series of one name (a dynamic acquisition)")
    for s in series:
        for v in s.volumes:
            if v.status == "phase" and _uneven(v):
                v.status = "refused"
                v.reason += "; but its slice positions are unevenly spaced (a slice is missing from the export): export the series again"


def _classify_volume(s: Series, v: Volume, rules: Rules, dynamic: dict[tuple[str, str], list[Volume]]) -> None:
    def say(status: str, reason: str, phase: str = "") -> None:
        v.status, v.reason, v.phase = status, reason, phase

    if s.sop_class in _MASK_CLASSES:
        return say("mask", f"{_MASK_CLASSES[s.sop_class]}: a tumour mask candidate")
    if s.modality != "MR":
        return say("ignored", f"modality {s.modality or 'unknown'}, not MR")
    if s.multiframe:
        return say(
            "ignored",
            "a multi-frame (enhanced) DICOM object: not read by the import; convert it to NIfTI and write the manifest row yourself",
        )
    if "LOCALIZER" in s.image_type:
        return say("ignored", "a localiser (ImageType LOCALIZER)")
    source = rules.first_match(rules.localiser, s.description)
    if source:
        return say("ignored", f"a localiser (description matches '{source}')")
    if len({sl.orientation for sl in v.slices}) > 1:
        return say("ignored", "slices in several orientations (a localiser or a reformat)")
    if {"SUBTRACTION", "SUBTRACT", "SUB"} & set(s.image_type):
        return say("ignored", "a subtraction (ImageType)")
    source = rules.first_match(rules.subtraction, s.description)
    if source:
        return say("ignored", f"a subtraction (description matches '{source}')")
    if len(v.slices) < rules.min_slices:
        return say("ignored", f"{len(v.slices)} slices, fewer than the rules' min_slices ({rules.min_slices})")
    matches = rules.phase_matches(s.description)
    pre = rules.first_match(rules.precontrast, s.description)
    if len(s.volumes) > 1:
        if set(matches) & {"t2", "dwi"} or len(matches) == 1 and not rules.first_match(rules.dynamic, s.description):
            named = next(iter(matches)) if len(matches) == 1 else ""  # so the patient's row lists it under that column
            return say(
                "ambiguous", f"{len(s.volumes)} volumes in one series named as {', '.join(matches)}: which one is meant is not known", named
            )
        if v.index == 1:
            _name_dynamic(s.volumes, rules, "dynamic series")
        return None
    if pre and not matches:
        return say("ignored", f"pre-contrast (description matches '{pre}')")
    if len(matches) == 1:
        phase, source = next(iter(matches.items()))
        return say("phase", f"description matches '{source}' ({phase})", phase)
    if len(matches) > 1:
        what = ", ".join(f"{p} ('{src}')" for p, src in matches.items())
        return say("ambiguous", f"description matches the rules of several phases: {what}")
    if rules.first_match(rules.dynamic, s.description):
        dynamic.setdefault((s.patient, s.study + "/" + s.description), []).append(v)
        return say("ambiguous", "a dynamic series of one temporal phase")
    if s.bolus_start_s is not None and v.time_s is not None:
        delay = v.time_s - s.bolus_start_s
        phase_ = rules.phase_by_delay(delay)
        if phase_ and phase_ != "pre":
            return say("phase", f"acquired {delay:.0f} s after the contrast injection ({phase_})", phase_)
    return say("ignored", "no rule names its phase")


def _uneven(v: Volume) -> bool:
    """Slice positions with a gap or a repeat (SimpleITK would read them as one evenly spaced volume, distorted)."""
    orientation = v.slices[0].orientation
    if orientation is None or any(sl.position is None for sl in v.slices):
        return False
    depth = np.array([float(np.dot(_normal(orientation), sl.position)) for sl in v.slices])  # type: ignore[arg-type]
    steps = np.diff(depth)
    step = float(np.median(steps)) if len(steps) else 0.0
    return step <= 0 or bool(np.max(np.abs(steps - step)) > max(0.01 * step, 0.01))


def _name_dynamic(volumes: list[Volume], rules: Rules, what: str) -> None:
    """Name the temporal phases of one dynamic acquisition: by delay after the injection when every volume's headers
    give it, else by their number (`by_count`); a phase two volumes would take, or no rule, makes them ambiguous."""
    starts = [v.series.bolus_start_s for v in volumes if v.series.bolus_start_s is not None]
    n = len(volumes)
    names: list[str | None]
    if rules.delay_s and starts and all(v.time_s is not None for v in volumes):
        delays = [float(v.time_s) - starts[0] for v in volumes]  # type: ignore[arg-type]
        names = [rules.phase_by_delay(d) for d in delays]
        why = [
            f"temporal phase {k + 1} of {n} of one {what}, acquired {d:.0f} s after the contrast injection" for k, d in enumerate(delays)
        ]
    elif n in rules.by_count:
        names = list(rules.by_count[n])
        why = [f"temporal phase {k + 1} of {n} of one {what}, named by their number (rules' by_count)" for k in range(n)]
    else:
        for v in volumes:
            v.status, v.reason = (
                "ambiguous",
                f"one of {n} temporal phases of one {what}: no delay after injection in the headers, no by_count rule for {n}",
            )
        return
    for v, name, reason in zip(volumes, names, why, strict=True):
        if name is None:
            v.status, v.reason = "ambiguous", reason + ": no delay window of the rules fits"
        elif name in ("pre", "skip"):
            v.status, v.reason = "ignored", reason + (" (pre-contrast)" if name == "pre" else " (left out by the rules)")
        elif names.count(name) > 1:
            v.status, v.reason, v.phase = "ambiguous", reason + f": {names.count(name)} temporal phases fit {name}", name
        else:
            v.status, v.reason, v.phase = "phase", reason + f" ({name})", name


def assign(series: list[Series], rules: Rules, pseudonyms: dict[str, str]) -> list[PatientResult]:
    """Per patient: choose the study, then one volume per phase and one mask, or say why a column stays empty."""
    by_patient: dict[str, list[Series]] = {}
    for s in series:
        by_patient.setdefault(s.patient, []).append(s)
    out = []
    for patient in sorted(by_patient, key=lambda p: pseudonyms[p]):
        result = PatientResult(pseudonyms[patient], patient)
        studies: dict[str, list[Series]] = {}
        for s in by_patient[patient]:
            studies.setdefault(s.study, []).append(s)
        with_phases = [k for k, ss in studies.items() if any(v.status == "phase" for s in ss for v in s.volumes)]
        if len(with_phases) > 1 and rules.studies == "only":
            for seq in ("arterial", "portal_venous", "delayed"):
                result.problems[SEQUENCE_COLUMNS[seq]] = f"{len(with_phases)} studies hold phases; set [studies] choose in the rules"
            out.append(result)
            continue
        if with_phases:
            with_phases.sort(key=lambda k: studies[k][0].study_date)
            result.study = with_phases[-1] if rules.studies == "latest" else with_phases[0]
        chosen = studies.get(result.study, [])
        for phase in PHASE_NAMES:
            fits = [v for s in chosen for v in s.volumes if v.phase == phase and v.status in ("phase", "ambiguous", "refused")]
            column = SEQUENCE_COLUMNS[phase]
            if len(fits) == 1 and fits[0].status == "phase":
                result.phases[phase] = fits[0]
            elif len(fits) == 1 and fits[0].status == "refused":
                result.problems[column] = (
                    f"refused: series {fits[0].series.number} '{fits[0].series.description}' fits, {fits[0].reason.split('; but ')[-1]}"
                )
            elif fits:
                names = "; ".join(f"series {v.series.number} '{v.series.description}'" for v in fits)
                result.problems[column] = f"ambiguous: {len(fits)} volumes fit ({names})"
            elif phase in ("arterial", "portal_venous", "delayed"):
                result.problems[column] = "missing: no series of the study fits this phase"
        masks = [s for s in chosen if s.sop_class in _MASK_CLASSES]
        if len(masks) == 1:
            result.mask = masks[0]
        else:
            result.problems["mask_path"] = (f"ambiguous: {len(masks)} SEG/RTSTRUCT objects" if masks else
                                            "missing: no SEG or RTSTRUCT in the export; draw the tumour mask and fill mask_path")  # fmt: skip
        out.append(result)
    return out


def read_pseudonyms(path: Path | None) -> dict[str, str]:
    """A pseudonym key (CSV with columns PatientID and patient_id), or {} when there is none."""
    if path is None or not path.exists():
        return {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    if rows and not {"PatientID", "patient_id"} <= set(rows[0]):
        raise ConfigError(f"pseudonym file {path} needs the columns PatientID and patient_id")
    key = {r["PatientID"]: r["patient_id"] for r in rows}
    _check_ids(key.values(), f"pseudonym file {path}")
    return key


def _check_ids(ids: Iterable[str], where: str) -> None:
    ids = list(ids)
    bad = sum(not is_patient_id(i) for i in ids)
    if bad:
        raise ConfigError(f"{where}: {bad} patient_id value(s) are not 1-64 letters, digits, '.', '_' or '-'",
                          "pseudonyms must be valid manifest patient_id values")  # fmt: skip
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{where}: {len(ids) - len(set(ids))} patient_id value(s) are used twice")


def pseudonymise(patients: Iterable[str], known: dict[str, str], prefix: str, keep_patient_id: bool) -> dict[str, str]:
    """A pseudonym per PatientID: the known key's, else the next free `prefix` + number (or, when asked, the
    PatientID itself)."""
    out = dict(known)
    if keep_patient_id:
        out.update({p: p for p in patients if p not in out})
        _check_ids(out.values(), "--keep-patient-id")
        return out
    used = set(out.values())
    n = 0
    for p in sorted(patients):
        if p in out:
            continue
        while True:
            n += 1
            candidate = f"{prefix}{n:04d}"
            if candidate not in used:
                break
        out[p] = candidate
        used.add(candidate)
    _check_ids(out.values(), "--prefix")
    return out


def read_clinical(path: Path, pseudonyms: dict[str, str]) -> dict[str, dict[str, str]]:
    """A clinical table keyed by pseudonym (`patient_id` column) or by `PatientID`: {pseudonym: {column: text}}."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"clinical table {path} not found", "check the path given to --clinical") from None
    except UnicodeDecodeError:
        raise ConfigError(f"clinical table {path} is not UTF-8 text", "save it as 'CSV UTF-8'") from None
    first = text.split("\n", 1)[0]
    delimiter = max((",", ";", "\t"), key=first.count)
    rows = list(csv.DictReader(io.StringIO(text), delimiter=delimiter))
    header = [h.strip() for h in (rows[0].keys() if rows else first.split(delimiter))]
    key = "patient_id" if "patient_id" in header else "PatientID" if "PatientID" in header else None
    if key is None:
        raise ConfigError(f"clinical table {path} needs a patient_id (pseudonym) or PatientID column to join on")
    unknown = [h for h in header if h != key and h not in CLINICAL_JOIN_COLUMNS]
    if unknown:
        raise ConfigError(f"clinical table {path}: unknown column(s) {', '.join(repr(u) for u in unknown)}",
                          "valid columns: patient_id or PatientID, then " + ", ".join(CLINICAL_JOIN_COLUMNS))  # fmt: skip
    out = {}
    for row in rows:
        ident = (row.get(key) or "").strip()
        pseudonym = pseudonyms.get(ident) if key == "PatientID" else ident
        if pseudonym:
            out[pseudonym] = {c.strip(): (v or "").strip() for c, v in row.items() if c and c.strip() != key}
    return out


def write_site(result: ImportResult, convert: bool, clinical: dict[str, dict[str, str]],
               progress: Callable[[Iterable[PatientResult], int], Iterable[PatientResult]] | None = None) -> None:  # fmt: skip
    """Images (NIfTI, or links to the DICOM files), masks, the draft manifest and the pseudonym key."""
    site = result.site_dir
    rows = []
    patients = result.patients
    for p in progress(patients, len(patients)) if progress else patients:
        for phase, volume in p.phases.items():
            column = SEQUENCE_COLUMNS[phase]
            if convert:
                rel = f"images/{p.pseudonym}/{phase}.nii.gz"
                try:
                    _convert(volume, site / rel)
                except TaceError as exc:  # one broken series leaves its cell empty; the other patients go on
                    volume.status, volume.reason = "refused", f"{volume.reason}; but {exc.message}"
                    p.problems[column] = f"refused: {exc.message}"
                    continue
            else:
                rel = f"dicom/{p.pseudonym}/{phase}"
                _link(volume.slices, site / rel)
            p.paths[column] = rel
        if p.mask is not None:
            kind = "seg" if _MASK_CLASSES[p.mask.sop_class] == "DICOM SEG" else "rtstruct"
            rel = f"masks/{p.pseudonym}.{kind}.dcm"
            (site / "masks").mkdir(parents=True, exist_ok=True)
            source = p.mask.slices[0].path
            if convert:
                shutil.copyfile(source, site / rel)
            else:
                (site / rel).unlink(missing_ok=True)
                os.symlink(source.resolve(), site / rel)
            p.paths["mask_path"] = rel
        row: dict[str, object] = {"patient_id": p.pseudonym, **p.paths}
        row.update(clinical.get(p.pseudonym, {}))
        rows.append(row)
    optional = [SEQUENCE_COLUMNS[s] for s in ("t2", "dwi") if any(SEQUENCE_COLUMNS[s] in r for r in rows)]
    columns = [c.name for c in COLUMNS if c.header_required or c.name in optional or c.name in ("response", "pfs_days", "pfs_event")]
    if any(r.get("mask_label") for r in rows):
        columns.insert(columns.index("mask_path") + 1, "mask_label")
    write_manifest(result.manifest, rows, columns)
    with open(site / "pseudonyms.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["PatientID", "patient_id"])
        writer.writerows(sorted((p.patient, p.pseudonym) for p in result.patients))


def _convert(volume: Volume, target: Path) -> None:
    import SimpleITK as sitk

    from tace.common.imageio import write_image

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(sl.path) for sl in volume.slices])
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        image = reader.Execute()  # no metadata dictionary is read, so nothing of the header reaches the NIfTI
    except RuntimeError:
        raise TaceError(f"series {volume.series.number} ('{volume.series.description}') cannot be read as a volume",
                        "check the export of this series, or leave it out with a rules file") from None  # fmt: skip
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    write_image(image, target)


def _link(slices: list[Slice], folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for k, sl in enumerate(slices, start=1):
        os.symlink(sl.path.resolve(), folder / f"{k:04d}.dcm")


def check_images(result: ImportResult, skip: set[int]) -> list[Problem]:
    """Every image of the draft's rows (except rows `skip`), checked as `tace-client check` checks them: the check of
    the draft itself looks at the images of a row only once its clinical cells are filled in."""
    from tace.common.validate import check_record_images

    out = []
    for row, p in enumerate(result.patients, start=2):
        needed = [SEQUENCE_COLUMNS[s] for s in REQUIRED_SEQUENCES] + ["mask_path"]
        if row in skip or any(c not in p.paths for c in needed):
            continue
        images = {seq: p.paths[col] for seq, col in SEQUENCE_COLUMNS.items() if col in p.paths}
        record = PatientRecord(row, p.pseudonym, "train", images, p.paths["mask_path"], {})
        out += check_record_images(record, result.site_dir)[0]
    return out


def report(result: ImportResult, rules_file: Path | None, dicom_root: Path) -> dict[str, Any]:
    """The import report: every series (volume) with its status, phase and reason; every patient's row, with every
    column left empty and why. Pseudonyms only: no PatientID."""
    study_index: dict[tuple[str, str], int] = {}
    rows_of = {p.pseudonym: i for i, p in enumerate(result.patients, start=2)}
    pseudo = {p.patient: p.pseudonym for p in result.patients}
    series = []
    for s in result.series:
        study_index.setdefault((s.patient, s.study), 1 + sum(k[0] == s.patient for k in study_index))
        for v in s.volumes:
            series.append({
                "patient_id": pseudo.get(s.patient, ""), "study": study_index[(s.patient, s.study)], "series_number": s.number,
                "description": s.description, "modality": s.modality, "files": len(v.slices), "volume": v.index,
                "volumes": len(s.volumes), "status": v.status, "phase": v.phase, "reason": v.reason,
            })  # fmt: skip
    patients = [{"row": rows_of[p.pseudonym], "patient_id": p.pseudonym, "paths": p.paths, "problems": p.problems} for p in result.patients]
    total = result.seconds.get("scan_s", 0.0) + result.seconds.get("write_s", 0.0)
    return {
        "dicom_root": str(dicom_root), "site_dir": str(result.site_dir), "manifest": result.manifest.name,
        "rules": str(rules_file) if rules_file else "default", "files": result.n_files, "skipped_files": result.n_skipped,
        "n_series": len(result.series), "n_patients": len(result.patients), "n_incomplete": len(result.incomplete),
        "phases_found": {SEQUENCE_COLUMNS[ph]: sum(ph in p.phases for p in result.patients) for ph in PHASE_NAMES},
        "masks_found": sum(p.mask is not None for p in result.patients),
        "series": series, "patients": patients, "incomplete": [x for x in patients if x["problems"]],
        "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
        "series_per_s": round(len(result.series) / total, 2) if total else None,
        "patients_per_s": round(len(result.patients) / total, 2) if total else None,
    }  # fmt: skip


def write_report(data: dict[str, Any], site_dir: Path) -> tuple[Path, Path]:
    """import-report.json and import-report.html (Jinja2, autoescaped) in the site folder."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    json_path, html_path = site_dir / "import-report.json", site_dir / "import-report.html"
    json_path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    env = Environment(loader=PackageLoader("tace.client", "templates"), autoescape=select_autoescape(default=True))
    html_path.write_text(env.get_template("import-report.html.j2").render(r=data), encoding="utf-8")
    return json_path, html_path


def import_export(dicom_root: Path, site_dir: Path, rules: Rules, *, convert: bool = True, clinical: Path | None = None,
                  pseudonyms: Path | None = None, prefix: str = "P", keep_patient_id: bool = False, force: bool = False,
                  progress: Callable[..., Any] | None = None) -> ImportResult:  # fmt: skip
    """The whole import (without the check that follows it): scan, classify, assign, write.

    Raises `TaceError` for a DICOM root with no DICOM series or a site folder that already holds an import.
    """
    if not dicom_root.is_dir():
        raise ConfigError(f"{dicom_root} is not a folder", "give the folder of the PACS export")
    manifest = site_dir / "manifest.csv"
    if manifest.exists() and not force:
        raise ConfigError(f"{site_dir} already holds a manifest.csv", "choose another --out, or --force to replace the import's files")
    if site_dir.resolve().is_relative_to(dicom_root.resolve()):
        raise ConfigError("--out lies inside the DICOM export", "choose a site folder outside the export (the export is never written to)")
    start = time.perf_counter()
    series, n_files, skipped = scan(
        dicom_root, (lambda it, n: progress(it, total=n, desc="reading headers", unit="file")) if progress else None
    )
    if not series:
        raise TaceError(f"no DICOM series under {dicom_root} ({n_files} files, none readable as DICOM)",
                        "point the command at the export's folder (the one holding the .dcm files or their folders)")  # fmt: skip
    classify(series, rules)
    key = read_pseudonyms(pseudonyms if pseudonyms is not None else site_dir / "pseudonyms.csv")
    names = pseudonymise({s.patient for s in series}, key, prefix, keep_patient_id)
    patients = assign(series, rules, names)
    scanned = time.perf_counter()
    joined = read_clinical(clinical, names) if clinical is not None else {}
    site_dir.mkdir(parents=True, exist_ok=True)
    result = ImportResult(site_dir, manifest, n_files, skipped, series, patients, {"scan_s": scanned - start})
    write_site(result, convert, joined, (lambda it, n: progress(it, total=n, desc="writing", unit="patient")) if progress else None)
    result.seconds["write_s"] = time.perf_counter() - scanned
    return result
