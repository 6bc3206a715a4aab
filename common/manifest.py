"""The site-manifest schema: columns, units, allowed values, and row-level parsing into `PatientRecord`s.

This module checks what can be checked from the CSV alone (types, ranges, categories, duplicates, paths that
leave the manifest's folder). Image files are checked by `tace.common.validate`, which builds on it.
"""

from __future__ import annotations

import csv
import difflib
import io
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tace.common.errors import Problem

ColumnKind = Literal["id", "category", "number", "path", "label"]

#: Cell contents read as "missing" (case-insensitive), in addition to an empty cell.
MISSING_TOKENS = frozenset({"", "na", "n/a"})

_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# A segment or ROI name as DICOM stores them (LO: up to 64 characters, no control characters).
_LABEL_RE = re.compile(r"^[^\x00-\x1f\x7f\\]{1,64}$")
# A plain decimal number (Python's float() would also take "6_2", "infinity" or "0x..." forms).
_NUMBER_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass(frozen=True)
class ColumnSpec:
    """One manifest column: its type, whether the column and its values are required, and the allowed values."""

    name: str
    kind: ColumnKind
    description: str
    unit: str = ""
    header_required: bool = True
    value_required: bool = True
    allowed: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    def allowed_text(self) -> str:
        if self.allowed:
            return ", ".join(repr(a) for a in self.allowed)
        if self.kind == "number":
            return f"a number from {self.minimum:g} to {self.maximum:g}" + (f" {self.unit}" if self.unit else "")
        return ""


#: Image columns, keyed by sequence name. The first three are the contrast phases the study requires.
SEQUENCE_COLUMNS: dict[str, str] = {
    "arterial": "arterial_path",
    "portal_venous": "portal_venous_path",
    "delayed": "delayed_path",
    "t2": "t2_path",
    "dwi": "dwi_path",
}
REQUIRED_SEQUENCES = ("arterial", "portal_venous", "delayed")
MASK_COLUMN = "mask_path"
MASK_LABEL_COLUMN = "mask_label"

_PATH_HELP = "path relative to the manifest's folder: a NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr) or MetaImage (.mha/.mhd) file, or a folder holding one DICOM series"

COLUMNS: tuple[ColumnSpec, ...] = (
    ColumnSpec("patient_id", "id", "pseudonymous patient identifier, unique within the site; 1-64 characters of letters, digits, '.', '_', '-'"),
    ColumnSpec("split", "category", "which part of the site's data the row belongs to", allowed=("train", "val", "test")),
    ColumnSpec("arterial_path", "path", "contrast-enhanced T1, late arterial phase: " + _PATH_HELP),
    ColumnSpec("portal_venous_path", "path", "contrast-enhanced T1, portal-venous phase: " + _PATH_HELP),
    ColumnSpec("delayed_path", "path", "contrast-enhanced T1, delayed (equilibrium) phase: " + _PATH_HELP),
    ColumnSpec("t2_path", "path", "T2-weighted image (optional): " + _PATH_HELP, header_required=False, value_required=False),
    ColumnSpec("dwi_path", "path", "diffusion-weighted image (optional): " + _PATH_HELP, header_required=False, value_required=False),
    ColumnSpec("mask_path", "path", "target-tumour segmentation, non-zero inside the tumour, drawn on one of the patient's phases: " + _PATH_HELP + ", or a DICOM SEG or RTSTRUCT file (.dcm)"),
    ColumnSpec("mask_label", "label", "which segment (DICOM SEG), ROI (RTSTRUCT) or label value (label map) of mask_path is the target tumour, by number or name; needed only when the file holds several", header_required=False, value_required=False),
    ColumnSpec("age", "number", "age at first TACE", unit="years", minimum=18, maximum=110),
    ColumnSpec("sex", "category", "sex", allowed=("M", "F")),
    ColumnSpec("afp_ng_ml", "number", "serum alpha-fetoprotein before TACE", unit="ng/mL", value_required=False, minimum=0, maximum=1e7),
    ColumnSpec("tumour_diameter_mm", "number", "largest tumour diameter", unit="mm", value_required=False, minimum=5, maximum=300),
    ColumnSpec("tumour_number", "category", "number of tumours", allowed=("1", "2-3", ">3")),
    ColumnSpec("child_pugh", "category", "Child-Pugh class", value_required=False, allowed=("A", "B")),
    ColumnSpec("bclc_stage", "category", "Barcelona Clinic Liver Cancer stage", allowed=("0", "A", "B", "C")),
    ColumnSpec("albi_grade", "category", "albumin-bilirubin grade", value_required=False, allowed=("1", "2", "3")),
    ColumnSpec("portal_vein_invasion", "category", "portal-vein tumour invasion (1 = yes, 0 = no)", value_required=False, allowed=("0", "1")),
    ColumnSpec("tace_type", "category", "TACE technique: conventional (lipiodol) or drug-eluting beads", value_required=False, allowed=("conventional", "deb")),
    ColumnSpec("response", "category", "mRECIST objective response at first follow-up: 1 = CR/PR, 0 = SD/PD; empty for an unlabeled prediction set", header_required=False, value_required=False, allowed=("0", "1")),
    ColumnSpec("pfs_days", "number", "progression-free survival time from first TACE to progression, death or last follow-up", unit="days", header_required=False, value_required=False, minimum=0, maximum=36500),
    ColumnSpec("pfs_event", "category", "1 = progression or death observed at pfs_days, 0 = censored (alive and progression-free at last follow-up)", header_required=False, value_required=False, allowed=("0", "1")),
)  # fmt: skip

