"""Using a finished study at a hospital: the exported model file, `tace-client predict` (probabilities, groups,
saliency maps, patient cards) and local fine-tuning (`tace-client finetune`, and the run option `finetune`)."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tace.client.cli import main as client_main
from tace.common.artifact import TrainedModels, read_model
from tace.common.config import RunConfig, parse_overrides
from tace.common.errors import TaceError
from tests.flower_grid import InProcessGrid, study, task_identity  # noqa: F401 (an autouse fixture)
from tests.helpers import read_rows, render_report, set_cell, write_rows

# The tiny cohort's validation splits hold 3 patients: under the default minimum cell count (5) they would send counts
# only (no cut-offs, no internal AUC), so its simulated sites use 3.
SHORT = "spacing-mm='8,8,8' box-voxels='8,8,8' rounds=2 head-rounds=2 clinical-rounds=2 radiomics-rounds=2 min-cell-count=3"
SITES = [0, 1, 2, 3, 4]


def config(cohort: Path, out: Path, extra: str = "") -> RunConfig:
    return RunConfig.from_run_config({**parse_overrides(SHORT + " " + extra), "cohort": str(cohort), "run-dir": str(out)})


@pytest.fixture(scope="module")
def finished(tiny_cohort, tmp_path_factory):
    """A finished federated run of the tiny cohort whose training sites fine-tuned the final model ('head')."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    try:
        run = config(tiny_cohort, tmp_path_factory.mktemp("predict") / "run", "finetune='head'")
        summary = study(InProcessGrid(run, SITES), run)
        return Path(run.run_dir), summary
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def csv_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {r["patient_id"]: r for r in csv.DictReader(fh)}


# -- the model file -------------------------------------------------------------------------------------------


def test_the_model_file_holds_everything_to_predict_and_nothing_about_patients(finished, tiny_cohort):
    run_dir, _ = finished
    path = run_dir / "models" / "tace-model.zip"
    art = read_model(path)
    assert art.backbone == "small" and set(art.arrays) == {"dltr", "head", "clinical", "radiomics"}
    assert art.preprocess.box_voxels == (8, 8, 8) and art.cutoffs["dltrmlp"]["risk_groups"] and art.bins == 100_000
    assert art.training["head-lr"] == 0.005 and art.encoder["clinical"]["features"] and art.encoder["radiomics"]["std"]
    blob = zipfile.ZipFile(path).read("model.json").decode() + str(zipfile.ZipFile(path).namelist())
    ids = {r["patient_id"] for s in "abcde" for r in read_rows(tiny_cohort / f"sites/site-{s}/manifest.csv")[1]}
    assert not any(pid in blob for pid in ids) and str(tiny_cohort) not in blob  # no patient, no site path


def _rewrite(path: Path, out: Path, change, redigest: bool = True) -> Path:
    """A copy of a model file with `change(card, weights)` applied; re-digested as a file another version wrote would be."""
    from tace.common.artifact import _card_digest

    with zipfile.ZipFile(path) as z:
        card, weights = json.loads(z.read("model.json")), z.read("weights.npz")
    card, weights = change(card, weights)
    if redigest:
        arrays: dict = {"dltr": {}, "head": {}, "clinical": {}, "radiomics": {}}
        for k, v in np.load(io.BytesIO(weights)).items():
            arrays[k.split(".", 1)[0]][k.split(".", 1)[1]] = v
        card["sha256"] = _card_digest(card, arrays)
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("model.json", json.dumps(card))
        z.writestr("weights.npz", weights)
    return out


