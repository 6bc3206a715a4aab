"""The coordinator's Flower federation and the site's ClientApp, wired through an in-process grid (no Ray).

The grid hands each message to the real ClientApp handlers with the node's context, as Flower does, so these
tests exercise the ServerApp's logic (site discovery, aggregation with Flower strategies, checks, errors) in
seconds. Runs through Flower's real simulation engine are in test_federated.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tace.common.clinical import FEATURES
from tace.common.config import RunConfig, parse_overrides
from tace.common.errors import TaceError
from tace.common.models import StudyModels
from tace.server.federation import FlowerFederation
from tace.server.messages import TrainRound
from tace.server.rundir import RunDir
from tace.server.workflow import run_layouts
from tests.flower_grid import InProcessGrid, task_identity  # noqa: F401 (an autouse fixture)
from tests.helpers import set_cell

SHORT = "spacing-mm='8,8,8' box-voxels='8,8,8' rounds=2 head-rounds=2 clinical-rounds=2 radiomics-rounds=2"


def run_for(cohort: Path, out: Path, extra: str = "") -> RunConfig:
    return RunConfig.from_run_config({**parse_overrides(SHORT + " " + extra), "cohort": str(cohort), "run-dir": str(out)})


def study(grid: InProcessGrid, run: RunConfig, out: Path) -> dict:
    federation = FlowerFederation(grid, run, expected_sites=len(grid.nodes), wait_s=1)
    rundir = RunDir(out, run.to_run_config(), "federated")
    try:
        return run_layouts(federation, run, rundir, lambda b: StudyModels.build(b or run.backbone, 3, len(FEATURES)).arrays(), "federated")
    finally:
        rundir.close()


def test_holdout_sites_never_receive_train_messages(tiny_cohort, tmp_path):
    run = run_for(tiny_cohort, tmp_path / "r", "holdout-sites='site-d,site-e'")
    grid = InProcessGrid(run, [0, 1, 2, 3, 4])
    summary = study(grid, run, tmp_path / "r")
    holdout_nodes = {n for n, p in grid.nodes.items() if p in (3, 4)}
    kinds = {(m.metadata.message_type, m.metadata.dst_node_id in holdout_nodes) for m in grid.sent}
    assert ("train", True) not in kinds and ("train", False) in kinds
    # holdout sites are evaluated exactly once per model set: at the end
    finals = [m for m in grid.sent if m.metadata.message_type == "evaluate" and m.metadata.dst_node_id in holdout_nodes]
    assert len(finals) == 2 and all(bool(m.content.config_records["config"]["final"]) for m in finals)
    assert summary["models"]["dltrmlp"]["sites"]["site-d"]["role"] == "holdout"


def test_fedadam_with_backbone_comparison(tiny_cohort, tmp_path):
    run = run_for(tiny_cohort, tmp_path / "r", "strategy='fedadam' compare-backbones='small,resnet10' rounds=2")
    summary = study(InProcessGrid(run, [0, 1, 2, 3, 4]), run, tmp_path / "r")
    assert set(summary["backbone_comparison"]) == {"small", "resnet10"}


def test_fedprox_and_replies_in_any_order_are_deterministic(tiny_cohort, tmp_path):
    weights, arrivals = [], []
    for seed, name in enumerate(("a", "b")):
        run = run_for(tiny_cohort, tmp_path / name, "strategy='fedprox'")
        grid = InProcessGrid(run, [0, 1, 2, 3, 4], seed=seed)  # the replies of each round arrive in another order
        study(grid, run, tmp_path / name)
        arrivals.append(grid.arrivals)
        with np.load(tmp_path / name / "checkpoints/head/best.npz") as z:
            weights.append({k: z[k] for k in z.files})
    assert arrivals[0] != arrivals[1] and any(len(a) > 1 and a != sorted(a) for a in arrivals[0] + arrivals[1])
    assert all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_duplicate_site_ids_are_refused(tiny_cohort, tmp_path):
    run = run_for(tiny_cohort, tmp_path / "r")
    with pytest.raises(TaceError, match="both call themselves 'site-a'"):
        FlowerFederation(InProcessGrid(run, [0, 0, 1]), run, expected_sites=3, wait_s=1)


def test_missing_sites_and_unknown_holdout(tiny_cohort, tmp_path):
    run = run_for(tiny_cohort, tmp_path / "r")
    with pytest.raises(TaceError, match=r"only 2 of 5 sites joined within 0 s \(joined: site-a, site-b\)"):
        FlowerFederation(InProcessGrid(run, [0, 1]), run, expected_sites=5, wait_s=0.5)
    bad = run_for(tiny_cohort, tmp_path / "r", "holdout-sites='site-x'")
    with pytest.raises(TaceError, match="unknown site"):
        FlowerFederation(InProcessGrid(bad, [0, 1, 2, 3, 4]), bad, expected_sites=5, wait_s=1)


def test_stale_connections_do_not_count_as_joined_sites(tiny_cohort, tmp_path):
    """Nodes the SuperLink's stored state still lists from an earlier start never answer: they are not counted, the
    study runs with the sites that answered, and a shortfall is reported with the sites' names, never node ids."""
    run = run_for(tiny_cohort, tmp_path / "r", "round-timeout=1")
    grid = InProcessGrid(run, [0, 1, 2, 3, 4], stale=2)
    federation = FlowerFederation(grid, run, expected_sites=5, wait_s=1)
    assert sorted(federation.info) == ["site-a", "site-b", "site-c", "site-d", "site-e"] and not federation.refused
    replies = federation.train(StudyModels.build("small", 3, len(FEATURES)).arrays(), None, TrainRound("clinical", 0.01, 1, 1, "small"))
    assert [r.site_id for r in replies] == ["site-a", "site-b", "site-c"]  # the stale nodes were not asked to train
    with pytest.raises(TaceError) as info:
        FlowerFederation(InProcessGrid(run, [0, 1, 2], stale=2), run, expected_sites=5, wait_s=0.5)
    text = str(info.value)
    assert "only 3 of 5 sites joined" in text and "(joined: site-a, site-b, site-c); 2 other connection(s) did not say who they are" in text
    assert "900" not in text and "tace-client check" not in info.value.hint and "--resume" not in info.value.hint


