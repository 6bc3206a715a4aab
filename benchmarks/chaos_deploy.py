"""Chaos drill: a deployment of four sites on 127.0.0.1 (TLS, site keys; three training sites, one holdout) over many
rounds while this script kills and restarts sites at random, pauses one (SIGSTOP/SIGCONT) past the round timeout,
and kills the coordinator twice (SIGKILL of `tace-server start` alone) and resumes it.

Prints (JSON): rounds completed per stage, the training sites left out of each round and why, the faults injected,
the resumes, the coordinator's Flower processes left 10 s after each kill (the parent-death signal must take them
all), whether the final model equals a clean run fed the same updates, and what is left running at the end.

"A clean run fed the same updates" is replayed in this process: the same ServerApp workflow and ClientApp handlers
(no Flower processes, no faults) where each site takes part in exactly the rounds, and validates exactly the
rounds, it took part in and validated during the drill (read from the drill's metrics.csv). Each site's update is a
function of the weights it receives, the round's seed and its place in site order, so the replay's sites send the
same updates; equal final weights then show that the faults, the restarts and the two resumes changed nothing but
who took part when.

Bounded in time (--minutes, default 45: then everything is stopped and the figures so far are printed); loopback
only. Usage: python benchmarks/chaos_deploy.py [--minutes 45] [--seed 0] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
TRAINING = ("site-a", "site-b", "site-c")
SITES = (*TRAINING, "site-d")
ROUND_TIMEOUT = 40


def overrides() -> dict[str, str]:
    from tace.common.config import RunConfig

    out = {"holdout-sites": '"site-d"', "rounds": "6", "head-rounds": "4", "clinical-rounds": "4", "patience": "0", "min-sites": "1",
           "box-voxels": '"16,16,8"', "spacing-mm": '"4,4,4"', "hist-bins": "50", "analysis-bins": "1000", "threads": "1",
           "round-timeout": str(ROUND_TIMEOUT), "join-timeout": "900", "keep-checkpoints": "2"}  # fmt: skip
    known = set(RunConfig.keys())  # a run-config key of another release is left out
    return {k: v for k, v in out.items() if k in known} | ({"radiomics-rounds": "3"} if "radiomics-rounds" in known else {})


def _environ(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def processes_under(folder: Path) -> list[int]:
    """Live processes whose command line or environment names `folder` (everything this drill started)."""
    from tace.common.launch import alive

    marker = str(folder.resolve()).encode()
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and int(p.name) != os.getpid() and (marker in _cmdline(p.name) or marker in _environ(p.name))
            and alive(int(p.name))]  # fmt: skip


class Drill:
    def __init__(self, work: Path, cohort: Path, seed: int, deadline: float) -> None:
        from tace.common import pki
        from tace.common.launch import free_port
        from tace.server.study import Study

        self.work, self.cohort, self.rng, self.deadline = work, cohort, random.Random(seed), deadline
        port = free_port()
        subprocess.run([BIN / "tace-server", "init", work / "study", "--host", "localhost", "--port", str(port), "--expected-sites", "4"],
                       check=True, capture_output=True)  # fmt: skip
        self.study = Study.open(work / "study")
        config = self.study.path / "run_config.toml"
        values = overrides()
        lines = [f"{ln.split(' = ')[0]} = {values[ln.split(' = ')[0]]}" if ln.split(" = ")[0] in values else ln
                 for ln in config.read_text().splitlines()]  # fmt: skip
        config.write_text("\n".join(lines) + "\n")
        for site in SITES:
            pki.generate_site_key(work / "keys", site)
            subprocess.run([BIN / "tace-server", "sites", "add", site, work / "keys" / f"{site}.pub", "--study", self.study.path],
                           check=True, capture_output=True)  # fmt: skip
            (work / f"{site}.toml").write_text(
                f'[site]\nid = "{site}"\nmanifest = "{cohort / "sites" / site / "manifest.csv"}"\ncache = "{work / site / "cache"}"\n'
                f'output = "{work / site / "out"}"\n[coordinator]\naddress = "localhost:{port}"\nreconnect-budget = 20\n'
                f'ca-certificate = "{self.study.ca_cert}"\n[auth]\nprivate-key = "{work / "keys" / f"{site}.key"}"\n'
                f'[compute]\ndevice = "cpu"\nthreads = 1\nruntime-port = {free_port()}\n'
            )  # fmt: skip
        self.clients: dict[str, subprocess.Popen[bytes]] = {}
        self.server: subprocess.Popen[bytes] | None = None
        self.faults: list[dict[str, Any]] = []
        self.leftovers: list[dict[str, Any]] = []
        self.t0 = time.monotonic()

    def note(self, kind: str, **detail: Any) -> None:
        entry = {"t_s": round(time.monotonic() - self.t0, 1), "fault": kind, **detail}
        self.faults.append(entry)
        print(json.dumps(entry), file=sys.stderr, flush=True)

    def popen(self, args: list[Any], log: str) -> subprocess.Popen[bytes]:
        with open(self.work / log, "ab") as out:
            return subprocess.Popen([str(a) for a in args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def start_server(self, resume: bool) -> None:
        self.server = self.popen(
            [BIN / "tace-server", "start", "--study", self.study.path, *(["--resume"] if resume else [])], "server.out"
        )

    def start_client(self, site: str) -> None:
        self.clients[site] = self.popen([BIN / "tace-client", "start", "--config", self.work / f"{site}.toml", "--quiet"], f"{site}.out")

    def kill_site(self, site: str) -> None:
        """The site's machine goes down: its client, SuperNode and ClientApp, all at once."""
        os.killpg(self.clients[site].pid, signal.SIGKILL)
        for pid in processes_under(self.work / site):
            os.kill(pid, signal.SIGKILL)
        self.clients[site].wait()

    def site_processes(self, site: str) -> list[int]:
        return sorted({self.clients[site].pid, *processes_under(self.work / site)})

    def progress(self) -> dict[str, Any]:
        run = self.study.latest_run()
        path = run / "progress.json" if run else None
        try:
            return dict(json.loads(path.read_text())["stages"]) if path else {}
        except (OSError, ValueError):
            return {}

    def rounds_done(self) -> int:
        return sum(s["next_round"] - 1 for s in self.progress().values())

    def finished(self) -> bool:
        return self.server is not None and self.server.poll() is not None

    def wait(self, seconds: float) -> None:
        end = min(time.monotonic() + seconds, self.deadline)
        while time.monotonic() < end and not self.finished():
            time.sleep(0.5)

    def run(self) -> None:
        self.start_server(resume=False)
        for site in SITES:
            self.start_client(site)
        # The encoder needs every training site's statistics: the chaos starts once round 1 is done.
        while self.rounds_done() < 1 and time.monotonic() < self.deadline and not self.finished():
            time.sleep(1)
        coordinator_kills = [3, 8]  # after this many completed rounds in all
        paused = False
        down: dict[str, float] = {}
        while time.monotonic() < self.deadline:
            if self.finished():
                if self.server is not None and self.server.returncode == 0:
                    break
                # Too few sites for a round (all training sites down at once): the run stopped cleanly; resume it.
                self.note("coordinator-exited", status=self.server.returncode if self.server else None)
                if sum(f["fault"] == "coordinator-exited" for f in self.faults) > 3:
                    break
                for site in list(down):
                    self.start_client(site)
                    del down[site]
                self.wait(10)
                self.start_server(resume=True)
                self.note("resume-coordinator")
                continue
            now = time.monotonic()
            for site, back in list(down.items()):
                if now >= back:
                    self.start_client(site)
                    self.note("restart-site", site=site)
                    del down[site]
            if coordinator_kills and self.rounds_done() >= coordinator_kills[0]:
                coordinator_kills.pop(0)
                self.kill_coordinator()
                continue
            if not paused and self.rounds_done() >= 5 and not down:
                paused = True
                self.pause(self.rng.choice(TRAINING), ROUND_TIMEOUT + 20)
                continue
            up = [s for s in TRAINING if s not in down]
            if len(up) >= 2 and self.rng.random() < 0.5:
                site = self.rng.choice(up)
                self.kill_site(site)
                down[site] = time.monotonic() + self.rng.uniform(10, 45)
                self.note("kill-site", site=site, rounds_done=self.rounds_done())
            self.wait(self.rng.uniform(20, 45))
        for site in down:
            self.start_client(site)

    def kill_coordinator(self) -> None:
        """SIGKILL of `tace-server start` alone; its SuperLink, flwr run, SuperExec and ServerApp must follow."""
        from tace.common.launch import with_flower_home

        assert self.server is not None
        run = self.study.latest_run()
        self.note("kill-coordinator", rounds_done=self.rounds_done())
        os.kill(self.server.pid, signal.SIGKILL)
        self.server.wait()
        killed = time.monotonic()
        # The coordinator's Flower processes (the sites' have their own home folder) must follow it.
        while (left := with_flower_home(self.study.state / "flwr")) and time.monotonic() - killed < 10:
            time.sleep(0.2)
        self.leftovers.append({"left_after_10_s": len(left), "gone_after_s": None if left else round(time.monotonic() - killed, 1)})
        if left:
            subprocess.run([BIN / "tace-server", "stop", "--study", self.study.path], capture_output=True, timeout=120)
        assert self.study.latest_run() == run
        # Away for a while (longer than the sites' reconnection budget, sometimes); `wait` would return at once: the
        # coordinator it watches has exited.
        time.sleep(max(0.0, min(self.rng.uniform(5, 30), self.deadline - time.monotonic())))
        self.start_server(resume=True)
        self.note("resume-coordinator")

    def pause(self, site: str, seconds: float) -> None:
        pids = self.site_processes(site)
        self.note("sigstop-site", site=site, seconds=seconds, rounds_done=self.rounds_done())
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            self.wait(seconds)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
            self.note("sigcont-site", site=site)

    def close(self) -> list[str]:
        """Stop everything; return what is still running 20 s after (must be nothing)."""
        for client in self.clients.values():
            if client.poll() is None:
                os.killpg(client.pid, signal.SIGTERM)
        subprocess.run([BIN / "tace-server", "stop", "--study", self.study.path], capture_output=True, timeout=180)
        for client in self.clients.values():
            try:
                client.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(client.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while (left := processes_under(self.work)) and time.monotonic() < deadline:
            time.sleep(0.5)
        return [f"{pid} {_cmdline(str(pid)).replace(bytes(1), b' ').decode(errors='replace')[:120]}" for pid in left]


def participation(run: Path) -> tuple[set[tuple[str, str, int]], set[tuple[str, str, int]], dict[str, int]]:
    """From a run's metrics.csv: (site, stage, round) trained, validated, and the rounds per stage."""
    trained, validated, rounds = set(), set(), {}
    with open(run / "metrics.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            key = (row["site"], row["stage"], int(row["round"]))
            rounds[row["stage"]] = max(rounds.get(row["stage"], 0), key[2])
            if row["site"] == "pooled":
                continue
            if row["num_examples"]:
                trained.add(key)
            if row["n_eval"]:
                validated.add(key)
    return trained, validated, rounds


def replay(cohort: Path, drill_run: Path, out: Path) -> Path:
    """The drill's study, run in this process with each site taking part exactly where it did in the drill."""
    from functools import partial

    from flwr.app import Context, Error, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
    from flwr.supercore.task_identity import TaskIdentity

    from tace.client import app as client_app
    from tace.common.config import RunConfig
    from tace.common.pretrained import initial_arrays
    from tace.common.protocol import CONFIG, SITE, STAGES
    from tace.server.federation import FlowerFederation
    from tace.server.rundir import RunDir
    from tace.server.workflow import run_layouts

    trained, validated, rounds = participation(drill_run)
    config = json.loads((drill_run / "run_config.json").read_text())["run_config"]
    run = RunConfig.from_run_config({**config, "cohort": str(cohort), "run-dir": str(out), "resume": False, "expected-sites": 0})
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    sites = [s["site_id"] for s in json.loads((cohort / "cohort.json").read_text())["sites"]]

    class ReplayGrid:
        def __init__(self) -> None:
            self.nodes = {100 + i: site for i, site in enumerate(sites)}
            self.contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": i}, state=RecordDict(), run_config=run.to_run_config())
                             for i, n in enumerate(self.nodes)}  # fmt: skip
            self.waiting: dict[str, Message] = {}
            self.count = 0

        def get_node_ids(self) -> list[int]:
            return list(self.nodes)

        def push_messages(self, messages: list[Message]) -> list[str]:
            ids = []
            for msg in messages:
                self.count += 1
                msg.metadata.__dict__["_message_id"] = f"m{self.count}"
                ids.append(msg.metadata.message_id)
                reply = self.answer(msg)
                if reply is not None:
                    self.waiting[msg.metadata.message_id] = reply
            return ids

        def pull_messages(self, ids: list[str]) -> list[Message]:
            return [self.waiting.pop(i) for i in ids if i in self.waiting]

        def answer(self, msg: Message) -> Message | None:
            import copy

            site, kind = self.nodes[msg.metadata.dst_node_id], msg.metadata.message_type
            config = msg.content.config_records[CONFIG]
            stage, r = str(config.get("stage", "")), int(config.get("server-round", 0))
            if kind == "evaluate" and not bool(config.get("final", False)):
                stage = {st.model: st.name for st in STAGES.values()}[str(config["models"])]
                if (site, stage, rounds[stage]) not in validated:
                    return None
            took_part = kind != "train" or (site, stage, r) in trained
            validates = kind != "train" or r == 1 or (site, stage, r - 1) in validated
            if kind == "train" and not took_part and not validates:
                error = Message(Error(code=int(ErrorCode.NODE_UNAVAILABLE), reason="replay: left out"), reply_to=msg)
                error.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
                return error
            reply = client_app.app(copy.deepcopy(msg), self.contexts[msg.metadata.dst_node_id])
            if kind == "train" and not reply.has_error():
                record = reply.content.config_records[SITE]
                if not validates:
                    del record["validation"]
                if not took_part:  # validated the round before, sent no usable update in this one
                    record["declined"], record["reason"] = "replay: left out of this round", "declined-budget"
            return reply

    grid = ReplayGrid()
    federation = FlowerFederation(grid, run, expected_sites=len(sites), wait_s=5)  # type: ignore[arg-type]
    rundir = RunDir(out, run.to_run_config(), "federated")
    federation.on_event = rundir.record_event
    try:
        run_layouts(federation, run, rundir, partial(initial_arrays, run),
                    "federated")  # fmt: skip
    finally:
        rundir.close()
    return out


def final_weights(run: Path) -> dict[str, Any]:
    import numpy as np

    out = {}
    for path in sorted((run / "checkpoints").glob("*/best.npz")):
        with np.load(path) as z:
            out.update({f"{path.parent.name}.{k}": z[k] for k in z.files})
    return out


def report(drill: Drill, run: Path | None, replayed: Path | None, left: list[str], wall_s: float) -> dict[str, Any]:
    import numpy as np

    out: dict[str, Any] = {"wall_s": round(wall_s, 1), "faults": drill.faults}
    out["faults_by_kind"] = {k: sum(f["fault"] == k for f in drill.faults) for k in sorted({f["fault"] for f in drill.faults})}
    out["coordinator_resumes"] = out["faults_by_kind"].get("resume-coordinator", 0)
    out["coordinator_processes_after_each_kill"] = drill.leftovers
    out["processes_left_running_at_the_end"] = left
    if run is None:
        return out
    out["finished"] = (run / "summary.json").exists()
    trained, validated, rounds = participation(run)
    out["rounds_completed"] = rounds
    out["sites_left_out_per_round"] = {f"{stage} {r}": [s for s in TRAINING if (s, stage, r) not in trained]
                                       for stage, n in rounds.items() for r in range(1, n + 1)
                                       if any((s, stage, r) not in trained for s in TRAINING)}  # fmt: skip
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()] if (run / "events.jsonl").exists() else []
    out["events_by_kind"] = {k: sum(e["event"] == k for e in events) for k in sorted({e["event"] for e in events})}
    out["phantom_sites_in_events"] = sorted({e["site"] for e in events} - set(SITES))
    if replayed is not None and out["finished"]:
        a, b = final_weights(run), final_weights(replayed)
        r_trained, r_validated, _ = participation(replayed)
        out["replay_same_participation"] = (r_trained, r_validated) == (trained, validated)
        out["final_model_equals_replay"] = a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        differ = [k for k in a if k in b and not np.array_equal(a[k], b[k])]
        out["arrays_compared"], out["arrays_differing"] = len(a), len(differ)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=45.0, help="stop everything after this long (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the chaos script's random seed")
    parser.add_argument("--out", type=Path, help="keep the drill's folders here (default: a temporary folder, removed)")
    args = parser.parse_args()
    from tace.simulation.cohort import generate_cohort, make_preset

    work = (args.out or Path(tempfile.mkdtemp(prefix="tace-chaos-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    generate_cohort(work / "cohort", make_preset("tiny"), seed=3)  # site-a..c have train splits; d and e are external
    meta = json.loads((work / "cohort" / "cohort.json").read_text())
    meta["sites"] = meta["sites"][:4]  # four sites: the replay's cohort is the drill's
    (work / "cohort" / "cohort.json").write_text(json.dumps(meta))
    drill = Drill(work, work / "cohort", args.seed, start + args.minutes * 60)
    run: Path | None = None
    replayed: Path | None = None
    try:
        drill.run()
        run = drill.study.latest_run()
    finally:
        left = drill.close()
    wall = time.monotonic() - start
    if run is not None and (run / "summary.json").exists():
        replayed = replay(work / "cohort", run, work / "replay")
    print(json.dumps(report(drill, run, replayed, left, wall), indent=2))
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
