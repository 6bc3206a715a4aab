"""The study workflow the coordinator runs: statistics, DLTR, DLTRMLP head, clinical model, final evaluation.

It talks to the sites through a `Federation` (Flower messages in `tace.server.app`; direct calls for the
single-machine references in `tace.simulation.inprocess`), so the orchestration, early stopping, checkpoints and
summary are the same code whichever way the sites are reached.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from tace.common.clinical import ClinicalEncoder, ClinicalStats
from tace.common.config import RunConfig
from tace.common.errors import TaceError
from tace.common.metrics import auc_from_histograms
from tace.common.protocol import MODELS
from tace.common.summaries import check_summary, fix_cutoffs
from tace.server.progress import Progress, load_arrays
from tace.server.rundir import RunDir

log = logging.getLogger("tace.server")

Arrays = dict[str, np.ndarray]
STAGE_MODEL = {"dltr": "dltr", "head": "dltrmlp", "clinical": "clinical"}


@dataclass
class TrainReply:
    site_id: str
    arrays: Arrays
    num_examples: int
    metrics: dict[str, float]
    raw: Any = None  # the transport's own reply (a Flower Message), for strategies that aggregate those
    error: str = ""  # the site did not deliver an update this round (it failed, vanished or timed out): why
    evaluation: dict[str, dict[str, Any]] | None = None  # {site: validation of the weights it received}, when asked
    declined: bool = False  # the site declined to train (its privacy budget): `error` says why
    masked: bool = False  # secure aggregation: the update is inside the round's aggregate, `arrays` is empty


@dataclass(frozen=True)
class TrainRound:
    """One round of local training: the stage, its learning rate and seed (the first training site's; the others
    get seed + their place in site order), the round, the backbone, and the models to validate first (if any)."""

    stage: str
    lr: float
    seed: int
    server_round: int
    backbone: str
    validate: tuple[str, ...] = ()


@dataclass(frozen=True)
class Evaluation:
    """What an evaluate call asks of the sites: the models; for the final evaluation also which sites (`role`,
    None: all), the tag of the prediction files they write, and the cut-offs that group their survival tables."""

    models: tuple[str, ...]
    backbone: str
    final: bool = False
    tag: str = ""
    role: str | None = None
    cutoffs: dict[str, Any] | None = None


@dataclass(frozen=True)
class Finetune:
    """What fine-tuning asks of the training sites: the mode ('head' or 'last-stage'), epochs (0: the default),
    the backbone, and the cut-offs the fine-tuned model keeps (the global model's)."""

    mode: str
    epochs: int
    backbone: str
    seed: int
    cutoffs: dict[str, Any] = field(default_factory=dict)
    tag: str = ""  # leave-one-centre-out: the fold, so each fold's fine-tuned model is kept apart at the site


@dataclass
class SiteInfo:
    site_id: str
    role: str
    n_train: int
    n_eval: int
    val_responders: int = 0


class Federation(Protocol):
    """How the workflow reaches the sites."""

    def sites(self) -> list[SiteInfo]: ...

    def clinical_stats(self) -> list[ClinicalStats]: ...

    def train(self, arrays: dict[str, Arrays], encoder: ClinicalEncoder | None, request: TrainRound) -> list[TrainReply]:
        """Local training of `request.stage` at every training site. With `request.validate`, each site first
        evaluates those models with the weights it received (its internal validation, as `evaluate` during rounds)
        and the replies carry it."""
        ...

    def aggregate(self, stage: str, server_round: int, replies: list[TrainReply], current: Arrays) -> Arrays: ...

    def strategy_state(self, stage: str) -> Arrays:
        """The aggregation strategy's own state for `stage` (FedAdam's moments; empty for FedAvg), for resuming."""
        ...

    def restore_strategy(self, stage: str, state: Arrays) -> None: ...

    def evaluate(self, arrays: dict[str, Arrays], encoder: ClinicalEncoder | None, request: Evaluation) -> dict[str, dict[str, Any]]:
        """Aggregates per site. During rounds (`request.final` False) training sites only. The final evaluation
        reaches the sites of `request.role` (every site when None) and each result also holds the site's analysis
        summary under ``"summary"``, its survival event tables grouped with `request.cutoffs` when given."""
        ...

    def set_roles(self, holdout: tuple[str, ...]) -> None: ...

    def finetune(self, arrays: dict[str, Arrays], encoder: ClinicalEncoder, request: Finetune) -> dict[str, dict[str, Any]]:
        """Local fine-tuning at every training site (`tace.client.finetune`): per site the global and the fine-tuned
        DLTRMLP AUC on its validation split, its counts, or ``{"error": why}``."""
        ...


@dataclass
class StudyResult:
    arrays: dict[str, Arrays]
    encoder: ClinicalEncoder
    evaluation: dict[str, dict[str, Any]]
    roles: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)
    backbone: str = ""
    backbone_comparison: dict[str, float | None] = field(default_factory=dict)
    cutoffs: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)


