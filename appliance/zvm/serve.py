"""Installing and serving a ZVM: ``tidemark zvm init`` and ``tidemark zvm serve``.

``init`` creates the data folder (0700), the SQLite store, a self-signed TLS certificate (its
SHA-256 fingerprint is printed so that clients can pin it), the first admin user and, on request,
an API client. Secrets go to files of mode 0600 in the data folder, never to logs.

``serve`` runs the Flask app under gunicorn (gthread worker: one process, many threads, so the
background jobs and the task runner live in exactly one place) over HTTPS unless ``tls = false``.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
from pathlib import Path

from .config import ZVMConfig


def _write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def make_certificate(cfg: ZVMConfig) -> str:
    """A self-signed certificate for the ZVM's HTTPS listener; returns its SHA-256 fingerprint."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    cert_path, key_path = cfg.path(cfg.tls_cert), cfg.path(cfg.tls_key)
    if cert_path.exists() and key_path.exists():
        return fingerprint(cert_path)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"tidemark-zvm {cfg.site_name}")])
    sans: list = [x509.DNSName("localhost")]
    for h in {cfg.listen_host, cfg.public_host or cfg.listen_host, "127.0.0.1"}:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    _write_secret(key_path, key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return fingerprint(cert_path)


def fingerprint(cert_path: Path) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def init(cfg: ZVMConfig, admin_user: str = "admin", admin_password: str | None = None,
         client: bool | dict = False) -> dict:
    """Idempotent install: what exists is kept; returns what a user needs to log in.
    ``client``: create an admin API client (a dict may give its client_id and client_secret)."""
    from .auth import Auth
    from .errors import Conflict
    from .store import Store
    data = Path(cfg.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    os.chmod(data, 0o700)
    out: dict = {"data_dir": str(data), "url": cfg.url}
    if cfg.tls:
        out["fingerprint"] = make_certificate(cfg)
        out["certificate"] = str(cfg.path(cfg.tls_cert))
    store = Store(cfg.db_path)
    auth = Auth(store, cfg.token_ttl_s)
    pw_file = data / "admin-password"
    if not any(u["name"] == admin_user for u in auth.users()):
        pw = admin_password or secrets.token_urlsafe(12)
        auth.add_user(admin_user, pw, "admin")
        _write_secret(pw_file, pw.encode())
    out.update(admin_user=admin_user, admin_password_file=str(pw_file))
    client_file = data / "api-client.json"
    if client and not client_file.exists():
        given = client if isinstance(client, dict) else {}
        try:
            c = auth.add_client("admin", "created at install",
                                client_id=given.get("client_id", "tidemark-admin"),
                                secret=given.get("client_secret"))
        except Conflict:
            c = None
        if c:
            _write_secret(client_file, json.dumps({"client_id": c["client_id"],
                                                   "client_secret": c["client_secret"]}).encode())
    if client_file.exists():
        out["api_client_file"] = str(client_file)
    store.close()
    return out


def serve(cfg: ZVMConfig) -> None:
    from gunicorn.app.base import BaseApplication

    from .app import create_app

    holder: dict = {}

    class App(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"{cfg.listen_host}:{cfg.port}")
            self.cfg.set("workers", 1)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("threads", cfg.threads)
            self.cfg.set("timeout", 120)
            self.cfg.set("graceful_timeout", 10)
            # clients keep connections open between polls; a 2 s keep-alive races their reuse
            self.cfg.set("keepalive", 75)
            self.cfg.set("accesslog", None)
            self.cfg.set("errorlog", "-")
            self.cfg.set("loglevel", "warning")
            if cfg.tls:
                self.cfg.set("certfile", str(cfg.path(cfg.tls_cert)))
                self.cfg.set("keyfile", str(cfg.path(cfg.tls_key)))

            def worker_exit(server, worker):
                app = holder.get("app")
                if app is not None:
                    app.config["ZVM"].stop()
            self.cfg.set("worker_exit", worker_exit)

        def load(self):
            holder["app"] = create_app(cfg)
            return holder["app"]

    App().run()

