"""Differential privacy and secure aggregation: DP-SGD at the sites, the sites' privacy accounts and the ledger,
the budget, client-level DP through Flower's wrappers, and SecAgg+; through the real ServerApp federation and
ClientApp (with its mods) on an in-process grid. Accounting is checked against Google's dp-accounting."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from tace.common.clinical import FEATURES
from tace.common.config import RunConfig, SiteConfig, parse_overrides
from tace.common.errors import ConfigError, TaceError
from tace.common.models import DLTR, StudyModels
from tace.common.privacy import ORDERS, DPSettings, calibrate_noise, dp_fit, epsilon
from tace.common.training import TrainSettings, train_image_model
from tace.server.federation import FlowerFederation
from tace.server.messages import TrainRound
from tace.server.privacy import CENTRAL
from tace.server.rounds import screen_updates
from tests.flower_grid import Crash, FaultyGrid, InProcessGrid, study, task_identity  # noqa: F401 (an autouse fixture)
from tests.helpers import final_weights, metric_rows, render_report

# One local epoch per stage: with the tiny sites (<= 8 training patients) every call is one full-batch DP step.
# The tiny cohort's validation splits hold 3 patients: under the default minimum cell count (5) they would send counts
# only (no cut-offs, no internal AUC), so its simulated sites use 3.
SHORT = ("spacing-mm='8,8,8' box-voxels='8,8,8' rounds=2 head-rounds=2 clinical-rounds=2 radiomics-rounds=2 patience=0 local-epochs=1 "
         "head-local-epochs=1 clinical-local-epochs=1 min-cell-count=3")  # fmt: skip
SITES = [0, 1, 2, 3, 4]  # site-a..c train, site-d and site-e are holdout sites


def config(cohort: Path, out: Path, extra: str = "") -> RunConfig:
    return RunConfig.from_run_config({**parse_overrides(SHORT + " " + extra), "cohort": str(cohort), "run-dir": str(out)})


def reference_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """ε from Google's dp-accounting (an accountant independent of Opacus), over the same RDP orders."""
    import dp_accounting
    from dp_accounting import rdp

    logging.getLogger("absl").setLevel(logging.ERROR)
    accountant = rdp.RdpAccountant(orders=ORDERS)
    for sigma, q, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(accountant.get_epsilon(delta))


def ledger(run_dir: Path) -> dict:
    return json.loads((run_dir / "privacy_ledger.json").read_text())


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# -- accounting and DP-SGD on their own ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("history", "delta"),
    [([(1.0, 0.1, 100)], 1e-5), ([(1.1, 0.125, 40), (1.1, 0.5, 30)], 1e-3), ([(2.0, 1.0, 22)], 1 / 60), ([(0.8, 0.25, 5)], 1e-3),
     ([(4.0, 1.0, 10)], 0.03)],
)  # fmt: skip
def test_epsilon_agrees_with_google_dp_accounting(history, delta):
    assert epsilon(history, delta) == pytest.approx(reference_epsilon(history, delta), rel=0.01)


def test_calibrated_noise_spends_the_budget_and_no_more():
    plan = [(0.125, 40), (0.5, 30), (1.0, 10)]
    sigma = calibrate_noise(plan, 3.0, 1e-3)
    spend = lambda s: epsilon([(s, q, k) for q, k in plan], 1e-3)  # noqa: E731
    assert spend(sigma) <= 3.0 < spend(sigma / 1.01)
    with pytest.raises(ConfigError, match="raise dp-target-epsilon"):
        calibrate_noise(plan, 1e-4, 1e-3)


