"""`tace-sim`: the synthetic multi-centre cohort and single-machine runs of the whole study."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tace.common.cli import EXIT_OK, EXIT_PROBLEMS, command, command_parser, progress, run, shared_options
from tace.common.config import RunConfig, parse_overrides
from tace.common.errors import TaceError


def build_parser() -> argparse.ArgumentParser:
    from tace.simulation.cohort import PRESETS, default_workers

    parser, sub = command_parser(
        "tace-sim",
        "TACE-FL simulation: generate a realistic synthetic multi-centre cohort (NIfTI/NRRD/MetaImage "
        "files and a manifest per site) and run the study on one machine.",
    )
    workers = argparse.ArgumentParser(add_help=False)
    workers.add_argument("--workers", type=int, default=default_workers(),
                         help="parallel rendering processes (default %(default)s; output does not depend on it)")  # fmt: skip
    cohort = command(
        sub, "cohort", cmd_cohort, "generate a synthetic multi-centre cohort",
        "Generate a synthetic multi-centre TACE cohort: per site, MRI phases and tumour masks plus a manifest "
        "(docs/manifest.md); a radiogenomics cohort with an expression matrix; and the ground truth (ground_truth/, read by "
        "no training or analysis code). Deterministic for a seed. See docs/synthetic-cohort.md.",
        [shared_options("seed"), workers],
    )  # fmt: skip
    cohort.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                        help="demo: 5 centres x 100-150 patients; tiny: 5 centres x 6-8 patients, <= 16^3 voxels (tests)")  # fmt: skip
    cohort.add_argument("--out", type=Path, required=True, help="output folder (must be new or empty)")
    cohort.add_argument("--n-sites", type=int, help="number of centres (default: the preset's 5; the last two are external)")
    cohort.add_argument("--patients-per-site", type=int, help="patients per centre (default: the preset's)")
    cohort.add_argument("--format", choices=("nii.gz", "nii", "nrrd", "mha", "dicom"),
                        help="one image format for every centre (default: varies by centre)")  # fmt: skip
    cohort.add_argument(
        "--gene-sets", type=Path, metavar="GMT", help="GMT file for the radiogenomics pathways (default: a built-in synthetic set)"
    )
    cohort.add_argument("--force", action="store_true", help="replace the output folder if it is not empty")
    run = command(
        sub, "run", cmd_run, "run the study on a cohort: federated (Flower simulation), centralized or local",
        "Run the whole study (clinical statistics, DLTR, DLTRMLP head, clinical model, evaluation at every site) with all "
        "sites on this machine. federated: Flower's simulation engine with the same ClientApp and ServerApp hospitals run; "
        "centralized: the training sites' data pooled through the same model and training code (upper reference); local: "
        "each training site alone (lower reference). Writes the run folder and summary.json.",
        [shared_options("run-config", run_config="override run-config keys as Flower does, e.g. \"lr=0.0005 backbone='resnet10'\"")],
    )  # fmt: skip
    run.add_argument("--cohort", type=Path, help="cohort folder (cohort.json + sites/), e.g. from `tace-sim cohort`")
    run.add_argument("--site", action="append", metavar="SITE=MANIFEST",
                     help="instead of --cohort: one of your own sites, by its manifest (repeat for every site)")  # fmt: skip
    run.add_argument("--study", type=Path, metavar="TOML", help="instead of --cohort: a study file naming your sites (docs/training.md)")
    run.add_argument("--holdout", metavar="A,B", help="with --site or --study: the external (held-out) sites")
    run.add_argument("--out", type=Path, required=True, help="run folder to create")
    run.add_argument("--mode", choices=("federated", "centralized", "local"), default="federated", help="default %(default)s")
    run.add_argument("--rounds", type=int, help="DLTR rounds (run-config key rounds)")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in --out from its last completed round, with its own configuration",
    )
    demo = command(
        sub, "demo", cmd_demo, "the main job: the whole study on the demo cohort (generated if missing), with a results table",
        "Generate the five-centre demo cohort if DIR has none, validate every site as `tace-client check` would, preprocess "
        "every patient into the site caches, then run the study federated (three training centres, two external ones) in "
        "Flower's simulation engine and print per model and site the AUC, with the generator's oracle. Each run goes to "
        "DIR/runs/<time>-federated.",
        [shared_options("seed", "run-config", run_config="override run-config keys of the study run"), workers],
    )  # fmt: skip
    demo.add_argument("--out", type=Path, default=Path("demo"), help="demo folder (default %(default)s)")
    demo.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="cohort preset (default %(default)s)")
    return parser


def cmd_cohort(args: argparse.Namespace) -> int:
    from tace.simulation.cohort import generate_cohort, make_preset

    preset = make_preset(args.preset, n_sites=args.n_sites, patients_per_site=args.patients_per_site, fmt=args.format)
    start = time.perf_counter()
    result = generate_cohort(
        args.out, preset, seed=args.seed, gene_sets=args.gene_sets, workers=args.workers, overwrite=args.force,
        progress=lambda it, total: progress(it, total=total, desc="rendering", unit="patient"),
    )  # fmt: skip
    n = sum(result.sites.values())
    print(
        f"generated {len(result.sites)} sites, {n} patients (+ radiogenomics cohort) in {args.out} in {time.perf_counter() - start:.1f} s"
    )
    print(f"site manifests: {args.out}/sites/<site>/manifest.csv; description: {args.out}/cohort.json")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    clock = StageClock()
    out: Path = args.out
    with clock("cohort"):
        meta = demo_cohort(out, args.preset, args.seed, args.workers)
    with clock("check and preprocess"):
        ok = check_and_preprocess(out, meta, args.workers)
    if not ok:
        print("Some sites failed validation (listed above); the study was not run.")
        return EXIT_PROBLEMS

    from tace.simulation.runner import add_oracle, run_federated

    # The simulated hospitals opt in to patient-level sharing (synthetic patients), so the demo can show that the
    # aggregate analysis gives the patient-level answers; a real site shares aggregates only unless it opts in.
    run = study_config(out.resolve(), "share-patient-level='all' " + (args.run_config or ""))
    run_dir = out / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-federated"
    print(f"\nfederated study ({len(meta['sites'])} sites, holdout {', '.join(run.holdout)}, backbone {run.backbone}) -> {run_dir}")
    with clock("federated training"):
        study = add_oracle(run_federated(out.resolve(), run_dir, run, on_line=_round_printer()), out)
    print()
    print(results_table(study))
    if finetune_table(study):
        print(finetune_table(study))
    with clock("analysis"):
        analyse(run_dir)
    with clock("radiogenomics"):
        radiogenomics(run_dir, out)
    from tace.analysis.report import write_report

    with clock("report"):
        report_path, _ = write_report(run_dir)
    hospital = [s["site_id"] for s in meta["sites"] if s["site_id"] in run.holdout][:1]
    if hospital:
        with clock("predictions"):
            predict_at_hospital(run_dir, out, hospital[0])
    study["timings"]["demo"] = clock.table(study["timings"])
    (run_dir / "summary.json").write_text(json.dumps(study, indent=2))
    print(f"\nwhere the time went (summary.json timings.demo):\n{clock.text(study['timings']['demo'])}")
    print(f"\nrun folder: {run_dir}")
    print(f"study report: {report_path} (self-contained HTML: open it in a browser)")
    return EXIT_OK


class StageClock:
    """Wall time of the demo's stages, in order; `table` splits federated training into Flower's start-up and
    shutdown and the workflow's own stages (from the run's timings)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stages: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = round(time.perf_counter() - start, 1)

    def table(self, run_timings: dict[str, Any]) -> dict[str, Any]:
        """{stage: seconds} with ``total_s``; federated training's part in ``federated training (of which)``."""
        inner = {k[: -len("_s")]: round(float(v), 1) for k, v in run_timings.items() if k.endswith("_s") and k not in ("total_s", "wall_s")}
        if "federated training" in self.stages and "total_s" in run_timings:
            inner["flower start-up and shutdown"] = round(self.stages["federated training"] - float(run_timings["total_s"]), 1)
        return {"stages_s": dict(self.stages), "federated_training_s": inner, "total_s": round(time.perf_counter() - self.start, 1)}

    @staticmethod
    def text(table: dict[str, Any]) -> str:
        total = float(table["total_s"])
        lines = []
        for name, seconds in table["stages_s"].items():
            lines.append(f"  {name:<34} {seconds:7.1f} s  {100 * seconds / total:3.0f} %")
            if name == "federated training":
                lines += [f"    {part:<32} {s:7.1f} s" for part, s in table["federated_training_s"].items()]
        lines.append(f"  {'demo total':<34} {total:7.1f} s")
        return "\n".join(lines)


