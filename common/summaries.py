"""What a site returns for the final analysis, and the cut-offs the coordinator fixes on training data.

After training, every site summarises its evaluation set (internal-validation split at a training site, the whole
labelled cohort at a holdout site) in a `site_summary`:

* a **joint score table**: the class-conditional counts of patients per cell of a fixed grid over the models'
  predicted probabilities (one axis per model, ``bins`` bins per axis). Its one-model margins are the score
  histograms; its cells carry what the paired DeLong test needs. Only non-empty cells are sent.
* **event tables** for progression-free survival, per grouping of the patients (predicted responders vs
  non-responders, and risk groups, with cut-offs the coordinator fixed on the training sites): per group and
  distinct time, the number at risk, events and censorings. Kaplan-Meier, log-rank and Cox estimates computed
  from these are exactly those of the patient-level data.
* **patient-level rows**, only when the site's own configuration opts in (``share-patient-level``): pseudonymous
  id, label, scores, PFS. The pseudonym is a keyed hash whose key never leaves the site.

A site may require a minimum cell count ``k`` (``min-cell-count``). Its score table then holds one table per
model instead of the joint one (joint cells would single patients out): for each model the patients are sorted
by that model's score, grouped into runs of at least ``k`` and every patient of a run gets the run's mean score
(microaggregation), so each model's ranking is kept up to ties; the paired test cannot use such a site. Event-table
rows are merged with the following distinct times until each row holds at least ``k`` events plus censorings (a
merged row is reported at the latest time it covers); a survival group with fewer than ``k`` patients is
suppressed and named in the summary. docs/analysis.md quantifies the effect.

This module is numpy-only: the site builds summaries with it, the coordinator fixes cut-offs and checks incoming
summaries with it, and `tace.analysis` reads them.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tace.common.errors import TaceError

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


# -- the joint score table -------------------------------------------------------------------------------------
def joint_score_table(labels: np.ndarray, scores: Mapping[str, np.ndarray], bins: int, min_cell_count: int = 0) -> dict[str, Any]:
    """Class-conditional patient counts per joint grid cell of the models' scores.

    Returns ``{"bins", "models", "cells": [[bin_model_1, ..., bin_model_m, n_negative, n_positive], ...],
    "microaggregated": 0}``; cells are sorted, only non-empty cells are listed. With ``min_cell_count`` k > 1:
    ``{"bins", "models", "marginals": {model: [[bin, n_negative, n_positive], ...]}, "microaggregated": k}``.
    """
    models = list(scores)
    y = np.asarray(labels, dtype=int)
    k = int(min_cell_count)
    if k > 1:
        marginals = {}
        for m in models:
            bin_index(scores[m], bins, f"{m} scores in the score table")  # refused before averaging could hide them
            single = joint_score_table(y, {m: _microaggregate(np.asarray(scores[m], dtype=float), k)}, bins)
            marginals[m] = single["cells"]
        return {"bins": int(bins), "models": models, "marginals": marginals, "microaggregated": k}
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
    return {
        "bins": int(bins),
        "models": models,
        "cells": [[*key, neg, pos] for key, (neg, pos) in sorted(cells.items())],
        "microaggregated": k if k > 1 else 0,
    }


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


def table_margins(table: Mapping[str, Any], model: str) -> tuple[np.ndarray, np.ndarray]:
    """One model's class-conditional histograms (negatives, positives) from a joint score table."""
    bins = int(table["bins"])
    neg, pos = np.zeros(bins, dtype=np.int64), np.zeros(bins, dtype=np.int64)
    if "marginals" in table:
        for b, n, p in table["marginals"][model]:
            neg[int(b)] += int(n)
            pos[int(b)] += int(p)
        return neg, pos
    j = list(table["models"]).index(model)
    m = len(table["models"])
    for cell in table["cells"]:
        neg[int(cell[j])] += int(cell[m])
        pos[int(cell[j])] += int(cell[m + 1])
    return neg, pos


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


def fix_cutoffs(tables: Sequence[Mapping[str, Any]], risk_groups: int) -> dict[str, dict[str, Any]]:
    """Per model, from the training sites' pooled score tables: the Youden cut-off and the risk-group cuts."""
    if not tables:
        raise TaceError("no training-site score tables to fix cut-offs on")
    bins = int(tables[0]["bins"])
    out: dict[str, dict[str, Any]] = {}
    for model in tables[0]["models"]:
        neg = sum((table_margins(t, model)[0] for t in tables), np.zeros(bins, dtype=np.int64))
        pos = sum((table_margins(t, model)[1] for t in tables), np.zeros(bins, dtype=np.int64))
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
def event_table(times: np.ndarray, events: np.ndarray, groups: np.ndarray, n_groups: int, min_cell_count: int = 0) -> dict[str, Any]:
    """Rows ``[time, group, at_risk, events, censored]`` per group and distinct time (sorted by group, time).

    With ``min_cell_count`` k > 1 rows are merged forward until each holds k events + censorings, and groups of
    fewer than k patients are left out (listed under ``suppressed``).
    """
    t, e, g = np.asarray(times, dtype=float), np.asarray(events, dtype=int), np.asarray(groups, dtype=int)
    rows: list[list[float]] = []
    suppressed: list[int] = []
    k = int(min_cell_count)
    for group in range(n_groups):
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
    return {"rows": rows, "suppressed": suppressed, "merged": k if k > 1 else 0}


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


# -- the whole summary ----------------------------------------------------------------------------------------
def pseudonym(patient_id: str, key: bytes) -> str:
    """A keyed hash of the patient id: stable within a site, not reversible without the site's key."""
    return hmac.new(key, patient_id.encode(), hashlib.sha256).hexdigest()[:16]