def pooled_auc(evaluation: dict[str, dict[str, Any]], roles: dict[str, str], model: str, role: str = "train") -> float | None:
    """AUC over the evaluation sets of all sites of `role`, from their summed score histograms."""
    neg: np.ndarray | None = None
    pos: np.ndarray | None = None
    for site, res in evaluation.items():
        if roles.get(site) != role or model not in res:
            continue
        n, p = np.asarray(res[model]["hist-neg"]), np.asarray(res[model]["hist-pos"])
        neg, pos = (n, p) if neg is None or pos is None else (neg + n, pos + p)
    return None if neg is None or pos is None else auc_from_histograms(neg, pos)


def _site_progress(
    replies: list[TrainReply], evaluation: dict[str, dict[str, Any]], model: str, excluded: dict[str, str] | None = None
) -> dict[str, str]:
    """Per training site: local training loss and internal-validation AUC of the round (for progress lines)."""
    loss = {r.site_id: r.metrics.get("train-loss") for r in replies}
    out = {}
    for site, res in sorted(evaluation.items()):
        auc = res.get(model, {}).get("auc")
        parts = [f"loss={loss[site]:.3f}" if loss.get(site) is not None else "", f"auc={auc:.3f}" if auc is not None else "auc=n/a"]
        out[site] = ",".join(p for p in parts if p)
    for site in sorted(excluded or {}):
        out[site] = "excluded" + (f",auc={out[site].rsplit('auc=', 1)[1]}" if site in out else "")
    return out


def update_norm(update: Arrays, current: Arrays) -> float:
    """Euclidean distance of a site's weights from the global weights they were trained from."""
    total = 0.0
    for k, v in current.items():
        if v.dtype.kind == "f":
            total += float(np.sum((update[k].astype(np.float64) - v.astype(np.float64)) ** 2))
    return float(np.sqrt(total))


def screen_updates(replies: list[TrainReply], current: Arrays, max_norm_ratio: float) -> tuple[list[TrainReply], dict[str, str]]:
    """Split a round's replies into usable updates and excluded ones (site -> reason).

    Excluded: sites that failed, declined or did not answer; updates whose names or shapes differ from the global
    model's; non-finite updates; and (when `max_norm_ratio` > 0 and at least two updates are left) updates farther
    from the global weights than `max_norm_ratio` times the median distance of the other sites' updates. Masked
    updates (secure aggregation) cannot be looked into: they are accepted, and the federation checks their aggregate.
    """
    accepted: list[TrainReply] = []
    excluded: dict[str, str] = {}
    for r in replies:
        if r.error:
            excluded[r.site_id] = r.error
        elif r.masked:
            accepted.append(r)
        elif set(r.arrays) != set(current):
            excluded[r.site_id] = "update with unexpected weight names (another TACE-FL version or model definition?)"
        elif bad := [k for k, v in r.arrays.items() if v.shape != current[k].shape]:
            excluded[r.site_id] = f"update of the wrong shape ({bad[0]}: {r.arrays[bad[0]].shape}, expected {current[bad[0]].shape})"
        elif not all(np.isfinite(v).all() for v in r.arrays.values() if v.dtype.kind == "f"):
            excluded[r.site_id] = "non-finite update (NaN or infinity): training diverged at the site"
        else:
            accepted.append(r)
    if max_norm_ratio > 0 and sum(not r.masked for r in accepted) >= 2:
        norms = {r.site_id: update_norm(r.arrays, current) for r in accepted if not r.masked}
        far = {}
        for site, norm in norms.items():
            others = float(np.median([n for s, n in norms.items() if s != site]))
            if norm > max_norm_ratio * others and norm > 0:
                far[site] = (
                    f"update norm {norm:.3g} is {norm / max(others, 1e-12):.1f} x the median of the other sites' ({others:.3g}); bound {max_norm_ratio:g} x"
                )
        excluded.update(far)
        accepted = [r for r in accepted if r.site_id not in far]
    return accepted, excluded