def demo_cohort(out: Path, preset: str, seed: int, workers: int) -> dict[str, Any]:
    """The demo's cohort in `out` (generated unless it is there for the same preset and seed): its cohort.json."""
    from tace.simulation.cohort import generate_cohort, make_preset

    meta_path = out / "cohort.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if (meta.get("preset"), meta.get("seed")) != (preset, seed):
            raise TaceError(f"{out} holds a cohort with preset {meta.get('preset')!r} and seed {meta.get('seed')}",
                            "choose another --out folder, or the same --preset/--seed")  # fmt: skip
        print(f"using the existing {preset} cohort in {out}")
        return dict(meta)
    start = time.perf_counter()
    generate_cohort(
        out, make_preset(preset), seed=seed, workers=workers,
        progress=lambda it, total: progress(it, total=total, desc="generating cohort", unit="patient"),
    )  # fmt: skip
    print(f"generated the {preset} cohort in {out} in {time.perf_counter() - start:.1f} s")
    return dict(json.loads(meta_path.read_text()))


def _preprocess_site(manifest_path: Path, cache_dir: Path, config: Any) -> tuple[int, float]:
    """One site's patients into its cache: tensors and radiomics features, as `tace-client preprocess` does (run in a
    worker process); (patients already cached, seconds)."""
    from tace.client.cache import PreprocessCache
    from tace.common.manifest import parse_manifest

    manifest = parse_manifest(manifest_path)
    cache = PreprocessCache(cache_dir, config)
    start = time.perf_counter()
    hits = 0
    for record in manifest.records:
        hits += cache.prepare(record, manifest.root).hit
    return hits, time.perf_counter() - start


