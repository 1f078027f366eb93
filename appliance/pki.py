"""Certificates for traffic between sites: a CA per site pairing, and leaf certificates from it.

When two sites pair, the pairing issues a CA and, from it, a certificate for
each replication endpoint; the VRAs then speak mutual TLS (TLS 1.2+, each side
checks the other's certificate against the pairing CA). Keys are written 0600.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write(path: Path, data: bytes, mode: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(directory: Path, name: str = "Tidemark pairing CA", days: int = 3650) -> tuple[Path, Path]:
    """Create ca.pem and ca.key in ``directory``; their paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    directory = Path(directory)
    _write(directory / "ca.key", _key_pem(key), 0o600)
    _write(directory / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return directory / "ca.pem", directory / "ca.key"


def issue_pem(name: str, ca_pem: Path, ca_key: Path, hosts=("127.0.0.1", "localhost"),
              days: int = 825) -> tuple[bytes, bytes]:
    """A certificate and its key for a replication endpoint (server and client use), as PEM
    bytes kept in memory (nothing written): ``(cert_pem, key_pem)``."""
    ca_cert = x509.load_pem_x509_certificate(Path(ca_pem).read_bytes())
    ca_priv = serialization.load_pem_private_key(Path(ca_key).read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_priv, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def issue(directory: Path, name: str, ca_pem: Path, ca_key: Path, hosts=("127.0.0.1", "localhost"),
          days: int = 825) -> tuple[Path, Path]:
    """Issue ``<name>.pem`` / ``<name>.key`` for a replication endpoint (server and client use)."""
    cert, key = issue_pem(name, ca_pem, ca_key, hosts, days)
    directory = Path(directory)
    _write(directory / f"{name}.key", key, 0o600)
    _write(directory / f"{name}.pem", cert, 0o644)
    return directory / f"{name}.pem", directory / f"{name}.key"


def server_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """Mutual TLS, server side: the peer must present a certificate from the pairing CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.check_hostname = True
    return ctx