def run_stage(
    federation: Federation,
    run: RunConfig,
    rundir: RunDir,
    stage: str,
    arrays: dict[str, Arrays],
    encoder: ClinicalEncoder | None,
    roles: dict[str, str],
    rounds: int,
    base_lr: float,
    backbone: str,
    label: str | None = None,
    on_round: Callable[..., None] | None = None,
    progress: Progress | None = None,
) -> tuple[Arrays, float | None]:
    """Federated rounds of one stage with early stopping on pooled internal-validation AUC; returns the best weights.

    The training sites validate round r's global weights at the start of round r + 1's train message (one message
    per site and round instead of two: in a deployment every message starts a fresh process); the last round's
    weights are validated with an evaluate message. A round is complete, checkpointed and saved in `progress` once
    its validation is in, so an interrupted stage continues (``resume``) from its last completed round exactly as
    if it had not been interrupted. When early stopping triggers, the next round's local training (already done)
    is discarded.
    """
    model = STAGE_MODEL[stage]
    label = label or stage
    progress = progress or Progress(rundir.path / "progress.json")
    state = progress.stage(label)
    if state.done:
        return load_arrays(rundir.path / "checkpoints" / label / "best.npz"), (state.best_auc if state.best_auc >= 0 else None)
    current = arrays[stage]
    best = current
    if state.next_round > 1:
        done = state.next_round - 1
        current = load_arrays(rundir.checkpoint_path(label, done))
        best = load_arrays(rundir.checkpoint_path(label, state.best_round)) if state.best_round else current
        federation.restore_strategy(stage, load_arrays(rundir.checkpoint_path(label, f"strategy-round-{done:03d}")))
        log.info("%s: resuming after round %d of %d", label, done, rounds)

    @dataclass
    class Pending:
        """A round trained and aggregated, awaiting its validation."""

        round: int
        lr: float
        accepted: list[TrainReply]
        excluded: dict[str, str]
        train_s: float
        weights: Arrays

    def complete(p: Pending, evaluation: dict[str, dict[str, Any]]) -> None:
        nonlocal best
        val_auc = pooled_auc(evaluation, roles, model, "train")
        rundir.record_round(label, p.round, p.lr, p.accepted, evaluation, model, val_auc, p.train_s)
        rundir.checkpoint(label, p.round, p.weights)
        rundir.checkpoint(label, f"strategy-round-{p.round:03d}", federation.strategy_state(stage))
        if val_auc is None:
            # Nothing to select on (a single-class validation set, allowed only for the local reference): keep the
            # latest weights and do not stop early.
            best, state.best_round = p.weights, p.round
        elif val_auc > state.best_auc + 1e-9 or p.round == 1:
            best, state.best_auc, state.best_round, state.since_best = p.weights, val_auc, p.round, 0
        else:
            state.since_best += 1
        state.next_round = p.round + 1
        progress.save()
        if on_round:
            on_round(label, p.round, rounds, val_auc, _site_progress(p.accepted, evaluation, model, p.excluded))
        log.info(
            "%s round %d/%d: pooled internal-validation AUC %s", label, p.round, rounds, "n/a" if val_auc is None else f"{val_auc:.3f}"
        )

    def stop_early() -> bool:
        return bool(run.patience) and state.since_best >= run.patience

    pending: Pending | None = None
    r = state.next_round
    while r <= rounds and not stop_early():
        lr = run.lr_at(r, rounds, base_lr)
        seed = run.seed * 100_003 + r * 101 + {"dltr": 1, "head": 2, "clinical": 3}[stage]
        start = time.perf_counter()
        replies = federation.train(
            {**arrays, stage: current}, encoder, TrainRound(stage, lr, seed, r, backbone, (model,) if pending else ())
        )
        if pending is not None:
            complete(pending, {site: res for rep in replies for site, res in (rep.evaluation or {}).items()})
            pending = None
            if stop_early():
                break  # this round's local training is discarded
        accepted, excluded = screen_updates(replies, current, run.max_update_norm_ratio)
        declined = {rep.site_id for rep in replies if rep.declined}
        for site, reason in sorted(excluded.items()):
            rundir.record_event("declined" if site in declined else "excluded", label, r, site, reason)
        required = min(run.min_sites, len(replies))
        if len(accepted) < max(required, 1):
            hint = (
                "bring the missing sites back online, then continue the run with `tace-server start --resume` (progress up to the "
                "previous round is kept); or lower run-config min-sites"
            )
            if declined:
                hint = (
                    "the run stops cleanly: the completed rounds and each site's privacy account are kept. Sites out of privacy "
                    "budget can train again only with their ethics boards' approval of a larger budget (run-config "
                    "dp-target-epsilon, the site's own max-epsilon), then `tace-server start --resume`; or start a new run "
                    "with fewer rounds or more noise"
                )
            raise TaceError(
                f"round {r} of stage {label}: {len(accepted)} usable update(s), fewer than min-sites ({required}); "
                + "; ".join(f"{s}: {why}" for s, why in sorted(excluded.items())),
                hint,
            )
        current = federation.aggregate(stage, r, accepted, current)
        pending = Pending(r, lr, accepted, excluded, time.perf_counter() - start, current)
        r += 1
    if stop_early():
        log.info("%s: early stop after round %d (no improvement for %d rounds)", label, state.next_round - 1, run.patience)
    elif pending is not None:
        complete(pending, federation.evaluate({**arrays, stage: pending.weights}, encoder, Evaluation((model,), backbone)))
    rundir.checkpoint(label, "best", best)
    state.done = True
    progress.save()
    return best, (state.best_auc if state.best_auc >= 0 else None)