def test_invalid_site_data_reach_the_coordinator_without_file_names(tiny_cohort, tmp_path):
    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, cohort)
    (cohort / "sites/site-b/images/site-b-0003/delayed.nii.gz").unlink()
    set_cell(cohort / "sites/site-b/manifest.csv", 5, "age", "300")
    run = run_for(cohort, tmp_path / "r")
    with pytest.raises(TaceError) as info:
        FlowerFederation(InProcessGrid(run, [0, 1, 2, 3, 4]), run, expected_sites=5, wait_s=1)
    text = str(info.value)
    assert "site-b" in text and "missing-file in column delayed_path, row(s) 4" in text and "out-of-range in column age, row(s) 7" in text
    assert "site-b-0003" not in text and "delayed.nii.gz" not in text and str(cohort) not in text


def test_single_class_validation_and_too_few_patients(tiny_cohort, tmp_path):
    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, cohort)
    for site in ("site-a", "site-b", "site-c"):
        manifest = cohort / f"sites/{site}/manifest.csv"
        for i in range(8):
            set_cell(manifest, i, "response", "1")
    run = run_for(cohort, tmp_path / "r")
    with pytest.raises(TaceError, match="only one class"):
        study(InProcessGrid(run, [0, 1, 2, 3, 4]), run, tmp_path / "r")
    small = tmp_path / "small"
    from tace.simulation.cohort import generate_cohort, make_preset

    generate_cohort(small, make_preset("tiny", patients_per_site=5), seed=1)
    run = run_for(small, tmp_path / "s")
    with pytest.raises(TaceError, match="fewer than its minimum of 5"):
        study(InProcessGrid(run, [0, 1, 2, 3, 4]), run, tmp_path / "s")


def test_site_errors_are_sanitised(tiny_cohort, tmp_path):
    run = run_for(tiny_cohort, tmp_path / "r")
    grid = InProcessGrid(run, [0, 1, 2, 3, 4])
    federation = FlowerFederation(grid, run, expected_sites=5, wait_s=1)
    arrays = StudyModels.build("small", 3, len(FEATURES)).arrays()
    arrays["dltr"] = {k: v[..., :1] if v.ndim else v for k, v in arrays["dltr"].items()}  # wrong shapes: the site fails
    replies = federation.train(arrays, None, TrainRound("dltr", 0.001, 1, 1, "small"))
    # Every training site failed: each reply says why, without the site's file names or a traceback.
    assert [r.site_id for r in replies] == ["site-a", "site-b", "site-c"]
    assert all(r.error == "internal error at the site (RuntimeError); the site's log has the details" for r in replies)


def test_expected_sites_required_outside_simulation():
    from tace.server.app import expected_sites

    with pytest.raises(TaceError, match="expected-sites"):
        expected_sites(RunConfig())
    assert expected_sites(RunConfig(expected_sites=4)) == 4


def test_clean_reason_strips_ray_tracebacks():
    from tace.server.federation import clean_reason

    ray = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() (pid=1)\n"
        '  File "/x/flwr/clientapp/client_app.py", line 161, in __call__\n'
        "RuntimeError: site site-e has 4 labelled training patients\n"
        "Exception ClientAppException occurred. Message: site site-e has 4 labelled training patients'>"
    )
    assert clean_reason(ray) == "site site-e has 4 labelled training patients"
    assert clean_reason('Traceback (most recent call last):\n  File "a.py", line 1\nValueError: boom') == "ValueError: boom"
    assert clean_reason(None) == "no reason given"
