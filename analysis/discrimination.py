"""Discrimination: AUC with DeLong confidence intervals, the paired DeLong test, stratified bootstrap, ROC bands,
and threshold metrics at a fixed cut-off.

DeLong's variance is computed from the structural components (placement values) of the positives and negatives,
with mid-ranks for ties (Sun & Xu's fast algorithm); it equals pROC's ``var(roc, method = "delong")`` and
``roc.test(..., method = "delong", paired = TRUE)`` (tests compare with recorded R values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from tace.common import exact

Z95 = float(stats.norm.ppf(0.975))


@dataclass
class DeLong:
    aucs: np.ndarray  # (m,)
    cov: np.ndarray  # (m, m)

    def ci(self, j: int = 0) -> tuple[float, float]:
        """95 % CI of model j's AUC (normal approximation, clipped to [0, 1] as pROC does)."""
        half = Z95 * math.sqrt(max(float(self.cov[j, j]), 0.0))
        return max(0.0, float(self.aucs[j]) - half), min(1.0, float(self.aucs[j]) + half)

    def paired(self, a: int, b: int) -> tuple[float, float]:
        """DeLong's test of AUC_a = AUC_b on the same patients: (z, two-sided p); z is nan when both agree on every pair."""
        var = float(self.cov[a, a] + self.cov[b, b] - 2 * self.cov[a, b])
        diff = float(self.aucs[a] - self.aucs[b])
        if var <= 1e-15:
            return (math.nan, 1.0) if abs(diff) < 1e-12 else (math.copysign(math.inf, diff), 0.0)
        z = diff / math.sqrt(var)
        return z, float(2 * stats.norm.sf(abs(z)))


def delong(labels: np.ndarray, scores: np.ndarray) -> DeLong:
    """AUCs and their DeLong covariance for the score columns of `scores` (n, m) on the same patients (the
    computation a site runs on its own patients: `tace.common.exact.delong`)."""
    return DeLong(*exact.delong(labels, scores))