def check_and_preprocess(out: Path, meta: dict[str, Any], workers: int = 1) -> bool:
    """Every site checked as `tace-client check` does, then preprocessed into its cache as `tace-client preprocess`
    does (tensors and radiomics features; sites in parallel over `workers` processes), with a table of what was found;
    False when a site has problems (they are listed)."""
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tace.common.manifest import parse_manifest
    from tace.common.preprocess import PreprocessConfig
    from tace.common.validate import check_site

    config = PreprocessConfig.from_mapping(meta["suggested_preprocessing"])
    reports = {}
    for site in meta["sites"]:
        manifest = parse_manifest(out / site["manifest"])
        reports[site["site_id"]] = check_site(
            manifest, progress=functools.partial(progress, desc=f"checking {site['site_id']}", unit="patient")
        )
    all_ok = all(r.ok for r in reports.values())
    done: dict[str, tuple[int, float]] = {}
    jobs = {
        site["site_id"]: (out / site["manifest"], out / "cache" / site["site_id"], config)
        for site in meta["sites"]
        if reports[site["site_id"]].ok
    }
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            futures = {pool.submit(_preprocess_site, *job): site for site, job in jobs.items()}
            for future in progress(as_completed(futures), total=len(futures), desc="preprocessing", unit="site"):
                done[futures[future]] = future.result()
    else:
        for site, job in progress(jobs.items(), total=len(jobs), desc="preprocessing", unit="site"):
            done[site] = _preprocess_site(*job)
    rows = []
    for site in meta["sites"]:
        report = reports[site["site_id"]]
        summary = report.summary
        rate = summary.responder_rate() if summary else None
        hits, seconds = done.get(site["site_id"], (0, 0.0))
        rows.append((
            site["site_id"], site["suggested_role"], summary.n_patients if summary else 0,
            f"{100 * rate:.0f} %" if rate is not None else "-", site["image_format"],
            "ok" if report.ok else f"{len(report.problems)} problems", f"{seconds:.1f} s ({hits} cached)" if report.ok else "-",
        ))  # fmt: skip
        for p in report.problems[:10]:
            print("  " + p.format())
    print()
    print(_columns(("site", "role", "patients", "responders", "format", "check", "preprocess"), rows))
    print(f"\ntensors {config.shape} (C, D, H, W) and radiomics features cached under {out / 'cache'}")
    return all_ok


