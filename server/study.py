"""A study folder: what `tace-server init` creates and the other coordinator commands read.

Layout::

    STUDY/
      study.toml          name, the addresses sites connect to, port, expected sites
      run_config.toml     the study's run configuration (docs/training.md), edited before `start`
      pki/ca.crt          the study CA certificate: sent to every site
      pki/ca.key          the CA's private key: never leaves the coordinator
      pki/server.crt/.key the coordinator's TLS certificate (valid for the names in study.toml)
      sites/<site>.pub    registered sites' public keys; sites.json records their fingerprints
      FOR-SITES.md        what to send each site, with the CA fingerprint to check
      runs/<run>/         one folder per training run (run folder of docs/training.md)
      logs/               the SuperLink's and the runs' logs
      state/              the SuperLink's database, pid files, Flower's home folder
"""

from __future__ import annotations

import datetime as dt
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from tace.common import pki
from tace.common.config import RunConfig, check_site_id
from tace.common.errors import ConfigError, TaceError
from tace.common.launch import toml_value

DEFAULT_PORT = 9092


@dataclass(frozen=True)
class Study:
    path: Path

    # -- files -------------------------------------------------------------------------------------------------
    @property
    def ca_cert(self) -> Path:
        return self.path / "pki" / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.path / "pki" / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.path / "pki" / "server.key"

    @property
    def runs(self) -> Path:
        return self.path / "runs"

    @property
    def state(self) -> Path:
        return self.path / "state"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    # -- creation ----------------------------------------------------------------------------------------------
    @classmethod
    def init(cls, path: Path, name: str, hosts: list[str], port: int = DEFAULT_PORT, expected_sites: int = 0) -> Study:
        if path.exists() and any(path.iterdir()):
            raise TaceError(f"{path} exists and is not empty", "choose a new folder for the study")
        if not 1 <= port <= 65535:
            raise ConfigError(f"port {port} is not a TCP port (1-65535)")
        names = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))
        study = cls(path)
        for sub in ("pki", "sites", "runs", "logs", "state"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        ca_cert, ca_key = pki.create_ca(path / "pki", name)
        pki.issue_server_certificate(ca_cert, ca_key, names, path / "pki")
        (path / "study.toml").write_text(
            "# TACE-FL study: the coordinator's settings (tace-server reads this file).\n"
            "[study]\n"
            f"name = {toml_value(name)}\n"
            "# Names and addresses sites use to reach the coordinator (the server certificate is valid for exactly these).\n"
            f"hosts = [{', '.join(toml_value(h) for h in names)}]\n"
            "# The one TCP port sites connect to (Flower's SuperLink: Fleet, Control and Runtime APIs over HTTPS).\n"
            f"port = {port}\n"
            "# Interface to listen on: 0.0.0.0 for every interface, 127.0.0.1 for this machine only.\n"
            'listen = "0.0.0.0"\n',
            encoding="utf-8",
        )
        config = RunConfig(expected_sites=expected_sites).to_run_config()
        for key in ("cohort", "run-dir", "resume"):
            config.pop(key)
        lines = "\n".join(f"{k} = {toml_value(v)}" for k, v in config.items())
        (path / "run_config.toml").write_text(
            "# The study's run configuration: every key is explained in docs/training.md.\n"
            "# Set expected-sites and holdout-sites before `tace-server start`.\n" + lines + "\n",
            encoding="utf-8",
        )
        (path / "sites.json").write_text("{}\n", encoding="utf-8")
        study.write_site_instructions()
        return study

    def write_site_instructions(self) -> Path:
        settings = self.settings()
        fingerprint = pki.certificate_fingerprint(self.ca_cert)
        host = next((h for h in settings["hosts"] if h not in ("localhost", "127.0.0.1")), settings["hosts"][0])
        text = f"""# Joining the TACE-FL study "{settings["name"]}"

Send each site this file and `pki/ca.crt` (the study's CA certificate; it is public, the CA's key is not).

1. Install TACE-FL, the same version as the coordinator (`tace-server --version`).
2. `tace-client keygen --site SITE --out KEYDIR` and send us `KEYDIR/SITE.pub` (never the `.key` file).
3. Check the CA certificate you received: its SHA-256 fingerprint must be

       {fingerprint}

   (`openssl x509 -in ca.crt -noout -fingerprint -sha256`). Confirm it with us by phone or in person, not by the
   channel the file came through.
4. Copy `deploy/site.toml` from TACE-FL, fill it in: coordinator address `{host}:{settings["port"]}`, the CA
   certificate, the private key, the manifest. `tace-client check --manifest ...` must pass.
5. `tace-client start --config site.toml` (or the service unit / container in deploy/).

Firewall: the site only makes outgoing HTTPS connections to {host} port {settings["port"]}; nothing is opened at the site.
"""
        path = self.path / "FOR-SITES.md"
        path.write_text(text, encoding="utf-8")
        return path

    # -- reading -----------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path) -> Study:
        if not (path / "study.toml").is_file():
            raise TaceError(f"{path} is not a study folder (no study.toml)", "create one with `tace-server init DIR`, or pass --study DIR")
        return cls(path.resolve())

    def settings(self) -> dict[str, Any]:
        try:
            data = tomllib.loads((self.path / "study.toml").read_text(encoding="utf-8"))["study"]
            return {"name": str(data["name"]), "hosts": [str(h) for h in data["hosts"]], "port": int(data["port"]),
                    "listen": str(data.get("listen", "0.0.0.0"))}  # fmt: skip
        except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"{self.path / 'study.toml'} cannot be read ({exc})", "restore it from the template tace-server init wrote"
            ) from None

    def run_config(self, **overrides: Any) -> RunConfig:
        path = self.path / "run_config.toml"
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML ({exc})", "fix the line it names") from None
        try:
            return RunConfig.from_run_config({**data, **overrides}).resolved(self.path)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc.message}", exc.hint) from None

    # -- sites -------------------------------------------------------------------------------------------------
    def sites(self) -> dict[str, dict[str, str]]:
        return dict(json.loads((self.path / "sites.json").read_text(encoding="utf-8")))

    def add_site(self, site: str, key_file: Path) -> pki.KeyInfo:
        check_site_id(site)
        info = pki.read_public_key(key_file)
        sites = self.sites()
        if site in sites:
            raise TaceError(f"site {site} is already registered (key {sites[site]['fingerprint']})",
                            "remove sites/<site>.pub and its entry in sites.json first to replace its key")  # fmt: skip
        for other, entry in sites.items():
            if entry["fingerprint"] == info.fingerprint:
                raise TaceError(f"this key is already registered for site {other}", "every site needs its own key pair")
        (self.path / "sites" / f"{site}.pub").write_text(info.text + "\n", encoding="utf-8")
        sites[site] = {"fingerprint": info.fingerprint, "added": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        (self.path / "sites.json").write_text(json.dumps(sites, indent=2) + "\n", encoding="utf-8")
        return info

    # -- runs --------------------------------------------------------------------------------------------------
    def new_run(self) -> Path:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = self.runs / stamp
        n = 1
        while path.exists():
            n += 1
            path = self.runs / f"{stamp}-{n}"
        path.mkdir(parents=True)
        return path

    def latest_run(self) -> Path | None:
        runs = sorted((p for p in self.runs.iterdir() if p.is_dir()), key=lambda p: p.name) if self.runs.exists() else []
        return runs[-1] if runs else None

    def resumable_run(self) -> Path:
        run = self.latest_run()
        if run is None or not (run / "progress.json").exists():
            raise TaceError("there is no interrupted run to resume in this study", "start a new run with `tace-server start`")
        if (run / "summary.json").exists():
            raise TaceError(f"the latest run {run.name} finished", "start a new run with `tace-server start` (without --resume)")
        return run


def local_host_names() -> list[str]:
    """This machine's name, for a server certificate when the operator names no host."""
    names = [socket.getfqdn(), socket.gethostname()]
    return [n for n in dict.fromkeys(names) if n and n != "localhost"]
