"""Benchmark of federated training on the demo cohort: quality against the references, speed and memory.

Usage:
    python benchmarks/bench_training.py --cohort DEMO_DIR [--out DIR] [--run-config "..."] [--skip-overhead]

Runs, with the same run configuration and seed:
1. federated (Flower simulation), centralized (pooled) and local-only, default settings (early stopping on);
   prints AUC per model and holdout site with the oracle, the federated/centralized ratio, the learning
   efficiency (AUC - 0.5) / (oracle - 0.5), and whether DLTRMLP beats DLTR and the clinical model;
2. the federation overhead: federated and centralized wall time for the same total local epochs (early stopping
   off, fixed rounds), and their ratio, at equal cores: the federated run's simulation engine runs ClientApp workers
   of one PyTorch thread each on the machine's CPUs (one per training site when there are up to twice as many
   training sites as CPUs, `tace.simulation.runner.simulation_cpus`), the centralized run trains the pooled data
   with as many PyTorch threads as there are CPUs;
3. training throughput of the client's loop against a bare PyTorch loop over the same cached tensors;
4. peak memory (summed over all processes of the federated run).
Writes everything to OUT/bench_training.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from tace.common.config import RunConfig, SiteConfig, parse_overrides
from tace.simulation.runner import add_oracle, run_federated, run_reference, simulation_cpus, training_sites


def study_config(cohort: Path, overrides: str) -> RunConfig:
    from tace.simulation.cli import study_config as cli_config

    return cli_config(cohort, overrides)


def holdout_table(summary: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for site, entry in summary["models"]["dltrmlp"]["sites"].items():
        if entry["role"] == "holdout":
            out[site] = {m: summary["models"][m]["sites"][site]["auc"] for m in ("clinical", "dltr", "dltrmlp")}
    return out


def throughput(cohort: Path, run: RunConfig, epochs: int = 3) -> dict[str, float]:
    """Samples/s of the client's training loop vs a bare loop (same model, data, optimiser, batch, threads)."""
    from tace.client.task import SiteTask
    from tace.common.clinical import FEATURES
    from tace.common.models import StudyModels
    from tace.common.training import TrainSettings, train_image_model

    torch.set_num_threads(run.threads)
    site = SiteConfig.from_node_config({"partition-id": 0}, run)
    task = SiteTask(site, run, "train")
    data = task.dataset(task.train_records, augment=False, seed=0)
    [data[i] for i in range(len(data))]  # warm the cache: both loops read cached tensors
    models = StudyModels.build(run.backbone, 3, len(FEATURES))
    settings = TrainSettings(epochs=epochs, lr=run.lr, batch_size=run.batch_size, device="cpu")
    ours = train_image_model(models.dltr, data, settings)

    bare_model = StudyModels.build(run.backbone, 3, len(FEATURES)).dltr.train()
    opt = torch.optim.AdamW(bare_model.parameters(), lr=run.lr, weight_decay=run.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    start = time.perf_counter()
    n = 0
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(order), run.batch_size):
            idx = order[i : i + run.batch_size].tolist()
            x = torch.stack([torch.from_numpy(task.cache.load(task.train_records[j], task.manifest.root).array) for j in idx])
            y = torch.tensor([float(task.train_records[j].response or 0) for j in idx])
            opt.zero_grad()
            loss = loss_fn(bare_model(x), y)
            loss.backward()
            opt.step()
            n += len(idx)
    bare = n / (time.perf_counter() - start)
    return {"client_loop_samples_per_s": round(ours.samples_per_second, 2), "bare_loop_samples_per_s": round(bare, 2),
            "client_over_bare": round(ours.samples_per_second / bare, 3)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("bench-training"))
    parser.add_argument("--run-config", default="")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--overhead-only", action="store_true", help="only the federation overhead (part 2)")
    args = parser.parse_args()
    cohort = args.cohort.resolve()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = study_config(cohort, args.run_config)
    figures: dict[str, Any] = {"run_config": args.run_config}

    summaries = {}
    for mode in () if args.overhead_only else ("federated", "centralized", "local"):
        t = time.perf_counter()
        folder = out / f"{stamp}-{mode}"
        summary = run_federated(cohort, folder, run) if mode == "federated" else run_reference(mode, cohort, folder, run)
        summaries[mode] = add_oracle(summary, cohort)
        figures[f"{mode}_wall_s"] = round(time.perf_counter() - t, 1)
        print(f"{mode}: {figures[f'{mode}_wall_s']} s", flush=True)
    oracle = {s: v["auc"] for s, v in summaries["federated"]["oracle"]["sites"].items()} if summaries else {}
    quality: dict[str, Any] = {}
    for site in holdout_table(summaries["federated"]) if summaries else []:
        row: dict[str, Any] = {"oracle": oracle.get(site)}
        for mode, summary in summaries.items():
            for model, value in holdout_table(summary)[site].items():
                row[f"{mode}.{model}"] = value
        fed, cen, loc = row["federated.dltrmlp"], row["centralized.dltrmlp"], row["local.dltrmlp"]
        row["fed_over_central"] = round(fed / cen, 3) if fed and cen else None
        row["fed_minus_local"] = round(fed - loc, 3) if fed and loc else None
        row["efficiency"] = round((fed - 0.5) / (row["oracle"] - 0.5), 3) if fed and row["oracle"] else None
        row["dltrmlp_beats_both"] = bool(fed and fed > (row["federated.dltr"] or 0) and fed > (row["federated.clinical"] or 0))
        quality[site] = row
    figures["quality"] = quality
    if summaries:
        figures["federated_peak_rss_mb"] = summaries["federated"]["timings"].get("peak_rss_mb")

    if not args.skip_overhead:
        fixed = RunConfig.from_run_config(
            {**run.to_run_config(), **parse_overrides("patience=0 rounds=10 head-rounds=10 clinical-rounds=10 radiomics-rounds=10")}
        )
        cores = os.cpu_count() or 1
        n_train = training_sites(json.loads((cohort / "cohort.json").read_text())["sites"], fixed)
        ray_cpus, per_worker = simulation_cpus(n_train, fixed.threads, cores)
        t = time.perf_counter()
        fed = run_federated(cohort, out / f"{stamp}-overhead-federated", fixed)
        fed_s = time.perf_counter() - t
        t = time.perf_counter()
        cen = run_reference("centralized", cohort, out / f"{stamp}-overhead-centralized", replace(fixed, threads=cores))
        cen_s = time.perf_counter() - t
        # The study itself (statistics, every stage's rounds, evaluation) as each run timed it, without Flower's fixed
        # start-up and shutdown (CLI, SuperLink, simulation runtime, Ray workers' imports).
        fed_study, cen_study = fed["timings"]["total_s"], cen["timings"]["total_s"]
        figures["overhead"] = {"rounds": 10, "local_epochs": fixed.local_epochs, "cores": cores,
                               "how": f"federated: {n_train} training sites on {ray_cpus // per_worker} ClientApp workers x {per_worker} thread(s), {cores} cores; "
                                      f"centralized: pooled data, {cores} threads",
                               "federated_s": round(fed_s, 1), "centralized_s": round(cen_s, 1),
                               "federated_over_centralized": round(fed_s / cen_s, 3),
                               "federated_study_s": fed_study, "centralized_study_s": cen_study,
                               "study_federated_over_centralized": round(fed_study / cen_study, 3),
                               "flower_fixed_s": round(fed_s - fed_study, 1)}  # fmt: skip
        o = figures["overhead"]
        print(f"overhead at equal cores ({o['how']}): wall {fed_s:.1f} s vs {cen_s:.1f} s (ratio {o['federated_over_centralized']}); "
              f"the study alone {fed_study:.1f} s vs {cen_study:.1f} s (ratio {o['study_federated_over_centralized']}); "
              f"Flower's fixed start-up and shutdown {o['flower_fixed_s']} s", flush=True)  # fmt: skip
    figures["throughput"] = throughput(
        cohort, RunConfig.from_run_config({**run.to_run_config(), "cohort": str(cohort), "run-dir": str(out)})
    )

    (out / "bench_training.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    ok = [q["dltrmlp_beats_both"] for q in quality.values()]
    print(f"\nDLTRMLP beats DLTR and clinical at {sum(ok)}/{len(ok)} holdout sites; "
          f"fed/central DLTRMLP: {[q['fed_over_central'] for q in quality.values()]}; efficiency: {[q['efficiency'] for q in quality.values()]}")  # fmt: skip


if __name__ == "__main__":
    main()
