"""Faults a deployment survives, through the real ServerApp federation and ClientApp handlers (in-process grid):
sites failing or vanishing mid-round, malformed updates, too few sites, version mismatches, and a coordinator that
dies and resumes to exactly the weights of an uninterrupted run. The same faults across real processes on
127.0.0.1 are in test_deployment.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tace.common.config import RunConfig, parse_overrides
from tace.common.errors import TaceError
from tace.common.protocol import Failure, Reason
from tace.server.federation import FlowerFederation
from tace.server.messages import SiteUpdate
from tace.server.rounds import screen_updates
from tests.flower_grid import Crash, FaultyGrid, study, task_identity  # noqa: F401 (an autouse fixture)
from tests.helpers import final_weights, metric_rows

SHORT = "spacing-mm='8,8,8' box-voxels='8,8,8' rounds=2 head-rounds=2 clinical-rounds=2 radiomics-rounds=2 patience=0 round-timeout=1"  # a silent site: 1 s
SITES = [0, 1, 2, 3, 4]  # site-a..c train, site-d and site-e are holdout sites


def config(cohort: Path, out: Path, extra: str = "") -> RunConfig:
    return RunConfig.from_run_config({**parse_overrides(SHORT + " " + extra), "cohort": str(cohort), "run-dir": str(out)})


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_screen_updates_excludes_malformed_and_outlying_updates():
    current = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}

    def reply(site, scale=1.0, **change):
        arrays = {"w": np.full((2, 2), 0.1 * scale, np.float32), "b": np.full(2, 0.1 * scale, np.float32), **change}
        return SiteUpdate(site, arrays, 10, {})

    replies = [
        reply("a"), reply("b", 1.2), reply("c", 0.9),
        reply("d", 50.0),  # far outside the others
        reply("e", w=np.full((2, 2), np.nan, np.float32)),
        reply("f", w=np.zeros(4, np.float32)),
        SiteUpdate("g", {}, 0, {}, failure=Failure(Reason.NO_REPLY, "no reply within 60 s")),
        SiteUpdate("h", {"w": current["w"]}, 10, {}),
    ]  # fmt: skip
    accepted, excluded = screen_updates(replies, current, max_norm_ratio=10.0)
    assert [r.site_id for r in accepted] == ["a", "b", "c"]
    assert set(excluded) == {"d", "e", "f", "g", "h"}
    assert "median of the other sites'" in excluded["d"] and "non-finite" in excluded["e"] and "wrong shape" in excluded["f"]
    assert excluded["g"] == "no reply within 60 s" and "unexpected weight names" in excluded["h"]
    # The bound is configurable; 0 turns the norm check off.
    assert "d" not in screen_updates(replies, current, max_norm_ratio=0)[1]
    assert "d" not in screen_updates(replies, current, max_norm_ratio=1000)[1]
    # Two sites: only the one far from the other is excluded.
    assert set(screen_updates([reply("a"), reply("d", 50.0)], current, 10.0)[1]) == {"d"}


def test_rounds_complete_without_failed_sites_and_malformed_updates(tiny_cohort, tmp_path):
    faults = {
        ("b", "dltr", 1): "fail",  # vanished mid-round; back in round 2
        ("c", "dltr", 2): "silent",  # no reply before the timeout
        ("a", "head", 1): "nan",
        ("b", "head", 2): "shape",
        ("c", "clinical", 1): "scale",
    }
    run = config(tiny_cohort, tmp_path / "r", "min-sites=2")
    summary = study(FaultyGrid(run, SITES, faults), run)
    assert summary["models"]["dltrmlp"]["pooled_holdout_auc"] is not None
    got = {(e["site"], e["stage"], e["round"]): e["detail"] for e in events(tmp_path / "r")}
    assert set(got) == {(f"site-{s}", stage, r) for s, stage, r in faults}
    assert got[("site-b", "dltr", 1)] == "the site went offline (it missed its heartbeats to the SuperLink)"  # not a phantom site "1"
    assert "non-finite" in got[("site-a", "head", 1)] and "wrong shape" in got[("site-b", "head", 2)]
    assert "median of the other sites'" in got[("site-c", "clinical", 1)]
    # The excluded sites are missing from exactly those rounds' training rows, and back in the next round.
    rows = metric_rows(tmp_path / "r")
    trained = {(r["site"], r["stage"], int(r["round"])) for r in rows if r["num_examples"] and r["site"] != "pooled"}
    assert ("site-b", "dltr", 1) not in trained and ("site-b", "dltr", 2) in trained and ("site-c", "dltr", 1) in trained
    assert "excluded" in (tmp_path / "r" / "run.log").read_text()
    # data_sharing.json counts per site the rounds whose update left it: not those it missed (offline, silent); an
    # update that arrived and was screened out (non-finite, mis-shaped, outlying) did leave the site.
    sharing = json.loads((tmp_path / "r" / "data_sharing.json").read_text())
    assert sharing["site-b"]["rounds_left_out"]["dltr"] == [1] and sharing["site-c"]["rounds_left_out"]["dltr"] == [2]
    assert sharing["site-b"]["rounds_sent"] == {**sharing["site-b"]["rounds_sent"], "dltr": 1, "head": 2}
    assert sharing["site-a"]["rounds_left_out"] == {stage: [] for stage in sharing["site-a"]["rounds_left_out"]}
    assert any("1 of 2 round(s) of stage dltr (left out of round(s) 1)" in line for line in sharing["site-b"]["sent"])
    assert "rounds_sent" not in sharing["site-d"]  # a holdout site sends no weights


def test_too_few_sites_stops_cleanly_then_resumes(tiny_cohort, tmp_path):
    run = config(tiny_cohort, tmp_path / "r", "min-sites=3")
    with pytest.raises(TaceError, match=r"fewer than min-sites \(3\).*site-b: the site went offline") as info:
        study(FaultyGrid(run, SITES, {("b", "head", 2): "fail"}), run)
    assert "--resume" in info.value.hint
    progress = json.loads((tmp_path / "r" / "progress.json").read_text())["stages"]
    assert progress["dltr"]["done"] and progress["head"]["next_round"] == 2
    resumed = config(tiny_cohort, tmp_path / "r", "min-sites=3 resume=true")
    summary = study(FaultyGrid(resumed, SITES), resumed)
    assert summary["models"]["dltrmlp"]["pooled_holdout_auc"] is not None
    # What was completed before the stop is kept as it was: the DLTR stage equals an uninterrupted run's. (The
    # failed site's validation of head round 1 rode on its failed round-2 message, so the head may differ.)
    reference = config(tiny_cohort, tmp_path / "ref", "min-sites=3")
    study(FaultyGrid(reference, SITES), reference)
    a, b = final_weights(tmp_path / "r"), final_weights(tmp_path / "ref")
    dltr = [k for k in a if k.startswith("dltr.")]
    assert dltr and all(np.array_equal(a[k], b[k]) for k in dltr)


@pytest.mark.parametrize(("strategy", "crash_after"), [("fedadam", 7), ("fedavg", 14)])
def test_resumed_run_equals_uninterrupted_run(tiny_cohort, tmp_path, strategy, crash_after):
    """The coordinator dies mid-stage (FedAdam: in DLTR round 3, its moments matter; FedAvg: in the head stage);
    `resume` continues from the last completed round and ends with exactly the uninterrupted run's weights, although
    only the last round's and the best round's checkpoints are kept (keep-checkpoints=1)."""
    extra = f"strategy='{strategy}' rounds=3 patience=1 keep-checkpoints=1"
    reference = config(tiny_cohort, tmp_path / "ref", extra)
    study(FaultyGrid(reference, SITES), reference)
    run = config(tiny_cohort, tmp_path / "r", extra)
    with pytest.raises(Crash):
        study(FaultyGrid(run, SITES, crash_after=crash_after), run)
    assert not (tmp_path / "r" / "summary.json").exists()
    resumed = config(tiny_cohort, tmp_path / "r", extra + " resume=true")
    grid = FaultyGrid(resumed, SITES)
    study(grid, resumed)
    a, b = final_weights(tmp_path / "r"), final_weights(tmp_path / "ref")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # The resumed run did not repeat completed rounds, and metrics.csv has each round once.
    assert 0 < sum(m.metadata.message_type == "train" for m in grid.sent) < 3 * (3 + 2 + 2 + 2)
    ref_rows = [(r["stage"], r["round"], r["site"]) for r in metric_rows(tmp_path / "ref")]
    rows = [(r["stage"], r["round"], r["site"]) for r in metric_rows(tmp_path / "r")]
    assert sorted(rows) == sorted(ref_rows)
    assert (
        json.loads((tmp_path / "r" / "summary.json").read_text())["models"]
        == json.loads((tmp_path / "ref" / "summary.json").read_text())["models"]
    )
    # What is left of the checkpoints: per stage the best round's weights, the last round's weights and strategy state.
    for stage, state in json.loads((tmp_path / "r" / "progress.json").read_text())["stages"].items():
        last = state["next_round"] - 1
        expected = {"best.npz", f"round-{last:03d}.npz", f"round-{state['best_round']:03d}.npz", f"strategy-round-{last:03d}.npz"}
        assert {p.name for p in (tmp_path / "r" / "checkpoints" / stage).iterdir()} == expected, stage


def test_resume_without_progress_or_with_damaged_progress(tiny_cohort, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "progress.json").write_text("{not json")
    run = config(tiny_cohort, tmp_path / "r", "resume=true")
    with pytest.raises(TaceError, match="damaged or from another TACE-FL version"):
        study(FaultyGrid(run, SITES), run)


def test_version_and_model_mismatch_are_refused_before_training(tiny_cohort, tmp_path, monkeypatch):
    from tace.client import service

    run = config(tiny_cohort, tmp_path / "r")
    monkeypatch.setattr(service, "_version", lambda: "0.0.9")
    grid = FaultyGrid(run, SITES)
    with pytest.raises(TaceError) as info:
        FlowerFederation(grid, run, expected_sites=5, wait_s=1)
    assert "this site runs TACE-FL 0.0.9 but the coordinator runs" in str(info.value) and "site-a" in str(info.value)
    assert not [m for m in grid.sent if m.metadata.message_type == "train"]
    monkeypatch.undo()
    monkeypatch.setattr(service, "model_signature", lambda *a: "0123456789abcdef")
    with pytest.raises(TaceError, match="builds different models than the coordinator"):
        FlowerFederation(FaultyGrid(run, SITES), run, expected_sites=5, wait_s=1)


def test_tace_sim_resume(tiny_cohort, tmp_path, capsys):
    """`tace-sim run --resume` continues an interrupted run with its own configuration (here: every stage was done
    and only the final evaluation is repeated); a finished or empty folder is refused."""
    from tace.simulation.cli import main as sim_main

    out = tmp_path / "run"
    args = ["run", "--cohort", str(tiny_cohort), "--out", str(out), "--mode", "centralized", "--run-config", SHORT]
    assert sim_main(args) == 0
    first = json.loads((out / "summary.json").read_text())
    assert sim_main(["run", "--cohort", str(tiny_cohort), "--out", str(out), "--resume"]) == 2  # finished
    assert "finished" in capsys.readouterr().err
    (out / "summary.json").unlink()
    assert sim_main(["run", "--cohort", str(tiny_cohort), "--out", str(out), "--resume"]) == 0  # its own mode and config
    again = json.loads((out / "summary.json").read_text())
    assert again["models"] == first["models"]
    assert sim_main(["run", "--cohort", str(tiny_cohort), "--out", str(tmp_path / "none"), "--resume"]) == 2
