"""Whole-site validation: the manifest schema, every image it names, and a patient-free cohort summary."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tace.common.dicom import examine_mask, header_facts
from tace.common.errors import ImageReadError, Problem
from tace.common.imageio import Examined, ImageInfo, continuous_index, examine_image
from tace.common.manifest import (
    CLINICAL_COLUMNS,
    MASK_COLUMN,
    SEQUENCE_COLUMNS,
    Manifest,
    PatientRecord,
    parse_manifest,
)
from tace.common.preprocess import tumour_corners


@dataclass(frozen=True)
class GeometryTolerance:
    """How far the phases and the mask of one patient may disagree and still count as the same grid.

    Sizes must match exactly. Spacing may differ by `spacing_rel` (relative), origins by `origin_voxels` of the
    smallest spacing (mm), direction cosines by `direction` (absolute, per matrix element).
    """

    spacing_rel: float = 1e-3
    origin_voxels: float = 0.1
    direction: float = 1e-3

    def compare(self, ref: ImageInfo, other: ImageInfo) -> list[str]:
        """Names of the geometry aspects in which `other` disagrees with `ref` beyond tolerance."""
        bad = []
        if ref.size != other.size:
            bad.append("size")
        if not np.allclose(ref.spacing, other.spacing, rtol=self.spacing_rel, atol=0):
            bad.append("spacing")
        if np.max(np.abs(np.subtract(ref.origin, other.origin))) > self.origin_voxels * min(ref.spacing):
            bad.append("origin")
        if np.max(np.abs(np.subtract(ref.direction, other.direction))) > self.direction:
            bad.append("direction")
        return bad


@dataclass
class CohortSummary:
    """Aggregate facts about a site's cohort: counts and rates only, nothing patient-level."""

    n_patients: int
    splits: dict[str, int]
    labelled: dict[str, int]
    responders: dict[str, int]
    with_survival: int
    survival_events: int
    missing: dict[str, int]
    optional_sequences: dict[str, int]
    spacing_mm_median: tuple[float, float, float] | None = None

    def responder_rate(self, split: str | None = None) -> float | None:
        key = split or "all"
        n = self.labelled.get(key, 0)
        return self.responders.get(key, 0) / n if n else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_patients": self.n_patients,
            "splits": self.splits,
            "labelled": self.labelled,
            "responders": self.responders,
            "responder_rate": {k: self.responder_rate(None if k == "all" else k) for k in self.labelled},
            "with_survival": self.with_survival,
            "survival_events": self.survival_events,
            "missing": self.missing,
            "optional_sequences": self.optional_sequences,
            "spacing_mm_median": self.spacing_mm_median,
        }

    def format(self) -> str:
        lines = [f"{self.n_patients} patients: " + ", ".join(f"{k} {v}" for k, v in self.splits.items())]
        for key, n in self.labelled.items():
            rate = self.responder_rate(None if key == "all" else key)
            if rate is not None:
                lines.append(f"responders ({key}): {self.responders.get(key, 0)}/{n} = {100 * rate:.1f} %")
        if not self.labelled:
            lines.append("no response labels (unlabeled prediction set)")
        lines.append(f"progression-free survival: {self.with_survival} patients with follow-up, {self.survival_events} events")
        miss = [f"{c} {n} ({100 * n / max(self.n_patients, 1):.0f} %)" for c, n in self.missing.items() if n]
        lines.append("missing values: " + (", ".join(miss) if miss else "none"))
        if any(self.optional_sequences.values()):
            lines.append("optional sequences: " + ", ".join(f"{k} {v}" for k, v in self.optional_sequences.items()))
        if self.spacing_mm_median:
            x, y, z = self.spacing_mm_median
            lines.append(f"median voxel spacing: {x:.2f} x {y:.2f} x {z:.2f} mm")
        return "\n".join(lines)


@dataclass
class CheckReport:
    """Outcome of `check_site`: every problem found, and the cohort summary."""

    manifest: Path
    n_rows: int
    problems: list[Problem] = field(default_factory=list)
    summary: CohortSummary | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest": str(self.manifest),
            "ok": self.ok,
            "n_rows": self.n_rows,
            "problems": [p.to_dict() for p in self.problems],
            "summary": self.summary.to_dict() if self.summary else None,
        }


