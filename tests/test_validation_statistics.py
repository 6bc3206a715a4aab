"""The multicentre validation statistics against R (golden values recorded once by
tests/reference/golden_validation.R: glm by hand, rms::val.prob and rcs, pROC, metafor::rma), and from the sites'
score tables against patient-level data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tace.analysis import calibration, discrimination, meta, samplesize
from tace.analysis.data import SiteReturn, score_rows
from tace.common.summaries import EvaluatedPatients, SharingRules, SiteSummary, site_summary

REF = Path(__file__).parent / "data" / "reference"
GOLDEN = json.loads((REF / "r_golden_validation.json").read_text())
FILES = ("validation_generated", "breast_cancer_scores", "scores_generated")


def _data(name: str) -> pd.DataFrame:
    return pd.read_csv(REF / f"{name}.csv")


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("score", ("score_a", "score_b"))
def test_recalibration_and_the_flexible_curve_match_R(name, score):
    df, gold = _data(name), GOLDEN[name][score]
    y, p = df["label"].to_numpy(), df[score].to_numpy()
    rec = calibration.recalibration(y, p)
    assert (rec["n"], rec["observed"]) == (gold["n"], gold["observed"]) and rec["expected"] == pytest.approx(gold["expected"], rel=1e-12)
    for key in ("intercept", "slope"):
        for part in ("value", "se", "low", "high"):
            assert rec[key][part] == pytest.approx(gold[key][part], rel=1e-6, abs=1e-9), (key, part)
    assert rec["slope"]["value"] == pytest.approx(gold["val_prob_slope"], rel=1e-6)  # rms::val.prob's own fit
    for part in ("value", "se_log", "low", "high"):
        assert rec["oe"][part] == pytest.approx(gold["oe"][part], rel=1e-12)
    flex = calibration.flexible_calibration(y, p, at=np.asarray(gold["curve_at"]))
    assert flex is not None and flex["kind"] == "spline"
    assert flex["knots"] == pytest.approx(gold["knots"], rel=1e-12)
    for key in ("ici", "e50", "e90", "emax"):
        assert flex[key] == pytest.approx(gold[key], rel=1e-6, abs=1e-9), key
    for mine, theirs in (("observed", "curve"), ("low", "curve_low"), ("high", "curve_high")):
        assert flex["curve"][mine] == pytest.approx(gold[theirs], rel=1e-6), mine


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("which", ("meta_a", "meta_b"))
@pytest.mark.parametrize("test", ("z", "knha"))
def test_random_effects_meta_analysis_matches_metafor(name, which, test):
    gold = GOLDEN[name][which]
    for measure in ("auc", "slope", "oe"):
        g, ref = gold[measure], gold[measure][test]
        fit = meta.random_effects(g["yi"], g["vi"], hartung_knapp=test == "knha")
        assert fit["k"] == len(g["yi"])
        for key in ("pooled", "se", "ci_low", "ci_high", "pi_low", "pi_high", "q", "q_p"):
            assert fit[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), (measure, key)
        assert fit["tau2"] == pytest.approx(ref["tau2"], rel=1e-6, abs=1e-9)
        assert fit["i2"] == pytest.approx(ref["i2"], rel=1e-6, abs=1e-9)
        assert fit["weights"] == pytest.approx(ref["weights"], rel=1e-6)


def test_the_generated_centres_are_heterogeneous_and_the_prediction_interval_is_wider():
    """The golden inputs exercise τ² > 0 (not only the truncated τ² = 0 case)."""
    fit = GOLDEN["validation_generated"]["meta_a"]["slope"]["z"]
    assert fit["tau2"] > 0.01 and fit["pi_high"] - fit["pi_low"] > fit["ci_high"] - fit["ci_low"]


@pytest.mark.parametrize("name", FILES)
def test_centre_inputs_from_our_estimates_equal_R_s(name):
    """Per centre: logit AUC with the delta-method DeLong variance, the slope and log O/E, as meta-analysed."""
    df, gold = _data(name), GOLDEN[name]["meta_a"]
    for i, (site, sub) in enumerate(df.groupby("site")):
        assert site == gold["centres"][i]
        y, p = sub["label"].to_numpy(), sub["score_a"].to_numpy()
        dl = discrimination.delong(y, p)
        block = {"auc": float(dl.aucs[0]), "delong_se": math.sqrt(dl.cov[0, 0]), "calibration": calibration.recalibration(y, p)}
        for measure in ("auc", "slope", "oe"):
            est, var = meta.centre_estimate(measure, block)
            assert est == pytest.approx(gold[measure]["yi"][i], rel=1e-7), (site, measure)
            assert var == pytest.approx(gold[measure]["vi"][i], rel=1e-6), (site, measure)


def _returns(df: pd.DataFrame, bins: int, share: bool = True, k: int = 0) -> list[SiteReturn]:
    out = []
    for site, sub in df.groupby("site"):
        scores = {"dltrmlp": sub["score_a"].to_numpy(), "dltr": sub["score_b"].to_numpy(), "clinical": sub["score_a"].to_numpy() ** 2}
        patients = EvaluatedPatients([f"p{i}" for i in sub.index], sub["label"].to_numpy(), scores, [None] * len(sub), [None] * len(sub))
        summary = json.loads(json.dumps(site_summary(str(site), "holdout", patients, bins, SharingRules(k, share, b"k")).encode()))
        out.append(SiteReturn(str(site), "holdout", "", SiteSummary.decode(summary, str(site), ["dltrmlp"]).encode(), {}))
    return out


def test_calibration_from_score_tables_equals_patient_level():
    """At the default 100,000-cell grid, every calibration statistic from the sites' score tables equals the
    patient-level one to within 1e-4 (scores move by at most half a cell, 5e-6)."""
    df = _data("validation_generated")
    sites = _returns(df, 100_000)
    agg, pat = score_rows(sites, "aggregate"), score_rows(sites, "patient-level")
    for model in ("dltrmlp", "dltr"):
        a = calibration.recalibration(agg["label"], agg[model])
        p = calibration.recalibration(pat["label"], pat[model])
        for key in ("intercept", "slope", "oe"):
            assert abs(a[key]["value"] - p[key]["value"]) < 1e-4, key
        fa, fp = calibration.flexible_calibration(agg["label"], agg[model]), calibration.flexible_calibration(pat["label"], pat[model])
        assert fa and fp
        for key in ("ici", "e50", "e90", "emax"):
            assert abs(fa[key] - fp[key]) < 1e-4, key


def test_meta_analysis_of_site_blocks_back_transforms_and_needs_two_centres():
    df = _data("validation_generated")
    blocks = {}
    for site, sub in df.groupby("site"):
        y, p = sub["label"].to_numpy(), sub["score_a"].to_numpy()
        dl = discrimination.delong(y, p)
        blocks[site] = {"models": {"dltrmlp": {"auc": float(dl.aucs[0]), "delong_se": math.sqrt(dl.cov[0, 0]),
                                               "calibration": calibration.recalibration(y, p)}}}  # fmt: skip
    out = meta.meta_analysis(blocks, ("dltrmlp",))
    auc = out["models"]["dltrmlp"]["auc"]
    gold = GOLDEN["validation_generated"]["meta_a"]["auc"]["z"]
    assert auc["pooled"] == pytest.approx(1 / (1 + math.exp(-gold["pooled"])), rel=1e-7)
    assert auc["pi_low"] < auc["ci_low"] < auc["pooled"] < auc["ci_high"] < auc["pi_high"] < 1
    assert out["models"]["dltrmlp"]["oe"]["pooled"] == pytest.approx(
        math.exp(GOLDEN["validation_generated"]["meta_a"]["oe"]["z"]["pooled"])
    )
    one = meta.meta_analysis({"c1": blocks["c1"]}, ("dltrmlp",))
    assert "pooled" not in one["models"]["dltrmlp"]["auc"] and any("at least 2" in n for n in one["notes"])
    with pytest.raises(ValueError, match="at least two"):
        meta.random_effects([0.1], [0.01])


def test_estimates_that_do_not_exist_are_none_not_a_crash():
    y1 = np.ones(20, dtype=int)
    p = np.linspace(0.1, 0.9, 20)
    rec = calibration.recalibration(y1, p)
    assert rec["slope"] is None and rec["intercept"] is None and rec["oe"] is None
    assert calibration.flexible_calibration(y1, p) is None
    separated = (p > 0.5).astype(int)
    assert calibration.recalibration(separated, p)["slope"] is None
    ties = np.repeat([0.2, 0.4], 30)  # too few distinct predictions for three knots: the straight line
    y = np.r_[np.zeros(20, int), np.ones(10, int), np.zeros(12, int), np.ones(18, int)]
    flex = calibration.flexible_calibration(y, ties)
    assert flex is not None and flex["kind"] == "linear" and flex["knots"] == []


def test_sample_size_adequacy_against_the_rule_of_thumb_and_riley_targets():
    block = {"n": 250, "n_pos": 90, "models": {"dltrmlp": {"auc": 0.8, "ci_low": 0.75, "ci_high": 0.84, "ci_method": "DeLong",
                                                           "calibration": {"slope": {"low": 0.7, "high": 1.2}, "oe": {"low": 0.9, "high": 1.05}}}}}  # fmt: skip
    out = samplesize.adequacy(block, "dltrmlp")
    assert out["events"] == 90 and out["non_events"] == 160 and out["rule_of_thumb_met"] is False
    assert out["precision"]["auc"]["met"] is True and out["precision"]["auc"]["width"] == pytest.approx(0.09)
    assert out["precision"]["slope"]["met"] is False and out["precision"]["oe"]["met"] is True
    block["n_pos"] = 100
    block["n"] = 200
    assert samplesize.adequacy(block, "dltrmlp")["rule_of_thumb_met"] is True
    block["models"]["dltrmlp"]["ci_method"] = "stratified bootstrap (DeLong variance is zero)"
    assert samplesize.adequacy(block, "dltrmlp")["precision"]["auc"]["width"] is None


# -- subgroups ---------------------------------------------------------------------------------------------------
def _patients(n: int, levels: list[str], seed: int = 0) -> EvaluatedPatients:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    y[:2] = (0, 1)
    scores = {m: np.clip(0.3 + 0.3 * y + 0.2 * rng.normal(size=n), 0, 1) for m in ("dltrmlp", "dltr", "clinical")}
    return EvaluatedPatients([f"p{i}" for i in range(n)], y, scores, [None] * n, [None] * n, {"bclc_stage": levels})


@pytest.mark.parametrize("k", (0, 3, 5, 10))
def test_subgroup_tables_suppress_small_levels_and_their_complement(k):
    """A level below the site's minimum cell count is suppressed and named; so are the smallest other levels until
    the suppressed ones hold >= k patients and are at least two, so that no level follows from the site's totals."""
    levels = ["BCLC B"] * 40 + ["BCLC A"] * 12 + ["BCLC C"] * 4 + ["not recorded"] * 2
    rng = np.random.default_rng(1)
    order = rng.permutation(len(levels))
    patients = _patients(len(levels), [levels[i] for i in order])
    summary = site_summary("s1", "holdout", patients, 1000, SharingRules(k))
    sub = summary.subgroups["bclc_stage"]
    assert sub.levels == ["BCLC A", "BCLC B", "BCLC C", "not recorded"]  # display order, missing last: never dropped
    expected = {0: [], 3: ["BCLC C", "not recorded"], 5: ["BCLC C", "not recorded"], 10: ["BCLC A", "BCLC C", "not recorded"]}[k]
    assert sub.suppressed == expected
    sizes = {"BCLC A": 12, "BCLC B": 40, "BCLC C": 4, "not recorded": 2}
    for level, table in sub.tables.items():
        for cells, m in table.parts():
            assert sum(c[m] + c[m + 1] for c in cells) == sizes[level]
            if k > 1:
                assert all(c[m] + c[m + 1] >= k for c in cells)  # microaggregated like the site's own table
    back = SiteSummary.decode(json.loads(json.dumps(summary.encode())), "s1", ["dltrmlp", "dltr", "clinical"])
    assert back.subgroups["bclc_stage"].suppressed == expected
    assert "subgroups" not in site_summary("s1", "train", patients, 1000, SharingRules(k)).encode()  # external sites only


