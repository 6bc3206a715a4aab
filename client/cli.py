"""`tace-client`: what a hospital runs next to its data (check and preprocess it, apply a study's model, join a study)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tace.common.cli import EXIT_OK, EXIT_PROBLEMS, command, command_parser, progress, run, shared_options, triple
from tace.common.errors import ImageReadError, Problem, TaceError
from tace.common.manifest import Manifest, parse_manifest
from tace.common.preprocess import INTENSITY_REFERENCES, PreprocessConfig
from tace.common.validate import CheckReport, check_site


def build_parser() -> argparse.ArgumentParser:
    parser, sub = command_parser(
        "tace-client", "TACE-FL site client: runs at a hospital, next to its MRI data, which never leaves the site."
    )
    _data_commands(sub)
    _model_commands(sub)
    _deployment_commands(sub)
    return parser


def _data_commands(sub: Any) -> None:
    """check and preprocess: the site's data, before any study."""
    check = command(
        sub, "check", cmd_check, "validate the site manifest and every image it names, before joining a federation",
        "Validate a site manifest (docs/manifest.md) and every image it names. Reports every problem with row, column and "
        "file; prints a cohort summary (counts only) when all is well. Exit status 1 when anything is wrong. Never modifies a file.",
        [shared_options("manifest")],
    )  # fmt: skip
    check.add_argument("--deep", action="store_true", help="also read every voxel (NaN/inf, blank images, damaged compressed data)")
    check.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON to FILE")
    pre = command(
        sub, "preprocess", cmd_preprocess, "preprocess every patient into the site's cache (validates first)",
        "Resample every patient's phases onto a tumour-centred box, normalise them, and store the tensors in the cache "
        "folder, so that training rounds start immediately. Entries whose sources or parameters changed are recomputed; "
        "current ones are reused.",
        [shared_options("manifest")],
    )  # fmt: skip
    pre.add_argument("--cache", type=Path, required=True, help="cache folder on the site's disk")
    add_preprocess_options(pre)
    imp = command(
        sub, "import", cmd_import, "turn a PACS export (a tree of DICOM files) into a site folder: NIfTI, a draft manifest, a report",
        "Read the headers of every file under DICOM_ROOT once, group them into series, give each series its phase by the "
        "rules (default: common vendor names of the arterial, portal-venous and delayed phases, dynamic series split into "
        "their temporal phases; --rules to override), and write SITE_DIR: the phases as compressed NIfTI (or links to the "
        "DICOM files with --no-convert), SEG/RTSTRUCT masks, a draft manifest.csv with site pseudonyms (the key in "
        "SITE_DIR/pseudonyms.csv stays at the site), import-report.html/json (every series, the phase it got and why; every "
        "patient with a missing or ambiguous phase: those cells are left empty, never guessed). Then runs `tace-client check` "
        "on the draft (exit status 1 while cells remain to fill). The export is never modified.",
    )  # fmt: skip
    imp.add_argument("dicom_root", type=Path, metavar="DICOM_ROOT", help="the PACS export's folder")
    imp.add_argument("--out", type=Path, required=True, metavar="SITE_DIR", help="the site folder to write (manifest.csv, images/, masks/)")
    imp.add_argument("--rules", type=Path, metavar="TOML", help="phase rules replacing the defaults' tables and keys (docs/manifest.md)")
    imp.add_argument("--clinical", type=Path, metavar="CSV", help="clinical table joined on patient_id (pseudonym) or PatientID")
    imp.add_argument("--no-convert", action="store_true", help="link the DICOM files instead of writing NIfTI")
    imp.add_argument("--pseudonyms", type=Path, metavar="CSV",
                     help="pseudonym key to use (columns PatientID, patient_id; default: SITE_DIR/pseudonyms.csv when present)")  # fmt: skip
    imp.add_argument("--prefix", help="prefix of new pseudonyms (default: SITE_DIR's name and '-', as in site-a-0001)")
    imp.add_argument(
        "--keep-patient-id", action="store_true", help="use the DICOM PatientID as patient_id (identifying: only if your study allows it)"
    )
    imp.add_argument("--force", action="store_true", help="replace an earlier import in SITE_DIR (its pseudonym key is kept)")


