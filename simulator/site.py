"""A simulated site: its inventory, its host processes, its vCenter (vcsim) and its WAN link.

``Site`` is the service the site's HTTP API (``site_api.py``) calls. It owns the
inventory (persisted to ``<lab>/<site>/inventory.json`` after every change),
starts one ``simulator.host`` process per host, places powered-on VMs on them,
and carries out vMotion, host and site failures. For a vSphere-style site with
vcsim, every change is mirrored into vcsim, and changes made through vcsim
(RelocateVM, power operations) are applied here.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import sys
import threading
from pathlib import Path

import psutil
import requests

from appliance.ports import free_port

from . import model
from . import site_images
from .iopath import sha256_file
from .link import Link
from .procs import spawn, stop_process, wait_for_file

log = logging.getLogger("tidemark.site")


class SiteError(Exception):
    status = 400


class NotFound(SiteError):
    status = 404


class Conflict(SiteError):
    status = 409


def shm_dir(lab_dir: Path) -> Path:
    """Short per-lab folder for rings and doorbell sockets (socket paths are limited to 107 bytes)."""
    tag = hashlib.sha256(str(Path(lab_dir).resolve()).encode()).hexdigest()[:12]
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path("/tmp")
    return base / f"tidemark-{tag}"


class HostRuntime:
    def __init__(self, name: str):
        self.name = name
        self.proc = None
        self.url: str | None = None
        self.state = "disconnected"   # connected | failed | disconnected
        self.restart_vms: list[str] = []

    def call(self, method: str, path: str, timeout: float = 30, **kw) -> dict:
        if self.url is None or self.state != "connected":
            raise Conflict(f"host {self.name} is {self.state}")
        try:
            r = requests.request(method, self.url + path, timeout=timeout, **kw)
        except requests.RequestException as exc:
            raise Conflict(f"host {self.name} did not answer: {exc}") from exc
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            err = {404: NotFound, 409: Conflict}.get(r.status_code, SiteError)
            raise err(f"host {self.name}: {detail}")
        return r.json()


class Site:
    def __init__(self, lab_dir: Path, name: str, vcenter: str = "sim"):
        self.lab_dir = Path(lab_dir).resolve()
        self.dir = self.lab_dir / name
        self.inv_path = self.dir / "inventory.json"
        self.inv = json.loads(self.inv_path.read_text())
        self.name = name
        self.kind = self.inv["kind"]
        self.vcenter_mode = vcenter if self.kind == "vsphere" else "sim"
        try:
            lab_cfg = json.loads((self.lab_dir / "lab.json").read_text())
        except (FileNotFoundError, ValueError):
            lab_cfg = {}
        self.ring_mib = int(lab_cfg.get("ring_mib", 256))  # each host's mirror ring (docs/simulator.md)
        self.shm = shm_dir(self.lab_dir) / name
        self.shm.mkdir(parents=True, exist_ok=True)
        self.hosts = {h["name"]: HostRuntime(h["name"]) for h in self.inv["hosts"]}
        self.lock = threading.RLock()
        self.state = "running"
        self.links: dict[str, Link] = {}
        self.vcsim = None
        self.vcenter = None
        self.vcenter_url: str | None = None
        self._stop = threading.Event()
        self._watch_stop = threading.Event()
        self.image_tokens = site_images.ImageTokens(self.dir / "image-tokens.json")

    # -- persistence and lookup ------------------------------------------------------
    def save(self):
        tmp = self.inv_path.with_suffix(".tmp")
        tmp.touch(0o600)     # VMs' OVF properties hold secrets (appliance tokens and keys)
        tmp.chmod(0o600)
        tmp.write_text(json.dumps(self.inv, indent=1))
        tmp.rename(self.inv_path)

    def vm(self, ref: str) -> dict:
        for vm in self.inv["vms"]:
            if ref in (vm["name"], vm["id"], vm["instance_uuid"]):
                return vm
        raise NotFound(f"{self.name} has no VM {ref!r}")

    def host(self, name: str) -> HostRuntime:
        if name not in self.hosts:
            raise NotFound(f"{self.name} has no host {name!r}")
        return self.hosts[name]

    # -- start and stop ---------------------------------------------------------------
    def start(self):
        for ds in self.inv["datastores"]:
            Path(ds["path"]).mkdir(parents=True, exist_ok=True)
        if self.vcenter_mode == "vcsim":
            self._start_vcsim()
        for name in self.hosts:
            self._start_host(name, running=[])
        for vm in self.inv["vms"]:
            if vm.get("want_power_state") == "poweredOn" or vm["power_state"] == "poweredOn":
                vm["power_state"] = "poweredOff"
                self._power_on(vm, "power-on")
        self.save()
        if self.vcenter:
            self._watch_vcenter()
        threading.Thread(target=self._monitor, name="host-monitor", daemon=True).start()

    def stop(self):
        self._stop.set()
        self._watch_stop.set()
        procs = [h.proc for h in self.hosts.values() if h.proc is not None and h.proc.poll() is None]
        for p in procs:            # all at once: hosts shut down in parallel
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except Exception:
                stop_process(psutil.Process(p.pid), kill=True)
                p.wait(5)
        for link in self.links.values():
            link.stop()
        self._stop_vcsim()

    def _start_host(self, name: str, running: list[dict]):
        h = self.hosts[name]
        hdir = self.dir / "hosts" / name
        hdir.mkdir(parents=True, exist_ok=True)
        state = {"host": name, "site": self.name, "dir": str(hdir),
                 "ring_path": str(self.shm / f"{name}.ring"),
                 "ring_capacity": self.ring_mib << 20,
                 "sock_path": str(self.shm / f"{name}.sock"),
                 "pid_file": str(self.lab_dir / "pids" / f"host-{name}.pid"),
                 "port_file": str(hdir / "port.json"), "running": running,
                 # a restarted host answers where it did before (VRAs keep its address)
                 "port": int(h.url.rsplit(":", 1)[1]) if h.url else free_port("127.0.0.1")}
        Path(state["port_file"]).unlink(missing_ok=True)
        (hdir / "state.json").unlink(missing_ok=True)   # 0600: it may hold VRA tokens (image disks)
        (hdir / "state.json").touch(0o600)
        (hdir / "state.json").write_text(json.dumps(state))
        h.proc = spawn([sys.executable, "-m", "simulator.host", "--state", str(hdir / "state.json")],
                       hdir / "host.log")
        info = wait_for_file(Path(state["port_file"]), 60, h.proc)
        h.url = info["url"]
        h.state = "connected"

    def _monitor(self):
        """Notice host processes that died without being told to (a crash)."""
        while not self._stop.wait(0.5):
            with self.lock:
                for h in self.hosts.values():
                    if h.state == "connected" and h.proc is not None and h.proc.poll() is not None:
                        log.warning("host %s died (exit %s)", h.name, h.proc.returncode)
                        self._host_down(h, "disconnected")

    # -- VMs ------------------------------------------------------------------------------
    def _vm_cfg(self, vm: dict) -> dict:
        cfg = {k: vm[k] for k in ("name", "disks", "generation", "vm_seq", "workload", "image",
                                  "properties")}
        cfg["disks"] = site_images.with_tokens(cfg["disks"], self.image_tokens)
        return cfg

    def _power_on(self, vm: dict, reason: str):
        h = self.host(vm["host"])
        h.call("PUT", f"/vms/{vm['instance_uuid']}", params={"reason": reason}, json=self._vm_cfg(vm))
        vm["power_state"] = "poweredOn"
        vm["want_power_state"] = "poweredOn"

    def _power_off(self, vm: dict, reason: str) -> dict:
        h = self.host(vm["host"])
        out = h.call("DELETE", f"/vms/{vm['instance_uuid']}", params={"reason": reason})
        vm["generation"], vm["vm_seq"] = out["generation"], out["vm_seq"]
        if out.get("workload") is not None:
            vm["workload"] = out["workload"]
        vm["power_state"] = "poweredOff"
        return out

    def create_vm(self, spec: dict) -> dict:
        with self.lock:
            disks = None
            try:
                if spec.get("disks") is not None:     # [{capacity?, image?}]: e.g. recovery images
                    ds = next((d for d in self.inv["datastores"]
                               if d["name"] == (spec.get("datastore") or self.inv["datastores"][0]["name"])),
                              self.inv["datastores"][0])
                    disks = site_images.disk_entries(spec["disks"], ds, self.image_tokens)
                vm = model.add_vm(self.inv, name=spec.get("name"), host=spec.get("host"),
                                  datastore=spec.get("datastore"), network=spec.get("network"),
                                  vcpus=int(spec.get("vcpus", 1)),
                                  memory_mib=int(spec.get("memory_mib", 1024)),
                                  disks_mib=[] if disks else [int(x) for x in spec.get("disks_mib", [256])],
                                  image=spec.get("image"), properties=spec.get("properties"))
            except LookupError as exc:
                raise Conflict(str(exc)) from exc
            except (ValueError, TypeError) as exc:
                raise SiteError(str(exc)) from exc
            if disks:
                vm_dir = Path(next(d["path"] for d in self.inv["datastores"] if d["name"] == vm["datastore"]))
                for d in disks:
                    if not d.get("image"):
                        d["path"] = str(vm_dir / vm["name"] / f"disk{d['index']}.img")
                vm["disks"] = disks
            for d in [d for d in vm["disks"] if d.get("path")]:
                Path(d["path"]).parent.mkdir(parents=True, exist_ok=True)
                with open(d["path"], "ab") as f:
                    f.truncate(d["capacity_bytes"])
            if spec.get("workload"):
                vm["workload"] = {"state": "running", "spec": spec["workload"]}
            if self.vcenter:
                self.vcenter.create_vm(self.inv, vm)
            if spec.get("power_on"):
                self.power(vm["name"], True)
            self.save()
            return vm

    def delete_vm(self, ref: str, keep_disks: bool = False):
        with self.lock:
            vm = self.vm(ref)
            if vm["power_state"] == "poweredOn":
                self._power_off(vm, "delete")
            if self.vcenter:
                self.vcenter.delete_vm(vm["name"])
            self.inv["vms"].remove(vm)
            for d in [] if keep_disks else [d for d in vm["disks"] if d.get("path")]:
                for p in (d["path"], d["path"] + ".cbt"):
                    Path(p).unlink(missing_ok=True)
            self.save()

    def set_nics(self, ref: str, nics: list) -> dict:
        """Replace a VM's NICs: [{network, mac?, ip?}] (a missing MAC keeps the one at that index)."""
        with self.lock:
            vm = self.vm(ref)
            nets = {n["name"] for n in self.inv["networks"]}
            out = []
            for i, nic in enumerate(nics):
                if not isinstance(nic, dict) or nic.get("network") not in nets:
                    raise NotFound(f"NIC {i}: {self.name} has no network "
                                   f"{(nic or {}).get('network') if isinstance(nic, dict) else nic!r}")
                old = vm["nics"][i] if i < len(vm["nics"]) else {}
                mac = nic.get("mac") or old.get("mac") or "00:50:56:" + ":".join(
                    hashlib.sha256(f"{vm['instance_uuid']}/nic{i}".encode()).hexdigest()[k:k + 2]
                    for k in (0, 2, 4))
                out.append({"index": i, "mac": mac.lower(), "ip": nic.get("ip"), "network": nic["network"]})
            vm["nics"] = out
            if self.vcenter:
                self.vcenter.set_nics(self.inv, vm)
            self.save()
            return vm

    def rename_vm(self, ref: str, new: str):
        with self.lock:
            vm = self.vm(ref)
            if any(v["name"] == new for v in self.inv["vms"]):
                raise Conflict(f"a VM named {new} already exists")
            if self.vcenter:
                self.vcenter.rename_vm(vm["name"], new)
            vm["name"] = new
            self.save()
            return vm

    def power(self, ref: str, on: bool, from_vcenter: bool = False) -> dict:
        with self.lock:
            vm = self.vm(ref)
            want = "poweredOn" if on else "poweredOff"
            if vm["power_state"] != want:
                if on:
                    if self.hosts[vm["host"]].state != "connected":
                        raise Conflict(f"host {vm['host']} is {self.hosts[vm['host']].state}")
                    self._power_on(vm, "power-on")
                else:
                    self._power_off(vm, "power-off")
                vm["want_power_state"] = want
            if self.vcenter and not from_vcenter:
                self.vcenter.power(vm["name"], on)
            self.save()
            return vm

    def vmotion(self, ref: str, dest: str, from_vcenter: bool = False) -> dict:
        """Move a VM to another host; a running VM's IO path moves with it, nothing lost."""
        with self.lock:
            vm = self.vm(ref)
            dst = self.host(dest)
            src = vm["host"]
            if src == dest:
                return vm
            if dst.state != "connected":
                raise Conflict(f"host {dest} is {dst.state}")
            if vm["power_state"] == "poweredOn":
                self._power_off(vm, "vmotion")
                vm["host"] = dest
                try:
                    self._power_on(vm, "vmotion")
                except SiteError:
                    vm["host"] = src
                    self._power_on(vm, "vmotion-rollback")
                    raise
            vm["host"] = dest
            if self.vcenter and not from_vcenter:
                self.vcenter.relocate(vm["name"], dest)
            self.save()
            return vm

    def workload(self, ref: str, body: dict) -> dict:
        with self.lock:
            vm = self.vm(ref)
            action = body.get("action", "start")
            if vm["power_state"] != "poweredOn":
                if action == "start":   # runs when the VM powers on
                    from .workload import WorkloadSpec
                    WorkloadSpec.from_dict(body.get("spec", {}))
                    vm["workload"] = {"state": "running", "spec": body.get("spec", {})}
                elif vm.get("workload"):
                    vm["workload"]["state"] = {"pause": "paused", "resume": "running"}.get(
                        action, "stopped")
                self.save()
                return vm.get("workload") or {"state": "stopped"}
            out = self.host(vm["host"]).call("POST", f"/vms/{vm['instance_uuid']}/workload", json=body)
            vm["workload"] = {"state": out["workload"]["state"],   # a stopped one keeps its spec
                              "spec": (out["workload"].get("spec") or body.get("spec")
                                       or (vm.get("workload") or {}).get("spec"))}
            self.save()
            return out["workload"]

    def host_call(self, ref: str, method: str, path: str, **kw) -> dict:
        vm = self.vm(ref)
        if vm["power_state"] != "poweredOn":
            raise Conflict(f"VM {vm['name']} is powered off")
        return self.host(vm["host"]).call(method, f"/vms/{vm['instance_uuid']}{path}", **kw)

    def disk_hash(self, ref: str, disk: int, quiesce: bool = False) -> dict:
        vm = self.vm(ref)
        if not 0 <= disk < len(vm["disks"]):
            raise NotFound(f"VM {vm['name']} has no disk {disk}")
        d = vm["disks"][disk]
        if d.get("image"):
            return self._image_disk_hash(vm, disk)
        paused = False
        if quiesce and vm["power_state"] == "poweredOn" and (vm.get("workload") or {}).get("state") == "running":
            self.host_call(ref, "POST", "/workload", json={"action": "pause"})
            paused = True
        try:
            return {"vm": vm["name"], "disk": disk, "sha256": sha256_file(d["path"], d["capacity_bytes"]),
                    "capacity_bytes": d["capacity_bytes"]}
        finally:
            if paused:
                self.host_call(ref, "POST", "/workload", json={"action": "resume"})

    def _image_disk_hash(self, vm: dict, disk: int) -> dict:
        d = vm["disks"][disk]
        if vm["power_state"] == "poweredOn":
            out = self.host_call(vm["name"], "GET", f"/disks/{disk}/hash", timeout=3600)
        else:
            try:
                out = {"sha256": site_images.sha256(d, self.image_tokens)}
            except site_images.ImageDiskError as exc:
                raise Conflict(str(exc)) from exc
        return {"vm": vm["name"], "disk": disk, "sha256": out["sha256"], "capacity_bytes": d["capacity_bytes"]}

    def rebase_disk(self, ref: str, disk: int, path: str) -> dict:
        """After the image's commit: the disk is the plain file ``path`` from now on (VM keeps running)."""
        with self.lock:
            vm = self.vm(ref)
            if not 0 <= disk < len(vm["disks"]):
                raise NotFound(f"VM {vm['name']} has no disk {disk}")
            d = vm["disks"][disk]
            if not d.get("image"):
                raise Conflict(f"disk {disk} of VM {vm['name']} is not image-backed")
            if not os.path.isfile(path):
                raise SiteError(f"{path} is not a file: rebase onto the replica path the commit reported")
            if vm["power_state"] == "poweredOn":
                self.host_call(vm["name"], "POST", f"/disks/{disk}/rebase", json={"path": path})
            d["path"] = path
            d.pop("image")
            self.save()
            return vm

    # -- failures -------------------------------------------------------------------------
    def _host_down(self, h: HostRuntime, state: str):
        h.state = state
        h.restart_vms = []
        for vm in self.inv["vms"]:
            if vm["host"] == h.name and vm["power_state"] == "poweredOn":
                vm["power_state"] = "poweredOff"
                h.restart_vms.append(vm["name"])
                if self.vcenter:
                    try:
                        self.vcenter.power(vm["name"], False)
                    except Exception as exc:  # vCenter may be down with the site
                        log.warning("could not mirror power-off of %s: %s", vm["name"], exc)
        for e in self.inv["hosts"]:
            if e["name"] == h.name:
                e["state"] = "disconnected" if state != "connected" else "connected"
        self.save()

    def fail_host(self, name: str) -> dict:
        with self.lock:
            h = self.host(name)
            if h.state == "failed":
                return self.host_status(name)
            if h.proc is not None and h.proc.poll() is None:
                stop_process(psutil.Process(h.proc.pid), kill=True)
                h.proc.wait(10)
            self._host_down(h, "failed")
            return self.host_status(name)

    def restore_host(self, name: str) -> dict:
        with self.lock:
            h = self.host(name)
            if h.state == "connected":
                return self.host_status(name)
            if h.proc is not None and h.proc.poll() is None:
                stop_process(psutil.Process(h.proc.pid), kill=True)
            crashed = [self.vm(n) for n in h.restart_vms if any(v["name"] == n for v in self.inv["vms"])]
            self._start_host(name, running=[{**self._vm_cfg(vm), "instance_uuid": vm["instance_uuid"]}
                                            for vm in crashed])
            for e in self.inv["hosts"]:
                if e["name"] == name:
                    e["state"] = "connected"
            for vm in crashed:   # a crash breaks the VM's stream: a new generation starts
                vm["generation"] += 1
                vm["vm_seq"] = 0
                self._power_on(vm, "host-restart")
                if self.vcenter:
                    self.vcenter.power(vm["name"], True)
            h.restart_vms = []
            self.save()
            return self.host_status(name)

    def fail_site(self) -> dict:
        with self.lock:
            for name in self.hosts:
                self.fail_host(name)
            for link in self.links.values():
                link.cut()
            self._stop_vcsim()
            self.state = "failed"
            return self.status()

    def restore_site(self) -> dict:
        with self.lock:
            if self.vcenter_mode == "vcsim" and self.vcsim is None:
                self._start_vcsim()
            for name in self.hosts:
                self.restore_host(name)
            if self.vcenter:
                self._watch_vcenter()
            for link in self.links.values():
                link.restore()
            self.state = "running"
            return self.status()

    # -- links ----------------------------------------------------------------------------
    def link(self, peer: str) -> Link:
        if peer not in self.links:
            link = Link(f"{self.name}->{peer}")
            link.start()
            self.links[peer] = link
        return self.links[peer]

    # -- vCenter (vcsim) ----------------------------------------------------------------------
    def _start_vcsim(self):
        from .vcenter import VCenterMirror, Vcsim, build_vcsim
        binary = build_vcsim(Path(os.environ.get("TIDEMARK_BUILD_DIR", self.lab_dir / ".build")))
        self.vcsim = Vcsim()
        listen = "127.0.0.1:0"
        if self.vcenter_url:   # a restored site's vCenter comes back at the same address
            listen = self.vcenter_url.split("//")[1].split("/")[0]
        self.vcenter_url = self.vcsim.start(binary, self.dir / "vcsim.log", listen=listen)
        from .procs import write_pidfile
        write_pidfile(self.lab_dir / "pids" / f"vcsim-{self.name}.pid", self.vcsim.pid)
        self.vcenter = VCenterMirror(self.vcenter_url)
        self.vcenter.sync(self.inv)

    def _watch_vcenter(self):
        """Sync vcsim with the data path's state, then follow changes made through vCenter."""
        self.vcenter.sync(self.inv)
        self._watch_stop = threading.Event()
        threading.Thread(target=self.vcenter.watch, args=(self._on_vcenter, self._watch_stop),
                         name="vcenter-watch", daemon=True).start()

    def _stop_vcsim(self):
        self._watch_stop.set()
        if self.vcenter is not None:
            try:
                self.vcenter.close()
            except Exception:
                pass
            self.vcenter = None
        if self.vcsim is not None:
            self.vcsim.stop()
            self.vcsim = None

    def _on_vcenter(self, event: dict):
        """A change made through vCenter: apply it to the data path."""
        if event.get("added") or event.get("removed"):   # VMs created or destroyed in vCenter
            from .vcenter_adopt import apply_foreign
            return apply_foreign(self, event)
        try:
            vm = self.vm(event["vm"])
            if event.get("host") and event["host"] != vm["host"]:
                self.vmotion(vm["name"], event["host"], from_vcenter=True)
            if event.get("power_state") in ("poweredOn", "poweredOff") and \
                    event["power_state"] != vm["power_state"]:
                self.power(vm["name"], event["power_state"] == "poweredOn", from_vcenter=True)
        except SiteError as exc:
            log.warning("could not apply vCenter change %s: %s", event, exc)

    # -- status ---------------------------------------------------------------------------------
    def host_status(self, name: str) -> dict:
        h = self.host(name)
        entry = next(e for e in self.inv["hosts"] if e["name"] == name)
        out = {**entry, "state": h.state, "url": h.url,
               "pid": h.proc.pid if h.proc is not None and h.proc.poll() is None else None,
               "mirror": {"doorbell": str(self.shm / f"{name}.sock"),
                          "ring": str(self.shm / f"{name}.ring")}}
        return out

    def status(self) -> dict:
        with self.lock:
            return {"name": self.name, "kind": self.kind, "state": self.state,
                    "datacenter": self.inv["datacenter"], "clusters": self.inv["clusters"],
                    "vcenter_url": self.vcenter_url,
                    "hosts": [self.host_status(n) for n in self.hosts],
                    "datastores": self.inv["datastores"], "networks": self.inv["networks"],
                    "vms": [model.public_vm(v) for v in self.inv["vms"]],
                    "links": {p: l.stats() for p, l in self.links.items()}}

    def stats(self) -> dict:
        out = {}
        for name, h in self.hosts.items():
            try:
                out[name] = h.call("GET", "/status", timeout=5)["io"]
            except SiteError as exc:
                out[name] = {"error": str(exc)}
        return out

    def inventory(self) -> dict:
        return copy.deepcopy(self.inv)
