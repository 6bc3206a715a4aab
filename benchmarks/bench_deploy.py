"""A deployment on 127.0.0.1 (`tace-server start` + three `tace-client start`, TLS and site authentication) against
the same study in Flower's simulation engine, on the tiny cohort (two training sites, one holdout site).

Prints:
1. per-round wall time of each stage, deployment vs simulation, and the ratio;
2. the start-up cost of one ClientApp process (Flower starts one per message): Flower's own start-up plus the
   imports of TACE-FL's ClientApp, measured in fresh interpreters;
3. what travels per training site per round (weights down and up, plus the validation round trip) vs the size of
   the model, from the arrays actually exchanged.

Usage: python benchmarks/bench_deploy.py [--rounds 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def startup_seconds(code: str, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def per_round(summary: dict, rounds: int) -> dict[str, float]:
    t = summary["timings"]
    return {stage: round(t[f"{stage}_s"] / rounds, 2) for stage in ("dltr", "head", "clinical")}


def deploy(work: Path, cohort: Path, overrides: dict[str, str]) -> dict:
    port = free_port()
    study = work / "study"
    subprocess.run([BIN / "tace-server", "init", study, "--host", "localhost", "--port", str(port), "--expected-sites", "3"],
                   check=True, capture_output=True)  # fmt: skip
    config = study / "run_config.toml"
    lines = [f"{ln.split(' = ')[0]} = {overrides[ln.split(' = ')[0]]}" if ln.split(" = ")[0] in overrides else ln
             for ln in config.read_text().splitlines()]  # fmt: skip
    config.write_text("\n".join(lines) + "\n")
    procs = []
    for site in ("site-a", "site-b", "site-c"):
        subprocess.run([BIN / "tace-client", "keygen", "--site", site, "--out", work / "keys"], check=True, capture_output=True)
        subprocess.run([BIN / "tace-server", "sites", "add", site, work / "keys" / f"{site}.pub", "--study", study], check=True,
                       capture_output=True)  # fmt: skip
        (work / f"{site}.toml").write_text(
            f'[site]\nid = "{site}"\nmanifest = "{cohort / "sites" / site / "manifest.csv"}"\ncache = "{work / site / "cache"}"\n'
            f'output = "{work / site / "out"}"\n[coordinator]\naddress = "localhost:{port}"\nca-certificate = "{study / "pki" / "ca.crt"}"\n'
            f'[auth]\nprivate-key = "{work / "keys" / f"{site}.key"}"\n[compute]\ndevice = "cpu"\nthreads = 1\nruntime-port = {free_port()}\n'
        )  # fmt: skip
    start = time.perf_counter()
    server = subprocess.Popen([BIN / "tace-server", "start", "--study", study], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True)  # fmt: skip
    for site in ("site-a", "site-b", "site-c"):
        procs.append(subprocess.Popen([BIN / "tace-client", "start", "--config", work / f"{site}.toml", "--quiet"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
    try:
        if server.wait(timeout=3600) != 0:
            raise SystemExit(f"the deployment run failed; see {study / 'logs'}")
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=30)
    run = sorted((study / "runs").iterdir())[-1]
    summary = json.loads((run / "summary.json").read_text())
    summary["timings"]["wall_s"] = round(time.perf_counter() - start, 1)
    return summary


def payload(overrides: dict[str, str]) -> dict[str, float]:
    """Bytes of weights per training site per round, from the arrays the ServerApp and ClientApp exchange."""
    from tace.common.clinical import FEATURES
    from tace.common.config import RunConfig
    from tace.common.models import StudyModels

    run = RunConfig.from_run_config({k: json.loads(v) if v.startswith('"') else v for k, v in overrides.items()})
    arrays = StudyModels.build(run.backbone, len(run.preprocess.sequences), len(FEATURES)).arrays()
    size = {stage: sum(v.nbytes for v in a.values()) for stage, a in arrays.items()}
    sent = {"dltr": ("dltr",), "head": ("dltr", "head"), "clinical": ("clinical",)}
    out: dict[str, float] = {"model_kb": round(sum(size.values()) / 1e3, 1)}
    for stage, parts in sent.items():
        # One train message per round: the stage's inputs go down (the site validates them, then trains from
        # them) and the stage's weights come up; the last round adds one evaluate message (weights down).
        out[f"{stage}_kb_down_per_round"] = round(sum(size[p] for p in parts) / 1e3, 1)
        out[f"{stage}_kb_up_per_round"] = round(size[stage] / 1e3, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from tace.simulation.cli import study_config
    from tace.simulation.cohort import generate_cohort, make_preset
    from tace.simulation.runner import run_federated

    work = args.out or Path(tempfile.mkdtemp(prefix="tace-deploy-"))
    r = str(args.rounds)
    overrides = {"holdout-sites": '"site-c"', "rounds": r, "head-rounds": r, "clinical-rounds": r, "patience": "0", "box-voxels": '"16,16,8"',
                 "spacing-mm": '"4,4,4"', "hist-bins": "50", "analysis-bins": "1000", "threads": "1"}  # fmt: skip
    try:
        cohort = work / "cohort"
        generate_cohort(cohort, make_preset("tiny", n_sites=4), seed=3)
        meta = json.loads((cohort / "cohort.json").read_text())
        meta["sites"] = meta["sites"][:3]  # the simulation runs the same three sites as the deployment
        (cohort / "cohort.json").write_text(json.dumps(meta))
        sim_config = study_config(cohort, " ".join(f"{k}={v}" for k, v in overrides.items()))
        t = time.perf_counter()
        sim = run_federated(cohort, work / "sim", sim_config)
        sim_wall = time.perf_counter() - t
        dep = deploy(work / "deploy", cohort, overrides)
        sim_round, dep_round = per_round(sim, args.rounds), per_round(dep, args.rounds)
        flower = startup_seconds("import flwr.supernode.cli.flwr_clientapp, flwr.app, flwr.clientapp")
        ours = startup_seconds("import flwr.supernode.cli.flwr_clientapp, flwr.app, flwr.clientapp, tace.client.app")
        torch_s = startup_seconds("import flwr.supernode.cli.flwr_clientapp, flwr.app, flwr.clientapp, torch") - flower
        figures = {
            "rounds_per_stage": args.rounds,
            "simulation_s_per_round": sim_round,
            "deployment_s_per_round": dep_round,
            "ratio_deployment_over_simulation": {s: round(dep_round[s] / sim_round[s], 2) for s in sim_round},
            "added_s_per_round": {s: round(dep_round[s] - sim_round[s], 2) for s in sim_round},
            "clientapp_process_startup_s": {
                "flower_alone": round(flower, 2),
                "torch": round(torch_s, 2),
                "with_tace_clientapp": round(ours, 2),
            },
            "messages_per_training_site": "1 per round, +1 evaluate after each stage's last round",
            "clientapp_own_import_s": round(ours - flower - torch_s, 2),
            "wall_s": {"simulation": round(sim_wall, 1), "deployment": dep["timings"]["wall_s"]},
            "payload": payload(overrides),
        }
        print(json.dumps(figures, indent=2))
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