def run_study(
    federation: Federation,
    run: RunConfig,
    rundir: RunDir,
    initial: Callable[[str | None], dict[str, Arrays]],
    on_round: Callable[..., None] | None = None,
    tag: str = "",
    require_both_classes: bool = True,
) -> StudyResult:
    """The whole study on one federation layout.

    Parameters
    ----------
    initial : callable
        ``initial(backbone)`` returns freshly initialised weights ``{"dltr": ..., "head": ..., "clinical": ...}``.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    infos = federation.sites()
    roles = {s.site_id: s.role for s in infos}
    if not any(s.role == "train" for s in infos):
        raise TaceError("no training site in this layout", "list fewer sites in holdout-sites")
    for s in infos:
        if s.role == "train" and (s.n_train == 0 or s.n_eval == 0):
            raise TaceError(f"training site {s.site_id} has {s.n_train} labelled train and {s.n_eval} labelled val patients",
                            "each training site needs labelled patients in both the train and val splits")  # fmt: skip
    trainers = [s for s in infos if s.role == "train"]
    pos = sum(s.val_responders for s in trainers)
    if require_both_classes and (pos == 0 or pos == sum(s.n_eval for s in trainers)):
        raise TaceError(
            "the training sites' pooled validation split holds only one class: no AUC to select models on",
            "put both responders and non-responders in the val splits of the training sites",
        )
    progress = Progress.start(rundir.path, run.resume)
    encoder_path = rundir.path / "clinical_encoder.json"
    if progress.resumed and encoder_path.exists():
        # Resuming: the statistics were merged before the interruption; the sites' data have not changed.
        rundir.trim_metrics(progress.rounds_done())
        encoder = ClinicalEncoder.from_dict(json.loads(encoder_path.read_text(encoding="utf-8")))
        log.info("resuming %s: rounds already completed per stage %s", rundir.path, progress.rounds_done())
    else:
        progress = Progress(progress.path)  # no usable record (or no encoder to go with it): start from scratch
        if run.dp:
            # Under differential privacy nothing about the training patients leaves a site but DP-trained weights:
            # no clinical statistics; the encoder uses fixed reference values (docs/privacy.md).
            encoder = ClinicalEncoder.reference()
        else:
            stats = ClinicalStats()
            for st in federation.clinical_stats():
                stats = stats.merge(st)
            encoder = ClinicalEncoder.from_stats(stats)
        rundir.write_json("clinical_encoder.json", encoder.to_dict())
    timings["statistics_s"] = time.perf_counter() - t0

    comparison: dict[str, float | None] = {}
    candidates = run.backbone_candidates or (run.backbone,)
    chosen, arrays, best_val = "", {}, -2.0
    t = time.perf_counter()
    for name in candidates:
        start = initial(name)
        label = "dltr" if len(candidates) == 1 else f"dltr-{name}"
        weights, val = run_stage(
            federation, run, rundir, "dltr", start, encoder, roles, run.rounds, run.lr, name, label, on_round, progress
        )
        comparison[name] = val
        if (-1.0 if val is None else val) > best_val:
            best_val, chosen, arrays = (-1.0 if val is None else val), name, {**start, "dltr": weights}
    timings["dltr_s"] = time.perf_counter() - t
    if len(candidates) > 1:
        log.info("backbone comparison (pooled internal-validation AUC): %s; DLTR = %s", comparison, chosen)

    t = time.perf_counter()
    arrays["head"], _ = run_stage(
        federation, run, rundir, "head", arrays, encoder, roles, run.head_rounds, run.head_lr, chosen, on_round=on_round, progress=progress
    )
    timings["head_s"] = time.perf_counter() - t
    t = time.perf_counter()
    arrays["clinical"], _ = run_stage(
        federation, run, rundir, "clinical", arrays, encoder, roles, run.clinical_rounds, run.clinical_lr, chosen, on_round=on_round,
        progress=progress,
    )  # fmt: skip
    timings["clinical_s"] = time.perf_counter() - t

    t = time.perf_counter()
    evaluation, cutoffs = final_evaluation(federation, run, rundir, arrays, encoder, roles, chosen, tag)
    timings["evaluation_s"] = time.perf_counter() - t
    tuned: dict[str, Any] = {}
    if run.finetune:
        t = time.perf_counter()
        tuned = finetune_sites(federation, run, rundir, arrays, encoder, chosen, cutoffs, tag)
        timings["finetune_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    return StudyResult(arrays, encoder, evaluation, roles, timings, chosen, comparison, cutoffs, tuned)


def finetune_sites(
    federation: Federation, run: RunConfig, rundir: RunDir, arrays: dict[str, Arrays], encoder: ClinicalEncoder, backbone: str,
    cutoffs: dict[str, Any], tag: str = "",
) -> dict[str, Any]:  # fmt: skip
    """Personalisation after federation: each training site fine-tunes the final model on its own training split and
    reports the global and the fine-tuned DLTRMLP AUC on its validation split (the fine-tuned model stays there)."""
    if run.dp:
        note = ("not run: with differential privacy on, a fine-tuned model's validation AUC would be a release about the "
                "training patients outside the privacy account; fine-tune at the site with `tace-client finetune`")  # fmt: skip
        return {"mode": run.finetune, "note": note, "sites": {}}
    sites = federation.finetune(arrays, encoder, Finetune(run.finetune, run.finetune_epochs, backbone, run.seed, cutoffs, tag))
    for site, entry in sorted(sites.items()):
        if "error" in entry:
            rundir.record_event("finetune-failed", "finetune", 0, site, str(entry["error"]))
    rundir.write_json("finetune.json", {"mode": run.finetune, "sites": sites})
    return {"mode": run.finetune, "sites": sites}


def final_evaluation(
    federation: Federation,
    run: RunConfig,
    rundir: RunDir,
    arrays: dict[str, Arrays],
    encoder: ClinicalEncoder,
    roles: dict[str, str],
    backbone: str,
    tag: str,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Evaluate the final models: the training sites first, whose pooled score tables fix the cut-offs (Youden,
    risk groups), then the holdout sites, which group their PFS event tables with those cut-offs.

    Writes what every site returned to ``site_returns/<site>.json``, the cut-offs to ``cutoffs.json`` and what
    left each site during the run to ``data_sharing.json``.
    """
    evaluation = federation.evaluate(arrays, encoder, Evaluation(MODELS, backbone, True, tag, role="train"))
    for site, res in evaluation.items():
        res["summary"] = check_summary(res.get("summary"), site, MODELS)
    cutoffs = fix_cutoffs([res["summary"]["scores"] for res in evaluation.values()], run.risk_groups)
    rundir.write_json("cutoffs.json", cutoffs)
    if any(r == "holdout" for r in roles.values()):
        external = federation.evaluate(arrays, encoder, Evaluation(MODELS, backbone, True, tag, role="holdout", cutoffs=cutoffs))
        for site, res in external.items():
            res["summary"] = check_summary(res.get("summary"), site, MODELS)
        evaluation.update(external)
    for site, res in sorted(evaluation.items()):
        rundir.write_json(f"site_returns/{site}.json", res["summary"])
    rundir.write_json("data_sharing.json", data_sharing(evaluation, rundir.rounds_recorded(), run))
    return evaluation, cutoffs


