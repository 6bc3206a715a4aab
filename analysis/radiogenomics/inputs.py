"""Reading the radiogenomics inputs: the expression matrix, the features table and its target, patient matching, gene filtering."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tace.analysis.radiogenomics.settings import TARGET_HINT, Settings
from tace.common.errors import TaceError


@dataclass(frozen=True)
class Inputs:
    """The files one radiogenomics analysis reads (all recorded in its output).

    Parameters
    ----------
    features : Path or callable
        The features table (`tace-client features`), or a function that makes it and returns its path (applying the
        models); it is called only after the gene sets and the expression matrix have been read, so a bad input
        fails before any image is.
    expression : Path
        Genes x samples matrix (`read_expression`).
    gene_sets : Path
        GMT file of the gene sets (`tace.common.genesets.read_gmt`).
    sample_id_regex : str, optional
        Maps expression column names to patient ids by its first capture group.
    cohort : Path, optional
        The cohort's manifest the features were extracted from (recorded only).
    """

    features: Path | Callable[[], Path]
    expression: Path
    gene_sets: Path
    sample_id_regex: str | None = None
    cohort: Path | None = None


def _map_ids(columns: list[str], regex: str, path: Path) -> list[str]:
    try:
        pattern = re.compile(regex)
    except re.error as exc:
        raise TaceError(f"--sample-id-regex is not a valid regular expression: {exc}") from None
    out = []
    unmatched = 0
    for c in columns:
        m = pattern.search(c)
        if m is None:
            unmatched += 1
            out.append(c)
        else:
            out.append(m.group(1) if pattern.groups else m.group(0))
    if unmatched == len(columns):
        raise TaceError(f"{path}: --sample-id-regex matches none of the {len(columns)} sample columns")
    return out


def read_expression(path: Path | str, sample_id_regex: str | None = None) -> tuple[pd.DataFrame, dict[str, int]]:
    """Read a genes x samples matrix: first column gene symbols, one column per sample.

    Returns the matrix (float, index ``gene``) and counts of what was changed: ``symbol_suffix`` (``SYMBOL|ID`` cut
    to SYMBOL), ``no_symbol`` (rows without a symbol, e.g. TCGA's ``?|100130426``, dropped), ``duplicates`` (rows
    dropped because a symbol repeats; the one with the highest mean is kept), ``missing`` (genes with empty cells,
    dropped). `sample_id_regex`, when given, maps each column to its first capture group (for example
    ``^(TCGA-..-....)`` turns TCGA sample barcodes into patient ids).
    """
    path = Path(path)
    if not path.is_file():
        raise TaceError(f"expression file not found: {path}", "give the genes x samples matrix with --expression")
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt", ".tab") or path.name.lower().endswith((".tsv.gz", ".txt.gz")) else ","
    try:
        raw = pd.read_csv(path, sep=sep, index_col=0, dtype=str)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise TaceError(f"{path}: cannot read as a {'tab' if sep == chr(9) else 'comma'}-separated table ({type(exc).__name__})",
                        "the matrix needs gene symbols in the first column and one column per sample") from None  # fmt: skip
    if raw.shape[1] == 0 or raw.shape[0] == 0:
        raise TaceError(f"{path}: no samples or no genes", "the matrix needs gene symbols in the first column and one column per sample")
    values = raw.apply(pd.to_numeric, errors="coerce")
    bad = values.isna() & raw.notna()
    if bad.any().any():
        cols = [str(c) for c in raw.columns[bad.any(axis=0).to_numpy()]]
        raise TaceError(
            f"{path}: {int(bad.to_numpy().sum())} non-numeric cell(s) in {len(cols)} column(s): {', '.join(cols[:5])}{' ...' if len(cols) > 5 else ''}",
            "every cell after the gene column must be a number (or empty); check for a second header row or annotation columns",
        )  # fmt: skip
    counts = {"symbol_suffix": 0, "no_symbol": 0, "duplicates": 0, "missing": 0}
    names = pd.Series([str(g).strip() for g in raw.index], dtype=str)
    has_suffix = names.str.contains("|", regex=False)
    counts["symbol_suffix"] = int(has_suffix.sum())
    names = names.str.split("|", n=1).str[0].str.strip()
    no_symbol = names.isin(["", "?", "nan", "NA"]).to_numpy()
    counts["no_symbol"] = int(no_symbol.sum())
    values.index = pd.Index(names, name="gene")
    values = values[~no_symbol]
    missing = values.isna().any(axis=1).to_numpy()
    counts["missing"] = int(missing.sum())
    values = values[~missing]
    order = np.argsort(-values.mean(axis=1).to_numpy(), kind="stable")
    first = order[~values.index[order].duplicated(keep="first")]
    counts["duplicates"] = len(values) - len(first)
    values = values.iloc[np.sort(first)]
    if sample_id_regex:
        values.columns = _map_ids([str(c) for c in values.columns], sample_id_regex, path)
    else:
        values.columns = [str(c).strip() for c in values.columns]
    if values.columns.duplicated().any():
        n = int(values.columns.duplicated().sum())
        raise TaceError(f"{path}: {n} sample column(s) repeat an id{' after --sample-id-regex' if sample_id_regex else ''}",
                        "keep one sample per patient (e.g. the primary tumour, TCGA sample type 01)")  # fmt: skip
    if not len(values):
        raise TaceError(f"{path}: no gene left after dropping rows without a symbol or with empty cells")
    return values.astype(float), counts


def read_features(path: Path | str) -> pd.DataFrame:
    """A features table written by `tace-client features` (``patient_id``, scores, ``feature_NNN``)."""
    path = Path(path)
    if not path.is_file():
        raise TaceError(f"features file not found: {path}", "extract features with `tace-client features`, or give --cohort")
    try:
        table = pd.read_csv(path, dtype={"patient_id": str})
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise TaceError(f"{path}: cannot read the features table ({type(exc).__name__})", "extract the features again") from None
    if "patient_id" not in table.columns:
        raise TaceError(f"{path}: no patient_id column, so not a features table", "extract features with `tace-client features`")
    if table["patient_id"].duplicated().any():
        raise TaceError(f"{path}: {int(table['patient_id'].duplicated().sum())} repeated patient id(s)", "one row per patient")
    numeric = table.drop(columns="patient_id").apply(pd.to_numeric, errors="coerce")
    if numeric.isna().any().any():
        cols = [str(c) for c in numeric.columns[numeric.isna().any().to_numpy()]]
        raise TaceError(f"{path}: missing or non-numeric values in column(s) {', '.join(cols[:5])}", "extract the features again")
    return pd.concat([table[["patient_id"]], numeric], axis=1)


def target_values(features: pd.DataFrame, target: str) -> pd.Series:
    """The per-patient target (indexed by patient id) from a features table (`tace-client features`)."""
    table = features.set_index("patient_id")
    deep = [c for c in table.columns if c.startswith("feature_")]
    if target == "deep-pc1":
        if not deep:
            raise TaceError("the features table has no deep features (feature_NNN columns)", TARGET_HINT)
        x = table[deep].to_numpy(dtype=float)
        x = x - x.mean(axis=0)
        scale = x.std(axis=0)
        x = x[:, scale > 0] / scale[scale > 0]
        u, _, _ = np.linalg.svd(x, full_matrices=False)
        pc = u[:, 0]
        # A component's sign is arbitrary: orient it so that it rises with the DLTR score, as the study reads it.
        if "dltr" in table and np.corrcoef(pc, table["dltr"].to_numpy(dtype=float))[0, 1] < 0:
            pc = -pc
        return pd.Series(pc, index=table.index, name=target)
    if target not in table.columns or target == "patient_id":
        raise TaceError(f"unknown radiogenomics target {target!r}", TARGET_HINT)
    return table[target].astype(float).rename(target)


def match_samples(target: pd.Series, expression: pd.DataFrame) -> tuple[list[str], dict[str, list[str]]]:
    """Patients with both imaging and expression (in features order), and the lists of those with only one."""
    expr_ids = set(expression.columns)
    matched = [p for p in target.index if p in expr_ids]
    img_ids = set(target.index)
    mismatch = {
        "image_only": [p for p in target.index if p not in expr_ids],
        "expression_only": [s for s in expression.columns if s not in img_ids],
    }
    if len(matched) < 10:
        raise TaceError(
            f"only {len(matched)} patient(s) have both imaging features and expression ({len(mismatch['image_only'])} imaging-only, "
            f"{len(mismatch['expression_only'])} expression-only)",
            "patient ids in the manifest must equal the expression matrix's column names; --sample-id-regex maps sample "
            "barcodes to patient ids; at least 10 matched patients are needed",
        )  # fmt: skip
    return matched, mismatch


def filter_genes(expression: pd.DataFrame, settings: Settings) -> tuple[pd.DataFrame, dict[str, int]]:
    """Transform, then keep expressed, varying genes; returns the matrix and the counts at each step."""
    x = expression
    if settings.transform == "log2p1":
        if (x.to_numpy() < 0).any():
            raise TaceError(
                "the expression matrix has negative values, so it is not linear-scale (TPM, FPKM, counts)",
                "if it is already log-transformed, pass --transform none",
            )  # fmt: skip
        x = pd.DataFrame(np.log2(x.to_numpy(dtype=float) + 1.0), index=x.index, columns=x.columns)
    counts = {"genes_in_matrix": len(x)}
    expressed = (x >= settings.min_expression).mean(axis=1) >= settings.min_fraction
    x = x[expressed]
    counts["genes_expressed"] = len(x)
    varying = x.std(axis=1) > 0
    x = x[varying]
    counts["genes_tested"] = len(x)
    if len(x) < 100:
        raise TaceError(
            f"only {len(x)} genes pass the expression filter (of {counts['genes_in_matrix']})",
            "lower --min-expression or --min-fraction, or check --transform (log2p1 expects linear-scale values)",
        )  # fmt: skip
    return x, counts