def site_summary(
    *,
    site_id: str,
    role: str,
    patient_ids: Sequence[str],
    labels: np.ndarray,
    scores: Mapping[str, np.ndarray],
    pfs_days: Sequence[float | None],
    pfs_event: Sequence[int | None],
    bins: int,
    min_cell_count: int = 0,
    cutoffs: Mapping[str, Mapping[str, Any]] | None = None,
    share_patient_level: bool = False,
    pseudonym_key: bytes = b"",
) -> dict[str, Any]:
    """Everything the site returns for the final analysis (see the module docstring)."""
    y = np.asarray(labels, dtype=int)
    out: dict[str, Any] = {
        "version": SUMMARY_VERSION,
        "site_id": site_id,
        "role": role,
        "sharing": "patient-level" if share_patient_level else "aggregate",
        "min_cell_count": int(min_cell_count),
        "n": len(y),
        "n_pos": int(y.sum()),
        "scores": joint_score_table(y, scores, bins, min_cell_count),
    }
    has_pfs = np.array([d is not None and e is not None for d, e in zip(pfs_days, pfs_event, strict=True)], dtype=bool)
    out["n_with_pfs"] = int(has_pfs.sum())
    if cutoffs:
        t = np.array([float(d) if d is not None else math.nan for d in pfs_days])[has_pfs]
        ev = np.array([int(e) if e is not None else 0 for e in pfs_event])[has_pfs]
        tables = {}
        for name, (group, labels_) in groupings({m: np.asarray(s)[has_pfs] for m, s in scores.items()}, cutoffs, bins).items():
            tables[name] = {"groups": labels_, **event_table(t, ev, group, len(labels_), min_cell_count)}
        out["survival"] = {"cutoffs": {m: dict(c) for m, c in cutoffs.items()}, "tables": tables}
    if share_patient_level:
        if not pseudonym_key:
            raise ValueError("patient-level sharing needs the site's pseudonym key")
        out["patients"] = {
            "pseudonym": [pseudonym(p, pseudonym_key) for p in patient_ids],
            "label": [int(v) for v in y],
            "scores": {m: [float(v) for v in s] for m, s in scores.items()},
            "pfs_days": [None if d is None else float(d) for d in pfs_days],
            "pfs_event": [None if e is None else int(e) for e in pfs_event],
        }
    return out


def check_summary(summary: Any, site: str, models: Sequence[str]) -> dict[str, Any]:
    """Check a summary received from `site` before anything is computed from it; raise a clear error if malformed."""

    def bad(what: str) -> TaceError:
        return TaceError(f"site {site} sent a malformed analysis summary: {what}",
                         "the site may run another TACE-FL version; ask it to update, then rerun the final evaluation")  # fmt: skip

    if not isinstance(summary, dict):
        raise bad("not a mapping")
    if summary.get("version") != SUMMARY_VERSION:
        raise bad(f"summary version {summary.get('version')!r}, expected {SUMMARY_VERSION}")
    if summary.get("role") not in ("train", "holdout") or not isinstance(summary.get("site_id"), str):
        raise bad("no valid role or site id")
    if not isinstance(summary.get("n"), int) or not isinstance(summary.get("n_pos"), int):
        raise bad("no patient counts")
    table = summary.get("scores")
    if not isinstance(table, dict) or not isinstance(table.get("bins"), int):
        raise bad("no score table")
    missing = [m for m in models if m not in table.get("models", [])]
    if missing:
        raise bad(f"score table lacks model(s) {', '.join(missing)}")
    bins = table["bins"]
    if isinstance(table.get("marginals"), dict):
        parts = [(table["marginals"].get(m), 1) for m in table["models"]]
    elif isinstance(table.get("cells"), list):
        parts = [(table["cells"], len(table["models"]))]
    else:
        raise bad("no score table")
    for cells, m in parts:
        if not isinstance(cells, list):
            raise bad("a model's score table is missing")
        total = 0
        for cell in cells:
            if not isinstance(cell, list) or len(cell) != m + 2 or not all(isinstance(v, int) and v >= 0 for v in cell):
                raise bad("a score-table cell is not a list of non-negative integers of the right length")
            if any(v >= bins for v in cell[:m]):
                raise bad("a score-table cell lies outside the grid")
            total += cell[m] + cell[m + 1]
        if total != summary.get("n"):
            raise bad(f"the score table holds {total} patients but the summary says {summary.get('n')}")
        if sum(cell[m + 1] for cell in cells) != summary["n_pos"]:
            raise bad("the score table's responders do not add up to the summary's")
    for name, tab in summary.get("survival", {}).get("tables", {}).items():
        for row in tab.get("rows", []):
            if len(row) != 5 or not all(isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in row):
                raise bad(f"event table {name!r} has a row that is not five non-negative numbers")
            if not all(float(v).is_integer() for v in row[1:]):
                raise bad(f"event table {name!r} has a row whose counts are not whole numbers")
            if row[1] >= len(tab.get("groups", [])):
                raise bad(f"event table {name!r} names a group that does not exist")
    patients = summary.get("patients")
    if patients is not None:
        n = summary["n"]
        ok = isinstance(patients, dict) and all(
            isinstance(patients.get(k), list) and len(patients[k]) == n for k in ("pseudonym", "label", "pfs_days", "pfs_event")
        )
        scores = patients.get("scores") if isinstance(patients, dict) else None
        if not ok or not isinstance(scores, dict) or any(not isinstance(scores.get(m), list) or len(scores[m]) != n for m in models):
            raise bad("its patient-level rows do not match its patient count or models")
    return summary
