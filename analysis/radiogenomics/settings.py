"""The radiogenomics analysis's settings: every choice, validated, and written to the output."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tace.common.errors import TaceError

TARGET_HINT = (
    "valid targets: dltrmlp, dltr, clinical (model scores), deep-pc1 (first principal component of the deep features), feature_NNN"
)


@dataclass(frozen=True)
class Settings:
    """Every choice of the radiogenomics analysis (all written to the output).

    Parameters
    ----------
    target : str
        What the genes are correlated with: a model score ``dltrmlp``, ``dltr``, ``clinical``; ``deep-pc1``; or one
        deep feature ``feature_NNN``.
    method : "spearman" or "pearson"
    transform : "log2p1" (log2(x + 1), for TPM/FPKM/counts) or "none" (already log-scale)
    min_expression, min_fraction : float
        Keep a gene if at least `min_fraction` of the samples reach `min_expression` (after the transform).
    p_threshold, r_threshold, fdr_threshold : float
        A gene is kept for over-representation when P < p, |r| >= r and FDR < q (q = 1 switches FDR off).
        The defaults (P < 0.05 only) are the study's setting.
    permutations : int
        GSEA pre-ranked permutations.
    min_set_size, max_set_size : int
        Gene sets (after restricting to the genes tested) outside this size range are not tested.
    enrichment_fdr : float
        A gene set is called enriched below this FDR.
    seed : int
        Seeds the GSEA permutations and the shuffled negative control.
    """

    target: str = "dltr"
    method: str = "spearman"
    transform: str = "log2p1"
    min_expression: float = 1.0
    min_fraction: float = 0.2
    p_threshold: float = 0.05
    r_threshold: float = 0.0
    fdr_threshold: float = 1.0
    permutations: int = 1000
    min_set_size: int = 15
    max_set_size: int = 500
    enrichment_fdr: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("spearman", "pearson"):
            raise TaceError(f"correlation method must be 'spearman' or 'pearson', not {self.method!r}")
        if self.transform not in ("log2p1", "none"):
            raise TaceError(f"expression transform must be 'log2p1' or 'none', not {self.transform!r}")
        for name in ("p_threshold", "fdr_threshold", "enrichment_fdr", "min_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise TaceError(f"{name.replace('_', '-')} must be in (0, 1]")
        if not 0 <= self.r_threshold < 1:
            raise TaceError("r-threshold must be in [0, 1)")
        if self.permutations < 100:
            raise TaceError("permutations must be at least 100 (GSEA's FDR needs them)")
        if not 1 <= self.min_set_size <= self.max_set_size:
            raise TaceError("min-set-size must be at least 1 and at most max-set-size")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
