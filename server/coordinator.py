"""`tace-server start`, `status` and `stop`: the SuperLink with TLS and node authentication, the study run on it,
and what an operator needs to see.

`start` runs in the foreground (what a service manager or a container expects): it starts Flower's SuperLink
(state in ``state/superlink.db``, so registered sites survive a restart), registers every site key in
``sites/``, submits the study's ServerApp with ``flwr run`` and streams its progress; when the run ends, or on
SIGTERM / Ctrl-C, it stops the SuperLink. `--resume` continues the latest interrupted run from its last completed
round (docs/deployment.md).

Nothing outlives the coordinator: the SuperLink and `flwr run` get a parent-death signal (killed with `tace-server`
however it dies, SIGKILL included), and `start` returns only once every Flower process of the study (SuperExec,
ServerApp) is gone, so `stop` does too. `status` tells a running study from one whose coordinator died, and never
shows sites online without a coordinator.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tace.common.errors import TaceError
from tace.common.launch import (
    COORDINATOR_ENV,
    alive,
    die_with_parent,
    end_processes,
    flower_env,
    flower_executable,
    free_port,
    process_spec,
    processes,
    started_at,
    stop_group,
    with_flower_home,
    write_app,
)
from tace.common.serialize import write_json
from tace.server.study import Study

#: status.json states of a run whose ServerApp is at work; without a coordinator they mean the run was interrupted.
LIVE_STATES = ("starting", "waiting for sites", "training", "resuming")


class Stopped(Exception):
    """SIGTERM (tace-server stop, a service manager) arrived."""


def _raise_stopped(signum: int, frame: Any) -> None:
    raise Stopped()


def _write_pid(path: Path) -> None:
    path.write_text(f"{os.getpid()} {started_at(os.getpid())}\n")


def _read_pid(path: Path) -> int | None:
    """The pid in `path` if that process still runs (the same process: its start time must match, since pids are
    reused), else None."""
    try:
        fields = path.read_text().split()
        pid = int(fields[0])
    except (OSError, ValueError, IndexError):
        return None
    if not alive(pid) or (len(fields) > 1 and fields[1] != started_at(pid)):
        return None
    return pid


def _flower_processes(study: Study) -> list[int]:
    """Live Flower processes of this study (they all run with the study's Flower home folder)."""
    return with_flower_home(study.state / "flwr")


def _stop_leftovers(study: Study) -> None:
    """Stop Flower processes of this study left behind by a coordinator that was killed (SIGKILL, power loss)."""
    marker = str(study.state.resolve())
    found = set(_flower_processes(study))
    for proc in processes():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(proc.name) != os.getpid() and ("flower-superlink" in cmdline or "flwr" in cmdline) and marker in cmdline:
            found.add(int(proc.name))
    for pid in sorted(found):
        print(f"stopping a Flower process left over from an earlier start (pid {pid})", flush=True)
    end_processes(sorted(found), grace_s=5.0)


def _wait_for_port(host: str, port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            hint = "another program may use the port: change port in study.toml" if "address already in use" in tail.lower() else ""
            raise TaceError(f"the SuperLink stopped at start-up (exit status {proc.returncode}); last lines of {log}:\n{tail}", hint)
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.3)
    raise TaceError(f"the SuperLink did not open port {port} within {timeout_s:.0f} s", f"see {log}")


def _superlink(study: Study, env: dict[str, str], host: str, port: int, insecure: bool) -> subprocess.Popen[bytes]:
    """Start Flower's SuperLink for the study (its own process group) and wait until it accepts connections."""
    log = study.logs / "superlink.log"
    cmd = [str(flower_executable("flower-superlink", env)), "--host", host, "--port", str(port),
           "--database", str((study.state / "superlink.db").resolve()), "--disable-runtime-dependency-installation"]  # fmt: skip
    if insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(study.ca_cert.resolve()), "--ssl-certfile", str(study.server_cert.resolve()),
                "--ssl-keyfile", str(study.server_key.resolve()), "--enable-supernode-auth"]  # fmt: skip
    with open(log, "ab") as fh:
        link = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=die_with_parent())
    (study.state / "superlink.pid").write_text(str(link.pid))
    _wait_for_port("127.0.0.1", port, link, log)
    return link