def data_sharing(evaluation: dict[str, dict[str, Any]], rounds: dict[str, int], run: RunConfig | None = None) -> dict[str, Any]:
    """What left each site during the run, and in which mode it shared its final evaluation."""
    run = run or RunConfig()
    how = ""
    if run.sample_dp:
        how = " (trained by DP-SGD: see privacy_ledger.json)"
    elif run.client_dp:
        how = " (clipped; the coordinator adds noise to their mean: see privacy_ledger.json)"
    if run.secagg:
        how += ", masked by secure aggregation (only their weighted mean was revealed)"
    out: dict[str, Any] = {}
    for site, res in sorted(evaluation.items()):
        summary = res["summary"]
        sent = []
        if summary["role"] == "train":
            if not run.dp:
                sent.append("clinical statistics of the training split (counts, sums, sums of squares per feature)")
            sent += [f"model weights after local training: {n} round(s) of stage {stage}{how}" for stage, n in sorted(rounds.items())]
            if run.sample_dp:
                sent.append("per round: number of training patients; privacy spent (ε, δ, noise multiplier, sample rate, steps); "
                            "internal-validation AUC and score histograms (validation split)")  # fmt: skip
            else:
                sent.append("per round: number of training samples, training loss, speed; internal-validation AUC and score histograms")
        table = summary["scores"]
        cells = len(table["cells"]) if "cells" in table else sum(len(v) for v in table["marginals"].values())
        kind = "joint score table" if "cells" in table else f"one score table per model (cells of >= {summary['min_cell_count']} patients)"
        sent.append("final evaluation: AUC and class-conditional score histograms per model")
        sent.append(f"final evaluation: {kind} of {cells} non-empty cells "
                    f"({summary['n']} patients, {summary['n_pos']} responders)")  # fmt: skip
        for name, table in summary.get("survival", {}).get("tables", {}).items():
            sent.append(f"PFS event table {name}: {len(table['rows'])} rows")
        if "patients" in summary:
            sent.append(f"patient-level rows (pseudonymous id, label, scores, PFS): {len(summary['patients']['label'])}")
        out[site] = {"role": summary["role"], "sharing": summary["sharing"], "min_cell_count": summary["min_cell_count"], "sent": sent}
    return out