def test_an_incompatible_or_damaged_model_file_is_a_clear_error(finished, tmp_path, monkeypatch, capsys):
    path = finished[0] / "models" / "tace-model.zip"

    def newer(card, w):
        return {**card, "format": "tace-model/9", "tace_fl_version": "9.0"}, w

    def tampered(card, w):
        z = dict(np.load(io.BytesIO(w)))
        z["head.mlp.3.bias"] = z["head.mlp.3.bias"] + 1
        buffer = io.BytesIO()
        np.savez(buffer, **z)
        return card, buffer.getvalue()

    with pytest.raises(TaceError, match=r"(?s)cannot read.*install TACE-FL 9.0"):
        read_model(_rewrite(path, tmp_path / "a.zip", newer))
    with pytest.raises(TaceError, match="does not match the digest"):
        read_model(_rewrite(path, tmp_path / "b.zip", tampered, redigest=False))
    with pytest.raises(TaceError, match="does not match the digest"):  # an edited card (here: the cut-offs)
        read_model(_rewrite(path, tmp_path / "e.zip", lambda c, w: ({**c, "cutoffs": {}}, w), redigest=False))
    with pytest.raises(TaceError, match="preprocessing or clinical factors differ"):
        read_model(
            _rewrite(path, tmp_path / "c.zip", lambda c, w: ({**c, "preprocessing": {**c["preprocessing"], "pipeline_version": 0}}, w))
        )
    (tmp_path / "d.zip").write_bytes(b"not a zip")
    with pytest.raises(TaceError, match="not a TACE-FL model file"):
        read_model(tmp_path / "d.zip")
    monkeypatch.setattr("tace.common.models.model_signature", lambda *a: "0123456789abcdef")
    with pytest.raises(TaceError, match="model differs from this version's"):
        read_model(path)
    monkeypatch.undo()
    # The command says so before reading any image, with exit status 2.
    assert client_main(["predict", "--model", str(tmp_path / "d.zip"), "--manifest", "x.csv", "--out", str(tmp_path / "o")]) == 2
    assert "not a TACE-FL model file" in capsys.readouterr().err and not (tmp_path / "o").exists()


# -- prediction -----------------------------------------------------------------------------------------------