def test_malformed_subgroup_tables_are_refused_with_the_site_named():
    summary = site_summary("s9", "holdout", _patients(30, ["BCLC A"] * 10 + ["BCLC B"] * 20), 100).encode()
    bad = json.loads(json.dumps(summary))
    bad["subgroups"]["bclc_stage"]["tables"]["BCLC A"]["cells"][0][-1] += 5  # patients who are not in the summary
    with pytest.raises(Exception, match="site s9 sent a malformed analysis summary: the levels of subgroup 'bclc_stage' hold 35"):
        SiteSummary.decode(bad, "s9", ["dltrmlp"])
    bad = json.loads(json.dumps(summary))
    bad["subgroups"]["bclc_stage"]["suppressed"] = ["BCLC Z"]
    with pytest.raises(Exception, match="names levels it does not list"):
        SiteSummary.decode(bad, "s9", ["dltrmlp"])


def test_subgroup_analysis_pools_sites_and_reports_suppressed_levels():
    from tace.analysis.subgroups import subgroup_analysis

    a = _patients(60, ["BCLC B"] * 50 + ["BCLC C"] * 6 + ["BCLC A"] * 4, seed=2)
    b = _patients(40, ["BCLC B"] * 30 + ["BCLC C"] * 10, seed=3)
    returns = []
    for site, patients, k in (("s1", a, 5), ("s2", b, 0)):
        summary = json.loads(json.dumps(site_summary(site, "holdout", patients, 100_000, SharingRules(k)).encode()))
        returns.append(SiteReturn(site, "holdout", "", summary, {}))
    out = subgroup_analysis(returns, ("dltrmlp", "dltr"))
    levels = out["variables"]["bclc_stage"]["levels"]
    assert list(levels) == ["BCLC A", "BCLC B", "BCLC C"]
    assert levels["BCLC A"]["status"] == "suppressed" and levels["BCLC A"]["suppressed_at"] == ["s1"] and levels["BCLC A"]["n"] == 0
    assert levels["BCLC C"]["status"] == "partly suppressed" and levels["BCLC C"]["sites"] == ["s2"] and levels["BCLC C"]["n"] == 10
    assert levels["BCLC B"]["status"] == "reported" and levels["BCLC B"]["n"] == 80
    assert levels["BCLC B"]["n_pos"] == int(a.labels[:50].sum() + b.labels[:30].sum())
    # from s2's table (no minimum cell count) equal to the patient-level numbers of its BCLC C patients
    y, p = b.labels[30:], b.scores["dltrmlp"][30:]
    e = levels["BCLC C"]["models"]["dltrmlp"]
    assert abs(e["auc"] - discrimination.delong(y, p).aucs[0]) <= discrimination.grid_error_bound(y, p, 100_000) + 1e-12
    assert abs(e["oe"]["value"] - calibration.recalibration(y, p)["oe"]["value"]) < 1e-4
