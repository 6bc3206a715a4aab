"""The synthetic multi-centre cohort: shape, determinism, ground truth, and the study's signal structure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import stats
from sklearn.metrics import roc_auc_score

from tace.common.imageio import read_image
from tace.common.manifest import parse_manifest
from tace.common.validate import check_site
from tace.simulation.cohort import W_CLIN, W_IMG, CentreProfile, _plan_centre, generate_cohort, make_preset
from tace.simulation.radiogenomics import HALLMARK_PLANTED
from tests.conftest import HALLMARK_GMT


def file_bytes(root: Path) -> dict[str, bytes]:
    """Every file the generator wrote (runs on a cohort add cache/ and runs/ folders beside them)."""
    written = (p for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root).parts[0] not in ("cache", "runs"))
    return {str(p.relative_to(root)): p.read_bytes() for p in written}


def test_tiny_shape(tiny_cohort):
    meta = json.loads((tiny_cohort / "cohort.json").read_text())
    roles = [s["suggested_role"] for s in meta["sites"]]
    assert roles == ["train", "train", "train", "holdout", "holdout"]
    assert {s["image_format"] for s in meta["sites"]} == {"nii.gz", "nrrd", "mha", "nii"}
    for site in meta["sites"]:
        manifest = parse_manifest(tiny_cohort / site["manifest"])
        assert 5 <= len(manifest.records) <= 8 and manifest.problems == []
        splits = {r.split for r in manifest.records}
        assert splits == ({"train", "val"} if site["suggested_role"] == "train" else {"test"})
        image = read_image(manifest.records[0].image_path("arterial", manifest.root))
        assert max(image.GetSize()) <= 16
    assert check_site(tiny_cohort / "radiogenomics/manifest.csv").ok


def test_deterministic_for_a_seed_and_independent_of_workers(tmp_path, tiny_cohort):
    preset = make_preset("tiny")
    generate_cohort(tmp_path / "again", preset, seed=7, workers=2)
    assert file_bytes(tmp_path / "again") == file_bytes(tiny_cohort)
    generate_cohort(tmp_path / "other", preset, seed=8)
    a = pd.read_csv(tiny_cohort / "ground_truth/patients.csv")
    b = pd.read_csv(tmp_path / "other/ground_truth/patients.csv")
    assert not np.allclose(a["p_true"], b["p_true"])


def test_ground_truth_consistent(tiny_cohort):
    truth = json.loads((tiny_cohort / "ground_truth/truth.json").read_text())
    patients = pd.read_csv(tiny_cohort / "ground_truth/patients.csv")
    # Response model as documented.
    intercept = patients["site_id"].map(truth["response_model"]["intercepts"])
    np.testing.assert_allclose(patients["logit"], intercept + W_IMG * patients["u_img"] + W_CLIN * patients["clinical_score"], atol=1e-9)
    np.testing.assert_allclose(patients["p_true"], 1 / (1 + np.exp(-patients["logit"])), atol=1e-12)
    # Oracle AUCs recomputed independently from the saved probabilities.
    for site, df in patients.groupby("site_id"):
        ev = df[df["split"].isin(["val", "test"])]
        saved = truth["oracle"]["sites"][site]["auc"]
        if ev["response"].nunique() == 2:
            assert saved == pytest.approx(roc_auc_score(ev["response"], ev["p_true"]), abs=1e-12)
        else:
            assert saved is None
        assert truth["oracle"]["sites"][site]["auc_all_patients"] == pytest.approx(roc_auc_score(df["response"], df["p_true"]), abs=1e-12)
    # The manifests carry exactly the truth's outcomes.
    for site, df in patients.groupby("site_id"):
        m = parse_manifest(tiny_cohort / f"sites/{site}/manifest.csv")
        assert [r.response for r in m.records] == df["response"].tolist()
        assert [r.pfs_event for r in m.records] == (df["pfs_true_days"] <= df["censor_days"]).astype(int).tolist()


def test_nothing_outside_ground_truth_mentions_the_latents(tiny_cohort):
    for path in tiny_cohort.rglob("*"):
        if path.is_file() and "ground_truth" not in path.parts and path.suffix in (".csv", ".json"):
            text = path.read_text()
            assert "u_img" not in text and "p_true" not in text, path


@pytest.fixture(scope="module")
def population():
    """A large planned (not rendered) centre: the generative model's statistics without image cost."""
    centre = CentreProfile("pop", "holdout", 4000, make_preset("tiny").centres[0].acquisition)
    rows, truth, _ = _plan_centre(centre, np.random.default_rng(123), 0.0)
    return pd.DataFrame(rows), pd.DataFrame(truth)


