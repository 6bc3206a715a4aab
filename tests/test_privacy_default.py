"""Nothing per patient leaves a site by default: under the default minimum cell count k every table cell and
event-table row a site releases describes at least k patients (or none), audited on every reply of a whole study
through the real ClientApp; and what the sites compute exactly keeps per-site and stratified results exact."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tace.analysis.data import load_run
from tace.analysis.study import survival_analysis, validate
from tace.common.clinical import ClinicalStats
from tace.common.config import MIN_CELL_COUNT, RunConfig, parse_overrides
from tace.common.protocol import MODELS, unflatten_evaluation
from tace.server.federation import received
from tace.simulation.runner import run_reference
from tests.flower_grid import InProcessGrid, study, task_identity  # noqa: F401 (an autouse fixture)

SHORT = "spacing-mm='8,8,8' box-voxels='8,8,8' rounds=2 head-rounds=2 clinical-rounds=2 patience=0"


def _histograms(flat: dict[str, Any], where: str, k: int) -> list[str]:
    evaluation = unflatten_evaluation(flat)
    out = []
    for model in MODELS:
        if model in evaluation:
            cells = np.asarray(evaluation[model]["hist-neg"]) + np.asarray(evaluation[model]["hist-pos"])
            out += [f"{where}: {model} histogram cell of {n}" for n in cells if 0 < n < k]
    return out


def _summary(summary: dict[str, Any], where: str, k: int) -> list[str]:
    out = [] if "patients" not in summary else [f"{where}: patient-level rows"]
    tables = [summary["scores"]] + [t for sub in summary.get("subgroups", {}).values() for t in sub["tables"].values()]
    for table in tables:
        parts = table["marginals"].values() if "marginals" in table else [table["cells"]]
        for cells in parts:
            out += [f"{where}: score cell of {c[-2] + c[-1]}" for c in cells if 0 < c[-2] + c[-1] < k]
    for name, events in summary.get("survival", {}).get("tables", {}).items():
        out += [f"{where}: {name} event row of {r[3] + r[4]} (at risk {r[2]})" for r in events["rows"] if r[3] + r[4] < k or r[2] < k]
    for name, part in (summary.get("exact") or {}).get("survival", {}).items():
        out += [f"{where}: exact log-rank part of {name} over a group of {n}" for n in part["n"] if n < k]
    return out


def audit(replies: list, k: int) -> list[str]:
    """Every cell or row of fewer than `k` patients in what the sites replied (an empty list when none)."""
    problems: list[str] = []
    for reply in replies:
        if reply.has_error():
            continue
        records = received(reply)
        where = f"{records.site.get('site-id', '?')} {reply.metadata.message_type}"
        metrics = {key: v for key, v in records.metrics.items()}
        if any(key.startswith("hist-") for key in metrics):
            problems += _histograms(metrics, where, k)
        if any(key.startswith("cat.") for key in metrics):
            stats = ClinicalStats.from_flat(metrics)
            problems += [f"{where}: {name} count of {int(acc[0])}" for name, acc in stats.numeric.items() if 0 < acc[0] < k]
            problems += [
                f"{where}: {name}={c} count of {v}" for name, counts in stats.categorical.items() for c, v in counts.items() if 0 < v < k
            ]
        if "radiomics.n" in metrics and 0 < int(float(metrics["radiomics.n"])) < k:
            problems.append(f"{where}: radiomics sums over {int(float(metrics['radiomics.n']))} patients")
        if "validation" in records.site:
            problems += _histograms(json.loads(str(records.site["validation"])), where + " validation", k)
        if "summary" in records.site:
            problems += _summary(json.loads(str(records.site["summary"])), where + " summary", k)
    return problems


def test_every_reply_of_a_study_respects_the_default_minimum_cell_count(tiny_cohort, tmp_path):
    """A whole study (statistics, every training round with its validation, the final evaluation with score, event
    and subgroup tables) under the defaults: the audit finds no cell or row of fewer than k patients, and it does
    find them in the same study with the minimum cell count off (so it can fail)."""
    assert RunConfig().min_cell_count == MIN_CELL_COUNT == 5
    runs = {}
    for name, extra in (("default", ""), ("off", "min-cell-count=0")):
        run = RunConfig.from_run_config(
            {**parse_overrides(f"{SHORT} {extra}"), "cohort": str(tiny_cohort), "run-dir": str(tmp_path / name)}
        )
        grid = InProcessGrid(run, [0, 1, 2, 3, 4])
        study(grid, run)
        runs[name] = grid
    kinds = {m.metadata.message_type for m in runs["default"].replies}
    assert kinds == {"query", "train", "evaluate"} and len(runs["default"].replies) > 20
    assert audit(runs["default"].replies, MIN_CELL_COUNT) == []
    found = audit(runs["off"].replies, MIN_CELL_COUNT)
    assert any("histogram cell of 1" in p for p in found) and any("event row" in p for p in found) and any("score cell" in p for p in found)
    sharing = json.loads((tmp_path / "default" / "data_sharing.json").read_text())
    assert {e["min_cell_count"] for e in sharing.values()} == {MIN_CELL_COUNT}


@pytest.fixture(scope="module")
def private_run(tmp_path_factory) -> Path:
    """A run under the default minimum cell count whose sites also opted in to patient-level sharing (to compare).
    16 patients per site: the tiny cohort's validation splits of 3 are below k, so they would send counts only."""
    from tace.simulation.cohort import generate_cohort, make_preset

    cohort = tmp_path_factory.mktemp("private") / "cohort"
    generate_cohort(cohort, make_preset("tiny", patients_per_site=16), seed=7)
    out = cohort.parent / "run"
    config = {
        **parse_overrides(SHORT),
        "holdout-sites": "site-d,site-e",
        "cohort": str(cohort),
        "run-dir": str(out),
        "share-patient-level": "all",
    }
    run_reference("centralized", cohort, out, RunConfig.from_run_config(config))
    return out


