"""Statistics a site computes exactly on its own patients and sends instead of patient rows.

Under a minimum cell count (`tace.common.summaries`) the score and event tables a site sends are coarsened, so
statistics recomputed from them are approximate. What a site can summarise exactly without rows it computes here:

* per model its **AUC and DeLong covariance** (placement values with mid-ranks, Sun & Xu), between models too, so
  the site's CIs and paired DeLong tests are exact;
* per model its **calibration**: observed and expected events, the Brier sum, and the logistic recalibration fits
  (calibration-in-the-large with the linear predictor as offset; the calibration slope) with their standard errors;
* per survival grouping the **log-rank observed-minus-expected and its covariance** (per group), which the
  coordinator sums over sites for the log-rank test stratified by site, exactly as R's ``survdiff(... + strata)``.

The analysis (`tace.analysis`) computes the same statistics on patient-level rows with these same functions, so a
site's number and the patient-level one are one computation. Each is an aggregate over the site's whole
evaluation set (or a survival group of at least the minimum cell count); nothing here is per patient.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Predictions are clipped to [EPS, 1 - EPS] before the logit (a score of exactly 0 or 1 has no logit).
EPS = 1e-6


def delong(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs (m,) and their DeLong covariance (m, m) for the score columns of `scores` (n, m) on the same patients."""
    from scipy import stats

    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    if s.ndim == 1:
        s = s[:, None]
    pos, neg = s[y == 1], s[y == 0]
    n_pos, n_neg = len(pos), len(neg)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("both classes are needed for an AUC")
    m = s.shape[1]
    v10 = np.empty((m, n_pos))
    v01 = np.empty((m, n_neg))
    for j in range(m):
        rz = stats.rankdata(np.concatenate([pos[:, j], neg[:, j]]))
        rx = stats.rankdata(pos[:, j])
        ry = stats.rankdata(neg[:, j])
        v10[j] = (rz[:n_pos] - rx) / n_neg
        v01[j] = 1.0 - (rz[n_pos:] - ry) / n_pos
    aucs = v10.mean(axis=1)
    s10 = np.atleast_2d(np.cov(v10)) if n_pos > 1 else np.zeros((m, m))
    s01 = np.atleast_2d(np.cov(v01)) if n_neg > 1 else np.zeros((m, m))
    return aucs, s10 / n_pos + s01 / n_neg


def logit(p: np.ndarray) -> np.ndarray:
    """The model's linear predictor log(p / (1 - p)), predictions clipped to [EPS, 1 - EPS]."""
    q = np.clip(np.asarray(p, dtype=float), EPS, 1 - EPS)
    return np.log(q / (1 - q))


