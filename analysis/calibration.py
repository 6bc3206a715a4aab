"""Calibration and clinical usefulness: calibration curve, Brier score, Hosmer-Lemeshow test, decision curves.

Risk groups for the calibration curve and the Hosmer-Lemeshow test are the deciles of predicted probability;
patients with the same predicted probability always share a group (so grid-binned and exact scores group alike).
The Hosmer-Lemeshow statistic has g - 2 degrees of freedom, as in R's ResourceSelection::hoslem.test.
Net benefit follows Vickers & Elkin (2006): TP/n - FP/n * pt / (1 - pt) for treating when p >= pt.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from tace.analysis.discrimination import proportion


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
