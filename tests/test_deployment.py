"""A real deployment on 127.0.0.1: one SuperLink (`tace-server start`) and three SuperNodes (`tace-client start`) as
separate processes, with TLS and site authentication, on the tiny cohort. Slow (minutes): every Flower message
starts a fresh ClientApp process. Covers refused connections, a coordinator killed and resumed to the same final
weights, and a site killed mid-round that rejoins later. Malformed updates are screened by the same ServerApp code,
tested in test_fault_tolerance.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tace.common import pki
from tace.common.protocol import STAGES
from tace.server.study import Study
from tests.helpers import final_weights, metric_rows

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
SHORT = {"holdout-sites": '"site-c"', "rounds": "2", "head-rounds": "2", "clinical-rounds": "2", "radiomics-rounds": "2", "box-voxels": '"16,16,8"',
         "spacing-mm": '"4,4,4"', "hist-bins": "50", "analysis-bins": "1000", "patience": "0", "min-sites": "1",
         "round-timeout": "150", "join-timeout": "300"}  # fmt: skip


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _reads(path: Path, marker: bytes) -> bool:
    try:
        return marker in path.read_bytes()
    except OSError:
        return False


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` in the process tree."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        try:
            ppid = int(Path(p, "stat").read_text().rsplit(")", 1)[1].split()[1]) if p.name.isdigit() else None
        except (OSError, IndexError, ValueError):
            continue
        if ppid is not None:
            children.setdefault(ppid, []).append(int(p.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return {p for p in found if alive(p)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Pilot:
    def __init__(self, root: Path, cohort: Path) -> None:
        self.root = root
        self.port = free_port()
        subprocess.run([BIN / "tace-server", "init", root / "study", "--host", "localhost", "--port", str(self.port),
                        "--expected-sites", "3"], check=True, capture_output=True)  # fmt: skip
        self.study = Study.open(root / "study")
        config = self.study.path / "run_config.toml"
        lines = [f"{line.split(' = ')[0]} = {SHORT[line.split(' = ')[0]]}" if line.split(" = ")[0] in SHORT else line
                 for line in config.read_text().splitlines()]  # fmt: skip
        config.write_text("\n".join(lines) + "\n")
        self.procs: list[subprocess.Popen] = []
        for s in "abc":
            pki.generate_site_key(root / "keys", f"site-{s}")
            subprocess.run([BIN / "tace-server", "sites", "add", f"site-{s}", root / "keys" / f"site-{s}.pub", "--study", self.study.path],
                           check=True, capture_output=True)  # fmt: skip
            self.site_toml(f"site-{s}", cohort / "sites" / f"site-{s}" / "manifest.csv")

    def site_toml(
        self, site: str, manifest: Path, ca: Path | None = None, key: Path | None = None, insecure: bool = False, budget: int = 0
    ) -> Path:
        path = self.root / f"{site}.toml"
        ca = ca or self.study.ca_cert
        key = key or self.root / "keys" / f"{site}.key"
        tls = "insecure = true" if insecure else f'ca-certificate = "{ca}"\n[auth]\nprivate-key = "{key}"'
        if budget:  # Flower's reconnection budget, shortened (the SuperNode gives up after it; the supervisor restarts it)
            tls = f"reconnect-budget = {budget}\n{tls}"
        path.write_text(f'[site]\nid = "{site}"\nmanifest = "{manifest}"\ncache = "{self.root / site / "cache"}"\n'
                        f'output = "{self.root / site / "out"}"\n[coordinator]\naddress = "localhost:{self.port}"\n{tls}\n'
                        f'[compute]\ndevice = "cpu"\nthreads = 1\nruntime-port = {free_port()}\n')  # fmt: skip
        return path

    def popen(self, *args: object, log: str) -> subprocess.Popen:
        out = open(self.root / log, "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([str(a) for a in args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        proc.log = out  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def server(self, *extra: str) -> subprocess.Popen:
        return self.popen(BIN / "tace-server", "start", "--study", self.study.path, *extra, log="server.out")

    def client(self, site: str) -> subprocess.Popen:
        return self.popen(BIN / "tace-client", "start", "--config", self.root / f"{site}.toml", "--quiet", log=f"{site}.out")

    def client_with(self, toml: Path, name: str) -> subprocess.Popen:
        return self.popen(BIN / "tace-client", "start", "--config", toml, "--quiet", log=f"{name}.out")

    def output(self, name: str) -> str:
        return (self.root / name).read_text(errors="replace") if (self.root / name).exists() else ""

    def status(self) -> dict:
        out = subprocess.run([BIN / "tace-server", "status", "--study", self.study.path, "--json"], capture_output=True, text=True)
        return json.loads(out.stdout)

    def wait_for(self, condition, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(1)
        raise AssertionError(f"timed out waiting for {what}; server output:\n{(self.root / 'server.out').read_text()[-3000:]}")

    def progress(self) -> dict:
        run = self.study.latest_run()
        path = run / "progress.json" if run else None
        return json.loads(path.read_text())["stages"] if path and path.exists() else {}

    def kill_coordinator(self, proc: subprocess.Popen) -> None:
        """Like a power loss: SIGKILL the coordinator and every Flower process it started (SuperLink, ServerApp)."""
        os.killpg(proc.pid, signal.SIGKILL)
        marker = str(self.study.state)
        for p in Path("/proc").iterdir():
            try:
                if p.name.isdigit() and f"FLWR_HOME={marker}".encode() in (p / "environ").read_bytes():
                    os.kill(int(p.name), signal.SIGKILL)
            except OSError:
                continue

    def kill_site(self, site: str, client: subprocess.Popen) -> None:
        """Like the site's machine going down: SIGKILL its client and the SuperNode and ClientApp it started."""
        os.killpg(client.pid, signal.SIGKILL)
        marker = f"{self.root / site}/".encode()
        for p in Path("/proc").iterdir():
            try:
                if p.name.isdigit() and (marker in (p / "cmdline").read_bytes() or marker in (p / "environ").read_bytes()):
                    os.kill(int(p.name), signal.SIGKILL)
            except OSError:
                continue

    def flower_processes(self) -> set[int]:
        """Live processes of this study's Flower programs (SuperLink, `flwr run`, SuperExec, ServerApp): every one
        runs with the study's Flower home folder in its environment (tace.common.launch.flower_env)."""
        marker = f"FLWR_HOME={self.study.state.resolve()}".encode()
        return {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _reads(p / "environ", marker) and alive(int(p.name))}

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=20)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.log.close()  # type: ignore[attr-defined]
        subprocess.run([BIN / "tace-server", "stop", "--study", self.study.path], capture_output=True)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from tace.simulation.cohort import generate_cohort, make_preset

    out = tmp_path_factory.mktemp("deploy") / "cohort"
    generate_cohort(out, make_preset("tiny", n_sites=4), seed=3)  # site-a, site-b train; site-c, site-d holdout
    return out


