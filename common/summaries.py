"""What a site returns for the final analysis, and the cut-offs the coordinator fixes on training data.

After training, every site summarises its evaluation set (internal-validation split at a training site, the whole
labelled cohort at a holdout site) in a `SiteSummary` (`site_summary`):

* a **joint score table**: the class-conditional counts of patients per cell of a fixed grid over the models'
  predicted probabilities (one axis per model, ``bins`` bins per axis). Its one-model margins are the score
  histograms; its cells carry what the paired DeLong test needs. Only non-empty cells are sent.
* **event tables** for progression-free survival, per grouping of the patients (predicted responders vs
  non-responders, and risk groups, with cut-offs the coordinator fixed on the training sites): per group and
  distinct time, the number at risk, events and censorings. Kaplan-Meier, log-rank and Cox estimates computed
  from these are exactly those of the patient-level data.
* **patient-level rows**, only when the site's own configuration opts in (``share-patient-level``): pseudonymous
  id, label, scores, PFS. The pseudonym is a keyed hash whose key never leaves the site.
* **subgroup score tables** (external sites only): per subgroup variable (`tace.common.subgroups`: BCLC stage,
  tumour size, ...) and level, the score table of the level's patients, under the same minimum cell count.
* **exact statistics** (`tace.common.exact`): what the site computed exactly over all its evaluated patients (AUCs
  with their DeLong covariance, calibration fits and sums, log-rank observed minus expected per survival grouping),
  so that per-site and stratified results stay exact whatever the minimum cell count.

A site may require a minimum cell count ``k`` (``min-cell-count``). Its score table then holds one table per
model instead of the joint one (joint cells would single patients out): for each model the patients are sorted
by that model's score, grouped into runs of at least ``k`` and every patient of a run gets the run's mean score
(microaggregation), so each model's ranking is kept up to ties; the paired test cannot use such a site. Event-table
rows are merged with the following distinct times until each row holds at least ``k`` events plus censorings (a
merged row is reported at the latest time it covers); a survival group with fewer than ``k`` patients is
suppressed and named in the summary. A subgroup level with fewer than ``k`` patients is suppressed and named too,
and so are the next smallest levels of that variable until the suppressed levels hold at least ``k`` patients
together and are at least two (otherwise the site's totals minus the levels it sent would give the suppressed one
away). A site whose evaluation set has fewer than ``k`` patients sends its counts only (``withheld``): any table
of it, even one cell, would describe fewer than ``k``. docs/analysis.md quantifies the effect.

This module is numpy-only: the site builds summaries with it, the coordinator fixes cut-offs and decodes (checks)
incoming summaries with it, and `tace.analysis` reads them.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tace.common.errors import TaceError
from tace.common.exact import ExactStatistics, exact_statistics
from tace.common.subgroups import level_order

SUMMARY_VERSION = 1
RESPONSE_GROUPS = ("predicted non-responder", "predicted responder")


def bin_index(scores: Sequence[float] | np.ndarray, bins: int, what: str = "scores") -> np.ndarray:
    """Grid cell of each probability: ``floor(p * bins)``, p = 1 in the last cell (``bins - 1``).

    A score outside [0, 1], or NaN, is a bug upstream (a diverged model, a file that does not hold probabilities):
    moving it into the grid would quietly change the AUC and the groups, so it raises a `TaceError` that says how
    many of `what` (which model's scores, and where) were out of range, never their values.
    """
    s = np.asarray(scores, dtype=float)
    outside = int(np.count_nonzero(~((s >= 0.0) & (s <= 1.0))))  # NaN fails both comparisons
    if outside:
        raise TaceError(
            f"{outside} of {s.size} {what} are not probabilities in [0, 1] (out of range or not a number); nothing was computed from them",
            "the model gives values that are not probabilities (a diverged training gives NaN): check the run's metrics.csv "
            "and the model file, and report it as a bug in TACE-FL",
        )
    return np.minimum((s * bins).astype(int), bins - 1)


def risk_group_names(k: int) -> list[str]:
    """Names of `k` risk groups, ordered by increasing predicted response probability (decreasing risk)."""
    if k == 2:
        return ["high risk", "low risk"]
    if k == 3:
        return ["high risk", "intermediate risk", "low risk"]
    return [f"risk group {i + 1} of {k} (1 = highest risk)" for i in range(k)]


# -- what a site returns, typed ------------------------------------------------------------------------------------
class _Checker:
    """Raises the error for a malformed summary from `site` (what is wrong, and what to do)."""

    def __init__(self, site: str) -> None:
        self.site = site

    def __call__(self, what: str) -> TaceError:
        return TaceError(f"site {self.site} sent a malformed analysis summary: {what}",
                         "the site may run another TACE-FL version; ask it to update, then rerun the final evaluation")  # fmt: skip

    def counts(self, cells: Any, width: int, bins: int) -> list[list[int]]:
        """Rows of `width` bin indices on the grid followed by two non-negative counts."""
        if not isinstance(cells, list):
            raise self("a model's score table is missing")
        for cell in cells:
            if not isinstance(cell, list) or len(cell) != width + 2 or not all(isinstance(v, int) and v >= 0 for v in cell):
                raise self("a score-table cell is not a list of non-negative integers of the right length")
            if any(v >= bins for v in cell[:width]):
                raise self("a score-table cell lies outside the grid")
        return [list(c) for c in cells]


@dataclass(frozen=True)
class ScoreTable:
    """Class-conditional patient counts on a grid of `bins` cells per model score.

    Joint (`cells`): rows ``[bin_model_1, ..., bin_model_m, n_negative, n_positive]``, non-empty cells only, sorted.
    Microaggregated to cells of at least `microaggregated` patients (`marginals`): per model, rows
    ``[bin, n_negative, n_positive]``.
    """

    bins: int
    models: tuple[str, ...]
    cells: list[list[int]] | None = None
    marginals: dict[str, list[list[int]]] | None = None
    microaggregated: int = 0

    def parts(self) -> list[tuple[list[list[int]], int]]:
        """Each table with its number of bin columns: one joint table, or one per model."""
        if self.marginals is not None:
            return [(self.marginals[m], 1) for m in self.models]
        return [(self.cells or [], len(self.models))]

    def margins(self, model: str) -> tuple[np.ndarray, np.ndarray]:
        """One model's class-conditional histograms (negatives, positives)."""
        neg, pos = np.zeros(self.bins, dtype=np.int64), np.zeros(self.bins, dtype=np.int64)
        if self.marginals is not None:
            cells, j, m = self.marginals[model], 0, 1
        else:
            cells, j, m = self.cells or [], self.models.index(model), len(self.models)
        for cell in cells:
            neg[int(cell[j])] += int(cell[m])
            pos[int(cell[j])] += int(cell[m + 1])
        return neg, pos

    @property
    def n_cells(self) -> int:
        return sum(len(cells) for cells, _ in self.parts())

    def encode(self) -> dict[str, Any]:
        key, value = ("marginals", self.marginals) if self.marginals is not None else ("cells", self.cells)
        return {"bins": self.bins, "models": list(self.models), key: value, "microaggregated": self.microaggregated}

    @classmethod
    def decode(cls, data: Any, check: _Checker, models: Sequence[str]) -> ScoreTable:
        if not isinstance(data, dict) or not isinstance(data.get("bins"), int):
            raise check("no score table")
        names = tuple(str(m) for m in data.get("models", []))
        missing = [m for m in models if m not in names]
        if missing:
            raise check(f"score table lacks model(s) {', '.join(missing)}")
        bins, micro = int(data["bins"]), int(data.get("microaggregated", 0))
        if isinstance(data.get("marginals"), dict):
            marginals = {m: check.counts(data["marginals"].get(m), 1, bins) for m in names}
            return cls(bins, names, marginals=marginals, microaggregated=micro)
        if isinstance(data.get("cells"), list):
            return cls(bins, names, cells=check.counts(data["cells"], len(names), bins), microaggregated=micro)
        raise check("no score table")


@dataclass(frozen=True)
class EventTable:
    """PFS events of one grouping: rows ``[time, group, at_risk, events, censored]`` per group and distinct time
    (sorted by group, then time); groups of fewer than `merged` patients are left out and listed in `suppressed`."""

    groups: list[str]
    rows: list[list[float]]
    suppressed: list[int] = field(default_factory=list)
    merged: int = 0

    def encode(self) -> dict[str, Any]:
        return {"groups": list(self.groups), "rows": self.rows, "suppressed": self.suppressed, "merged": self.merged}

    @classmethod
    def decode(cls, name: str, data: Any, check: _Checker) -> EventTable:
        if not isinstance(data, dict):
            raise check(f"event table {name!r} is not a mapping")
        groups = [str(g) for g in data.get("groups", [])]
        for row in data.get("rows", []):
            if (
                not isinstance(row, list)
                or len(row) != 5
                or not all(isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in row)
            ):
                raise check(f"event table {name!r} has a row that is not five non-negative numbers")
            if not all(float(v).is_integer() for v in row[1:]):
                raise check(f"event table {name!r} has a row whose counts are not whole numbers")
            if row[1] >= len(groups):
                raise check(f"event table {name!r} names a group that does not exist")
        return cls(
            groups, [list(r) for r in data.get("rows", [])], [int(g) for g in data.get("suppressed", [])], int(data.get("merged", 0))
        )


@dataclass(frozen=True)
class SubgroupTable:
    """One subgroup variable at a site: its `levels` (every level the site has, in display order), a score table per
    level it sent, and the levels it `suppressed` (named, with no count: see the module docstring)."""

    levels: list[str]
    tables: dict[str, ScoreTable]
    suppressed: list[str] = field(default_factory=list)

    def encode(self) -> dict[str, Any]:
        return {
            "levels": list(self.levels),
            "suppressed": list(self.suppressed),
            "tables": {lv: t.encode() for lv, t in self.tables.items()},
        }

    @classmethod
    def decode(cls, name: str, data: Any, check: _Checker, models: Sequence[str], n: int) -> SubgroupTable:
        if not isinstance(data, dict) or not isinstance(data.get("levels"), list) or not isinstance(data.get("tables", {}), dict):
            raise check(f"subgroup {name!r} is not a table of levels")
        levels, suppressed = [str(v) for v in data["levels"]], [str(v) for v in data.get("suppressed", [])]
        tables = {str(lv): ScoreTable.decode(t, check, models) for lv, t in data.get("tables", {}).items()}
        if not set(tables) | set(suppressed) <= set(levels) or set(tables) & set(suppressed):
            raise check(f"subgroup {name!r} names levels it does not list, or both sends and suppresses one")
        sizes = [{sum(c[m] + c[m + 1] for c in cells) for cells, m in t.parts()} for t in tables.values()]
        if any(len(size) != 1 for size in sizes):
            raise check(f"the per-model tables of a level of subgroup {name!r} hold different numbers of patients")
        total = sum(size.pop() for size in sizes)
        if total > n or (not suppressed and total != n):
            raise check(f"the levels of subgroup {name!r} hold {total} patients but the summary says {n}")
        return cls(levels, tables, suppressed)


@dataclass(frozen=True)
class PatientRows:
    """Patient-level rows a site opted in to share: pseudonym (keyed hash), label, scores per model, PFS."""

    pseudonym: list[str]
    label: list[int]
    scores: dict[str, list[float]]
    pfs_days: list[float | None]
    pfs_event: list[int | None]

    def encode(self) -> dict[str, Any]:
        return {
            "pseudonym": self.pseudonym,
            "label": self.label,
            "scores": self.scores,
            "pfs_days": self.pfs_days,
            "pfs_event": self.pfs_event,
        }

    @classmethod
    def decode(cls, data: Any, n: int, check: _Checker, models: Sequence[str]) -> PatientRows:
        columns = ("pseudonym", "label", "pfs_days", "pfs_event")
        ok = isinstance(data, dict) and all(isinstance(data.get(k), list) and len(data[k]) == n for k in columns)
        scores = data.get("scores") if isinstance(data, dict) else None
        if not ok or not isinstance(scores, dict) or any(not isinstance(scores.get(m), list) or len(scores[m]) != n for m in models):
            raise check("its patient-level rows do not match its patient count or models")
        return cls(list(data["pseudonym"]), list(data["label"]), {str(m): list(v) for m, v in scores.items()}, list(data["pfs_days"]),
                   list(data["pfs_event"]))  # fmt: skip


@dataclass(frozen=True)
class SiteSummary:
    """Everything a site returns for the final analysis (see the module docstring); `encode` gives the JSON form
    sites send and ``site_returns/<site>.json`` keeps, `decode` checks it on the way in."""

    site_id: str
    role: str
    sharing: str
    min_cell_count: int
    n: int
    n_pos: int
    scores: ScoreTable
    n_with_pfs: int = 0
    survival_cutoffs: dict[str, Any] | None = None  # with the event tables: the cut-offs that grouped them
    survival: dict[str, EventTable] = field(default_factory=dict)
    patients: PatientRows | None = None
    subgroups: dict[str, SubgroupTable] = field(default_factory=dict)
    exact: ExactStatistics | None = None  # what the site computed exactly on its own patients (`tace.common.exact`)
    withheld: bool = False  # fewer patients than the minimum cell count: counts only (and rows, had it opted in)
    version: int = SUMMARY_VERSION

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "site_id": self.site_id, "role": self.role, "sharing": self.sharing,
                               "min_cell_count": self.min_cell_count, "n": self.n, "n_pos": self.n_pos, "scores": self.scores.encode(),
                               "n_with_pfs": self.n_with_pfs}  # fmt: skip
        if self.survival_cutoffs is not None:
            out["survival"] = {"cutoffs": self.survival_cutoffs, "tables": {k: t.encode() for k, t in self.survival.items()}}
        if self.patients is not None:
            out["patients"] = self.patients.encode()
        if self.subgroups:
            out["subgroups"] = {k: t.encode() for k, t in self.subgroups.items()}
        if self.exact is not None:
            out["exact"] = self.exact.encode()
        if self.withheld:
            out["withheld"] = True
        return out

    @classmethod
    def decode(cls, data: Any, site: str, models: Sequence[str]) -> SiteSummary:
        """Check a summary received from `site` before anything is computed from it; raise a clear error if malformed."""
        check = _Checker(site)
        if not isinstance(data, dict):
            raise check("not a mapping")
        if data.get("version") != SUMMARY_VERSION:
            raise check(f"summary version {data.get('version')!r}, expected {SUMMARY_VERSION}")
        if data.get("role") not in ("train", "holdout") or not isinstance(data.get("site_id"), str):
            raise check("no valid role or site id")
        n, n_pos = data.get("n"), data.get("n_pos")
        if not isinstance(n, int) or not isinstance(n_pos, int):
            raise check("no patient counts")
        table = ScoreTable.decode(data.get("scores"), check, models)
        withheld = bool(data.get("withheld", False))
        for cells, m in table.parts():
            total = sum(c[m] + c[m + 1] for c in cells)
            if withheld and total:
                raise check("it says its tables were withheld, but sent a score table")
            if withheld:
                continue
            if total != n:
                raise check(f"the score table holds {total} patients but the summary says {n}")
            if sum(c[m + 1] for c in cells) != n_pos:
                raise check("the score table's responders do not add up to the summary's")
        survival = data.get("survival") or {}
        tables = {str(k): EventTable.decode(str(k), t, check) for k, t in dict(survival.get("tables", {})).items()}
        patients = PatientRows.decode(data["patients"], n, check, models) if data.get("patients") is not None else None
        cutoffs = dict(survival["cutoffs"]) if "cutoffs" in survival else None
        if not isinstance(data.get("subgroups") or {}, dict):
            raise check("its subgroup tables are not a mapping")
        subgroups = {str(k): SubgroupTable.decode(str(k), t, check, models, n) for k, t in (data.get("subgroups") or {}).items()}
        exact = ExactStatistics.decode(data["exact"], check) if data.get("exact") is not None else None
        return cls(str(data["site_id"]), str(data["role"]), str(data.get("sharing", "aggregate")), int(data.get("min_cell_count", 0)),
                   n, n_pos, table, int(data.get("n_with_pfs", 0)), cutoffs, tables, patients, subgroups, exact, withheld)  # fmt: skip


