"""Certificates and keys for a deployment: the study's certificate authority, the coordinator's TLS certificate,
and the sites' authentication key pairs (ECDSA P-384 in OpenSSH format, as Flower's SuperNode authentication wants).

Everything is generated locally with the `cryptography` package; private keys are written readable by their
owner only. Nothing here talks to the network.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tace.common.errors import ConfigError


@dataclass(frozen=True)
class KeyInfo:
    """A site's public key as registered with the coordinator."""

    text: str  # one OpenSSH line: "ecdsa-sha2-nistp384 AAAA... comment"
    fingerprint: str  # as `ssh-keygen -lf` prints it: "SHA256:..."


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def create_ca(folder: Path, name: str, days: int = 5 * 365) -> tuple[Path, Path]:
    """A self-signed certificate authority for one study: ``ca.crt`` (shared with sites) and ``ca.key`` (private)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} TACE-FL study CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "ca.crt", folder / "ca.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def _san(hosts: list[str]) -> list[object]:
    from cryptography import x509

    names: list[object] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c in host for c in " /:@"):
                raise ConfigError(f"{host!r} is neither an IP address nor a host name", "give names like coordinator.example.org") from None
            names.append(x509.DNSName(host))
    return names


def issue_server_certificate(ca_cert: Path, ca_key: Path, hosts: list[str], folder: Path, days: int = 825) -> tuple[Path, Path]:
    """The coordinator's TLS certificate, signed by the study CA, valid for every name and address in `hosts`
    (subject alternative names: sites connect to one of them). Writes ``server.crt`` and ``server.key``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise ConfigError("the server certificate needs at least one host name or IP address")
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(_san(hosts)), critical=False)  # type: ignore[arg-type]
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, encipher_only=False, decipher_only=False), critical=True
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(signer, hashes.SHA384())  # type: ignore[arg-type]
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "server.crt", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def certificate_fingerprint(path: Path) -> str:
    """SHA-256 fingerprint of a PEM certificate, as ``openssl x509 -noout -fingerprint -sha256`` prints it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = read_certificate(path)
    digest = cert.fingerprint(hashes.SHA256())
    del x509
    return ":".join(f"{b:02X}" for b in digest)


def read_certificate(path: Path) -> Any:
    from cryptography import x509

    if not path.is_file():
        raise ConfigError(f"certificate file {path} does not exist", "check the path in the configuration")
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise ConfigError(
            f"{path} is not a PEM certificate", "use the ca.crt file the coordinator sent (it starts with -----BEGIN CERTIFICATE-----)"
        ) from None


def certificate_names(path: Path) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for (its subject alternative names)."""
    from cryptography import x509

    cert = read_certificate(path)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + [str(v) for v in san.get_values_for_type(x509.IPAddress)]


def verify_issued_by(cert_path: Path, ca_path: Path) -> bool:
    """Whether `cert_path` was signed by the CA in `ca_path`."""
    cert, ca = read_certificate(cert_path), read_certificate(ca_path)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception):  # InvalidSignature has no common base we can name without importing it
        return False
    return True


def generate_site_key(folder: Path, site_id: str) -> tuple[Path, Path, KeyInfo]:
    """A site's authentication key pair: ``<site>.key`` (private, stays at the site) and ``<site>.pub`` (sent to
    the coordinator), ECDSA P-384 in OpenSSH format."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private = folder / f"{site_id}.key"
    public = folder / f"{site_id}.pub"
    if private.exists() or public.exists():
        raise ConfigError(f"{private} or {public} already exists", "keep the existing key pair, or move it away to make a new one")
    _write_private(
        private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    public.write_text(f"{line} tace-{site_id}\n", encoding="utf-8")
    return private, public, read_public_key(public)


def read_public_key(path: Path) -> KeyInfo:
    """Read and check a site's public key (OpenSSH ECDSA, as `tace-client keygen` writes it)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not path.is_file():
        raise ConfigError(f"public key file {path} does not exist", "ask the site for the .pub file `tace-client keygen` wrote")
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    if "PRIVATE KEY" in text:
        raise ConfigError(f"{path} holds a PRIVATE key", "the site must keep its .key file; ask for its .pub file instead")
    try:
        key = serialization.load_ssh_public_key(text.encode())
    except (ValueError, TypeError):
        raise ConfigError(f"{path} is not an OpenSSH public key", "ask the site for the .pub file `tace-client keygen` wrote") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(
            f"{path} is not an ECDSA key", "Flower's node authentication needs ECDSA keys: the site runs `tace-client keygen`"
        )
    blob = base64.b64decode(text.split()[1])
    fingerprint = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return KeyInfo(text, fingerprint)


def pem_key_fingerprint(pem: bytes) -> str:
    """The SHA-256 fingerprint of a PEM public key (how Flower's SuperLink logs a key it refused), as `read_public_key`
    and `ssh-keygen -lf` give it for the same key in OpenSSH format."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(pem)
    blob = base64.b64decode(key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def check_private_key(path: Path) -> None:
    """A site's private key must exist, load, and not be readable by others."""
    from cryptography.hazmat.primitives import serialization

    if not path.is_file():
        raise ConfigError(f"private key file {path} does not exist", "create the site's key pair with `tace-client keygen`")
    try:
        serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise ConfigError(
            f"{path} is not an unencrypted OpenSSH private key", "create the site's key pair with `tace-client keygen`"
        ) from None
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"private key {path} is readable by other users", f"run: chmod 600 {path}")
