"""The typed protocol between coordinator and sites: the stage table, requests and replies that encode and decode
themselves, reason codes that survive Flower's error path, and the site's own rules (its policy)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from tace.client.policy import SitePolicy
from tace.common.config import RunConfig, SiteConfig
from tace.common.errors import TaceError
from tace.common.protocol import (
    DIGEST_ORDER,
    MODELS,
    QUERIES,
    STAGES,
    EvaluateReply,
    EvaluateRequest,
    Failure,
    FinetuneReply,
    FinetuneRequest,
    InfoReply,
    InfoRequest,
    Reason,
    Records,
    SiteCounts,
    SiteRefusal,
    StatsRequest,
    TrainReply,
    TrainRequest,
    model_arrays,
)


def test_the_stage_table_names_real_run_settings_and_models():
    run = RunConfig(rounds=3, head_rounds=4, clinical_rounds=5, radiomics_rounds=6, local_epochs=2, batch_size=6)
    assert list(STAGES) == ["dltr", "clinical", "radiomics", "head"]  # the order they train: the head reads the others
    stages = [STAGES[name] for name in ("dltr", "head", "clinical", "radiomics")]
    assert [s.rounds(run) for s in stages] == [3, 4, 5, 6]
    assert [s.base_lr(run) for s in stages] == [run.lr, run.head_lr, run.clinical_lr, run.radiomics_lr]
    assert [s.local_epochs(run) for s in stages] == [2, run.head_local_epochs, run.clinical_local_epochs, run.radiomics_local_epochs]
    assert [s.weight_decay(run) for s in stages] == [run.weight_decay, run.head_weight_decay, run.weight_decay, run.radiomics_weight_decay]
    assert [s.local_batch_size(run) for s in STAGES.values()] == [6, 32, 32, 32]
    assert {s.model for s in STAGES.values()} == set(MODELS)
    assert len({s.round_seed(run, 1) for s in STAGES.values()}) == 4  # stages never share a random stream
    assert model_arrays(("dltrmlp",)) == ("dltr", "head") and model_arrays(MODELS) == tuple(STAGES)
    assert sorted(DIGEST_ORDER) == sorted(STAGES)  # model files' digests read every stage
    with pytest.raises(ValueError, match="unknown model"):
        model_arrays(("nope",))


@pytest.mark.parametrize(
    "request_",
    [
        InfoRequest(coordinator_version="1.0", model_signature="abc", backbones=("small", "resnet10")),
        StatsRequest(),
        TrainRequest(
            stage="head",
            lr=0.01,
            seed=7,
            server_round=3,
            backbone="small",
            validate=("dltrmlp",),
            role="train",
            encoder={"mean": [1.0]},
            study_id="s-1",
            dp_plan={"dltr": 4},
            clipping_norm=0.5,
        ),  # fmt: skip
        EvaluateRequest(models=("clinical", "dltr"), backbone="small", final=True, tag="fold-site-a", cutoffs={"dltr": {"youden_bin": 3}}),
        FinetuneRequest(mode="last-stage", epochs=2, backbone="small", seed=1, cutoffs={}, bins=1000, tag="t"),
    ],
)
def test_requests_round_trip_through_a_config_record(request_):
    config = request_.to_config()
    assert all(isinstance(v, int | float | str | bool) for v in config.values())  # what a Flower ConfigRecord holds
    assert type(request_).from_config(config) == request_
    if request_.QUERY:
        assert QUERIES[str(config["query"])] is type(request_)


def test_a_garbled_request_is_a_clear_error():
    with pytest.raises(TaceError, match="(?s)malformed TrainRequest.*same TACE-FL version"):
        TrainRequest.from_config({"lr": "fast"})


def test_replies_round_trip_and_check_what_they_read():
    arrays = {"dltr.w": np.ones((2, 3), dtype=np.float32)}
    train = TrainReply("site-a", 12, arrays, {"train-loss": 0.5}, {"num-examples": 4, "n-pos": 2})
    back = TrainReply.from_records(train.records())
    assert back.num_examples == 12 and back.metrics == {"train-loss": 0.5} and back.validation == train.validation
    declined = TrainReply("site-b", 0, None, {}, None, Failure(Reason.DECLINED_BUDGET, "declined to train dltr round 2"))
    assert TrainReply.from_records(declined.records()).declined == declined.declined
    with pytest.raises(TaceError, match="malformed training reply"):
        TrainReply.from_records(Records(site={"site-id": "site-a"}))  # no num-examples
    info = InfoReply("site-a", None, SiteCounts(n=10, labelled_train=6), "1.0", "sig")
    assert InfoReply.from_records(info.records()) == info
    refused = InfoReply("site-a", Failure(Reason.REQUIRES_DP, "only with DP"))
    assert InfoReply.from_records(refused.records()) == refused
    tuned = FinetuneReply("site-a", None, 0.7, 5, 3, 20, 1.5)
    assert FinetuneReply.from_records(tuned.records()) == tuned
    with pytest.raises(TaceError, match="not valid JSON"):
        EvaluateReply.from_records(Records(metrics={"num-examples": 1, "n-pos": 0}, site={"site-id": "x", "summary": "{"}))


def test_the_reason_code_survives_flowers_error_format():
    from tace.server.federation import failure_of

    failure = Failure(Reason.REQUIRES_SECAGG, "this site sends its weights only masked")
    as_flower = "<class 'RuntimeError'>:<'" + failure.encode() + "'>"  # how Flower reports a ClientApp's exception
    assert failure_of(as_flower) == failure
    assert failure_of("Error: Node is unavailable.").reason is Reason.TRANSPORT
    assert failure_of(None).reason is Reason.TRANSPORT
    assert Failure.decode("[tace:declined-budget] no budget left").declined


def _policy(tmp_path: Path, run: RunConfig, **site: object) -> SitePolicy:
    return SitePolicy(SiteConfig("site-a", tmp_path / "m.csv", tmp_path / "c", tmp_path / "o", **site), run)  # type: ignore[arg-type]


def test_the_sites_own_rules_refuse_with_their_reason(tmp_path):
    plain, dp = RunConfig(), RunConfig(dp=True)
    assert _policy(tmp_path, plain).join_refusal() is None
    assert _policy(tmp_path, plain, require_dp=True).join_refusal().reason is Reason.REQUIRES_DP  # type: ignore[union-attr]
    assert _policy(tmp_path, plain, require_secagg=True).join_refusal().reason is Reason.REQUIRES_SECAGG  # type: ignore[union-attr]
    cases = [
        (_policy(tmp_path, plain, require_dp=True).allow_training, Reason.REQUIRES_DP),
        (_policy(tmp_path, dp).allow_statistics, Reason.NOT_UNDER_DP),
        (_policy(tmp_path, dp).allow_finetuning, Reason.NOT_UNDER_DP),
        (_policy(tmp_path, plain, require_secagg=True).allow_weights_in_clear, Reason.REQUIRES_SECAGG),
    ]
    for check, reason in cases:
        with pytest.raises(SiteRefusal) as info:
            check()
        assert info.value.reason is reason and info.value.failure.encode().startswith(f"[tace:{reason.value}] ")
    _policy(tmp_path, dataclasses.replace(dp, dp_mode="sample")).allow_training()
    _policy(tmp_path, plain).allow_statistics()