def summarise(records: Iterable[PatientRecord], spacings: list[tuple[float, ...]] | None = None) -> CohortSummary:
    """Counts per split, responders, survival follow-up and missingness per clinical column."""
    records = list(records)
    splits = Counter(r.split for r in records)
    labelled: Counter[str] = Counter()
    responders: Counter[str] = Counter()
    for r in records:
        if r.response is not None:
            for key in ("all", r.split):
                labelled[key] += 1
                responders[key] += r.response
    optional = {
        seq: sum(seq in r.images for r in records) for seq in SEQUENCE_COLUMNS if seq not in ("arterial", "portal_venous", "delayed")
    }
    spacing = tuple(float(v) for v in np.median(np.array(spacings), axis=0)) if spacings else None
    return CohortSummary(
        n_patients=len(records),
        splits={s: splits[s] for s in ("train", "val", "test") if splits[s]},
        labelled=dict(labelled),
        responders=dict(responders),
        with_survival=sum(r.pfs_days is not None for r in records),
        survival_events=sum(r.pfs_event or 0 for r in records),
        missing={c: sum(r.clinical.get(c) is None for r in records) for c in CLINICAL_COLUMNS},
        optional_sequences=optional,
        spacing_mm_median=spacing,  # type: ignore[arg-type]
    )


def check_record_images(
    record: PatientRecord,
    root: Path,
    deep: bool = False,
    tolerance: GeometryTolerance = GeometryTolerance(),
) -> tuple[list[Problem], ImageInfo | None]:
    """Check every image of one patient: readable, intact, 3D, one patient and frame of reference, the tumour inside
    every phase, a usable mask. Every problem of every file is listed (a file with NaN voxels still has its
    geometry checked).

    Phases and the mask may lie on different grids (preprocessing resamples each onto the tumour box in physical
    space); they must then share the DICOM frame of reference where DICOM says, and every phase must cover the
    tumour's bounding box. `tolerance` says which grids count as the arterial phase's own (their coverage is the
    arterial's).

    Returns the problems found and the arterial phase's header (None when it could not be read).
    """
    problems: list[Problem] = []
    infos: dict[str, ImageInfo] = {}

    def located(errors: Iterable[ImageReadError], column: str, rel: str) -> None:
        problems.extend(Problem(e.kind, e.message, e.hint, record.row, column, rel) for e in errors)

    for seq, rel in record.images.items():
        column = SEQUENCE_COLUMNS[seq]
        examined = _examine(lambda: examine_image(root / rel, deep=deep))  # noqa: B023 - called at once
        located(examined.problems, column, rel)
        if examined.info is not None:
            infos[column] = examined.info
    # The mask is read whole even without --deep: it is small, an empty one must be caught and its tumour located.
    grids = list(infos.items())
    mask = _examine(lambda: examine_mask(root / record.mask, record.mask_label, grids))
    located(mask.problems, MASK_COLUMN, record.mask)
    problems += _identity_problems(record, root)
    if mask.image is not None and not mask.problems:
        problems += _coverage_problems(record, infos, tumour_corners(mask.image), tolerance)
    return problems, infos.get(SEQUENCE_COLUMNS["arterial"])


def _examine(run: Callable[[], Examined]) -> Examined:
    """`run()`, with anything the readers did not foresee turned into a located problem."""
    try:
        return run()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return Examined(None, [ImageReadError("unreadable", f"file cannot be read ({reason})", "check the file and its permissions")])


def _identity_problems(record: PatientRecord, root: Path) -> list[Problem]:
    """Images whose DICOM headers say they belong to another patient or frame of reference than the arterial phase
    (or, without a DICOM arterial phase, the row's first DICOM image). Other formats carry no such facts."""
    columns = {SEQUENCE_COLUMNS[seq]: rel for seq, rel in record.images.items()}
    columns[MASK_COLUMN] = record.mask
    facts = {}
    for column, rel in columns.items():
        try:
            found = header_facts(root / rel)
        except OSError:
            found = None
        if found is not None:
            facts[column] = found
    if len(facts) < 2:
        return []
    ref_column = SEQUENCE_COLUMNS["arterial"] if SEQUENCE_COLUMNS["arterial"] in facts else next(iter(facts))
    ref = facts[ref_column]
    out = []
    for column, fact in facts.items():
        if column == ref_column:
            continue
        if ref.patient and fact.patient and ref.patient != fact.patient:
            out.append(Problem("other-patient", f"{column} belongs to another patient than {ref_column} (their DICOM PatientID differs)",
                               "put this patient's own series in the row", record.row, column, columns[column]))  # fmt: skip
        elif ref.frame_of_reference and fact.frame_of_reference and ref.frame_of_reference != fact.frame_of_reference:
            out.append(Problem(
                "frame-of-reference", f"{column} has another DICOM frame of reference than {ref_column}: it was not acquired in the same session",
                "use the series of one examination (one frame of reference) for every phase and the mask, or register them onto one and export as NIfTI",
                record.row, column, columns[column],
            ))  # fmt: skip
    return out


