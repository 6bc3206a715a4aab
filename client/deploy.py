"""`tace-client start --config site.toml`: a hospital's connection to the study.

It reads the site's configuration (deploy/site.toml is the template), refuses to start when the manifest fails
validation or a certificate or key is unusable, then runs Flower's SuperNode with TLS and the site's key.

The site never hangs. The SuperNode retries a lost connection for ``[coordinator] reconnect-budget`` seconds; Flower
1.42 then gives up but leaves its process alive, doing nothing. This supervisor reads the SuperNode's output and
restarts it, with a growing pause, when it gave up, lost its registration, stopped making progress (failing to
connect for longer than its budget) or exited. Before a restart it checks the coordinator's TLS itself: what no
restart can fix (a certificate the site's CA did not sign, a name it was not issued for, a key the coordinator does
not accept or revoked, another TACE-FL version) ends `tace-client start` with exit status 2 and a message saying what
to do, so that a service manager sees it.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from tace.common import pki
from tace.common.config import MIN_CELL_COUNT, check_site_id
from tace.common.errors import ConfigError, TaceError
from tace.common.launch import die_with_parent, end_processes, flower_env, flower_executable, stop_group, with_flower_home


@dataclass(frozen=True)
class SiteSettings:
    """site.toml, checked."""

    path: Path
    site_id: str
    manifest: Path
    cache: Path
    output: Path
    address: str
    ca_certificate: Path | None
    private_key: Path | None
    device: str = "auto"
    threads: int = 0
    runtime_port: int = 9094
    min_patients: int = 5
    min_cell_count: int = MIN_CELL_COUNT
    share_patient_level: bool = False
    max_epsilon: float = 0.0
    require_dp: bool = False
    require_secagg: bool = False
    insecure: bool = False
    reconnect_budget: int = 300

    @classmethod
    def read(cls, path: Path) -> SiteSettings:
        if not path.is_file():
            raise ConfigError(f"site configuration {path} does not exist", "copy deploy/site.toml from TACE-FL and fill it in")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML ({exc})", "fix the line it names") from None
        base = path.parent

        def get(section: str, key: str, default: Any = None, kind: type = str) -> Any:
            value = data.get(section, {}).get(key, default)
            if value is None:
                raise ConfigError(f"{path}: [{section}] {key} is missing", "see the comments in deploy/site.toml")
            if kind is bool and not isinstance(value, bool):
                raise ConfigError(f"{path}: [{section}] {key} must be true or false")
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{path}: [{section}] {key} must be a whole number")
            if kind is float and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
                raise ConfigError(f"{path}: [{section}] {key} must be a number, at least 0")
            if kind is str and not isinstance(value, str):
                raise ConfigError(f'{path}: [{section}] {key} must be a text in quotes, like "value"')
            return value

        def file(section: str, key: str, default: Any = None) -> Path:
            p = Path(get(section, key, default)).expanduser()
            return p if p.is_absolute() else (base / p)

        insecure = bool(get("coordinator", "insecure", False, bool))
        address = get("coordinator", "address")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"{path}: [coordinator] address must be HOST:PORT, like coordinator.example.org:9092")
        return cls(
            path=path,
            site_id=check_site_id(get("site", "id")),
            manifest=file("site", "manifest"),
            cache=file("site", "cache"),
            output=file("site", "output"),
            address=address,
            ca_certificate=None if insecure else file("coordinator", "ca-certificate"),
            private_key=None if insecure else file("auth", "private-key"),
            device=get("compute", "device", "auto"),
            threads=get("compute", "threads", 0, int),
            runtime_port=get("compute", "runtime-port", 9094, int),
            min_patients=get("privacy", "min-patients", 5, int),
            min_cell_count=get("privacy", "min-cell-count", MIN_CELL_COUNT, int),
            share_patient_level=get("privacy", "share-patient-level", False, bool),
            max_epsilon=float(get("privacy", "max-epsilon", 0.0, float)),
            require_dp=get("privacy", "require-dp", False, bool),
            require_secagg=get("privacy", "require-secagg", False, bool),
            insecure=insecure,
            reconnect_budget=get("coordinator", "reconnect-budget", 300, int),
        )

    def node_config(self) -> str:
        """Flower's --node-config for this site (what the ClientApp reads: tace.common.config.SiteConfig)."""
        items = {
            "site-id": self.site_id, "manifest-path": str(self.manifest.resolve()), "cache-dir": str(self.cache.resolve()),
            "output-dir": str(self.output.resolve()), "device": self.device, "threads": self.threads,
            "min-patients": self.min_patients, "min-cell-count": self.min_cell_count,
            "share-patient-level": "true" if self.share_patient_level else "false", "max-epsilon": self.max_epsilon,
            "require-dp": "true" if self.require_dp else "false", "require-secagg": "true" if self.require_secagg else "false",
        }  # fmt: skip
        return " ".join(f"{k}={v}" if isinstance(v, int | float) else f"{k}={_quote(str(v))}" for k, v in items.items())


