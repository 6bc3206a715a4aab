"""The analysis of a finished run: what the sites return, `tace-analysis validate` / `survival`, outputs, errors."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tace.analysis.cli import main as analysis_main
from tace.analysis.data import load_run
from tace.analysis.study import equivalence, survival_analysis, validate
from tace.common.config import RunConfig, parse_overrides
from tace.common.errors import TaceError
from tace.common.protocol import MODELS
from tace.simulation.runner import run_reference
from tests.helpers import pdf_page_images

TINY_RUN = "spacing-mm='8,8,8' box-voxels='8,8,8' rounds=2 head-rounds=2 clinical-rounds=2 radiomics-rounds=2"


def _run(cohort: Path, out: Path, **overrides: object) -> Path:
    base = {**parse_overrides(TINY_RUN), "holdout-sites": "site-d,site-e", "cohort": str(cohort), "run-dir": str(out), **overrides}
    run_reference("centralized", cohort, out, RunConfig.from_run_config(base))
    return out


@pytest.fixture(scope="module")
def cohort(tiny_cohort, tmp_path_factory) -> Path:
    """This module's own copy of the tiny cohort: runs write their preprocessing cache into the cohort folder."""
    out = tmp_path_factory.mktemp("analysis-cohort") / "cohort"
    shutil.copytree(tiny_cohort, out)
    return out


@pytest.fixture(scope="module")
def finished_run(cohort, tmp_path_factory) -> Path:
    """A finished run of the tiny cohort in which every site opted in to patient-level sharing (for comparison), with
    full tables (no minimum cell count: what the grid alone costs; the private default is in test_privacy_default.py)."""
    return _run(cohort, tmp_path_factory.mktemp("analysis") / "run", **{"share-patient-level": "all", "min-cell-count": 0})


def test_the_run_records_what_left_each_site(finished_run):
    sharing = json.loads((finished_run / "data_sharing.json").read_text())
    assert set(sharing) == {"site-a", "site-b", "site-c", "site-d", "site-e"}
    assert sharing["site-d"]["role"] == "holdout" and sharing["site-d"]["sharing"] == "patient-level"
    assert any("weights" in s for s in sharing["site-a"]["sent"]) and not any("weights" in s for s in sharing["site-d"]["sent"])
    cutoffs = json.loads((finished_run / "cutoffs.json").read_text())
    assert set(cutoffs) <= set(MODELS) and "dltrmlp" in cutoffs
    external = json.loads((finished_run / "site_returns/site-d.json").read_text())
    assert external["survival"]["cutoffs"] == cutoffs  # grouped with the training sites' cut-offs
    assert "site-d-0001" not in (finished_run / "site_returns/site-d.json").read_text()


def test_aggregate_default_never_carries_patient_rows(cohort, tmp_path):
    out = _run(cohort, tmp_path / "run")
    for file in (out / "site_returns").glob("*.json"):
        assert "patients" not in json.loads(file.read_text())
    assert {s["sharing"] for s in json.loads((out / "data_sharing.json").read_text()).values()} == {"aggregate"}


def test_aggregate_and_patient_level_give_the_same_answers(finished_run):
    data = load_run(finished_run)
    rows = equivalence(data, reps=50)
    assert rows and any(r["statistic"].startswith("log-rank") for r in rows)
    names = {r["statistic"] for r in rows}
    for stat in ("calibration intercept", "calibration slope", "O/E", "ICI", "E50", "E90", "Emax"):
        assert f"{stat} DLTRMLP" in names, stat
    assert any(n.startswith("meta-analysis") and "PI" in n for n in names)
    for r in rows:
        # Scores move by at most half a grid cell: statistics agree to 1e-3, relative to their size when larger (a
        # barely trained model's calibration slope is large, and its prediction interval over two centres wide).
        tol = 1e-12 if r["statistic"].startswith(("log-rank", "Cox")) else max(0.001, 1e-3 * abs(r["patient_level"]))
        assert r["abs_difference"] <= tol, r
        if r["reference"] is not None:
            assert abs(r["patient_level"] - r["reference"]) <= 1e-6, r


