"""The rules `tace-client import` names a DICOM series' phase by: defaults for common vendor names, overridden by a
site's TOML rules file (docs/manifest.md, "From your PACS export")."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tace.common.errors import ConfigError

#: The default rules, as a rules file would write them. Patterns are Python regular expressions searched in the
#: SeriesDescription in lower case with '_', '-', '+' and '.' read as spaces (so `\bart\b` finds "t1_vibe_art").
DEFAULT_RULES = r"""
[series]
# Series that are never a phase, checked first (ImageType LOCALIZER / SUBTRACTION count too).
localiser = ['\bloc\b', 'locali[sz]er', 'scout', 'survey', '3 ?plane', 'tri ?pilot', 'locator', 'calibration', 'aahead']
subtraction = ['\bsub\b', 'subtract']
precontrast = ['\bpre\b', 'precontrast', 'native', 'plain', 'unenhanced', 'non ?contrast']
min_slices = 5

[phases]
arterial = ['arterial', '\bart\b', '\bhap\b', '\bhat\b', '\bap\b', '\blap\b']
portal_venous = ['portal', '\bpv\b', '\bpvp\b', 'venous', '\bven\b', '\bvp\b']
delayed = ['delay', 'equilibri', '\beq\b', 'transitional', '\blate\b(?!.*art)', '\b3 ?min']
t2 = ['\bt2', 'haste', 'ssfse', '\bfase\b']
dwi = ['\bdwi', 'diffusion', 'ep2d diff', '\bb ?\d{2,4}\b']

[dynamic]
# One series holding several temporal phases (or several series of one name): split by TemporalPositionIdentifier,
# else by acquisition time, then named by their delay after ContrastBolusStartTime (seconds, [from, to)) when the
# headers give it (delay_s = {} to skip this), else by how many phases there are.
description = ['\bdyn', 'multi ?phase', 'disco', 'twist', 'tricks', '\b4d\b', '\bphases\b']
delay_s = { arterial = [15, 50], portal_venous = [50, 110], delayed = [110, 600] }
by_count = { 3 = ['arterial', 'portal_venous', 'delayed'], 4 = ['pre', 'arterial', 'portal_venous', 'delayed'] }

[studies]
# A patient with several studies holding phases: 'only' lists them as ambiguous; 'earliest' or 'latest' by StudyDate.
choose = 'only'
"""

PHASE_NAMES = ("arterial", "portal_venous", "delayed", "t2", "dwi")
_DYNAMIC_NAMES = ("pre", "skip", "arterial", "portal_venous", "delayed")  # skip: a temporal phase the site leaves out


def normalise(description: str) -> str:
    return re.sub(r"[_\-+.]", " ", description.lower())


@dataclass(frozen=True)
class Rules:
    """Compiled phase rules. `phases` and the series patterns are lists of (source text, compiled pattern)."""

    localiser: tuple[tuple[str, re.Pattern[str]], ...]
    subtraction: tuple[tuple[str, re.Pattern[str]], ...]
    precontrast: tuple[tuple[str, re.Pattern[str]], ...]
    min_slices: int
    phases: dict[str, tuple[tuple[str, re.Pattern[str]], ...]]
    dynamic: tuple[tuple[str, re.Pattern[str]], ...]
    delay_s: dict[str, tuple[float, float]]
    by_count: dict[int, tuple[str, ...]]
    studies: str

    def first_match(self, patterns: tuple[tuple[str, re.Pattern[str]], ...], description: str) -> str | None:
        text = normalise(description)
        return next((source for source, pattern in patterns if pattern.search(text)), None)

    def phase_matches(self, description: str) -> dict[str, str]:
        """{phase: the pattern that matched} for every phase whose rules match `description`."""
        found = {}
        for phase, patterns in self.phases.items():
            source = self.first_match(patterns, description)
            if source is not None:
                found[phase] = source
        return found

    def phase_by_delay(self, delay: float) -> str | None:
        if delay < 0:
            return "pre"
        return next((p for p, (lo, hi) in self.delay_s.items() if lo <= delay < hi), None)


def load_rules(path: Path | None = None) -> Rules:
    """The default rules, with the tables and keys of the TOML file at `path` replacing theirs."""
    import tomllib

    merged: dict[str, Any] = tomllib.loads(DEFAULT_RULES)
    if path is not None:
        try:
            user = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"rules file {path} not found", "check the path given to --rules") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"rules file {path} is not valid TOML ({exc})", "see docs/manifest.md for the format") from None
        for table, values in user.items():
            if table not in merged or not isinstance(values, Mapping):
                raise ConfigError(f"unknown table [{table}] in the rules file", "valid tables: " + ", ".join(f"[{t}]" for t in merged))
            for key in values:
                if key not in merged[table] and table != "phases":
                    raise ConfigError(f"unknown key {key!r} in [{table}] of the rules file", "valid keys: " + ", ".join(merged[table]))
            merged[table] = {**merged[table], **values}
    return _compile(merged)


def _patterns(where: str, values: Any) -> tuple[tuple[str, re.Pattern[str]], ...]:
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"rules: {where} must be a list of regular expressions")
    out = []
    for v in values:
        try:
            out.append((v, re.compile(v, re.IGNORECASE)))
        except re.error as exc:
            raise ConfigError(f"rules: {where} holds an invalid regular expression {v!r} ({exc})") from None
    return tuple(out)


def _compile(raw: dict[str, Any]) -> Rules:
    series, dynamic = raw["series"], raw["dynamic"]
    unknown = [p for p in raw["phases"] if p not in PHASE_NAMES]
    if unknown:
        raise ConfigError(f"rules: unknown phase(s) {unknown} in [phases]", "valid phases: " + ", ".join(PHASE_NAMES))
    try:
        delay = {str(p): (float(v[0]), float(v[1])) for p, v in dynamic["delay_s"].items()}
        by_count = {int(n): tuple(str(p) for p in names) for n, names in dynamic["by_count"].items()}
        min_slices = int(series["min_slices"])
    except (TypeError, ValueError, IndexError, KeyError):
        raise ConfigError("rules: [dynamic] delay_s needs [from, to] seconds per phase, by_count lists of phases per count, "
                          "[series] min_slices an integer") from None  # fmt: skip
    for names in by_count.values():
        if any(n not in _DYNAMIC_NAMES for n in names):
            raise ConfigError("rules: [dynamic] by_count may name only " + ", ".join(_DYNAMIC_NAMES))
    if raw["studies"]["choose"] not in ("only", "earliest", "latest"):
        raise ConfigError("rules: [studies] choose must be 'only', 'earliest' or 'latest'")
    return Rules(
        localiser=_patterns("[series] localiser", series["localiser"]),
        subtraction=_patterns("[series] subtraction", series["subtraction"]),
        precontrast=_patterns("[series] precontrast", series["precontrast"]),
        min_slices=min_slices,
        phases={p: _patterns(f"[phases] {p}", v) for p, v in raw["phases"].items()},
        dynamic=_patterns("[dynamic] description", dynamic["description"]),
        delay_s=delay,
        by_count=by_count,
        studies=str(raw["studies"]["choose"]),
    )
