"""The subgroups an external site reports performance in, and which of its patients fall in each.

Clinical subgroups from the manifest (BCLC stage, tumour size, tumour number, TACE type, Child-Pugh class, sex) and,
when the manifest carries them, MRI field strength and vendor. A patient whose value is missing is in the level
`MISSING` of that variable, so that every patient is counted once per variable and none is silently dropped. The
site builds one score table per level (`tace.common.summaries`), subject to its minimum cell count; the analysis
(`tace.analysis.subgroups`) shows the levels in the order given here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tace.common.manifest import PatientRecord

MISSING = "not recorded"


def _category(column: str, names: dict[str, str] | None = None) -> Callable[[PatientRecord], str]:
    def level(record: PatientRecord) -> str:
        value = record.clinical.get(column)
        if value is None or value == "":
            return MISSING
        return (names or {}).get(str(value), str(value))

    return level


def _tumour_size(record: PatientRecord) -> str:
    value = record.clinical.get("tumour_diameter_mm")
    if value is None or value == "":
        return MISSING
    mm = float(value)
    return "≤ 5 cm" if mm <= 50 else "5-10 cm" if mm <= 100 else "> 10 cm"


@dataclass(frozen=True)
class Subgroup:
    """A variable patients are grouped by: its key, its name in words, its levels in display order, and the level of
    a patient (`MISSING` when the manifest lacks the value)."""

    key: str
    label: str
    levels: tuple[str, ...]
    level_of: Callable[[PatientRecord], str]
    optional: bool = False  # a variable the manifest may not have: left out when no patient has a value


SUBGROUPS: tuple[Subgroup, ...] = (
    Subgroup("bclc_stage", "BCLC stage", ("BCLC 0", "BCLC A", "BCLC B", "BCLC C"),
             _category("bclc_stage", {s: f"BCLC {s}" for s in "0ABC"})),
    Subgroup("tumour_size", "largest tumour diameter", ("≤ 5 cm", "5-10 cm", "> 10 cm"), _tumour_size),
    Subgroup("tumour_number", "number of tumours", ("1", "2-3", "> 3"), _category("tumour_number", {">3": "> 3"})),
    Subgroup("tace_type", "TACE technique", ("conventional", "DEB"), _category("tace_type", {"deb": "DEB"})),
    Subgroup("child_pugh", "Child-Pugh class", ("Child-Pugh A", "Child-Pugh B"), _category("child_pugh", {"A": "Child-Pugh A", "B": "Child-Pugh B"})),
    Subgroup("sex", "sex", ("female", "male"), _category("sex", {"F": "female", "M": "male"})),
    # Acquisition: only when the site's manifest records it (read from the record's values under these names).
    Subgroup("field_strength", "MRI field strength", ("1.5 T", "3 T"), _category("field_strength", {"1.5": "1.5 T", "3": "3 T", "3.0": "3 T"}), True),
    Subgroup("vendor", "MRI vendor", (), _category("vendor"), True),
)  # fmt: skip
BY_KEY = {s.key: s for s in SUBGROUPS}


def level_order(key: str, levels: Sequence[str]) -> list[str]:
    """`levels` of variable `key` in display order: the defined levels first, then any other value, `MISSING` last."""
    known = BY_KEY[key].levels if key in BY_KEY else ()
    rank = {name: i for i, name in enumerate(known)}
    return sorted(set(levels), key=lambda v: (v == MISSING, rank.get(v, len(rank)), v))


def subgroup_levels(records: Sequence[PatientRecord]) -> dict[str, list[str]]:
    """Per variable, the level of every patient of `records` (in their order); optional variables no patient has
    are left out."""
    out: dict[str, list[str]] = {}
    for spec in SUBGROUPS:
        levels = [spec.level_of(r) for r in records]
        if spec.optional and all(v == MISSING for v in levels):
            continue
        out[spec.key] = levels
    return out
