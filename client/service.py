"""A site's answers to the coordinator: one typed request in, one typed reply out (`tace.common.protocol`).

`tace.client.app` adapts these to Flower messages; the work itself is the site task's (`tace.client.task`) and the
site's own rules are its policy's (`tace.client.policy`). Flower recreates the ClientApp for every message, so a
`SiteService` lives for one message: the site's preprocessing cache, feature cache and privacy account are on its
disk. Replies carry model weights (checked finite and of the expected names and shapes before they are sent) and
aggregates, never per-patient values.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from tace.client.policy import SitePolicy
from tace.client.privacy import BudgetExhausted
from tace.client.task import SiteTask
from tace.common.clinical import FEATURES
from tace.common.config import RunConfig, SiteConfig
from tace.common.encoders import Encoders, SiteStatistics
from tace.common.errors import ManifestError, TaceError
from tace.common.models import StudyModels, model_signature, state_dict_numpy
from tace.common.protocol import (
    Arrays,
    EvaluateReply,
    EvaluateRequest,
    Failure,
    FinetuneReply,
    FinetuneRequest,
    InfoReply,
    InfoRequest,
    Reason,
    SiteRefusal,
    StatsReply,
    StatsRequest,
    TrainReply,
    TrainRequest,
    flatten_evaluation,
    unpack,
)

log = logging.getLogger("tace.client")


class SiteService:
    """One site answering one request of the coordinator, under the site's own configuration (`node_config`) and
    the run's (`run_config`, Flower's hyphenated mappings)."""

    def __init__(self, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> None:
        self.run = RunConfig.from_run_config(run_config)
        self.site = SiteConfig.from_node_config(node_config, self.run)
        self.policy = SitePolicy(self.site, self.run)

    def task(self, role: str, validate: bool = False) -> SiteTask:
        return SiteTask(self.site, self.run, role, validate=validate)

    def models(self, backbone: str, arrays: Arrays | None) -> StudyModels:
        """The study's models for `backbone`, with the weights received (flat ``stage.key`` names) loaded."""
        models = StudyModels.build(backbone, len(self.run.preprocess.sequences), len(FEATURES), fusion_head=self.run.head_form)
        if arrays:
            models.load(unpack(arrays))
        return models

    def answer(self, request: InfoRequest | StatsRequest | FinetuneRequest, arrays: Arrays | None) -> Any:
        """A query: who the site is, its clinical statistics, or fine-tuning."""
        if isinstance(request, InfoRequest):
            return self.info(request)
        if isinstance(request, StatsRequest):
            return self.stats(request)
        return self.finetune(request, arrays)

    def info(self, request: InfoRequest) -> InfoReply:
        """Who this site is, its counts, and whether its data, software and rules let it take part."""
        try:
            task = self.task(request.role, validate=True)
        except ManifestError as exc:
            log.error("%s", exc)  # the full list, with files, stays in the site's own log
            return InfoReply(self.site.site_id, Failure(Reason.DATA_PROBLEMS, problem_digest(exc)))
        signature = model_signature(
            request.backbones or (self.run.backbone,), len(self.run.preprocess.sequences), len(FEATURES), self.run.head_form
        )
        failure = compatibility(request, signature) or self.policy.join_refusal()
        if failure is not None:
            # The site's operator reads this in the client log; `tace-client start` ends on the codes no restart fixes.
            log.error("%s", failure.encode())
            return InfoReply(self.site.site_id, failure)
        return InfoReply(self.site.site_id, None, task.counts(), _version(), signature)

    def stats(self, request: StatsRequest) -> StatsReply:
        self.policy.allow_statistics()
        task = self.task(request.role)
        return StatsReply(self.site.site_id, dict(SiteStatistics(task.clinical_stats(), task.radiomics_stats()).to_flat()))

    def train(self, request: TrainRequest, arrays: Arrays | None) -> TrainReply:
        """One local training call of the requested stage; the reply holds that stage's weights.

        With sample-level differential privacy the site trains by DP-SGD within its own privacy account, and declines
        to train (replying with its validation, its privacy figures and the reason, but no weights) when the call
        would exceed its budget. With client-level DP under secure aggregation the site clips its own update.
        """
        self.policy.allow_training()
        task, models = self.task(request.role), self.models(request.backbone, arrays)
        encoder = _encoder(request.encoder)
        received = {k: v.copy() for k, v in state_dict_numpy(models.module(request.stage)).items()}
        # Internal validation of the global weights just received (the previous round's aggregate), before training
        # changes them: one message per round instead of a train and an evaluate message.
        validation = flatten_evaluation(task.evaluate(models, encoder, request.validate)) if request.validate else None
        privacy = task.privacy_account(request.study_id, request.dp_plan) if self.run.sample_dp else None
        try:
            result = task.train(request.stage, models, encoder, request.lr, request.seed, privacy, request.server_round)
        except BudgetExhausted as exc:
            assert privacy is not None
            log.warning("%s", exc)
            return TrainReply(self.site.site_id, 0, None, dict(privacy.report(trained=False)), validation, Failure(exc.reason, exc.message))
        weights = state_dict_numpy(models.module(request.stage))
        check_outgoing(weights, received)
        if self.run.client_dp and self.run.secagg:
            # Client-level DP under secure aggregation: the coordinator cannot clip what it cannot see, so the site
            # clips its own update to the clipping norm the coordinator sends (Flower's client-side fixed clipping).
            clip_update(weights, received, request.clipping_norm)
        metrics: dict[str, Any] = {}
        if privacy is None:
            # Under sample-level DP the training loss (computed on the sampled patients, without noise) and the speed (from
            # which the number of patients sampled follows) stay at the site: only DP-trained weights describe them.
            metrics.update({"train-loss": result.loss, "samples-per-s": result.samples_per_second, "local-s": result.seconds})
        if self.run.client_dp:
            metrics["site-weight"] = 1  # client-level DP averages the sites' updates unweighted (its sensitivity assumes so)
        if privacy is not None:
            metrics.update(privacy.report())
        return TrainReply(self.site.site_id, result.num_examples, weights, metrics, validation)

    def evaluate(self, request: EvaluateRequest, arrays: Arrays | None) -> EvaluateReply:
        """Aggregates (AUC, class-conditional score histograms) of the requested models on the site's evaluation set;
        the final evaluation adds the site's analysis summary and writes its predictions at the site."""
        task, models = self.task(request.role), self.models(request.backbone, arrays)
        result = task.evaluate(models, _encoder(request.encoder), request.models, write_predictions=request.final, tag=request.tag,
                               summary=request.final, cutoffs=request.cutoffs)  # fmt: skip
        return EvaluateReply(self.site.site_id, task.role, flatten_evaluation(result), result.get("summary"))

    def finetune(self, request: FinetuneRequest, arrays: Arrays | None) -> FinetuneReply:
        """Fine-tune the final models on this site's training split; reply with the global and fine-tuned validation
        AUCs (aggregates). The fine-tuned model stays in the site's output folder (finetuned/<tag>/tace-model.zip)."""
        from tace.client.finetune import finetune, save_finetuned
        from tace.common.artifact import FILENAME, ModelArtefact

        self.policy.allow_finetuning()
        task, models = self.task(request.role), self.models(request.backbone, arrays)
        encoder = _encoder(request.encoder)
        if encoder is None:
            raise TaceError(
                "the coordinator sent no input encoders to fine-tune with", "the coordinator and the site must run the same version"
            )
        result = finetune(task, models, encoder, request.backbone, request.mode, request.epochs, 0.0, request.seed)
        base = ModelArtefact.of_run(self.run, {}, request.backbone, encoder.to_dict(), request.cutoffs, "")
        folder = self.site.output_dir / "finetuned" / (request.tag or "model")
        save_finetuned(
            folder / FILENAME, result, dataclasses.replace(base, bins=request.bins), f"fine-tuned ({result.mode}) at {self.site.site_id}"
        )
        return FinetuneReply(self.site.site_id, result.global_auc, result.finetuned_auc, result.n_train, result.n_val, result.epochs,
                             result.seconds)  # fmt: skip