def _quote(text: str) -> str:
    if "'" in text:
        raise ConfigError(f"paths in site.toml must not contain a single quote: {text}")
    return f"'{text}'"


#: Lines in the SuperNode's output (or the site's ClientApp's, whose errors carry their reason code) and what the
#: site's IT team should do about them. All but `RETRYABLE` are beyond what a restart can fix.
FATAL = (
    ("Failed to activate SuperNode", "the coordinator does not accept this site's key: send {pub} to the coordinator "
     "(`tace-server sites add {site} {pub}`) and check [auth] private-key in {config}; the coordinator restarts to take it up"),
    ("CERTIFICATE_VERIFY_FAILED", "the coordinator's certificate is not signed by the CA certificate in [coordinator] "
     "ca-certificate ({ca}): you may have an old or wrong ca.crt, or this is not the study's coordinator. Ask the "
     "coordinator for ca.crt and compare its fingerprint ({fingerprint}) by phone"),
    ("Hostname mismatch", "the coordinator's certificate is not valid for the address {address}: use the name it was "
     "issued for (`tace-server init --host`), or ask the coordinator to issue it for this address"),
    ("IP address mismatch", "the coordinator's certificate is not valid for the address {address}: use the name it was "
     "issued for (`tace-server init --host`), or ask the coordinator to issue it for this address"),
    ("WRONG_VERSION_NUMBER", "the coordinator at {address} does not speak TLS (or something else answers on that port): "
     "check the address and port, and ask the coordinator whether it started with --insecure"),
    ("authentication requires a secure TLS connection", "site authentication needs TLS: remove insecure = true from {config}"),
    ("[tace:version-mismatch]", "this site runs another TACE-FL version than the coordinator: install the coordinator's version "
     "(they read it from `tace-server --version`) and start the client again"),
    ("[tace:signature-mismatch]", "this site's TACE-FL installation builds other models than the coordinator's although the "
     "versions agree (a modified installation): reinstall TACE-FL and start the client again"),
)  # fmt: skip
#: Of `FATAL`, what can pass: a coordinator that answers without TLS may be back with TLS later (a test in --insecure
#: mode, another service on the port for a while). The supervisor says so and keeps trying.
RETRYABLE = ("WRONG_VERSION_NUMBER",)
#: The SuperNode stopped trying although its process lives on (Flower gives up after its reconnection budget, and
#: at once on a TLS error), or it lost its registration: the supervisor restarts it.
GAVE_UP = ("Giving up reconnection", "SSL/TLS handshake error detected", "does not recognize this SuperNode")
#: The SuperNode made progress (connected, or exchanged a message): it is not stuck.
PROGRESS = ("Connection successful", "Received successfully", "Sent successfully", "SuperNode ID:")
FAILING = "Connection attempt failed"