def test_fusion_beats_either_part_alone(population):
    _, truth = population
    y = truth["response"]
    oracle = roc_auc_score(y, truth["p_true"])
    image_only = roc_auc_score(y, truth["u_img"])
    clinical_only = roc_auc_score(y, truth["clinical_score"])
    assert 0.82 <= oracle <= 0.90
    assert 0.68 <= image_only <= 0.80 and 0.68 <= clinical_only <= 0.80
    assert oracle - max(image_only, clinical_only) >= 0.07
    assert 0.40 <= y.mean() <= 0.65


def test_phenotype_follows_the_imaging_latent(population):
    _, truth = population
    assert stats.spearmanr(truth["u_img"], truth["aphe"])[0] > 0.8
    assert stats.spearmanr(truth["u_img"], truth["capsule"])[0] > 0.6
    assert stats.spearmanr(truth["u_img"], truth["necrosis"])[0] < -0.7
    assert stats.spearmanr(truth["u_img"], truth["heterogeneity"])[0] < -0.6


def test_clinical_distributions_and_correlations(population):
    rows, truth = population
    afp = rows["afp_ng_ml"].dropna().astype(float)
    assert abs(stats.skew(np.log10(afp))) < 0.5 and stats.skew(afp) > 3  # roughly log-normal
    assert 0.1 <= (afp >= 400).mean() <= 0.35
    d = truth.set_index("patient_id")["diameter_true_mm"]
    by_stage = rows.assign(d=rows["patient_id"].map(d)).groupby("bclc_stage")["d"].median()
    assert by_stage["A"] < by_stage["B"]
    assert (rows.loc[rows["portal_vein_invasion"] == 1, "bclc_stage"] == "C").all()
    assert (rows["sex"] == "M").mean() == pytest.approx(0.82, abs=0.03)
    missing = rows["afp_ng_ml"].isna().mean()
    assert 0.02 <= missing <= 0.09


def test_pfs_depends_on_response_with_censoring(population):
    rows, _ = population
    from lifelines.statistics import logrank_test

    resp = rows[rows["response"] == 1]
    non = rows[rows["response"] == 0]
    assert resp["pfs_days"].median() > 1.5 * non["pfs_days"].median()
    assert logrank_test(resp["pfs_days"], non["pfs_days"], resp["pfs_event"], non["pfs_event"]).p_value < 1e-10
    assert 0.1 <= 1 - rows["pfs_event"].mean() <= 0.5


def test_radiogenomics_expression(tiny_cohort):
    expr = pd.read_csv(tiny_cohort / "radiogenomics/expression.csv", index_col=0)
    truth = json.loads((tiny_cohort / "ground_truth/truth.json").read_text())["radiogenomics"]
    m = parse_manifest(tiny_cohort / "radiogenomics/manifest.csv")
    ids = {r.patient_id for r in m.records}
    assert set(truth["image_only_patients"]) == ids - set(expr.columns)
    assert set(truth["expression_only_samples"]) == set(expr.columns) - ids
    assert expr.shape[0] == truth["n_genes"] and (expr.to_numpy() >= 0).all()
    assert all(m.records[i].response is None for i in range(len(m.records)))


def test_planted_hallmark_genes_follow_the_phenotype(tmp_path):
    from tace.simulation.radiogenomics import make_expression

    rng = np.random.default_rng(0)
    u = rng.normal(size=300)
    expr, meta = make_expression(rng, [f"p{i}" for i in range(300)], u, n_genes=20000, gene_sets=HALLMARK_GMT)
    assert meta["planted_pathways"] == list(HALLMARK_PLANTED)
    assert expr.shape == (20000, 300) and "VEGFA" in expr.index
    log = np.log2(expr + 1)
    log = log[log.std(axis=1) > 0]  # genes never expressed (as in real RNA-seq) have no correlation
    r = log.T.corrwith(pd.Series(u, index=expr.columns), method="spearman")
    planted = [g for genes in meta["responsive_genes"].values() for g in genes]
    planted = [g for g in planted if g in r.index]
    others = r.drop(index=planted)
    assert r[planted].abs().mean() > 0.3
    assert others.abs().mean() < 0.08
    for pathway, genes in meta["responsive_genes"].items():
        assert np.sign(r[genes].mean()) == meta["planted_signs"][pathway]