def _connection(study: Study, port: int, insecure: bool) -> Path:
    """Flower's home folder for this study, with the local connection to the SuperLink's Control API."""
    home = (study.state / "flwr").resolve()
    home.mkdir(parents=True, exist_ok=True)
    tls = "insecure = true" if insecure else f"root-certificates = {json.dumps(str(study.ca_cert.resolve()))}"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "study"\n\n[superlink.study]\naddress = "127.0.0.1:{port}"\n{tls}\n', encoding="utf-8"
    )
    return home


def _flwr_json(flwr: Path, env: dict[str, str], *args: str) -> dict[str, Any]:
    """A `flwr` command with ``--format json``; its answer ({"success": false, "error-message": ...} when it failed)."""
    out = subprocess.run([str(flwr), *args, "--format", "json"], env=env, capture_output=True, text=True, timeout=120)
    try:
        return dict(json.loads(out.stdout))
    except (json.JSONDecodeError, TypeError, ValueError):
        return {"success": False, "error-message": (out.stdout + out.stderr).strip()[-800:]}


def _register_sites(study: Study, env: dict[str, str]) -> list[str]:
    """Register the key of every site in ``sites/`` with the SuperLink, and unregister keys removed from it (revoked).

    ``state/registered.json`` remembers which key got which node id. A key the SuperLink still lists is not
    registered again: registering it anew is refused (Flower logs "Public key already in use" for each, which a start
    used to do for every site)."""
    flwr = flower_executable("flwr", env)
    path = study.state / "registered.json"
    registry: dict[str, dict[str, Any]] = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    listed = {int(n["node-id"]) for n in _flwr_json(flwr, env, "supernode", "list", "study").get("nodes", [])
              if str(n.get("status", "")) not in ("unregistered", "deleted")}  # fmt: skip
    current = {entry["fingerprint"]: site for site, entry in study.sites().items()}
    for fingerprint, entry in list(registry.items()):
        if fingerprint not in current:
            if entry.get("node_id") is not None and int(entry["node_id"]) in listed:
                _flwr_json(flwr, env, "supernode", "unregister", str(entry["node_id"]), "study")
                print(f"site {entry['site']}'s key is no longer in sites/: unregistered, it can no longer join", flush=True)
            del registry[fingerprint]
    registered = []
    for fingerprint, site in sorted(current.items(), key=lambda kv: kv[1]):
        known = registry.get(fingerprint)
        if known is None or (known.get("node_id") is not None and int(known["node_id"]) not in listed):
            key = study.path / "sites" / f"{site}.pub"
            answer = _flwr_json(flwr, env, "supernode", "register", str(key), "study", "--name", site)
            if answer.get("success"):
                registry[fingerprint] = {"site": site, "node_id": int(answer["node-id"])}
            elif "already in use" in str(answer.get("error-message", "")):
                registry[fingerprint] = {"site": site, "node_id": None}  # registered before this file existed
            else:
                raise TaceError(f"registering site {site}'s key with the SuperLink failed:\n{answer.get('error-message', '')}",
                                "see logs/superlink.log")  # fmt: skip
        registered.append(site)
    write_json(path, registry)
    return registered


#: How the SuperLink logs a SuperNode it refused at activation because it does not know the key (unregistered or
#: revoked). A registered key it refuses because its node is still listed online from before a restart (until its
#: heartbeats expire) is not a refusal: the site's supervisor tries again.
_REFUSED_KEY = re.compile(r"activate-node\].*?public key: b'(-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----).*?No SuperNode found")


