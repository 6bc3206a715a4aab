"""The analysis statistics against trusted references: R's pROC and survival (golden values recorded once, see
tests/data/reference/README.md), scikit-learn and lifelines; and aggregates (score tables, event tables from
pseudo-sites) against patient-level data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tace.analysis import calibration, discrimination, survival
from tace.analysis.data import SiteReturn, score_rows, survival_rows
from tace.common.errors import TaceError
from tace.common.summaries import (
    EvaluatedPatients,
    SharingRules,
    SiteSummary,
    event_table,
    fix_cutoffs,
    groupings,
    joint_score_table,
    site_summary,
    youden_bin,
)

REF = Path(__file__).parent / "data" / "reference"
GOLDEN = json.loads((REF / "r_golden.json").read_text())
SCORE_FILES = ("scores_generated", "breast_cancer_scores")
SURVIVAL_FILES = ("survival_generated", "rossi", "waltons")


def _scores(name: str) -> pd.DataFrame:
    return pd.read_csv(REF / f"{name}.csv")


def _surv(name: str) -> pd.DataFrame:
    return pd.read_csv(REF / f"{name}.csv")


# -- discrimination ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCORE_FILES)
def test_delong_matches_pROC(name):
    df, gold = _scores(name), GOLDEN[name]
    dl = discrimination.delong(df["label"].to_numpy(), df[["score_a", "score_b"]].to_numpy())
    for j, col in enumerate(("score_a", "score_b")):
        assert dl.aucs[j] == pytest.approx(gold[col]["auc"], abs=1e-12)
        assert dl.cov[j, j] == pytest.approx(gold[col]["var"], rel=1e-9)
        lo, hi = dl.ci(j)
        assert (lo, hi) == pytest.approx((gold[col]["ci_low"], gold[col]["ci_high"]), abs=1e-9)
    z, p = dl.paired(0, 1)
    assert z == pytest.approx(gold["z"], rel=1e-8) and p == pytest.approx(gold["p"], rel=1e-7)
    for site, ref in gold["sites"].items():
        sub = df[df["site"] == site]
        one = discrimination.delong(sub["label"].to_numpy(), sub["score_a"].to_numpy())
        assert one.aucs[0] == pytest.approx(ref["auc"], abs=1e-12) and one.cov[0, 0] == pytest.approx(ref["var"], rel=1e-9)


def _site_returns(df: pd.DataFrame, bins: int, k: int = 0, share: bool = False) -> list[SiteReturn]:
    """Each pseudo-site's summary as a site would send it (models named after the study's)."""
    out = []
    for site, sub in df.groupby("site"):
        scores = {"dltrmlp": sub["score_a"].to_numpy(), "dltr": sub["score_b"].to_numpy(), "clinical": sub["score_a"].to_numpy() * 0.5}
        patients = EvaluatedPatients([f"p{i}" for i in sub.index], sub["label"].to_numpy(), scores, [None] * len(sub), [None] * len(sub))
        summary = site_summary(str(site), "holdout", patients, bins, SharingRules(k, share, b"k")).encode()
        decoded = SiteSummary.decode(json.loads(json.dumps(summary)), str(site), ["dltrmlp", "dltr"]).encode()
        out.append(SiteReturn(str(site), "holdout", "", decoded, {}))
    return out


@pytest.mark.parametrize("name", SCORE_FILES)
def test_aggregate_score_tables_give_the_patient_level_answers(name):
    """Pooled over pseudo-sites, AUC, DeLong variance and the paired test from the sites' joint score tables equal
    the patient-level ones (and R's) within the documented grid bound, at the default 10,000-cell grid."""
    df, gold = _scores(name), GOLDEN[name]
    sites = _site_returns(df, bins=10_000, share=True)
    agg = score_rows(sites, "aggregate")
    pat = score_rows(sites, "patient-level")
    assert len(agg) == len(pat) == len(df)
    da = discrimination.delong(agg["label"].to_numpy(), agg[["dltrmlp", "dltr"]].to_numpy())
    dp = discrimination.delong(pat["label"].to_numpy(), pat[["dltrmlp", "dltr"]].to_numpy())
    bound = max(discrimination.grid_error_bound(pat["label"], pat[m], 10_000) for m in ("dltrmlp", "dltr"))
    assert bound <= 0.001
    assert np.allclose(da.aucs, dp.aucs, atol=bound + 1e-12)
    assert da.aucs[0] == pytest.approx(gold["score_a"]["auc"], abs=bound + 1e-12)
    assert abs(da.paired(0, 1)[1] - gold["p"]) <= 0.001
    assert abs(dp.paired(0, 1)[1] - gold["p"]) <= 1e-7


def test_grid_error_bound_holds_on_a_coarse_grid():
    df = _scores("breast_cancer_scores")
    exact = discrimination.delong(df["label"], df["score_a"].to_numpy()).aucs[0]
    for bins in (10, 50, 200):
        rows = score_rows(_site_returns(df, bins=bins), "aggregate")
        grid = discrimination.delong(rows["label"], rows["dltrmlp"].to_numpy()).aucs[0]
        bound = discrimination.grid_error_bound(df["label"], df["score_a"], bins)
        assert abs(grid - exact) <= bound + 1e-12
        assert bound > 0


def test_microaggregation_keeps_every_cell_at_the_minimum_and_costs_little():
    df = _scores("breast_cancer_scores")
    for k in (3, 5, 10):
        sites = _site_returns(df, bins=10_000, k=k)
        for s in sites:
            assert "cells" not in s.summary["scores"]  # no joint table: it would single patients out
            for cells in s.summary["scores"]["marginals"].values():
                assert all(c[-2] + c[-1] >= k for c in cells)
                assert sum(c[-2] + c[-1] for c in cells) == s.summary["n"]
        rows = score_rows(sites, "aggregate")
        assert not rows["paired"].any()
        dl = discrimination.delong(rows["label"], rows[["dltrmlp", "dltr"]].to_numpy())
        gold = GOLDEN["breast_cancer_scores"]
        # each model keeps its own ranking up to ties within runs (pairs inside a run count one half): AUCs move little
        assert abs(gold["score_a"]["auc"] - dl.aucs[0]) < 0.01 and abs(gold["score_b"]["auc"] - dl.aucs[1]) < 0.01


def test_youden_cutoff_on_the_grid_matches_scikit_learn():
    from sklearn.metrics import roc_curve

    df = _scores("scores_generated")
    bins = 10_000
    table = joint_score_table(df["label"].to_numpy(), {"dltrmlp": df["score_a"].to_numpy()}, bins)
    b = youden_bin(*table.margins("dltrmlp"))
    fpr, tpr, thr = roc_curve(df["label"], df["score_a"])
    best = (tpr - fpr).max()
    ours = ((df["score_a"] * bins).astype(int) >= b).astype(int)
    sens = ours[df["label"] == 1].mean()
    spec = 1 - ours[df["label"] == 0].mean()
    assert sens + spec - 1 == pytest.approx(best, abs=1e-12)
    cut = fix_cutoffs([table], 3)["dltrmlp"]
    groups, names = groupings({"dltrmlp": df["score_a"].to_numpy()}, {"dltrmlp": cut}, bins)["dltrmlp:risk"]
    assert names == ["high risk", "intermediate risk", "low risk"]
    assert abs(np.bincount(groups) - len(df) / 3).max() < 0.1 * len(df)


def test_bootstrap_is_reproducible_and_brackets_the_estimate():
    df = _scores("breast_cancer_scores")
    y, s, st = df["label"].to_numpy(), df[["score_a", "score_b"]].to_numpy(), df["site"].to_numpy()
    a = discrimination.bootstrap_aucs(y, s, st, reps=400, seed=3)
    b = discrimination.bootstrap_aucs(y, s, st, reps=400, seed=3)
    assert np.array_equal(a, b)
    lo, hi = discrimination.percentile_ci(a[:, 0])
    dl = discrimination.delong(y, s)
    assert lo < dl.aucs[0] < hi
    dlo, dhi = dl.ci(0)
    assert abs(lo - dlo) < 0.02 and abs(hi - dhi) < 0.02  # bootstrap and DeLong agree at this size
    band = discrimination.roc_band(y, s[:, 0], st, reps=200)
    assert all(lo_ <= hi_ for lo_, hi_ in zip(band["band_low"], band["band_high"], strict=True))


def test_threshold_metrics_calibration_and_decision_curve_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    pred = np.array([1, 1, 0, 0, 0, 1, 0, 1])
    m = discrimination.threshold_metrics(y, pred)
    assert m["sensitivity"]["value"] == 3 / 4 and m["specificity"]["value"] == 3 / 4 and m["ppv"]["value"] == 3 / 4
    assert m["accuracy"]["low"] < 0.75 < m["accuracy"]["high"]
    p = np.array([0.9, 0.8, 0.3, 0.2, 0.1, 0.7, 0.4, 0.6])
    dc = calibration.decision_curve(y, p, np.array([0.5]))
    # treat 4 (p >= 0.5): 3 TP, 1 FP -> 3/8 - 1/8 * 1 ; treat all: 4/8 - 4/8 * 1
    assert dc["model"][0] == pytest.approx(0.25) and dc["treat_all"][0] == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    p = rng.uniform(0.05, 0.95, 400)
    y = (rng.uniform(size=400) < p).astype(int)
    hl = calibration.hosmer_lemeshow(y, p)
    groups = calibration.risk_groups(p)
    manual = sum(
        (y[groups == g].sum() - p[groups == g].sum()) ** 2 / (p[groups == g].sum() * (1 - p[groups == g].mean())) for g in range(10)
    )
    assert hl["statistic"] == pytest.approx(manual) and hl["df"] == 8 and hl["p"] > 0.01  # well calibrated by construction
    assert calibration.brier(y, p) == pytest.approx(np.mean((p - y) ** 2))
    bad = calibration.hosmer_lemeshow(y, np.clip(p + 0.3, 0, 0.99))
    assert bad["p"] < 1e-6


# -- survival ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SURVIVAL_FILES)
def test_survival_matches_R(name):
    df, gold = _surv(name), GOLDEN[name]
    t, e, g = df["time"].to_numpy(float), df["event"].to_numpy(int), df["group"].to_numpy(int)
    lr = survival.logrank(t, e, g)
    assert lr["statistic"] == pytest.approx(gold["chisq"], rel=1e-9) and lr["p"] == pytest.approx(gold["p"], rel=1e-7)
    lr3 = survival.logrank(t, e, df["group3"].to_numpy())
    assert lr3["statistic"] == pytest.approx(gold["logrank3"]["chisq"], rel=1e-9) and lr3["df"] == gold["logrank3"]["df"]
    st = survival.stratified_logrank(t, e, g, df["site"].to_numpy())
    assert st["statistic"] == pytest.approx(gold["logrank_strat"]["chisq"], rel=1e-9)
    assert st["p"] == pytest.approx(gold["logrank_strat"]["p"], rel=1e-7)
    cox = survival.cox_groups(t, e, g, ["g0", "g1"])["hazard_ratios"]["g1"]
    # lifelines stops its Newton iterations ~1e-7 short of R's fixed point (see the reference README)
    assert cox["coef"] == pytest.approx(gold["coef"], abs=2e-7) and cox["se"] == pytest.approx(gold["se"], rel=1e-6)
    assert (cox["hr"], cox["low"], cox["high"]) == pytest.approx((gold["hr"], gold["hr_low"], gold["hr_high"]), rel=1e-6)
    assert cox["p"] == pytest.approx(gold["p_wald"], rel=1e-5)
    km = survival.kaplan_meier(t, e)
    ref = dict(zip(gold["km_time"], gold["km_surv"], strict=True))
    ours = dict(zip(km["time"], km["survival"], strict=True))
    assert all(ours[tt] == pytest.approx(s, abs=1e-12) for tt, s in ref.items())
    low = dict(zip(km["time"], km["low"], strict=True))
    assert all(low[tt] == pytest.approx(v, abs=1e-9) for tt, v in zip(gold["km_time"], gold["km_lower"], strict=True) if v is not None)
    oriented = -g if gold["coef"] > 0 else g  # C-index: higher value = predicted to do better
    assert survival.c_index(t, e, oriented) == pytest.approx(gold["concordance"], abs=1e-9)


def _event_returns(df: pd.DataFrame, k: int = 0) -> list[SiteReturn]:
    out = []
    for site, sub in df.groupby("site"):
        table = event_table(sub["time"].to_numpy(), sub["event"].to_numpy(), sub["group3"].to_numpy(), ["a", "b", "c"], k)
        summary = {"n": len(sub), "n_with_pfs": len(sub), "survival": {"tables": {"g": table.encode()}}}
        out.append(SiteReturn(str(site), "holdout", "", json.loads(json.dumps(summary)), {}))
    return out


@pytest.mark.parametrize("name", SURVIVAL_FILES)
def test_event_tables_reproduce_patient_level_survival_exactly(name):
    df = _surv(name)
    rows, names, notes = survival_rows(_event_returns(df), "g")
    assert names == ["a", "b", "c"] and not notes and len(rows) == len(df)
    ref = df.sort_values(["site", "time", "event", "group3"], kind="stable", ignore_index=True)
    assert np.array_equal(rows[["time", "event", "group"]].to_numpy(), ref[["time", "event", "group3"]].to_numpy())
    t, e, g = rows["time"].to_numpy(), rows["event"].to_numpy(), rows["group"].to_numpy()
    assert survival.logrank(t, e, g)["statistic"] == pytest.approx(GOLDEN[name]["logrank3"]["chisq"], rel=1e-12)


def test_event_table_rows_and_merging():
    t = np.array([5, 5, 7, 9, 9, 12, 15, 20, 30, 31])
    e = np.array([1, 0, 1, 1, 1, 0, 1, 0, 1, 1])
    g = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 0])
    rows = event_table(t, e, g, ["a", "b", "c"]).rows
    assert rows[0] == [5.0, 0, 5, 1, 1]  # time 5, group 0: 5 at risk, 1 event, 1 censored
    assert [r for r in rows if r[1] == 1][0] == [9.0, 1, 5, 1, 0]
    merged = event_table(t, e, g, ["a", "b", "c"], min_cell_count=3)
    assert all(r[3] + r[4] >= 3 for r in merged.rows) and merged.suppressed == [] and merged.merged == 3
    assert sum(r[3] for r in merged.rows) == e.sum()
    tiny = event_table(t, e, np.r_[np.zeros(8, int), 1, 1], ["a", "b"], min_cell_count=3)
    assert tiny.suppressed == [1]