@pytest.mark.parametrize(("stride", "groups", "bias"), [(1, 1, False), (2, 1, True), (1, 2, True)])
def test_fast_conv3d_per_sample_gradients_match_autograd_and_opacus(stride, groups, bias):
    from opacus.grad_sample.conv import compute_conv_grad_sample
    from torch import nn

    from tace.common.privacy import conv3d_grad_sample

    torch.manual_seed(0)
    layer = nn.Conv3d(4, 6, 3, stride=stride, padding=1, groups=groups, bias=bias)
    x = torch.randn(5, 4, 7, 8, 9)
    g = torch.randn_like(layer(x))
    ours, opacus = conv3d_grad_sample(layer, [x], g), compute_conv_grad_sample(layer, [x], g)
    assert ours.keys() == opacus.keys()
    for param, value in ours.items():
        assert torch.allclose(value, opacus[param], atol=1e-4, rtol=1e-4)
        for i in range(len(x)):  # one sample at a time, by autograd: the reference both are checked against
            layer.zero_grad()
            (layer(x[i : i + 1]) * g[i : i + 1]).sum().backward()
            assert torch.allclose(value[i], param.grad, atol=1e-4, rtol=1e-4)


class _Images(Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, 8, 8, 8, generator=g), (torch.rand(n, generator=g) > 0.5).float()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i], "index": i}


def test_dp_sgd_keeps_the_weight_names_and_takes_noisy_steps_on_empty_batches():
    torch.manual_seed(0)
    plain, private = DLTR("small", 3), DLTR("small", 3)
    private.load_state_dict(plain.state_dict())
    settings = TrainSettings(epochs=1, batch_size=4, seed=3, proximal_mu=0.01)
    train_image_model(plain, _Images(8), settings)
    result = train_image_model(private, _Images(8), settings, DPSettings(1.0, 1.0, 0.5, secure_rng=True))
    assert list(private.state_dict()) == list(plain.state_dict())  # no `_module.` prefix
    assert not any(hasattr(p, "grad_sample") for p in private.parameters())  # Opacus' hooks are gone
    assert result.steps == 2 and any(not torch.equal(a, b) for a, b in zip(plain.parameters(), private.parameters(), strict=True))
    # One patient, sampled with probability 1/4 over 4 steps: most batches are empty and must still be noisy steps.
    head = DLTR("small", 3)
    before = [p.detach().clone() for p in head.parameters()]
    forward = lambda m, b: (m(b["image"]), b["label"])  # noqa: E731
    result = dp_fit(head, _Images(1), forward, TrainSettings(epochs=1), DPSettings(1.0, 1.0, 0.25))
    assert result.steps == 4 and all(not torch.equal(a, b) for a, b in zip(before, head.parameters(), strict=True))


# -- a federated run with sample-level DP ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dp_run(tiny_cohort, tmp_path_factory):
    """A DP run (target ε 8 per site, noise sized for the plan) and the same run without DP, same seed."""
    task_identity_state = _set_identity()
    try:
        out = tmp_path_factory.mktemp("dp")
        dp = config(tiny_cohort, out / "dp", "dp=true dp-target-epsilon=8")
        grid = InProcessGrid(dp, SITES)
        study(grid, dp)
        plain = config(tiny_cohort, out / "plain")
        study(InProcessGrid(plain, SITES), plain)
        return out / "dp", out / "plain", grid
    finally:
        _restore_identity(task_identity_state)


def _set_identity():
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    return saved