# -- the joint score table -------------------------------------------------------------------------------------
def joint_score_table(labels: np.ndarray, scores: Mapping[str, np.ndarray], bins: int, min_cell_count: int = 0) -> ScoreTable:
    """Class-conditional patient counts per joint grid cell of the models' scores (only non-empty cells, sorted);
    with ``min_cell_count`` k > 1 one microaggregated table per model (see the module docstring)."""
    models = tuple(scores)
    y = np.asarray(labels, dtype=int)
    k = int(min_cell_count)
    if k > 1:
        marginals = {}
        for m in models:
            bin_index(scores[m], bins, f"{m} scores in the score table")  # refused before averaging could hide them
            single = joint_score_table(y, {m: _microaggregate(np.asarray(scores[m], dtype=float), k)}, bins)
            marginals[m] = single.cells or []
        return ScoreTable(int(bins), models, marginals=marginals, microaggregated=k)
    values = np.column_stack([np.asarray(scores[m], dtype=float) for m in models]) if models else np.zeros((len(y), 0))
    idx = (
        np.column_stack([bin_index(values[:, j], bins, f"{m} scores in the score table") for j, m in enumerate(models)])
        if models
        else np.zeros((len(y), 0), int)
    )
    cells: dict[tuple[int, ...], list[int]] = {}
    for row, label in zip(idx, y, strict=True):
        cell = cells.setdefault(tuple(int(v) for v in row), [0, 0])
        cell[int(label)] += 1
    return ScoreTable(int(bins), models, cells=[[*key, neg, pos] for key, (neg, pos) in sorted(cells.items())])