def uncovered_mm(info: ImageInfo, corners: np.ndarray) -> np.ndarray:
    """How far (mm) the box with `corners` (LPS, ``(8, 3)``) reaches beyond the image, along each of the image's
    axes (x, y, z)."""
    spacing = np.array(info.spacing, dtype=float)
    index = continuous_index(info, corners)
    below = -0.5 - index.min(axis=0)
    above = index.max(axis=0) - (np.array(info.size) - 0.5)
    return np.clip(np.maximum(below, above), 0, None) * spacing


_AXES = ("x (columns)", "y (rows)", "z (slices)")


def _coverage_problems(
    record: PatientRecord, infos: dict[str, ImageInfo], corners: np.ndarray, tolerance: GeometryTolerance
) -> list[Problem]:
    """Phases that do not hold the whole tumour box (beyond half a voxel); the mask when no phase holds it."""
    arterial = infos.get(SEQUENCE_COLUMNS["arterial"])
    outside: dict[str, np.ndarray] = {}
    for column, info in infos.items():
        same_as_arterial = arterial is not None and column != SEQUENCE_COLUMNS["arterial"] and not tolerance.compare(arterial, info)
        excess = outside.get(SEQUENCE_COLUMNS["arterial"]) if same_as_arterial else None
        if excess is None:
            excess = uncovered_mm(info, corners)
            excess = np.where(excess > 0.5 * np.array(info.spacing), excess, 0.0)
        outside[column] = excess
    if not outside:
        return []
    rel = {SEQUENCE_COLUMNS[seq]: r for seq, r in record.images.items()}
    if all(e.any() for e in outside.values()):
        worst = max(float(e.max()) for e in outside.values())
        return [Problem("not-covered", f"the mask's tumour lies outside every image of this patient (by up to {worst:.1f} mm)",
                        "the mask belongs to another patient or series, or lost its position on export; export it again from the series it was drawn on",
                        record.row, MASK_COLUMN, record.mask)]  # fmt: skip
    out = []
    for column, excess in outside.items():
        if excess.any():
            where = ", ".join(f"{excess[i]:.1f} mm along {_AXES[i]}" for i in range(3) if excess[i] > 0)
            out.append(Problem(
                "not-covered", f"{column} does not cover the tumour: the tumour's box reaches beyond this image by {where}",
                "export the phase with a field of view (slices) that holds the whole tumour, or check that the mask belongs to this patient",
                record.row, column, rel[column],
            ))  # fmt: skip
    return out


def check_site(
    manifest: Path | str | Manifest,
    deep: bool = False,
    tolerance: GeometryTolerance = GeometryTolerance(),
    progress: Callable[[Iterable[PatientRecord]], Iterable[PatientRecord]] | None = None,
) -> CheckReport:
    """Validate a site's manifest and every image it names; report every problem, never stop at the first.

    Parameters
    ----------
    manifest : Path, str or Manifest
        The site manifest CSV (or an already parsed one).
    deep : bool
        Read every voxel too (non-finite values, constant images, compressed-data integrity).
    tolerance : GeometryTolerance
        How far the phases and mask of one patient may disagree in geometry.
    progress : callable, optional
        Wraps the record iterable (e.g. ``tqdm``) to show progress.
    """
    parsed = manifest if isinstance(manifest, Manifest) else parse_manifest(Path(manifest))
    report = CheckReport(manifest=parsed.path, n_rows=parsed.n_rows, problems=list(parsed.problems))
    spacings: list[tuple[float, ...]] = []
    records: Iterable[PatientRecord] = progress(parsed.records) if progress else parsed.records
    for record in records:
        problems, ref = check_record_images(record, parsed.root, deep=deep, tolerance=tolerance)
        report.problems.extend(problems)
        if ref is not None:
            spacings.append(ref.spacing)
    report.problems.sort(key=lambda p: p.row or 0)
    report.summary = summarise(parsed.records, spacings)
    return report