def _restore_identity(saved):
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def test_epsilon_covers_the_whole_run_and_matches_an_independent_accountant(dp_run):
    run_dir, _, _ = dp_run
    led = ledger(run_dir)
    assert led["mode"] == "sample" and led["unit"] == "patient"
    for site in ("site-a", "site-b", "site-c"):
        rows = [r for r in led["releases"] if r["site"] == site]
        assert [(r["stage"], r["round"]) for r in rows] == [(s, k) for s in ("dltr", "clinical", "radiomics", "head") for k in (1, 2)]
        eps = [r["epsilon"] for r in rows]
        assert all(b >= a for a, b in zip(eps, eps[1:], strict=False)), eps  # non-decreasing over rounds
        delta = rows[0]["delta"]
        for i in range(len(rows)):  # after every round: ε of everything released so far
            history = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in rows[: i + 1]]
            assert rows[i]["epsilon"] == pytest.approx(reference_epsilon(history, delta), rel=0.01)
        # Target-ε mode: the noise was sized so that the planned rounds (two more per stage for a resume) spend the
        # budget, and not more; this run used fewer.
        from tace.server.privacy import RESUME_HEADROOM

        copies = (2 + RESUME_HEADROOM) // 2  # each stage was planned for 2 + headroom rounds; it ran 2
        planned = [(rows[0]["noise_multiplier"], r["sample_rate"], r["steps"]) for r in rows for _ in range(copies)]
        assert eps[-1] <= 8.0 and 0.9 * 8 < epsilon(planned, delta) <= 8.0
        # The site's own account (its disk) holds the same history, readable by the site only.
        account_path = next((run_dir / "sites" / site / "privacy").glob("*.json"))
        account = json.loads(account_path.read_text())
        assert account["study_id"] == led["study_id"] and account_path.stat().st_mode & 0o077 == 0
        assert [tuple(h) for h in account["history"]] == [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in rows]
        assert led["sites"][site]["epsilon"] == pytest.approx(epsilon([tuple(h) for h in account["history"]], account["delta"]))


def test_dp_weights_keep_their_names_and_differ_from_a_non_dp_run(dp_run):
    run_dir, plain_dir, grid = dp_run
    # Nothing computed on the training patients leaves but DP weights and privacy figures: no loss, no speed.
    train_metrics = [
        dict(m.content.metric_records["metrics"]) for m in grid.replies if not m.has_error() and "arrays" in m.content.array_records
    ]
    assert train_metrics and all("train-loss" not in m and "samples-per-s" not in m and "dp-epsilon" in m for m in train_metrics)
    a, b = final_weights(run_dir), final_weights(plain_dir)
    assert [k for k in a if not k.startswith("head.")] == [k for k in b if not k.startswith("head.")]
    assert all(not k.split(".", 1)[1].startswith("_module") for k in a)
    assert any(not np.array_equal(a[k], b[k]) for k in a if k in b)
    # Under DP the fusion head is the linear one (fusion-head "auto"): the logits of DLTR, the clinical and the
    # radiomics model, read through frozen copies of their DP-trained output layers; without DP, the MLP.
    copies = {"dltr_head": "dltr.head", "clinical_head": "clinical.linear", "radiomics_head": "radiomics.linear"}
    assert {k for k in a if k.startswith("head.")} == {f"head.{c}.{p}" for c in (*copies, "score") for p in ("weight", "bias")} | {
        "head.logit_scale"
    }
    assert any(k.startswith("head.mlp.") for k in b)
    # The head reads each logit centred and scaled by the mean and spread that the model's best round showed on the
    # pooled internal-validation sets; the aggregate keeps the copies as they were.
    stages = json.loads((run_dir / "progress.json").read_text())["stages"]
    for i, (copy, source) in enumerate(copies.items()):
        np.testing.assert_allclose(a["head.logit_scale"][:, i], stages[source.split(".")[0]]["best_logit"], rtol=1e-6)
        for k in ("weight", "bias"):
            assert np.array_equal(a[f"head.{copy}.{k}"], a[f"{source}.{k}"])
    assert np.abs(a["head.score.weight"]).min() > 0  # every weight trained from its zero start
    # No clinical statistics left the sites: the encoder is the reference one, and no 'stats' query was sent.
    assert not [m for m in grid.sent if m.metadata.message_type == "query" and m.content.config_records["config"]["query"] == "stats"]
    sharing = json.loads((run_dir / "data_sharing.json").read_text())
    assert not any("clinical statistics" in line for line in sharing["site-a"]["sent"])
    assert any("DP-SGD" in line for line in sharing["site-a"]["sent"])


