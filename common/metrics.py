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


def logit_moments(negatives: Sequence[int] | np.ndarray, positives: Sequence[int] | np.ndarray) -> tuple[float, float] | None:
    """Mean and standard deviation of the logit of the scores that histograms over [0, 1] summarise (each patient
    at its bin's centre; a merged cell's patients at its lowest bin); None for fewer than two patients. The standard
    deviation is at least two bins' width in logit at 0.5 (8 / bins): the histograms resolve no less."""
    counts = np.asarray(negatives, dtype=float) + np.asarray(positives, dtype=float)
    n = float(counts.sum())
    if n < 2:
        return None
    centres = (np.arange(len(counts)) + 0.5) / len(counts)
    z = np.log(centres / (1.0 - centres))
    mean = float((counts * z).sum() / n)
    return mean, max(float(np.sqrt((counts * (z - mean) ** 2).sum() / (n - 1))), 8.0 / len(counts))


def merge_small_cells(negatives: Sequence[int], positives: Sequence[int], min_count: int) -> tuple[list[int], list[int]]:
    """Merge adjacent bins until every non-empty cell holds at least `min_count` patients (both classes together).

    A merged cell's counts are placed in its lowest bin, so the result keeps the grid and still adds up across
    sites; patients of one cell become ties, which widens the AUC's error by the share of pairs they form.
    Histograms of fewer than `min_count` patients in all are withheld (all zeros: any cell would describe fewer).
    `min_count` <= 1 returns the histograms unchanged.
    """
    neg, pos = [int(v) for v in negatives], [int(v) for v in positives]
    if min_count <= 1:
        return neg, pos
    if sum(neg) + sum(pos) < min_count:
        return [0] * len(neg), [0] * len(pos)
    out_neg, out_pos = [0] * len(neg), [0] * len(pos)
    start, acc_n, acc_p = 0, 0, 0
    groups: list[tuple[int, int, int]] = []
    for i, (n, p) in enumerate(zip(neg, pos, strict=True)):
        if acc_n + acc_p == 0:
            start = i
        acc_n, acc_p = acc_n + n, acc_p + p
        if acc_n + acc_p >= min_count:
            groups.append((start, acc_n, acc_p))
            acc_n = acc_p = 0
    if acc_n + acc_p:  # a last cell that is too small joins the one before it
        if groups:
            s0, n0, p0 = groups.pop()
            groups.append((s0, n0 + acc_n, p0 + acc_p))
        else:
            groups.append((start, acc_n, acc_p))
    for s0, n0, p0 in groups:
        out_neg[s0], out_pos[s0] = n0, p0
    return out_neg, out_pos


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
