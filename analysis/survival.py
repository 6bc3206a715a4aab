"""Progression-free survival by predicted group: Kaplan-Meier, log-rank, Cox hazard ratio, C-index.

Kaplan-Meier (lifelines ``KaplanMeierFitter``, log(-log) Greenwood intervals), the log-rank test for two or more
groups (lifelines ``multivariate_logrank_test``, which equals R's ``survdiff``), Cox proportional hazards with
Efron ties (lifelines ``CoxPHFitter``) and Harrell's C-index (lifelines ``concordance_index``) come from
lifelines. The log-rank test stratified by site (sites pooled with their own baseline hazards), which lifelines
does not offer, is written here and checked against R's ``survdiff(... + strata(site))``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd

from tace.common import exact


def kaplan_meier(time: np.ndarray, event: np.ndarray, at: list[float] | None = None) -> dict[str, Any]:
    """Survival curve with 95 % CI, median PFS and the numbers at risk at the times `at`."""
    from lifelines import KaplanMeierFitter

    with warnings.catch_warnings(action="ignore"):  # lifelines/pandas notices; what matters is reported by us
        kmf = KaplanMeierFitter().fit(np.asarray(time, dtype=float), np.asarray(event, dtype=int))
        sf = kmf.survival_function_.iloc[:, 0]
        ci = kmf.confidence_interval_survival_function_
        median = kmf.median_survival_time_
    t = np.asarray(time, dtype=float)
    return {
        "time": sf.index.to_numpy(dtype=float).tolist(),
        "survival": sf.to_numpy(dtype=float).tolist(),
        "low": ci.iloc[:, 0].to_numpy(dtype=float).tolist(),
        "high": ci.iloc[:, 1].to_numpy(dtype=float).tolist(),
        "median": None if not math.isfinite(float(median)) else float(median),
        "n": len(t),
        "events": int(np.asarray(event, dtype=int).sum()),
        "at_risk": {str(a): int((t >= a).sum()) for a in (at or [])},
    }


def logrank(time: np.ndarray, event: np.ndarray, group: np.ndarray) -> dict[str, float | int]:
    """Log-rank test of equal survival across the groups present: chi-square statistic, df, p."""
    from lifelines.statistics import multivariate_logrank_test

    with warnings.catch_warnings(action="ignore"):
        res = multivariate_logrank_test(np.asarray(time, dtype=float), np.asarray(group), np.asarray(event, dtype=int))
    return {"statistic": float(res.test_statistic), "df": int(res.degrees_of_freedom), "p": float(res.p_value)}


def stratified_logrank(time: np.ndarray, event: np.ndarray, group: np.ndarray, strata: np.ndarray) -> dict[str, float | int]:
    """Log-rank test with the observed-minus-expected and its covariance summed over strata (as R's survdiff)."""
    t, e, g, st = np.asarray(time, float), np.asarray(event, int), np.asarray(group), np.asarray(strata)
    levels = [int(v) for v in np.unique(g)]
    o_minus_e, var = np.zeros(len(levels)), np.zeros((len(levels), len(levels)))
    for s in np.unique(st):
        m = st == s
        part = exact.logrank_parts(t[m], e[m], g[m], levels)  # a site computes its own part the same way
        o_minus_e, var = o_minus_e + part[0], var + part[1]
    return exact.logrank_test(o_minus_e, var)


def cox_groups(time: np.ndarray, event: np.ndarray, group: np.ndarray, names: list[str], reference: int = 0) -> dict[str, Any]:
    """Cox model (Efron ties) of PFS on group indicators against the `reference` group: HR, 95 % CI, Wald p."""
    from lifelines import CoxPHFitter

    g = np.asarray(group, dtype=int)
    present = [lv for lv in sorted(set(g.tolist())) if lv != reference]
    if reference not in set(g.tolist()) or not present:
        return {"error": "needs patients in the reference group and in at least one other group"}
    df = pd.DataFrame({"duration": np.asarray(time, dtype=float), "observed": np.asarray(event, dtype=int)})
    for lv in present:
        df[f"g{lv}"] = (g == lv).astype(float)
    try:
        with warnings.catch_warnings(action="ignore"):
            cph = CoxPHFitter().fit(df, duration_col="duration", event_col="observed")
    except Exception as exc:  # noqa: BLE001 - lifelines raises ConvergenceError and LinAlgError alike
        return {"error": f"the Cox model did not converge ({type(exc).__name__}); a group may have no events"}
    s = cph.summary
    if not (np.isfinite(s["se(coef)"]).all() and (s["se(coef)"] < 5).all()):
        # A group without events (or with all of them) drives its coefficient to infinity.
        return {"error": "a group has no progression events (or all of them), so its hazard ratio is unbounded"}
    out: dict[str, Any] = {"reference": names[reference], "hazard_ratios": {}}
    for lv in present:
        row = s.loc[f"g{lv}"]
        out["hazard_ratios"][names[lv]] = {
            "hr": float(row["exp(coef)"]),
            "low": float(row["exp(coef) lower 95%"]),
            "high": float(row["exp(coef) upper 95%"]),
            "p": float(row["p"]),
            "coef": float(row["coef"]),
            "se": float(row["se(coef)"]),
        }
    return out


def c_index(time: np.ndarray, event: np.ndarray, predicted_survival: np.ndarray) -> float:
    """Harrell's C: how often the patient predicted to do better (higher value) progresses later."""
    from lifelines.utils import concordance_index

    return float(
        concordance_index(np.asarray(time, dtype=float), np.asarray(predicted_survival, dtype=float), np.asarray(event, dtype=int))
    )