COLUMN_BY_NAME: dict[str, ColumnSpec] = {c.name: c for c in COLUMNS}
CLINICAL_COLUMNS = (
    "age", "sex", "afp_ng_ml", "tumour_diameter_mm", "tumour_number", "child_pugh", "bclc_stage", "albi_grade",
    "portal_vein_invasion", "tace_type",
)  # fmt: skip


@dataclass(frozen=True)
class PatientRecord:
    """One validated manifest row. Image paths are as written (relative to the manifest's folder)."""

    row: int
    patient_id: str
    split: str
    images: Mapping[str, str]
    mask: str
    clinical: Mapping[str, float | str | None]
    response: int | None = None
    pfs_days: float | None = None
    pfs_event: int | None = None
    mask_label: str | None = None

    def image_path(self, sequence: str, root: Path) -> Path:
        return root / self.images[sequence]

    def mask_path(self, root: Path) -> Path:
        return root / self.mask


@dataclass
class Manifest:
    """A parsed site manifest: the records that parsed cleanly and every problem found on the way."""

    path: Path
    columns: tuple[str, ...]
    records: list[PatientRecord] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    n_rows: int = 0

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def labelled(self) -> bool:
        return "response" in self.columns


def is_patient_id(value: str) -> bool:
    """Whether `value` is a valid `patient_id` (1-64 letters, digits, '.', '_', '-')."""
    return bool(_ID_RE.match(value))


def is_missing(value: str) -> bool:
    return value.strip().lower() in MISSING_TOKENS


def check_relative_path(value: str) -> str | None:
    """Return a problem kind if `value` is not a path inside the manifest's folder, else None.

    The check is lexical on purpose: a site may keep images on another mount and link them into the folder.
    """
    text = value.replace("\\", "/")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        return "absolute-path"
    norm = posixpath.normpath(text)
    if norm == ".." or norm.startswith("../"):
        return "path-escapes"
    return None


def _parse_cell(spec: ColumnSpec, raw: str, row: int) -> tuple[float | str | None, Problem | None]:
    value = raw.strip()
    if is_missing(value):
        if spec.value_required:
            return None, Problem("missing-value", f"a value is required in column {spec.name}", _fill_hint(spec), row, spec.name)
        return None, None
    if spec.kind == "id":
        if not _ID_RE.match(value):
            return None, Problem(
                "bad-id",
                "patient_id must be 1-64 characters of letters, digits, '.', '_' or '-'",
                "use the site's pseudonymous study code, never a name or hospital record number",
                row, spec.name,
            )  # fmt: skip
        return value, None
    if spec.kind == "label":
        if not _LABEL_RE.match(value):
            return None, Problem("bad-label", f"{spec.name} must be 1-64 characters without control characters or '\\'",
                                 "write the segment's or ROI's number or name as the file lists it", row, spec.name)  # fmt: skip
        return value, None
    if spec.kind == "category":
        if value not in spec.allowed:
            folded = {a.lower(): a for a in spec.allowed}
            hint = f"allowed values: {spec.allowed_text()}"
            if value.lower() in folded:
                hint += " (values are case-sensitive)"
            return None, Problem("unknown-category", f"value is not one of the allowed categories of {spec.name}", hint, row, spec.name)
        return value, None
    if spec.kind == "number":
        if not _NUMBER_RE.match(value):
            # Python's float() would also take "6_2", "0x..", "inf" or "nan": only plain decimals are numbers here.
            what = "a finite number" if value.lower().lstrip("+-") in ("inf", "infinity", "nan") else "a number"
            hint = f"write {spec.allowed_text()}, with '.' as decimal point"
            return None, Problem("wrong-type", f"{spec.name} must be {what}", hint, row, spec.name)
        number = float(value)
        assert spec.minimum is not None and spec.maximum is not None
        if not spec.minimum <= number <= spec.maximum:
            return None, Problem(
                "out-of-range", f"value of {spec.name} is out of range", f"expected {spec.allowed_text()}; check the unit", row, spec.name
            )
        return number, None
    # path
    kind = check_relative_path(value)
    if kind == "absolute-path":
        return None, Problem(
            "absolute-path", f"{spec.name} is an absolute path", "write paths relative to the manifest's folder", row, spec.name, value
        )
    if kind == "path-escapes":
        return None, Problem(
            "path-escapes",
            f"{spec.name} points outside the manifest's folder",
            "keep images inside the manifest's folder (links to another mount are allowed)",
            row,
            spec.name,
            value,
        )
    return value.replace("\\", "/"), None