def radiogenomics(run_dir: Path, cohort: Path) -> float:
    """`tace-analysis radiogenomics` on the cohort's radiogenomics part with the run's models; prints the planted
    pathways next to what was found (the generator's truth, which the analysis itself never reads)."""
    from tace.analysis import radiogenomics as rg
    from tace.analysis.cli import print_radiogenomics
    from tace.client.features import extract_features, write_features
    from tace.common.artifact import TrainedModels
    from tace.common.genesets import write_gmt
    from tace.simulation.radiogenomics import builtin_gene_sets

    start = time.perf_counter()
    rg_dir = cohort / "radiogenomics"
    meta = json.loads((cohort / "cohort.json").read_text(encoding="utf-8"))["radiogenomics"]
    gmt = Path(meta["gene_sets"]) if Path(meta["gene_sets"]).is_absolute() else cohort / meta["gene_sets"]
    if not gmt.exists() and not Path(meta["gene_sets"]).suffix:  # a cohort made before the generator wrote its GMT
        gmt = write_gmt(rg_dir / "gene_sets.gmt", builtin_gene_sets(), "TACE-FL synthetic pathway")
    print(f"\nradiogenomics: applying the run's models to {rg_dir / 'manifest.csv'}")
    features = extract_features(TrainedModels.load(run_dir), rg_dir / "manifest.csv", cohort / "cache" / "radiogenomics")
    features_path = write_features(features, run_dir / "radiogenomics" / "features.csv")
    inputs = rg.Inputs(features_path, rg_dir / "expression.csv", gmt, cohort=rg_dir / "manifest.csv")
    section, result = rg.run_radiogenomics(run_dir, inputs, rg.Settings())
    print_radiogenomics(section, result.ora, result.prerank)
    truth = json.loads((cohort / "ground_truth" / "truth.json").read_text(encoding="utf-8"))["radiogenomics"]
    planted = set(truth["planted_pathways"])
    found = {k: len(planted & set(v)) for k, v in section["enriched"].items()}
    print(f"  planted pathways found (FDR < 0.05): over-representation {found['ora']}/{len(planted)}, "
          f"GSEA pre-ranked {found['prerank']}/{len(planted)}  (study: angiogenesis, EMT, hypoxia, TGF-beta)")  # fmt: skip
    return time.perf_counter() - start


def predict_at_hospital(run_dir: Path, cohort: Path, site: str, n: int = 5) -> float:
    """What an external hospital does with the finished study: `tace-client predict` with the exported model for a
    few of its patients, with saliency maps and one card each."""
    from tace.client.predict import PredictOptions, predict
    from tace.common.artifact import TrainedModels
    from tace.common.manifest import parse_manifest

    start = time.perf_counter()
    manifest = cohort / "sites" / site / "manifest.csv"
    ids = [r.patient_id for r in parse_manifest(manifest).records[:n]]
    out = run_dir / "predictions" / site
    result = predict(TrainedModels.load(run_dir), manifest, out, cohort / "cache" / site, PredictOptions(validate=False, patients=ids))
    groups = ", ".join(f"{k}: {v}" for k, v in sorted(result.table["predicted_group"].value_counts().items()))
    print(f"\nprediction at {site} with the exported model {run_dir / 'models' / 'tace-model.zip'}: {len(ids)} patients ({groups}), "
          f"{result.patients_per_second:.1f} patients/s with saliency maps; patient cards: {out / 'index.html'}")  # fmt: skip
    return time.perf_counter() - start


#: The published study's external-validation AUCs (two external cohorts) and PFS log-rank P, for comparison
#: (the study had no radiomics model: its row shows "-").
STUDY = {"DLTRMLP": "0.800 / 0.818", "DLTR": "0.649 / 0.629", "Clinical": "0.648 / 0.659", "log-rank P": "0.035"}