def _model_commands(sub: Any) -> None:
    """features, predict and finetune: a finished study's model applied at the site."""
    feat = command(
        sub, "features", cmd_features, "apply a finished run's models to a cohort: deep features and scores per patient (for radiogenomics)",
        "Preprocess a cohort's images exactly as the run did and apply its final models. Writes one row per patient: the "
        "DLTRMLP, DLTR and clinical-model probabilities and DLTR's deep features (feature_000 ...). The table stays where "
        "--out says; `tace-analysis radiogenomics` reads it. Validates the manifest first.",
        [shared_options("manifest", "cache", "device", manifest="the cohort's manifest CSV (the response column may be empty)",
                        cache="preprocessing cache folder (default: a cache/ folder beside --out)")],
    )  # fmt: skip
    feat.add_argument("--run", type=Path, required=True, help="a finished run folder (holds models/ and run_config.json)")
    feat.add_argument("--out", type=Path, required=True, help="CSV to write")
    pred = command(
        sub, "predict", cmd_predict, "predict new patients with a finished study's model: probabilities, groups, saliency maps, one card each",
        "Apply a finished study's exported model (MODEL: its tace-model.zip, or the run folder) to the patients of a manifest "
        "(the response column may be empty or absent). Validates the manifest and every image first, as `tace-client check`. "
        "Writes OUT/predictions.csv (DLTRMLP, DLTR and clinical-model probabilities of objective response, the predicted group "
        "at the cut-off fixed on the training sites, the PFS risk group, the share of the saliency map in and around the "
        "tumour), one HTML card per patient in OUT/cards/ (the numbers, and a saliency map over axial, coronal and sagittal "
        "slices through the tumour for every phase) and OUT/index.html. Everything stays at the site.",
        [_model_options("the new patients' manifest CSV (docs/manifest.md)")],
    )  # fmt: skip
    pred.add_argument("--patient", action="append", metavar="ID", help="predict only this patient of the manifest (repeatable)")
    pred.add_argument("--no-saliency", action="store_true", help="skip the saliency maps and the cards (faster)")
    pred.add_argument("--no-cards", action="store_true", help="compute the saliency share but write no HTML cards")
    pred.add_argument("--saliency", choices=("gradient", "gradcam"), default="gradient",
                      help="saliency method: input gradient per phase, or Grad-CAM at the backbone's last stage (default %(default)s)")  # fmt: skip
    tune = command(
        sub, "finetune", cmd_finetune, "adapt a study's model to this site's own data and compare it with the global model",
        "Fine-tune a finished study's exported model on this site's training split (the fusion head; with --last-stage also "
        "the last stage of the DLTR backbone) and evaluate the global and the fine-tuned model on its validation split: AUC "
        "side by side. Writes OUT/finetune.json and the fine-tuned model OUT/tace-model-finetuned.zip (usable with "
        "`tace-client predict`). Nothing leaves the site.",
        [_model_options("the site's manifest, with train and val splits and responses"), shared_options("seed")],
    )  # fmt: skip
    tune.add_argument("--last-stage", action="store_true", help="also adapt the last stage of the DLTR backbone (slower)")
    tune.add_argument("--epochs", type=int, help="passes over the training split (default: 20 for the head, 5 with --last-stage)")
    tune.add_argument("--lr", type=float, help="learning rate (default: the study's head-lr, or its lr with --last-stage)")