def _microaggregate(values: np.ndarray, k: int) -> np.ndarray:
    """Replace each patient's score by the mean score of a run of >= k patients with neighbouring scores."""
    order = np.argsort(values, kind="stable")
    n = len(order)
    starts = list(range(0, n, k))
    if len(starts) > 1 and n - starts[-1] < k:
        starts.pop()  # a short last run joins the one before it
    out = values.copy()
    for i, s in enumerate(starts):
        e = starts[i + 1] if i + 1 < len(starts) else n
        members = order[s:e]
        out[members] = values[members].mean()
    return out


# -- cut-offs fixed on the training sites ---------------------------------------------------------------------
def youden_bin(negatives: np.ndarray, positives: np.ndarray) -> int:
    """The grid cell b maximising sensitivity + specificity - 1 for the rule "responder when bin >= b".

    The index is flat over the empty cells between two observed scores; the cut-off is put in the middle of the
    first best run (midway between the two scores, as pROC's best threshold). Needs both classes.
    """
    neg, pos = np.asarray(negatives, dtype=float), np.asarray(positives, dtype=float)
    if neg.sum() == 0 or pos.sum() == 0:
        raise ValueError("both classes are needed for a Youden cut-off")
    sens = pos[::-1].cumsum()[::-1] / pos.sum()  # share of positives with bin >= b
    spec = (neg.cumsum() - neg) / neg.sum()  # share of negatives with bin < b
    j = sens + spec - 1.0
    first = int(np.argmax(j))
    last = first
    while last + 1 < len(j) and j[last + 1] >= j[first] - 1e-12:
        last += 1
    return (first + last + 1) // 2


