"""Calibration and clinical usefulness: calibration curves (grouped and flexible), calibration intercept and slope,
O/E, ICI/E50/E90, Brier score, Hosmer-Lemeshow test, decision curves.

Risk groups for the calibration curve and the Hosmer-Lemeshow test are the deciles of predicted probability;
patients with the same predicted probability always share a group (so grid-binned and exact scores group alike).
The Hosmer-Lemeshow statistic has g - 2 degrees of freedom, as in R's ResourceSelection::hoslem.test.
Net benefit follows Vickers & Elkin (2006): TP/n - FP/n * pt / (1 - pt) for treating when p >= pt.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import special, stats

from tace.analysis.discrimination import Z95, proportion
from tace.common.exact import EPS, calibration_fits, logistic_fit, logit


def risk_groups(p: np.ndarray, groups: int = 10) -> np.ndarray:
    """Decile group of each prediction (ties share a group)."""
    p = np.asarray(p, dtype=float)
    ranks = stats.rankdata(p, method="min") - 1  # patients with a strictly lower prediction
    return np.minimum((ranks * groups) // max(len(p), 1), groups - 1).astype(int)


def calibration_curve(y: np.ndarray, p: np.ndarray, groups: int = 10) -> list[dict[str, float | int | None]]:
    """Per risk group: mean predicted probability, observed response rate with its Wilson CI, n."""
    y, p = np.asarray(y, dtype=int), np.asarray(p, dtype=float)
    g = risk_groups(p, groups)
    out = []
    for k in np.unique(g):
        m = g == k
        obs = proportion(int(y[m].sum()), int(m.sum()))
        out.append({"group": int(k), "n": int(m.sum()), "predicted": float(p[m].mean()), "observed": obs["value"],
                    "observed_low": obs["low"], "observed_high": obs["high"]})  # fmt: skip
    return out


def brier(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import brier_score_loss

    return float(brier_score_loss(np.asarray(y, dtype=int), np.asarray(p, dtype=float)))


def hosmer_lemeshow(y: np.ndarray, p: np.ndarray, groups: int = 10) -> dict[str, float | int]:
    """Hosmer-Lemeshow goodness-of-fit: statistic, degrees of freedom (groups - 2) and p-value."""
    y, p = np.asarray(y, dtype=int), np.asarray(p, dtype=float)
    g = risk_groups(p, groups)
    h = 0.0
    used = 0
    for k in np.unique(g):
        m = g == k
        n, obs, exp = int(m.sum()), float(y[m].sum()), float(p[m].sum())
        if n == 0 or exp <= 0 or exp >= n:
            continue
        h += (obs - exp) ** 2 / (exp * (1 - exp / n))
        used += 1
    df = max(used - 2, 1)
    return {"statistic": h, "df": df, "p": float(stats.chi2.sf(h, df)), "groups": used}


def decision_curve(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray | None = None) -> dict[str, list[float]]:
    """Net benefit of the model, of treating all and of treating none over threshold probabilities."""
    y, p = np.asarray(y, dtype=int), np.asarray(p, dtype=float)
    pts = np.round(np.arange(0.01, 1.0, 0.01), 2) if thresholds is None else np.asarray(thresholds, dtype=float)
    n = len(y)
    prev = y.mean() if n else 0.0
    model, treat_all = [], []
    for pt in pts:
        w = pt / (1 - pt)
        treat = p >= pt
        tp = float((treat & (y == 1)).sum())
        fp = float((treat & (y == 0)).sum())
        model.append(tp / n - fp / n * w)
        treat_all.append(prev - (1 - prev) * w)
    return {"threshold": pts.tolist(), "model": model, "treat_all": treat_all, "treat_none": [0.0] * len(pts)}


# -- calibration a clinician can act on: recalibration, O/E, the flexible curve -----------------------------------
#: Predictions are clipped to [EPS, 1 - EPS] (`tace.common.exact`) before the logit (a score of exactly 0 or 1 has no
#: logit). The score grid's outermost cell centres (5e-6 at the default 100,000 cells) lie inside, so grid-binned
#: scores are unchanged.
#: Knots of the flexible calibration curve: Harrell's default quantiles for a 3-knot restricted cubic spline.
SPLINE_QUANTILES = (0.10, 0.50, 0.90)


#: The logistic fits (statsmodels GLM, `logistic_fit`) and the logit are the site's own (`tace.common.exact`): one
#: computation for patient-level rows here and for a site's exact statistics.


def _wald(value: float, se: float) -> dict[str, float]:
    """An estimate with its standard error and 95 % Wald interval (R's ``confint.default``)."""
    return {"value": value, "se": se, "low": value - Z95 * se, "high": value + Z95 * se}


def recalibration(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """Calibration-in-the-large, calibration slope and the observed/expected ratio, each with its 95 % CI.

    * **Calibration intercept** (calibration-in-the-large): the intercept of ``logit P(y=1) = a + lp`` (the model's
      linear predictor lp as an offset); 0 when predictions are right on average (Van Calster et al. 2016, 2019).
    * **Calibration slope**: b of ``logit P(y=1) = a + b lp`` (Cox 1958); < 1 means predictions too extreme.
    * **O/E**: observed events / sum of predicted probabilities, 95 % CI exp(log(O/E) ± 1.96 sqrt(1/O - 1/N))
      (Debray et al. 2017).

    Wald intervals, as R's ``confint.default(glm(...))``; an estimate that does not exist (one class, perfect
    separation, no event) is None.
    """
    return recalibration_from(calibration_fits(y, p))


def recalibration_from(fits: dict[str, Any]) -> dict[str, Any]:
    """`recalibration`'s result from the fits and sums of `tace.common.exact.calibration_fits` (which a site also
    computes on its own patients and sends)."""
    n, observed, expected = int(fits["n"]), int(fits["observed"]), float(fits["expected"])
    out: dict[str, Any] = {"n": n, "observed": observed, "expected": expected, "intercept": None, "slope": None, "oe": None}
    for key in ("intercept", "slope"):
        if fits.get(key) is not None:
            out[key] = _wald(float(fits[key][0]), float(fits[key][1]))
    if 0 < observed < n:
        ratio, se = observed / expected, math.sqrt(1 / observed - 1 / n)
        out["oe"] = {"value": ratio, "se_log": se, "low": ratio * math.exp(-Z95 * se), "high": ratio * math.exp(Z95 * se)}
    return out


def rcs_basis(x: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Restricted cubic spline basis (Harrell; rms ``rcs``/``rcspline.eval``, norm = 2): x and k - 2 nonlinear terms,
    linear beyond the outer knots. (n,) -> (n, k - 1)."""
    x, t = np.asarray(x, dtype=float), np.asarray(knots, dtype=float)
    k = len(t)
    scale = (t[-1] - t[0]) ** 2

    def cube(v: np.ndarray) -> np.ndarray:
        return np.maximum(v, 0.0) ** 3

    columns = [x]
    for j in range(k - 2):
        columns.append((cube(x - t[j]) - cube(x - t[-2]) * (t[-1] - t[j]) / (t[-1] - t[-2])
                        + cube(x - t[-1]) * (t[-2] - t[j]) / (t[-1] - t[-2])) / scale)  # fmt: skip
    return np.column_stack(columns)


def flexible_calibration(y: np.ndarray, p: np.ndarray, at: np.ndarray | None = None) -> dict[str, Any] | None:
    """The flexible calibration curve: logistic regression of the outcome on a restricted cubic spline of the model's
    linear predictor (3 knots at its 10th, 50th and 90th percentiles), with a pointwise 95 % band, and the
    calibration error it implies for the patients (Austin & Steyerberg 2019): ICI (mean |calibrated - predicted|),
    E50 (median), E90 (90th percentile) and Emax.

    `at` are the predicted probabilities the curve is given at (default: 101 points over the observed range).
    Falls back to the straight recalibration line when the predictions take too few distinct values for a spline
    (``kind = "linear"``); None when no curve can be fitted (one class, separation).
    """
    y, p = np.asarray(y, dtype=int), np.clip(np.asarray(p, dtype=float), EPS, 1 - EPS)
    lp = logit(p)
    knots = np.quantile(lp, SPLINE_QUANTILES)
    fit = None
    for kind in ("spline", "linear"):
        if kind == "spline" and (len(np.unique(lp)) < 2 * len(knots) or not np.all(np.diff(knots) > 1e-8)):
            continue

        def design(v: np.ndarray, kind: str = kind) -> np.ndarray:
            return np.column_stack([np.ones(len(v)), rcs_basis(v, knots) if kind == "spline" else v])

        fit = logistic_fit(y, design(lp))
        if fit is not None:
            break
    if fit is None:
        return None
    params, cov = fit
    fitted = special.expit(design(lp) @ params)  # no overflow for the extreme linear predictors of a coarse table
    error = np.abs(fitted - p)
    grid = np.linspace(p.min(), p.max(), 101) if at is None else np.clip(np.asarray(at, dtype=float), EPS, 1 - EPS)
    x = design(logit(grid))
    eta = x @ params
    se = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", x, cov, x), 0.0))

    def expit(v: np.ndarray) -> list[float]:
        return [float(x) for x in special.expit(v)]

    return {
        "kind": kind, "knots": knots.tolist() if kind == "spline" else [],
        "ici": float(error.mean()), "e50": float(np.median(error)), "e90": float(np.quantile(error, 0.9)), "emax": float(error.max()),
        "curve": {"predicted": grid.tolist(), "observed": expit(eta), "low": expit(eta - Z95 * se), "high": expit(eta + Z95 * se)},
    }  # fmt: skip
