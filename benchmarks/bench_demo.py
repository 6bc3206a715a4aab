"""Benchmark of the main job: `tace-sim demo`, stage by stage, over several seeds, against the previous release.

Usage:
    python benchmarks/bench_demo.py [--seeds 0,1,2] [--out DIR] [--reference docs/benchmarks/demo-0.1.0.json]

Runs the demo in a fresh folder per seed (cohort generation included, as a new user runs it), reads each run's
``summary.json`` (``timings.demo``: every stage of the demo; the external sites' AUCs), and prints the stage table
(mean over the seeds), the ratio of each stage to the previous release's figures (recorded in the reference file,
with how they were measured), and the external AUCs per seed beside the reference's, so that a speed-up that
changed the results shows. Writes OUT/bench_demo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE = ROOT / "docs" / "benchmarks" / "demo-0.1.0.json"
MODELS = ("dltrmlp", "dltr", "clinical")


def run_demo(folder: Path, seed: int) -> dict[str, Any]:
    """One `tace-sim demo` in an empty folder: its wall time, and its run's summary.json."""
    tace_sim = Path(sys.executable).parent / "tace-sim"
    start = time.perf_counter()
    done = subprocess.run([str(tace_sim), "demo", "--out", str(folder), "--seed", str(seed)], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})  # fmt: skip
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"the demo failed (seed {seed}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    summary = json.loads(next((folder / "runs").glob("*/summary.json")).read_text())
    return {"wall_s": round(wall, 1), "summary": summary}


def external_aucs(summary: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """{site: {model: AUC}} at the holdout sites."""
    sites = summary["models"]["dltrmlp"]["sites"]
    return {s: {m: summary["models"][m]["sites"][s]["auc"] for m in MODELS} for s, e in sites.items() if e["role"] == "holdout"}


def stage_means(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Mean seconds per demo stage (and its total) over the runs."""
    names = list(runs[0]["summary"]["timings"]["demo"]["stages_s"])
    out = {n: round(mean(r["summary"]["timings"]["demo"]["stages_s"][n] for r in runs), 1) for n in names}
    out["demo total"] = round(mean(r["wall_s"] for r in runs), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="demo seeds, comma-separated (default %(default)s)")
    parser.add_argument("--out", type=Path, help="keep the demo folders and the figures here (default: a temporary folder)")
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE, help="the previous release's figures (default %(default)s)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    work = args.out or Path(tempfile.mkdtemp(prefix="tace-bench-demo-"))
    reference = json.loads(args.reference.read_text()) if args.reference.exists() else {}
    try:
        runs = []
        for seed in seeds:
            folder = work / f"demo-{seed}"
            if folder.exists():
                shutil.rmtree(folder)
            runs.append(run_demo(folder, seed))
            print(f"seed {seed}: {runs[-1]['wall_s']} s", flush=True)
        figures = report(runs, seeds, reference)
        work.mkdir(parents=True, exist_ok=True)
        (work / "bench_demo.json").write_text(json.dumps(figures, indent=2))
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)


def report(runs: list[dict[str, Any]], seeds: list[int], reference: dict[str, Any]) -> dict[str, Any]:
    """Print the stage table and the AUCs next to the reference; return the figures."""
    ours = stage_means(runs)
    ref_stages: dict[str, float] = reference.get("stages_s", {})
    print(f"\nstage (mean of {len(runs)} seed(s))       this release   {reference.get('release', 'reference'):>14}   ratio")
    for name in [*ours, *(n for n in ref_stages if n not in ours)]:
        seconds, ref = ours.get(name), ref_stages.get(name)
        ratio = f"{ref / seconds:6.2f}x" if ref and seconds else "      "
        mine = "" if seconds is None else f"{seconds:8.1f} s"
        print(f"  {name:<38} {mine:>10}   {'' if ref is None else f'{ref:8.1f} s':>12}   {ratio}")
    print(f"  (reference: {reference.get('measured', 'none recorded')})")
    aucs = {seed: external_aucs(r["summary"]) for seed, r in zip(seeds, runs, strict=True)}
    ref_aucs = reference.get("external_aucs", {})
    print("\nexternal AUCs per seed (this release / reference):")
    for seed, sites in aucs.items():
        for site, values in sites.items():
            old = ref_aucs.get(str(seed), {}).get(site, {})
            cells = [f"{m} {_f(values[m])} / {_f(old.get(m))}" for m in MODELS]
            print(f"  seed {seed} {site}: " + "; ".join(cells))
    means = {m: mean(v[m] for s in aucs.values() for v in s.values() if v[m] is not None) for m in MODELS}
    ref_means = {m: [v[m] for s in ref_aucs.values() for v in s.values() if v.get(m) is not None] for m in MODELS}
    print(
        "  mean over seeds and sites: "
        + "; ".join(f"{m} {means[m]:.3f} / {_f(mean(ref_means[m]) if ref_means[m] else None)}" for m in MODELS)
    )
    return {"seeds": seeds, "stages_s": ours, "reference_stages_s": ref_stages, "external_aucs": aucs, "mean_external_auc": means}


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
