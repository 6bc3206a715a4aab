"""The study workflow the coordinator runs: statistics, DLTR (backbone comparison), DLTRMLP head, clinical model,
final evaluation, fine-tuning; in the holdout or the leave-one-centre-out layout.

It talks to the sites through a `Federation` (`tace.server.messages`): Flower messages in
`tace.server.federation`, direct calls for the single-machine references in `tace.simulation.inprocess`, so the
orchestration, early stopping (`tace.server.rounds`), checkpoints and summary (`tace.server.reporting`) are the
same code whichever way the sites are reached.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tace.common.config import RunConfig
from tace.common.encoders import Encoders
from tace.common.errors import TaceError
from tace.common.models import radiomics_dim, start_fusion_head
from tace.common.protocol import MODELS, STAGES, Arrays
from tace.common.summaries import SiteSummary, fix_cutoffs
from tace.server.messages import Evaluation, Federation, Finetune, SiteInfo, StudyResult
from tace.server.progress import Progress
from tace.server.reporting import data_sharing, save_models, summarise
from tace.server.rounds import OnRound, StageRunner
from tace.server.rundir import RunDir

log = logging.getLogger("tace.server")

#: ``initial(backbone)`` returns freshly initialised weights ``{"dltr": ..., "head": ..., "clinical": ...}``.
Initial = Callable[[str | None], dict[str, Arrays]]


@dataclass
class Layout:
    """One layout of the study (or one leave-one-centre-out fold): the federation with its roles, the run and the
    folder its results go to, and the tag of the prediction files the sites write."""

    federation: Federation
    run: RunConfig
    rundir: RunDir
    roles: dict[str, str]
    tag: str = ""


def check_sites(infos: list[SiteInfo], require_both_classes: bool = True) -> None:
    """Every training site needs labelled train and val patients, and their pooled validation split both classes."""
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


def input_encoders(layout: Layout, progress: Progress) -> tuple[Encoders, Progress]:
    """The clinical and radiomics standardisation from the training sites' merged statistics (or, resuming, the one
    saved before the interruption; under differential privacy from no site's data), and the progress to continue
    from. Written to ``encoders.json`` (and the clinical part to ``clinical_encoder.json``)."""
    rundir, run = layout.rundir, layout.run
    encoder_path = rundir.path / "encoders.json"
    if progress.resumed and encoder_path.exists():
        # Resuming: the statistics were merged before the interruption; the sites' data have not changed.
        rundir.trim_metrics(progress.rounds_done())
        log.info("resuming %s: rounds already completed per stage %s", rundir.path, progress.rounds_done())
        return Encoders.from_dict(json.loads(encoder_path.read_text(encoding="utf-8"))), progress
    progress = Progress(progress.path)  # no usable record (or no encoder to go with it): start from scratch
    n_radiomics = radiomics_dim(len(run.preprocess.sequences))
    # Under differential privacy nothing about the training patients leaves a site but DP-trained weights: no
    # statistics; reference values for the clinical factors, the fixed signed log for radiomics (docs/privacy.md).
    encoder = Encoders.reference(n_radiomics) if run.dp else Encoders.from_statistics(layout.federation.statistics(), n_radiomics)
    rundir.write_json("encoders.json", encoder.to_dict())
    rundir.write_json("clinical_encoder.json", encoder.clinical.to_dict())
    return encoder, progress


def dltr_label(run: RunConfig, backbone: str) -> str:
    """The DLTR stage's label for `backbone` (its checkpoints and progress): ``dltr``, or ``dltr-<backbone>`` when
    several backbones compete."""
    return "dltr" if len(run.backbone_candidates or (run.backbone,)) == 1 else f"dltr-{backbone}"


def choose_backbone(
    runner: StageRunner, run: RunConfig, initial: Initial, encoder: Encoders
) -> tuple[str, dict[str, Arrays], dict[str, float | None]]:
    """Train DLTR on every candidate backbone and keep the one with the best pooled internal-validation AUC (the
    study's comparison of deep-learning algorithms); returns it, its weights and every candidate's AUC."""
    comparison: dict[str, float | None] = {}
    candidates = run.backbone_candidates or (run.backbone,)
    chosen, arrays, best_val = "", {}, -2.0
    for name in candidates:
        start = initial(name)
        weights, val = runner.run_stage("dltr", start, encoder, name, dltr_label(run, name))
        comparison[name] = val
        if (-1.0 if val is None else val) > best_val:
            best_val, chosen, arrays = (-1.0 if val is None else val), name, {**start, "dltr": weights}
    if len(candidates) > 1:
        log.info("backbone comparison (pooled internal-validation AUC): %s; DLTR = %s", comparison, chosen)
    return chosen, arrays, comparison


def run_study(
    federation: Federation, run: RunConfig, rundir: RunDir, initial: Initial, on_round: OnRound | None = None, tag: str = "",
    require_both_classes: bool = True,
) -> StudyResult:  # fmt: skip
    """The whole study on one federation layout."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    infos = federation.sites()
    check_sites(infos, require_both_classes)
    layout = Layout(federation, run, rundir, {s.site_id: s.role for s in infos}, tag)
    encoder, progress = input_encoders(layout, Progress.start(rundir.path, run.resume))
    timings["statistics_s"] = time.perf_counter() - t0
    runner = StageRunner(federation, run, rundir, layout.roles, progress, on_round)
    t = time.perf_counter()
    chosen, arrays, comparison = choose_backbone(runner, run, initial, encoder)
    timings["dltr_s"] = time.perf_counter() - t
    for stage in (s for s in STAGES if s != "dltr"):
        t = time.perf_counter()
        if stage == "head":  # the linear head reads the other models' logits, each centred and on unit scale
            labels = {"dltr": dltr_label(run, chosen), "clinical": "clinical", "radiomics": "radiomics"}
            moments = {k: progress.stage(v).best_logit for k, v in labels.items()}
            if run.head_form == "linear" and not all(moments.values()):
                log.warning("the linear fusion head reads the logits of %s as they are: no internal-validation scores to scale them by",
                            ", ".join(k for k, v in moments.items() if not v))  # fmt: skip
            arrays["head"] = start_fusion_head(arrays, moments)
        arrays[stage], _ = runner.run_stage(stage, arrays, encoder, chosen)
        timings[f"{stage}_s"] = time.perf_counter() - t
    t = time.perf_counter()
    evaluation, cutoffs = final_evaluation(layout, arrays, encoder, chosen)
    timings["evaluation_s"] = time.perf_counter() - t
    tuned: dict[str, Any] = {}
    if run.finetune:
        t = time.perf_counter()
        tuned = finetune_sites(layout, arrays, encoder, chosen, cutoffs)
        timings["finetune_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    return StudyResult(arrays, encoder, evaluation, layout.roles, timings, chosen, comparison, cutoffs, tuned)


def finetune_sites(layout: Layout, arrays: dict[str, Arrays], encoder: Encoders, backbone: str, cutoffs: dict[str, Any]) -> dict[str, Any]:
    """Personalisation after federation: each training site fine-tunes the final model on its own training split and
    reports the global and the fine-tuned DLTRMLP AUC on its validation split (the fine-tuned model stays there)."""
    run, rundir = layout.run, layout.rundir
    if run.dp:
        note = ("not run: with differential privacy on, a fine-tuned model's validation AUC would be a release about the "
                "training patients outside the privacy account; fine-tune at the site with `tace-client finetune`")  # fmt: skip
        return {"mode": run.finetune, "note": note, "sites": {}}
    request = Finetune(run.finetune, run.finetune_epochs, backbone, run.seed, cutoffs, layout.tag)
    sites = layout.federation.finetune(arrays, encoder, request)
    for site, entry in sorted(sites.items()):
        if "error" in entry:
            rundir.record_event("finetune-failed", "finetune", 0, site, str(entry["error"]))
    rundir.write_json("finetune.json", {"mode": run.finetune, "sites": sites})
    return {"mode": run.finetune, "sites": sites}


def final_evaluation(
    layout: Layout, arrays: dict[str, Arrays], encoder: Encoders, backbone: str
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Evaluate the final models: the training sites first, whose pooled score tables fix the cut-offs (Youden,
    risk groups), then the holdout sites, which group their PFS event tables with those cut-offs.

    Every site's analysis summary is decoded (checked) on the way in. Writes what every site returned to
    ``site_returns/<site>.json``, the cut-offs to ``cutoffs.json`` and what left each site during the run to
    ``data_sharing.json``.
    """
    federation, rundir = layout.federation, layout.rundir
    evaluation = federation.evaluate(arrays, encoder, Evaluation(MODELS, backbone, True, layout.tag, role="train"))
    summaries = {site: SiteSummary.decode(res.get("summary"), site, MODELS) for site, res in evaluation.items()}
    cutoffs = fix_cutoffs([s.scores for s in summaries.values()], layout.run.risk_groups)
    rundir.write_json("cutoffs.json", cutoffs)
    if any(r == "holdout" for r in layout.roles.values()):
        request = Evaluation(MODELS, backbone, True, layout.tag, role="holdout", cutoffs=cutoffs)
        external = federation.evaluate(arrays, encoder, request)
        summaries.update({site: SiteSummary.decode(res.get("summary"), site, MODELS) for site, res in external.items()})
        evaluation.update(external)
    for site, summary in sorted(summaries.items()):
        evaluation[site]["summary"] = summary.encode()
        rundir.write_json(f"site_returns/{site}.json", evaluation[site]["summary"])
    # The references (centralized, local) train on no site's behalf: their rows are named after the pooled group.
    sent = rundir.rounds_sent() if rundir.mode == "federated" else None
    rundir.write_json("data_sharing.json", data_sharing(summaries, rundir.rounds_recorded(), layout.run, sent))
    return evaluation, cutoffs


def run_layouts(
    federation: Federation, run: RunConfig, rundir: RunDir, initial: Initial, mode: str, on_round: OnRound | None = None
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
        for site in [s.site_id for s in infos]:
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
