"""The lab: several simulated sites on one machine, started in the background and stopped exactly.

Layout of a lab folder (default ``.lab``)::

    lab.json                  what `lab up` was asked for
    pids/                     one pid file per process the lab started (site-*, host-*, vcsim-*)
    <site>/inventory.json     the site's inventory, kept by its controller
    <site>/controller.json    the controller's URL once it is ready
    <site>/controller.log     its log; hosts/<host>/host.log for each host
    <site>/datastores/...     datastore folders with the VMs' disk files

``Lab`` is what the CLI (`tidemark lab ...`) and the tests use.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import psutil
import requests

from . import model
from .procs import read_pidfile, spawn, stop_process, wait_for_file
from .site import shm_dir

LIGHT_WORKLOAD = {"mbps": 0.5, "iops": 50, "block_sizes": [4096, 16384, 65536],
                  "pattern": "hotspot", "seed": 1}


class LabError(Exception):
    """A lab operation failed; the message says what to do."""


class Lab:
    def __init__(self, directory: str | Path = ".lab"):
        self.dir = Path(directory).resolve()

    # -- up ------------------------------------------------------------------------------
    def up(self, sites: int = 2, hosts: int = 2, vms: int = 4, disk_mib: int = 256,
           vcenter: str = "sim", hyperv_site: bool = False, workload: dict | None | bool = None,
           ring_mib: int = 256, timeout: float = 120, zvm: bool = False,
           protect: bool = True) -> dict:
        """Start the sites (and with ``zvm``, a ZVM per site, VRAs on every host, the sites paired
        and, with ``protect``, a VPG of the first site's VMs to the second: simulator/labzvm.py)."""
        if self.running():
            return self.status()
        if vcenter not in ("sim", "vcsim"):
            raise LabError("--vcenter is sim or vcsim")
        if sites < 1 or hosts < 1 or vms < 0 or disk_mib < 1:
            raise LabError("a lab needs at least one site and one host per site, and disks of 1 MiB or more")
        self.dir.mkdir(parents=True, exist_ok=True)
        names = [f"site-{chr(ord('a') + i)}" for i in range(sites)]
        config = {"sites": [], "hosts": hosts, "vms": vms, "disk_mib": disk_mib,
                  "vcenter": vcenter, "ring_mib": ring_mib, "created": time.time()}
        for i, name in enumerate(names):
            kind = "hyperv" if hyperv_site and i == sites - 1 and sites > 1 else "vsphere"
            if hyperv_site and sites == 1:
                kind = "hyperv"
            inv_path = self.dir / name / "inventory.json"
            if not inv_path.exists():
                inv = model.build_site(name, kind, self.dir, index=i, hosts=hosts,
                                       vms=vms if i == 0 else 0, disk_mib=disk_mib)
                for n, vm in enumerate(inv["vms"] if workload is not False else []):
                    vm["workload"] = {"state": "running",
                                      "spec": {**(workload or LIGHT_WORKLOAD), "seed": 1 + n}}
                inv_path.parent.mkdir(parents=True, exist_ok=True)
                inv_path.write_text(json.dumps(inv, indent=1))
            else:
                inv = json.loads(inv_path.read_text())
            for vm in inv["vms"]:
                for d in vm["disks"]:
                    if not d.get("path"):       # a disk on a VRA recovery image: no file here
                        continue
                    p = Path(d["path"])
                    p.parent.mkdir(parents=True, exist_ok=True)
                    if not p.exists():
                        with open(p, "wb") as f:
                            f.truncate(d["capacity_bytes"])
            config["sites"].append({"name": name, "kind": inv["kind"],
                                    "vcenter": vcenter if inv["kind"] == "vsphere" else "sim"})
        (self.dir / "lab.json").write_text(json.dumps(config, indent=1))
        if vcenter == "vcsim":
            from .vcsim_process import build_vcsim
            build_vcsim(self.build_dir())
        procs = {}
        for s in config["sites"]:
            (self.dir / s["name"] / "controller.json").unlink(missing_ok=True)
            procs[s["name"]] = spawn(
                [sys.executable, "-m", "simulator.site_api", "--lab", str(self.dir),
                 "--site", s["name"], "--vcenter", s["vcenter"]],
                self.dir / s["name"] / "controller.log", detach=True,
                env={"TIDEMARK_BUILD_DIR": str(self.build_dir())})
        try:
            for s in config["sites"]:
                wait_for_file(self.dir / s["name"] / "controller.json", timeout, procs[s["name"]])
        except (TimeoutError, RuntimeError) as exc:
            self.down()
            raise LabError(f"the lab did not start: {exc}; see {self.dir}/*/controller.log") from exc
        if zvm:
            from . import labzvm
            from appliance.zvm.errors import ZVMError
            try:
                labzvm.up(self, self.status(), protect_vms=protect)
            except (TimeoutError, RuntimeError, ZVMError, OSError) as exc:
                self.down()
                raise LabError(f"the lab's ZVMs did not come up: {exc}; "
                               f"see {self.dir}/zvm/*/zvm.log") from exc
        return self.status()

    @staticmethod
    def build_dir() -> Path:
        import os
        return Path(os.environ.get("TIDEMARK_BUILD_DIR", Path(__file__).resolve().parent.parent / ".build"))

    # -- state ---------------------------------------------------------------------------------
    def config(self) -> dict:
        try:
            return json.loads((self.dir / "lab.json").read_text())
        except FileNotFoundError:
            raise LabError(f"no lab in {self.dir}: run `tidemark lab up --dir {self.dir}`") from None

    def controller_url(self, site: str) -> str | None:
        if read_pidfile(self.dir / "pids" / f"site-{site}.pid") is None:
            return None
        try:
            return json.loads((self.dir / site / "controller.json").read_text())["url"]
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def running(self) -> bool:
        try:
            return any(self.controller_url(s["name"]) for s in self.config()["sites"])
        except LabError:
            return False

    def api(self, site: str, method: str, path: str, **kw):
        url = self.controller_url(site)
        if url is None:
            raise LabError(f"site {site} is not running (tidemark lab up --dir {self.dir})")
        r = requests.request(method, url + path, timeout=kw.pop("timeout", 120), **kw)
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise LabError(f"{site}: {detail}")
        return r.json() if r.content else None

    def status(self) -> dict:
        cfg = self.config()
        sites = []
        for s in cfg["sites"]:
            url = self.controller_url(s["name"])
            entry = {"name": s["name"], "kind": s["kind"], "simulator_url": url,
                     "vcenter_url": None, "zvm_url": None, "state": "stopped", "hosts": [], "vms": []}
            if url:
                try:
                    st = self.api(s["name"], "GET", "/api/site", timeout=10)
                except (LabError, requests.RequestException):
                    st = None
                if st:
                    entry.update({"state": st["state"], "vcenter_url": st["vcenter_url"],
                                  "hosts": [{"name": h["name"], "id": h["id"], "state": h["state"],
                                             "pid": h["pid"], "doorbell": h["mirror"]["doorbell"]}
                                            for h in st["hosts"]],
                                  "vms": [{"name": v["name"], "id": v["id"], "host": v["host"],
                                           "power_state": v["power_state"],
                                           "instance_uuid": v["instance_uuid"],
                                           "disks": v["disks"],
                                           "workload": (v.get("workload") or {}).get("state", "stopped")}
                                          for v in st["vms"]]})
            if read_pidfile(self.dir / "pids" / f"zvm-{s['name']}.pid") is not None:
                from .labzvm import status_fields
                entry.update(status_fields(self.dir, s["name"]))
            sites.append(entry)
        out = {"dir": str(self.dir), "running": any(s["simulator_url"] for s in sites), "sites": sites}
        if any(s["zvm_url"] for s in sites):
            from .labzvm import credentials
            out["zvm"] = credentials(self.dir)
        return out

    # -- down --------------------------------------------------------------------------------------
    def down(self, timeout: float = 30) -> list[int]:
        """Stop every process this lab started, and only those; the pids stopped."""
        stopped = []
        pids = self.dir / "pids"
        if not pids.exists():
            return stopped
        controllers = [p for p in (read_pidfile(f) for f in sorted(pids.glob("site-*.pid"))) if p]
        for proc in controllers:                     # they stop their hosts and vcsim, in parallel
            stopped.append(proc.pid)
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _gone, alive = psutil.wait_procs(controllers, timeout=timeout)
        for proc in alive:
            stop_process(proc, timeout=5, kill=True)
        for f in sorted(pids.glob("*.pid")):         # whatever survived them
            proc = read_pidfile(f)
            if proc is not None:
                stopped.append(proc.pid)
                stop_process(proc, timeout=10, kill=True)
        mark = str(self.dir)
        me = psutil.Process()
        spare = {me.pid, *(p.pid for p in me.parents())}   # the CLI and shell running `down`
        leftovers = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.pid not in spare and p.info["cmdline"] and \
                        any(mark in a for a in p.info["cmdline"][1:]) and \
                        any("simulator" in a or "appliance" in a for a in p.info["cmdline"]):
                    leftovers.append(p)
            except psutil.Error:
                pass
        for p in leftovers:
            stopped.append(p.pid)
            stop_process(p, timeout=5, kill=True)
        shutil.rmtree(shm_dir(self.dir), ignore_errors=True)
        for f in pids.glob("*.pid"):
            f.unlink(missing_ok=True)
        return stopped

    # -- operations, addressed by VM or host name across sites ------------------------------------
    def find_vm(self, vm: str) -> str:
        for s in self.status()["sites"]:
            if any(vm in (v["name"], v["id"], v["instance_uuid"]) for v in s["vms"]):
                return s["name"]
        raise LabError(f"no VM {vm!r} in the lab")

    def find_host(self, host: str) -> str:
        for s in self.status()["sites"]:
            if any(h["name"] == host for h in s["hosts"]):
                return s["name"]
        raise LabError(f"no host {host!r} in the lab")

    def vm(self, vm: str) -> dict:
        """A VM as its site's API shows it (with its workload's state and settings)."""
        return self.api(self.find_vm(vm), "GET", f"/api/vms/{vm}")

    def vmotion(self, vm: str, host: str) -> dict:
        return self.api(self.find_vm(vm), "POST", f"/api/vms/{vm}/vmotion", json={"host": host})

    def fail_host(self, host: str) -> dict:
        return self.api(self.find_host(host), "POST", f"/api/hosts/{host}/fail")

    def restore_host(self, host: str) -> dict:
        return self.api(self.find_host(host), "POST", f"/api/hosts/{host}/restore")

    def fail_site(self, site: str) -> dict:
        return self.api(site, "POST", "/api/site/fail")

    def restore_site(self, site: str) -> dict:
        return self.api(site, "POST", "/api/site/restore")

    def workload(self, vm: str, body: dict) -> dict:
        return self.api(self.find_vm(vm), "POST", f"/api/vms/{vm}/workload", json=body)

    def power(self, vm: str, on: bool) -> dict:
        return self.api(self.find_vm(vm), "POST", f"/api/vms/{vm}/power",
                        json={"state": "on" if on else "off"})

    def disk_hash(self, vm: str, disk: int = 0, quiesce: bool = False) -> str:
        return self.api(self.find_vm(vm), "GET", f"/api/vms/{vm}/disks/{disk}/hash",
                        params={"quiesce": "1" if quiesce else "0"})["sha256"]

    def link(self, a: str, b: str, action: str, **shape) -> list[dict]:
        """Cut, restore or shape the link between two sites (both directions)."""
        return [self.api(x, "POST", f"/api/links/{y}/{action}", json=shape or None)
                for x, y in ((a, b), (b, a))]