def test_the_report_shows_the_ledger(dp_run, tmp_path, capsys):
    text = render_report(dp_run[0], tmp_path)
    assert "Differential-privacy ledger" in text and "sample-level DP-SGD" in text
    assert 'alt="privacy-epsilon"' in text and (tmp_path / "report-run" / "figures" / "privacy-epsilon.png").stat().st_size > 5000
    assert "auto: linear" in text  # the settings table says which fusion head the run trained
    assert "a logistic model on the logits of DLTR, the clinical and the radiomics model" in text


def test_accountant_survives_a_coordinator_crash_and_resume(tiny_cohort, tmp_path):
    """The coordinator dies mid-round after site-a trained DLTR round 2 (its weights left the site): on resume that
    round is repeated, and site-a's ε counts both releases."""
    extra = "dp=true dp-noise-multiplier=1.0 dp-target-epsilon=1000"
    run = config(tiny_cohort, tmp_path / "r", extra)
    with pytest.raises(Crash):
        study(FaultyGrid(run, SITES, crash_after=4), run)
    resumed = config(tiny_cohort, tmp_path / "r", extra + " resume=true")
    study(FaultyGrid(resumed, SITES), resumed)
    led = ledger(tmp_path / "r")
    accounts = {s: json.loads(next((tmp_path / "r" / "sites" / s / "privacy").glob("*.json")).read_text()) for s in ("site-a", "site-b")}
    # site-a released DLTR round 2 before the crash and again after it; site-b only after it.
    assert [(r["stage"], r["round"]) for r in accounts["site-a"]["releases"]][:4] == [("dltr", 1), ("dltr", 2), ("dltr", 1), ("dltr", 2)]
    assert len(accounts["site-a"]["releases"]) == 10 and len(accounts["site-b"]["releases"]) == 9
    for site, account in accounts.items():
        assert led["sites"][site]["epsilon"] == pytest.approx(epsilon([tuple(h) for h in account["history"]], account["delta"]))
    assert led["sites"]["site-a"]["epsilon"] > led["sites"]["site-b"]["epsilon"]


# -- the budget -----------------------------------------------------------------------------------------------

DELTA = 1e-3
ONE_ROUND, TWO_ROUNDS = epsilon([(1.0, 1.0, 1)], DELTA), epsilon([(1.0, 1.0, 2)], DELTA)
BETWEEN = (ONE_ROUND + TWO_ROUNDS) / 2


def test_a_site_out_of_budget_declines_and_the_run_continues(tiny_cohort, tmp_path):
    run = config(tiny_cohort, tmp_path / "r", f"dp=true dp-noise-multiplier=1.0 dp-delta={DELTA} dp-target-epsilon=100 min-sites=2")
    grid = InProcessGrid(run, SITES, node_config={1: {"max-epsilon": BETWEEN}})  # site-b's own, stricter budget
    summary = study(grid, run)
    assert summary["models"]["dltrmlp"]["sites"]["site-b"]["n"] > 0  # evaluated at the end
    declined = [(e["stage"], e["round"]) for e in events(tmp_path / "r") if e["event"] == "declined" and e["site"] == "site-b"]
    assert declined == [("dltr", 2), ("clinical", 1), ("clinical", 2), ("radiomics", 1), ("radiomics", 2), ("head", 1), ("head", 2)]
    assert all("budget" in e["detail"] for e in events(tmp_path / "r") if e["event"] == "declined")
    led = ledger(tmp_path / "r")
    assert led["sites"]["site-b"]["epsilon"] == pytest.approx(ONE_ROUND) and ONE_ROUND <= BETWEEN
    assert len(led["sites"]["site-b"]["declined"]) == 7
    assert led["sites"]["site-a"]["rounds"] == 8
    # site-b still evaluated: its validation of DLTR round 1 rode on the round-2 message it declined to train.
    rows = {(r["stage"], r["round"], r["site"]): r for r in metric_rows(tmp_path / "r")}
    assert rows[("dltr", "1", "site-b")]["n_eval"] and not rows[("dltr", "2", "site-b")]["num_examples"]


