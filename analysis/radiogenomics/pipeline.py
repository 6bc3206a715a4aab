"""The whole radiogenomics analysis: on tables (`analyse_radiogenomics`) and on files, writing its outputs (`run_radiogenomics`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tace.analysis.radiogenomics.correlation import correlate, keep_mask, threshold_table
from tace.analysis.radiogenomics.enrichment import check_identifiers, enrich_ora, enrich_prerank, usable_sets
from tace.analysis.radiogenomics.inputs import Inputs, filter_genes, match_samples, read_expression, read_features, target_values
from tace.analysis.radiogenomics.outputs import Result, write_outputs
from tace.analysis.radiogenomics.settings import TARGET_HINT, Settings
from tace.analysis.study import merge_analysis
from tace.common.errors import TaceError
from tace.common.genesets import read_gmt


def _kept(genes: pd.DataFrame, settings: Settings) -> pd.Series:
    return keep_mask(genes, settings.p_threshold, settings.r_threshold, settings.fdr_threshold)


def _enrichment(
    genes: pd.DataFrame, sets: dict[str, list[str]], settings: Settings, expression: pd.DataFrame, target: np.ndarray
) -> tuple[pd.DataFrame, pd.DataFrame]:
    kept = genes.loc[_kept(genes, settings), "gene"].tolist()
    universe = genes["gene"].tolist()
    return enrich_ora(kept, universe, sets), enrich_prerank(genes, sets, settings, expression, target)


def _enriched(ora: pd.DataFrame, prerank: pd.DataFrame, fdr: float) -> dict[str, list[str]]:
    return {"ora": ora.loc[ora["fdr"] < fdr, "term"].tolist(), "prerank": prerank.loc[prerank["fdr"] < fdr, "term"].tolist()}


def _negative_control(x: pd.DataFrame, y: np.ndarray, sets: dict[str, list[str]], settings: Settings) -> dict[str, Any]:
    """The same analysis with the expression's sample labels shuffled (one seeded permutation): its summary."""
    rng = np.random.default_rng(settings.seed)
    shuffled = x.copy()
    shuffled.columns = x.columns[rng.permutation(len(x.columns))]
    shuffled = shuffled[x.columns]
    null_genes = correlate(shuffled, y, settings.method)
    null_ora, null_prerank = _enrichment(null_genes, sets, settings, shuffled, y)
    return {
        "what": "expression sample labels shuffled across the matched patients (one permutation, seeded), same analysis",
        "genes_kept": int(_kept(null_genes, settings).sum()),
        "enriched": _enriched(null_ora, null_prerank, settings.enrichment_fdr),
        "gene_permutation_enriched": int((null_prerank["fdr_gene"] < settings.enrichment_fdr).sum()),
        "min_fdr": {"ora": float(null_ora["fdr"].min()) if len(null_ora) else None,
                    "prerank": float(null_prerank["fdr"].min()) if len(null_prerank) else None},
    }  # fmt: skip


def analyse_radiogenomics(
    features: pd.DataFrame,
    expression: pd.DataFrame,
    gene_sets: dict[str, list[str]],
    settings: Settings,
    negative_control: bool = True,
) -> Result:
    """Correlate the target with every gene and run both enrichments (and, by default, the shuffled control).

    Parameters
    ----------
    features : DataFrame
        ``patient_id`` plus the target's column(s), as `tace-client features` writes it.
    expression : DataFrame
        Genes x samples, as `read_expression` returns it (not yet transformed).
    gene_sets : dict
        {set name: [gene symbols]}, e.g. from `tace.common.genesets.read_gmt`.
    """
    target = target_values(features, settings.target)
    matched, mismatch = match_samples(target, expression)
    x, counts = filter_genes(expression[matched], settings)
    y = target.loc[matched].to_numpy(dtype=float)
    if np.std(y) == 0:
        raise TaceError(f"the target {settings.target!r} is constant over the matched patients", TARGET_HINT)
    genes = correlate(x, y, settings.method)
    genes["kept"] = _kept(genes, settings).to_numpy()
    genes["mean_expression"] = x.mean(axis=1).to_numpy()
    found = check_identifiers(gene_sets, genes["gene"].tolist())
    sets = usable_sets(gene_sets, genes["gene"].tolist(), settings)
    ora, prerank = _enrichment(genes, sets, settings, x, y)
    summary: dict[str, Any] = {
        "settings": settings.as_dict(),
        "patients": {
            "matched": len(matched),
            "image_only": len(mismatch["image_only"]),
            "expression_only": len(mismatch["expression_only"]),
        },
        "genes": {**counts, "kept": int(genes["kept"].sum()), "kept_positive": int((genes["kept"] & (genes["r"] > 0)).sum())},
        "gene_sets": {"in_file": len(gene_sets), "tested": len(sets), "genes_in_sets_found": found},
        "enriched": _enriched(ora, prerank, settings.enrichment_fdr),
    }
    if negative_control:
        summary["negative_control"] = _negative_control(x, y, sets, settings)
    return Result(settings, genes, threshold_table(genes), ora, prerank, summary, mismatch)


def run_radiogenomics(
    run_dir: Path, inputs: Inputs, settings: Settings, negative_control: bool = True, figures: bool = True
) -> tuple[dict[str, Any], Result]:
    """The whole command on files: read the inputs, analyse, write tables and figures, merge the ``radiogenomics``
    section into RUN/analysis.json; returns that section and the result.

    The gene sets and the expression matrix are read before `inputs.features` is made (when it is a function), so a
    bad input fails before any image is read.
    """
    gene_sets = read_gmt(inputs.gene_sets)
    expression, read_counts = read_expression(inputs.expression, inputs.sample_id_regex)
    features_path = inputs.features if isinstance(inputs.features, Path) else inputs.features()
    result = analyse_radiogenomics(read_features(features_path), expression, gene_sets, settings, negative_control)
    recorded = {"features": str(features_path), "expression": str(inputs.expression), "gene_sets": str(inputs.gene_sets),
                "cohort": str(inputs.cohort or ""), "expression_reading": read_counts}  # fmt: skip
    section = write_outputs(result, run_dir, recorded, figures)
    merge_analysis(run_dir, {"radiogenomics": section})
    return section, result