def test_predictions_equal_those_of_the_run(finished, tiny_cohort, tmp_path, capsys):
    run_dir, _ = finished
    manifest = tiny_cohort / "sites/site-d/manifest.csv"
    out = tmp_path / "pred"
    assert client_main(["predict", "--model", str(run_dir / "models/tace-model.zip"), "--manifest", str(manifest), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "patients/s" in printed and "cards in" in printed
    ours, theirs = csv_rows(out / "predictions.csv"), csv_rows(run_dir / "sites/site-d/predictions.csv")
    assert ours.keys() == theirs.keys()
    for pid, row in ours.items():
        for model in ("dltrmlp", "dltr", "clinical"):
            assert abs(float(row[model]) - float(theirs[pid][model])) < 2e-6, (pid, model)
        # the group follows the cut-off fixed on the training sites
        cut = json.loads((run_dir / "cutoffs.json").read_text())["dltrmlp"]
        responder = int(float(row["dltrmlp"]) * 100_000) >= cut["youden_bin"]
        assert row["predicted_group"] == ("predicted responder" if responder else "predicted non-responder")
        assert row["pfs_risk_group"] in cut["risk_groups"] and row["known_response"] in ("0", "1")
        assert 0 <= float(row["saliency_in_tumour"]) <= 1
    cards = sorted((out / "cards").glob("*.html"))
    assert [c.stem for c in cards] == sorted(ours)
    card = cards[0].read_text(encoding="utf-8")
    assert "data:image/png;base64," in card and "predicted" in card and "not a medical device" in card
    assert "http://" not in card and "https://" not in card  # opens offline
    assert all(f"cards/{pid}.html" in (out / "index.html").read_text() for pid in ours)


def test_the_card_shows_the_saliency_share_of_the_predictions(finished, tiny_cohort, tmp_path, monkeypatch):
    """Each card prints the patient's saliency share in and around the tumour, and the region's share of the box, as
    the numbers predictions.csv holds (to the card's two decimals)."""
    from tace.common import saliency

    # The tiny cohort's tumours fill the whole box, so both shares are 1: scale them to tell the two columns apart.
    measured = saliency.mass_fraction
    monkeypatch.setattr(saliency, "mass_fraction", lambda *a: tuple(v * f for v, f in zip(measured(*a), (0.5, 0.25), strict=True)))
    run_dir, _ = finished
    manifest = tiny_cohort / "sites/site-e/manifest.csv"
    ids = [r["patient_id"] for r in read_rows(manifest)[1][:2]]
    out = tmp_path / "pred"
    args = ["predict", "--model", str(run_dir), "--manifest", str(manifest), "--out", str(out)]
    assert client_main([*args, "--patient", ids[0], "--patient", ids[1]]) == 0
    table = csv_rows(out / "predictions.csv")
    assert sorted(table) == sorted(ids)
    shown = re.compile(r"saliency in and around the tumour</th><td>([0-9.]+) of the map \(the region is ([0-9.]+) of the box\)")
    for pid, row in table.items():
        found = shown.search((out / "cards" / f"{pid}.html").read_text(encoding="utf-8"))
        assert found, f"the card of {pid} shows no saliency share"
        assert float(found[1]) == pytest.approx(float(row["saliency_in_tumour"]), abs=0.005)
        assert float(found[2]) == pytest.approx(float(row["saliency_chance"]), abs=0.005)
        assert abs(float(row["saliency_in_tumour"]) - float(row["saliency_chance"])) > 0.01  # the card cannot mix them up


def test_a_patient_id_is_text_on_the_pages_never_markup(finished, tiny_cohort):
    """The card and the index escape whatever a patient id or a group name holds, and the index's link is a URL."""
    import pandas as pd

    from tace.client.predict import Explanation, render_card, render_index
    from tace.common.manifest import parse_manifest

    evil = "<img src=x onerror=alert(1)>&\"'"
    trained = TrainedModels.load(finished[0])
    record = replace(parse_manifest(tiny_cohort / "sites/site-d/manifest.csv").records[0], patient_id=evil)
    mask = np.zeros((8, 8, 8), np.uint8)
    mask[3:6, 3:6, 3:6] = 1
    rng = np.random.default_rng(0)
    image, saliency = rng.normal(size=(3, 8, 8, 8)).astype(np.float32), rng.uniform(size=(3, 8, 8, 8))
    explanation = Explanation(record, image, saliency, mask, (8.0, 8.0, 8.0), 0.5, 0.1)
    row = {"patient_id": evil, "dltrmlp": 0.7, "dltr": 0.6, "radiomics": 0.55, "clinical": 0.5, "predicted_group": "predicted responder", "cutoff": 0.4,
           "pfs_risk_group": "<b>low risk</b>", "saliency_in_tumour": 0.5, "saliency_chance": 0.1}  # fmt: skip
    card, index = render_card(explanation, row, trained), render_index(pd.DataFrame([row]), trained)
    for page in (card, index):
        assert "<img src=x" not in page and "<b>low risk" not in page
        assert "&lt;img src=x onerror=alert(1)&gt;&amp;&#34;&#39;" in page and "&lt;b&gt;low risk&lt;/b&gt;" in page
    assert card.count("<img ") == 1  # the saliency figure, nothing else
    assert 'href="cards/%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E%26%22%27.html"' in index


def test_new_patients_without_responses_and_bad_input(finished, tiny_cohort, tmp_path, capsys):
    run_dir, _ = finished
    site = tmp_path / "new"
    shutil.copytree(tiny_cohort / "sites/site-e", site)
    header, rows = read_rows(site / "manifest.csv")
    drop = [c for c in header if c in ("response", "pfs_days", "pfs_event")]
    write_rows(site / "manifest.csv", [c for c in header if c not in drop], [{k: v for k, v in r.items() if k not in drop} for r in rows])
    out = tmp_path / "pred"
    args = ["predict", "--model", str(run_dir), "--manifest", str(site / "manifest.csv"), "--out", str(out), "--no-cards"]
    assert client_main(args) == 0
    table = csv_rows(out / "predictions.csv")
    assert len(table) == len(rows) and "known_response" not in next(iter(table.values())) and not (out / "cards").exists()
    capsys.readouterr()
    row = set_cell(site / "manifest.csv", 1, "age", "two hundred")
    assert client_main([*args[:-3], "--out", str(tmp_path / "pred2")]) == 1
    err = capsys.readouterr().err
    assert f"row {row}" in err and "age" in err and "No prediction was made" in err
    assert not (tmp_path / "pred2").exists()


# -- fine-tuning ---------------------------------------------------------------------------------------------


def test_finetune_command_adapts_the_head_or_the_last_stage(finished, tiny_cohort, tmp_path, capsys):
    run_dir, _ = finished
    manifest = str(tiny_cohort / "sites/site-b/manifest.csv")
    global_ = read_model(run_dir)
    for flag, out in (([], tmp_path / "head"), (["--last-stage", "--epochs", "2"], tmp_path / "last")):
        assert client_main(["finetune", "--model", str(run_dir), "--manifest", manifest, "--out", str(out), *flag]) == 0
        assert "DLTRMLP AUC global" in capsys.readouterr().out
        report = json.loads((out / "finetune.json").read_text())
        assert report["n_train"] > 0 and report["n_val"] > 0 and {"global_auc", "finetuned_auc"} <= set(report)
        tuned = read_model(out / "tace-model-finetuned.zip")  # usable with `tace-client predict`
        assert tuned.cutoffs == global_.cutoffs
        changed = {k for k, v in tuned.arrays["dltr"].items() if not np.array_equal(v, global_.arrays["dltr"][k])}
        assert any(not np.array_equal(v, global_.arrays["head"][k]) for k, v in tuned.arrays["head"].items())
        assert np.array_equal(tuned.arrays["clinical"]["linear.weight"], global_.arrays["clinical"]["linear.weight"])
        if flag:  # only the backbone's last stage moved
            assert changed and all(k.startswith("backbone.body.7.") for k in changed)
        else:
            assert not changed


def test_the_run_option_finetunes_at_every_training_site(finished):
    run_dir, summary = finished
    sites = summary["finetune"]["sites"]
    assert summary["finetune"]["mode"] == "head" and set(sites) == {"site-a", "site-b", "site-c"}
    for site, entry in sites.items():
        assert {"global_auc", "finetuned_auc", "n_train", "n_val"} <= set(entry), site
        tuned = read_model(run_dir / "sites" / site / "finetuned" / "model" / "tace-model.zip")  # the fine-tuned model stays at the site
        assert "not refitted" in tuned.cutoffs_note and "without differential privacy" in tuned.privacy["note"]
    assert json.loads((run_dir / "finetune.json").read_text())["sites"] == json.loads(json.dumps(sites))
    # The same run's global AUC on a site's validation split is what the final evaluation measured there.
    val = summary["models"]["dltrmlp"]["sites"]["site-b"]["auc"]
    assert sites["site-b"]["global_auc"] == pytest.approx(val) if val is not None else sites["site-b"]["global_auc"] is None


def test_the_report_shows_the_fine_tuning(finished, tmp_path, capsys):
    text = render_report(finished[0], tmp_path)
    assert "Local fine-tuning at the training sites (head)" in text and "site-c" in text


def test_trained_models_load_from_file_or_run_folder(finished):
    a, b = TrainedModels.load(finished[0]), TrainedModels.load(finished[0] / "models" / "tace-model.zip")
    assert a.path == b.path and torch.equal(next(a.models.dltr.parameters()), next(b.models.dltr.parameters()))
    with pytest.raises(TaceError, match="holds no exported model"):
        TrainedModels.load(finished[0] / "sites")


def test_a_model_with_the_linear_head_round_trips_through_its_files(finished, tmp_path):
    """A run trained under DP ships the linear fusion head: its model file, state dicts and portable programs read
    back as that form, with the same DLTRMLP outputs."""
    from tace.common.artifact import save_run_models
    from tace.common.clinical import FEATURES
    from tace.common.models import LinearFusionHead, StudyModels, start_fusion_head

    art = read_model(finished[0])
    linear = StudyModels.build(art.backbone, len(art.preprocess.sequences), len(FEATURES), fusion_head="linear").arrays()["head"]
    linear = start_fusion_head({**art.arrays, "head": linear})
    linear["score.weight"] = np.array([[1.5, 0.5, -0.75]], dtype=np.float32)
    linear["logit_scale"] = np.array([[0.1, -0.4, 0.3], [0.05, 1.7, 0.35]], dtype=np.float32)  # means, spreads
    save_run_models(tmp_path / "models", replace(art, arrays={**art.arrays, "head": linear}))
    loaded = TrainedModels.load(tmp_path / "models" / "tace-model.zip")
    assert isinstance(loaded.models.head, LinearFusionHead)
    assert np.array_equal(loaded.models.head.score.weight.detach().numpy(), linear["score.weight"])
    assert np.array_equal(loaded.models.head.logit_scale.numpy(), linear["logit_scale"])
    program = torch.export.load(tmp_path / "models" / "dltrmlp.pt2").module()
    image = torch.randn(2, *art.preprocess.shape)
    clinical, radiomics = torch.randn(2, len(FEATURES)), torch.randn(2, loaded.models.head.radiomics_dim)
    models = loaded.models
    models.dltr.eval()
    with torch.no_grad():
        want = torch.sigmoid(models.head(models.dltr.features(image), clinical, radiomics))
        torch.testing.assert_close(program(image, clinical, radiomics), want)


@pytest.mark.gpu
def test_prediction_on_the_gpu_matches_the_cpu(finished, tiny_cohort, tmp_path):
    from tace.client.predict import PredictOptions, predict

    trained = TrainedModels.load(finished[0])
    manifest = tiny_cohort / "sites/site-d/manifest.csv"
    cpu = predict(trained, manifest, tmp_path / "cpu", tmp_path / "cache", PredictOptions("cpu", cards=False)).table
    gpu = predict(trained, manifest, tmp_path / "gpu", tmp_path / "cache", PredictOptions("cuda", cards=False)).table
    assert np.allclose(cpu[["dltrmlp", "dltr", "clinical"]], gpu[["dltrmlp", "dltr", "clinical"]], atol=2e-2)  # bf16 autocast on the GPU


# -- saliency -------------------------------------------------------------------------------------------------


class _Masked(torch.nn.Module):
    """A backbone that sees only the voxels of `mask` (a model whose decision provably rests on one region)."""

    def __init__(self, backbone: torch.nn.Module, mask: torch.Tensor) -> None:
        super().__init__()
        self.backbone, self.mask = backbone, mask
        self.out_features = backbone.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x * self.mask)


def test_gradient_saliency_finds_the_region_a_model_looks_at():
    from tace.common.models import StudyModels
    from tace.common.saliency import Explainer, mass_fraction, total, tumour_region

    mask = np.zeros((16, 24, 24), np.uint8)
    mask[5:11, 8:16, 8:16] = 1
    models = StudyModels.build("small", 3, 14, seed=1)
    models.dltr.backbone = _Masked(models.dltr.backbone, torch.from_numpy(mask).float())
    image = np.random.default_rng(0).normal(size=(3, 16, 24, 24)).astype(np.float32)
    saliency = Explainer(models, "small")(image, np.zeros(14, np.float32))
    assert saliency.shape == image.shape and saliency.min() >= 0 and saliency.max() == pytest.approx(1.0)
    inside, chance = mass_fraction(total(saliency), tumour_region(mask, (2, 2, 2)))
    assert chance < 0.3 and inside > 0.9  # all of it but the smoothing's spill over the border
    cam = Explainer(StudyModels.build("small", 3, 14), "small", method="gradcam")(image, np.zeros(14, np.float32))
    assert cam.shape == image.shape and np.isfinite(cam).all()


@pytest.mark.slow
def test_saliency_concentrates_on_the_tumour_of_generated_patients(tmp_path):
    """A synthetic case from the project's generator at the demo's resolution: a model trained on one centre, then
    its saliency maps on an external centre's patients put more of their mass in and around the tumour than the
    region's share of the box (the measured figures are in docs/prediction.md)."""
    from tace.simulation.cohort import generate_cohort, make_preset
    from tace.simulation.runner import run_reference

    cohort = tmp_path / "cohort"
    generate_cohort(cohort, make_preset("demo", n_sites=3, patients_per_site=36), seed=3)
    run = RunConfig.from_run_config({**parse_overrides("rounds=8 head-rounds=6 clinical-rounds=4 radiomics-rounds=4 patience=0 holdout-sites='site-b,site-c'"),
                                     "cohort": str(cohort), "run-dir": str(tmp_path / "run")})  # fmt: skip
    run_reference("centralized", cohort, tmp_path / "run", run)
    out = tmp_path / "pred"
    assert client_main(["predict", "--model", str(tmp_path / "run"), "--manifest", str(cohort / "sites/site-c/manifest.csv"),
                        "--out", str(out), "--no-cards"]) == 0  # fmt: skip
    table = csv_rows(out / "predictions.csv")
    inside = np.array([float(r["saliency_in_tumour"]) for r in table.values()])
    chance = np.array([float(r["saliency_chance"]) for r in table.values()])
    # Measured with seed 3: median share 0.29 against a median region share of 0.18, 35 of 36 patients above chance
    # (seeds 4 and 5: 0.33 against 0.17 and 0.75 against 0.22; 35 and 36 of 36). How far above chance depends on how
    # much the image model learned from one centre's 36 patients (its external AUC was 0.55-0.70 on these seeds).
    assert np.median(inside) > 1.3 * np.median(chance) and np.mean(inside > chance) > 0.8, (np.median(inside), np.median(chance))


def test_the_model_card_travels_in_the_model_file_and_shows_on_every_page(finished, tiny_cohort, tmp_path):
    """The analysis packs the run's model card into the model file (covered by its digest, the weights untouched);
    `tace-client predict` shows it in every patient card's footer and in index.html, as text."""
    from tace.analysis.cli import main as analysis_main
    from tace.common.artifact import attach_model_card

    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    path = run / "models" / "tace-model.zip"
    before = read_model(path)
    assert before.model_card == {}
    assert analysis_main(["validate", str(run), "--bootstrap", "20", "--no-figures"]) == 0
    card = json.loads((run / "model_card.json").read_text(encoding="utf-8"))
    assert card["format"] == "tace-model-card/1" and card["limits"] and "intended_use" in card
    assert "| DLTRMLP |" in (run / "model_card.md").read_text(encoding="utf-8")
    after = read_model(path)
    assert after.model_card == card
    assert all(np.array_equal(after.arrays[s][k], v) for s in before.arrays for k, v in before.arrays[s].items())
    assert after.cutoffs == before.cutoffs and after.signature == before.signature

    edited = tmp_path / "edited.zip"  # a card changed after packing is refused like changed weights
    with zipfile.ZipFile(path) as z, zipfile.ZipFile(edited, "w") as out:
        for name in z.namelist():
            data = z.read(name)
            out.writestr(name, data.replace(b"Research use", b"Clinical use") if name == "model_card.json" else data)
    with pytest.raises(TaceError, match="does not match the digest"):
        read_model(edited)

    attach_model_card(path, {**card, "limits": ["<script>alert(1)</script> small sites"]})  # replaces the card packed before
    assert read_model(path).model_card["limits"] == ["<script>alert(1)</script> small sites"]
    manifest = tiny_cohort / "sites/site-d/manifest.csv"
    out = tmp_path / "pred"
    pid = read_rows(manifest)[1][0]["patient_id"]
    assert client_main(["predict", "--model", str(path), "--manifest", str(manifest), "--out", str(out), "--patient", pid]) == 0
    for page in ((out / "cards" / f"{pid}.html").read_text(encoding="utf-8"), (out / "index.html").read_text(encoding="utf-8")):
        assert "Model card" in page and "Research use in a study setting" in page and "DLTRMLP AUC at 2 external site(s)" in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt; small sites" in page and "<script>" not in page