def _fill_hint(spec: ColumnSpec) -> str:
    allowed = spec.allowed_text()
    return f"fill it in ({allowed})" if allowed else "fill it in"


def _sniff_delimiter(header_line: str) -> str:
    counts = {d: header_line.count(d) for d in (",", ";", "\t")}
    return max(counts, key=lambda d: counts[d]) if any(counts.values()) else ","


def parse_manifest(path: Path | str) -> Manifest:
    """Read a site manifest CSV and check every row against the schema (no image is opened).

    Parameters
    ----------
    path : Path or str
        The manifest CSV. Image paths inside it are relative to its folder.

    Returns
    -------
    Manifest
        Rows that passed go to ``records``; every problem found, on any row, goes to ``problems``.
    """
    path = Path(path)
    manifest = Manifest(path=path, columns=())
    text = _read_text(path, manifest.problems)
    table = _split_table(text, path, manifest.problems) if text is not None else None
    if table is None:
        return manifest
    header, unnamed, rows = table
    _check_header([h for i, h in enumerate(header) if i not in unnamed], manifest.problems)
    manifest.columns = tuple(h for h in header if h)
    _read_rows(manifest, header, rows)
    if manifest.n_rows == 0 and not manifest.problems:
        manifest.problems.append(
            Problem("empty-manifest", "manifest has a header but no patient rows", "add one row per patient", file=str(path))
        )
    return manifest


