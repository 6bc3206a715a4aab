"""Federated training: config parsing, the message audit, determinism, layouts, and runs through Flower."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from tace.common.config import RunConfig, SiteConfig, parse_overrides
from tace.common.errors import ConfigError, ManifestError, TaceError
from tace.common.manifest import parse_manifest
from tace.common.models import radiomics_dim
from tace.simulation.cohort import generate_cohort, make_preset
from tace.simulation.runner import processes, run_reference
from tests.helpers import set_cell

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = "spacing-mm='8,8,8' box-voxels='8,8,8' rounds=2 head-rounds=2 clinical-rounds=2 radiomics-rounds=2"


def tiny_run(cohort: Path, out: Path, **overrides: object) -> RunConfig:
    base = {**parse_overrides(TINY_RUN), "holdout-sites": "site-d,site-e", "cohort": str(cohort), "run-dir": str(out), **overrides}
    return RunConfig.from_run_config(base)


# -- configuration -------------------------------------------------------------------------------------------


def test_repo_pyproject_run_config_is_the_typed_default():
    """[tool.flwr.app.config] in pyproject.toml and RunConfig's defaults are one and the same."""
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "tace.server.app:app", "clientapp": "tace.client.app:app"}
    assert app["config"] == RunConfig().to_run_config()


def test_config_errors_name_the_key_and_list_valid_keys():
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config({"local-epoch": 2})
    text = str(info.value)
    assert "local-epoch" in text and "local-epochs" in text and "holdout-sites" in text
    with pytest.raises(ConfigError, match="rounds.*int"):
        RunConfig.from_run_config({"rounds": "many"})
    with pytest.raises(ConfigError, match="fedavg"):
        RunConfig.from_run_config({"strategy": "fedsgd"})
    with pytest.raises(ConfigError, match="valid backbones"):
        RunConfig.from_run_config({"compare-backbones": "small,vgg"})
    with pytest.raises(ConfigError, match="box-voxels"):
        RunConfig.from_run_config({"box-voxels": "8,8"}).preprocess  # noqa: B018
    assert RunConfig.from_run_config({"amp": "false", "lr": 1, "rounds": 3.0}).amp is False
    assert parse_overrides("lr=0.5 backbone='resnet10' augment=false") == {"lr": 0.5, "backbone": "resnet10", "augment": False}


def test_site_config_from_node_config(tiny_cohort, tmp_path):
    run = tiny_run(tiny_cohort, tmp_path)
    sim = SiteConfig.from_node_config({"partition-id": 3}, run)
    assert sim.site_id == "site-d" and sim.manifest == tiny_cohort / "sites/site-d/manifest.csv"
    real = SiteConfig.from_node_config({"site-id": "hospital-x", "manifest-path": "/data/tace/manifest.csv"}, run)
    assert real.site_id == "hospital-x" and real.cache_dir == Path("/data/tace/.tace-cache")
    with pytest.raises(ConfigError, match="manifest-path"):
        SiteConfig.from_node_config({}, run)
    with pytest.raises(ConfigError, match="5 sites"):
        SiteConfig.from_node_config({"partition-id": 7}, run)


# -- the message audit ---------------------------------------------------------------------------------------