def preflight(settings: SiteSettings, validate: bool = True) -> list[str]:
    """Everything that can be checked before connecting; raises with what to fix. Returns lines to print."""
    from tace.common.validate import check_site

    lines = []
    if settings.insecure:
        lines.append("WARNING: insecure = true: the connection is NOT encrypted and the coordinator is NOT verified; test networks only")
    else:
        assert settings.ca_certificate is not None and settings.private_key is not None
        pki.read_certificate(settings.ca_certificate)
        pki.check_private_key(settings.private_key)
        lines.append(
            f"coordinator CA fingerprint: {pki.certificate_fingerprint(settings.ca_certificate)} (confirm it with the coordinator)"
        )
    for folder in (settings.cache, settings.output):
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise ConfigError(f"{folder} is not writable", "fix its permissions or choose another folder in site.toml")
    if validate:
        report = check_site(settings.manifest)
        if not report.ok:
            kinds: dict[str, int] = {}
            for p in report.problems:
                kinds[p.kind] = kinds.get(p.kind, 0) + 1
            raise TaceError(
                f"the site's manifest {settings.manifest} fails validation ({len(report.problems)} problem(s): "
                + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
                + "); the client was not started",
                f"run `tace-client check --manifest {settings.manifest}` for the list, fix it, and start again",
            )
        lines.append(f"manifest OK: {report.n_rows} patients")
    return lines


def probe(settings: SiteSettings, timeout_s: float = 10.0) -> str:
    """Check the coordinator's TLS before Flower connects, for a message Flower does not give (it retries a
    plaintext connection to a TLS server forever). Raises on what no retry can fix; returns a line to print."""
    import socket
    import ssl

    host, _, port = settings.address.rpartition(":")
    host = host.strip("[]")
    try:
        raw = socket.create_connection((host, int(port)), timeout=timeout_s)
    except OSError as exc:
        return f"the coordinator at {settings.address} is not reachable yet ({exc.strerror or exc}); the client keeps trying"
    with raw:
        if settings.insecure:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            try:
                with context.wrap_socket(raw, server_hostname=host):
                    pass
            except (ssl.SSLError, OSError):
                return f"the coordinator at {settings.address} answers without TLS (insecure test mode)"
            raise TaceError(f"the coordinator at {settings.address} uses TLS but site.toml sets insecure = true: a plaintext "
                            "connection is refused", "remove insecure = true and set [coordinator] ca-certificate and [auth] private-key")  # fmt: skip
        context = ssl.create_default_context(cafile=str(settings.ca_certificate))
        try:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                tls.getpeercert()
        except ssl.SSLCertVerificationError as exc:
            pattern = "Hostname mismatch" if "mismatch" in str(exc.verify_message).lower() else "CERTIFICATE_VERIFY_FAILED"
            raise TaceError(f"site {settings.site_id} could not verify the coordinator: {_advice(pattern, settings)}",
                            f"({exc.verify_message})") from None  # fmt: skip
        except ssl.SSLError as exc:
            raise Plaintext(f"site {settings.site_id} could not verify the coordinator: {_advice('WRONG_VERSION_NUMBER', settings)}",
                            f"({exc.reason})") from None  # fmt: skip
    return f"the coordinator at {settings.address} presented a certificate signed by the study CA"


class Plaintext(TaceError):
    """The coordinator answers without TLS: fatal at start (the operator is there to check the address), retried
    while the site runs (the coordinator may be back with TLS)."""


def _advice(line: str, settings: SiteSettings) -> str | None:
    """What to do about `line` of the SuperNode's output, if it is one of `FATAL`'s."""
    for pattern, advice in FATAL:
        if pattern in line:
            fingerprint = pki.certificate_fingerprint(settings.ca_certificate) if settings.ca_certificate else "-"
            pub = settings.private_key.with_suffix(".pub") if settings.private_key else "SITE.pub"
            return advice.format(pub=pub, site=settings.site_id, config=settings.path, ca=settings.ca_certificate,
                                 fingerprint=fingerprint, address=settings.address)  # fmt: skip
    return None


def _fatal(line: str, settings: SiteSettings) -> str | None:
    """What to do about `line`, if no restart can fix it (None otherwise)."""
    return None if any(p in line for p in RETRYABLE) else _advice(line, settings)


def _pump(stream: Any, lines: queue.Queue[str | None]) -> None:
    with stream:
        for line in stream:
            lines.put(line)
    lines.put(None)


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop()