def _site_entries(result: StudyResult, model: str) -> dict[str, dict[str, Any]]:
    return {
        site: {"role": result.roles[site], "auc": res.get(model, {}).get("auc"), "n": res.get("n", 0), "n_pos": res.get("n-pos", 0)}
        for site, res in sorted(result.evaluation.items())
    }


def summarise(results: list[StudyResult], mode: str, layout: str) -> dict[str, Any]:
    """The run's summary.json: per model and site the role, AUC and n; pooled internal and holdout AUCs.

    For a training site the AUC is on its internal-validation split; for a holdout site on its whole cohort. In
    the leave-one-centre-out layout every site's entry comes from the fold in which it was held out.
    """
    models: dict[str, Any] = {}
    for model in ("clinical", "dltr", "dltrmlp"):
        if layout == "loco":
            sites = {}
            for res in results:
                held = [s for s, r in res.roles.items() if r == "holdout"]
                for s in held:
                    sites[s] = _site_entries(res, model)[s]
            pooled_holdout = None
        else:
            sites = _site_entries(results[0], model)
            pooled_holdout = pooled_auc(results[0].evaluation, results[0].roles, model, "holdout")
        models[model] = {
            "sites": sites,
            "pooled_internal_auc": pooled_auc(results[0].evaluation, results[0].roles, model, "train") if layout != "loco" else None,
            "pooled_holdout_auc": pooled_holdout,
        }
    timings: dict[str, float] = {}
    for res in results:
        for k, v in res.timings.items():
            timings[k] = round(timings.get(k, 0.0) + v, 3)
    out = {
        "mode": mode,
        "layout": layout,
        "backbone": results[0].backbone,
        "backbone_comparison": results[0].backbone_comparison,
        "models": models,
        "timings": timings,
        "folds": [{"holdout": [s for s, r in res.roles.items() if r == "holdout"], "backbone": res.backbone} for res in results],
    }
    if results[0].finetune:
        folds = {",".join(s for s, role in r.roles.items() if role == "holdout"): r.finetune for r in results}
        out["finetune"] = results[0].finetune if layout != "loco" else {"folds": folds}
    return out


