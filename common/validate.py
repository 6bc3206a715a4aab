"""Whole-site validation: the manifest schema, every image it names, and a patient-free cohort summary."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tace.common.errors import ImageReadError, Problem
from tace.common.imageio import ImageInfo, inspect_image
from tace.common.manifest import (
    CLINICAL_COLUMNS,
    MASK_COLUMN,
    SEQUENCE_COLUMNS,
    Manifest,
    PatientRecord,
    parse_manifest,
)


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
    """Check every image of one patient: readable, intact, 3D, same grid as the arterial phase, non-empty mask.

    Returns the problems found and the arterial phase's header (None when it could not be read).
    """
    problems: list[Problem] = []
    infos: dict[str, ImageInfo] = {}
    columns = {SEQUENCE_COLUMNS[seq]: rel for seq, rel in record.images.items()}
    columns[MASK_COLUMN] = record.mask
    for column, rel in columns.items():
        try:
            # The mask is read whole even without --deep: it is small and an empty one must be caught.
            is_mask = column == MASK_COLUMN
            infos[column] = inspect_image(root / rel, deep=deep or is_mask, is_mask=is_mask)
        except ImageReadError as exc:
            problems.append(Problem(exc.kind, exc.message, exc.hint, record.row, column, rel))
        except OSError as exc:  # anything the image reader did not foresee still becomes a located problem
            problems.append(
                Problem(
                    "unreadable",
                    f"file cannot be read ({exc.strerror or type(exc).__name__})",
                    "check the file and its permissions",
                    record.row,
                    column,
                    rel,
                )
            )
    ref = infos.get(SEQUENCE_COLUMNS["arterial"])
    if ref is not None:
        others = {c: i for c, i in infos.items() if c != SEQUENCE_COLUMNS["arterial"]}
        mismatched = {c: tolerance.compare(ref, i) for c, i in others.items()}
        mismatched = {c: bad for c, bad in mismatched.items() if bad}
        first = next(iter(others.values()), None)
        if (
            len(others) >= 2
            and len(mismatched) == len(others)
            and first is not None
            and all(not tolerance.compare(first, i) for i in others.values())
        ):
            # Every other image agrees with the others but not with the arterial phase: the arterial is the odd one.
            aspects = sorted({a for bad in mismatched.values() for a in bad})
            problems.append(
                Problem("geometry-mismatch", f"the arterial phase's grid disagrees with every other image of this patient ({', '.join(aspects)})",
                        "the arterial series may be incomplete (a missing first or last slice) or from another series; re-export it",
                        record.row, SEQUENCE_COLUMNS["arterial"], record.images.get("arterial"))
            )  # fmt: skip
            mismatched = {}
        for column, bad in mismatched.items():
            if bad:
                problems.append(
                    Problem(
                        "geometry-mismatch",
                        f"{column} is not on the arterial phase's grid: {', '.join(bad)} differ beyond tolerance",
                        "co-register the phases and the mask and resample them onto the arterial grid "
                        "(tolerance: docs/manifest.md#geometry)",
                        record.row, column, columns[column],
                    )
                )  # fmt: skip
    return problems, ref


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
