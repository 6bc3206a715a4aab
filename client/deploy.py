"""`tace-client start --config site.toml`: a hospital's connection to the study.

It reads the site's configuration (deploy/site.toml is the template), refuses to start when the manifest fails
validation or a certificate or key is unusable, then runs Flower's SuperNode with TLS and the site's key. The
SuperNode reconnects by itself after network interruptions; when it exits for another reason this supervisor
starts it again, except for errors no retry can fix (an unregistered key, a certificate that does not verify, a
plaintext connection), which end with a message saying what to do.
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
from tace.common.config import check_site_id
from tace.common.errors import ConfigError, TaceError
from tace.common.launch import flower_env, flower_executable, stop_group


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
    min_cell_count: int = 0
    share_patient_level: bool = False
    max_epsilon: float = 0.0
    require_dp: bool = False
    require_secagg: bool = False
    insecure: bool = False

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
            min_cell_count=get("privacy", "min-cell-count", 0, int),
            share_patient_level=get("privacy", "share-patient-level", False, bool),
            max_epsilon=float(get("privacy", "max-epsilon", 0.0, float)),
            require_dp=get("privacy", "require-dp", False, bool),
            require_secagg=get("privacy", "require-secagg", False, bool),
            insecure=insecure,
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


#: Lines in the SuperNode's output that no retry can fix, and what the site's IT team should do about them.
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
)  # fmt: skip


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
            raise TaceError(f"site {settings.site_id} could not verify the coordinator: {_fatal(pattern, settings)}",
                            f"({exc.verify_message})") from None  # fmt: skip
        except ssl.SSLError as exc:
            raise TaceError(f"site {settings.site_id} could not verify the coordinator: {_fatal('WRONG_VERSION_NUMBER', settings)}",
                            f"({exc.reason})") from None  # fmt: skip
    return f"the coordinator at {settings.address} presented a certificate signed by the study CA"


def _fatal(line: str, settings: SiteSettings) -> str | None:
    for pattern, advice in FATAL:
        if pattern in line:
            fingerprint = pki.certificate_fingerprint(settings.ca_certificate) if settings.ca_certificate else "-"
            pub = settings.private_key.with_suffix(".pub") if settings.private_key else "SITE.pub"
            return advice.format(pub=pub, site=settings.site_id, config=settings.path, ca=settings.ca_certificate,
                                 fingerprint=fingerprint, address=settings.address)  # fmt: skip
    return None


def _pump(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop()


def run_site(settings: SiteSettings, max_restarts: int | None = None, echo: bool = True) -> int:
    """Run the SuperNode until stopped; restart it when it exits for a reason a retry can fix."""
    log_dir = settings.output / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    threads = str(settings.threads) if settings.threads else None
    extra = {k: threads for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")} if threads else {}
    extra["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = "0.1"  # start the ClientApp process sooner (Flower's default: 1 s)
    env = flower_env((settings.cache / "flwr").resolve(), extra)
    cmd = [str(flower_executable("flower-supernode", env)), "--superlink", settings.address, "--node-config", settings.node_config(),
           "--port", str(settings.runtime_port)]  # fmt: skip
    if settings.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(settings.ca_certificate), "--auth-supernode-private-key", str(settings.private_key)]
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    restarts, delay = 0, 2.0
    proc: subprocess.Popen[str] | None = None
    try:
        while True:
            started = time.monotonic()
            with open(log_dir / "client.log", "a", encoding="utf-8") as log:
                proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
                assert proc.stdout is not None
                fatal = None
                lines: queue.Queue[str | None] = queue.Queue()
                threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
                exiting_since: float | None = None
                while True:
                    try:
                        line = lines.get(timeout=1.0)
                    except queue.Empty:
                        # The SuperNode announced its exit: its SuperExec child would keep the pipe open retrying a
                        # connection to it, so end the whole group once the reason has been read.
                        if exiting_since is not None and (time.monotonic() - exiting_since > 3 or proc.poll() is not None):
                            break
                        continue
                    if line is None:
                        break
                    log.write(line)
                    log.flush()
                    if echo:
                        sys.stdout.write(line)
                        sys.stdout.flush()
                    fatal = fatal or _fatal(line, settings)
                    if "Exit Code:" in line and exiting_since is None:
                        exiting_since = time.monotonic()
                stop_group(proc)
            if fatal:
                raise TaceError(f"site {settings.site_id} could not join the study: {fatal}", f"the full log is {log_dir / 'client.log'}")
            restarts += 1
            if max_restarts is not None and restarts > max_restarts:
                raise TaceError(
                    f"the SuperNode stopped {restarts} times (last exit status {proc.returncode})", f"see {log_dir / 'client.log'}"
                )
            delay = 2.0 if time.monotonic() - started > 300 else min(delay * 2, 60.0)
            print(f"the connection to the coordinator ended (exit status {proc.returncode}); reconnecting in {delay:.0f} s", flush=True)
            time.sleep(delay)
    except (_Stop, KeyboardInterrupt):
        print("site client stopped", flush=True)
        return 0
    finally:
        if proc is not None:
            stop_group(proc, grace_s=15.0)
        signal.signal(signal.SIGTERM, previous)
