"""Gene-set enrichment: over-representation (hypergeometric) and GSEA pre-ranked with sample-permutation significance."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from scipy import stats

from tace.analysis.radiogenomics.correlation import standardised
from tace.analysis.radiogenomics.settings import Settings
from tace.common.errors import TaceError


def check_identifiers(gene_sets: dict[str, list[str]], universe: list[str]) -> int:
    """How many of the gene sets' genes are among the genes tested; an error when too few are (other identifiers)."""
    in_sets = {g for members in gene_sets.values() for g in members}
    found = len(in_sets & set(universe))
    if found < 0.1 * min(len(in_sets), len(universe)):
        raise TaceError(
            f"only {found} of the gene sets' {len(in_sets)} genes are among the {len(universe)} genes tested",
            "the expression matrix and the GMT must use the same gene identifiers (symbols, e.g. VEGFA; not Ensembl ids); "
            "a newer MSigDB release may also rename symbols",
        )  # fmt: skip
    return found


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
    xc, yc = standardised(expression, target, settings.method)
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
