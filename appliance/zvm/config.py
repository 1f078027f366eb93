"""ZVM settings, declared once: the config file, ``TIDEMARK_ZVM_<NAME>`` variables and the docs
(docs/zvm.md) name the same settings the same way.

The file is TOML (``zvm.toml``); every setting has a default, so an empty file is a valid
configuration for a lab ZVM. Paths are relative to ``data_dir``.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError


@dataclass
class ZVMConfig:
    # --- the site this ZVM manages
    site_name: str = "site"                  # shown as the local site's name
    site_location: str = ""                  # free text, shown in /v1/localsite
    site_id: str = ""                        # generated at first start and kept in the store
    site_kind: str = "vsphere"               # vsphere (vCenter) or hyperv (SCVMM)
    # --- where it keeps its state
    data_dir: str = "zvm-data"               # SQLite store, TLS certificate, VRA settings
    # --- how it listens
    listen_host: str = "127.0.0.1"
    port: int = 9669                         # the ZVM's HTTPS port (Zerto uses 9669 too)
    tls: bool = True                         # HTTPS with the certificate generated at init
    tls_cert: str = "tls/zvm.crt"
    tls_key: str = "tls/zvm.key"
    public_host: str = ""                    # how peers reach this ZVM; default listen_host
    workers: int = 1                         # gunicorn workers (background jobs run in one)
    threads: int = 32                        # gunicorn threads per worker
    # --- authentication
    token_ttl_s: int = 3600                  # lifetime of an access token
    pairing_token_ttl_s: int = 3600          # lifetime of a pairing token
    # --- the hypervisor manager (see docs/zvm-hypervisors.md)
    hypervisor: dict = field(default_factory=lambda: {"kind": "simulator", "url": ""})
    # --- background jobs
    inventory_interval_s: float = 2.0        # inventory polling (changes noticed within 5 s)
    monitor_interval_s: float = 2.0          # VPG status, RPO, alerts
    peer_timeout_s: float = 10.0             # calls to the peer ZVM and to VRAs
    # --- VPGs (docs/zvm.md, "VPGs")
    vpg_checkpoint_interval_s: float = 5.0   # how often a VPG's leader VRA takes a checkpoint
    vpg_sync_timeout_s: float = 3600.0       # longest a delta (initial) sync call may take
    vpg_history_grace_s: float = 0.0         # HistoryNotMeetingSLA only after history + this since sync
    peer_check_interval_s: float = 3.0       # peer ZVM reachability checks (alert ZVM0002)
    # --- VRAs (docs/zvm.md, "VRAs")
    vra_check_interval_s: float = 2.0        # VRA status polling (alert VRA0001)
    vra_install_timeout_s: float = 120.0     # how long a deployed VRA may take to answer
    vra_replication_tls: bool = True         # VRAs speak mutual TLS with the pairing CAs

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, **overrides) -> "ZVMConfig":
        data: dict = {}
        if path:
            try:
                with open(path, "rb") as f:
                    data = tomllib.load(f)
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"cannot read the ZVM config {path}: {exc}") from exc
            base = Path(path).resolve().parent
            if "data_dir" in data and not os.path.isabs(data["data_dir"]):
                data["data_dir"] = str(base / data["data_dir"])
        names = {f.name: f for f in dataclasses.fields(cls)}
        for name, f in names.items():
            env = os.environ.get(f"TIDEMARK_ZVM_{name.upper()}")
            if env is not None and f.type in ("str", "int", "float", "bool"):
                data[name] = env
        data.update(overrides)
        unknown = set(data) - set(names)
        if unknown:
            raise ConfigError(f"unknown ZVM settings: {', '.join(sorted(unknown))}")
        cfg = cls()
        for name, value in data.items():
            setattr(cfg, name, _coerce(name, names[name].type, value))
        return cfg

    def path(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else Path(self.data_dir) / p

    @property
    def db_path(self) -> Path:
        return self.path("zvm.sqlite")

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.public_host or self.listen_host}:{self.port}"


def _coerce(name: str, typ: str, value):
    try:
        if typ == "bool":
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ == "int":
            return int(value)
        if typ == "float":
            return float(value)
        if typ == "str":
            return str(value)
        if typ == "dict" and isinstance(value, dict):
            return dict(value)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"setting {name} must be a {typ}, not {value!r}")