def _model_options(manifest_help: str) -> argparse.ArgumentParser:
    """The options of the commands that apply a study's exported model to a site's patients."""
    parser = shared_options("manifest", "cache", "device", manifest=manifest_help, cache="preprocessing cache folder (default: OUT/cache)")
    parser.add_argument("--model", type=Path, required=True, help="the exported model (tace-model.zip) or a finished run folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    return parser


def _deployment_commands(sub: Any) -> None:
    """keygen and start: joining a study across hospitals."""
    keygen = command(
        sub, "keygen", cmd_keygen, "create the site's key pair for joining a study (send the .pub file to the coordinator)",
        "Create the site's authentication key pair (ECDSA P-384, OpenSSH format): SITE.key stays at the site, readable by its "
        "owner only; SITE.pub goes to the coordinator, who registers it with `tace-server sites add`.",
    )  # fmt: skip
    keygen.add_argument("--site", required=True, help="the site's id (as in site.toml)")
    keygen.add_argument("--out", type=Path, default=Path("."), help="folder for SITE.key and SITE.pub (default: the current folder)")
    start = command(
        sub, "start", cmd_start, "join the study: validate the data, then connect to the coordinator and train when asked",
        "Read site.toml (deploy/site.toml is the template), validate the manifest and the certificates, then connect to the "
        "coordinator with TLS and the site's key and take part in the study's rounds. Reconnects after network interruptions; "
        "runs until stopped (Ctrl-C, SIGTERM). Images never leave the site.",
    )  # fmt: skip
    start.add_argument("--config", type=Path, required=True, help="the site's configuration (site.toml)")
    start.add_argument("--quiet", action="store_true", help="do not echo the connection's log (it is always in OUTPUT/logs/client.log)")


def add_preprocess_options(parser: argparse.ArgumentParser) -> None:
    d = PreprocessConfig()
    parser.add_argument(
        "--spacing", type=triple(float), default=d.spacing_mm, metavar="X,Y,Z", help=f"box voxel spacing in mm (default {d.spacing_mm})"
    )
    parser.add_argument(
        "--box", type=triple(int), default=d.box_voxels, metavar="X,Y,Z", help=f"box size in voxels (default {d.box_voxels})"
    )
    parser.add_argument("--sequences", default=",".join(d.sequences), help="sequences stacked as channels (default %(default)s)")
    parser.add_argument(
        "--large-tumour",
        choices=("crop", "rescale"),
        default=d.large_tumour,
        help="tumours larger than the box: crop at the edge or shrink to fit (default %(default)s)",
    )
    parser.add_argument(
        "--intensity-reference",
        choices=INTENSITY_REFERENCES,
        default=d.intensity_reference,
        help="express each phase against the liver around the tumour, or z-score it over the box (default %(default)s; "
        "the study's run configuration decides: use the same as the coordinator)",
    )


def preprocess_config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    return PreprocessConfig(
        sequences=tuple(s.strip() for s in args.sequences.split(",") if s.strip()),
        spacing_mm=args.spacing, box_voxels=args.box, large_tumour=args.large_tumour,
        intensity_reference=args.intensity_reference,
    )  # fmt: skip


def print_report(report: CheckReport) -> None:
    if report.ok:
        print(f"OK: {report.manifest} ({report.n_rows} rows) passed all checks")
        if report.summary is not None:
            print(report.summary.format())
        return
    print(f"{len(report.problems)} problem(s) in {report.manifest} ({report.n_rows} rows):", file=sys.stderr)
    for p in report.problems:
        print("  " + p.format().replace("\n", "\n  "), file=sys.stderr)
    kinds: dict[str, int] = {}
    for p in report.problems:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    print("by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())), file=sys.stderr)
    print("Fix the rows or files listed and run the check again; see docs/manifest.md for every column.", file=sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    if args.json and not (args.json.parent.is_dir() and os.access(args.json.parent, os.W_OK)):
        raise TaceError(
            f"cannot write the JSON report to {args.json}: its folder does not exist or is not writable", "choose another --json path"
        )
    report = check_site(args.manifest, deep=args.deep, progress=lambda rs: progress(rs, desc="checking", unit="patient"))
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2))
    return EXIT_OK if report.ok else EXIT_PROBLEMS


def cmd_preprocess(args: argparse.Namespace) -> int:
    from tace.client.cache import PreprocessCache

    config = preprocess_config_from_args(args)
    manifest = parse_manifest(args.manifest)
    if not _check_or_report(manifest, "Nothing was preprocessed"):
        return EXIT_PROBLEMS
    cache = PreprocessCache(args.cache, config)
    hits = cropped = 0
    failed: list[Problem] = []
    start = time.perf_counter()
    for record in progress(manifest.records, desc="preprocessing", unit="patient"):
        try:
            result = cache.prepare(record, manifest.root)  # with the radiomics features: the study's first stage need not wait
        except ImageReadError as exc:
            failed.append(exc.problem(record.row))
            continue
        hits += result.hit
        cropped += result.info.cropped
    elapsed = time.perf_counter() - start
    n = len(manifest.records) - len(failed)
    print(f"preprocessed {n} patients (tensors and radiomics features) into {args.cache} in {elapsed:.1f} s: {n - hits} computed, "
          f"{hits} already cached")  # fmt: skip
    print(f"tensor shape (C, D, H, W) = {config.shape}")
    if cropped:
        hint = "; use --large-tumour rescale to shrink them instead" if config.large_tumour == "crop" else ""
        print(f"{cropped} tumour(s) larger than the box were cut at its edge{hint}")
    if failed:
        print(f"{len(failed)} patient(s) could not be preprocessed:", file=sys.stderr)
        for p in failed:
            print("  " + p.format().replace("\n", "\n  "), file=sys.stderr)
        return EXIT_PROBLEMS
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    import re

    from tace.client.pacsimport import check_images, import_export, report, write_report
    from tace.client.phaserules import load_rules

    rules = load_rules(args.rules)
    prefix = args.prefix if args.prefix is not None else (re.sub(r"[^A-Za-z0-9._-]", "", args.out.resolve().name) or "P") + "-"
    result = import_export(args.dicom_root, args.out, rules, convert=not args.no_convert, clinical=args.clinical,
                           pseudonyms=args.pseudonyms, prefix=prefix, keep_patient_id=args.keep_patient_id, force=args.force,
                           progress=progress)  # fmt: skip
    data = report(result, args.rules, args.dicom_root)
    _, html = write_report(data, args.out)
    print(f"read {data['files']} files ({data['skipped_files']} skipped: not DICOM, a DICOMDIR or without a series): {data['n_series']} series of {data['n_patients']} patients "
          f"in {sum(data['seconds'].values()):.1f} s ({data['series_per_s']} series/s, {data['patients_per_s']} patients/s)")  # fmt: skip
    found = ", ".join(
        f"{c} {n}" for c, n in data["phases_found"].items() if n or c in ("arterial_path", "portal_venous_path", "delayed_path")
    )
    print(f"phases found per column (of {data['n_patients']}): {found}; masks {data['masks_found']}")
    for p in data["incomplete"]:
        print(f"  row {p['row']}: " + "; ".join(f"{c} {why.split(':')[0]}" for c, why in p["problems"].items()))
    print(
        f"wrote {result.manifest} (draft), {html} (every series and why), pseudonym key {args.out / 'pseudonyms.csv'} (keep it at the site)"
    )
    parsed = parse_manifest(result.manifest)
    check = check_site(parsed, progress=lambda rs: progress(rs, desc="checking", unit="patient"))
    check.problems += check_images(result, {r.row for r in parsed.records})  # rows whose clinical cells are still empty
    check.problems.sort(key=lambda p: p.row or 0)
    (args.out / "check-report.json").write_text(json.dumps(check.to_dict(), indent=2))
    if check.ok:
        print("tace-client check: OK")
        return EXIT_OK
    counts: dict[tuple[str, str], int] = {}
    for p in check.problems:
        counts[(p.kind, p.column or "")] = counts.get((p.kind, p.column or ""), 0) + 1
    print(f"tace-client check: {len(check.problems)} cell(s) or file(s) to see to before the manifest is complete:", file=sys.stderr)
    for (kind, column), n in sorted(counts.items()):
        print(f"  {n} x {kind}" + (f" in {column}" if column else ""), file=sys.stderr)
    print(f"  the full list: tace-client check --manifest {result.manifest} (also in {args.out / 'check-report.json'})", file=sys.stderr)
    return EXIT_PROBLEMS


def cmd_features(args: argparse.Namespace) -> int:
    from tace.client.features import extract_features, write_features
    from tace.common.artifact import TrainedModels

    trained = TrainedModels.load(args.run)  # a wrong run folder fails before the images are read
    if not _check_or_report(args.manifest, "No features were extracted"):
        return EXIT_PROBLEMS
    start = time.perf_counter()
    cache = args.cache or args.out.parent / "cache"
    table = extract_features(trained, args.manifest, cache, device=args.device, validate=False)
    path = write_features(table, args.out)
    n_feat = sum(c.startswith("feature_") for c in table.columns)
    print(f"wrote {path}: {len(table)} patients, 3 model scores and {n_feat} deep features, in {time.perf_counter() - start:.1f} s")
    return EXIT_OK


def _check_or_report(manifest: Path | Manifest, what: str) -> bool:
    """`tace-client check` before a command's work: False (with the problems listed and `what` did not happen) when
    anything is wrong."""
    report = check_site(manifest, progress=lambda rs: progress(rs, desc="checking", unit="patient"))
    if not report.ok:
        print_report(report)
        print(f"{what}: fix the problems above first.", file=sys.stderr)
    return report.ok


def cmd_predict(args: argparse.Namespace) -> int:
    from tace.client.predict import PredictOptions, predict
    from tace.common.artifact import TrainedModels

    trained = TrainedModels.load(args.model)  # an incompatible or damaged model fails before the images are read
    if not _check_or_report(args.manifest, "No prediction was made"):
        return EXIT_PROBLEMS
    options = PredictOptions(args.device, saliency=not args.no_saliency, cards=not (args.no_saliency or args.no_cards), method=args.saliency,
                             validate=False, patients=args.patient)  # fmt: skip
    result = predict(trained, args.manifest, args.out, args.cache or args.out / "cache", options, progress)
    table = result.table
    groups = table["predicted_group"].value_counts().to_dict()
    print(f"predicted {len(table)} patients in {result.seconds['total']:.1f} s ({result.patients_per_second:.2f} patients/s): "
          + ", ".join(f"{n} {g}" for g, n in sorted(groups.items())))  # fmt: skip
    if "saliency_in_tumour" in table:
        print(f"saliency in and around the tumour: median {table['saliency_in_tumour'].median():.2f} of each map "
              f"(the region is a median {table['saliency_chance'].median():.2f} of the box)")  # fmt: skip
    print(
        f"wrote {result.csv}"
        + (f", {len(result.cards)} cards in {args.out / 'cards'} (open {args.out / 'index.html'})" if result.cards else "")
    )
    return EXIT_OK


def cmd_finetune(args: argparse.Namespace) -> int:
    from tace.client.finetune import FinetuneOptions, finetune_site
    from tace.common.artifact import TrainedModels

    trained = TrainedModels.load(args.model)
    if not _check_or_report(args.manifest, "Nothing was fine-tuned"):
        return EXIT_PROBLEMS
    options = FinetuneOptions("last-stage" if args.last_stage else "head", args.epochs or 0, args.lr or 0.0, args.seed, args.device)
    result = finetune_site(trained, args.manifest, args.out, args.cache or args.out / "cache", options)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"fine-tuned {result.mode} for {result.epochs} epochs on {result.n_train} training patients in {result.seconds:.1f} s")
    print(
        f"validation split ({result.n_val} patients): DLTRMLP AUC global {fmt(result.global_auc)}, fine-tuned {fmt(result.finetuned_auc)}"
    )
    print(f"wrote {args.out / 'finetune.json'} and {args.out / 'tace-model-finetuned.zip'}")
    return EXIT_OK


def cmd_keygen(args: argparse.Namespace) -> int:
    from tace.common import pki
    from tace.common.config import check_site_id

    private, public, info = pki.generate_site_key(args.out, check_site_id(args.site))
    print(f"private key (keep at the site, never send): {private}")
    print(f"public key (send to the coordinator):       {public}")
    print(f"fingerprint: {info.fingerprint}  (the coordinator sees the same when registering it; compare by phone)")
    return EXIT_OK


def cmd_start(args: argparse.Namespace) -> int:
    from tace.client.deploy import SiteSettings, preflight, run_site

    settings = SiteSettings.read(args.config)
    from tace.client.deploy import probe

    for line in preflight(settings):
        print(line, flush=True)
    print(probe(settings), flush=True)
    print(f"site {settings.site_id}: connecting to {settings.address} (log: {settings.output / 'logs' / 'client.log'})", flush=True)
    return run_site(settings, echo=not args.quiet)


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