@pytest.fixture
def task_identity():
    """Flower reads the current task's identity when building messages; outside a run we set it ourselves."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _audit(reply: Message, patient_ids: set[str], n_patients: int, bins: int, allowed_arrays: dict[str, tuple[int, ...]] | None) -> None:
    """Fail if a reply carries anything per-patient: unexpected arrays, lists as long as a cohort, patient ids."""
    content = reply.content
    for name, record in content.array_records.items():
        assert allowed_arrays is not None, f"unexpected ArrayRecord {name}"
        got = {k: tuple(v.shape) for k, v in record.items()}
        assert got == allowed_arrays, "weights must be exactly the model's names and shapes"
    for record in content.metric_records.values():
        for key, value in record.items():
            if isinstance(value, list):
                histogram = key.startswith(("hist-neg.", "hist-pos.")) and len(value) == bins
                feature_sums = key in ("radiomics.sum", "radiomics.sumsq") and len(value) == radiomics_dim(3)  # one sum per feature
                assert histogram or feature_sums, f"{key}: a list that is neither a histogram nor per-feature sums"
                assert len(value) != n_patients
            else:
                assert isinstance(value, int | float)
    for record in content.config_records.values():
        for value in record.values():
            assert not any(pid in str(value) for pid in patient_ids), "a patient id left the site"


def test_message_audit(tiny_cohort, tmp_path, task_identity):
    from tace.client import app as client_app
    from tace.common.clinical import FEATURES, ClinicalEncoder, ClinicalStats
    from tace.common.encoders import Encoders, RadiomicsEncoder
    from tace.common.models import StudyModels
    from tace.common.protocol import pack
    from tace.server.aggregation import array_record

    run = tiny_run(tiny_cohort, tmp_path)
    manifest = parse_manifest(tiny_cohort / "sites/site-a/manifest.csv")
    ids = {r.patient_id for r in manifest.records}
    n = len(ids)
    n_train = sum(r.split == "train" and r.response is not None for r in manifest.records)
    n_val = sum(r.split == "val" and r.response is not None for r in manifest.records)
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config=run.to_run_config())
    models = StudyModels.build("small", 3, len(FEATURES))
    encoder = Encoders(ClinicalEncoder.from_stats(ClinicalStats.from_records(manifest.records)), RadiomicsEncoder.unit(radiomics_dim(3)))
    base = {"role": "train", "backbone": "small", "encoder": json.dumps(encoder.to_dict())}

    def send(kind: str, config: dict, stages: tuple[str, ...] = ()) -> Message:
        content = RecordDict({"config": ConfigRecord(config)})
        if stages:
            content["arrays"] = array_record(pack({s: models.arrays()[s] for s in stages}))
        handler = {"query": client_app.query, "train": client_app.train, "evaluate": client_app.evaluate}[kind]
        return handler(Message(content=content, dst_node_id=1, message_type=kind), ctx)

    _audit(send("query", {"query": "info"}), ids, n, run.hist_bins, None)
    _audit(send("query", {"query": "stats", "role": "train"}), ids, n, run.hist_bins, None)
    for stage, needs in (("dltr", ("dltr",)), ("head", ("dltr", "head")), ("clinical", ("clinical",)), ("radiomics", ("radiomics",))):
        reply = send("train", {**base, "stage": stage, "lr": 0.001, "seed": 1}, needs)
        shapes = {k: tuple(v.shape) for k, v in models.arrays()[stage].items()}
        _audit(reply, ids, n, run.hist_bins, shapes)
        assert len(reply.content.array_records) == 1 and len(reply.content.metric_records) == 1
        assert int(reply.content.metric_records["metrics"]["num-examples"]) == n_train > 1  # samples, not batches
    reply = send(
        "evaluate", {**base, "models": "clinical,dltr,dltrmlp,radiomics", "final": True}, ("dltr", "head", "clinical", "radiomics")
    )
    _audit(reply, ids, n, run.hist_bins, None)
    # per-patient predictions stay at the site
    predictions = tmp_path / "sites/site-a/predictions.csv"
    assert predictions.exists() and len(predictions.read_text().splitlines()) == 1 + n_val


def test_audit_catches_a_per_patient_array(task_identity):
    leaky = Message(RecordDict({"metrics": MetricRecord({"scores": [0.1] * 1000})}), dst_node_id=1, message_type="evaluate")
    with pytest.raises(AssertionError):
        _audit(leaky, set(), 8, 1000, None)
    leaky_id = Message(RecordDict({"site": ConfigRecord({"note": "site-a-0003"})}), dst_node_id=1, message_type="query")
    with pytest.raises(AssertionError):
        _audit(leaky_id, {"site-a-0003"}, 8, 1000, None)
    extra = Message(RecordDict({"arrays": ArrayRecord(numpy_ndarrays=[np.zeros(3)])}), dst_node_id=1, message_type="train")
    with pytest.raises(AssertionError):
        _audit(extra, set(), 8, 1000, {"w": (3,)})


# -- in-process layouts and determinism ----------------------------------------------------------------------


def _weights(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(run_dir / "checkpoints/dltr/best.npz") as z:
        return {k: z[k] for k in z.files}


def test_centralized_run_is_deterministic(tiny_cohort, tmp_path):
    a = run_reference("centralized", tiny_cohort, tmp_path / "a", tiny_run(tiny_cohort, tmp_path / "a"))
    run_reference("centralized", tiny_cohort, tmp_path / "b", tiny_run(tiny_cohort, tmp_path / "b"))
    run_reference("centralized", tiny_cohort, tmp_path / "c", tiny_run(tiny_cohort, tmp_path / "c", seed=1))
    wa, wb, wc = _weights(tmp_path / "a"), _weights(tmp_path / "b"), _weights(tmp_path / "c")
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert not all(np.array_equal(wa[k], wc[k]) for k in wa)
    assert a["mode"] == "centralized"
    assert {s: e["role"] for s, e in a["models"]["dltrmlp"]["sites"].items()} == {
        "site-a": "train", "site-b": "train", "site-c": "train", "site-d": "holdout", "site-e": "holdout"
    }  # fmt: skip
    for name in (
        "run_config.json",
        "metrics.csv",
        "run.log",
        "summary.json",
        "clinical_encoder.json",
        "models/dltr.pt2",
        "models/dltrmlp.pt2",
        "models/model.json",
    ):
        assert (tmp_path / "a" / name).exists(), name


def test_portable_export_reproduces_the_model(tiny_cohort, tmp_path):
    import torch

    run_reference("centralized", tiny_cohort, tmp_path / "r", tiny_run(tiny_cohort, tmp_path / "r"))
    program = torch.export.load(str(tmp_path / "r/models/dltr.pt2")).module()
    from tace.common.models import DLTR

    model = DLTR("small", 3).eval()
    model.load_state_dict(torch.load(tmp_path / "r/models/dltr.pt", weights_only=True))
    x = torch.randn(4, 3, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(program(x), torch.sigmoid(model(x)))


def test_local_and_loco_and_backbone_comparison(tiny_cohort, tmp_path):
    local = run_reference("local", tiny_cohort, tmp_path / "local", tiny_run(tiny_cohort, tmp_path / "local"))
    d = local["models"]["dltrmlp"]["sites"]["site-d"]
    assert d["role"] == "holdout" and set(d["auc_per_local_model"]) == {"site-a", "site-b", "site-c"}
    one = {"rounds": 1, "head-rounds": 1, "clinical-rounds": 1, "radiomics-rounds": 1}
    with pytest.raises(TaceError, match="site-d, site-e have none"):
        run_reference("centralized", tiny_cohort, tmp_path / "bad", tiny_run(tiny_cohort, tmp_path / "bad", layout="loco", **one))
    all_train = tmp_path / "all-train"
    generate_cohort(all_train, make_preset("tiny", n_sites=2, patients_per_site=10), seed=3)
    loco = run_reference(
        "centralized", all_train, tmp_path / "loco", tiny_run(all_train, tmp_path / "loco", layout="loco", **{"holdout-sites": ""}, **one)
    )
    assert loco["layout"] == "loco" and {s: e["role"] for s, e in loco["models"]["dltr"]["sites"].items()} == {
        "site-a": "holdout",
        "site-b": "holdout",
    }
    assert len(loco["folds"]) == 2 and (tmp_path / "loco/folds/site-b/models/dltr.pt").exists()
    cmp = run_reference(
        "centralized",
        tiny_cohort,
        tmp_path / "cmp",
        tiny_run(tiny_cohort, tmp_path / "cmp", rounds=1, **{"compare-backbones": "small,resnet10"}),
    )
    assert set(cmp["backbone_comparison"]) == {"small", "resnet10"} and cmp["backbone"] in ("small", "resnet10")
    scores = {k: (-1 if v is None else v) for k, v in cmp["backbone_comparison"].items()}
    assert scores[cmp["backbone"]] == max(scores.values())


def test_invalid_site_is_reported_before_training(tiny_cohort, tmp_path):
    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, cohort)
    set_cell(cohort / "sites/site-b/manifest.csv", 2, "age", "300")
    with pytest.raises(ManifestError) as info:
        run_reference("centralized", cohort, tmp_path / "run", tiny_run(cohort, tmp_path / "run"))
    assert "site-b" in str(info.value) and "row 4, column age" in str(info.value)


# -- through Flower's simulation engine ----------------------------------------------------------------------


def _sim(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tace.simulation.cli", *args], capture_output=True, text=True, timeout=timeout, cwd="/")


def _flower_processes(run_dir: Path) -> list[str]:
    found = []
    for proc in processes():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(run_dir) in cmd and "flower" in cmd:
            found.append(cmd)
    return found


def _labelled(cohort: Path, site: str, split: str | None = None) -> int:
    records = parse_manifest(cohort / "sites" / site / "manifest.csv").records
    return sum(r.response is not None and (split is None or r.split == split) for r in records)


def test_two_round_federated_run_through_flower(tiny_cohort, tmp_path):
    out = tmp_path / "fed"
    result = _sim("run", "--cohort", str(tiny_cohort), "--out", str(out), "--run-config", TINY_RUN)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dltr       round     2/2" in result.stdout and "DLTRMLP" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "federated"
    for model in ("clinical", "dltr", "dltrmlp"):
        sites = summary["models"][model]["sites"]
        assert set(sites) == {"site-a", "site-b", "site-c", "site-d", "site-e"}
        assert all(set(e) >= {"role", "auc", "n"} for e in sites.values())
        # n: a training site's internal-validation split, a holdout site's whole labelled cohort
        assert sites["site-d"]["role"] == "holdout" and sites["site-d"]["n"] == _labelled(tiny_cohort, "site-d")
        assert sites["site-a"]["n"] == _labelled(tiny_cohort, "site-a", "val")
    assert set(summary["oracle"]["sites"]) == {"site-a", "site-b", "site-c", "site-d", "site-e"}
    assert "total_s" in summary["timings"] and "wall_s" in summary["timings"]
    rows = (out / "metrics.csv").read_text().splitlines()
    assert any(r.startswith("dltr,2,site-b,train") for r in rows)
    assert (out / "models/dltrmlp.pt2").exists() and (out / "sites/site-e/predictions.csv").exists()
    assert _flower_processes(out) == []


def test_federated_run_with_an_invalid_site_fails_clearly(tiny_cohort, tmp_path):
    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, cohort)
    (cohort / "sites/site-c/images/site-c-0002/arterial.nrrd").unlink()
    out = tmp_path / "fed"
    result = _sim("run", "--cohort", str(cohort), "--out", str(out), "--run-config", TINY_RUN, timeout=300)
    assert result.returncode != 0
    assert "site site-c" in result.stderr and "missing-file in column arterial_path, row(s) 3" in result.stderr
    assert "site-c-0002" not in result.stderr  # no file names leave the site
    assert "no training was started" in result.stderr
    assert _flower_processes(out) == []


def test_run_cli_errors(tiny_cohort, tmp_path):
    bad = _sim("run", "--cohort", str(tmp_path), "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "cohort.json" in bad.stderr
    key = _sim("run", "--cohort", str(tiny_cohort), "--out", str(tmp_path / "y"), "--run-config", "epochs=3")
    assert key.returncode == 2 and "unknown run-config key 'epochs'" in key.stderr and "local-epochs" in key.stderr


@pytest.mark.slow
def test_federated_runs_are_deterministic(tiny_cohort, tmp_path):
    """With a fixed seed on the CPU, two federated runs through Flower give identical weights."""
    for name in ("a", "b"):
        result = _sim("run", "--cohort", str(tiny_cohort), "--out", str(tmp_path / name), "--run-config", TINY_RUN)
        assert result.returncode == 0, result.stderr
    for stage in ("dltr", "head", "clinical"):
        with np.load(tmp_path / f"a/checkpoints/{stage}/best.npz") as a, np.load(tmp_path / f"b/checkpoints/{stage}/best.npz") as b:
            assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)


@pytest.mark.slow
def test_regular_install_runs_from_any_folder(tiny_cohort, tmp_path):
    """A non-editable install (wheel) runs `tace-sim run` from an unrelated folder: no app folder needed."""
    import sysconfig

    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        timeout=300,
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True
    ).stdout.strip()
    # Third-party packages come from the development environment; TACE-FL itself only from the wheel.
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next(wheels.glob("tace_fl-*.whl"))
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, timeout=300)
    where = subprocess.run(
        [str(python), "-c", "import tace.server.app as m; print(m.__file__)"], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert str(venv) in where.stdout and str(ROOT) not in where.stdout
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Flower's own commands (flwr, flower-superlink) come from the development environment, found on PATH.
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        [str(venv / "bin" / "tace-sim"), "run", "--cohort", str(tiny_cohort), "--out", "run", "--run-config", TINY_RUN],
        capture_output=True, text=True, timeout=600, cwd=elsewhere, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert (elsewhere / "run/summary.json").exists()


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"seed": 2**40}, "seed must be between"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"patience": -1}, "patience must not be negative"),
        ({"hist-bins": 10**8}, "at most 100000"),
        ({"head-rounds": 0}, "head-rounds must be at least 1"),
    ],
)
def test_config_ranges(overrides, words):
    with pytest.raises(ConfigError, match=words):
        RunConfig.from_run_config(overrides)


def test_override_syntax_error_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot read the run-config overrides"):
        parse_overrides("rounds=1 holdout-sites='site-d")
