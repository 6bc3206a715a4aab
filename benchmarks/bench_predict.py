"""Benchmark of using a finished study at a hospital: prediction throughput, saliency maps, local fine-tuning.

Usage:
    python benchmarks/bench_predict.py --run RUN --cohort DEMO_DIR [--out DIR] [--sites site-d,site-e] [--last-stage]

1. Prediction throughput (patients/s, CPU, warm preprocessing cache) on the external sites' patients: scores only
   (--no-saliency), with saliency maps, and with saliency maps and patient cards; the ratio to scores only.
2. The share of each saliency map in and around the tumour (bounding box widened by the preprocessing margin),
   next to the share of the box that region occupies (chance): median and quartiles over the external patients.
3. Global vs fine-tuned DLTRMLP AUC on each training site's validation split (`tace-client finetune`, head; with
   --last-stage also the backbone's last stage).
Writes OUT/bench_predict.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tace.client.predict import PredictOptions, predict
from tace.common.artifact import TrainedModels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished run on the demo cohort")
    parser.add_argument("--cohort", type=Path, required=True, help="its cohort")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-predict"))
    parser.add_argument("--sites", default="", help="external sites to predict (default: the run's holdout sites)")
    parser.add_argument("--last-stage", action="store_true", help="also fine-tune the backbone's last stage")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    trained = TrainedModels.load(args.run)
    meta = json.loads((args.cohort / "cohort.json").read_text())
    config = json.loads((args.run / "run_config.json").read_text())["run_config"]
    holdout = [s for s in (args.sites or config["holdout-sites"]).split(",") if s]
    manifests = {s["site_id"]: args.cohort / s["manifest"] for s in meta["sites"]}
    result: dict[str, Any] = {"run": str(args.run), "threads": args.threads, "throughput": {}, "saliency": {}, "finetune": {}}

    print(f"prediction throughput on {', '.join(holdout)} (patients/s, {args.threads} threads, warm cache):")
    fractions, chances = [], []
    for site in holdout:
        cache = args.out / "cache" / site
        warm = PredictOptions("cpu", saliency=False, cards=False)
        predict(trained, manifests[site], args.out / "warm" / site, cache, warm)  # warm the cache
        rates = {}
        for label, saliency, cards in (("scores", False, False), ("saliency", True, False), ("saliency+cards", True, True)):
            options = PredictOptions("cpu", saliency=saliency, cards=cards, validate=False)
            run = predict(trained, manifests[site], args.out / label / site, cache, options)
            rates[label] = round(run.patients_per_second, 2)
            if label == "saliency":
                fractions += run.table["saliency_in_tumour"].tolist()
                chances += run.table["saliency_chance"].tolist()
        rates["saliency_over_scores_time"] = round(rates["scores"] / rates["saliency"], 2)
        result["throughput"][site] = rates
        print(f"  {site}: scores {rates['scores']}  with saliency {rates['saliency']}  with saliency and cards {rates['saliency+cards']}  "
              f"(saliency costs x{rates['saliency_over_scores_time']} the time)")  # fmt: skip
    f, c = np.array(fractions, dtype=float), np.array(chances, dtype=float)
    q = lambda a: [round(float(v), 3) for v in np.nanpercentile(a, [25, 50, 75])]  # noqa: E731
    result["saliency"] = {
        "n": int(len(f)),
        "in_tumour_quartiles": q(f),
        "chance_quartiles": q(c),
        "mean_ratio_to_chance": round(float(np.nanmean(f / c)), 2),
    }
    print(f"saliency in and around the tumour: median {q(f)[1]} (quartiles {q(f)[0]}-{q(f)[2]}); the region's share of the box "
          f"(chance) median {q(c)[1]}; mean ratio to chance {result['saliency']['mean_ratio_to_chance']} (n = {len(f)})")  # fmt: skip

    from tace.client.finetune import FinetuneOptions, finetune_site

    print("local fine-tuning, DLTRMLP AUC on each training site's validation split (global -> fine-tuned):")
    for site in sorted(s for s in manifests if s not in holdout):
        for mode in ("head", "last-stage") if args.last_stage else ("head",):
            start = time.perf_counter()
            r = finetune_site(trained, manifests[site], args.out / "finetune" / site / mode, args.out / "cache" / site,
                              FinetuneOptions(mode, device="cpu"))  # fmt: skip
            result["finetune"].setdefault(site, {})[mode] = {**r.to_dict(), "seconds": round(time.perf_counter() - start, 1)}
            fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
            print(f"  {site} ({mode}, n val {r.n_val}): {fmt(r.global_auc)} -> {fmt(r.finetuned_auc)}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_predict.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'bench_predict.json'}")


if __name__ == "__main__":
    main()
