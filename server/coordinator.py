"""`tace-server start`, `status` and `stop`: the SuperLink with TLS and node authentication, the study run on it,
and what an operator needs to see.

`start` runs in the foreground (what a service manager or a container expects): it starts Flower's SuperLink
(state in ``state/superlink.db``, so registered sites survive a restart), registers every site key in
``sites/``, submits the study's ServerApp with ``flwr run`` and streams its progress; when the run ends, or on
SIGTERM / Ctrl-C, it stops the SuperLink. `--resume` continues the latest interrupted run from its last completed
round (docs/deployment.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tace.common.errors import TaceError
from tace.common.launch import flower_env, flower_executable, free_port, processes, stop_group, write_app
from tace.server.study import Study


class Stopped(Exception):
    """SIGTERM (tace-server stop, a service manager) arrived."""


def _raise_stopped(signum: int, frame: Any) -> None:
    raise Stopped()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return True


def _read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _stop_leftovers(study: Study) -> None:
    """Stop Flower processes of this study left behind by a coordinator that was killed (SIGKILL, power loss)."""
    marker = str(study.state.resolve())
    for proc in processes():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if (
            int(proc.name) != os.getpid()
            and ("flower-superlink" in cmdline or "flwr" in cmdline)
            and (marker in cmdline or f"FLWR_HOME={marker}".encode() in environ)
        ):
            print(f"stopping a Flower process left over from an earlier start (pid {proc.name})", flush=True)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(proc.name), signal.SIGKILL)
    time.sleep(0.5)


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
        link = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
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


def _register_sites(study: Study, env: dict[str, str]) -> list[str]:
    """Register every site key with the SuperLink (already registered keys are kept)."""
    flwr = flower_executable("flwr", env)
    registered = []
    for site in sorted(study.sites()):
        key = study.path / "sites" / f"{site}.pub"
        out = subprocess.run([str(flwr), "supernode", "register", str(key), "study", "--name", site],
                             env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
        text = out.stdout + out.stderr
        if "registered successfully" not in text and "already in use" not in text:
            raise TaceError(f"registering site {site}'s key with the SuperLink failed:\n{text.strip()[-800:]}", "see logs/superlink.log")
        registered.append(site)
    return registered


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
    pid_file.write_text(str(os.getpid()))
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    link: subprocess.Popen[bytes] | None = None
    runner: subprocess.Popen[str] | None = None
    try:
        if not insecure:
            # Register the keys on a private port first, so that no site reaches the SuperLink before its key is
            # known (it would be refused). Registrations persist in the SuperLink's database.
            port = free_port()
            env = flower_env(_connection(study, port, insecure))
            link = _superlink(study, env, "127.0.0.1", port, insecure)
            sites = _register_sites(study, env)
            stop_group(link, grace_s=20.0)
        env = flower_env(_connection(study, settings["port"], insecure))
        link = _superlink(study, env, settings["listen"], settings["port"], insecure)
        if not insecure:
            print(
                f"SuperLink up on port {settings['port']} with TLS and site authentication; registered sites: {', '.join(sites)}",
                flush=True,
            )
        (study.state / "current_run").write_text(run_dir.name)
        app = write_app(run_dir / ".flwr-app", run)
        print(f"{'resuming' if resume else 'starting'} run {run_dir.name}: waiting for {run.expected_sites} sites", flush=True)
        runner = subprocess.Popen([str(flower_executable("flwr", env)), "run", str(app), "study", "--stream"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=run_dir)  # fmt: skip
        assert runner.stdout is not None
        with open(study.logs / f"run-{run_dir.name}.log", "a", encoding="utf-8") as log:
            for line in runner.stdout:
                log.write(line)
                log.flush()
                if line.startswith(("TACE-ROUND", "TACE-SUMMARY")) or "ERROR" in line or "excluded" in line:
                    print(line.rstrip(), flush=True)
        runner.wait()
    except (Stopped, KeyboardInterrupt):
        print("stopping: the run can continue later with `tace-server start --resume`", flush=True)
        return 130
    finally:
        if runner is not None and runner.poll() is None:
            runner.terminate()
        if link is not None:
            stop_group(link, grace_s=20.0)
        signal.signal(signal.SIGTERM, previous)
        pid_file.unlink(missing_ok=True)
    if (run_dir / "summary.json").exists():
        print(f"run finished: {run_dir / 'summary.json'}; analyse it with `tace-analysis report {run_dir}`", flush=True)
        return 0
    error = (run_dir / "error.txt").read_text(encoding="utf-8").strip() if (run_dir / "error.txt").exists() else "see the run log"
    raise TaceError(f"run {run_dir.name} did not finish: {error}",
                    f"logs: {study.logs}; once fixed, continue it with `tace-server start --resume`")  # fmt: skip


def status(study: Study) -> dict[str, Any]:
    """What `tace-server status` prints: coordinator running?, registered sites, and the current run's status."""
    run_name = (study.state / "current_run").read_text().strip() if (study.state / "current_run").exists() else ""
    run_dir = study.runs / run_name if run_name else study.latest_run()
    out: dict[str, Any] = {"coordinator": "running" if _read_pid(study.state / "server.pid") else "stopped",
                           "registered_sites": sorted(study.sites()), "run": run_dir.name if run_dir else None}  # fmt: skip
    if run_dir is not None:
        if (run_dir / "status.json").exists():
            out["status"] = json.loads((run_dir / "status.json").read_text(encoding="utf-8"))
        if (run_dir / "events.jsonl").exists():
            out["events"] = [json.loads(line) for line in (run_dir / "events.jsonl").read_text(encoding="utf-8").splitlines()[-10:]]
        out["finished"] = (run_dir / "summary.json").exists()
        if (run_dir / "progress.json").exists():
            out["progress"] = json.loads((run_dir / "progress.json").read_text(encoding="utf-8"))["stages"]
    return out


def stop(study: Study, timeout_s: float = 60.0) -> bool:
    """SIGTERM the running coordinator (it stops its SuperLink); False when none was running."""
    pid = _read_pid(study.state / "server.pid")
    if pid is None:
        _stop_leftovers(study)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.3)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        _stop_leftovers(study)
    return True
