"""What a finished study leaves in its run folder: ``summary.json``, ``data_sharing.json`` and the final models.

``summary.json`` is the run's headline (per model and site the role, AUC and n; pooled internal and holdout AUCs;
timings; the backbone comparison); ``data_sharing.json`` lists what left each site during the run and how;
``models/`` holds the model file hospitals predict with (`tace.common.artifact`).
"""

from __future__ import annotations

from typing import Any

from tace.common.artifact import ModelArtefact, save_run_models
from tace.common.config import RunConfig
from tace.common.protocol import MODELS
from tace.common.summaries import SiteSummary
from tace.server.messages import StudyResult
from tace.server.rounds import pooled_auc
from tace.server.rundir import RunDir


def save_models(rundir: RunDir, result: StudyResult, run: RunConfig) -> None:
    """The final models in the run folder's ``models/``, with the exported model file (models/tace-model.zip)."""
    model = ModelArtefact.of_run(run, result.arrays, result.backbone, result.encoder.to_dict(), result.cutoffs, rundir.path.name)
    save_run_models(rundir.path / "models", model)


def data_sharing(
    summaries: dict[str, SiteSummary], rounds: dict[str, int], run: RunConfig | None = None,
    sent_rounds: dict[str, dict[str, list[int]]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """What left each site during the run, and in which mode it shared its final evaluation.

    `rounds` is the number of rounds each stage ran (`RunDir.rounds_recorded`), `sent_rounds` per site and stage the
    rounds whose update the site actually sent (`RunDir.rounds_sent`; None: every round, as a reference run without
    faults). A site left out of a round (offline, timed out, declined) sent nothing that round.
    """
    run = run or RunConfig()
    how = ""
    if run.sample_dp:
        how = " (trained by DP-SGD: see privacy_ledger.json)"
    elif run.client_dp:
        how = " (clipped; the coordinator adds noise to their mean: see privacy_ledger.json)"
    if run.secagg:
        how += ", masked by secure aggregation (only their weighted mean was revealed)"
    out: dict[str, Any] = {}
    for site, summary in sorted(summaries.items()):
        sent = []
        entry: dict[str, Any] = {}
        if summary.role == "train":
            if not run.dp:
                sent.append("clinical statistics of the training split (counts, sums, sums of squares per feature)")
            mine = {stage: list(range(1, n + 1)) for stage, n in rounds.items()} if sent_rounds is None else sent_rounds.get(site, {})
            entry["rounds_sent"] = {stage: len(mine.get(stage, [])) for stage in sorted(rounds)}
            entry["rounds_left_out"] = {
                stage: [r for r in range(1, n + 1) if r not in mine.get(stage, [])] for stage, n in sorted(rounds.items())
            }
            for stage, n in sorted(rounds.items()):
                missed = entry["rounds_left_out"][stage]
                sent.append(f"model weights after local training: {n - len(missed)} of {n} round(s) of stage {stage}{how}"
                            + (f" (left out of round(s) {', '.join(map(str, missed))})" if missed else ""))  # fmt: skip
            if run.sample_dp:
                sent.append("per round: number of training patients; privacy spent (ε, δ, noise multiplier, sample rate, steps); "
                            "internal-validation AUC and score histograms (validation split)")  # fmt: skip
            else:
                sent.append("per round: number of training samples, training loss, speed; internal-validation AUC and score histograms")
        table = summary.scores
        kind = (
            "joint score table" if table.marginals is None else f"one score table per model (cells of >= {summary.min_cell_count} patients)"
        )
        if summary.withheld:
            sent.append(f"final evaluation: counts only ({summary.n} patients, {summary.n_pos} responders): fewer patients than the "
                        f"minimum cell count {summary.min_cell_count}, so no table, AUC or statistic of them left the site")  # fmt: skip
        else:
            sent.append("final evaluation: AUC and class-conditional score histograms per model")
            sent.append(f"final evaluation: {kind} of {table.n_cells} non-empty cells ({summary.n} patients, {summary.n_pos} responders)")
        if summary.exact is not None:
            sent.append("final evaluation: statistics computed exactly at the site over all its evaluated patients: per model the AUC with "
                        "its DeLong covariance, observed and expected responders, the Brier sum, calibration intercept and slope; per "
                        "survival grouping the log-rank observed-minus-expected and variance")  # fmt: skip
        for name, events in summary.survival.items():
            sent.append(f"PFS event table {name}: {len(events.rows)} rows")
        for name, sub in summary.subgroups.items():
            sent.append(f"subgroup score tables by {name}: {len(sub.tables)} level(s)"
                        + (f"; suppressed (fewer than the minimum cell count): {', '.join(sub.suppressed)}" if sub.suppressed else ""))  # fmt: skip
        if summary.patients is not None:
            sent.append(f"patient-level rows (pseudonymous id, label, scores, PFS): {len(summary.patients.label)}")
        out[site] = {"role": summary.role, "sharing": summary.sharing, "min_cell_count": summary.min_cell_count, "sent": sent, **entry}
    return out


def _site_entries(result: StudyResult, model: str) -> dict[str, dict[str, Any]]:
    return {
        site: {"role": result.roles[site], "auc": res.get(model, {}).get("auc"), "n": res.get("n", 0), "n_pos": res.get("n-pos", 0)}
        for site, res in sorted(result.evaluation.items())
    }


def _model_entry(results: list[StudyResult], model: str, layout: str) -> dict[str, Any]:
    """One model's part of summary.json: per site its AUC (in leave-one-centre-out from the fold that held it out)."""
    if layout == "loco":
        sites = {}
        for res in results:
            for s in (s for s, r in res.roles.items() if r == "holdout"):
                sites[s] = _site_entries(res, model)[s]
        return {"sites": sites, "pooled_internal_auc": None, "pooled_holdout_auc": None}
    first = results[0]
    return {"sites": _site_entries(first, model), "pooled_internal_auc": pooled_auc(first.evaluation, first.roles, model, "train"),
            "pooled_holdout_auc": pooled_auc(first.evaluation, first.roles, model, "holdout")}  # fmt: skip


def summarise(results: list[StudyResult], mode: str, layout: str) -> dict[str, Any]:
    """The run's summary.json: per model and site the role, AUC and n; pooled internal and holdout AUCs.

    For a training site the AUC is on its internal-validation split; for a holdout site on its whole cohort. In
    the leave-one-centre-out layout every site's entry comes from the fold in which it was held out.
    """
    timings: dict[str, float] = {}
    for res in results:
        for k, v in res.timings.items():
            timings[k] = round(timings.get(k, 0.0) + v, 3)
    out = {
        "mode": mode,
        "layout": layout,
        "backbone": results[0].backbone,
        "backbone_comparison": results[0].backbone_comparison,
        "models": {model: _model_entry(results, model, layout) for model in MODELS},
        "timings": timings,
        "folds": [{"holdout": [s for s, r in res.roles.items() if r == "holdout"], "backbone": res.backbone} for res in results],
    }
    if results[0].finetune:
        folds = {",".join(s for s, role in r.roles.items() if role == "holdout"): r.finetune for r in results}
        out["finetune"] = results[0].finetune if layout != "loco" else {"folds": folds}
    return out
