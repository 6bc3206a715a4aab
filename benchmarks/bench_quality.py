"""Model quality on a panel of cohort variants, with one configuration for all (docs/training.md, "Quality").

Usage:
    python benchmarks/bench_quality.py [--variants demo,coarse,...] [--quick] [--modes federated,centralized]
                                       [--run-config "key=value ..."] [--label NAME] [--seed 0] [--out DIR]

For every variant of the synthetic generator's panel (`tace.simulation.cohort.PANEL`: the demo, small training
centres, coarse anisotropic voxels, response shown by enhancement ratios or by texture and necrosis, centres whose
scanners differ more) it generates the cohort (kept in OUT/cohorts/ and reused), runs the study federated and
centralized with the same run configuration, and prints one table: per variant and external site each model's AUC,
the oracle AUCs (combined, image-only, clinical-only), the learning efficiency (AUC - 0.5) / (oracle - 0.5) of
DLTRMLP against the combined oracle and of DLTR against the image-only one, federated / centralized DLTRMLP, and
whether DLTRMLP beats DLTR and the clinical model. ``--quick``: three variants, federated only (for development).
``--run-config`` and ``--label`` make an ablation row set (e.g. ``--run-config "augment=false" --label no-augment``).
Writes OUT/bench_quality-<label>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from statistics import mean
from typing import Any

from tace.simulation.cli import study_config
from tace.simulation.cohort import PANEL, generate_cohort, make_preset
from tace.simulation.runner import add_oracle, run_federated, run_reference

QUICK = ("demo", "coarse", "texture-signs")
MODELS = ("dltrmlp", "dltr", "clinical", "radiomics")


def cohort_for(out: Path, variant: str, seed: int) -> Path:
    """The variant's cohort under OUT/cohorts/ (generated once)."""
    folder = out / "cohorts" / f"{variant}-s{seed}"
    if not (folder / "cohort.json").exists():
        generate_cohort(folder, make_preset(variant), seed=seed, workers=2, overwrite=True)
    return folder


def run_mode(mode: str, cohort: Path, folder: Path, overrides: str) -> dict[str, Any]:
    run = study_config(cohort, overrides)
    start = time.perf_counter()
    summary = run_federated(cohort, folder, run) if mode == "federated" else run_reference(mode, cohort, folder, run)
    summary = add_oracle(summary, cohort)
    summary.setdefault("timings", {})["bench_wall_s"] = round(time.perf_counter() - start, 1)
    return summary


def efficiency(auc: float | None, oracle: float | None) -> float | None:
    if auc is None or oracle is None or oracle <= 0.5:
        return None
    return round((auc - 0.5) / (oracle - 0.5), 3)