class RefusalWatch(threading.Thread):
    """Reads the SuperLink's log as it grows and reports every site key it refused (once per key and start): on the
    console and in ``state/refused.json``, which `tace-server status` shows. Keys of registered sites are named."""

    def __init__(self, study: Study) -> None:
        super().__init__(daemon=True)
        self.study, self.log = study, study.logs / "superlink.log"
        self.offset = self.log.stat().st_size if self.log.exists() else 0
        self.path = study.state / "refused.json"
        self.path.unlink(missing_ok=True)
        self.refused: dict[str, dict[str, Any]] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            self.check()

    def check(self) -> None:
        from tace.common import pki

        try:
            with open(self.log, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1
        self.offset += end
        names = {entry["fingerprint"]: site for site, entry in self.study.sites().items()}
        for match in _REFUSED_KEY.finditer(data[:end].decode(errors="replace")):
            try:
                fingerprint = pki.pem_key_fingerprint(match.group(1).replace("\\n", "\n").encode() + b"\n")
            except ValueError:
                continue
            entry = self.refused.setdefault(fingerprint, {"site": names.get(fingerprint), "attempts": 0, "first": _now()})
            entry["attempts"] += 1
            entry["last"] = _now()
            if entry["attempts"] == 1:
                who = f"site {entry['site']}'s key" if entry["site"] else "a key that is not registered"
                print(f"TACE-REFUSED {who} ({fingerprint}) tried to join and was refused by the SuperLink: if it belongs to a site "
                      "of this study, register it (`tace-server sites add SITE KEY.pub`, fingerprint confirmed by phone) and restart "
                      "the coordinator", flush=True)  # fmt: skip
            write_json(self.path, self.refused)


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _close_status(run_dir: Path) -> None:
    """After the coordinator's ServerApp is gone: a run it left in a live state is interrupted, no site is online."""
    path = run_dir / "status.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if data.get("state") in LIVE_STATES:
        data.update(state="interrupted", updated=_now())
    data["sites_online"] = []
    write_json(path, data)


def _resume_hint(run_dir: Path) -> str:
    if (run_dir / "progress.json").exists():
        return "continue it with `tace-server start --resume` (it keeps every completed round)"
    return "no round was completed, so there is nothing to resume: start a new run with `tace-server start`"


def start(study: Study, resume: bool = False, insecure: bool = False, run_config: str = "") -> int:
    """Start the SuperLink and the study run; returns when the run ends. Exit status 0 when it finished."""
    from tace.common.config import parse_overrides

    settings = study.settings()
    pid_file = study.state / "server.pid"
    if (pid := _read_pid(pid_file)) is not None:
        raise TaceError(f"this study's coordinator is already running (pid {pid})", "see `tace-server status`, or `tace-server stop` it")
    if insecure:
        print("WARNING: --insecure: connections are NOT encrypted and sites are NOT authenticated. Use only for a test on "
              "a private network, never with patient data.", file=sys.stderr, flush=True)  # fmt: skip
    else:
        for f in (study.ca_cert, study.server_cert, study.server_key):
            if not f.is_file():
                raise TaceError(f"{f} is missing", "the study's certificates come from `tace-server init`; restore the pki/ folder")
        if not study.sites():
            raise TaceError(
                "no site is registered: no site could join", "register each site's key with `tace-server sites add SITE KEY.pub`"
            )
    run_dir = (study.resumable_run() if resume else study.new_run()).resolve()
    overrides = parse_overrides(run_config)
    run = study.run_config(**overrides, **{"run-dir": str(run_dir.resolve()), "resume": resume})
    if not run.expected_sites:
        raise TaceError("expected-sites is 0 in run_config.toml", "set it to the number of sites that take part")
    _stop_leftovers(study)
    study.logs.mkdir(exist_ok=True)
    study.state.mkdir(exist_ok=True)
    _write_pid(pid_file)
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    link: subprocess.Popen[bytes] | None = None
    runner: subprocess.Popen[str] | None = None
    watch = RefusalWatch(study)
    try:
        if not insecure:
            # Register the keys on a private port first, so that no site reaches the SuperLink before its key is
            # known (it would be refused). Registrations persist in the SuperLink's database.
            port = free_port()
            env = flower_env(_connection(study, port, insecure))
            link = _superlink(study, env, "127.0.0.1", port, insecure)
            sites = _register_sites(study, env)
            stop_group(link, grace_s=20.0)
        # The ServerApp that Flower's SuperExec starts watches this process and ends with it (`exit_with`).
        env = flower_env(_connection(study, settings["port"], insecure), {COORDINATOR_ENV: process_spec(os.getpid())})
        watch.offset = (study.logs / "superlink.log").stat().st_size if (study.logs / "superlink.log").exists() else 0
        link = _superlink(study, env, settings["listen"], settings["port"], insecure)
        watch.start()
        if not insecure:
            print(
                f"SuperLink up on port {settings['port']} with TLS and site authentication; registered sites: {', '.join(sites)}",
                flush=True,
            )
        (study.state / "current_run").write_text(run_dir.name)
        app = write_app(run_dir / ".flwr-app", run)
        print(f"{'resuming' if resume else 'starting'} run {run_dir.name}: waiting for {run.expected_sites} sites", flush=True)
        runner = subprocess.Popen([str(flower_executable("flwr", env)), "run", str(app), "study", "--stream"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=run_dir,
                                  preexec_fn=die_with_parent())  # fmt: skip
        assert runner.stdout is not None
        with open(study.logs / f"run-{run_dir.name}.log", "a", encoding="utf-8") as log:
            for line in runner.stdout:
                log.write(line)
                log.flush()
                if line.startswith(("TACE-ROUND", "TACE-SUMMARY", "TACE-REFUSED")) or "ERROR" in line or "excluded" in line:
                    print(line.rstrip(), flush=True)
        runner.wait()
    except (Stopped, KeyboardInterrupt):
        print(f"stopping: {_resume_hint(run_dir)}", flush=True)
        return 130
    finally:
        watch.done.set()
        if runner is not None and runner.poll() is None:
            runner.terminate()
        if link is not None:
            stop_group(link, grace_s=20.0)
        # The SuperExec and the ServerApp run in sessions of their own: end them before returning, so that nothing of
        # the study is left running when `start` (and `stop`, which waits for it) returns.
        end_processes(_flower_processes(study), grace_s=10.0)
        if runner is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                runner.wait(timeout=5)
        _close_status(run_dir)
        signal.signal(signal.SIGTERM, previous)
        pid_file.unlink(missing_ok=True)
    if (run_dir / "summary.json").exists():
        print(f"run finished: {run_dir / 'summary.json'}; analyse it with `tace-analysis report {run_dir}`", flush=True)
        return 0
    error = (run_dir / "error.txt").read_text(encoding="utf-8").strip() if (run_dir / "error.txt").exists() else "see the run log"
    raise TaceError(f"run {run_dir.name} did not finish: {error}", f"logs: {study.logs}; once fixed, {_resume_hint(run_dir)}")


def status(study: Study) -> dict[str, Any]:
    """What `tace-server status` prints: whether the coordinator runs ("running"; "stopped"; "died": killed without
    cleaning up, its pid file left behind), Flower processes of the study left without it, registered sites, keys
    the SuperLink refused, and the current run's status. Without a coordinator no site is online, and a run left in a
    live state is "interrupted"."""
    run_name = (study.state / "current_run").read_text().strip() if (study.state / "current_run").exists() else ""
    run_dir = study.runs / run_name if run_name else study.latest_run()
    pid_file = study.state / "server.pid"
    running = _read_pid(pid_file) is not None
    coordinator = "running" if running else ("died" if pid_file.exists() else "stopped")
    out: dict[str, Any] = {"coordinator": coordinator, "registered_sites": sorted(study.sites()),
                           "run": run_dir.name if run_dir else None}  # fmt: skip
    if not running and (left := _flower_processes(study)):
        out["leftover_processes"] = sorted(left)
    if (study.state / "refused.json").exists():
        out["refused_keys"] = json.loads((study.state / "refused.json").read_text(encoding="utf-8"))
    if run_dir is not None:
        if (run_dir / "status.json").exists():
            out["status"] = json.loads((run_dir / "status.json").read_text(encoding="utf-8"))
            if not running:
                out["status"]["sites_online"] = []
                if out["status"].get("state") in LIVE_STATES:
                    out["status"]["state"] = "interrupted"
        if (run_dir / "events.jsonl").exists():
            out["events"] = [json.loads(line) for line in (run_dir / "events.jsonl").read_text(encoding="utf-8").splitlines()[-10:]]
        out["finished"] = (run_dir / "summary.json").exists()
        if (run_dir / "progress.json").exists():
            out["progress"] = json.loads((run_dir / "progress.json").read_text(encoding="utf-8"))["stages"]
    return out


def stop(study: Study, timeout_s: float = 60.0) -> bool:
    """SIGTERM the running coordinator (it stops its SuperLink and every Flower process of the study, then exits);
    returns once all of them are gone. False when no coordinator was running (leftovers are stopped all the same)."""
    pid = _read_pid(study.state / "server.pid")
    if pid is None:
        _stop_leftovers(study)
        (study.state / "server.pid").unlink(missing_ok=True)  # a coordinator that died left it
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.1)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
    _stop_leftovers(study)
    return True
