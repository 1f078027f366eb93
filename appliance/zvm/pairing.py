"""Pairing material: one-time pairing tokens and the site's replication CA.

Pairing tokens (``POST /v1/peersites/generatetoken``) are 32 random bytes shown once; the
store keeps only their SHA-256 and expiry (``pairing_tokens`` table), and using one deletes it
in the same transaction, so a token pairs at most one site.

The replication CA (``<data_dir>/pki/ca.pem``, key ``ca.key`` 0600) is made on first use. Each
of this site's VRAs gets a certificate from it; a VRA trusts the certificates of its own site's
CA and of every paired site's CA (the CA certificates are what pairing exchanges: public, no
keys), so VRAs of paired sites speak mutual TLS (``appliance/pki.py``).
"""
from __future__ import annotations

import hashlib
import secrets
import time
from pathlib import Path

from .errors import Unauthorized


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class PairingTokens:
    def __init__(self, store, ttl_s: float):
        self.store, self.ttl = store, ttl_s

    def generate(self) -> tuple[str, float]:
        """A new one-time token and its expiry (epoch seconds)."""
        token = secrets.token_urlsafe(32)
        expires = time.time() + self.ttl
        with self.store.transaction() as c:
            c.execute("DELETE FROM pairing_tokens WHERE expires < ?", (time.time(),))
            c.execute("INSERT INTO pairing_tokens VALUES (?, ?)", (_hash(token), expires))
        return token, expires

    def consume(self, token: str) -> None:
        """Use the token up; Unauthorized if it is unknown, used or expired."""
        with self.store.transaction() as c:
            row = c.execute("SELECT expires FROM pairing_tokens WHERE token_hash=?",
                            (_hash(token),)).fetchone()
            if row is None:
                raise Unauthorized("the pairing token is unknown or was used already: generate a "
                                   "new one on this site (POST /v1/peersites/generatetoken)")
            c.execute("DELETE FROM pairing_tokens WHERE token_hash=?", (_hash(token),))
        if row[0] < time.time():
            raise Unauthorized("the pairing token has expired: generate a new one on this site "
                               "(POST /v1/peersites/generatetoken)")


class SiteCA:
    """This site's replication CA and the trust bundles its VRAs use."""

    def __init__(self, directory: Path, site_name: str):
        self.dir = Path(directory)
        self.site_name = site_name

    @property
    def ca_pem(self) -> Path:
        return self.dir / "ca.pem"

    def ensure(self) -> str:
        """The CA certificate (PEM text), made on first use."""
        from appliance import pki
        if not (self.ca_pem.exists() and (self.dir / "ca.key").exists()):
            self.dir.mkdir(parents=True, exist_ok=True)
            self.dir.chmod(0o700)
            pki.make_ca(self.dir, name=f"Tidemark {self.site_name} replication CA")
        return self.ca_pem.read_text()

    def issue_pem(self, hosts: tuple[str, ...], name: str = "vra") -> tuple[bytes, bytes]:
        """A VRA's certificate and key as PEM bytes, written nowhere (the key goes to the VRA)."""
        from appliance import pki
        self.ensure()
        return pki.issue_pem(name, self.ca_pem, self.dir / "ca.key", hosts=hosts)

    def bundle(self, peer_cas: list[str]) -> tuple[str, str]:
        """The PEM trust bundle (own CA, then the peers' CAs sorted) and its short hash."""
        pems = [self.ensure().strip()] + sorted({p.strip() for p in peer_cas if p})
        text = "\n".join(pems) + "\n"
        return text, hashlib.sha256(text.encode()).hexdigest()[:16]