def rows_for(variant: str, summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per external site of a variant."""
    fed = summaries.get("federated") or next(iter(summaries.values()))
    rows = []
    for site, entry in fed["models"]["dltrmlp"]["sites"].items():
        if entry["role"] != "holdout":
            continue
        oracle = fed.get("oracle", {}).get("sites", {}).get(site, {})
        row: dict[str, Any] = {"variant": variant, "site": site, "n": entry["n"], **{f"oracle_{k}": v for k, v in oracle.items()}}
        for mode, summary in summaries.items():
            for model in MODELS:
                if model in summary["models"]:  # runs from before the radiomics model have three
                    row[f"{mode}.{model}"] = summary["models"][model]["sites"][site]["auc"]
        first = next(iter(summaries))
        row["eff_dltrmlp"] = efficiency(row[f"{first}.dltrmlp"], oracle.get("auc"))
        row["eff_dltr_image"] = efficiency(row[f"{first}.dltr"], oracle.get("auc_image"))
        if "federated" in summaries and "centralized" in summaries:
            row["fed_over_central"] = round(row["federated.dltrmlp"] / row["centralized.dltrmlp"], 3)
        row["pattern"] = bool(row[f"{first}.dltrmlp"] > max(row[f"{first}.dltr"], row[f"{first}.clinical"]))
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]], modes: list[str]) -> None:
    m = modes[0]
    print(f"\n{'variant':18} {'site':7} {'n':>4}  {'DLTRMLP':>7} {'DLTR':>6} {'clin':>6} {'radio':>6}  {'oracle':>6} {'o.img':>6} {'o.clin':>6}  "
          f"{'eff':>5} {'effDLTR':>7} {'fed/cen':>7} pattern   ({m})")  # fmt: skip
    for r in rows:
        f = lambda v: "  n/a" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"{r['variant']:18} {r['site']:7} {r['n']:>4}  {f(r[f'{m}.dltrmlp']):>7} {f(r[f'{m}.dltr']):>6} {f(r[f'{m}.clinical']):>6} {f(r.get(f'{m}.radiomics')):>6}  "
              f"{f(r.get('oracle_auc')):>6} {f(r.get('oracle_auc_image')):>6} {f(r.get('oracle_auc_clinical')):>6}  "
              f"{f(r['eff_dltrmlp']):>5} {f(r['eff_dltr_image']):>7} {f(r.get('fed_over_central')):>7} {'yes' if r['pattern'] else 'NO'}")  # fmt: skip
    for key in (*(f"{m}.{model}" for model in MODELS), "eff_dltrmlp", "eff_dltr_image", "fed_over_central"):
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            print(f"{key}: mean {mean(values):.3f}, min {min(values):.3f}")
    print(f"pattern (DLTRMLP above DLTR and clinical) at {sum(r['pattern'] for r in rows)}/{len(rows)} external sites")


def compare(rows: list[dict[str, Any]], baseline: dict[str, Any], mode: str) -> None:
    """Mean external AUC per model here and in the baseline, over the (variant, site) rows both have."""
    old = {(r["variant"], r["site"]): r for r in baseline["rows"]}
    pairs = [(r, old[(r["variant"], r["site"])]) for r in rows if (r["variant"], r["site"]) in old]
    print(f"\nagainst {baseline.get('label')!r} ({len(pairs)} external sites in common, {mode}):")
    for model in MODELS:
        key = f"{mode}.{model}"
        both = [(new[key], was[key]) for new, was in pairs if new.get(key) is not None and was.get(key) is not None]
        if both:
            now, before = mean(a for a, _ in both), mean(b for _, b in both)
            wins = sum(a > b for a, b in both)
            print(f"  {model:10} {now:.3f} vs {before:.3f}  (change {now - before:+.3f}, higher at {wins}/{len(both)} sites)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", help=f"comma-separated (default: the panel, {', '.join(PANEL)})")
    parser.add_argument("--quick", action="store_true", help=f"variants {', '.join(QUICK)}, federated only")
    parser.add_argument("--modes", default="federated,centralized")
    parser.add_argument("--run-config", default="", help="run-config overrides for every run (an ablation)")
    parser.add_argument("--label", default="default", help="name of this configuration in the output")
    parser.add_argument("--seed", type=int, default=0, help="generator seed of every variant (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("bench-quality"))
    parser.add_argument(
        "--baseline", type=Path, help="an earlier bench_quality-*.json: prints the mean AUC change per model on the rows both have"
    )
    args = parser.parse_args()
    variants = args.variants.split(",") if args.variants else list(QUICK if args.quick else PANEL)
    modes = ["federated"] if args.quick else args.modes.split(",")
    out = args.out.resolve()
    rows: list[dict[str, Any]] = []
    timings: dict[str, Any] = {}
    for variant in variants:
        cohort = cohort_for(out, variant, args.seed)
        summaries = {}
        for mode in modes:
            summaries[mode] = run_mode(mode, cohort, out / "runs" / args.label / f"{variant}-s{args.seed}-{mode}", args.run_config)
            timings[f"{variant}.{mode}"] = summaries[mode]["timings"]["bench_wall_s"]
            print(f"{variant} {mode}: {timings[f'{variant}.{mode}']} s", flush=True)
        rows += rows_for(variant, summaries)
    print_table(rows, modes)
    if args.baseline:
        compare(rows, json.loads(args.baseline.read_text()), modes[0])
    result = {"label": args.label, "run_config": args.run_config, "seed": args.seed, "modes": modes, "rows": rows, "timings_s": timings}
    (out / f"bench_quality-{args.label}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