@dataclass(frozen=True)
class Outcome:
    """How one SuperNode run ended: `kind` is "fatal" (no restart can help; `detail` says what to do), "gave-up",
    "stalled" or "exited" (a restart can help; `detail` says why it is needed)."""

    kind: str
    detail: str
    activation: bool = False  # the coordinator refused to activate this site's node


#: Seconds during which refused activations are retried before they count as a refused key: the SuperLink lists a
#: site's node as online until its heartbeats expire (Flower: 2 x 30 s after the last one) and refuses to activate
#: it again meanwhile: after the site restarted (a reboot, a crash) or the SuperLink did. The SuperNode only says
#: "Failed to activate SuperNode" in both cases, so a refusal that lasts longer than that is the key's.
STALE_S = 70.0


class Supervisor:
    """Runs the site's SuperNode, restarts it when it gave up, stalled or exited, and ends on what no restart fixes.

    `command` replaces Flower's SuperNode (tests run a stand-in that prints what Flower prints); `first_delay_s` and
    `max_delay_s` bound the pause before a restart, which doubles after every restart and starts over once a
    SuperNode ran healthy for `healthy_s`; `stall_s` (default: the reconnection budget and a minute) is how long a
    SuperNode may fail to connect without giving up before it counts as stuck.
    """

    def __init__(self, settings: SiteSettings, echo: bool = True, command: list[str] | None = None, max_restarts: int | None = None,
                 first_delay_s: float = 2.0, max_delay_s: float = 60.0, healthy_s: float = 300.0, stall_s: float | None = None) -> None:  # fmt: skip
        self.settings, self.echo, self.max_restarts = settings, echo, max_restarts
        self.first_delay_s, self.max_delay_s, self.healthy_s = first_delay_s, max_delay_s, healthy_s
        threads = str(settings.threads) if settings.threads else None
        extra = {k: threads for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")} if threads else {}
        extra["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = "0.1"  # start the ClientApp process sooner (Flower's default: 1 s)
        self.env = flower_env((settings.cache / "flwr").resolve(), extra)
        self.command = command or self._supernode()
        budget = settings.reconnect_budget
        # Failing to connect for longer than Flower's own budget (and a margin) means the SuperNode is stuck.
        self.stall_s = stall_s if stall_s is not None else ((budget + 60.0) if budget > 0 else 900.0)
        self.log_path = settings.output / "logs" / "client.log"
        self.refused_since: float | None = None  # the first of the activation refusals in a row

    def _supernode(self) -> list[str]:
        settings = self.settings
        cmd = [str(flower_executable("flower-supernode", self.env)), "--superlink", settings.address, "--node-config",
               settings.node_config(), "--port", str(settings.runtime_port)]  # fmt: skip
        if settings.reconnect_budget > 0:
            cmd += ["--max-wait-time", str(settings.reconnect_budget)]
        if settings.insecure:
            cmd.append("--insecure")
        else:
            cmd += ["--root-certificates", str(settings.ca_certificate), "--auth-supernode-private-key", str(settings.private_key)]
        return cmd

    def say(self, text: str) -> None:
        """A line of the supervisor's own: on its output and in the site's log."""
        line = f"tace-client: {text}"
        print(line, flush=True)
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(line + "\n")

    def run(self) -> int:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        previous = signal.signal(signal.SIGTERM, _raise_stop)
        restarts, delay = 0, self.first_delay_s
        proc: subprocess.Popen[str] | None = None
        try:
            while True:
                started = time.monotonic()
                proc = subprocess.Popen(self.command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True, preexec_fn=die_with_parent())  # fmt: skip
                assert proc.stdout is not None
                lines: queue.Queue[str | None] = queue.Queue()
                pump = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
                pump.start()
                outcome = self._watch(proc, lines)
                self._stop(proc)
                pump.join(timeout=10)  # the pipe ends with the SuperNode's process group
                if outcome.kind == "fatal" and outcome.activation:
                    self.refused_since = self.refused_since or time.monotonic()
                    if time.monotonic() - self.refused_since < STALE_S:
                        outcome = Outcome("refused", "was refused activation, which the coordinator does for a minute after the site "
                                                     "or the coordinator restarted (it still lists the site online)")  # fmt: skip
                if outcome.kind == "fatal":
                    raise TaceError(f"site {self.settings.site_id} could not take part in the study: {outcome.detail}",
                                    f"the full log is {self.log_path}")  # fmt: skip
                restarts += 1
                if self.max_restarts is not None and restarts > self.max_restarts:
                    raise TaceError(f"the SuperNode stopped {restarts} times (last: {outcome.detail})", f"see {self.log_path}")
                delay = self.first_delay_s if time.monotonic() - started > self.healthy_s else min(delay * 2, self.max_delay_s)
                self.say(f"the SuperNode {outcome.detail}; restarting it in {delay:.0f} s")
                time.sleep(delay)
                self._check_coordinator()
        except (_Stop, KeyboardInterrupt):
            print("site client stopped", flush=True)
            return 0
        finally:
            if proc is not None:
                self._stop(proc, grace_s=15.0)
            signal.signal(signal.SIGTERM, previous)

    def _stop(self, proc: subprocess.Popen[str], grace_s: float = 5.0) -> None:
        """Stop the SuperNode's process group, then whatever it started in a session of its own (a ClientApp process):
        they all run with the site's Flower home folder."""
        stop_group(proc, grace_s=grace_s)
        end_processes(with_flower_home(Path(self.env["FLWR_HOME"])), grace_s=grace_s)

    def _check_coordinator(self) -> None:
        """Before a restart: what no restart can fix (the coordinator's certificate) ends the client here."""
        try:
            self.say(probe(self.settings))
        except Plaintext as exc:
            self.say(f"{exc.message}; trying again")
        except TaceError as exc:
            raise TaceError(
                f"{exc.message} (checked before restarting the SuperNode)", f"{exc.hint}; the full log is {self.log_path}"
            ) from None

    def _watch(self, proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> Outcome:
        """Read the SuperNode's output (into the site's log) until it ended, gave up, stalled or said something fatal."""
        exiting_since: float | None = None
        failing_since: float | None = None
        gave_up: tuple[float, str] | None = None
        with open(self.log_path, "a", encoding="utf-8") as log:
            while True:
                now = time.monotonic()
                if gave_up is not None and now - gave_up[0] > 2.0:
                    return Outcome("gave-up", gave_up[1])  # the lines after its last words are read: none was fatal
                if exiting_since is not None and (now - exiting_since > 3 or proc.poll() is not None):
                    # The SuperNode announced its exit: its SuperExec child would keep the pipe open retrying a
                    # connection to it, so end the whole group once the reason has been read.
                    return Outcome("exited", f"exited (status {proc.poll()})")
                if failing_since is not None and now - failing_since > self.stall_s:
                    return Outcome("stalled", f"made no progress for {now - failing_since:.0f} s (failing to reach the coordinator)")
                try:
                    line = lines.get(timeout=0.5)
                except queue.Empty:
                    continue
                if line is None:
                    return Outcome("exited", f"exited (status {proc.wait()})")
                log.write(line)
                log.flush()
                if self.echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                if (advice := _fatal(line, self.settings)) is not None:
                    return Outcome("fatal", advice, activation="Failed to activate SuperNode" in line)
                if any(p in line for p in GAVE_UP) and gave_up is None:
                    gave_up = (now, f"gave up reconnecting ({_advice(line, self.settings) or line.strip()[-200:]})")
                elif gave_up is not None and (advice := _advice(line, self.settings)) is not None:
                    gave_up = (gave_up[0], f"gave up reconnecting: {advice}")
                if FAILING in line and failing_since is None:
                    failing_since = now
                elif any(p in line for p in PROGRESS):
                    failing_since, self.refused_since = None, None
                if "Exit Code:" in line and exiting_since is None:
                    exiting_since = now


def run_site(settings: SiteSettings, max_restarts: int | None = None, echo: bool = True) -> int:
    """Run the SuperNode until stopped, restarting it when a restart can help (`Supervisor`)."""
    return Supervisor(settings, echo=echo, max_restarts=max_restarts).run()
