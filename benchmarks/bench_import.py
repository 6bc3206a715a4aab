"""Benchmark of `tace-client import`: header reading, phase naming and writing on a generated PACS export.

Usage:
    python benchmarks/bench_import.py [--patients 50] [--out DIR]

Generates one demo-preset centre (112 x 112 x 36 voxels per phase) with `--patients` patients, writes it as a PACS
export (`tace.simulation.pacs.export_site`: localiser, pre-contrast, three phases or one dynamic series, subtraction,
T2, DWI, SEG or RTSTRUCT per study), then times the import with NIfTI conversion and with --no-convert (links), and
the check that follows. Prints series/s, patients/s and files/s and writes DIR/bench_import.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

from tace.client.pacsimport import check_images, import_export, report
from tace.client.phaserules import load_rules
from tace.common.validate import check_site
from tace.simulation.cohort import generate_cohort, make_preset
from tace.simulation.pacs import export_site


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=50)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="tace-bench-import-"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    generate_cohort(out / "cohort", make_preset("demo", n_sites=1, patients_per_site=args.patients), seed=11, overwrite=True)
    generated = time.perf_counter()
    export = export_site(out / "cohort" / "sites" / "site-a" / "manifest.csv", out / "export", seed=11, missing_phase={3: "delayed"})
    exported = time.perf_counter()
    figures: dict[str, object] = {
        "patients": len(export.patients), "series": export.n_series, "files": export.n_files,
        "generate_s": round(generated - start, 1), "export_s": round(exported - generated, 1), "python": platform.python_version(),
    }  # fmt: skip
    rules = load_rules()
    for mode, convert in (("nifti", True), ("links", False)):
        site = out / f"site-{mode}"
        shutil.rmtree(site, ignore_errors=True)
        t0 = time.perf_counter()
        result = import_export(out / "export", site, rules, convert=convert)
        t1 = time.perf_counter()
        data = report(result, None, out / "export")
        check = check_site(result.manifest)
        images = check_images(result, set())  # every image of the draft, as the command checks them
        t2 = time.perf_counter()
        figures[mode] = {
            "import_s": round(t1 - t0, 2), "header_scan_s": round(result.seconds["scan_s"], 2), "write_s": round(result.seconds["write_s"], 2),
            "series_per_s": round(len(result.series) / (t1 - t0), 1), "patients_per_s": round(len(result.patients) / (t1 - t0), 2),
            "files_per_s_headers": round(result.n_files / result.seconds["scan_s"], 0), "check_s": round(t2 - t1, 2),
            "incomplete_patients": data["n_incomplete"], "phases_found": data["phases_found"], "masks_found": data["masks_found"],
            "check_problems": len(check.problems), "image_problems": len(images),
        }  # fmt: skip
    print(json.dumps(figures, indent=2))
    (out / "bench_import.json").write_text(json.dumps(figures, indent=2))
    print(f"written to {out / 'bench_import.json'}")


if __name__ == "__main__":
    main()
