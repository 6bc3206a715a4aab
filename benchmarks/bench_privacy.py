"""Benchmark of differential privacy: the privacy-utility trade-off on the demo cohort, and DP-SGD's step cost.

Usage:
    python benchmarks/bench_privacy.py --cohort DEMO_DIR [--out DIR] [--epsilons 1,3,8,inf] [--repeats N] [--skip-steps]
    python benchmarks/bench_privacy.py --skip-utility
    python benchmarks/bench_privacy.py --steps-only [--box 48,48,32] [--batch 8]

1. Privacy-utility: the whole study federated (Flower simulation, sample-level DP-SGD at every site, noise sized
   for the planned rounds in target-ε mode) for each ε (inf: no DP), same seed and settings; prints per ε the
   AUC of every model (DLTRMLP, DLTR, radiomics, clinical) at the holdout sites (pooled and per site), the ε each
   site actually spent and the run time, in one table, and whether DLTRMLP is at or above the clinical model at
   every external site. The DP noise and sampling come from each site's own entropy (never from the run seed, see
   `tace.common.privacy`), so no two DP runs are alike: `--repeats N` runs every finite ε N times and prints, per ε,
   the mean AUCs and in how many runs DLTRMLP was at or above the clinical model at every external site.
2. DP step time / non-DP step time for every backbone: the same model, batch and input (the demo's tumour box),
   timed over the same number of steps in this process (target: at most 3x).
Writes OUT/bench_privacy.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from tace.common.models import BACKBONES, DLTR
from tace.common.privacy import DPSettings
from tace.common.protocol import DISPLAY_ORDER
from tace.common.training import TrainSettings, train_image_model


class _Batch(Dataset[dict[str, Any]]):
    def __init__(self, n: int, shape: tuple[int, ...]) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, *shape, generator=g)
        self.y = (torch.rand(n, generator=g) > 0.5).float()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.x[i], "label": self.y[i], "index": i}


def step_cost(shape: tuple[int, ...], batch: int, steps: int) -> dict[str, dict[str, float]]:
    """Seconds per training step with and without DP-SGD, per backbone (one warm-up epoch each, not timed)."""
    out: dict[str, dict[str, float]] = {}
    n = batch * steps
    data = _Batch(n, shape)
    for name in BACKBONES:
        timings = {}
        for dp in (None, DPSettings(1.0, 1.0, batch / n)):
            model = DLTR(name, shape[0])
            settings = TrainSettings(epochs=1, batch_size=batch, device="cpu")
            train_image_model(model, _Batch(batch, shape), settings, None if dp is None else DPSettings(1.0, 1.0, 1.0))  # warm-up
            result = train_image_model(model, data, settings, dp)
            timings["dp" if dp else "plain"] = result.seconds / max(result.steps, 1)
        out[name] = {"plain_s_per_step": round(timings["plain"], 4), "dp_s_per_step": round(timings["dp"], 4),
                     "dp_over_plain": round(timings["dp"] / timings["plain"], 2)}  # fmt: skip
        print(f"  {name:<12} plain {timings['plain']:.3f} s/step   DP-SGD {timings['dp']:.3f} s/step   ratio {timings['dp'] / timings['plain']:.2f}",
              flush=True)  # fmt: skip
    return out


def utility(cohort: Path, out: Path, epsilons: list[float], overrides: str, repeats: int = 1) -> list[dict[str, Any]]:
    from tace.simulation.cli import study_config
    from tace.simulation.runner import run_federated

    rows = []
    runs = [(eps, k) for eps in epsilons for k in range(1, (1 if math.isinf(eps) else repeats) + 1)]  # no DP: deterministic
    for eps, k in runs:
        extra = "" if math.isinf(eps) else f" dp=true dp-target-epsilon={eps:g}"
        run = study_config(cohort, overrides + extra)
        run_dir = out / (f"eps-{'inf' if math.isinf(eps) else f'{eps:g}'}" + (f"-r{k}" if repeats > 1 and not math.isinf(eps) else ""))
        start = time.perf_counter()
        summary = run_federated(cohort, run_dir, run)
        seconds = time.perf_counter() - start
        models = summary["models"]
        row: dict[str, Any] = {"epsilon": "inf" if math.isinf(eps) else eps, "repeat": k, "wall_s": round(seconds, 1)}
        for model in DISPLAY_ORDER:
            row[f"{model}_pooled_holdout_auc"] = models[model]["pooled_holdout_auc"]
            for site, entry in models[model]["sites"].items():
                if entry["role"] == "holdout":
                    row[f"{model}_auc_{site}"] = entry["auc"]
        ledger_path = run_dir / "privacy_ledger.json"
        if ledger_path.exists():
            sites = json.loads(ledger_path.read_text())["sites"]
            row["epsilon_spent"] = {s: round(e["epsilon"], 3) for s, e in sites.items()}
            row["noise_multiplier"] = {s: round(e["noise_multiplier"], 3) for s, e in sites.items()}
        holdout = [s for s, e in models["dltrmlp"]["sites"].items() if e["role"] == "holdout"]
        row["dltrmlp_at_or_above_clinical"] = all((row[f"dltrmlp_auc_{s}"] or 0) >= (row[f"clinical_auc_{s}"] or 0) for s in holdout)
        rows.append(row)
        f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        cells = "  ".join(
            f"{m} {f(row[f'{m}_pooled_holdout_auc'])} ({' / '.join(f(row[f'{m}_auc_{s}']) for s in holdout)})" for m in DISPLAY_ORDER
        )
        print(f"  ε = {row['epsilon']!s:<4} {cells}  DLTRMLP >= clinical at every external site: "
              f"{'yes' if row['dltrmlp_at_or_above_clinical'] else 'NO'}  spent {row.get('epsilon_spent', '-')}  {seconds:.0f} s", flush=True)  # fmt: skip
    if repeats > 1:
        print_repeats(rows)
    return rows


def _mean(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{sum(known) / len(known):.3f}" if known else "n/a"


def print_repeats(rows: list[dict[str, Any]]) -> None:
    """Per ε: the mean of each model's pooled external AUC over the runs, and how often DLTRMLP met the clinical model."""
    print("  over the repeated runs (mean pooled external AUC; runs with DLTRMLP >= clinical at every external site):")
    for eps in dict.fromkeys(r["epsilon"] for r in rows):
        group = [r for r in rows if r["epsilon"] == eps]
        means = "  ".join(f"{m} {_mean([r[f'{m}_pooled_holdout_auc'] for r in group])}" for m in DISPLAY_ORDER)
        met = sum(r["dltrmlp_at_or_above_clinical"] for r in group)
        print(f"  ε = {eps!s:<4} {len(group)} run(s)  {means}  DLTRMLP >= clinical: {met} of {len(group)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", type=Path, help="the demo cohort (tace-sim cohort --preset demo)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-privacy"))
    parser.add_argument("--epsilons", default="1,3,8,inf", help="comma-separated; inf = no DP (default %(default)s)")
    parser.add_argument("--run-config", default="", help="extra run-config overrides for every run")
    parser.add_argument("--repeats", type=int, default=1, help="runs per finite ε (DP runs differ by design; default %(default)s)")
    parser.add_argument("--skip-utility", action="store_true", help="only the step-cost comparison")
    parser.add_argument("--skip-steps", action="store_true", help="only the privacy-utility runs")
    parser.add_argument("--steps-only", action="store_true", help="same as --skip-utility")
    parser.add_argument("--box", default="48,48,32", help="tumour box x,y,z in voxels (default: the run config's)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per backbone and mode")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y, z = (int(v) for v in args.box.split(","))
    result: dict[str, Any] = {"box": [x, y, z], "batch": args.batch, "threads": args.threads}
    if not args.skip_steps:
        print(f"DP-SGD step cost (batch {args.batch}, input 3x{z}x{y}x{x}, {args.threads} threads):")
        result["step_cost"] = step_cost((3, z, y, x), args.batch, args.steps)
    if not (args.skip_utility or args.steps_only):
        if args.cohort is None:
            parser.error("--cohort is required for the privacy-utility runs")
        print(f"privacy-utility on {args.cohort} (holdout AUC; ε per site as spent):")
        epsilons = [float("inf") if e.strip() == "inf" else float(e) for e in args.epsilons.split(",")]
        if args.repeats < 1:
            parser.error("--repeats must be at least 1")
        result["utility"] = utility(args.cohort.resolve(), args.out.resolve(), epsilons, args.run_config, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_privacy.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'bench_privacy.json'}")


if __name__ == "__main__":
    main()