def quantile_bins(counts: np.ndarray, groups: int) -> list[int]:
    """Cut cells splitting the patients of a histogram into `groups` groups of about equal size.

    Cut c_i means group >= i+1 starts at bin c_i. Cuts are strictly increasing (a heavy cell can make groups uneven).
    """
    counts = np.asarray(counts, dtype=float)
    total = counts.sum()
    cum = np.cumsum(counts)
    cuts: list[int] = []
    for i in range(1, groups):
        b = int(np.searchsorted(cum, total * i / groups, side="right"))
        below = cum[b - 1] if b > 0 else 0.0
        previous = cum[cuts[-1] - 1] if cuts else 0.0
        # keep a cut only if it leaves patients on both sides and in the group it closes (a heavy cell can
        # make fewer groups than asked)
        if 0 < b < len(counts) and below > previous and below < total:
            cuts.append(b)
    return cuts


def fix_cutoffs(tables: Sequence[ScoreTable], risk_groups: int) -> dict[str, dict[str, Any]]:
    """Per model, from the training sites' pooled score tables: the Youden cut-off and the risk-group cuts."""
    if not tables:
        raise TaceError("no training-site score tables to fix cut-offs on")
    bins = tables[0].bins
    out: dict[str, dict[str, Any]] = {}
    for model in tables[0].models:
        neg = sum((t.margins(model)[0] for t in tables), np.zeros(bins, dtype=np.int64))
        pos = sum((t.margins(model)[1] for t in tables), np.zeros(bins, dtype=np.int64))
        if neg.sum() == 0 or pos.sum() == 0:
            continue
        y_bin = youden_bin(neg, pos)
        risk = quantile_bins(neg + pos, risk_groups)
        out[model] = {
            "youden_bin": y_bin,
            "youden_threshold": y_bin / bins,
            "risk_bins": risk,
            "risk_thresholds": [b / bins for b in risk],
            "risk_groups": risk_group_names(len(risk) + 1),
            "fixed_on": "pooled internal-validation score tables of the training sites",
        }
    return out


