"""Benchmark of the site data layer: cohort generation, preprocessing cold vs cached, peak memory.

Usage:
    python benchmarks/bench_data_layer.py [--out DIR] [--cohort EXISTING_DIR] [--patients-per-site N] [--workers N]

Prints the figures and writes them as JSON to DIR/bench_data_layer.json. With no --patients-per-site it times the
full demo preset (about 600 patients; a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

from tace.client.cache import PreprocessCache
from tace.common.manifest import parse_manifest
from tace.common.preprocess import PreprocessConfig
from tace.simulation.cohort import default_workers, generate_cohort, make_preset


def peak_rss_mb() -> tuple[float, float]:
    """Peak resident memory (MiB) of this process and of its largest finished child process."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="working folder (default: a temporary folder, removed afterwards)")
    parser.add_argument("--cohort", type=Path, help="reuse an existing demo cohort instead of generating one")
    parser.add_argument("--patients-per-site", type=int, help="smaller cohort for a quick run")
    parser.add_argument("--workers", type=int, default=default_workers())
    args = parser.parse_args()

    work = args.out or Path(tempfile.mkdtemp(prefix="tace-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    figures: dict[str, object] = {"machine": f"{platform.machine()}, {platform.python_version()}", "workers": args.workers}
    try:
        if args.cohort:
            cohort = args.cohort
        else:
            cohort = work / "cohort"
            if cohort.exists():
                shutil.rmtree(cohort)
            preset = make_preset("demo", patients_per_site=args.patients_per_site)
            start = time.perf_counter()
            result = generate_cohort(cohort, preset, seed=0, workers=args.workers)
            elapsed = time.perf_counter() - start
            n = sum(result.sites.values()) + preset.n_radiogenomics + preset.n_unmatched[0]
            figures["generation_s"] = round(elapsed, 1)
            figures["generation_patients"] = n
            figures["generation_patients_per_s"] = round(n / elapsed, 2)
            figures["cohort_size_mb"] = round(sum(f.stat().st_size for f in cohort.rglob("*") if f.is_file()) / 2**20, 1)

        config = PreprocessConfig()
        meta = json.loads((cohort / "cohort.json").read_text())
        manifests = [parse_manifest(cohort / s["manifest"]) for s in meta["sites"]]
        cache_root = work / "cache"
        if cache_root.exists():
            shutil.rmtree(cache_root)
        caches = [PreprocessCache(cache_root / s["site_id"], config) for s in meta["sites"]]
        n_patients = sum(len(m.records) for m in manifests)
        n_volumes = n_patients * (len(config.sequences) + 1)  # phases + mask

        def one_pass() -> tuple[float, int]:
            start = time.perf_counter()
            hits = 0
            for m, cache in zip(manifests, caches, strict=True):
                for r in m.records:
                    hits += cache.load(r, m.root).hit
            return time.perf_counter() - start, hits

        cold_s, cold_hits = one_pass()
        cached_s, cached_hits = one_pass()
        assert cold_hits == 0 and cached_hits == n_patients, (cold_hits, cached_hits)
        figures.update(
            {
                "preprocess_patients": n_patients,
                "preprocess_volumes": n_volumes,
                "tensor_shape": list(config.shape),
                "cold_s": round(cold_s, 2),
                "cold_volumes_per_s": round(n_volumes / cold_s, 1),
                "cold_patients_per_s": round(n_patients / cold_s, 1),
                "cached_s": round(cached_s, 3),
                "cached_volumes_per_s": round(n_volumes / cached_s, 1),
                "cached_patients_per_s": round(n_patients / cached_s, 1),
                "cached_over_cold_speed": round(cold_s / cached_s, 1),
            }
        )
        own, child = peak_rss_mb()
        figures["peak_rss_mb"] = round(own, 1)
        figures["peak_rss_worker_mb"] = round(child, 1)
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key.ljust(width)}  {value}")
    if args.out is not None:
        (work / "bench_data_layer.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