def test_validate_and_survival_commands_write_every_output(finished_run, capsys):
    assert analysis_main(["validate", str(finished_run), "--bootstrap", "200"]) == 0
    out = capsys.readouterr().out
    assert "DLTRMLP" in out and "pooled external AUC" in out and "aggregate vs patient-level" in out
    assert analysis_main(["survival", str(finished_run)]) == 0
    assert "dltrmlp:response" in capsys.readouterr().out
    analysis = json.loads((finished_run / "analysis.json").read_text())
    assert {"validation", "survival", "equivalence", "headline", "figures", "sharing"} <= set(analysis)
    v = analysis["validation"]
    assert set(v["sites"]) == {"site-d", "site-e"} and v["source"] == "aggregate"
    for block in [*v["sites"].values(), v["pooled"]]:
        for model in ("clinical", "dltr", "dltrmlp"):
            e = block["models"][model]
            assert {"threshold", "brier", "hosmer_lemeshow", "calibration_curve", "decision_curve"} <= set(e)
            if "auc" in e:
                assert e["ci_low"] <= e["auc"] <= e["ci_high"]
    assert set(v["pooled"]["paired"]) == {"dltrmlp vs dltr", "dltrmlp vs clinical", "dltr vs clinical"}
    s = analysis["survival"]["groupings"]["dltrmlp:response"]
    assert s["groups"] == ["predicted non-responder", "predicted responder"] and "pooled" in s
    for name in ("validation.csv", "delong.csv", "survival.csv", "equivalence.csv"):
        with open(finished_run / "tables" / name) as fh:
            assert len(list(csv.reader(fh))) > 1, name
    figures = finished_run / "figures"
    for stem in ("roc-pooled-external", "calibration-site-d", "decision-pooled-external", "km-dltrmlp-response-pooled-external"):
        for ext in ("png", "svg"):
            f = figures / f"{stem}.{ext}"
            assert f.exists() and f.stat().st_size > 5000, f
    assert (figures / "roc-site-d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_patient_level_source_needs_every_site_to_have_opted_in(cohort, tmp_path, capsys):
    out = _run(cohort, tmp_path / "run", **{"share-patient-level": "site-d"})
    data = load_run(out)
    assert [s.sharing for s in data.external] == ["patient-level", "aggregate"]
    with pytest.raises(TaceError, match="site-e did not share patient-level data"):
        validate(data, "patient-level", reps=20)
    assert analysis_main(["validate", str(out), "--source", "patient-level", "--no-figures"]) == 2
    assert "site-e did not share" in capsys.readouterr().err


def test_min_cell_count_sites_still_get_an_analysis(cohort, tmp_path):
    """A site requiring a minimum cell count sends one table per model; one-model statistics are still computed,
    the site's own paired tests come from the DeLong covariance it computed, and the pooled paired test says why it
    is missing."""
    out = _run(cohort, tmp_path / "run", **{"min-cell-count": 0})
    returns = out / "site_returns/site-d.json"
    summary = json.loads(returns.read_text())
    table = summary["scores"]
    m = len(table["models"])
    summary["scores"] = {"bins": table["bins"], "models": table["models"], "microaggregated": 3, "marginals": {
        model: [[c[j], c[m], c[m + 1]] for c in table["cells"]] for j, model in enumerate(table["models"])
    }}  # fmt: skip
    returns.write_text(json.dumps(summary))
    result = validate(load_run(out), reps=20)
    assert result["pooled"]["paired"] == {} and any(n.startswith("pooled external: no paired") and "site-d" in n for n in result["notes"])
    assert {e["source"] for e in result["sites"]["site-d"]["paired"].values()} == {"the site's DeLong covariance"}
    assert result["sites"]["site-e"]["paired"]  # the other site is unaffected


def test_runs_without_survival_data_or_summaries_fail_clearly(tiny_cohort, tmp_path, capsys):
    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, cohort)
    for site in ("site-d", "site-e"):
        path = cohort / "sites" / site / "manifest.csv"
        with path.open() as fh:
            rows = list(csv.DictReader(fh))
        for r in rows:
            r["pfs_days"] = r["pfs_event"] = ""
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    out = _run(cohort, tmp_path / "run")
    assert analysis_main(["validate", str(out), "--bootstrap", "50", "--no-figures"]) == 0
    capsys.readouterr()
    assert analysis_main(["survival", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no external site returned PFS data" in err and "pfs_days" in err and "validation analysis does not need them" in err
    with pytest.raises(TaceError, match="no external site returned PFS"):
        survival_analysis(load_run(out))
    shutil.rmtree(out / "site_returns")
    assert analysis_main(["validate", str(out)]) == 2
    assert "no site_returns/ folder" in capsys.readouterr().err
    assert analysis_main(["validate", str(tmp_path / "nowhere")]) == 2
    assert "run folder not found" in capsys.readouterr().err


def test_a_damaged_site_return_is_named(finished_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    (copy / "site_returns/site-e.json").write_text('{"version": 1, "scores": {"bins": 10}}')
    assert analysis_main(["validate", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "site site-e sent a malformed analysis summary" in err and "Traceback" not in err


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("the report test renders in headless Chromium: install Debian's package `chromium` (`make test` does)")
    return found


def _headless(html: Path, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=10000"]  # fmt: skip
    return subprocess.run([_chromium(), *flags, *args, html.as_uri()], capture_output=True, text=True, timeout=120, check=False)


def test_radiogenomics_and_the_report_render_in_headless_chromium(finished_run, cohort, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "analysis.json").unlink(missing_ok=True)  # the report computes validation and survival itself
    rg = cohort / "radiogenomics"
    code = analysis_main(["radiogenomics", str(run), "--cohort", str(rg / "manifest.csv"), "--expression", str(rg / "expression.csv"),
                          "--gene-sets", str(rg / "gene_sets.gmt"), "--permutations", "200"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "24 patients matched (1 imaging only, 1 expression only)" in out
    features = (run / "radiogenomics" / "features.csv").read_text(encoding="utf-8").splitlines()
    assert len(features) == 26 and features[0].startswith("patient_id,dltrmlp,dltr,radiomics,clinical,feature_000")

    assert analysis_main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "computing validation and survival first" in out
    report = run / "report.html"
    text = report.read_text(encoding="utf-8")
    for heading in ("The question and the cohort", "How the models were trained", "Model comparison", "Calibration", "Heterogeneity across centres",
                    "Where the models work and where they do not: subgroups", "Sample size of the external sites", "Progression-free survival",
                    "Radiogenomics", "what left each site", "Model card", "Reporting checklists", "TRIPOD+AI", "CLAIM 2024",
                    "Software and settings"):  # fmt: skip
        assert heading in text, heading
    assert "http://" not in text and "https://" not in text and 'src="file' not in text  # opens offline, nothing fetched
    assert "site-d-0001" not in text and "rg-0001" not in text  # aggregates only
    assert "Differential privacy was <b>off</b>" in text

    dom = _headless(report, tmp_path / "profile", "--dump-dom").stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    n_images = int(re.search(r'data-images="(\d+)"', body.group(1)).group(1))
    assert n_images == text.count("<img ") and n_images >= 8
    assert 'data-broken="[]"' in body.group(1), body.group(1)
    shot = tmp_path / "report.png"
    _headless(report, tmp_path / "profile2", "--hide-scrollbars", "--window-size=1200,3000", f"--screenshot={shot}")
    assert shot.stat().st_size > 50_000

    # Every table downloads as CSV and every figure as SVG, embedded; the CSV holds the table's numbers.
    assert text.count('download="') == text.count("<table") + n_images
    assert text.count('.svg" href="data:image/svg+xml;base64,') == n_images
    uri = re.search(r'download="calibration.csv" href="data:text/csv;charset=utf-8;base64,([^"]+)"', text)
    rows = list(csv.reader(io.StringIO(base64.b64decode(uri.group(1)).decode("utf-8"))))
    models = json.loads((run / "analysis.json").read_text())["validation"]["pooled"]["models"]
    assert rows[0][:6] == ["population", "model", "patients", "observed responders", "expected", "O/E"]
    assert len(rows) == 1 + 3 * len(models)  # site-d, site-e and pooled external, every model

    # Printed to PDF (A4): every figure whole on one page (a figure cut by a page break is drawn on two pages).
    pdf = tmp_path / "report.pdf"
    _headless(report, tmp_path / "profile3", "--no-pdf-header-footer", f"--print-to-pdf={pdf}")
    pages = pdf_page_images(pdf.read_bytes())
    drawn = [n for page in pages for n in page]
    assert len(drawn) == len(set(drawn)) == n_images, pages
    assert 8 <= len(pages) <= 40


def test_a_leave_one_centre_out_run_is_summarised_as_internal_external_cross_validation(finished_run, tmp_path):
    """In the leave-one-centre-out layout the held-out centres' meta-analysis is the internal-external
    cross-validation, and the report says so."""
    from tace.analysis.report import write_report
    from tace.analysis.study import analyse

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    data = load_run(run)
    data.layout = "loco"
    analysis, _ = analyse(data, ("validation",), reps=20, figures=False)
    assert analysis["validation"]["meta"]["layout"] == "loco"
    text = write_report(run)[0].read_text(encoding="utf-8")
    assert '<h2 id="heterogeneity">5. Internal-external cross-validation (leave-one-centre-out)</h2>' in text


def test_the_report_of_an_analysis_from_before_these_statistics_says_to_rerun(finished_run, tmp_path):
    from tace.analysis.report import write_report

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    assert analysis_main(["validate", str(run), "--bootstrap", "20", "--no-figures"]) == 0
    analysis = json.loads((run / "analysis.json").read_text())
    v = analysis["validation"]
    for key in ("meta", "subgroups", "sample_size"):
        del v[key]
    for block in [*v["sites"].values(), v["pooled"]]:
        for e in block["models"].values():
            e.pop("calibration", None)
    (run / "analysis.json").write_text(json.dumps(analysis))
    text = write_report(run)[0].read_text(encoding="utf-8")
    for note in ("No calibration statistics in analysis.json", "No meta-analysis in analysis.json", "No subgroup tables",
                 "No sample-size section in analysis.json"):  # fmt: skip
        assert note in text, note


def test_the_equivalence_line_names_the_largest_difference_and_why_it_is_approximate():
    """The demo's and `tace-analysis validate`'s one line on aggregate vs patient-level: the count of equal statistics,
    the largest difference with its statistic, and under a minimum cell count why pooled statistics differ."""
    from tace.analysis.study import equivalence_line

    rows = [{"statistic": "AUC DLTR", "abs_difference": 0.0}, {"statistic": "log-rank chi2 dltrmlp:response", "abs_difference": 3.6},
            {"statistic": "Cox HR dltr:risk", "abs_difference": None}]  # fmt: skip
    line = equivalence_line(rows, 5)
    assert "1 of 2 statistics equal to 1e-6" in line and "3.6 (log-rank chi2 dltrmlp:response)" in line
    assert "minimum cell count (5)" in line and "per-site and stratified ones are exact" in line
    assert "minimum cell count" not in equivalence_line(rows, 0)
    assert "minimum cell count" not in equivalence_line(rows[:1], 5)  # nothing differs: nothing to explain