def groupings(
    scores: Mapping[str, np.ndarray], cutoffs: Mapping[str, Mapping[str, Any]], bins: int
) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Each patient's group under every grouping: ``"<model>:response"`` and ``"<model>:risk"``."""
    out: dict[str, tuple[np.ndarray, list[str]]] = {}
    for model, cut in cutoffs.items():
        if model not in scores:
            continue
        b = bin_index(scores[model], bins, f"{model} scores grouped at the cut-offs")
        out[f"{model}:response"] = ((b >= int(cut["youden_bin"])).astype(int), list(RESPONSE_GROUPS))
        risk = np.searchsorted(np.asarray(cut["risk_bins"], dtype=int), b, side="right")
        out[f"{model}:risk"] = (risk.astype(int), list(cut["risk_groups"]))
    return out


# -- event tables ---------------------------------------------------------------------------------------------
def event_table(times: np.ndarray, events: np.ndarray, groups: np.ndarray, names: Sequence[str], min_cell_count: int = 0) -> EventTable:
    """The event table of patients in groups ``0 .. len(names) - 1`` (see `EventTable`).

    With ``min_cell_count`` k > 1 rows are merged forward until each holds k events + censorings, and groups of
    fewer than k patients are left out (listed under ``suppressed``).
    """
    t, e, g = np.asarray(times, dtype=float), np.asarray(events, dtype=int), np.asarray(groups, dtype=int)
    rows: list[list[float]] = []
    suppressed: list[int] = []
    k = int(min_cell_count)
    for group in range(len(names)):
        mask = g == group
        if k > 1 and 0 < mask.sum() < k:
            suppressed.append(group)
            continue
        tg, eg = t[mask], e[mask]
        uniq = np.unique(tg)
        d = np.array([int(eg[tg == u].sum()) for u in uniq])
        c = np.array([int((tg == u).sum()) for u in uniq]) - d
        blocks = _merge_blocks(d + c, k) if k > 1 else [(i, i) for i in range(len(uniq))]
        at_risk = int(mask.sum())
        for s, end in blocks:
            dd, cc = int(d[s : end + 1].sum()), int(c[s : end + 1].sum())
            rows.append([float(uniq[end]), group, at_risk, dd, cc])
            at_risk -= dd + cc
    return EventTable(list(names), rows, suppressed, k if k > 1 else 0)


