"""Discrimination from aggregates: class-conditional score histograms, and the AUC computed from them.

A site summarises its predicted probabilities as two histograms on a fixed grid over [0, 1] (responders,
non-responders); histograms of several sites add up, so a pooled AUC needs no patient-level data. Scores that
share a bin count as ties, so the histogram AUC differs from the exact one by at most half the share of
(positive, negative) pairs that share a bin, which is small at the default 1000 bins.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_BINS = 1000


def score_histograms(
    y_true: Sequence[float] | np.ndarray, y_score: Sequence[float] | np.ndarray, bins: int = DEFAULT_BINS
) -> tuple[list[int], list[int]]:
    """Counts of non-responders' and responders' scores per bin of [0, 1]: ``(negatives, positives)``."""
    y = np.asarray(y_true)
    s = np.clip(np.asarray(y_score, dtype=float), 0.0, 1.0)
    idx = np.minimum((s * bins).astype(int), bins - 1)
    neg = np.bincount(idx[y == 0], minlength=bins)
    pos = np.bincount(idx[y == 1], minlength=bins)
    return [int(v) for v in neg], [int(v) for v in pos]


def auc_from_histograms(negatives: Sequence[int] | np.ndarray, positives: Sequence[int] | np.ndarray) -> float | None:
    """Mann-Whitney AUC from binned scores (ties within a bin count one half); None if a class is absent."""
    neg = np.asarray(negatives, dtype=float)
    pos = np.asarray(positives, dtype=float)
    n_neg, n_pos = neg.sum(), pos.sum()
    if n_neg == 0 or n_pos == 0:
        return None
    neg_below = np.cumsum(neg) - neg  # negatives in strictly lower bins
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_neg * n_pos))


def auc(y_true: Sequence[float] | np.ndarray, y_score: Sequence[float] | np.ndarray) -> float | None:
    """Exact ROC AUC (scikit-learn), or None when only one class is present."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true)
    if len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, np.asarray(y_score, dtype=float)))
