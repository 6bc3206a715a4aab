"""The Flower ClientApp a site runs: unpacks messages, calls `tace.client.task`, packs weights and aggregates.

Flower recreates the ClientApp for every message, so nothing here keeps state between rounds: the site's
preprocessing cache, feature cache and privacy account are on its disk. Replies carry model weights (checked
finite and of the expected names and shapes before sending) and aggregate metrics, never per-patient values.
With secure aggregation (`secagg_mod`) the weights leave only masked.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE

from tace.client.privacy import BudgetExhausted
from tace.client.task import SiteTask
from tace.common.clinical import FEATURES, ClinicalEncoder
from tace.common.config import RunConfig, SiteConfig, flag
from tace.common.errors import ManifestError, TaceError
from tace.common.models import StudyModels, model_signature, state_dict_numpy
from tace.common.protocol import ARRAYS, CONFIG, METRICS, QUERY_FINETUNE, QUERY_INFO, QUERY_STATS, SITE, flatten_evaluation, unpack

log = logging.getLogger("tace.client")


def _arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _numpy_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    import torch

    return ArrayRecord(torch_state_dict={k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _site(msg: Message, context: Context, validate: bool = False) -> tuple[SiteTask, RunConfig, dict[str, Any]]:
    run = RunConfig.from_run_config(context.run_config)
    config = dict(msg.content.config_records[CONFIG]) if CONFIG in msg.content else {}
    site = SiteConfig.from_node_config(context.node_config, run)
    return SiteTask(site, run, str(config.get("role", "holdout")), validate=validate), run, config


def _models(run: RunConfig, config: dict[str, Any], msg: Message) -> StudyModels:
    models = StudyModels.build(str(config["backbone"]), len(run.preprocess.sequences), len(FEATURES))
    if ARRAYS in msg.content:
        models.load(unpack(_arrays_to_numpy(msg.content.array_records[ARRAYS])))
    return models


def _encoder(config: dict[str, Any]) -> ClinicalEncoder | None:
    text = str(config.get("encoder", ""))
    return ClinicalEncoder.from_dict(json.loads(text)) if text else None


def check_outgoing(arrays: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Refuse to send weights that are non-finite or not exactly the model's names and shapes."""
    if set(arrays) != set(expected):
        raise TaceError("outgoing weights do not match the model's parameter names", "report this as a bug")
    for k, v in arrays.items():
        if v.shape != expected[k].shape:
            raise TaceError(f"outgoing weight {k} has shape {v.shape}, expected {expected[k].shape}", "report this as a bug")
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            raise TaceError(f"training diverged at this site: weight {k} is not finite", "lower the learning rate (run-config lr)")


def problem_digest(exc: ManifestError) -> str:
    """What the coordinator may learn of a site's data problems: kinds, columns and row numbers; no file names
    (exported folders are often named after patients) and no values."""
    groups: dict[tuple[str, str], list[int]] = {}
    for p in exc.problems:
        groups.setdefault((p.kind, p.column or "-"), []).append(p.row or 0)
    lines = [f"{len(exc.problems)} problem(s) in the site's data; the site's `tace-client check` lists them with files:"]
    for (kind, column), rows in sorted(groups.items()):
        shown = ", ".join(str(r) for r in rows[:10]) + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")
        lines.append(f"  {kind} in column {column}, row(s) {shown}")
    return "\n".join(lines)


