"""What one radiogenomics analysis produced (`Result`) and how it is written: tables, figures, the analysis.json section."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tace.analysis.radiogenomics.settings import Settings


@dataclass
class Result:
    """Everything one radiogenomics analysis produced (tables as DataFrames, the rest JSON-ready)."""

    settings: Settings
    genes: pd.DataFrame  # gene, r, p, fdr, kept, mean_expression
    thresholds: pd.DataFrame
    ora: pd.DataFrame
    prerank: pd.DataFrame
    summary: dict[str, Any]
    mismatch: dict[str, list[str]]


def _draw(result: Result, folder: Path) -> dict[str, list[str]]:
    """The volcano plot (genes of the enriched sets coloured) and the enrichment plot; {figure: [file names]}."""
    from tace.analysis import plots  # matplotlib is loaded only when figures are drawn

    enriched = list(dict.fromkeys(result.summary["enriched"]["prerank"] + result.summary["enriched"]["ora"]))
    ora_genes = dict(zip(result.ora["term"], result.ora["genes"], strict=True))
    members = {term: set(str(ora_genes.get(term, "")).split(";")) for term in enriched}
    s = result.settings
    volcano = plots.volcano(result.genes, s.p_threshold, s.r_threshold, s.method, s.target, members)
    return {
        "radiogenomics-volcano": plots.save(volcano, folder, "radiogenomics-volcano"),
        "radiogenomics-enrichment": plots.save(
            plots.enrichment(result.ora, result.prerank, s.enrichment_fdr), folder, "radiogenomics-enrichment"
        ),
    }


def write_outputs(result: Result, run_dir: Path, inputs: dict[str, Any], figures: bool = True) -> dict[str, Any]:
    """Tables under RUN/tables/radiogenomics-*.csv, the patient matching under RUN/radiogenomics/, figures under
    RUN/figures/radiogenomics-*; returns the ``radiogenomics`` section of analysis.json."""
    tables = run_dir / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    written = {
        "genes": "radiogenomics-genes.csv",
        "thresholds": "radiogenomics-thresholds.csv",
        "ora": "radiogenomics-ora.csv",
        "prerank": "radiogenomics-gsea-prerank.csv",
    }
    result.genes.sort_values(["p", "gene"], kind="stable").to_csv(tables / written["genes"], index=False, float_format="%.6g")
    result.thresholds.to_csv(tables / written["thresholds"], index=False)
    result.ora.to_csv(tables / written["ora"], index=False, float_format="%.6g")
    result.prerank.to_csv(tables / written["prerank"], index=False, float_format="%.6g")
    matching = [(p, "image only") for p in result.mismatch["image_only"]] + [
        (s, "expression only") for s in result.mismatch["expression_only"]
    ]
    (run_dir / "radiogenomics").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(matching, columns=["id", "status"]).to_csv(run_dir / "radiogenomics" / "unmatched.csv", index=False)
    return {
        **result.summary,
        "inputs": inputs,
        "thresholds": result.thresholds.to_dict(orient="records"),
        "top_ora": result.ora.head(10).drop(columns="genes").to_dict(orient="records"),
        "top_prerank": result.prerank.head(10).drop(columns="leading_edge").to_dict(orient="records"),
        "tables": written,
        "figures": _draw(result, run_dir / "figures") if figures else {},
    }
