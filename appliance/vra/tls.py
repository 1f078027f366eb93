"""The VRA's replication TLS material, kept in the VRA's own directory (docs/vra.md, "TLS").

A VRA deployed by a ZVM runs on another machine than the ZVM, so it is given the certificate
material itself, not paths: the OVF properties ``tls_cert_pem``, ``tls_key_pem`` and
``tls_ca_pem`` carry the base64 of the PEM text (one line each: OVF environments, vSphere
extraConfig and guestinfo keep it as it is). At start-up (``VRAConfig.load``) ``materialize``
decodes them, checks they are PEM, and writes them into the TLS folder (``tls_dir``)::

    <state_dir>/tls/          (0700; without state_dir: <journal_path>.tls/)
        vra.pem               the certificate (0644)
        vra.key               its private key (0600)
        trust.pem             the trust bundle (0644)
        trust-pushed.pem      a newer trust bundle sent through the control API (0644)
        trust-pushed.json     {"sha256": of trust-pushed.pem, "over": of what it replaces}

and points ``tls_cert``/``tls_key``/``tls_ca`` there. The plain path settings (``tls_cert``,
``tls_key``, ``tls_ca``) still work for a VRA configured by hand; a ``*_pem`` property wins over
the path of the same item.

Trust bundle updates (``PUT /v1/tls/trust``, ``store_trust``): when sites pair or unpair, the
ZVM sends the new bundle and then restarts the appliance, whose OVF properties still hold the
bundle it was deployed with. The pushed bundle records the digest of the configuration it
replaces (``over``: the configured certificate and bundle); at start-up it is used while the
configuration is still that one. A redeploy (upgrade) brings properties of its own (a ZVM
issues a new certificate for every deployment), and the pushed bundle is dropped, even when
the new properties carry the same bundle as the old ones did.

Nothing here logs PEM contents; the key is written 0600 from the first byte.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger("tidemark.vra.tls")

ITEMS = (("tls_cert", "tls_cert_pem", "vra.pem", 0o644, b"-----BEGIN CERTIFICATE-----"),
         ("tls_key", "tls_key_pem", "vra.key", 0o600, b"-----BEGIN "),
         ("tls_ca", "tls_ca_pem", "trust.pem", 0o644, b"-----BEGIN CERTIFICATE-----"))
PUSHED, PUSHED_META = "trust-pushed.pem", "trust-pushed.json"


class TLSConfigError(ValueError):
    """The TLS settings are not usable (the message names the setting, never its value)."""
    status = 400


def encode(pem: bytes | str) -> str:
    """The property value of a PEM text: base64 on one line."""
    return base64.b64encode(pem.encode() if isinstance(pem, str) else pem).decode()


def decode(value: str, setting: str, begin: bytes = b"-----BEGIN ") -> bytes:
    """The PEM bytes of a property value: base64 of PEM (or PEM text itself, as written in a
    JSON config by hand)."""
    raw = value.strip().encode()
    if not raw.startswith(b"-----BEGIN "):
        try:
            raw = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise TLSConfigError(f"{setting} is neither base64 of PEM nor PEM") from None
    if begin not in raw or b"-----END " not in raw:
        raise TLSConfigError(f"{setting} does not hold {begin.decode().strip('-')} PEM")
    return raw


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _configured(cfg) -> str:
    """The digest of what a pushed bundle replaces: this VRA's certificate and the trust
    bundle it was configured with (not a pushed one)."""
    try:
        cert = Path(cfg.tls_cert).read_bytes()
        ca = Path(getattr(cfg, "configured_tls_ca", "") or cfg.tls_ca).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"cannot read the configured TLS files ({exc.strerror})") from None
    return digest(cert + b"\0" + ca)


def tls_dir(cfg) -> Path | None:
    """Where this VRA keeps its TLS material: ``<state_dir>/tls`` (``<journal_path>.tls``
    without a state_dir; None with neither)."""
    if cfg.state_dir:
        return Path(cfg.state_dir) / "tls"
    if cfg.journal_path:
        return Path(cfg.journal_path + ".tls")
    return None


def _private_dir(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    return d


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` atomically with ``mode`` from creation on (a key is never readable by
    others, not even for a moment)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.chmod(tmp, mode)
    tmp.replace(path)


def materialize(cfg) -> None:
    """Write the ``*_pem`` settings into the TLS folder and point the path settings at the
    files; then use a pushed trust bundle if it replaces the configured one. Changes ``cfg``
    in place (the ``*_pem`` settings are emptied: the key stays in memory no longer than
    needed)."""
    given = [(path_key, pem_key, name, mode, begin) for path_key, pem_key, name, mode, begin
             in ITEMS if getattr(cfg, pem_key)]
    d = tls_dir(cfg)
    if given:
        if d is None:
            raise TLSConfigError("tls_*_pem settings need a state_dir (or a journal_path) to "
                                 "write the TLS files into")
        _private_dir(d)
        for path_key, pem_key, name, mode, begin in given:
            data = decode(getattr(cfg, pem_key), pem_key, begin)
            write_file(d / name, data, mode)
            setattr(cfg, path_key, str(d / name))
            setattr(cfg, pem_key, "")
        log.info("TLS material from the settings %s written to %s",
                 ", ".join(g[1] for g in given), d)
    have = [bool(getattr(cfg, k)) for k, *_ in ITEMS]
    if any(have) and not all(have):
        raise TLSConfigError("TLS needs all of a certificate, its key and a trust bundle "
                             "(tls_cert/tls_cert_pem, tls_key/tls_key_pem, tls_ca/tls_ca_pem)")
    cfg.configured_tls_ca = cfg.tls_ca        # what a pushed bundle replaces (not a setting)
    if all(have) and d is not None:
        _use_pushed(cfg, d)


def _use_pushed(cfg, d: Path) -> None:
    meta_path, pushed = d / PUSHED_META, d / PUSHED
    try:
        meta = json.loads(meta_path.read_text())
        data = pushed.read_bytes()
    except (OSError, ValueError):
        return
    if meta.get("over") == _configured(cfg) and meta.get("sha256") == digest(data):
        cfg.tls_ca = str(pushed)
        log.info("using the trust bundle sent through the control API (%s…)", meta["sha256"][:16])
    else:      # the configured bundle changed since (a redeploy): it is the newer one
        pushed.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
        log.info("the configured trust bundle replaces the one sent earlier")


def store_trust(cfg, value: str) -> dict:
    """Keep a trust bundle sent through the control API (base64 of PEM, or PEM); used from the
    next start on (see the module doc). Answers ``{"sha256", "applies": "restart"}``."""
    d = tls_dir(cfg)
    if d is None or not cfg.tls_cert:
        e = TLSConfigError("this VRA does not use TLS, or has no folder to keep a trust bundle "
                           "in (no state_dir or journal_path)")
        e.status = 409
        raise e
    data = decode(value, "pem", b"-----BEGIN CERTIFICATE-----")
    over = _configured(cfg)
    _private_dir(d)
    write_file(d / PUSHED, data, 0o644)
    write_file(d / PUSHED_META, json.dumps({"sha256": digest(data), "over": over}).encode(), 0o600)
    log.info("trust bundle received (%s…); it applies when the VRA restarts", digest(data)[:16])
    return {"sha256": digest(data), "applies": "restart"}
