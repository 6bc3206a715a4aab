"""How a federated run in Flower's simulation engine scales with the number of sites, on the tiny preset.

Usage: python benchmarks/bench_sites.py [--n-sites 10,30,100] [--out DIR]

For each number of sites: a whole federated run (statistics, three stages of 3 rounds, final evaluation) and the
external-validation analysis on it. Prints per run the wall time, the peak memory summed over every process of the
run (CLI, SuperLink, SuperExec, ServerApp, Ray and its ClientApp workers), the mean round time and the time per site
and round; then the memory each further site costs (the slope between runs), which is what limits a bigger
simulation on one machine (docs/training.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import tempfile
import time
from pathlib import Path
from statistics import mean
from typing import Any

from tace.simulation.cli import study_config
from tace.simulation.cohort import generate_cohort, make_preset
from tace.simulation.runner import run_federated


def one_run(work: Path, n_sites: int) -> dict[str, Any]:
    """A federated run with `n_sites` sites (the last two held out) and its analysis."""
    from tace.analysis.data import load_run
    from tace.analysis.study import analyse

    cohort = work / f"cohort-{n_sites}"
    if cohort.exists():
        shutil.rmtree(cohort)
    generate_cohort(cohort, make_preset("tiny", n_sites=n_sites), seed=0, workers=2)
    run = study_config(cohort, "rounds=3 head-rounds=3 clinical-rounds=3")
    start = time.perf_counter()
    summary = run_federated(cohort, work / f"run-{n_sites}", run)
    wall = time.perf_counter() - start
    t = time.perf_counter()
    analyse(load_run(work / f"run-{n_sites}"), ("validation",))
    with open(work / f"run-{n_sites}" / "metrics.csv", newline="", encoding="utf-8") as fh:
        rounds = [float(r["round_s"]) for r in csv.DictReader(fh) if r["site"] == "pooled" and r["round_s"]]
    n_train = n_sites - len(run.holdout)
    return {"n_sites": n_sites, "training_sites": n_train, "wall_s": round(wall, 1), "analysis_s": round(time.perf_counter() - t, 1),
            "peak_mb": round(summary["timings"]["peak_rss_mb"]), "rounds": len(rounds), "round_s": round(mean(rounds), 2),
            "round_s_per_training_site": round(mean(rounds) / n_train, 3), "workflow_s": summary["timings"].get("total_s")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-sites", default="10,30,100", help="numbers of sites, comma-separated (default %(default)s)")
    parser.add_argument("--out", type=Path, help="keep cohorts, runs and bench_sites.json here (default: a temporary folder)")
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="tace-sites-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = []
        for n in (int(v) for v in args.n_sites.split(",")):
            rows.append(one_run(work, n))
            print(json.dumps(rows[-1]), flush=True)
        print(f"\n{'sites':>6} {'wall s':>8} {'peak MB':>8} {'round s':>8} {'s/site/round':>13} {'analysis s':>11}")
        for r in rows:
            print(
                f"{r['n_sites']:>6} {r['wall_s']:>8} {r['peak_mb']:>8} {r['round_s']:>8} {r['round_s_per_training_site']:>13} {r['analysis_s']:>11}"
            )
        if len(rows) > 1:
            slope = (rows[-1]["peak_mb"] - rows[0]["peak_mb"]) / (rows[-1]["n_sites"] - rows[0]["n_sites"])
            print(f"\nmemory per further site: {slope:.1f} MB (peak {rows[0]['peak_mb']} MB at {rows[0]['n_sites']} sites; "
                  f"{rows[-1]['peak_mb']} MB at {rows[-1]['n_sites']})")  # fmt: skip
        (work / "bench_sites.json").write_text(json.dumps(rows, indent=2))
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
