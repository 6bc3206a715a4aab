"""Gene-target correlation (r, P, Benjamini-Hochberg FDR) and the P, |r| and FDR thresholds that keep genes."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

#: (P, |r|, FDR) rows of the threshold table: how many genes each setting keeps. The first is the study's setting.
THRESHOLD_GRID = tuple(
    (p, r, q) for p in (0.05, 0.01, 0.001) for r in (0.0, 0.2, 0.3, 0.4) for q in (1.0, 0.25, 0.05)
)  # fmt: skip


def standardised(expression: pd.DataFrame, target: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Genes (rows) and target, ranked for Spearman, centred and scaled to unit norm: r is then their dot product."""
    x = expression.to_numpy(dtype=float)
    y = np.asarray(target, dtype=float)
    if method == "spearman":
        x = stats.rankdata(x, axis=1)
        y = stats.rankdata(y)
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean()
    return x / np.sqrt((x**2).sum(axis=1, keepdims=True)), y / np.sqrt((y**2).sum())


def correlate(expression: pd.DataFrame, target: np.ndarray, method: str = "spearman") -> pd.DataFrame:
    """r, two-sided P and Benjamini-Hochberg FDR of every gene (rows of `expression`) with `target` (columns' order).

    Spearman is Pearson on mid-ranks; P from the t distribution with n - 2 degrees of freedom (as
    `scipy.stats.spearmanr` and `pearsonr`, which the tests compare against).
    """
    xs, ys = standardised(expression, target, method)
    n = len(ys)
    r = np.clip(xs @ ys, -1.0, 1.0)
    with np.errstate(divide="ignore"):
        t = r * np.sqrt((n - 2) / np.maximum(1.0 - r**2, 1e-300))
    p = 2 * stats.t.sf(np.abs(t), n - 2)
    return pd.DataFrame({"gene": expression.index, "r": r, "p": p, "fdr": stats.false_discovery_control(p, method="bh")})


def keep_mask(genes: pd.DataFrame, p: float, r: float, fdr: float) -> pd.Series:
    """The genes kept: P < `p`, |r| >= `r` and, unless `fdr` is 1 (off), FDR < `fdr`."""
    mask = (genes["p"] < p) & (genes["r"].abs() >= r)
    if fdr < 1:
        mask &= genes["fdr"] < fdr
    return mask


def threshold_table(genes: pd.DataFrame) -> pd.DataFrame:
    """How many genes each (P, |r|, FDR) setting keeps, with how many correlate positively."""
    rows = []
    for p, r, q in THRESHOLD_GRID:
        m = keep_mask(genes, p, r, q)
        rows.append({"p_below": p, "abs_r_at_least": r, "fdr_below": q if q < 1 else None, "genes": int(m.sum()),
                     "positive": int((m & (genes["r"] > 0)).sum())})  # fmt: skip
    return pd.DataFrame(rows)
