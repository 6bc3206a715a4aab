"""Radiogenomics: statistics against scipy and gseapy, reading and matching inputs, planted pathways and the null."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tace.analysis import radiogenomics as rg
from tace.analysis.cli import main as analysis_main
from tace.analysis.radiogenomics.enrichment import _untied
from tace.common.errors import TaceError
from tace.common.genesets import read_gmt
from tace.simulation.radiogenomics import HALLMARK_PLANTED, make_expression

from .conftest import HALLMARK_GMT


# -- statistics against references ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["spearman", "pearson"])
def test_correlation_matches_scipy_gene_by_gene(method):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 25))
    x[:10] = np.round(x[:10])  # ties, as low counts give
    y = rng.normal(size=25)
    genes = rg.correlate(pd.DataFrame(x, index=[f"g{i}" for i in range(60)]), y, method)
    ref = stats.spearmanr if method == "spearman" else stats.pearsonr
    for i in range(60):
        r, p = ref(x[i], y)
        assert genes["r"][i] == pytest.approx(r, abs=1e-12) and genes["p"][i] == pytest.approx(p, rel=1e-9, abs=1e-15)
    # Benjamini-Hochberg by hand: q_(i) = min over j >= i of p_(j) m / j
    p = genes["p"].to_numpy()
    order = np.argsort(p)
    q = np.minimum.accumulate((p[order] * len(p) / np.arange(1, len(p) + 1))[::-1])[::-1]
    assert np.allclose(genes["fdr"].to_numpy()[order], np.minimum(q, 1))


def test_over_representation_is_the_hypergeometric_test_over_all_sets_tested():
    universe = [f"G{i}" for i in range(400)]
    sets = {"A": universe[:40], "B": universe[40:70], "C": universe[300:330]}
    kept = universe[:15] + universe[40:43] + universe[200:210]
    ora = rg.enrich_ora(kept, universe, sets).set_index("term")
    for term, members in sets.items():
        k = len(set(kept) & set(members))
        assert ora.loc[term, "overlap"] == k
        expected_p = stats.hypergeom.sf(k - 1, len(universe), len(members), len(kept)) if k else 1.0
        assert ora.loc[term, "p"] == pytest.approx(expected_p, rel=1e-9)
    # the FDR counts set C (no hit) as tested, unlike gseapy's own adjustment
    assert np.allclose(ora.loc[["A", "B", "C"], "fdr"], stats.false_discovery_control(ora.loc[["A", "B", "C"], "p"]))


def test_enrichment_scores_equal_gseapys():
    import gseapy

    rng = np.random.default_rng(3)
    genes = [f"G{i:04d}" for i in range(600)]
    r = pd.Series(np.round(rng.normal(size=600), 2), index=pd.Index(genes, name="gene"), name="r")  # many ties
    ranked = _untied(r)
    sets = {f"S{k}": list(rng.choice(genes, 25 + 5 * k, replace=False)) for k in range(6)}
    position = {g: i for i, g in enumerate(ranked.index)}
    order = np.array([[position[g] for g in genes]])
    weights = np.abs(np.array([[ranked[g] for g in genes]]))
    mine = rg.enrichment_scores(order, weights, [np.array([genes.index(g) for g in s]) for s in sets.values()])[:, 0]
    ref = gseapy.prerank(rnk=ranked, gene_sets=sets, permutation_num=100, seed=1, outdir=None, no_plot=True, min_size=5, threads=1).res2d
    ref_es = ref.set_index("Term").loc[list(sets), "ES"].to_numpy(dtype=float)
    assert np.abs(mine - ref_es).max() < 1e-12


def test_permutation_nes_equals_gseas_normalisation():
    rng = np.random.default_rng(4)
    es, null = rng.normal(size=15) * 0.5, rng.normal(size=(15, 400)) * 0.3
    nes, p = rg.permutation_significance(es, null)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # gseapy keeps its Python algorithm as a reference only
        from gseapy.algorithm import normalize
    with np.errstate(divide="ignore", invalid="ignore"):
        ref_nes, _ = normalize(es, null)
    assert np.allclose(nes, ref_nes)
    for s in range(15):
        same = null[s][null[s] >= 0] if es[s] >= 0 else null[s][null[s] < 0]
        extreme = (same >= es[s]).sum() if es[s] >= 0 else (same <= es[s]).sum()
        assert p[s] == pytest.approx((1 + extreme) / (1 + len(same)))


def test_ties_are_broken_by_name_without_reordering_distinct_values():
    r = pd.Series([0.5, 0.5, -0.1, 0.9, 0.5], index=pd.Index(["b", "a", "c", "d", "e"], name="gene"), name="r")
    ranked = _untied(r)
    assert list(ranked.index) == ["d", "a", "b", "e", "c"]
    assert ranked.is_monotonic_decreasing and ranked.is_unique


# -- planted pathways and the null (the synthetic radiogenomics cohort's generator) ---------------------------------
@pytest.fixture(scope="module")
def hallmark_cohort():
    """80 patients, 20,000 genes, the four Hallmark pathways the study names planted; the target is the imaging
    latent the expression was generated from (what a perfect model would extract)."""
    rng = np.random.default_rng(2)
    ids = [f"p{i:03d}" for i in range(80)]
    latent = rng.normal(size=80)
    expression, meta = make_expression(rng, ids, latent, 20000, gene_sets=HALLMARK_GMT)
    return pd.DataFrame({"patient_id": ids, "dltr": latent}), expression, meta


def test_planted_pathways_come_out_on_top_and_the_shuffled_control_finds_nothing(hallmark_cohort):
    features, expression, meta = hallmark_cohort
    assert set(meta["planted_pathways"]) == set(HALLMARK_PLANTED)
    result = rg.analyse_radiogenomics(features, expression, read_gmt(HALLMARK_GMT), rg.Settings(seed=2))
    planted = set(HALLMARK_PLANTED)
    assert set(result.ora["term"][:4]) == planted and (result.ora["fdr"][:4] < 0.05).all()
    prerank = result.prerank.set_index("term")
    assert (prerank.loc[list(planted), "fdr"] < 0.05).all()
    assert set(result.prerank["term"][:4]) == planted
    for term in planted:  # the sign of each planted pathway (+, -, +, - in HALLMARK_PLANTED order)
        assert np.sign(prerank.loc[term, "nes"]) == meta["planted_signs"][term]
    control = result.summary["negative_control"]
    assert control["enriched"] == {"ora": [], "prerank": []}
    assert result.summary["enriched"]["ora"][:4] and set(result.summary["enriched"]["ora"]) >= planted
    t = result.thresholds
    study_setting = t[(t["p_below"] == 0.05) & (t["abs_r_at_least"] == 0.0) & t["fdr_below"].isna()]
    assert study_setting["genes"].tolist() == [result.summary["genes"]["kept"]]
    assert (result.thresholds.groupby("p_below")["genes"].max().sort_index(ascending=False).diff().dropna() <= 0).all()


def test_pearson_and_no_transform_are_recorded(hallmark_cohort):
    features, expression, _ = hallmark_cohort
    logged = np.log2(expression + 1)
    result = rg.analyse_radiogenomics(
        features, logged, read_gmt(HALLMARK_GMT), rg.Settings(method="pearson", transform="none", permutations=200), negative_control=False
    )  # fmt: skip
    assert result.summary["settings"]["method"] == "pearson" and result.summary["settings"]["transform"] == "none"
    assert "negative_control" not in result.summary
    assert set(HALLMARK_PLANTED) <= set(result.summary["enriched"]["ora"])


# -- inputs ---------------------------------------------------------------------------------------------------------
def test_reading_tcga_style_tables(tmp_path):
    path = tmp_path / "expr.tsv"
    path.write_text(
        "gene_id\tTCGA-AA-0001-01A\tTCGA-AA-0002-01A\n"
        "VEGFA|7422\t10\t20\n"
        "?|100130426\t1\t2\n"
        "TP53|7157\t5\t6\n"
        "TP53|99999\t50\t60\n"
        "KRAS|3845\t\t3\n",
        encoding="utf-8",
    )
    x, counts = rg.read_expression(path, sample_id_regex=r"^(TCGA-..-....)")
    assert list(x.columns) == ["TCGA-AA-0001", "TCGA-AA-0002"]
    assert list(x.index) == ["VEGFA", "TP53"] and x.loc["TP53"].tolist() == [50.0, 60.0]  # the higher-mean duplicate
    assert counts == {"symbol_suffix": 5, "no_symbol": 1, "duplicates": 1, "missing": 1}


def test_bad_expression_tables_say_what_and_where(tmp_path):
    path = tmp_path / "expr.csv"
    path.write_text("gene,s1,s2\nA,1,x\nB,2,3\n", encoding="utf-8")
    with pytest.raises(TaceError, match=r"1 non-numeric cell\(s\) in 1 column\(s\): s2"):
        rg.read_expression(path)
    with pytest.raises(TaceError, match="expression file not found"):
        rg.read_expression(tmp_path / "missing.csv")
    neg = pd.DataFrame(np.full((200, 12), -1.0), index=[f"g{i}" for i in range(200)])
    with pytest.raises(TaceError, match="negative values") as err:
        rg.filter_genes(neg, rg.Settings())
    assert "--transform none" in (err.value.hint or "")


def test_unmatched_patients_are_counted_and_too_few_is_an_error():
    target = pd.Series(np.arange(12.0), index=[f"p{i}" for i in range(12)])
    expression = pd.DataFrame(np.ones((3, 13)), columns=[f"p{i}" for i in range(1, 12)] + ["x1", "x2"])
    matched, mismatch = rg.match_samples(target, expression)
    assert len(matched) == 11 and mismatch == {"image_only": ["p0"], "expression_only": ["x1", "x2"]}
    with pytest.raises(TaceError, match="only 2 patient") as err:
        rg.match_samples(target, expression[["p1", "p2", "x1"]])
    assert "--sample-id-regex" in (err.value.hint or "")


def test_targets():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(30, 6))
    table = pd.DataFrame({"patient_id": [f"p{i}" for i in range(30)], "dltr": feats[:, 0] + 0.1 * rng.normal(size=30),
                          **{f"feature_{j:03d}": feats[:, j] for j in range(6)}})  # fmt: skip
    pc = rg.target_values(table, "deep-pc1")
    assert np.corrcoef(pc, table["dltr"])[0, 1] > 0  # oriented to rise with the DLTR score
    assert rg.target_values(table, "feature_002").tolist() == table["feature_002"].tolist()
    with pytest.raises(TaceError, match="unknown radiogenomics target 'nope'"):
        rg.target_values(table, "nope")


def test_gene_symbols_that_do_not_match_the_gmt_are_an_error(hallmark_cohort):
    features, expression, _ = hallmark_cohort
    renamed = expression.set_axis([f"ENSG{i:011d}" for i in range(len(expression))], axis=0)
    with pytest.raises(TaceError, match="genes tested") as err:
        rg.analyse_radiogenomics(features, renamed, read_gmt(HALLMARK_GMT), rg.Settings(permutations=100))
    assert "Ensembl" in (err.value.hint or "")


# -- the command ----------------------------------------------------------------------------------------------------
def test_the_command_needs_gene_sets_and_says_where_to_get_them(tmp_path, capsys):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.json").write_text("{}", encoding="utf-8")
    code = analysis_main(["radiogenomics", str(tmp_path), "--features", "f.csv", "--expression", "e.csv"])
    err = capsys.readouterr().err
    assert code == 2 and "no --gene-sets" in err and "MSigDB" in err and "never downloads" in err


def test_the_command_on_extracted_features(hallmark_cohort, tmp_path, capsys):
    features, expression, _ = hallmark_cohort
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    (run / "models" / "model.json").write_text("{}", encoding="utf-8")
    features.iloc[:78].to_csv(tmp_path / "features.csv", index=False)  # 2 patients without imaging
    expression.to_csv(tmp_path / "expression.csv")
    args = ["radiogenomics", str(run), "--features", str(tmp_path / "features.csv"), "--expression", str(tmp_path / "expression.csv"),
            "--gene-sets", str(HALLMARK_GMT), "--permutations", "200", "--seed", "2"]  # fmt: skip
    assert analysis_main(args) == 0
    out = capsys.readouterr().out
    assert "78 patients matched (0 imaging only, 2 expression only)" in out and "negative control" in out
    section = json.loads((run / "analysis.json").read_text(encoding="utf-8"))["radiogenomics"]
    assert section["patients"] == {"matched": 78, "image_only": 0, "expression_only": 2}
    assert set(HALLMARK_PLANTED) <= set(section["enriched"]["ora"])
    for name in section["tables"].values():
        assert (run / "tables" / name).stat().st_size > 0
    genes = pd.read_csv(run / "tables" / "radiogenomics-genes.csv")
    assert list(genes.columns[:4]) == ["gene", "r", "p", "fdr"] and genes["p"].is_monotonic_increasing
    assert {f for files in section["figures"].values() for f in files} == {
        "radiogenomics-volcano.png", "radiogenomics-volcano.svg", "radiogenomics-enrichment.png", "radiogenomics-enrichment.svg"}  # fmt: skip
    unmatched = pd.read_csv(run / "radiogenomics" / "unmatched.csv")
    assert sorted(unmatched["status"]) == ["expression only", "expression only"]