def _sim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tace.simulation.cli", *args], capture_output=True, text=True, timeout=300)


def test_cohort_cli(tmp_path):
    out = tmp_path / "c"
    ok = _sim(
        "cohort", "--preset", "tiny", "--seed", "1", "--out", str(out), "--n-sites", "7", "--patients-per-site", "3", "--format", "dicom"
    )
    assert ok.returncode == 0, ok.stderr
    meta = json.loads((out / "cohort.json").read_text())
    assert [s["suggested_role"] for s in meta["sites"]] == ["train"] * 5 + ["holdout"] * 2
    assert check_site(out / "sites/site-g/manifest.csv", deep=True).ok
    assert (out / "sites/site-a/images/site-a-0001/arterial").is_dir()
    again = _sim("cohort", "--preset", "tiny", "--out", str(out))
    assert again.returncode == 2 and "not empty" in again.stderr and "--force" in again.stderr and "Traceback" not in again.stderr
    assert _sim("cohort", "--preset", "tiny", "--out", str(out), "--force", "--workers", "1").returncode == 0
    assert _sim("cohort", "--preset", "huge", "--out", str(out)).returncode == 2


def test_demo_command_on_tiny(tmp_path):
    out = tmp_path / "demo"
    # The tiny cohort's validation splits hold 3 patients: under the default minimum cell count (5) they would send
    # counts only (no cut-offs, so no survival analysis), so its simulated sites use 3.
    short = "rounds=2 head-rounds=2 clinical-rounds=2 radiomics-rounds=2 min-cell-count=3"
    first = _sim("demo", "--preset", "tiny", "--out", str(out), "--run-config", short)
    assert first.returncode == 0, first.stdout + first.stderr
    for site in ("site-a", "site-b", "site-c", "site-d", "site-e"):
        assert site in first.stdout
    assert "holdout" in first.stdout and "(0 cached)" in first.stdout and "(3, 8, 8, 8)" in first.stdout
    assert "DLTRMLP" in first.stdout and "oracle" in first.stdout and "holdout pooled" in first.stdout
    (run,) = (out / "runs").iterdir()
    assert json.loads((run / "summary.json").read_text())["mode"] == "federated"
    assert "patient cards:" in first.stdout and len(list((run / "predictions" / "site-d" / "cards").glob("*.html"))) == 5
    second = _sim("demo", "--preset", "tiny", "--out", str(out), "--run-config", "rounds=0")
    assert "using the existing" in second.stdout and "(8 cached)" in second.stdout
    assert second.returncode == 2 and "rounds must be at least 1" in second.stderr
    clash = _sim("demo", "--preset", "tiny", "--seed", "5", "--out", str(out))
    assert clash.returncode == 2 and "seed" in clash.stderr


@pytest.mark.slow
def test_demo_preset_at_full_resolution(tmp_path):
    """Realistic volume sizes (demo preset, 3 patients per site): generated, deep-checked and preprocessed."""
    out = tmp_path / "demo"
    generate_cohort(out, make_preset("demo", patients_per_site=3), seed=0, workers=2)
    from tace.client.cache import PreprocessCache
    from tace.common.preprocess import PreprocessConfig

    for site in ("site-a", "site-b", "site-c", "site-d", "site-e"):
        manifest = parse_manifest(out / f"sites/{site}/manifest.csv")
        assert check_site(manifest, deep=True).ok
        image = sitk.ReadImage(str(manifest.records[0].image_path("arterial", manifest.root)))
        assert min(image.GetSize()) >= 30 and max(image.GetSpacing()) >= 4.0
        cache = PreprocessCache(tmp_path / "cache" / site, PreprocessConfig())
        for r in manifest.records:
            array = cache.load(r, manifest.root).array
            assert array.shape == (3, 32, 48, 48) and np.isfinite(array).all()