def run_layouts(
    federation: Federation,
    run: RunConfig,
    rundir: RunDir,
    initial: Callable[[str | None], dict[str, Arrays]],
    mode: str,
    on_round: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """Run the study in the configured layout (fixed holdout sites, or leave-one-centre-out), save the final
    models and write summary.json; returns the summary."""

    results: list[StudyResult] = []
    if run.layout == "loco":
        federation.set_roles(())
        infos = federation.sites()
        unable = [s.site_id for s in infos if s.n_train == 0 or s.n_eval == 0]
        if unable:
            raise TaceError(
                f"leave-one-centre-out needs labelled train and val patients at every site; {', '.join(unable)} ha{'s' if len(unable) == 1 else 've'} none",
                "use layout='holdout' with those sites in holdout-sites, or give them train/val splits in their manifests",
            )
        sites = [s.site_id for s in infos]
        for site in sites:
            log.info("leave-one-centre-out: holding out %s", site)
            federation.set_roles((site,))
            fold_dir = RunDir(rundir.path / "folds" / site, run.to_run_config(), mode)
            try:
                results.append(run_study(federation, run, fold_dir, initial, on_round, tag=f"fold-{site}"))
                save_models(fold_dir, results[-1], run)
            finally:
                fold_dir.close()
    else:
        results.append(run_study(federation, run, rundir, initial, on_round))
        save_models(rundir, results[-1], run)
    summary = summarise(results, mode, run.layout)
    rundir.write_json("summary.json", summary)
    return summary


def save_models(rundir: RunDir, result: StudyResult, run: RunConfig) -> None:
    """The final models in the run folder, and the exported model file hospitals predict with (models/tace-model.zip)."""
    from tace.common.artifact import FILENAME, PRIVACY_KEYS, TRAINING_KEYS, write_model

    rundir.save_models(result.arrays, result.backbone, len(run.preprocess.sequences), run.preprocess.shape, result.encoder.to_dict())
    config = run.to_run_config()
    write_model(rundir.path / "models" / FILENAME, result.arrays, result.backbone, run.preprocess, result.encoder.to_dict(), result.cutoffs,
                run.analysis_bins, source=rundir.path.name, training={k: config[k] for k in TRAINING_KEYS},
                privacy={k: config[k] for k in PRIVACY_KEYS})  # fmt: skip
