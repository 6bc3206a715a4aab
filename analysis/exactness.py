"""What stays exact under the sites' minimum cell count, and what becomes approximate.

A site under a minimum cell count k sends score tables microaggregated to cells of at least k patients and event
tables whose rows hold at least k patients (`tace.common.summaries`), and beside them the statistics it computed
exactly on its own patients (`tace.common.exact`). Here those exact statistics replace the ones recomputed from the
coarsened tables: each site's AUC, DeLong CI and paired DeLong tests, its calibration intercept, slope, O/E and
Brier score, its log-rank test, and the log-rank test stratified by site (the sites' observed-minus-expected and
variances summed). The meta-analysis across centres then reads exact per-centre estimates. What only the tables
give (pooled unstratified statistics, ROC and calibration curves, threshold metrics, Kaplan-Meier curves, Cox
models) stays approximate; `exactness` lists which is which, with the AUC's error bound where there is one.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tace.analysis import calibration, discrimination
from tace.common import exact


def apply_validation(
    block: dict[str, Any], summary: dict[str, Any], models: tuple[str, ...], pairs: tuple[tuple[str, str], ...]
) -> list[str]:
    """Put the site's exact statistics into its validation `block` (from `tace.analysis.study.validate`; `pairs` are
    the paired tests it shows); returns the statistics replaced (nothing for a site of an older release)."""
    ex = summary.get("exact")
    if not ex:
        return []
    index = {m: i for i, m in enumerate(ex["models"])}
    replaced: list[str] = []
    dl = discrimination.DeLong(np.asarray(ex["aucs"], float), np.asarray(ex["cov"], float)) if ex.get("aucs") is not None else None
    for model in models:
        entry = block["models"].get(model)
        if entry is None or model not in index:
            continue
        if dl is not None:
            j = index[model]
            var = float(dl.cov[j, j])
            entry.update({"auc": float(dl.aucs[j]), "delong_se": math.sqrt(max(var, 0.0)), "grid_error_bound": 0.0})
            if var > 1e-15:
                entry["ci_low"], entry["ci_high"] = dl.ci(j)
                entry["ci_method"] = "DeLong"
            replaced.append(f"AUC and DeLong CI of {model}")
        fits = ex["calibration"].get(model)
        if fits:
            entry.setdefault("calibration", {}).update(calibration.recalibration_from(fits))
            entry["brier"] = float(fits["brier_sum"]) / max(int(fits["n"]), 1)
            replaced.append(f"calibration intercept, slope, O/E and Brier score of {model}")
    if dl is not None:
        for a, b in pairs:
            if a in models and b in models and a in index and b in index:
                z, p = dl.paired(index[a], index[b])
                previous = block["paired"].get(f"{a} vs {b}", {})
                block["paired"][f"{a} vs {b}"] = {**previous, "difference": float(dl.aucs[index[a]] - dl.aucs[index[b]]),
                                                  "z": None if not math.isfinite(z) else z, "p": p, "source": "the site's DeLong covariance"}  # fmt: skip
        replaced.append("paired DeLong tests")
    block["exact"] = replaced
    return replaced


def site_logrank(summary: dict[str, Any], grouping: str) -> dict[str, Any] | None:
    """The site's exact log-rank test of `grouping` from its observed-minus-expected and variance, or None."""
    part = ((summary.get("exact") or {}).get("survival") or {}).get(grouping)
    if not part or len(part["levels"]) < 2:
        return None
    return {
        **exact.logrank_test(np.asarray(part["o_minus_e"], float), np.asarray(part["var"], float)),
        "source": "the site (exact, over the groups it sent)",
    }


def stratified_logrank(summaries: list[dict[str, Any]], grouping: str, n_groups: int) -> dict[str, Any] | None:
    """The log-rank test stratified by site, exactly: the sites' parts summed group by group (a site without a group
    adds nothing for it, as in R's survdiff). None unless every site sent its parts for `grouping`."""
    parts = [((s.get("exact") or {}).get("survival") or {}).get(grouping) for s in summaries]
    if not parts or any(p is None for p in parts):
        return None
    o_minus_e, var = np.zeros(n_groups), np.zeros((n_groups, n_groups))
    for part in parts:
        assert part is not None
        idx = np.asarray(part["levels"], dtype=int)
        o_minus_e[idx] += np.asarray(part["o_minus_e"], float)
        var[np.ix_(idx, idx)] += np.asarray(part["var"], float)
    present = [g for g in range(n_groups) if any(g in p["levels"] for p in parts if p is not None)]
    if len(present) < 2:
        return None
    test = exact.logrank_test(o_minus_e[present], var[np.ix_(present, present)])
    return {**test, "source": "the sites' observed-minus-expected and variances, summed (exact over the groups they sent)"}


def exactness(validation: dict[str, Any] | None, survival: dict[str, Any] | None, min_cell_counts: dict[str, int]) -> list[dict[str, Any]]:
    """Which results are exact and which approximate, per population, with the AUC's bound from the released tables."""
    rows: list[dict[str, Any]] = []
    coarse = {site for site, k in min_cell_counts.items() if k > 1}
    how = "approximate: from tables coarsened to cells of at least k patients" if coarse else "exact: from full tables"
    if validation:
        for site, block in validation.get("sites", {}).items():
            done = block.get("exact", [])
            rows.append({"population": f"site {site}", "statistics": "AUC, DeLong CI, paired DeLong tests, calibration intercept, slope, "
                         "O/E, Brier score; the meta-analysis's inputs", "status": "exact: computed at the site" if done else how,
                         "bound": None})  # fmt: skip
        pooled = validation.get("pooled", {})
        bound = max((e.get("grid_error_bound") or 0.0 for e in pooled.get("models", {}).values()), default=None)
        rows.append({"population": "pooled external", "statistics": "AUC and its CI, paired tests, calibration, ROC and calibration "
                     "curves, threshold metrics, decision curves", "status": how if len(validation.get("sites", {})) > 1 else "as its site",
                     "bound": bound})  # fmt: skip
        rows.append({"population": "every site", "statistics": "ROC, grouped and flexible calibration curves, ICI/E50/E90/Emax, "
                     "threshold metrics at the Youden cut-off, subgroup performance", "status": how, "bound": None})  # fmt: skip
    if survival:
        stratified = any("source" in (g.get("pooled") or {}).get("stratified_logrank", {}) for g in survival.get("groupings", {}).values())
        rows.append({"population": "every site, and pooled stratified by site", "statistics": "log-rank test",
                     "status": "exact: from the sites' observed-minus-expected and variances" if stratified else how, "bound": None})  # fmt: skip
        rows.append({"population": "every site and pooled", "statistics": "Kaplan-Meier curves, numbers at risk, Cox hazard ratios, "
                     "C-index, the unstratified pooled log-rank test", "status": how.replace("cells", "event-table rows") if coarse else how,
                     "bound": None})  # fmt: skip
    return rows
