"""VRA settings: declared once, read from a JSON file, OVF properties or TIDEMARK_VRA_* variables.

TLS material comes either as paths (``tls_cert``, ``tls_key``, ``tls_ca``: a VRA configured by
hand) or as contents (``tls_cert_pem``, ``tls_key_pem``, ``tls_ca_pem``: base64 of PEM, what a
ZVM gives the appliance it deploys on another machine); ``load`` writes contents into the VRA's
own TLS folder (``tls.py``) and leaves the path settings pointing there.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path


@dataclass
class VRAConfig:
    name: str = "vra"                 # unique within the site, e.g. vra-<host>
    token: str = field(default="", repr=False)   # bearer token of the control API and the replication stream
    listen_host: str = "127.0.0.1"    # address of both listeners
    control_port: int = 0             # control API (0: any free port)
    replication_port: int = 0         # where recovery streams arrive (0: any free port)
    doorbell: str = ""                # the host's mirror doorbell socket ("" = no protected side)
    host_url: str = ""                # the host's control API (checkpoint barriers, bitmap sync)
    journal_path: str = ""            # RocksDB folder of the DSS journal ("" = no recovery side)
    journal_sync: bool = True         # fsync the journal's WAL before acknowledging
    ready_file: str = ""              # written with the listeners' addresses once serving
    state_dir: str = ""               # where the VRA keeps its VPG settings across restarts
    maintain_interval_s: float = 10.0  # how often the journal is promoted and its limits enforced
    tls_cert: str = ""                # this VRA's certificate from the pairing CA ("" = plain TCP,
    tls_key: str = ""                 #   allowed in the lab only); its key (0600)
    tls_ca: str = ""                  # the pairing CA that peers' certificates must chain to
    # the same as contents, base64 of PEM (written to <state_dir>/tls/ at start-up; appliance/vra/tls.py)
    tls_cert_pem: str = field(default="", repr=False)
    tls_key_pem: str = field(default="", repr=False)   # secret: written 0600, never logged
    tls_ca_pem: str = field(default="", repr=False)

    @classmethod
    def load(cls, path: str | None = None, props: dict | None = None,
             env: dict | None = None) -> "VRAConfig":
        data: dict = {}
        if path:
            data.update(json.loads(Path(path).read_text()))
        data.update(props or {})
        env = os.environ if env is None else env
        for f in fields(cls):
            key = f"TIDEMARK_VRA_{f.name.upper()}"
            if key in env:
                data[f.name] = env[key]
        known = {f.name: f for f in fields(cls)}
        unknown = set(data) - set(known) - {"role"}
        if unknown:
            raise ValueError(f"unknown VRA settings: {', '.join(sorted(unknown))}")
        out = {}
        for k, v in data.items():
            if k not in known:
                continue
            t = known[k].type
            if t in ("int", int):
                v = int(v)
            elif t in ("float", float):
                v = float(v)
            elif t in ("bool", bool):
                v = v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on")
            out[k] = v
        cfg = cls(**out)
        if not cfg.token:
            raise ValueError("a VRA needs a token (its control API is never open)")
        from .tls import materialize
        materialize(cfg)
        return cfg
