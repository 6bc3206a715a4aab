"""Synthetic RNA-seq for the radiogenomics cohort: planted pathways co-vary with the imaging phenotype.

Genes are log-normal TPM-like values. In each planted pathway a share of member genes follows the imaging
latent ``u_img`` (with one sign per pathway); every other gene is noise. Pathways and symbols come from a GMT
file when given (for example MSigDB Hallmark), otherwise from a small built-in synthetic collection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tace.common.genesets import read_gmt

#: Pathways planted by default when a GMT with these (MSigDB Hallmark) names is given: the study's findings.
HALLMARK_PLANTED = (
    "HALLMARK_ANGIOGENESIS",
    "HALLMARK_EPITHELIAL_MESENCHYMAL_TRANSITION",
    "HALLMARK_HYPOXIA",
    "HALLMARK_TGF_BETA_SIGNALING",
)
RESPONSIVE_FRACTION = 0.4


def builtin_gene_sets(n_sets: int = 16, set_size: int = 40) -> dict[str, list[str]]:
    """A small synthetic collection: SYN_PATHWAY_01.. with disjoint blocks of SYNG symbols."""
    return {f"SYN_PATHWAY_{k + 1:02d}": [f"SYNG{k * set_size + j + 1:05d}" for j in range(set_size)] for k in range(n_sets)}


def make_expression(
    rng: np.random.Generator,
    patient_ids: list[str],
    u_img: np.ndarray,
    n_genes: int,
    gene_sets: Path | str | None = None,
    planted: tuple[str, ...] | None = None,
    n_image_only: int = 0,
    n_expression_only: int = 0,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Expression matrix (genes x samples, gene symbols as index) and the planted truth.

    The last `n_image_only` patients get no expression column; `n_expression_only` extra samples with ids not in
    the image cohort are added, as happens when public imaging and sequencing cohorts are matched.
    """
    sets = read_gmt(gene_sets) if gene_sets is not None else builtin_gene_sets()
    if planted is None:
        planted = tuple(p for p in HALLMARK_PLANTED if p in sets) or tuple(list(sets)[:4])
    missing = [p for p in planted if p not in sets]
    if missing:
        raise ValueError(f"planted pathways not in the gene sets: {missing}")
    members = list(dict.fromkeys(g for genes in sets.values() for g in genes))
    n_filler = max(0, n_genes - len(members))
    genes = members + [f"NOVEL{i + 1:05d}" for i in range(n_filler)]
    n_s = len(patient_ids) - n_image_only
    ids = patient_ids[:n_s] + [f"rgx-{i + 1:04d}" for i in range(n_expression_only)]
    signal = np.concatenate([u_img[:n_s], rng.normal(size=n_expression_only)])
    mu = rng.normal(4.0, 2.0, len(genes))
    sd = rng.uniform(0.5, 1.5, len(genes))
    z = rng.normal(size=(len(genes), len(ids)))
    index = {g: i for i, g in enumerate(genes)}
    responsive: dict[str, list[str]] = {}
    signs = {}
    for k, pathway in enumerate(planted):
        sign = 1.0 if k % 2 == 0 else -1.0
        signs[pathway] = sign
        chosen = [g for g in sets[pathway] if rng.random() < RESPONSIVE_FRACTION]
        responsive[pathway] = chosen
        for g in chosen:
            rho = rng.uniform(0.35, 0.65)
            i = index[g]
            z[i] = sign * rho * signal + np.sqrt(1 - rho**2) * z[i]
    log2 = mu[:, None] + sd[:, None] * z
    tpm = np.maximum(2.0**log2 - 1, 0)
    df = pd.DataFrame(tpm, index=pd.Index(genes, name="gene"), columns=ids)
    meta = {
        "gene_sets_source": str(gene_sets) if gene_sets is not None else "built-in synthetic collection",
        "planted_pathways": list(planted),
        "planted_signs": signs,
        "responsive_genes": responsive,
        "n_genes": len(genes),
        "image_only_patients": patient_ids[n_s:],
        "expression_only_samples": ids[n_s:],
        "expression_scale": "TPM-like, linear (use log2(x+1))",
    }
    return df, meta
