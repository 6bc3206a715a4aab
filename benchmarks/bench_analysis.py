"""Time the analysis of a finished run and print the equivalence table (aggregate vs patient-level vs reference).

Usage: .venv/bin/python benchmarks/bench_analysis.py RUN
RUN is a finished run folder, e.g. the newest ``demo/runs/*-federated`` of `make demo` (whose simulated sites opt
in to patient-level sharing, so the equivalence table is filled). Prints: the time of validation (with and without
figures), of survival, the equivalence table, and the size of what the sites returned.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tace.analysis.data import load_run
from tace.analysis.study import equivalence, survival_analysis, validate, write_analysis


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args()

    t = time.perf_counter()
    data = load_run(args.run)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    v = validate(data, reps=args.bootstrap)
    validate_s = time.perf_counter() - t
    t = time.perf_counter()
    s = survival_analysis(data)
    survival_s = time.perf_counter() - t
    t = time.perf_counter()
    eq = equivalence(data, reps=200)
    eq_s = time.perf_counter() - t
    t = time.perf_counter()
    write_analysis(data, {"validation": v, "survival": s, "equivalence": eq})
    write_s = time.perf_counter() - t

    sizes = {f.stem: f.stat().st_size for f in sorted((args.run / "site_returns").glob("*.json"))}
    print(f"run {args.run}: {len(data.external)} external site(s), {sum(x.summary['n'] for x in data.external)} external patients")
    print(f"load {load_s:.2f} s; validate {validate_s:.2f} s ({args.bootstrap} bootstrap resamples); survival {survival_s:.2f} s; "
          f"equivalence {eq_s:.2f} s; tables + figures {write_s:.2f} s")  # fmt: skip
    print("site returns (bytes, aggregate + opted-in rows): " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    if eq:
        print(f"\n{'statistic':<36} {'aggregate':>12} {'patient-level':>14} {'reference':>12}  reference from")
        for r in eq:
            ref = "" if r["reference"] is None else f"{r['reference']:.6g}"
            print(f"{r['statistic']:<36} {r['aggregate']:>12.6g} {r['patient_level']:>14.6g} {ref:>12}  {r['reference_from']}")
        print(f"largest |aggregate - patient-level|: {max(r['abs_difference'] for r in eq):.3g}")


if __name__ == "__main__":
    main()
