"""Deployment set-up without a network: study folders, certificates, site keys, site.toml, and the refusals a
hospital's IT team sees before anything connects."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tace.client.cli import main as client_main
from tace.client.deploy import SiteSettings, _fatal, preflight
from tace.common import pki
from tace.common.errors import ConfigError, TaceError
from tace.server.cli import main as server_main
from tace.server.study import Study
from tests.helpers import set_cell


def site_toml(path: Path, manifest: Path, ca: Path, key: Path, **extra: str) -> Path:
    lines = [
        "[site]", 'id = "site-a"', f'manifest = "{manifest}"', f'cache = "{path.parent / "cache"}"', f'output = "{path.parent / "out"}"',
        "[coordinator]", 'address = "localhost:9092"', f'ca-certificate = "{ca}"', "[auth]", f'private-key = "{key}"',
        "[compute]", 'device = "cpu"', "threads = 2",
    ]  # fmt: skip
    for k, v in extra.items():  # replace a key in its section
        lines = [f"{k} = {v}" if line.startswith(f"{k} =") else line for line in lines]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_init_creates_ca_server_certificate_and_instructions(tmp_path, capsys):
    assert server_main(["init", str(tmp_path / "s"), "--name", "Pilot", "--host", "coord.example.org", "--host", "10.1.2.3",
                        "--expected-sites", "3"]) == 0  # fmt: skip
    study = Study.open(tmp_path / "s")
    assert set(pki.certificate_names(study.server_cert)) == {"coord.example.org", "10.1.2.3", "localhost", "127.0.0.1"}
    assert pki.verify_issued_by(study.server_cert, study.ca_cert)
    assert (study.path / "pki" / "ca.key").stat().st_mode & 0o077 == 0 and study.server_key.stat().st_mode & 0o077 == 0
    fingerprint = pki.certificate_fingerprint(study.ca_cert)
    assert fingerprint in capsys.readouterr().out and fingerprint in (study.path / "FOR-SITES.md").read_text()
    assert "coord.example.org:9092" in (study.path / "FOR-SITES.md").read_text()
    assert study.run_config().expected_sites == 3
    # openssl, the tool IT teams check with, agrees on the chain and the fingerprint
    out = subprocess.run(["openssl", "verify", "-CAfile", study.ca_cert, study.server_cert], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    out = subprocess.run(["openssl", "x509", "-in", study.ca_cert, "-noout", "-fingerprint", "-sha256"], capture_output=True, text=True)
    assert out.stdout.strip().endswith(fingerprint)
    assert server_main(["init", str(tmp_path / "s")]) == 2  # not over an existing study


def test_keygen_and_site_registration(tmp_path, capsys):
    assert server_main(["init", str(tmp_path / "s"), "--host", "localhost"]) == 0
    assert client_main(["keygen", "--site", "site-a", "--out", str(tmp_path / "k")]) == 0
    out = capsys.readouterr().out
    key, pub = tmp_path / "k" / "site-a.key", tmp_path / "k" / "site-a.pub"
    assert key.stat().st_mode & 0o077 == 0
    pki.check_private_key(key)
    info = pki.read_public_key(pub)
    assert info.fingerprint in out
    # ssh-keygen (what an IT team would use) prints the same fingerprint
    ssh = subprocess.run(["ssh-keygen", "-lf", pub], capture_output=True, text=True)
    if ssh.returncode == 0:
        assert info.fingerprint in ssh.stdout
    assert client_main(["keygen", "--site", "site-a", "--out", str(tmp_path / "k")]) == 2  # never overwrites a key
    study = ["--study", str(tmp_path / "s")]
    assert server_main(["sites", "add", "site-a", str(pub), *study]) == 0
    assert info.fingerprint in capsys.readouterr().out
    assert server_main(["sites", "add", "site-a", str(pub), *study]) == 2  # the site again
    assert server_main(["sites", "add", "site-b", str(pub), *study]) == 2  # the same key for another site
    assert "already registered for site site-a" in capsys.readouterr().err
    assert server_main(["sites", "add", "site-c", str(key), *study]) == 2  # a private key by mistake
    assert "PRIVATE key" in capsys.readouterr().err
    (tmp_path / "rsa.pub").write_text("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC7 x\n")
    assert server_main(["sites", "add", "site-d", str(tmp_path / "rsa.pub"), *study]) == 2
    assert server_main(["sites", "add", "bad id!", str(pub), *study]) == 2
    assert server_main(["sites", "list", *study]) == 0
    assert "site-a" in capsys.readouterr().out
    assert json.loads((tmp_path / "s" / "sites.json").read_text()).keys() == {"site-a"}


def test_site_toml_is_checked_before_connecting(tiny_cohort, tmp_path, site_copy):
    manifest = site_copy("site-a")
    Study.init(tmp_path / "s", "t", ["localhost"])
    pki.generate_site_key(tmp_path, "site-a")
    ca, key = tmp_path / "s" / "pki" / "ca.crt", tmp_path / "site-a.key"
    settings = SiteSettings.read(site_toml(tmp_path / "site.toml", manifest, ca, key))
    assert (
        "site-id='site-a'" in settings.node_config() and "threads=2" in settings.node_config() and "device='cpu'" in settings.node_config()
    )
    assert any("manifest OK" in line for line in preflight(settings))
    with pytest.raises(ConfigError, match="HOST:PORT"):
        SiteSettings.read(site_toml(tmp_path / "bad.toml", manifest, ca, key, address='"localhost"'))
    with pytest.raises(ConfigError, match="threads must be a whole number"):
        SiteSettings.read(site_toml(tmp_path / "bad.toml", manifest, ca, key, threads='"four"'))
    with pytest.raises(ConfigError, match="does not exist"):
        SiteSettings.read(tmp_path / "missing.toml")
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by other users"):
        preflight(settings)
    key.chmod(0o600)
    (tmp_path / "junk.crt").write_text("not a certificate")
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        preflight(SiteSettings.read(site_toml(tmp_path / "c.toml", manifest, tmp_path / "junk.crt", key)))
    # A manifest that fails validation: the client refuses to start, with counts and kinds only.
    set_cell(manifest, 2, "age", "300")
    with pytest.raises(TaceError, match=r"fails validation \(1 problem\(s\): out-of-range 1\); the client was not started"):
        preflight(settings)
    assert client_main(["start", "--config", str(tmp_path / "site.toml")]) == 2


def test_supernode_failures_become_advice(tmp_path):
    Study.init(tmp_path / "s", "t", ["localhost"])
    pki.generate_site_key(tmp_path, "site-a")
    settings = SiteSettings.read(site_toml(tmp_path / "site.toml", tmp_path / "m.csv", tmp_path / "s/pki/ca.crt", tmp_path / "site-a.key"))
    assert "does not accept this site's key" in str(_fatal("[code: 2004] Failed to activate SuperNode.", settings))
    assert "not signed by the CA certificate" in str(_fatal("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed", settings))
    assert _fatal("Connection attempt failed, retrying in 0.35 seconds", settings) is None


def test_start_refuses_without_registered_sites_or_expected_sites(tmp_path):
    Study.init(tmp_path / "s", "t", ["localhost"])
    with pytest.raises(TaceError, match="no site is registered"):
        from tace.server.coordinator import start

        start(Study.open(tmp_path / "s"))
    assert server_main(["start", "--study", str(tmp_path / "s"), "--resume", "--insecure"]) == 2  # nothing to resume
    assert server_main(["status", "--study", str(tmp_path / "s")]) == 0
    assert server_main(["status", "--study", str(tmp_path / "nowhere")]) == 2


def test_site_privacy_settings_reach_the_clientapp(tiny_cohort, tmp_path, site_copy):
    """[privacy] max-epsilon and require-dp in site.toml become node config the ClientApp reads (the coordinator
    cannot change them)."""
    from flwr.common.config import parse_config_args

    from tace.common.config import RunConfig, SiteConfig

    manifest = site_copy("site-a")
    Study.init(tmp_path / "s", "t", ["localhost"])
    pki.generate_site_key(tmp_path, "site-a")
    path = site_toml(tmp_path / "site.toml", manifest, tmp_path / "s" / "pki" / "ca.crt", tmp_path / "site-a.key")
    path.write_text(path.read_text() + "[privacy]\nmax-epsilon = 3.5\nrequire-dp = true\n")
    node = parse_config_args([SiteSettings.read(path).node_config()])
    site = SiteConfig.from_node_config(node, RunConfig())
    assert site.max_epsilon == 3.5 and site.require_dp is True
    path.write_text(path.read_text().replace("max-epsilon = 3.5", 'max-epsilon = "high"'))
    with pytest.raises(ConfigError, match="max-epsilon must be a number"):
        SiteSettings.read(path)