def analyse(run_dir: Path) -> float:
    """`tace-analysis validate` and `survival` on a finished run, then the headline table next to the study's."""
    from tace.analysis.data import load_run
    from tace.analysis.study import analyse as analyse_run
    from tace.analysis.study import equivalence_line

    start = time.perf_counter()
    data = load_run(run_dir)
    try:
        analysis, path = analyse_run(data)
    except TaceError as exc:  # no PFS data: the validation still stands
        print(f"note: no survival analysis: {exc}")
        analysis, path = analyse_run(data, ("validation",))
    validation, eq = analysis["validation"], analysis.get("equivalence")
    print("\nexternal validation (aggregates only; AUC with 95 % DeLong CI), calibration, heterogeneity across centres and PFS by "
          "predicted response:")  # fmt: skip
    header = (
        "model",
        "pooled AUC (95% CI)",
        *[f"AUC {s}" for s in validation["sites"]],
        "DeLong p vs DLTRMLP",
        "calibration slope (95% CI)",
        "meta-analytic AUC (95% PI)",
        "PFS log-rank p",
        "HR",
        "study AUCs",
    )
    rows = []
    f = _fmt3
    for r in analysis["headline"]:
        slope = (
            f"{f(r.get('calibration_slope'))} ({f(r.get('slope_ci_low'))} to {f(r.get('slope_ci_high'))})"
            if r.get("calibration_slope") is not None
            else "n/a"
        )
        meta = (
            f"{f(r.get('meta_pooled'))} ({f(r.get('meta_pi_low'))}-{f(r.get('meta_pi_high'))})"
            if r.get("meta_pooled") is not None
            else "n/a"
        )
        rows.append((r["model"], f"{f(r['pooled_auc'])} ({f(r['ci_low'])}-{f(r['ci_high'])})", *[f(r[f"auc {s}"]) for s in validation["sites"]],
                     f(r.get("delong_p_vs_dltrmlp")) if r["model"] != "DLTRMLP" else "-", slope, meta, f(r.get("logrank_p")), f(r.get("hr")),
                     STUDY.get(r["model"], "-")))  # fmt: skip
    print(_columns(header, rows, indent="  "))
    k = next((r.get("meta_k") for r in analysis["headline"] if r.get("meta_k")), None)
    if k:
        print(f"  (meta-analysis: Paule-Mandel random effects over {k} external centres; the 95% prediction interval, for a new centre, "
              "uses t with k - 2 df (at least 1): with few centres it is wide)")  # fmt: skip
    print(f"  (study: DLTRMLP PFS log-rank P = {STUDY['log-rank P']})")
    if eq:
        k = max((int(e.get("min_cell_count") or 0) for e in analysis.get("sharing", {}).values()), default=0)
        print(equivalence_line(eq, k))
    for note in analysis["validation"]["notes"] + analysis.get("survival", {}).get("notes", []):
        print(f"note: {note}")
    print(f"analysis: {path}, tables/, figures/")
    return time.perf_counter() - start


def _fmt3(v: object) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "< 0.001" if 0 <= v < 0.0005 else f"{v:.3f}"
    return str(v)


def _columns(header: Sequence[object], rows: Sequence[Sequence[object]], indent: str = "") -> str:
    """Left-aligned columns, as wide as their widest cell."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(indent + "  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows])


def resumable_config(out: Path) -> RunConfig:
    """The configuration of the interrupted run in `out`, set to resume (its own settings, not today's defaults)."""
    if not (out / "progress.json").exists() or not (out / "run_config.json").exists():
        raise TaceError(f"{out} holds no interrupted run (no progress.json)", "start a new run without --resume")
    if (out / "summary.json").exists():
        raise TaceError(f"the run in {out} finished", "start a new run in a new --out folder")
    saved = json.loads((out / "run_config.json").read_text(encoding="utf-8"))["run_config"]
    return RunConfig.from_run_config({**saved, "resume": True})


def study_config(cohort: Path, overrides: str = "", rounds: int | None = None) -> RunConfig:
    """Run configuration for a cohort: defaults, the cohort's suggested roles and preprocessing, then overrides."""
    meta = json.loads((cohort / "cohort.json").read_text())
    base: dict[str, object] = {}
    holdout = [s["site_id"] for s in meta["sites"] if s.get("suggested_role") == "holdout"]
    base["holdout-sites"] = ",".join(holdout)
    pre = meta.get("suggested_preprocessing")
    if pre:
        base["spacing-mm"] = ",".join(f"{v:g}" for v in pre["spacing_mm"])
        base["box-voxels"] = ",".join(str(v) for v in pre["box_voxels"])
    base.update(meta.get("run_config", {}))  # a researcher's study file (tace.simulation.sites)
    if rounds is not None:
        base["rounds"] = rounds
    base.update(parse_overrides(overrides))
    return RunConfig.from_run_config(base).resolved(Path.cwd())


def results_table(summary: dict[str, object]) -> str:
    """Per model x site AUC, with the oracle, as text."""
    models = summary["models"]
    assert isinstance(models, dict)
    sites = list(models["dltrmlp"]["sites"])
    oracle = summary.get("oracle", {}).get("sites", {})  # type: ignore[attr-defined]
    order = ("clinical", "radiomics", "dltr", "dltrmlp")
    header = ["site", "role", "n", "clinical", "radiomics", "DLTR", "DLTRMLP", "oracle", "oracle (image)"]
    rows = [header]

    def fmt(v: object) -> str:
        return "-" if v is None else f"{float(v):.3f}"  # type: ignore[arg-type]

    for s in sites:
        e = models["dltrmlp"]["sites"][s]
        o = oracle.get(s, {})
        rows.append(
            [s, e["role"], str(e["n"]), *(fmt(models[m]["sites"][s]["auc"]) for m in order), fmt(o.get("auc")), fmt(o.get("auc_image"))]
        )
    if models["dltrmlp"].get("pooled_holdout_auc") is not None:
        rows.append(["holdout pooled", "", "", *(fmt(models[m]["pooled_holdout_auc"]) for m in order), "", ""])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows)