def test_under_secure_aggregation_a_declining_site_still_validates(tiny_cohort, tmp_path):
    """The declined round's masked weights carry weight 0: the site's validation and privacy figures still arrive."""
    run = config(tiny_cohort, tmp_path / "r", f"dp=true dp-noise-multiplier=1.0 dp-delta={DELTA} dp-target-epsilon=100 secagg=true")
    study(InProcessGrid(run, SITES, node_config={1: {"max-epsilon": BETWEEN}}), run)
    declined = [(e["stage"], e["round"]) for e in events(tmp_path / "r") if e["event"] == "declined" and e["site"] == "site-b"]
    assert declined == [("dltr", 2), ("clinical", 1), ("clinical", 2), ("radiomics", 1), ("radiomics", 2), ("head", 1), ("head", 2)]
    assert len(ledger(tmp_path / "r")["sites"]["site-b"]["declined"]) == 7
    rows = {(r["stage"], r["round"], r["site"]): r for r in metric_rows(tmp_path / "r")}
    assert rows[("dltr", "1", "site-b")]["n_eval"]  # its validation of round 1 rode on the round it declined


def test_a_site_raises_its_budget_only_itself(tiny_cohort, tmp_path):
    """The budget an account was opened with binds: a larger dp-target-epsilon from the coordinator does not raise it,
    the site's own max-epsilon does."""
    from tace.client.task import SiteTask

    def account(extra: str, node: dict):
        run = config(tiny_cohort, tmp_path / "r", "dp=true " + extra)
        return SiteTask(SiteConfig.from_node_config({"partition-id": 0, **node}, run), run, "train").privacy_account("s1", {"dltr": 2})

    assert account("dp-target-epsilon=2", {}).budget == 2
    assert account("dp-target-epsilon=50", {}).budget == 2
    assert account("dp-target-epsilon=50", {"max-epsilon": 4}).budget == 4


def test_the_run_stops_cleanly_when_too_few_sites_have_budget(tiny_cohort, tmp_path):
    run = config(tiny_cohort, tmp_path / "r", f"dp=true dp-noise-multiplier=1.0 dp-delta={DELTA} dp-target-epsilon={BETWEEN}")
    with pytest.raises(TaceError, match="fewer than min-sites.*declined to train dltr round 2") as info:
        study(InProcessGrid(run, SITES), run)
    assert "privacy" in info.value.hint and "stops cleanly" in info.value.hint
    assert json.loads((tmp_path / "r" / "progress.json").read_text())["stages"]["dltr"]["next_round"] == 2  # round 1 kept
    assert {e["site"] for e in events(tmp_path / "r") if e["event"] == "declined"} == {"site-a", "site-b", "site-c"}


def test_a_site_that_requires_dp_refuses_a_run_without_it(tiny_cohort, tmp_path):
    run = config(tiny_cohort, tmp_path / "r")
    with pytest.raises(TaceError, match="(?s)site-c.*only in runs with sample-level differential privacy"):
        FlowerFederation(InProcessGrid(run, SITES, node_config={2: {"require-dp": True}}), run, expected_sites=5, wait_s=1)


def test_a_site_that_requires_secure_aggregation_never_sends_weights_in_the_clear(tiny_cohort, tmp_path):
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from tace.client import app as client_app

    run = config(tiny_cohort, tmp_path / "r")
    with pytest.raises(TaceError, match="(?s)site-a.*only masked by secure aggregation"):
        FlowerFederation(InProcessGrid(run, SITES, node_config={0: {"require-secagg": True}}), run, expected_sites=5, wait_s=1)
    # Even if asked directly, the ClientApp refuses a train message without the protocol.
    ctx = Context(
        run_id=1, node_id=1, node_config={"partition-id": 0, "require-secagg": True}, state=RecordDict(), run_config=run.to_run_config()
    )
    msg = Message(RecordDict({"config": ConfigRecord({"stage": "clinical"})}), dst_node_id=1, message_type="train")
    with pytest.raises(RuntimeError, match=r"^\[tace:requires-secagg\] .*only masked"):
        client_app.secagg_mod(msg, ctx, lambda m, c: m)