@pytest.fixture
def pilot(tmp_path, cohort):
    p = Pilot(tmp_path, cohort)
    yield p
    p.close()


def test_three_sites_with_tls_refusals_and_coordinator_resume(pilot, cohort):
    server = pilot.server()
    pilot.wait_for(lambda: "waiting for 3 sites" in (pilot.root / "server.out").read_text(), 120, "the SuperLink")
    # Refused, each with a message the site's IT team can act on:
    other = pki.create_ca(pilot.root / "other-ca", "not the study")[0]
    pki.generate_site_key(pilot.root / "keys", "site-x")
    manifest = cohort / "sites" / "site-a" / "manifest.csv"
    cases = {
        "unregistered": (pilot.site_toml("site-x", manifest), "does not accept this site's key"),
        "wrong-ca": (pilot.site_toml("site-w", manifest, ca=other, key=pilot.root / "keys" / "site-a.key"), "not signed by the CA certificate"),
        "plaintext": (pilot.site_toml("site-p", manifest, insecure=True), "uses TLS but site.toml sets insecure = true"),
    }  # fmt: skip
    for name, (toml, message) in cases.items():
        # An unregistered key is refused for good once its refusals outlast the SuperLink's stale window (70 s).
        out = subprocess.run([BIN / "tace-client", "start", "--config", toml, "--quiet"], capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and message in out.stderr, (name, out.stdout, out.stderr)
    for s in "abc":
        pilot.client(f"site-{s}")
    assert server.wait(timeout=900) == 0, (pilot.root / "server.out").read_text()[-3000:]
    reference = pilot.study.latest_run()
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["models"]["dltrmlp"]["sites"]["site-c"]["role"] == "holdout"
    status = subprocess.run([BIN / "tace-server", "status", "--study", pilot.study.path, "--json"], capture_output=True, text=True)
    assert json.loads(status.stdout)["finished"] is True

    # The coordinator dies after DLTR round 1 (sites keep running); `start --resume` finishes the run with exactly
    # the uninterrupted run's weights.
    server = pilot.server()
    pilot.wait_for(
        lambda: pilot.study.latest_run() != reference and pilot.progress().get("dltr", {}).get("next_round", 1) >= 2, 600, "DLTR round 1"
    )
    pilot.kill_coordinator(server)
    interrupted = pilot.study.latest_run()
    assert not (interrupted / "summary.json").exists()
    resumed = pilot.server("--resume")
    assert resumed.wait(timeout=900) == 0, (pilot.root / "server.out").read_text()[-3000:]
    assert pilot.study.latest_run() == interrupted
    a, b = final_weights(interrupted), final_weights(reference)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # Round 1 was not run again after the resume: the resumed coordinator printed round 2 but not round 1 (the killed
    # one's own line may be lost in flight with it), and the run's metrics hold round 1 once.
    resumed_output = (pilot.root / "server.out").read_text().rsplit("resuming run", 1)[1]
    assert "TACE-ROUND dltr 2/" in resumed_output and "TACE-ROUND dltr 1/" not in resumed_output
    first = [r["site"] for r in metric_rows(interrupted) if r["stage"] == "dltr" and r["round"] == "1"]
    assert sorted(first) == ["pooled", "site-a", "site-b"]


def test_site_killed_mid_round_is_left_out_and_rejoins(pilot):
    config = pilot.study.path / "run_config.toml"
    config.write_text(config.read_text().replace("\nrounds = 2\n", "\nrounds = 4\n"))
    server = pilot.server()
    clients = {s: pilot.client(f"site-{s}") for s in "abc"}
    pilot.wait_for(lambda: pilot.progress().get("dltr", {}).get("next_round", 1) >= 2, 600, "DLTR round 1")
    pilot.kill_site("site-b", clients["b"])  # the site's machine goes down
    pilot.wait_for(lambda: pilot.progress().get("dltr", {}).get("next_round", 1) >= 3, 600, "DLTR round 2 without site-b")
    pilot.client("site-b")  # back for a later round
    assert server.wait(timeout=1200) == 0, (pilot.root / "server.out").read_text()[-3000:]
    run = pilot.study.latest_run()
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    missed = [e for e in events if e["site"] == "site-b" and e["stage"] == "dltr"]
    assert missed and "site-b" in (run / "run.log").read_text(), events
    k = missed[0]["round"]  # the round it missed: completed with site-a alone
    import csv

    with open(run / "metrics.csv", newline="", encoding="utf-8") as fh:
        trained = {(r["site"], r["stage"], int(r["round"])) for r in csv.DictReader(fh) if r["num_examples"] and r["site"] != "pooled"}
    assert ("site-b", "dltr", k) not in trained and ("site-a", "dltr", k) in trained
    order = {name: i for i, name in enumerate(STAGES)}  # every stage the study trains, in the order it trains them
    assert any(site == "site-b" and (order[stage], r) > (order["dltr"], k) for site, stage, r in trained)  # rejoined later


def test_stop_ends_the_coordinator_and_its_flower_processes(pilot):
    """`tace-server stop` while the coordinator waits for its sites: the coordinator exits as stopped (130), its
    SuperLink, `flwr run`, SuperExec and ServerApp are gone, the sites' port is free, and status says stopped."""
    server = pilot.server()
    status = [BIN / "tace-server", "status", "--study", pilot.study.path, "--json"]

    def report() -> dict:
        return json.loads(subprocess.run(status, capture_output=True, text=True, check=True).stdout)

    pilot.wait_for(lambda: "status" in report(), 180, "the ServerApp waiting for the sites")  # its status.json
    family = descendants(server.pid) | pilot.flower_processes()
    names = {p: Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:120] for p in family}
    assert len(family) >= 4, names  # the SuperLink, its SuperExec, the ServerApp, `flwr run`
    with socket.socket() as s:
        s.settimeout(5)
        s.connect(("127.0.0.1", pilot.port))  # the SuperLink accepts the sites' connections
    assert report()["coordinator"] == "running"

    stop = subprocess.run([BIN / "tace-server", "stop", "--study", pilot.study.path], capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0 and "coordinator stopped" in stop.stdout, stop.stderr
    assert server.wait(timeout=5) == 130  # the exit status of a coordinator stopped (as after Ctrl-C)
    link = [p for p, name in names.items() if b"flower-superlink" in name]
    assert len(link) == 1 and not alive(link[0])  # stopped before the coordinator exits
    # The SuperExec and the ServerApp run in sessions of their own; `stop` returns only once they are gone too.
    left = {p for p in family | pilot.flower_processes() if alive(p)}
    assert not left, {p: names.get(p, "started later") for p in left}
    assert not (pilot.study.state / "server.pid").exists()
    with socket.socket() as s:  # nothing listens on the port: connections are refused, and it can be bound again
        assert s.connect_ex(("127.0.0.1", pilot.port)) != 0
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", pilot.port))
        s.listen()
    assert report()["coordinator"] == "stopped"
    again = subprocess.run([BIN / "tace-server", "stop", "--study", pilot.study.path], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "was not running" in again.stderr


def test_a_killed_coordinator_takes_its_flower_processes_along_and_status_says_so(pilot, cohort):
    """`kill -9` of `tace-server start` alone: its SuperLink, `flwr run`, SuperExec and ServerApp die with it (the study
    stops training, the port is free), and status tells a dead coordinator from a running one, with no site online
    and the run interrupted. A site with an unregistered key is refused on the console and in status; a second start
    registers no key twice (no "Public key already in use")."""
    server = pilot.server()
    pilot.wait_for(lambda: "status" in pilot.status(), 180, "the ServerApp waiting for the sites")
    pki.generate_site_key(pilot.root / "keys", "site-x")
    stranger = pilot.client_with(pilot.site_toml("site-x", cohort / "sites" / "site-a" / "manifest.csv"), "site-x")
    assert stranger.wait(timeout=300) == 2 and "does not accept this site's key" in pilot.output("site-x.out")
    fingerprint = pki.read_public_key(pilot.root / "keys" / "site-x.pub").fingerprint
    pilot.wait_for(lambda: fingerprint in pilot.output("server.out"), 30, "the refusal on the coordinator's console")
    assert "TACE-REFUSED a key that is not registered" in pilot.output("server.out")
    report = pilot.status()
    assert report["coordinator"] == "running" and report["refused_keys"][fingerprint]["site"] is None
    family = descendants(server.pid) | pilot.flower_processes()
    assert len(family) >= 4

    os.kill(server.pid, signal.SIGKILL)  # the coordinator alone, as the out-of-memory killer would
    deadline = time.monotonic() + 30
    while (left := {p for p in family | pilot.flower_processes() if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, left
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", pilot.port)) != 0
    report = pilot.status()
    assert report["coordinator"] == "died" and "leftover_processes" not in report
    assert report["status"]["state"] == "interrupted" and report["status"]["sites_online"] == []
    text = subprocess.run([BIN / "tace-server", "status", "--study", pilot.study.path], capture_output=True, text=True).stdout
    assert "NOT RUNNING (it was killed" in text and "online" not in text
    again = subprocess.run([BIN / "tace-server", "stop", "--study", pilot.study.path], capture_output=True, text=True, timeout=120)
    assert "was not running" in again.stderr and pilot.status()["coordinator"] == "stopped"

    pilot.server()  # a second start: every key is registered already
    pilot.wait_for(lambda: pilot.output("server.out").count("waiting for 3 sites") == 2, 180, "the second start")
    assert "already in use" not in (pilot.study.logs / "superlink.log").read_text()
    subprocess.run([BIN / "tace-server", "stop", "--study", pilot.study.path], capture_output=True, timeout=120)


def test_sites_rejoin_after_the_coordinator_was_away_longer_than_their_reconnection_budget(pilot, cohort):
    """The coordinator dies after DLTR round 1 and stays away longer than the sites' reconnection budget (shortened
    to 10 s): every SuperNode gives up, its supervisor restarts it and keeps it trying; the coordinator resumes, every
    site rejoins and the run finishes."""
    for s in "abc":
        pilot.site_toml(f"site-{s}", cohort / "sites" / f"site-{s}" / "manifest.csv", budget=10)
    server = pilot.server()
    clients = {s: pilot.client(f"site-{s}") for s in "abc"}
    pilot.wait_for(lambda: pilot.progress().get("dltr", {}).get("next_round", 1) >= 2, 600, "DLTR round 1")
    pilot.kill_coordinator(server)
    resumed_at = dict(pilot.progress())
    pilot.wait_for(lambda: all("gave up reconnecting" in pilot.output(f"site-{s}.out") or "the SuperNode exited" in pilot.output(f"site-{s}.out")
                               for s in "abc"), 180, "every site's SuperNode to give up")  # fmt: skip
    time.sleep(10)  # away longer still: the restarted SuperNodes give up again
    assert all(c.poll() is None for c in clients.values())  # no site gave up for good
    resumed = pilot.server("--resume")
    assert resumed.wait(timeout=1200) == 0, pilot.output("server.out")[-3000:]
    run = pilot.study.latest_run()
    rows = metric_rows(run)
    after = [r for r in rows if r["site"] in ("site-a", "site-b") and r["num_examples"] and r["stage"] != "dltr"]
    assert {r["site"] for r in after} == {"site-a", "site-b"}, resumed_at  # both training sites trained after the resume
    summary = json.loads((run / "summary.json").read_text())
    assert summary["models"]["dltrmlp"]["sites"]["site-c"]["auc"] is not None  # the holdout site was evaluated
    assert all(c.poll() is None for c in clients.values())
    assert all("restarting it" in pilot.output(f"site-{s}.out") for s in "abc")


def test_a_changed_coordinator_certificate_makes_the_sites_exit_with_the_ca_message(pilot, cohort):
    """The coordinator comes back with a certificate from another CA (a new study, or not the coordinator): no
    restart can fix that, so every site's client exits with status 2 and says what to check."""
    server = pilot.server()
    clients = {s: pilot.client(f"site-{s}") for s in "abc"}
    pilot.wait_for(lambda: pilot.status().get("status", {}).get("state") == "training", 600, "the sites to join")
    subprocess.run([BIN / "tace-server", "stop", "--study", pilot.study.path], capture_output=True, timeout=120, check=True)
    assert server.wait(timeout=30) == 130
    pki_dir = pilot.study.path / "pki"
    ca, ca_key = pki.create_ca(pilot.root / "new-pki", "another study")
    cert, key = pki.issue_server_certificate(ca, ca_key, ["localhost", "127.0.0.1"], pilot.root / "new-pki")
    for src, dst in ((ca, "ca.crt"), (ca_key, "ca.key"), (cert, "server.crt"), (key, "server.key")):
        (pki_dir / dst).write_bytes(src.read_bytes())
    pilot.server()
    for s, client in clients.items():
        assert client.wait(timeout=300) == 2, pilot.output(f"site-{s}.out")[-2000:]
        assert "not signed by the CA certificate" in pilot.output(f"site-{s}.out")
    subprocess.run([BIN / "tace-server", "stop", "--study", pilot.study.path], capture_output=True, timeout=120)
