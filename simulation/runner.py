"""Single-machine runs of the study: federated through Flower's simulation engine, or the in-process references.

`flwr run` expects an app folder with a pyproject.toml, which an installed package does not have. The runner
writes one into the run folder (``.flwr-app/``) naming the installed ServerApp and ClientApp, with the run
configuration as ``[tool.flwr.app.config]``; Flower bundles it and imports the apps from the installed `tace`
package. It sets ``FLWR_HOME`` to the run folder, starts ``flwr run`` (which starts a local SuperLink), shows
progress per round, and stops the SuperLink and its children afterwards, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from tace.common.config import RunConfig, SiteConfig
from tace.common.errors import TaceError
from tace.common.launch import flower_env, flower_executable, free_port, processes, write_app
from tace.common.protocol import MODELS


def _stop_superlink(flwr_home: Path) -> None:
    """Stop the local SuperLink `flwr run` started for this FLWR_HOME (it outlives the run otherwise)."""
    marker = str(flwr_home / "local-superlink")
    for proc in processes():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "flower-superlink" in cmdline and marker in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGTERM)
    time.sleep(0.5)


class MemorySampler:
    """Peak summed resident memory of every process of one run (found by its FLWR_HOME in their environment):
    the CLI, SuperLink, SuperExec, Ray and the ClientApp workers. Linux only (reads /proc)."""

    def __init__(self, marker: str, interval_s: float = 0.5) -> None:
        self.marker = f"FLWR_HOME={marker}".encode()
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def sample(self) -> float:
        total = 0
        for proc in processes():
            try:
                if self.marker not in (proc / "environ").read_bytes():
                    continue
                for line in (proc / "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                continue
        return total / 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.sample())
            self._stop.wait(self.interval_s)


def run_federated(
    cohort: Path, out: Path, run: RunConfig, on_line: Callable[[str], None] | None = None, timeout_s: float | None = None
) -> dict[str, Any]:
    """Run the study federated in Flower's simulation engine (one supernode per site, Ray backend).

    Returns the run's summary; raises `TaceError` with the tail of the log when the run fails.
    """
    sites = json.loads((cohort / "cohort.json").read_text())["sites"]
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = _with_paths(run, cohort, out)
    app = write_app(out / ".flwr-app", run)
    flwr_home = out / ".flwr"
    # Flower's local SuperLink listens on a fixed port by default: two simulations on one machine would share it (the
    # second run lands in the first's SuperLink and dies with it). Each run gets its own ports.
    ports = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    env = flower_env(flwr_home, ports)
    flwr = flower_executable("flwr", env)
    ray_cpus, cpus = simulation_cpus(training_sites(sites, run), run.threads, os.cpu_count() or 1)
    cmd = [str(flwr), "run", str(app), "--stream",
           "--federation-config", f"num-supernodes={len(sites)} client-resources-num-cpus={cpus} "
           f"client-resources-num-gpus={_gpus_per_client(len(sites))} init-args-num-cpus={ray_cpus}"]  # fmt: skip
    log_path = out / "flower.log"
    summary_path = out / "summary.json"
    if summary_path.exists():
        summary_path.unlink()
    start = time.monotonic()
    sampler = MemorySampler(str(flwr_home))
    proc: subprocess.Popen[str] | None = None
    try:
        with sampler, open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=out)
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if on_line:
                    on_line(line.rstrip("\n"))
                if timeout_s and time.monotonic() - start > timeout_s:
                    proc.kill()
                    raise TaceError(f"the federated run took longer than {timeout_s:.0f} s and was stopped", f"see {log_path}")
            proc.wait()
    finally:
        if proc is not None and proc.poll() is None:  # we are leaving early (error, Ctrl-C): stop the CLI too
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
        _stop_superlink(flwr_home)
    error_path = out / "error.txt"
    if not summary_path.exists() and error_path.exists():
        raise TaceError(error_path.read_text(encoding="utf-8").rstrip(), f"the whole log is {log_path}")
    if not summary_path.exists():
        tail = "\n".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
        code = proc.returncode if proc is not None else None
        raise TaceError(f"the federated run did not finish (exit status {code}); last lines of {log_path}:\n{tail}",
                        "the lines above say what failed; fix it and run again")  # fmt: skip
    summary = json.loads(summary_path.read_text())
    summary.setdefault("timings", {})["wall_s"] = round(time.monotonic() - start, 3)
    summary["timings"]["peak_rss_mb"] = round(sampler.peak_mb, 1)
    return summary


def simulation_cpus(n_train: int, threads: int, cores: int) -> tuple[int, int]:
    """(CPUs Ray is told it has, CPUs per ClientApp worker) for a simulation whose training rounds ask `n_train`
    sites, each training with `threads` PyTorch threads, on a machine with `cores` CPUs.

    Ray runs as many ClientApp workers as the first divided by the second. One worker per core (`cores // threads`)
    leaves a round waiting for a free worker when there are a few more training sites than workers: 3 sites on 2
    workers take two site-times per round where the cores could do it in 1.5. With up to twice as many training
    sites as cores, every training site gets its own worker (Ray's CPU count is a logical resource: the operating
    system shares the cores among them) and a round takes as long as the cores need. Beyond that the waves of
    sites are nearly even, and more workers would only add a process (about 0.5 GB) each."""
    per = max(1, threads)
    workers = max(1, cores // per)
    if workers < n_train <= 2 * workers:
        workers = n_train
    return workers * per, per


def training_sites(sites: list[dict[str, Any]], run: RunConfig) -> int:
    """How many sites a training round asks: every site in leave-one-centre-out folds but the one held out."""
    ids = [s["site_id"] for s in sites]
    if run.layout == "loco":
        return max(1, len(ids) - 1)
    return max(1, len([i for i in ids if i not in run.holdout]))


def _gpus_per_client(n_sites: int) -> float:
    try:
        import torch

        if torch.cuda.is_available():
            return round(torch.cuda.device_count() / n_sites, 3)
    except ImportError:  # pragma: no cover
        pass
    return 0.0


def _with_paths(run: RunConfig, cohort: Path, out: Path) -> RunConfig:
    return replace(run, cohort=str(cohort.resolve()), run_dir=str(out.resolve()))


def site_tasks(cohort: Path, run: RunConfig) -> list[Any]:
    """SiteTasks for every site of a cohort, roles from `run.holdout`; each site validates its data first."""
    from tace.client.task import SiteTask
    from tace.simulation.inprocess import check_holdout

    sites = json.loads((cohort / "cohort.json").read_text())["sites"]
    check_holdout(run.holdout, [s["site_id"] for s in sites])
    tasks = []
    for i, s in enumerate(sites):
        config = SiteConfig.from_node_config({"partition-id": i}, run)
        tasks.append(SiteTask(config, run, "holdout" if s["site_id"] in run.holdout else "train", validate=True))
    return tasks


def run_reference(mode: str, cohort: Path, out: Path, run: RunConfig, on_round: Callable[..., None] | None = None) -> dict[str, Any]:
    """The centralised (pooled) or local-only reference, in this process, with the same model and training code."""
    from tace.common.pretrained import initial_arrays
    from tace.server.rundir import RunDir
    from tace.server.workflow import run_layouts
    from tace.simulation.inprocess import InProcessFederation

    out = out.resolve()
    if run.dp or run.secagg:
        raise TaceError(
            f"the {mode} reference runs without sites exchanging anything: differential privacy and secure aggregation "
            "apply to federated runs",
            "run it with dp=false secagg=false, or use --mode federated",
        )
    # The references are plain (pooled or site-alone) training: no FedProx term, whatever the federated run uses.
    run = replace(_with_paths(run, cohort, out), strategy="fedavg")
    tasks = site_tasks(cohort, run)
    initial = partial(initial_arrays, run)

    start = time.monotonic()
    rundir = RunDir(out, run.to_run_config(), mode)
    try:
        if mode == "centralized":
            summary = run_layouts(InProcessFederation(tasks, run, pooled=True), run, rundir, initial, mode, on_round)
        elif mode == "local":
            summary = _run_local(tasks, run, rundir, initial, on_round)
        else:
            raise TaceError(f"unknown mode {mode!r}", "valid modes: federated, centralized, local")
    finally:
        rundir.close()
    summary.setdefault("timings", {})["wall_s"] = round(time.monotonic() - start, 3)
    rundir.write_json("summary.json", summary)
    return summary


def _run_local(tasks: list[Any], run: RunConfig, rundir: Any, initial: Any, on_round: Any) -> dict[str, Any]:
    """Each training site trains alone; its model is evaluated on its own validation split and on every holdout
    site. A holdout site's AUC is the mean over the local models (each model's AUC is listed too)."""
    from tace.server.reporting import save_models, summarise
    from tace.server.rundir import RunDir
    from tace.server.workflow import run_study
    from tace.simulation.inprocess import InProcessFederation

    train = [t for t in tasks if t.role == "train"]
    holdout = [t for t in tasks if t.role == "holdout"]
    per_site: dict[str, Any] = {}
    for t in train:
        sub = RunDir(rundir.path / "local" / t.site.site_id, run.to_run_config(), "local")
        try:
            fed = InProcessFederation([t, *holdout], run, pooled=True)
            # A single site's val split may hold one class: then its local model keeps its last round.
            result = run_study(fed, run, sub, initial, on_round, tag=f"local-{t.site.site_id}", require_both_classes=False)
            save_models(sub, result, run)
        finally:
            sub.close()
        per_site[t.site.site_id] = summarise([result], "local", "holdout")
    models: dict[str, Any] = {}
    for model in MODELS:
        sites: dict[str, Any] = {}
        for t in train:
            sites[t.site.site_id] = per_site[t.site.site_id]["models"][model]["sites"][t.site.site_id]
        for h in holdout:
            entries = {s: per_site[s]["models"][model]["sites"][h.site.site_id] for s in per_site}
            aucs = [e["auc"] for e in entries.values() if e["auc"] is not None]
            first = next(iter(entries.values()))
            sites[h.site.site_id] = {"role": "holdout", "auc": sum(aucs) / len(aucs) if aucs else None, "n": first["n"], "n_pos": first["n_pos"],
                                     "auc_per_local_model": {s: e["auc"] for s, e in entries.items()}}  # fmt: skip
        models[model] = {"sites": sites, "pooled_internal_auc": None, "pooled_holdout_auc": None}
    timings: dict[str, float] = {}
    for s in per_site.values():
        for k, v in s["timings"].items():
            timings[k] = round(timings.get(k, 0.0) + v, 3)
    return {"mode": "local", "layout": "holdout", "backbone": run.backbone, "models": models, "timings": timings}


def add_oracle(summary: dict[str, Any], cohort: Path) -> dict[str, Any]:
    """Add the generator's oracle AUCs (synthetic cohorts only) for comparison; training never reads them."""
    truth = cohort / "ground_truth" / "truth.json"
    if truth.exists():
        sites = json.loads(truth.read_text())["oracle"]["sites"]
        keys = ("auc", "auc_image", "auc_clinical")
        summary["oracle"] = {"sites": {s: {k: v[k] for k in keys if k in v} for s, v in sites.items()}}
    return summary
