"""The site's supervisor (`tace-client start`) never leaves a site hanging: a SuperNode that gave up reconnecting
(Flower keeps its process alive), stalled or exited is restarted, and what no restart can fix ends the client with
its reason. A stand-in SuperNode prints what Flower's prints, so each case happens in seconds; the same cases
against a real SuperLink are in test_deployment.py."""

from __future__ import annotations

import socket
import ssl
import sys
import threading

import pytest

from tace.client.deploy import SiteSettings, Supervisor
from tace.common import pki
from tace.common.errors import TaceError
from tace.common.launch import alive, free_port
from tace.server.study import Study
from tests.test_deploy_config import site_toml

#: A stand-in for flower-supernode: run n prints the lines of the n-th argument after the folder, then hangs (the
#: last line is "HANG", as Flower's process after it gave up) or exits ("EXIT <status>"); "SLEEP <s>" pauses. Each run
#: leaves its pid.
FAKE = """
import os, sys, time
from pathlib import Path
folder = Path(sys.argv[1])
n = len(list(folder.glob("run-*"))) + 1
(folder / f"run-{n}").write_text(str(os.getpid()))
lines = sys.argv[1 + n].split("|")
for line in lines[:-1]:
    if line.startswith("SLEEP "):
        time.sleep(float(line.split()[1]))
    else:
        print(line, flush=True)
if lines[-1].startswith("EXIT"):
    sys.exit(int(lines[-1].split()[1]))
while True:
    time.sleep(1)
"""


@pytest.fixture
def site(tmp_path):
    Study.init(tmp_path / "s", "t", ["localhost"])
    pki.generate_site_key(tmp_path, "site-a")
    port = free_port()  # nothing listens there: the coordinator is "not reachable yet"
    path = site_toml(tmp_path / "site.toml", tmp_path / "m.csv", tmp_path / "s/pki/ca.crt", tmp_path / "site-a.key",
                     address=f'"localhost:{port}"')  # fmt: skip
    (tmp_path / "fake.py").write_text(FAKE)
    (tmp_path / "runs").mkdir()
    return SiteSettings.read(path)


def supervise(settings: SiteSettings, *runs: str, **options) -> Supervisor:
    folder = settings.path.parent
    command = [sys.executable, str(folder / "fake.py"), str(folder / "runs"), *runs]
    return Supervisor(settings, echo=False, command=command, first_delay_s=0.1, max_delay_s=0.2, **options)


def pids(settings: SiteSettings) -> list[int]:
    return [int(p.read_text()) for p in sorted((settings.path.parent / "runs").glob("run-*"))]


def test_a_supernode_that_gave_up_is_restarted_until_a_restart_cannot_help(site):
    gave_up = ("Connection attempt failed, retrying in 0.25 seconds|SSL/TLS handshake error detected.|"
               "Giving up reconnection after 35.16 seconds and 8 tries.|[SSL: WRONG_VERSION_NUMBER] wrong version number|HANG")  # fmt: skip
    lost = "SuperNode ID: 7|Heartbeat failed unexpectedly. The SuperLink does not recognize this SuperNode.|HANG"
    crashed = "SuperNode ID: 7|Exit Code: 300|EXIT 1"
    mismatch = ("SuperNode ID: 7|Received successfully|[tace:version-mismatch] this site runs TACE-FL 0.0.9 but the coordinator "
                "runs 0.1.0|HANG")  # fmt: skip
    with pytest.raises(TaceError) as info:
        supervise(site, gave_up, lost, crashed, mismatch).run()
    assert "could not take part in the study: this site runs another TACE-FL version" in info.value.message
    assert len(pids(site)) == 4 and not any(alive(p) for p in pids(site))  # three restarts; none of them left running
    log = (site.output / "logs" / "client.log").read_text()
    assert "the SuperNode gave up reconnecting: the coordinator at" in log and "does not speak TLS" in log  # retried, not fatal
    assert "does not recognize this SuperNode.); restarting it" in log and "exited (status 1); restarting it" in log
    assert "is not reachable yet" in log  # the coordinator was checked before each restart


def test_a_stalled_supernode_is_restarted_and_a_refused_key_ends_the_client(site, monkeypatch):
    """A SuperNode failing to connect without giving up is restarted; activation refusals are retried while they
    could be the coordinator's stale state (a restart within a minute), then the key counts as refused."""
    from tace.client import deploy

    monkeypatch.setattr(deploy, "STALE_S", 3.0)
    stalled = "Connection attempt failed, retrying in 0.25 seconds|HANG"  # then silence: Flower retries forever
    refused = "Exit Code: 202|Failed to initialize the connection to the SuperLink.|[code: 2004] Failed to activate SuperNode.|HANG"
    with pytest.raises(TaceError, match="the coordinator does not accept this site's key: send .*site-a.pub"):
        supervise(site, stalled, refused, refused, "SLEEP 3|" + refused, stall_s=1.5).run()
    assert len(pids(site)) == 4 and not any(alive(p) for p in pids(site))
    log = (site.output / "logs/client.log").read_text()
    assert "made no progress for 2 s (failing to reach the coordinator); restarting it" in log
    assert log.count("was refused activation, which the coordinator does for a minute") == 2


def test_a_changed_coordinator_certificate_ends_the_client_before_a_restart(site, tmp_path):
    """The coordinator comes back with a certificate of another CA: the SuperNode exits, and the supervisor's own
    check of the coordinator finds a certificate the site's CA did not sign: exit with the CA message."""
    other_ca, other_key = pki.create_ca(tmp_path / "other", "another study")
    cert, key = pki.issue_server_certificate(other_ca, other_key, ["localhost"], tmp_path / "other")
    server = socket.create_server(("localhost", int(site.address.rsplit(":", 1)[1])))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        with pytest.raises(TaceError) as info:
            supervise(site, "Connection attempt failed, retrying in 0.25 seconds|Exit Code: 202|EXIT 1", "EXIT 0").run()
    finally:
        server.close()
    assert "not signed by the CA certificate" in info.value.message and "checked before restarting the SuperNode" in info.value.message
    assert len(pids(site)) == 1 and not alive(pids(site)[0])  # no SuperNode was started against that coordinator


def test_site_toml_reconnect_budget_reaches_the_supernode(site, tmp_path):
    text = site.path.read_text().replace("[auth]", "reconnect-budget = 45\n[auth]")
    site.path.write_text(text)
    settings = SiteSettings.read(site.path)
    command = Supervisor(settings, echo=False).command
    assert command[command.index("--max-wait-time") + 1] == "45"
    assert Supervisor(settings).stall_s == 105.0
    site.path.write_text(text.replace("reconnect-budget = 45", "reconnect-budget = 0"))  # 0: Flower retries forever
    assert "--max-wait-time" not in Supervisor(SiteSettings.read(site.path), echo=False).command