def _read_text(path: Path, problems: list[Problem]) -> str | None:
    """The manifest's text with universal newlines, or None (with the problem) when it cannot be read as UTF-8."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        problems.append(Problem("missing-file", "manifest file not found", "check the path given to --manifest", file=str(path)))
        return None
    except OSError as exc:
        problems.append(
            Problem("unreadable-file", f"manifest cannot be read ({exc.strerror})", "check the file's permissions", file=str(path))
        )
        return None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        problems.append(
            Problem("bad-encoding", "manifest is not UTF-8 text", "save it as 'CSV UTF-8' from your spreadsheet program", file=str(path))
        )
        return None
    # Universal newlines: CR-only files come from spreadsheet programs' "CSV (Macintosh)".
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _split_table(text: str, path: Path, problems: list[Problem]) -> tuple[list[str], set[int], list[list[str]]] | None:
    """Header, the indices of empty unnamed columns, and the data rows; None (with the problem) when the text is not
    a manifest with a header row."""
    lines = text.split("\n")
    if not lines or not lines[0].strip():
        problems.append(
            Problem(
                "empty-manifest", "manifest has no header row", "the first row must name the columns; see docs/manifest.md", file=str(path)
            )
        )
        return None
    delimiter = _sniff_delimiter(lines[0])
    try:
        header = [h.strip() for h in next(csv.reader(io.StringIO(lines[0]), delimiter=delimiter))]
        unnamed = _unnamed_columns(text, delimiter, header)
        rows = list(csv.reader(io.StringIO(text), delimiter=delimiter))[1:]
    except csv.Error as exc:
        problems.append(
            Problem("unreadable-file", f"manifest is not valid CSV ({str(exc).split(':')[0]})", "save it again as CSV from the spreadsheet program", file=str(path))
        )  # fmt: skip
        return None
    named = [h for h in header if h]
    if named and sum(h in COLUMN_BY_NAME for h in named) < max(1, len(named) // 2):
        # Most cells of the first row are not column names: it is probably a patient row. Do not echo its cells.
        problems.append(
            Problem("missing-header", f"the first row is not a header: {sum(h in COLUMN_BY_NAME for h in named)} of its {len(named)} cells are column names",
                    "insert the header row naming the columns (see docs/manifest.md)", 1)
        )  # fmt: skip
        return None
    return header, unnamed, rows


def _read_rows(manifest: Manifest, header: list[str], rows: list[list[str]]) -> None:
    """Every data row checked against the schema: valid ones become records, every problem is listed."""
    known = [(i, COLUMN_BY_NAME[h]) for i, h in enumerate(header) if h in COLUMN_BY_NAME]
    seen_ids: dict[str, int] = {}
    complete = all(h in manifest.columns for h in _required_headers())
    # Spreadsheet row numbers: one per CSV record (a cell with a line break is still one row).
    for row, cells in enumerate(rows, start=2):
        if not any(c.strip() for c in cells):
            continue
        manifest.n_rows += 1
        if len(cells) != len(header):
            manifest.problems.append(
                Problem("wrong-field-count", f"row has {len(cells)} fields but the header has {len(header)}",
                        "check for a stray delimiter or a missing cell in this row", row)
            )  # fmt: skip
            continue
        values: dict[str, float | str | None] = {}
        row_problems: list[Problem] = []
        for i, spec in known:
            value, problem = _parse_cell(spec, cells[i], row)
            values[spec.name] = value
            if problem is not None:
                row_problems.append(problem)
        row_problems += _row_consistency(values, row, row_problems, seen_ids)
        manifest.problems.extend(row_problems)
        if not row_problems and complete:
            manifest.records.append(_to_record(row, values))


def _row_consistency(values: dict[str, float | str | None], row: int, found: list[Problem], seen_ids: dict[str, int]) -> list[Problem]:
    """Problems of a row as a whole: a patient id used before (`seen_ids` records the first row of each), survival
    given half."""
    out = []
    pid = values.get("patient_id")
    if isinstance(pid, str):
        if pid in seen_ids:
            out.append(Problem("duplicate-id", f"patient_id already used on row {seen_ids[pid]}",
                               "each patient appears once per site; merge or renumber the rows", row, "patient_id"))  # fmt: skip
        else:
            seen_ids[pid] = row
    if (values.get("pfs_days") is None) != (values.get("pfs_event") is None) and not any(
        p.column in ("pfs_days", "pfs_event") for p in found
    ):
        out.append(Problem("incomplete-survival", "pfs_days and pfs_event must be given together or both left empty",
                           "fill in the missing one, or clear both if follow-up is unknown", row, "pfs_event"))  # fmt: skip
    return out


def _unnamed_columns(text: str, delimiter: str, header: list[str]) -> set[int]:
    """Indices of columns with an empty name and no value on any row: spreadsheet programs add these when a
    formatted but empty column is exported. They are ignored; an unnamed column holding values is reported."""
    blanks = {i for i, h in enumerate(header) if not h}
    if not blanks:
        return set()
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    next(reader)
    for cells in reader:
        blanks -= {i for i in blanks if i < len(cells) and cells[i].strip()}
    return blanks


def _required_headers() -> Iterable[str]:
    return (c.name for c in COLUMNS if c.header_required)


def _check_header(header: list[str], problems: list[Problem]) -> None:
    names = [c.name for c in COLUMNS]
    seen: set[str] = set()
    for h in header:
        if h in seen and h:
            problems.append(Problem("duplicate-column", f"column {h} appears more than once", "keep one copy of it", 1, h))
        seen.add(h)
        if h not in COLUMN_BY_NAME:
            close = difflib.get_close_matches(h, names, n=1)
            hint = (f"did you mean {close[0]}? " if close else "") + "valid columns: " + ", ".join(names)
            if h:
                problems.append(Problem("unknown-column", f"unknown column {h!r}", hint, 1, h))
            else:
                problems.append(
                    Problem("unknown-column", "a column without a name holds values", "name it or delete it; " + hint, 1, "(unnamed)")
                )
    for spec in COLUMNS:
        if spec.header_required and spec.name not in seen:
            problems.append(
                Problem("missing-column", f"required column {spec.name} is missing", f"add it: {spec.description}", 1, spec.name)
            )


def _to_record(row: int, values: Mapping[str, float | str | None]) -> PatientRecord:
    images = {seq: str(values[col]) for seq, col in SEQUENCE_COLUMNS.items() if values.get(col) is not None}
    response = values.get("response")
    pfs_event = values.get("pfs_event")
    pfs_days = values.get("pfs_days")
    return PatientRecord(
        row=row,
        patient_id=str(values["patient_id"]),
        split=str(values["split"]),
        images=images,
        mask=str(values[MASK_COLUMN]),
        clinical={c: values.get(c) for c in CLINICAL_COLUMNS},
        response=None if response is None else int(str(response)),
        pfs_days=None if pfs_days is None else float(pfs_days),
        pfs_event=None if pfs_event is None else int(str(pfs_event)),
        mask_label=None if values.get(MASK_LABEL_COLUMN) is None else str(values[MASK_LABEL_COLUMN]),
    )


def write_manifest(path: Path, rows: Iterable[Mapping[str, object]], columns: Iterable[str] | None = None) -> None:
    """Write manifest rows (dicts keyed by column name) as CSV; used by the synthetic cohort and by tests."""
    cols = list(columns) if columns is not None else [c.name for c in COLUMNS]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols, extrasaction="raise")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
