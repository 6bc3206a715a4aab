"""`tace-analysis`: statistics on a finished run (external validation, survival; radiogenomics and report later).

Each command reads only what the sites returned (aggregates by default) from the run folder, merges its section
into RUN/analysis.json and writes tables (RUN/tables/*.csv) and figures (RUN/figures/*.png, *.svg).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tace.common.cli import EXIT_OK, command_parser, run


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, metavar="RUN", help="a finished run folder (holds summary.json and site_returns/)")
    p.add_argument("--source", choices=("aggregate", "patient-level"), default="aggregate",
                   help="compute from the sites' aggregates (default) or from patient-level rows of sites that opted in")  # fmt: skip
    p.add_argument("--no-figures", action="store_true", help="skip the PNG/SVG figures")


def build_parser() -> argparse.ArgumentParser:
    parser, sub = command_parser(
        "tace-analysis",
        "TACE-FL analysis of a finished run: external validation (AUC with DeLong CIs, paired DeLong tests, threshold "
        "metrics, calibration, decision curves) and progression-free survival (Kaplan-Meier, log-rank, Cox HR, C-index), "
        "per external site and pooled, from what the sites returned.",
    )
    v = sub.add_parser("validate", help="external validation of the run's models", description=cmd_validate.__doc__)
    _common(v)
    v.add_argument("--bootstrap", type=int, default=2000, metavar="N", help="stratified bootstrap resamples (default 2000)")
    v.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    v.set_defaults(func=cmd_validate)
    s = sub.add_parser("survival", help="progression-free survival by predicted group", description=cmd_survival.__doc__)
    _common(s)
    s.set_defaults(func=cmd_survival)
    return parser


def _notes(notes: list[str]) -> None:
    for n in notes:
        print(f"note: {n}", file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    """AUC with 95 % CI (DeLong; stratified bootstrap alongside), paired DeLong tests between DLTRMLP, DLTR and the
    clinical model, threshold metrics at the Youden cut-off fixed on the training sites, calibration (curve, Brier,
    Hosmer-Lemeshow) and decision curves; per external site and pooled. When sites shared patient-level data the
    aggregate and patient-level results are compared in an equivalence table."""
    from tace.analysis.data import load_run
    from tace.analysis.study import analyse, format_headline

    start = time.perf_counter()
    data = load_run(args.run)
    analysis, path = analyse(data, ("validation",), args.source, args.bootstrap, args.seed, figures=not args.no_figures)
    _notes(analysis["validation"]["notes"])
    print(f"external validation ({args.source}) of {args.run}:")
    print(format_headline(analysis["headline"]))
    rows = analysis.get("equivalence") if args.source == "aggregate" else None
    if rows:
        worst = max((r["abs_difference"] or 0.0) for r in rows)
        print(f"aggregate vs patient-level on {sum(s.has_patients for s in data.external)} site(s): largest difference {worst:.2g}")
    print(f"wrote {path}, {args.run / 'tables'}, {args.run / 'figures'} in {time.perf_counter() - start:.1f} s")
    return EXIT_OK


def cmd_survival(args: argparse.Namespace) -> int:
    """Kaplan-Meier curves (with numbers at risk) of progression-free survival by predicted response and by risk
    group (cut-offs fixed on the training sites), log-rank tests (pooled also stratified by site), Cox hazard ratios
    and C-index; per external site and pooled."""
    from tace.analysis.data import load_run
    from tace.analysis.study import analyse

    start = time.perf_counter()
    data = load_run(args.run)
    analysis, path = analyse(data, ("survival",), args.source, figures=not args.no_figures)
    result = analysis["survival"]
    _notes(result["notes"])
    print(f"progression-free survival ({args.source}) of {args.run}:")
    for grouping, entry in result["groupings"].items():
        pooled = entry.get("pooled", {})
        lr = pooled.get("logrank")
        hr = next(iter(pooled.get("cox", {}).get("hazard_ratios", {}).items()), None)
        text = f"log-rank p {lr['p']:.3g} (chi2 {lr['statistic']:.2f}, df {lr['df']})" if lr else "no log-rank test"
        if hr:
            text += f"; HR {hr[0]} vs {pooled['cox']['reference']} {hr[1]['hr']:.2f} ({hr[1]['low']:.2f}-{hr[1]['high']:.2f})"
        print(f"  {grouping:<20} n={pooled.get('n', 0)}, events {pooled.get('events', 0)}: {text}")
    print(f"wrote {path} in {time.perf_counter() - start:.1f} s")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