def test_adaptive_clipping_moves_the_norm_toward_the_target_quantile():
    """Andrew et al.: when no update was clipped the norm shrinks, when all were it grows (Flower 1.42 had it reversed)."""
    from flwr.serverapp.strategy import FedAvg

    from tace.server.privacy import adaptive_clipping

    wrapper = adaptive_clipping(FedAvg(), 1.0, 3, initial_norm=1.0, count_stddev=1.6)
    wrapper._geometric_update(0.0)  # no update clipped
    assert wrapper.clipping_norm < 1.0
    wrapper.clipping_norm = 1.0
    wrapper._geometric_update(1.0)  # every update clipped
    assert wrapper.clipping_norm > 1.0


def test_privacy_settings_are_checked(tiny_cohort, tmp_path):
    with pytest.raises(ConfigError, match="needs strategy fedavg or fedprox"):
        config(tiny_cohort, tmp_path, "dp=true dp-mode='client-fixed' strategy='fedadam'")
    with pytest.raises(ConfigError, match="client-adaptive"):
        config(tiny_cohort, tmp_path, "dp=true dp-mode='client-adaptive' secagg=true")
    with pytest.raises(ConfigError, match="dp-mode must be one of"):
        config(tiny_cohort, tmp_path, "dp=true dp-mode='local'")
    with pytest.raises(ConfigError, match="dp-target-epsilon must be positive"):
        config(tiny_cohort, tmp_path, "dp=true dp-target-epsilon=0")
    with pytest.raises(ConfigError, match="max-epsilon"):
        SiteConfig.from_node_config({"partition-id": 0, "max-epsilon": "lots"}, config(tiny_cohort, tmp_path))
    from tace.simulation.runner import run_reference

    with pytest.raises(TaceError, match="apply to federated runs"):
        run_reference("centralized", tiny_cohort, tmp_path / "c", config(tiny_cohort, tmp_path, "dp=true"))


def test_a_damaged_privacy_account_stops_the_site(tiny_cohort, tmp_path):
    from tace.client.task import SiteTask

    run = config(tiny_cohort, tmp_path / "r", "dp=true")
    task = SiteTask(SiteConfig.from_node_config({"partition-id": 0}, run), run, "train")
    account = task.privacy_account("abc123", {"dltr": 2})
    assert account.noise_multiplier > 0 and account.path.exists()
    account.path.write_text("{not json")
    with pytest.raises(TaceError, match="privacy account .* is damaged"):
        task.privacy_account("abc123", {"dltr": 2})


# -- client-level DP and secure aggregation ----------------------------------------------------------------------


def test_secure_aggregation_gives_the_fedavg_aggregate(tiny_cohort, tmp_path):
    """One DLTR round trained identically at every site, aggregated with SecAgg+ and with plain FedAvg."""
    aggregates = {}
    for secagg in (False, True):
        run = config(tiny_cohort, tmp_path / str(secagg), f"secagg={str(secagg).lower()}")
        grid = InProcessGrid(run, SITES)
        federation = FlowerFederation(grid, run, expected_sites=5, wait_s=1)
        current = StudyModels.build("small", 3, len(FEATURES)).arrays()
        replies = federation.train(current, None, TrainRound("dltr", 1e-3, 7, 1, "small"))
        accepted, excluded = screen_updates(replies, current["dltr"], run.max_update_norm_ratio)
        assert not excluded and len(accepted) == 3
        aggregates[secagg] = federation.aggregate("dltr", 1, accepted, current["dltr"])
        if secagg:  # the weights left the sites only masked
            assert all(r.masked and not r.arrays for r in accepted)
            assert all("arrays" not in m.content.array_records for m in grid.replies if not m.has_error())
    plain, secure = aggregates[False], aggregates[True]
    assert plain.keys() == secure.keys()
    assert max(float(np.abs(plain[k] - secure[k]).max()) for k in plain) < 1e-5