def _encoder(data: dict[str, Any]) -> Encoders | None:
    return Encoders.from_dict(data) if data else None


def _version() -> str:
    from tace.common.cli import version_string

    return version_string()


def compatibility(request: InfoRequest, ours: str) -> Failure | None:
    """Why this site cannot take part with the coordinator's software (None when it can); `ours` is this site's model
    signature for the backbones the coordinator named."""
    theirs = request.coordinator_version
    if not theirs:
        return None
    if theirs != _version():
        return Failure(Reason.VERSION_MISMATCH,
                       f"this site runs TACE-FL {_version()} but the coordinator runs {theirs}: install TACE-FL {theirs} at this site "
                       "(the same version everywhere guarantees the same model and preprocessing) and start the client again")  # fmt: skip
    if request.model_signature and request.model_signature != ours:
        return Failure(Reason.SIGNATURE_MISMATCH,
                       f"this site builds different models than the coordinator (model signature {ours}, coordinator "
                       f"{request.model_signature}) although both run the same TACE-FL version: the installation at this site was "
                       "modified; reinstall TACE-FL")  # fmt: skip
    return None


def check_outgoing(arrays: Arrays, expected: Arrays) -> None:
    """Refuse to send weights that are non-finite or not exactly the model's names and shapes."""
    if set(arrays) != set(expected):
        raise TaceError("outgoing weights do not match the model's parameter names", "report this as a bug")
    for k, v in arrays.items():
        if v.shape != expected[k].shape:
            raise TaceError(f"outgoing weight {k} has shape {v.shape}, expected {expected[k].shape}", "report this as a bug")
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            raise TaceError(f"training diverged at this site: weight {k} is not finite", "lower the learning rate (run-config lr)")


def clip_update(arrays: Arrays, received: Arrays, clipping_norm: float) -> None:
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


def failure_of(exc: BaseException) -> Failure:
    """What the coordinator learns of an error at the site (logged there in full): a reason code and a message
    without file names."""
    if isinstance(exc, ManifestError):
        log.error("%s", exc)
        return Failure(Reason.DATA_PROBLEMS, problem_digest(exc))
    if isinstance(exc, SiteRefusal):
        log.error("%s", exc)
        return exc.failure
    if isinstance(exc, TaceError):
        log.error("%s", exc)
        return Failure(Reason.SITE_ERROR, f"{exc.message}" + (f" ({exc.hint})" if exc.hint else ""))
    log.error("site error", exc_info=exc)
    return Failure(Reason.INTERNAL_ERROR, f"internal error at the site ({type(exc).__name__}); the site's log has the details")
