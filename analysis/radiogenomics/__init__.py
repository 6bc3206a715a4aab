"""Radiogenomics: correlate every gene with the model's imaging phenotype, then gene-set enrichment (gseapy, offline).

The steps, each with its settings recorded in the output:

1. `read_expression`: genes x samples (CSV/TSV, gene symbols as row names); ``SYMBOL|ID`` names are cut to the
   symbol, duplicate symbols keep the row with the highest mean, genes with missing values are dropped.
2. `match_samples`: patients are matched by id between the features table and the expression columns; both kinds
   of mismatch are counted and listed, never silently dropped.
3. `filter_genes`: log2(x+1) (or none), then keep genes expressed at or above a minimum in a share of samples and
   with non-zero variance.
4. `correlate`: Spearman (default) or Pearson r of every gene with the target, two-sided P (t distribution, as
   scipy), Benjamini-Hochberg FDR over all genes tested.
5. `enrich_ora` (hypergeometric; background = the genes tested) of the genes kept by the P, |r| and FDR thresholds,
   and `enrich_prerank` (GSEA pre-ranked on r), both against the user's GMT. Nothing is downloaded.
6. A negative control: the same analysis with the expression's sample labels shuffled.

Modules, each used only by those after it: `settings` (the choices), `inputs` (reading and matching),
`correlation` (r, P, FDR, thresholds), `enrichment` (ORA, GSEA pre-ranked), `outputs` (the result and its files),
`pipeline` (the whole analysis).
"""

from __future__ import annotations

from tace.analysis.radiogenomics.correlation import THRESHOLD_GRID, correlate, keep_mask, threshold_table
from tace.analysis.radiogenomics.enrichment import (
    enrich_ora,
    enrich_prerank,
    enrichment_scores,
    permutation_significance,
    sample_permutation_es,
    usable_sets,
)
from tace.analysis.radiogenomics.inputs import Inputs, filter_genes, match_samples, read_expression, read_features, target_values
from tace.analysis.radiogenomics.outputs import Result, write_outputs
from tace.analysis.radiogenomics.pipeline import analyse_radiogenomics, run_radiogenomics
from tace.analysis.radiogenomics.settings import TARGET_HINT, Settings

__all__ = [
    "TARGET_HINT",
    "THRESHOLD_GRID",
    "Inputs",
    "Result",
    "Settings",
    "analyse_radiogenomics",
    "correlate",
    "enrich_ora",
    "enrich_prerank",
    "enrichment_scores",
    "filter_genes",
    "keep_mask",
    "match_samples",
    "permutation_significance",
    "read_expression",
    "read_features",
    "run_radiogenomics",
    "sample_permutation_es",
    "target_values",
    "threshold_table",
    "usable_sets",
    "write_outputs",
]