def logistic_fit(y: np.ndarray, x: np.ndarray, offset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Logistic regression of `y` on the columns of `x` (with an intercept column in `x`): coefficients and their
    covariance, or None when the fit does not exist (one class, perfect separation, no convergence)."""
    import warnings

    from statsmodels.genmod import families
    from statsmodels.genmod.generalized_linear_model import GLM
    from statsmodels.tools.sm_exceptions import ConvergenceWarning, PerfectSeparationWarning, SingularMatrixWarning

    if len(np.unique(y)) < 2 or len(y) <= x.shape[1]:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # overflow or division by zero: no usable fit
        warnings.simplefilter("error", PerfectSeparationWarning)
        warnings.simplefilter("error", ConvergenceWarning)
        warnings.simplefilter("error", SingularMatrixWarning)
        try:
            fit = GLM(y, x, family=families.Binomial(), offset=offset).fit(tol=1e-12, maxiter=200)
        except (RuntimeWarning, PerfectSeparationWarning, ConvergenceWarning, SingularMatrixWarning, np.linalg.LinAlgError, ValueError):
            return None
    params, cov = np.asarray(fit.params, dtype=float), np.asarray(fit.cov_params(), dtype=float)
    if not (np.isfinite(params).all() and np.isfinite(cov).all()):
        return None
    return params, cov


def calibration_fits(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """Observed and expected events, the Brier sum, and the recalibration fits of one model's predictions:
    ``intercept`` (of ``logit P(y) = a + lp``, lp as offset) and ``slope`` (b of ``a + b lp``), each ``[value, se]``
    or None when the fit does not exist."""
    y, p = np.asarray(labels, dtype=int), np.asarray(scores, dtype=float)
    lp, n = logit(p), len(y)
    out: dict[str, Any] = {"n": n, "observed": int(y.sum()), "expected": float(np.clip(p, EPS, 1 - EPS).sum()),
                           "brier_sum": float(((p - y) ** 2).sum()), "intercept": None, "slope": None}  # fmt: skip
    citl = logistic_fit(y, np.ones((n, 1)), offset=lp)
    if citl is not None:
        out["intercept"] = [float(citl[0][0]), math.sqrt(float(citl[1][0, 0]))]
    slope = logistic_fit(y, np.column_stack([np.ones(n), lp]))
    if slope is not None:
        out["slope"] = [float(slope[0][1]), math.sqrt(float(slope[1][1, 1]))]
    return out


def logrank_parts(time: np.ndarray, event: np.ndarray, group: np.ndarray, levels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Observed minus expected events per group of `levels` and their covariance (the log-rank test's parts, as
    R's survdiff; summed over strata they give the stratified test)."""
    t, e, g = np.asarray(time, float), np.asarray(event, int), np.asarray(group)
    k = len(levels)
    o_minus_e = np.zeros(k)
    var = np.zeros((k, k))
    for u in np.unique(t[e == 1]):
        at_risk = t >= u
        n = at_risk.sum()
        d = ((t == u) & (e == 1)).sum()
        n_g = np.array([(at_risk & (g == lv)).sum() for lv in levels], dtype=float)
        d_g = np.array([((t == u) & (e == 1) & (g == lv)).sum() for lv in levels], dtype=float)
        o_minus_e += d_g - d * n_g / n
        if n > 1:
            frac = n_g / n
            var += d * (n - d) / (n - 1) * (np.diag(frac) - np.outer(frac, frac))
    return o_minus_e, var


def logrank_test(o_minus_e: np.ndarray, var: np.ndarray) -> dict[str, float | int]:
    """The log-rank chi-square test from its parts (`logrank_parts`, summed over strata when stratified)."""
    from scipy import stats

    k = len(o_minus_e)
    if k < 2:
        return {"statistic": math.nan, "df": 0, "p": math.nan}
    stat = float(o_minus_e[:-1] @ np.linalg.pinv(var[:-1, :-1]) @ o_minus_e[:-1])
    return {"statistic": stat, "df": k - 1, "p": float(stats.chi2.sf(stat, k - 1))}


@dataclass(frozen=True)
class ExactStatistics:
    """What a site computed exactly (see the module docstring). `models` orders `aucs` and `cov` (None when the
    evaluation set lacks a class); `calibration` per model (`calibration_fits`); `survival` per grouping: the groups
    it covers (``levels``, indices into the grouping's names: those with at least the minimum cell count), their
    patients ``n``, ``observed`` events, ``o_minus_e`` and ``var``."""

    models: tuple[str, ...]
    aucs: list[float] | None
    cov: list[list[float]] | None
    calibration: dict[str, dict[str, Any]]
    survival: dict[str, dict[str, Any]] = field(default_factory=dict)

    def encode(self) -> dict[str, Any]:
        return {"models": list(self.models), "aucs": self.aucs, "cov": self.cov, "calibration": self.calibration, "survival": self.survival}

    @classmethod
    def decode(cls, data: Any, fail: Any) -> ExactStatistics:
        """Check what a site sent; `fail(what)` returns the error to raise."""
        if not isinstance(data, dict) or not isinstance(data.get("models"), list):
            raise fail("its exact statistics are not a mapping of models")
        models = tuple(str(m) for m in data["models"])
        m = len(models)
        aucs, cov = data.get("aucs"), data.get("cov")
        if aucs is not None and (
            not isinstance(aucs, list) or len(aucs) != m or not all(isinstance(v, int | float) and 0 <= v <= 1 for v in aucs)
        ):
            raise fail("its exact AUCs are not one probability per model")
        if cov is not None and (not isinstance(cov, list) or np.asarray(cov, dtype=float).shape != (m, m)):
            raise fail("its DeLong covariance is not a square matrix over its models")
        calibration = data.get("calibration") or {}
        if not isinstance(calibration, dict) or set(calibration) - set(models):
            raise fail("its calibration sums name models it did not list")
        survival = data.get("survival") or {}
        for name, part in survival.items():
            levels = part.get("levels") if isinstance(part, dict) else None
            k = len(levels) if isinstance(levels, list) else -1
            if k < 0 or len(part.get("o_minus_e", [])) != k or np.asarray(part.get("var", []), dtype=float).shape != (k, k):
                raise fail(f"its log-rank parts for {name!r} do not match its groups")
        return cls(models, aucs, cov, dict(calibration), dict(survival))


def exact_statistics(
    labels: np.ndarray, scores: Mapping[str, np.ndarray], survival: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]]
) -> ExactStatistics:
    """A site's exact statistics: `scores` per model on the patients of `labels`; `survival` per grouping the
    (time, event, group) of the patients with PFS and the groups to cover."""
    y = np.asarray(labels, dtype=int)
    models = tuple(scores)
    aucs = cov = None
    if 0 < y.sum() < len(y) and models:
        a, c = delong(y, np.column_stack([np.asarray(scores[m], dtype=float) for m in models]))
        aucs, cov = [float(v) for v in a], [[float(v) for v in row] for row in c]
    calibration = {m: calibration_fits(y, np.asarray(scores[m], dtype=float)) for m in models}
    parts = {}
    for name, (t, e, g, levels) in survival.items():
        if len(levels) and int(np.asarray(e).sum()):
            o_minus_e, var = logrank_parts(t, e, g, levels)
            g = np.asarray(g)
            parts[name] = {"levels": [int(v) for v in levels], "n": [int((g == lv).sum()) for lv in levels],
                           "observed": [int(np.asarray(e)[g == lv].sum()) for lv in levels],
                           "o_minus_e": [float(v) for v in o_minus_e], "var": [[float(v) for v in row] for row in var]}  # fmt: skip
    return ExactStatistics(models, aucs, cov, calibration, parts)