def test_malformed_summaries_are_refused_with_the_site_named():
    good = site_summary("x", "holdout", EvaluatedPatients(["a", "b"], np.array([0, 1]), {"dltr": np.array([0.2, 0.8])}, [None, None],
                                                          [None, None]), 100).encode()  # fmt: skip
    assert SiteSummary.decode(good, "x", ["dltr"]).encode() == good
    for broken, words in (
        ({**good, "version": 99}, "summary version"),
        ({**good, "n": 5}, "holds 2 patients"),
        ({**good, "scores": {**good["scores"], "cells": [[150, 1, 0], [20, 0, 1]]}}, "outside the grid"),
        ({**good, "scores": {**good["scores"], "cells": [[10, -1, 0]]}}, "non-negative"),
        ("nonsense", "not a mapping"),
    ):
        with pytest.raises(TaceError, match=words) as info:
            SiteSummary.decode(broken, "site-q", ["dltr"])
        assert "site site-q" in str(info.value)
    with pytest.raises(TaceError, match="lacks model"):
        SiteSummary.decode(good, "x", ["dltrmlp"])


def test_patient_level_rows_carry_pseudonyms_not_ids():
    patients = EvaluatedPatients(["site-x-0001", "site-x-0002"], np.array([0, 1]), {"dltr": np.array([0.2, 0.8])}, [100.0, None], [1, None])
    s = site_summary("x", "holdout", patients, 100, SharingRules(share_patient_level=True, pseudonym_key=b"secret")).encode()
    text = json.dumps(s)
    assert "site-x-0001" not in text and len(set(s["patients"]["pseudonym"])) == 2
    alone = EvaluatedPatients(["a"], np.array([1]), {"dltr": np.array([0.5])}, [1.0], [0])
    assert "patients" not in site_summary("x", "holdout", alone, 100).encode()
    assert math.isfinite(s["patients"]["pfs_days"][0]) and s["patients"]["pfs_days"][1] is None


def test_cutoff_rules_on_awkward_histograms():
    from tace.common.summaries import quantile_bins

    # a heavy cell cannot produce empty risk groups: fewer groups instead
    cuts = quantile_bins(np.array([0, 0, 10, 90, 0, 0]), 3)
    groups = np.searchsorted(cuts, np.r_[[2] * 10, [3] * 90], side="right")
    assert len(set(groups.tolist())) == len(cuts) + 1
    assert quantile_bins(np.array([5, 5, 5, 5, 5, 5]), 3) == [2, 4]
    # Youden: midway between the highest non-responder and the lowest responder, as pROC's best threshold
    neg, pos = np.zeros(10), np.zeros(10)
    neg[2], pos[8] = 4, 4
    assert youden_bin(neg, pos) == 6


def test_c_index_without_comparable_pairs_is_a_note_not_a_crash():
    from tace.analysis.study import _survival_block

    notes: list[str] = []
    df = pd.DataFrame({"time": [1.0, 2.0, 3.0, 5.0], "event": [0, 0, 0, 1], "group": [0, 1, 0, 1]})
    block = _survival_block(df, ["a", "b"], "site x", notes, "g")
    assert "logrank" in block and "c_index" not in block and any("C-index" in n for n in notes)