def _auc_batch(pos_w: np.ndarray, neg_w: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC of weighted tie groups ordered by score: ``pos_w``/``neg_w`` are (reps, groups)."""
    neg_below = np.cumsum(neg_w, axis=1) - neg_w
    num = (pos_w * (neg_below + 0.5 * neg_w)).sum(axis=1)
    den = pos_w.sum(axis=1) * neg_w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def bootstrap_aucs(labels: np.ndarray, scores: np.ndarray, strata: np.ndarray, reps: int = 2000, seed: int = 0) -> np.ndarray:
    """AUCs of each score column in `reps` bootstrap resamples stratified by class and `strata` (e.g. site).

    Returns (reps, m). Patients are resampled with replacement within each (stratum, class) cell, so every
    resample keeps each site's numbers of responders and non-responders.
    """
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    if s.ndim == 1:
        s = s[:, None]
    counts = bootstrap_counts(y, strata, reps, seed)
    out = np.empty((reps, s.shape[1]))
    for j in range(s.shape[1]):
        pos_w, neg_w, _ = _tie_groups(y, s[:, j], counts)
        out[:, j] = _auc_batch(pos_w, neg_w)
    return out


def bootstrap_counts(labels: np.ndarray, strata: np.ndarray, reps: int, seed: int) -> np.ndarray:
    """How often each patient is drawn in each of `reps` resamples stratified by (stratum, class): (reps, n)."""
    y = np.asarray(labels, dtype=int)
    strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    counts = np.zeros((reps, len(y)))
    for stratum in np.unique(strata):
        for cls in (0, 1):
            idx = np.flatnonzero((strata == stratum) & (y == cls))
            if len(idx):
                draws = rng.integers(0, len(idx), size=(reps, len(idx)))
                np.add.at(counts, (np.arange(reps)[:, None], idx[draws]), 1)
    return counts


def _tie_groups(y: np.ndarray, s: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per resample, the drawn positives and negatives at each distinct score (ascending): (reps, k) twice, scores."""
    uniq, inv = np.unique(s, return_inverse=True)
    pos_w = np.zeros((counts.shape[0], len(uniq)))
    neg_w = np.zeros((counts.shape[0], len(uniq)))
    np.add.at(pos_w.T, inv[y == 1], counts[:, y == 1].T)
    np.add.at(neg_w.T, inv[y == 0], counts[:, y == 0].T)
    return pos_w, neg_w, uniq


def percentile_ci(values: np.ndarray) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return math.nan, math.nan
    lo, hi = np.percentile(v, [2.5, 97.5])
    return float(lo), float(hi)


def roc_band(
    labels: np.ndarray, scores: np.ndarray, strata: np.ndarray, reps: int = 500, seed: int = 0, grid: int = 101
) -> dict[str, list[float]]:
    """The ROC curve and a 95 % pointwise bootstrap band of sensitivity over a grid of false-positive rates."""
    from sklearn.metrics import roc_curve

    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    fpr, tpr, _ = roc_curve(y, s)
    xs = np.linspace(0, 1, grid)
    pos_w, neg_w, _ = _tie_groups(y, s, bootstrap_counts(y, strata, reps, seed))
    # Thresholds from the highest score down: cumulative shares of positives (TPR) and negatives (FPR).
    tps = np.concatenate([np.zeros((reps, 1)), np.cumsum(pos_w[:, ::-1], axis=1)], axis=1)
    fps = np.concatenate([np.zeros((reps, 1)), np.cumsum(neg_w[:, ::-1], axis=1)], axis=1)
    tps /= tps[:, -1:]
    fps /= fps[:, -1:]
    curves = np.array([np.interp(xs, f, t) for f, t in zip(fps, tps, strict=True)])
    lo, hi = np.percentile(curves, [2.5, 97.5], axis=0)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "band_fpr": xs.tolist(), "band_low": lo.tolist(), "band_high": hi.tolist()}


def proportion(k: int, n: int) -> dict[str, float | int | None]:
    """A proportion with its 95 % Wilson score interval (scipy)."""
    if n == 0:
        return {"value": None, "low": None, "high": None, "k": 0, "n": 0}
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
    return {"value": k / n, "low": float(ci.low), "high": float(ci.high), "k": int(k), "n": int(n)}


def threshold_metrics(labels: np.ndarray, predicted: np.ndarray) -> dict[str, dict[str, float | int | None]]:
    """Accuracy, sensitivity, specificity, PPV and NPV of binary predictions, each with a Wilson 95 % CI."""
    y = np.asarray(labels, dtype=int)
    p = np.asarray(predicted, dtype=int)
    tp, tn = int(((p == 1) & (y == 1)).sum()), int(((p == 0) & (y == 0)).sum())
    fp, fn = int(((p == 1) & (y == 0)).sum()), int(((p == 0) & (y == 1)).sum())
    return {
        "accuracy": proportion(tp + tn, len(y)),
        "sensitivity": proportion(tp, tp + fn),
        "specificity": proportion(tn, tn + fp),
        "ppv": proportion(tp, tp + fp),
        "npv": proportion(tn, tn + fn),
    }


def grid_error_bound(labels: np.ndarray, scores: np.ndarray, bins: int) -> float:
    """Largest possible |AUC(grid) - AUC(exact)|: half the share of (responder, non-responder) pairs in one cell."""
    y = np.asarray(labels, dtype=int)
    b = np.minimum((np.clip(np.asarray(scores, dtype=float), 0, 1) * bins).astype(int), bins - 1)
    pos = np.bincount(b[y == 1], minlength=bins).astype(float)
    neg = np.bincount(b[y == 0], minlength=bins).astype(float)
    den = pos.sum() * neg.sum()
    return float(0.5 * (pos * neg).sum() / den) if den else math.nan