def site_errors(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Errors raised at the site are logged there in full; the coordinator gets a message without file names."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except ManifestError as exc:
            log.error("%s", exc)
            raise RuntimeError(problem_digest(exc)) from None
        except TaceError as exc:
            log.error("%s", exc)
            raise RuntimeError(f"{exc.message}" + (f" ({exc.hint})" if exc.hint else "")) from None
        except Exception as exc:
            log.exception("site error")
            raise RuntimeError(f"internal error at the site ({type(exc).__name__}); the site's log has the details") from None

    return wrapped


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Secure aggregation (run-config secagg) for the train messages that carry a SecAgg+ protocol stage: Flower's
    `secaggplus_mod` masks the weights our train handler returns; every other message passes unchanged."""
    if msg.metadata.message_type != "train":
        return call_next(msg, context)
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        if flag(context.node_config.get("require-secagg", False), "require-secagg"):
            raise TaceError("this site sends its weights only masked (its node config require-secagg) and the coordinator "
                            "asked for them in the clear", "the coordinator sets run-config secagg=true")  # fmt: skip
        return call_next(msg, context)
    from flwr.client.mod import secaggplus_mod

    return secaggplus_mod(msg, context, functools.partial(_masked_reply, call_next))


def _masked_reply(call_next: ClientAppCallable, msg: Message, context: Context) -> Message:
    """Our train reply in the form `secaggplus_mod` masks (Flower's legacy FitRes records); our own weight record is
    removed so the weights leave only masked. The metrics and site records travel as usual."""
    reply = call_next(msg, context)
    if reply.has_error():
        raise RuntimeError(reply.error.reason)  # the site's own message, for the coordinator's log
    content = reply.content
    run = RunConfig.from_run_config(context.run_config)
    if ARRAYS in content.array_records:
        arrays = {k: v.numpy() for k, v in content.array_records.pop(ARRAYS).items()}
        weight = 1 if run.client_dp else int(cast(int, content.metric_records[METRICS]["num-examples"]))
    else:
        # The site declined to train (its privacy budget): it takes part with weight 0, so its validation and privacy
        # figures still reach the coordinator and the protocol keeps its neighbours' masks balanced.
        stage = str(msg.content.config_records[CONFIG]["stage"])
        sent = msg.content.array_records[ARRAYS]
        arrays = {k.split(".", 1)[1]: np.zeros_like(v.numpy()) for k, v in sent.items() if k.startswith(f"{stage}.")}
        weight = 0
    state = context.state.config_records[RECORD_KEY_STATE]
    largest = (
        max((float(np.abs(v).max()) for v in arrays.values() if v.size), default=0.0) * weight / float(cast(float, state["max_weight"]))
    )
    bound = float(cast(float, state["clipping_range"]))
    if largest > bound:
        raise TaceError(f"a weight of this site's update ({largest:.3g} after weighting) is beyond the secure-aggregation range "
                        f"(±{bound:g})", "training diverged at this site: lower the learning rate (run-config lr)")  # fmt: skip
    # The order of the arrays is the order of the names the coordinator unmasks into: sorted.
    content.array_records["fitres.parameters"] = ArrayRecord({k: Array(np.ascontiguousarray(arrays[k])) for k in sorted(arrays)})
    content.metric_records["fitres.num_examples"] = MetricRecord({"num_examples": weight})
    content.config_records["fitres.metrics"] = ConfigRecord({})
    content.config_records["fitres.status"] = ConfigRecord({"code": 0, "message": "Success"})
    return reply


app = ClientApp(mods=[secagg_mod])


@app.query()
@site_errors
def query(msg: Message, context: Context) -> Message:
    """`info`: who this site is, its counts, and whether its data pass validation; `stats`: clinical statistics."""
    kind = str(msg.content.config_records[CONFIG]["query"])
    if kind == QUERY_INFO:
        try:
            task, run, _ = _site(msg, context, validate=True)
        except ManifestError as exc:
            log.error("%s", exc)  # the full list, with files, stays in the site's own log
            run = RunConfig.from_run_config(context.run_config)
            site = SiteConfig.from_node_config(context.node_config, run)
            return Message(
                RecordDict({SITE: ConfigRecord({"site-id": site.site_id, "ok": False, "problems": problem_digest(exc)})}), reply_to=msg
            )
        info = {k: v for k, v in task.info().items()}
        signature = model_signature(_backbones(msg, run), len(run.preprocess.sequences), len(FEATURES))
        mismatch = _compatibility(msg, signature)
        if not mismatch and task.site.require_secagg and not run.secagg:
            mismatch = ("this site sends its weights only masked by secure aggregation (its node config require-secagg): the "
                        "coordinator must set run-config secagg=true")  # fmt: skip
        if not mismatch and task.site.require_dp and not run.sample_dp:
            mismatch = ("this site takes part only in runs with sample-level differential privacy (its node config require-dp): "
                        "the coordinator must set run-config dp=true and dp-mode='sample'")  # fmt: skip
        if mismatch:
            log.error("%s", mismatch)  # the site's operator reads this in the client log
            return Message(
                RecordDict({SITE: ConfigRecord({"site-id": task.site.site_id, "ok": False, "problems": mismatch})}), reply_to=msg
            )
        return Message(
            RecordDict({SITE: ConfigRecord({**info, "ok": True, "version": _version(), "model-signature": signature})}), reply_to=msg
        )
    if kind == QUERY_STATS:
        task, run, _ = _site(msg, context)
        if run.dp or task.site.require_dp:
            raise TaceError("this site sends no clinical statistics in a run with differential privacy (or when its node config "
                            "require-dp is set): they are not covered by its privacy account", "the coordinator uses the reference encoder")  # fmt: skip
        return Message(
            RecordDict(
                {
                    METRICS: MetricRecord(dict[str, int | float | list[int] | list[float]](task.clinical_stats().to_flat())),
                    SITE: ConfigRecord({"site-id": task.site.site_id}),
                }
            ),
            reply_to=msg,
        )
    if kind == QUERY_FINETUNE:
        return _finetune(msg, context)
    raise TaceError(f"unknown query {kind!r}")


def _finetune(msg: Message, context: Context) -> Message:
    """Fine-tune the final models on this site's training split; reply with the global and fine-tuned validation
    AUCs (aggregates). The fine-tuned model stays in the site's output folder (finetuned/tace-model.zip)."""
    from tace.client.finetune import finetune, save_finetuned
    from tace.common.artifact import FILENAME, TRAINING_KEYS

    task, run, config = _site(msg, context)
    if run.dp:
        raise TaceError("this site does not fine-tune in a run with differential privacy: the fine-tuned model's AUC would leave "
                        "outside its privacy account", "fine-tune locally with `tace-client finetune`, where nothing leaves")  # fmt: skip
    models = _models(run, config, msg)
    encoder = _encoder(config)
    assert encoder is not None
    backbone = str(config["backbone"])
    result = finetune(task, models, encoder, backbone, str(config["mode"]), int(config.get("epochs", 0)), 0.0, int(config.get("seed", 0)))
    training = {k: v for k, v in run.to_run_config().items() if k in TRAINING_KEYS}
    folder = task.site.output_dir / "finetuned" / (str(config.get("tag", "")) or "model")
    save_finetuned(folder / FILENAME, result, backbone, run.preprocess, encoder, json.loads(str(config.get("cutoffs", "") or "{}")),
                   int(config.get("bins", run.analysis_bins)), training, f"fine-tuned ({result.mode}) at {task.site.site_id}")  # fmt: skip
    metrics: dict[str, int | float | list[int] | list[float]] = {"global-auc": -1.0 if result.global_auc is None else result.global_auc,
               "finetuned-auc": -1.0 if result.finetuned_auc is None else result.finetuned_auc,
               "n-train": result.n_train, "n-val": result.n_val, "epochs": result.epochs, "seconds": result.seconds}  # fmt: skip
    return Message(RecordDict({METRICS: MetricRecord(metrics), SITE: ConfigRecord({"site-id": task.site.site_id})}), reply_to=msg)


@app.train()
@site_errors
def train(msg: Message, context: Context) -> Message:
    """One local training call of the stage named in the config; replies with that stage's weights.

    With sample-level differential privacy the site trains by DP-SGD within its own privacy account, and declines
    to train (replying with its validation, its privacy figures and the reason, but no weights) when the call
    would exceed its budget. With client-level DP under secure aggregation the site clips its own update.
    """
    task, run, config = _site(msg, context)
    stage = str(config["stage"])
    server_round = int(config.get("server-round", 0))
    models = _models(run, config, msg)
    expected = {k: v.copy() for k, v in state_dict_numpy(models.module(stage)).items()}  # the weights received (a copy)
    site: dict[str, Any] = {"site-id": task.site.site_id}
    validate = tuple(m for m in str(config.get("validate", "")).split(",") if m)
    if validate:
        # Internal validation of the global weights just received (the previous round's aggregate), before
        # training changes them: one message per round instead of a train and an evaluate message.
        site["validation"] = json.dumps(flatten_evaluation(task.evaluate(models, _encoder(config), validate)))
    privacy = None
    if run.sample_dp:
        privacy = task.privacy_account(str(config.get("study-id", "")), dict(json.loads(str(config.get("dp-plan", "") or "{}"))))
    elif task.site.require_dp:
        raise TaceError("this site trains only with sample-level differential privacy (its node config require-dp) and the run has it off",
                        "the coordinator sets run-config dp=true and dp-mode='sample'")  # fmt: skip
    try:
        result = task.train(stage, models, _encoder(config), float(config["lr"]), int(config["seed"]), privacy, server_round)
    except BudgetExhausted as exc:
        assert privacy is not None
        log.warning("%s", exc)
        site["declined"] = exc.message
        metrics = MetricRecord({"num-examples": 0, **privacy.report(trained=False)})
        return Message(RecordDict({METRICS: metrics, SITE: ConfigRecord(site)}), reply_to=msg)
    arrays = state_dict_numpy(models.module(stage))
    check_outgoing(arrays, expected)
    if run.client_dp and run.secagg:
        # Client-level DP under secure aggregation: the coordinator cannot clip what it cannot see, so the site
        # clips its own update to the clipping norm the coordinator sends (Flower's client-side fixed clipping).
        _clip_update(arrays, expected, float(config["clipping-norm"]))
    values: dict[str, int | float | list[int] | list[float]] = {"num-examples": result.num_examples}
    if privacy is None:
        # Under sample-level DP the training loss (computed on the sampled patients, without noise) and the speed (from
        # which the number of patients sampled follows) stay at the site: only DP-trained weights describe them.
        values.update({"train-loss": result.loss, "samples-per-s": result.samples_per_second, "local-s": result.seconds})
    if run.client_dp:
        values["site-weight"] = 1  # client-level DP averages the sites' updates unweighted (its sensitivity assumes so)
    if privacy is not None:
        values.update(privacy.report())
    # Exactly one ArrayRecord and one MetricRecord, as Flower's strategies expect (the validation rides in a ConfigRecord).
    return Message(RecordDict({ARRAYS: _numpy_to_record(arrays), METRICS: MetricRecord(values), SITE: ConfigRecord(site)}), reply_to=msg)


def _clip_update(arrays: dict[str, np.ndarray], received: dict[str, np.ndarray], clipping_norm: float) -> None:
    """Scale the update (new minus received weights) to L2 norm at most `clipping_norm`, in place (Flower's helper)."""
    from flwr.supercore.differential_privacy import compute_clip_model_update

    names = list(arrays)
    new = [arrays[k].astype(np.float64) for k in names]
    old = [received[k].astype(np.float64) for k in names]
    if not any(np.any(a != b) for a, b in zip(new, old, strict=True)):
        return  # no update: nothing to clip (Flower's helper would divide by its zero norm)
    compute_clip_model_update(param1=new, param2=old, clipping_norm=clipping_norm)
    for k, v in zip(names, new, strict=True):
        arrays[k] = v.astype(arrays[k].dtype)


@app.evaluate()
@site_errors
def evaluate(msg: Message, context: Context) -> Message:
    """Aggregates (AUC, class-conditional score histograms) of the requested models on the site's evaluation set."""
    task, run, config = _site(msg, context)
    models = _models(run, config, msg)
    wanted = tuple(str(config["models"]).split(","))
    final = bool(config.get("final", False))
    cutoffs = json.loads(str(config.get("cutoffs", "") or "{}"))
    result = task.evaluate(
        models, _encoder(config), wanted, write_predictions=final, tag=str(config.get("tag", "")), summary=final, cutoffs=cutoffs
    )
    site: dict[str, Any] = {"site-id": task.site.site_id, "role": task.role}
    if final:
        site["summary"] = json.dumps(result["summary"])
    return Message(RecordDict({METRICS: MetricRecord(flatten_evaluation(result)), SITE: ConfigRecord(site)}), reply_to=msg)


def _backbones(msg: Message, run: RunConfig) -> tuple[str, ...]:
    names = str(msg.content.config_records[CONFIG].get("backbones", ""))
    return tuple(n for n in names.split(",") if n) or (run.backbone,)


def _compatibility(msg: Message, ours: str) -> str:
    """Why this site cannot take part with the coordinator's software (empty when it can); `ours` is this site's
    model signature for the backbones the coordinator named."""
    config = msg.content.config_records[CONFIG]
    theirs = str(config.get("coordinator-version", ""))
    if not theirs:
        return ""
    if theirs != _version():
        return (f"this site runs TACE-FL {_version()} but the coordinator runs {theirs}: install TACE-FL {theirs} at this site "
                "(the same version everywhere guarantees the same model and preprocessing) and start the client again")  # fmt: skip
    wanted = str(config.get("model-signature", ""))
    if wanted and wanted != ours:
        return (f"this site builds different models than the coordinator (model signature {ours}, coordinator {wanted}) although "
                "both run the same TACE-FL version: the installation at this site was modified; reinstall TACE-FL")  # fmt: skip
    return ""


def _version() -> str:
    from tace.common.cli import version_string

    return version_string()
