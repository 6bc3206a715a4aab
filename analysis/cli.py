"""`tace-analysis`: statistics on a finished run: external validation, survival, radiogenomics, and the report.

`validate` and `survival` read only what the sites returned (aggregates by default) from the run folder;
`radiogenomics` applies the run's models to a radiogenomics cohort (through `tace-client features`) and reads its
expression matrix. Each merges its section into RUN/analysis.json and writes tables (RUN/tables/*.csv) and figures
(RUN/figures/*.png, *.svg); `report` puts everything into one self-contained HTML file.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tace.common.cli import EXIT_OK, command_parser, run
from tace.common.errors import TaceError


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
    v.add_argument("--hartung-knapp", action="store_true",
                   help="meta-analysis across centres: Hartung-Knapp CI of the pooled estimate (t with k - 1 df) instead of the normal one")  # fmt: skip
    v.set_defaults(func=cmd_validate)
    s = sub.add_parser("survival", help="progression-free survival by predicted group", description=cmd_survival.__doc__)
    _common(s)
    s.set_defaults(func=cmd_survival)
    _radiogenomics_parser(sub)
    r = sub.add_parser("report", help="write the study report: one self-contained HTML file", description=cmd_report.__doc__)
    r.add_argument("run", type=Path, metavar="RUN", help="a finished run folder")
    r.add_argument("--out", type=Path, help="HTML file to write (default RUN/report.html)")
    r.set_defaults(func=cmd_report)
    return parser


def _radiogenomics_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from tace.analysis.radiogenomics import Settings

    d = Settings()
    g = sub.add_parser("radiogenomics", help="correlate the model's imaging phenotype with gene expression; gene-set enrichment",
                       description=cmd_radiogenomics.__doc__)  # fmt: skip
    g.add_argument("run", type=Path, metavar="RUN", help="a finished run folder (its final models are applied to the cohort)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--cohort", type=Path, metavar="MANIFEST", help="the radiogenomics cohort's manifest (images; response may be empty)")
    src.add_argument("--features", type=Path, metavar="CSV", help="features already extracted with `tace-client features`")
    g.add_argument("--expression", type=Path, required=True, metavar="FILE",
                   help="genes x samples matrix, CSV or TSV, gene symbols in the first column (as TCGA-LIHC tables come)")  # fmt: skip
    g.add_argument("--gene-sets", type=Path, metavar="GMT", help="gene sets in GMT format, e.g. MSigDB Hallmark (required)")
    g.add_argument("--target", default=d.target, metavar="NAME",
                   help="what genes are correlated with: dltr (default, the imaging model's score), dltrmlp, clinical, "
                   "deep-pc1 (first principal component of the deep features) or feature_NNN")  # fmt: skip
    g.add_argument("--method", choices=("spearman", "pearson"), default=d.method, help="correlation (default %(default)s)")
    g.add_argument("--transform", choices=("log2p1", "none"), default=d.transform,
                   help="log2p1: log2(x+1) for linear TPM/FPKM/counts (default); none: values already on a log scale")  # fmt: skip
    g.add_argument("--min-expression", type=float, default=d.min_expression,
                   help="keep genes reaching this (after the transform) in --min-fraction of samples (default %(default)s)")  # fmt: skip
    g.add_argument("--min-fraction", type=float, default=d.min_fraction, help="see --min-expression (default %(default)s)")
    g.add_argument("--p-threshold", type=float, default=d.p_threshold, help="keep genes with P below (default %(default)s, the study's)")
    g.add_argument("--r-threshold", type=float, default=d.r_threshold, help="... and |r| at least (default %(default)s: off)")
    g.add_argument("--fdr-threshold", type=float, default=d.fdr_threshold, help="... and FDR below (default %(default)s: off)")
    g.add_argument(
        "--enrichment-fdr", type=float, default=d.enrichment_fdr, help="a gene set is enriched below this FDR (default %(default)s)"
    )
    g.add_argument("--permutations", type=int, default=d.permutations, help="GSEA pre-ranked permutations (default %(default)s)")
    g.add_argument("--min-set-size", type=int, default=d.min_set_size, help="smallest gene set tested (default %(default)s)")
    g.add_argument("--max-set-size", type=int, default=d.max_set_size, help="largest gene set tested (default %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the permutations and of the shuffled control (default %(default)s)")
    g.add_argument("--sample-id-regex", metavar="REGEX",
                   help="map expression column names to patient ids by the first capture group, e.g. '^(TCGA-..-....)'")  # fmt: skip
    g.add_argument("--no-control", action="store_true", help="skip the negative control (the analysis on shuffled expression)")
    g.add_argument("--cache", type=Path, help="preprocessing cache for --cohort (default RUN/radiogenomics/cache)")
    g.add_argument("--device", default="auto", help="device for applying the models with --cohort (default %(default)s)")
    g.add_argument("--no-figures", action="store_true", help="skip the PNG/SVG figures")
    g.set_defaults(func=cmd_radiogenomics)


def _notes(notes: list[str]) -> None:
    for n in notes:
        print(f"note: {n}", file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    """AUC with 95 % CI (DeLong; stratified bootstrap alongside), paired DeLong tests between DLTRMLP, DLTR and the
    clinical model, threshold metrics at the Youden cut-off fixed on the training sites, calibration (intercept and
    slope with CIs, O/E, ICI/E50/E90, flexible and grouped curves, Brier, Hosmer-Lemeshow) and decision curves; per
    external site and pooled. A random-effects meta-analysis across the external centres (Paule-Mandel; AUC, slope,
    O/E with τ², I² and the 95 % prediction interval), performance by subgroup from the sites' subgroup tables and
    each site's sample size against Riley et al. (2021). When sites shared patient-level data the aggregate and
    patient-level results are compared in an equivalence table."""
    from tace.analysis.data import load_run
    from tace.analysis.study import analyse, equivalence_line, format_headline

    start = time.perf_counter()
    data = load_run(args.run)
    analysis, path = analyse(data, ("validation",), args.source, args.bootstrap, args.seed, figures=not args.no_figures,
                             hartung_knapp=args.hartung_knapp)  # fmt: skip
    _notes(analysis["validation"]["notes"])
    print(f"external validation ({args.source}) of {args.run}:")
    print(format_headline(analysis["headline"]))
    rows = analysis.get("equivalence") if args.source == "aggregate" else None
    if rows:
        print(equivalence_line(rows, max((int(s.summary.get("min_cell_count", 0)) for s in data.external), default=0)))
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


def cmd_radiogenomics(args: argparse.Namespace) -> int:
    """Apply the run's final models to a radiogenomics cohort (images + RNA-seq), correlate every gene with the chosen
    score or deep feature (Spearman or Pearson; P, |r| and FDR thresholds, with a table of how many genes each keeps),
    then over-representation analysis of the kept genes (hypergeometric, background = the genes tested) and GSEA
    pre-ranked on r, against the gene sets of a GMT file you give (nothing is downloaded). A negative control repeats
    the analysis with the expression shuffled across patients. Writes RUN/tables/radiogenomics-*.csv,
    RUN/figures/radiogenomics-*, and the radiogenomics section of RUN/analysis.json."""
    from tace.analysis import radiogenomics as rg
    from tace.common.genesets import GMT_HINT

    start = time.perf_counter()
    if args.gene_sets is None:
        raise TaceError("radiogenomics needs gene sets: no --gene-sets GMT file given", GMT_HINT)
    settings = rg.Settings(
        target=args.target, method=args.method, transform=args.transform, min_expression=args.min_expression,
        min_fraction=args.min_fraction, p_threshold=args.p_threshold, r_threshold=args.r_threshold, fdr_threshold=args.fdr_threshold,
        permutations=args.permutations, min_set_size=args.min_set_size, max_set_size=args.max_set_size,
        enrichment_fdr=args.enrichment_fdr, seed=args.seed,
    )  # fmt: skip
    if not (args.run / "models" / "model.json").is_file():
        raise TaceError(f"{args.run} is not a finished run folder (no models/model.json)", "give the folder a finished run wrote")
    inputs = rg.Inputs(
        features=args.features or (lambda: _extract_features(args)), expression=args.expression, gene_sets=args.gene_sets,
        sample_id_regex=args.sample_id_regex, cohort=args.cohort,
    )  # fmt: skip
    section, result = rg.run_radiogenomics(args.run, inputs, settings, negative_control=not args.no_control, figures=not args.no_figures)
    print_radiogenomics(section, result.ora, result.prerank)
    print(
        f"wrote {args.run / 'analysis.json'}, {args.run / 'tables'}/radiogenomics-*.csv, {args.run / 'figures'}/radiogenomics-* in {time.perf_counter() - start:.1f} s"
    )
    return EXIT_OK


def _extract_features(args: argparse.Namespace) -> Path:
    """Run `tace-client features` (the site-side tool that applies the models; this command never loads torch)."""
    import subprocess

    out = args.run / "radiogenomics" / "features.csv"
    cache = args.cache or args.run / "radiogenomics" / "cache"
    cmd = [sys.executable, "-m", "tace.client.cli", "features", "--run", str(args.run), "--manifest", str(args.cohort),
           "--out", str(out), "--cache", str(cache), "--device", args.device]  # fmt: skip
    if subprocess.run(cmd, check=False).returncode != 0:
        raise TaceError(f"applying the run's models to the cohort {args.cohort} failed (see the messages above)",
                        "fix what they name, or extract the features yourself with `tace-client features` and pass --features")  # fmt: skip
    return out


def print_radiogenomics(section: dict[str, Any], ora: Any, prerank: Any) -> None:
    s, p, g = section["settings"], section["patients"], section["genes"]
    print(f"radiogenomics: {p['matched']} patients matched ({p['image_only']} imaging only, {p['expression_only']} expression only)")
    print(f"  {g['genes_tested']} genes tested of {g['genes_in_matrix']} ({s['transform']}, expressed >= {s['min_expression']} in "
          f">= {s['min_fraction']:.0%} of samples); {s['method']} r with {s['target']}")  # fmt: skip
    fdr = "" if s["fdr_threshold"] >= 1 else f", FDR < {s['fdr_threshold']}"
    print(f"  genes kept (P < {s['p_threshold']}, |r| >= {s['r_threshold']}{fdr}): {g['kept']} ({g['kept_positive']} positive)")
    for name, table, col in (("over-representation", ora, "fdr"), ("GSEA pre-ranked", prerank, "fdr")):
        hits = table[table[col] < s["enrichment_fdr"]]
        print(f"  {name}: {len(hits)} gene set(s) with FDR < {s['enrichment_fdr']}")
        for _, row in hits.head(8).iterrows():
            extra = f"NES {row['nes']:+.2f}" if "nes" in row else f"{row['overlap']}/{row['set_size']} genes"
            print(f"    {row['term']:<48} {extra}, FDR {row['fdr']:.3g}")
    control = section.get("negative_control")
    if control:
        n = len(control["enriched"]["ora"]) + len(control["enriched"]["prerank"])
        print(f"  negative control (expression shuffled across patients): {n} gene set(s) pass FDR < {s['enrichment_fdr']}")


def cmd_report(args: argparse.Namespace) -> int:
    """Write one self-contained HTML report of a finished run (figures embedded; opens offline): the question and
    the cohort, how the models were trained (settings, rounds, per-site training curves), the model comparison on
    the external sites, ROC, calibration and decision curves, Kaplan-Meier curves, radiogenomics when it was run,
    the privacy ledger when differential privacy was on, what left each site, software versions and the seed.
    External validation and survival are computed first when analysis.json lacks them."""
    from tace.analysis.report import write_report
    from tace.analysis.study import read_analysis

    start = time.perf_counter()
    existing = read_analysis(args.run)
    missing = tuple(p for p in ("validation", "survival") if p not in existing)
    if missing:
        from tace.analysis.data import load_run
        from tace.analysis.study import analyse

        print(f"computing {' and '.join(missing)} first (not yet in {args.run / 'analysis.json'})")
        analyse(load_run(args.run), missing)
    path, not_embedded = write_report(args.run, args.out)
    if not_embedded:
        print(
            f"note: {len(not_embedded)} figure(s) were not drawn and are missing from the report: {', '.join(not_embedded)}",
            file=sys.stderr,
        )
    print(
        f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, self-contained: open it in any browser) in {time.perf_counter() - start:.1f} s"
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
