"""Appliance VMs: a VM created from an appliance image runs that appliance while powered on.

The image catalogue names the images the simulator can deploy (the same names
the OVA builds in ``packer/`` produce). Powering such a VM on writes its OVF
environment (its OVF properties plus the role of the image) and starts the
appliance guest agent as a child of the host process, so a host failure takes
the appliance down with it.

What the platform, not the deployer, gives an appliance:

- a VRA (``tidemark-vra``) is attached to the IO filter of the host it runs on: its
  ``doorbell`` (the host's mirror doorbell socket) and ``host_url`` (the host's control API)
  come from that host each time the VM powers on, so after a host restart the VRA is attached
  to the restarted host again;
- a property value written as a datastore path, ``[<datastore>] <folder>/<name>`` (the vSphere
  spelling), is given to the guest as that folder on the site's datastore (where a VRA keeps its
  journal and state, so they outlive the appliance VM).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from appliance import ovf

from .procs import spawn, stop_process
import psutil

IMAGES = {
    "tidemark-vra": {"role": "vra", "vcpus": 2, "memory_mib": 4096},
    "tidemark-zvm": {"role": "zvm", "vcpus": 2, "memory_mib": 8192},
    "tidemark-zca": {"role": "zca", "vcpus": 4, "memory_mib": 16384},
    "tidemark-vba": {"role": "vba", "vcpus": 2, "memory_mib": 4096},
}


_DS_PATH = re.compile(r"^\[([^\]]+)\] ?(.*)$")


class ApplianceProcess:
    def __init__(self, cfg: dict, workdir: Path, host=None):
        if cfg["image"] not in IMAGES:
            raise ValueError(f"unknown appliance image {cfg['image']!r}; known: {', '.join(IMAGES)}")
        self.cfg = cfg
        self.dir = workdir
        self.host = host            # simulator.host.Host running this VM (None: not on a host)
        self.proc = None

    def _platform_props(self, props: dict) -> dict:
        if self.host is None:
            return props
        site_dir = Path(self.host.state["dir"]).parent.parent      # <lab>/<site>/hosts/<host>
        try:
            stores = {d["name"]: d["path"] for d in
                      json.loads((site_dir / "inventory.json").read_text())["datastores"]}
        except (OSError, ValueError, KeyError):
            stores = {}
        for k, v in list(props.items()):
            m = _DS_PATH.match(str(v))
            if m and m.group(1) in stores:
                props[k] = str(Path(stores[m.group(1)]) / m.group(2))
        if props.get("role") == "vra":
            props["doorbell"] = self.host.doorbell_path
            try:
                props["host_url"] = json.loads(Path(self.host.state["port_file"]).read_text())["url"]
            except (OSError, ValueError, KeyError):
                pass
        return props

    def start(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        props = {"role": IMAGES[self.cfg["image"]]["role"], **self.cfg.get("properties", {})}
        props = self._platform_props(props)
        env_path = self.dir / "ovf-env.xml"
        env_path.write_text(ovf.render(props, self.cfg["instance_uuid"]))
        env_path.chmod(0o600)
        info = self.dir / "guestinfo.json"
        info.unlink(missing_ok=True)
        self.proc = spawn([sys.executable, "-m", "appliance.guest", "--ovf-env", str(env_path),
                           "--info", str(info)], self.dir / "console.log")

    def status(self) -> dict:
        info = {}
        try:
            info = json.loads((self.dir / "guestinfo.json").read_text())
        except (FileNotFoundError, ValueError):
            pass
        alive = self.proc is not None and self.proc.poll() is None
        return {"vm": self.cfg["name"], "image": self.cfg["image"], "pid": self.proc.pid if alive else None,
                "running": alive, "guest": info}

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            stop_process(psutil.Process(self.proc.pid), timeout=10)
            self.proc.wait(5)
