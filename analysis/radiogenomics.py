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
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from tace.common.errors import TaceError

TARGET_HINT = (
    "valid targets: dltrmlp, dltr, clinical (model scores), deep-pc1 (first principal component of the deep features), feature_NNN"
)
#: (P, |r|, FDR) rows of the threshold table: how many genes each setting keeps. The first is the study's setting.
THRESHOLD_GRID = tuple(
    (p, r, q) for p in (0.05, 0.01, 0.001) for r in (0.0, 0.2, 0.3, 0.4) for q in (1.0, 0.25, 0.05)
)  # fmt: skip


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


# -- inputs --------------------------------------------------------------------------------------------------------
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


# -- statistics ----------------------------------------------------------------------------------------------------
def correlate(expression: pd.DataFrame, target: np.ndarray, method: str = "spearman") -> pd.DataFrame:
    """r, two-sided P and Benjamini-Hochberg FDR of every gene (rows of `expression`) with `target` (columns' order).

    Spearman is Pearson on mid-ranks; P from the t distribution with n - 2 degrees of freedom (as
    `scipy.stats.spearmanr` and `pearsonr`, which the tests compare against).
    """
    xs, ys = _standardised(expression, target, method)
    n = len(ys)
    r = np.clip(xs @ ys, -1.0, 1.0)
    with np.errstate(divide="ignore"):
        t = r * np.sqrt((n - 2) / np.maximum(1.0 - r**2, 1e-300))
    p = 2 * stats.t.sf(np.abs(t), n - 2)
    return pd.DataFrame({"gene": expression.index, "r": r, "p": p, "fdr": stats.false_discovery_control(p, method="bh")})


