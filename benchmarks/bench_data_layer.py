"""Benchmark of the site data layer: cohort generation, preprocessing cold vs cached, peak memory.

Usage:
    python benchmarks/bench_data_layer.py [--out DIR] [--cohort EXISTING_DIR] [--patients-per-site N] [--workers N]
                                          [--baseline REV]

Prints the figures and writes them as JSON to DIR/bench_data_layer.json. With no --patients-per-site it times the
full demo preset (about 700 patients with the radiogenomics cohort). With --baseline REV it also generates the same
preset with the generator of git revision REV (its simulation/phantom.py and cohort.py) in the same run, and prints
the speed ratio and both generators' peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from tace.client.cache import PreprocessCache
from tace.common.manifest import parse_manifest
from tace.common.preprocess import PreprocessConfig
from tace.simulation.cohort import default_workers, generate_cohort

ROOT = Path(__file__).resolve().parents[1]


def baseline_generator(rev: str) -> ModuleType:
    """The cohort module of git revision `rev`, importable beside today's (its phantom import redirected)."""
    folder = Path(tempfile.mkdtemp(prefix="tace-baseline-"))
    for name in ("phantom", "cohort"):
        text = subprocess.run(["git", "show", f"{rev}:simulation/{name}.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        (folder / f"_baseline_{name}.py").write_text(text.replace("from tace.simulation.phantom import", "from _baseline_phantom import"))
    sys.path.insert(0, str(folder))  # worker processes are forked: they inherit it
    import _baseline_cohort  # type: ignore[import-not-found]

    return _baseline_cohort


class PeakMemory:
    """Peak summed resident memory (MiB) of this process and its children (the rendering workers), sampled."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.peak_mb, self.interval_s = 0.0, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = str(os.getpid())
        while not self._stop.is_set():
            total = 0
            for proc in Path("/proc").iterdir():
                try:
                    if proc.name == me or (proc.name.isdigit() and (proc / "stat").read_text().rsplit(")", 1)[1].split()[1] == me):
                        total += int(
                            next(line for line in (proc / "status").read_text().splitlines() if line.startswith("VmRSS:")).split()[1]
                        )
                except (OSError, IndexError, StopIteration):
                    continue
            self.peak_mb = max(self.peak_mb, total / 1024)
            self._stop.wait(self.interval_s)


def timed_generation(module: Any, out: Path, patients_per_site: int | None, workers: int) -> dict[str, Any]:
    """Generate the demo preset with `module`'s generator; wall and CPU time, patients, size, peak memory."""
    if out.exists():
        shutil.rmtree(out)
    preset = module.make_preset("demo", patients_per_site=patients_per_site)
    start, cpu = time.perf_counter(), time.process_time()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    with PeakMemory() as memory:
        result = module.generate_cohort(out, preset, seed=0, workers=workers)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    n = sum(result.sites.values()) + preset.n_radiogenomics + preset.n_unmatched[0]
    return {"s": round(elapsed, 1), "cpu_s": round(time.process_time() - cpu + after.ru_utime - children.ru_utime + after.ru_stime - children.ru_stime, 1),
            "patients": n, "patients_per_s": round(n / elapsed, 2), "peak_mb": round(memory.peak_mb),
            "size_mb": round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20, 1)}  # fmt: skip


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
    parser.add_argument("--baseline", metavar="REV", help="also time the generator of this git revision, in the same run")
    args = parser.parse_args()

    work = args.out or Path(tempfile.mkdtemp(prefix="tace-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    figures: dict[str, object] = {"machine": f"{platform.machine()}, {platform.python_version()}", "workers": args.workers}
    try:
        if args.cohort:
            cohort = args.cohort
        else:
            cohort = work / "cohort"
            if args.baseline:
                base = timed_generation(baseline_generator(args.baseline), work / "baseline-cohort", args.patients_per_site, args.workers)
                figures.update({f"baseline_generation_{k}": v for k, v in base.items()})
                shutil.rmtree(work / "baseline-cohort")
            ours = timed_generation(sys.modules[generate_cohort.__module__], cohort, args.patients_per_site, args.workers)
            figures.update({f"generation_{k}": v for k, v in ours.items()})
            if args.baseline:
                figures["generation_speedup_vs_baseline"] = round(figures["baseline_generation_s"] / ours["s"], 2)  # type: ignore[operator]

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