def test_per_site_and_stratified_results_stay_exact_under_the_default(private_run):
    data = load_run(private_run)
    assert {s.summary["min_cell_count"] for s in data.external} == {MIN_CELL_COUNT}
    assert all("marginals" in s.summary["scores"] for s in data.external)  # the tables are coarsened ...
    agg, pl = validate(data, reps=50), validate(data, "patient-level", reps=50)
    for site in agg["sites"]:
        for model in MODELS:
            a, p = agg["sites"][site]["models"][model], pl["sites"][site]["models"][model]
            if "auc" in p:  # ... but each site's AUC, its DeLong CI and calibration are the patient-level ones
                # (a DeLong variance of 0, AUC 0 or 1, takes a bootstrap CI: from the coarsened tables, approximate)
                for key in ("auc", "delong_se", "ci_low", "ci_high") if p["ci_method"] == "DeLong" else ("auc", "delong_se"):
                    assert a[key] == pytest.approx(p[key], abs=1e-12), (site, model, key)
            for key in ("observed", "expected"):
                assert a["calibration"][key] == pytest.approx(p["calibration"][key], abs=1e-9)
            for key in ("intercept", "slope", "oe"):
                if p["calibration"][key] is not None:
                    assert a["calibration"][key]["value"] == pytest.approx(p["calibration"][key]["value"], rel=1e-6), (site, model, key)
            assert a["brier"] == pytest.approx(p["brier"], abs=1e-12)
        for pair, test in pl["sites"][site]["paired"].items():
            if test["z"] is not None and math.isfinite(test["z"]):
                assert agg["sites"][site]["paired"][pair]["p"] == pytest.approx(test["p"], abs=1e-9), (site, pair)
    # The pooled AUC comes from the coarsened tables: approximate, and the tables give no bound for it (the order of
    # patients of different sites is lost); the analysis says so instead of showing the grid's bound.
    assert all(e.get("grid_error_bound") is None for e in agg["pooled"]["models"].values())
    assert any(n.startswith("pooled external: site(s) site-d, site-e sent microaggregated tables") for n in agg["notes"])
    for key in ("auc", "slope"):  # the meta-analysis across centres reads the sites' exact estimates
        for model, measures in agg["meta"]["models"].items():
            if key in measures and "pooled" in measures[key]:
                assert measures[key]["pooled"] == pytest.approx(pl["meta"]["models"][model][key]["pooled"], rel=1e-6)
    assert any(r["status"] == "exact: computed at the site" for r in agg["exactness"])
    s_agg, s_pl = survival_analysis(data), survival_analysis(data, "patient-level")
    compared = 0
    for grouping, entry in s_agg["groupings"].items():
        # A group of fewer than k patients is suppressed at its site, and stays out of the site's exact parts too.
        covers = {s.site_id: len(s.summary["exact"]["survival"].get(grouping, {}).get("levels", [])) for s in data.external}
        full = {site: covers[site] == len(s_pl["groupings"][grouping]["sites"][site]["km"]) for site in entry["sites"]}
        for site, block in entry["sites"].items():
            if "logrank" in block and block["logrank"].get("source") and full[site]:
                assert block["logrank"]["statistic"] == pytest.approx(
                    s_pl["groupings"][grouping]["sites"][site]["logrank"]["statistic"], rel=1e-9
                )
                compared += 1
        stratified = entry.get("pooled", {}).get("stratified_logrank")
        if stratified and stratified.get("source") and all(full.values()):
            expected = s_pl["groupings"][grouping]["pooled"]["stratified_logrank"]
            assert stratified["statistic"] == pytest.approx(expected["statistic"], rel=1e-9) and stratified["df"] == expected["df"]
            compared += 1
    assert compared


def test_radiomics_statistics_over_fewer_than_k_patients_are_not_sent():
    """A training split whose patients with radiomics features are fewer than k sends the statistics of none (the
    encoder standardises from the other sites); at or above k, or with the minimum cell count off, the sums are sent."""
    from tace.common.encoders import RadiomicsEncoder, RadiomicsStats

    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 4))
    x[:3, 1] = np.nan  # three patients without features: 4 rows with every feature
    assert RadiomicsStats.from_matrix(x, 5).n == 0 and not RadiomicsStats.from_matrix(x, 5).sums.any()
    assert RadiomicsStats.from_matrix(x, 4).n == 4 and RadiomicsStats.from_matrix(x, 0).n == 4
    full = RadiomicsStats.from_matrix(rng.normal(size=(6, 4)), 5)
    assert RadiomicsEncoder.from_stats(RadiomicsStats.from_matrix(x, 5).merge(full)) == RadiomicsEncoder.from_stats(full)
