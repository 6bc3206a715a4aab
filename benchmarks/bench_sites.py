"""Peak memory and wall time of a federated run with many sites on the tiny preset (default 10 sites).

Usage: python benchmarks/bench_sites.py [--n-sites 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from tace.simulation.cli import study_config
from tace.simulation.cohort import generate_cohort, make_preset
from tace.simulation.runner import run_federated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-sites", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="tace-sites-"))
    try:
        cohort = work / "cohort"
        if cohort.exists():
            shutil.rmtree(cohort)
        generate_cohort(cohort, make_preset("tiny", n_sites=args.n_sites), seed=0)
        run = study_config(cohort, "rounds=3 head-rounds=3 clinical-rounds=3")
        start = time.perf_counter()
        summary = run_federated(cohort, work / "run", run)
        figures = {
            "n_sites": args.n_sites,
            "holdout_sites": list(run.holdout),
            "wall_s": round(time.perf_counter() - start, 1),
            "peak_rss_mb_all_processes": summary["timings"]["peak_rss_mb"],
            "per_site_mb": round(summary["timings"]["peak_rss_mb"] / args.n_sites, 1),
        }
        print(json.dumps(figures, indent=2))
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