def _merge_blocks(counts: np.ndarray, k: int) -> list[tuple[int, int]]:
    blocks: list[tuple[int, int]] = []
    start, acc = 0, 0
    for i, n in enumerate(counts):
        acc += int(n)
        if acc >= k:
            blocks.append((start, i))
            start, acc = i + 1, 0
    if start < len(counts):
        if blocks:
            s, _ = blocks.pop()
            blocks.append((s, len(counts) - 1))
        else:
            blocks.append((start, len(counts) - 1))
    return blocks


# -- subgroup tables ------------------------------------------------------------------------------------------
def subgroup_table(
    key: str, levels: Sequence[str], labels: np.ndarray, scores: Mapping[str, np.ndarray], bins: int, min_cell_count: int = 0
) -> SubgroupTable:
    """The score table of each level of subgroup variable `key` (``levels``: each patient's), suppressing levels of
    fewer than ``min_cell_count`` patients and, beside them, as many of the smallest levels as it takes that the
    suppressed ones hold at least ``min_cell_count`` patients together and are at least two."""
    lv = np.asarray(levels, dtype=object)
    y = np.asarray(labels, dtype=int)
    names = level_order(key, [str(v) for v in lv])
    counts = {name: int((lv == name).sum()) for name in names}
    k = int(min_cell_count)
    suppressed = [name for name in names if k > 1 and counts[name] < k]
    while suppressed and (len(suppressed) == 1 or sum(counts[s] for s in suppressed) < k):
        rest = [name for name in names if name not in suppressed]
        if not rest:
            break
        suppressed.append(min(rest, key=lambda name: (counts[name], names.index(name))))
    tables = {}
    for name in names:
        if name not in suppressed:
            m = lv == name
            tables[name] = joint_score_table(y[m], {model: np.asarray(s)[m] for model, s in scores.items()}, bins, k)
    return SubgroupTable(names, tables, [name for name in names if name in suppressed])