def _standardised(expression: pd.DataFrame, target: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Genes (rows) and target, ranked for Spearman, centred and scaled to unit norm: r is then their dot product."""
    x = expression.to_numpy(dtype=float)
    y = np.asarray(target, dtype=float)
    if method == "spearman":
        x = stats.rankdata(x, axis=1)
        y = stats.rankdata(y)
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean()
    return x / np.sqrt((x**2).sum(axis=1, keepdims=True)), y / np.sqrt((y**2).sum())


def keep_mask(genes: pd.DataFrame, p: float, r: float, fdr: float) -> pd.Series:
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


def usable_sets(gene_sets: dict[str, list[str]], universe: list[str], settings: Settings) -> dict[str, list[str]]:
    """Gene sets restricted to the genes tested, within the size range (the sets both enrichments test)."""
    present = set(universe)
    out = {}
    for name, genes in gene_sets.items():
        kept = [g for g in genes if g in present]
        if settings.min_set_size <= len(kept) <= settings.max_set_size:
            out[name] = kept
    return out


def enrich_ora(kept: list[str], universe: list[str], sets: dict[str, list[str]]) -> pd.DataFrame:
    """Over-representation of `kept` in each set: hypergeometric P (gseapy.enrich with background = the genes
    tested), BH FDR over every set tested (gseapy adjusts only over the sets it found a hit in)."""
    import gseapy

    columns = ["term", "overlap", "set_size", "expected", "odds_ratio", "p", "fdr", "genes"]
    if not kept or not sets:
        return pd.DataFrame(columns=columns)
    res = gseapy.enrich(gene_list=list(kept), gene_sets=sets, background=list(universe), outdir=None, no_plot=True, verbose=False).results
    hits = {row["Term"]: row for _, row in res.iterrows()}
    rows = []
    for term, members in sets.items():
        hit = hits.get(term)
        overlap = int(str(hit["Overlap"]).split("/")[0]) if hit is not None else 0
        rows.append({
            "term": term, "overlap": overlap, "set_size": len(members), "expected": len(kept) * len(members) / len(universe),
            "odds_ratio": float(hit["Odds Ratio"]) if hit is not None else None,
            "p": float(hit["P-value"]) if hit is not None else 1.0, "genes": str(hit["Genes"]) if hit is not None else "",
        })  # fmt: skip
    out = pd.DataFrame(rows)
    out["fdr"] = stats.false_discovery_control(out["p"].to_numpy(), method="bh")
    return out[columns].sort_values(["p", "term"], kind="stable").reset_index(drop=True)


def enrich_prerank(
    genes: pd.DataFrame, sets: dict[str, list[str]], settings: Settings, expression: pd.DataFrame, target: np.ndarray
) -> pd.DataFrame:
    """GSEA pre-ranked on genes ranked by r (NES > 0: the set's genes rise with the target), two nulls.

    * ``nes``, ``p``, ``fdr``: **sample permutation**: the target is permuted across patients, every gene's r and
      every set's enrichment score recomputed (`sample_permutation_es`); NES and P per set
      (`permutation_significance`), Benjamini-Hochberg FDR over the sets. Permuting samples keeps the correlation
      between genes, as GSEA's authors recommend, so co-expressed sets are not called enriched merely for being
      co-expressed. The enrichment score itself equals gseapy's (the tests compare them).
    * ``nes_gene``, ``p_gene``, ``fdr_gene``: gseapy.prerank's gene permutation (the usual pre-ranked GSEA); it
      ignores gene-gene correlation and is anti-conservative for co-expressed sets.
    """
    import gseapy

    columns = ["term", "es", "nes", "p", "fdr", "nes_sample", "p_gene", "fdr_gene", "set_size", "leading_edge"]
    if not sets:
        return pd.DataFrame(columns=columns)
    rnk = _untied(genes.set_index("gene")["r"])
    # gseapy warns "Duplicated values found in preranked stats" whenever r has ties, which Spearman's r on tens of
    # patients always has: `_untied` orders them by name, but gseapy's check still sees them. Its loggers are made
    # per call, so silence warnings for the duration of the call only.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        res = gseapy.prerank(
            rnk=rnk, gene_sets=sets, permutation_num=settings.permutations, seed=settings.seed, min_size=settings.min_set_size,
            max_size=settings.max_set_size, threads=1, outdir=None, no_plot=True, verbose=False,
        ).res2d  # fmt: skip
    finally:
        logging.disable(previous)
    gene_null = pd.DataFrame({
        "term": res["Term"].astype(str), "es_gene": res["ES"].astype(float), "nes_gene": res["NES"].astype(float),
        "p_gene": res["NOM p-val"].astype(float), "fdr_gene": res["FDR q-val"].astype(float), "leading_edge": res["Lead_genes"].astype(str),
    }).set_index("term")  # fmt: skip
    terms = list(sets)
    observed, null = sample_permutation_es(expression, target, [sets[t] for t in terms], settings)
    nes, p = permutation_significance(observed, null)
    out = pd.DataFrame({"term": terms, "es": observed, "nes_sample": nes, "p": p, "fdr": stats.false_discovery_control(p, method="bh"),
                        "set_size": [len(sets[t]) for t in terms]})  # fmt: skip
    out = out.join(gene_null, on="term")
    out["nes"] = out["nes_gene"]
    # Order by FDR; within a block of equal FDR (Benjamini-Hochberg's step-up, with P near the permutation floor
    # 1 / (1 + same-sign permutations)) by effect size, |NES|.
    out = out.assign(abs_nes=out["nes"].abs()).sort_values(["fdr", "abs_nes", "term"], ascending=[True, False, True], kind="stable")
    return out[columns].reset_index(drop=True)


def permutation_significance(es: np.ndarray, null: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NES and permutation P of enrichment scores `es` (S,) against their sample-permutation nulls `null` (S, K).

    NES as GSEA (Subramanian et al. 2005): positive and negative scores are divided by the mean of the same-sign null
    scores of their set. P compares each set with its own null only: the share of same-sign null scores at least as
    extreme, counting the observed one (Phipson & Smyth 2010: a permutation P is never 0). GSEA's pooled FDR is not
    used: it compares a set's NES with every set's null, and co-expressed sets have wider nulls than the rest, so
    on expression with no link to the target it still called such sets enriched in our benchmark; Benjamini-Hochberg
    over these per-set P values does not.
    """
    es = np.asarray(es, dtype=float)
    null = np.asarray(null, dtype=float)
    pos = null >= 0
    n_pos, n_neg = pos.sum(axis=1), (~pos).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_pos = np.where(pos, null, 0).sum(axis=1) / n_pos
        mean_neg = np.where(~pos, null, 0).sum(axis=1) / n_neg
        nes = np.where(es >= 0, es / mean_pos, -es / mean_neg)
    extreme = np.where(es >= 0, (null >= es[:, None]).sum(axis=1), (null <= es[:, None]).sum(axis=1))
    p = (1 + extreme) / (1 + np.where(es >= 0, n_pos, n_neg))
    return nes, p


def enrichment_scores(order: np.ndarray, weights: np.ndarray, members: list[np.ndarray]) -> np.ndarray:
    """GSEA's weighted Kolmogorov-Smirnov enrichment score (weight 1) of each set, for several rankings at once.

    Parameters
    ----------
    order : (K, N) int
        ``order[k, j]``: the position (0 = top) of gene j in ranking k.
    weights : (K, N) float
        ``|r|`` of gene j under ranking k.
    members : list of int arrays
        Gene indices of each set.

    Returns (S, K): the running sum's maximum deviation from zero, as `gseapy.algorithm.enrichment_score` computes it,
    from the hit positions alone (O(set size) per set and ranking instead of O(N)).
    """
    n_genes = order.shape[1]
    out = np.empty((len(members), order.shape[0]))
    for s, idx in enumerate(members):
        k = len(idx)
        pos = order[:, idx]
        by_pos = np.argsort(pos, axis=1, kind="stable")
        pos = np.take_along_axis(pos, by_pos, axis=1)
        w = np.take_along_axis(weights[:, idx], by_pos, axis=1)
        cum = np.cumsum(w, axis=1)
        total = cum[:, -1:]
        i = np.arange(1, k + 1)
        at_hit = cum / total - (pos + 1 - i) / (n_genes - k)  # the running sum just after each hit (its local maxima)
        before_hit = (cum - w) / total - (pos - i + 1) / (n_genes - k)  # ... just before each hit (its local minima)
        before_hit = np.where(pos >= 1, before_hit, 0.0)
        high = np.maximum(at_hit.max(axis=1), 0.0)  # the sum ends at 0, so 0 is always reached
        low = np.minimum(before_hit.min(axis=1), 0.0)
        out[s] = np.where(np.abs(high) > np.abs(low), high, low)
    return out


def sample_permutation_es(
    expression: pd.DataFrame, target: np.ndarray, sets: list[list[str]], settings: Settings, chunk: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Enrichment scores (S,) of the observed ranking and (S, permutations) with the target permuted across patients."""
    xc, yc = _standardised(expression, target, settings.method)
    genes = list(expression.index)
    by_name = np.argsort(np.array(genes, dtype=object), kind="stable")
    index = {g: i for i, g in enumerate(genes)}
    members = [np.array([index[g] for g in s], dtype=np.int64) for s in sets]
    rng = np.random.default_rng(settings.seed)
    ys = np.stack([yc] + [rng.permutation(yc) for _ in range(settings.permutations)], axis=1)  # (n, 1 + K)
    scores = []
    for start in range(0, ys.shape[1], chunk):
        r = xc @ ys[:, start : start + chunk]  # (N, chunk)
        r = r.T[:, by_name]  # genes in name order, so that a stable sort breaks ties by name
        ranked = np.argsort(-r, axis=1, kind="stable")
        order = np.empty_like(ranked)
        np.put_along_axis(order, ranked, np.arange(r.shape[1])[None, :], axis=1)
        back = np.argsort(by_name)
        scores.append(enrichment_scores(order[:, back], np.abs(r[:, back]), members))
    es = np.concatenate(scores, axis=1)
    return es[:, 0], es[:, 1:]


def _untied(r: pd.Series) -> pd.Series:
    """The ranking in descending r with ties broken by gene name, through offsets smaller than any gap between distinct
    r values: Spearman r takes few distinct values, and GSEA otherwise orders tied genes arbitrarily."""
    order = r.reset_index().sort_values(["r", "gene"], ascending=[False, True], kind="stable")
    values = order["r"].to_numpy(dtype=float)
    distinct = np.unique(values)
    gap = float(np.diff(distinct).min()) if len(distinct) > 1 else 1.0
    step = gap / (2.0 * (len(values) + 1))
    # Within a run of equal r, later genes (by name) get slightly lower values; distinct values never cross.
    run_start = np.r_[0, np.flatnonzero(np.diff(values) != 0) + 1]
    within = np.arange(len(values)) - np.repeat(run_start, np.diff(np.r_[run_start, len(values)]))
    return pd.Series(values - step * within, index=order["gene"].to_numpy(), name="r")


# -- the whole analysis --------------------------------------------------------------------------------------------
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


def _enrichment(
    genes: pd.DataFrame, sets: dict[str, list[str]], settings: Settings, expression: pd.DataFrame, target: np.ndarray
) -> tuple[pd.DataFrame, pd.DataFrame]:
    kept = genes.loc[keep_mask(genes, settings.p_threshold, settings.r_threshold, settings.fdr_threshold), "gene"].tolist()
    universe = genes["gene"].tolist()
    return enrich_ora(kept, universe, sets), enrich_prerank(genes, sets, settings, expression, target)


def _enriched(ora: pd.DataFrame, prerank: pd.DataFrame, fdr: float) -> dict[str, list[str]]:
    return {"ora": ora.loc[ora["fdr"] < fdr, "term"].tolist(), "prerank": prerank.loc[prerank["fdr"] < fdr, "term"].tolist()}


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
    genes["kept"] = keep_mask(genes, settings.p_threshold, settings.r_threshold, settings.fdr_threshold).to_numpy()
    genes["mean_expression"] = x.mean(axis=1).to_numpy()
    in_sets = {g for members in gene_sets.values() for g in members}
    found = len(in_sets & set(genes["gene"]))
    if found < 0.1 * min(len(in_sets), len(genes)):
        raise TaceError(
            f"only {found} of the gene sets' {len(in_sets)} genes are among the {len(genes)} genes tested",
            "the expression matrix and the GMT must use the same gene identifiers (symbols, e.g. VEGFA; not Ensembl ids); "
            "a newer MSigDB release may also rename symbols",
        )  # fmt: skip
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
        rng = np.random.default_rng(settings.seed)
        shuffled = x.copy()
        shuffled.columns = x.columns[rng.permutation(len(x.columns))]
        shuffled = shuffled[x.columns]
        null_genes = correlate(shuffled, y, settings.method)
        null_ora, null_prerank = _enrichment(null_genes, sets, settings, shuffled, y)
        summary["negative_control"] = {
            "what": "expression sample labels shuffled across the matched patients (one permutation, seeded), same analysis",
            "genes_kept": int(keep_mask(null_genes, settings.p_threshold, settings.r_threshold, settings.fdr_threshold).sum()),
            "enriched": _enriched(null_ora, null_prerank, settings.enrichment_fdr),
            "gene_permutation_enriched": int((null_prerank["fdr_gene"] < settings.enrichment_fdr).sum()),
            "min_fdr": {"ora": float(null_ora["fdr"].min()) if len(null_ora) else None,
                        "prerank": float(null_prerank["fdr"].min()) if len(null_prerank) else None},
        }  # fmt: skip
    return Result(settings, genes, threshold_table(genes), ora, prerank, summary, mismatch)


def run_radiogenomics(
    run_dir: Path,
    features: Path | Callable[[], Path],
    expression_path: Path,
    gene_sets_path: Path,
    settings: Settings,
    sample_id_regex: str | None = None,
    cohort: Path | None = None,
    negative_control: bool = True,
    figures: bool = True,
) -> tuple[dict[str, Any], Result]:
    """The whole command on files: read the inputs, analyse, write tables and figures, merge the ``radiogenomics``
    section into RUN/analysis.json; returns that section and the result.

    `features` is the features table, or a function that makes it (applying the models): it is called only after
    the gene sets and the expression table have been read, so a bad input fails before any image is.
    """
    from tace.analysis.study import merge_analysis
    from tace.common.genesets import read_gmt

    gene_sets = read_gmt(gene_sets_path)
    expression, read_counts = read_expression(expression_path, sample_id_regex)
    features_path = features if isinstance(features, Path) else features()
    result = analyse_radiogenomics(read_features(features_path), expression, gene_sets, settings, negative_control)
    inputs = {"features": str(features_path), "expression": str(expression_path), "gene_sets": str(gene_sets_path),
              "cohort": str(cohort or ""), "expression_reading": read_counts}  # fmt: skip
    section = write_outputs(result, run_dir, inputs, figures)
    merge_analysis(run_dir, {"radiogenomics": section})
    return section, result


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
    fdr = result.settings.enrichment_fdr
    section: dict[str, Any] = {
        **result.summary,
        "inputs": inputs,
        "thresholds": result.thresholds.to_dict(orient="records"),
        "top_ora": result.ora.head(10).drop(columns="genes").to_dict(orient="records"),
        "top_prerank": result.prerank.head(10).drop(columns="leading_edge").to_dict(orient="records"),
        "tables": written,
        "figures": {},
    }
    if figures:
        from tace.analysis import plots

        enriched = list(dict.fromkeys(result.summary["enriched"]["prerank"] + result.summary["enriched"]["ora"]))
        ora_genes = dict(zip(result.ora["term"], result.ora["genes"], strict=True))
        members = {term: set(str(ora_genes.get(term, "")).split(";")) for term in enriched}
        s = result.settings
        section["figures"] = {
            "radiogenomics-volcano": plots.save(
                plots.volcano(result.genes, s.p_threshold, s.r_threshold, s.method, s.target, members),
                run_dir / "figures",
                "radiogenomics-volcano",
            ),
            "radiogenomics-enrichment": plots.save(
                plots.enrichment(result.ora, result.prerank, fdr), run_dir / "figures", "radiogenomics-enrichment"
            ),
        }
    return section