def test_client_level_dp_with_secure_aggregation_is_accounted(tiny_cohort, tmp_path):
    run = config(tiny_cohort, tmp_path / "r", "dp=true dp-mode='client-fixed' secagg=true dp-target-epsilon=8 dp-clipping-norm=0.5")
    summary = study(InProcessGrid(run, SITES), run)
    assert summary["models"]["dltrmlp"]["pooled_holdout_auc"] is not None
    led = ledger(tmp_path / "r")
    assert led["unit"] == "hospital" and list(led["sites"]) == [CENTRAL]
    rows = led["releases"]
    assert len(rows) == 8 and all(r["sites"] == 3 and r["clipping_norm"] == 0.5 for r in rows)
    sigma, delta = led["central"]["noise_multiplier"], led["central"]["delta"]
    assert delta == pytest.approx(1 / 30)  # 1 / (10 x training sites)
    for i, row in enumerate(rows):
        assert row["epsilon"] == pytest.approx(reference_epsilon([(sigma, 1.0, i + 1)], delta), rel=0.01)
    from tace.server.privacy import RESUME_HEADROOM

    planned = 4 * (2 + RESUME_HEADROOM)  # four stages of 2 rounds, each with the resume headroom
    assert rows[-1]["epsilon"] <= 8 and 0.9 * 8 < epsilon([(sigma, 1.0, planned)], delta) <= 8
    # The linear head's copies and scale, which no site trains, come through the noisy aggregate unchanged.
    weights = final_weights(tmp_path / "r")
    for copy, source in (("dltr_head", "dltr.head"), ("clinical_head", "clinical.linear"), ("radiomics_head", "radiomics.linear")):
        for k in ("weight", "bias"):
            assert np.array_equal(weights[f"head.{copy}.{k}"], weights[f"{source}.{k}"])
    scale = json.loads((tmp_path / "r" / "progress.json").read_text())["stages"]
    np.testing.assert_allclose(
        weights["head.logit_scale"], np.array([scale[s]["best_logit"] for s in ("dltr", "clinical", "radiomics")]).T, rtol=1e-6
    )


def test_client_level_adaptive_clipping_adapts_and_sample_dp_runs_under_secure_aggregation(tiny_cohort, tmp_path):
    run = config(tiny_cohort, tmp_path / "a", "dp=true dp-mode='client-adaptive' dp-clipping-norm=0.05")
    study(InProcessGrid(run, SITES), run)
    norms = [r["clipping_norm"] for r in ledger(tmp_path / "a")["releases"]]
    assert len(norms) == 8 and len(set(norms)) > 1  # Flower's wrapper adapted the clipping norm between rounds
    run = config(tiny_cohort, tmp_path / "s", "dp=true secagg=true")
    study(InProcessGrid(run, SITES), run)
    assert all(ledger(tmp_path / "s")["sites"][s]["rounds"] == 8 for s in ("site-a", "site-b", "site-c"))


@pytest.mark.slow
def test_dp_and_secure_aggregation_in_flowers_simulation_engine(tiny_cohort, tmp_path):
    """`tace-sim run` with sample-level DP and SecAgg+ through Flower's simulation engine (Ray, real ClientApps)."""
    from tace.simulation.cli import main as sim_main

    out = tmp_path / "run"
    assert sim_main(["run", "--cohort", str(tiny_cohort), "--out", str(out), "--run-config", SHORT + " dp=true secagg=true"]) == 0
    led = ledger(out)
    assert all(led["sites"][s]["rounds"] == 8 and led["sites"][s]["epsilon"] <= 8 for s in ("site-a", "site-b", "site-c"))
    assert json.loads((out / "summary.json").read_text())["models"]["dltrmlp"]["pooled_holdout_auc"] is not None