# -- the whole summary ----------------------------------------------------------------------------------------
def pseudonym(patient_id: str, key: bytes) -> str:
    """A keyed hash of the patient id: stable within a site, not reversible without the site's key."""
    return hmac.new(key, patient_id.encode(), hashlib.sha256).hexdigest()[:16]


@dataclass(frozen=True)
class EvaluatedPatients:
    """A site's evaluated patients (site-local; a summary carries only what `SharingRules` allow of them).

    labels : (N,) 0/1; scores : {model: (N,) probabilities}; pfs_days, pfs_event : per patient, None when unknown;
    subgroups : {variable: (N,) level of each patient} (`tace.common.subgroups.subgroup_levels`).
    """

    patient_ids: Sequence[str]
    labels: np.ndarray
    scores: Mapping[str, np.ndarray]
    pfs_days: Sequence[float | None]
    pfs_event: Sequence[int | None]
    subgroups: Mapping[str, Sequence[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class SharingRules:
    """What the site's own configuration allows to leave: cells of at least `min_cell_count` patients, and
    patient-level rows (pseudonymised with the site's secret `pseudonym_key`) only when it opted in."""

    min_cell_count: int = 0
    share_patient_level: bool = False
    pseudonym_key: bytes = b""


def site_summary(
    site_id: str, role: str, patients: EvaluatedPatients, bins: int, rules: SharingRules = SharingRules(),
    cutoffs: Mapping[str, Mapping[str, Any]] | None = None,
) -> SiteSummary:  # fmt: skip
    """Everything the site returns for the final analysis (see the module docstring); event tables only with the
    coordinator's `cutoffs`, subgroup tables only from an external (holdout) site."""
    y = np.asarray(patients.labels, dtype=int)
    k = rules.min_cell_count
    has_pfs = np.array([d is not None and e is not None for d, e in zip(patients.pfs_days, patients.pfs_event, strict=True)], dtype=bool)
    tables: dict[str, EventTable] = {}
    logrank: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]] = {}
    if cutoffs:
        t = np.array([float(d) if d is not None else math.nan for d in patients.pfs_days])[has_pfs]
        ev = np.array([int(e) if e is not None else 0 for e in patients.pfs_event])[has_pfs]
        with_pfs = {m: np.asarray(s)[has_pfs] for m, s in patients.scores.items()}
        for name, (group, names) in groupings(with_pfs, cutoffs, bins).items():
            tables[name] = event_table(t, ev, group, names, k)
            # The exact log-rank parts cover the groups the event table sends (a suppressed group stays out).
            logrank[name] = (t, ev, group, [g for g in range(len(names)) if (group == g).any() and g not in tables[name].suppressed])
    rows = None
    if rules.share_patient_level:
        if not rules.pseudonym_key:
            raise ValueError("patient-level sharing needs the site's pseudonym key")
        rows = PatientRows([pseudonym(p, rules.pseudonym_key) for p in patients.patient_ids], [int(v) for v in y],
                           {m: [float(v) for v in s] for m, s in patients.scores.items()},
                           [None if d is None else float(d) for d in patients.pfs_days],
                           [None if e is None else int(e) for e in patients.pfs_event])  # fmt: skip
    if k > 1 and 0 < len(y) < k:
        # Fewer patients than the minimum cell count: any table, even one cell, would describe fewer than k.
        empty = ScoreTable(int(bins), tuple(patients.scores), marginals={m: [] for m in patients.scores}, microaggregated=int(k))
        return SiteSummary(site_id, role, "patient-level" if rules.share_patient_level else "aggregate", int(k), len(y), int(y.sum()),
                           empty, int(has_pfs.sum()), patients=rows, withheld=True)  # fmt: skip
    subgroups = {}
    if role == "holdout":
        subgroups = {key: subgroup_table(key, levels, y, patients.scores, bins, k) for key, levels in patients.subgroups.items()}
    return SiteSummary(site_id, role, "patient-level" if rules.share_patient_level else "aggregate", int(k), len(y), int(y.sum()),
                       joint_score_table(y, patients.scores, bins, k), int(has_pfs.sum()),
                       {m: dict(c) for m, c in cutoffs.items()} if cutoffs else None, tables, rows, subgroups,
                       exact_statistics(y, patients.scores, logrank))  # fmt: skip