def finetune_table(summary: dict[str, object]) -> str:
    """Global vs locally fine-tuned DLTRMLP AUC per training site (run-config finetune), as text; '' when not run."""
    tuned = summary.get("finetune")
    if not isinstance(tuned, dict) or "sites" not in tuned:
        return ""
    if not tuned["sites"]:
        return f"local fine-tuning: {tuned.get('note', 'no training site reported')}"
    f = lambda v: "n/a" if v is None else f"{float(v):.3f}"  # noqa: E731
    rows = [
        (s, str(e.get("n_val", "")), f(e.get("global_auc")), f(e.get("finetuned_auc")), str(e.get("error", "")))
        for s, e in tuned["sites"].items()
    ]
    return f"local fine-tuning ({tuned['mode']}), DLTRMLP AUC on each training site's validation split:\n" + _columns(
        ("site", "n val", "global", "fine-tuned", "error"), rows, indent="  "
    )


def _round_printer() -> Callable[[str], None]:
    def show(line: str) -> None:
        if line.startswith("TACE-ROUND"):
            _, stage, progress_, auc, *sites = line.split()
            print(f"  {stage:<10} round {progress_:>7}  {auc}  {'  '.join(sites)}".rstrip(), flush=True)

    return show


def _print_reference_round(stage: str, r: int, n: int, auc: float | None, sites: dict[str, str] | None = None) -> None:
    detail = "  ".join(f"{s}:{v}" for s, v in (sites or {}).items())
    print(f"  {stage:<10} round {r:>3}/{n}  pooled-val-auc={'n/a' if auc is None else f'{auc:.3f}'}  {detail}".rstrip(), flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    from tace.simulation.runner import add_oracle, run_federated, run_reference

    if sum(x is not None for x in (args.cohort, args.site, args.study)) != 1:
        raise TaceError("give the sites with exactly one of --cohort, --site (repeated) or --study",
                        "--cohort DIR for a generated cohort; --site site-a=PATH/manifest.csv ... --holdout site-d for your own sites")  # fmt: skip
    if args.cohort is None:
        from tace.simulation.sites import SitesError, parse_site_options, prepare, read_study_file

        if args.out.exists() and any(args.out.iterdir()) and not args.resume:
            raise TaceError(f"{args.out} is not empty (an earlier run?)", "choose a new --out folder")
        spec = read_study_file(args.study, args.holdout or "") if args.study else parse_site_options(args.site, args.holdout or "")
        try:
            args.cohort = prepare(spec, args.out / "study", progress)
        except SitesError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_PROBLEMS
    elif args.holdout is not None:
        args.run_config = f"holdout-sites='{args.holdout}' {args.run_config or ''}"
    cohort = args.cohort.resolve()
    if not (cohort / "cohort.json").exists():
        raise TaceError(f"{cohort} is not a cohort folder (no cohort.json)", "generate one with `tace-sim cohort --out DIR`")
    if args.resume:
        run = resumable_config(args.out)
        args.mode = json.loads((args.out / "run_config.json").read_text(encoding="utf-8"))["mode"]
    else:
        run = study_config(cohort, args.run_config, args.rounds)
        if args.out.exists() and any(p.name != "study" for p in args.out.iterdir()):
            raise TaceError(
                f"{args.out} is not empty (an earlier run?)", "choose a new --out folder, or continue an interrupted run with --resume"
            )
    print(
        f"{args.mode} run on {cohort.name}: holdout sites {', '.join(run.holdout) or 'none'}, backbone {run.backbone}, {run.rounds} DLTR rounds"
    )
    if args.mode == "federated":
        summary = run_federated(cohort, args.out, run, on_line=_round_printer())
    else:
        summary = run_reference(args.mode, cohort, args.out, run, on_round=_print_reference_round)
    summary = add_oracle(summary, cohort)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print()
    print(results_table(summary))
    if finetune_table(summary):
        print(finetune_table(summary))
    print(f"\nrun folder: {args.out} (summary.json, metrics.csv, models/, run.log); wall time {summary['timings'].get('wall_s', 0):.0f} s")
    print(f"analyse it with: tace-analysis validate {args.out} && tace-analysis survival {args.out} && tace-analysis report {args.out}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
