"""A simulated hypervisor host: one OS process per host.

It runs the powered-on VMs placed on it (their guest workloads and, for
appliance VMs, the appliance's service process), owns the host's IO path and
mirror ring, accepts a VRA on its doorbell socket, and takes orders from its
site controller over a small HTTP API on loopback. Killing this process is a
host failure: its VMs stop, its appliance processes die with it.

Started as ``python -m simulator.host --state FILE``; the state file is written
by the site controller (see ``HostState``).
"""
from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from flask import Flask, jsonify, request
from werkzeug.serving import make_server

from . import appliances
from .host_errors import BadRequest, Conflict, HTTPError, NotFound
from .host_images import ImageVMsMixin
from .imagedisk import ImageDiskError, ImageVM, image_vm, is_image_vm
from .iopath import Disk, IOPath, VMRuntime
from .procs import exit_with_parent, write_pidfile
from .workload import Content, Workload, WorkloadError, WorkloadSpec

log = logging.getLogger("tidemark.host")


class Host(ImageVMsMixin):
    """The VMs running on this host and the IO path they write through."""

    def __init__(self, state: dict):
        self.state = state
        self.name = state["host"]
        self.site = state["site"]
        self.dir = Path(state["dir"])
        self.io = IOPath(state["ring_path"], state.get("ring_capacity", 64 << 20))
        self.workloads: dict[str, Workload] = {}
        self.appliances: dict[str, appliances.ApplianceProcess] = {}
        self._contents: dict[int, Content] = {}
        self.image_vms: dict[str, ImageVM] = {}     # VMs with disks on VRA recovery images
        self._lock = threading.RLock()
        self.doorbell_path = state["sock_path"]
        self._recover(state.get("running", []))

    # -- start-up ---------------------------------------------------------------
    def _recover(self, running: list[dict]):
        """Cover by dirty bitmaps whatever the ring held when this host last stopped."""
        vms = {}
        for cfg in running:
            if is_image_vm(cfg):       # never mirrored: nothing of it can be in the ring
                continue
            vm = self._runtime(cfg)
            vms[vm.uuid_bytes] = vm
        self.io.recover(vms)
        for vm in vms.values():
            for d in vm.disks:
                d.close()

    def _runtime(self, cfg: dict) -> VMRuntime:
        disks = [Disk(d["index"], d["path"], d["capacity_bytes"]) for d in cfg.get("disks", [])]
        return VMRuntime(cfg["instance_uuid"], cfg["name"], disks,
                         generation=cfg.get("generation", 1), vm_seq=cfg.get("vm_seq", 0))

    # -- VMs ------------------------------------------------------------------------
    def start_vm(self, cfg: dict, reason: str) -> dict:
        with self._lock:
            if cfg["instance_uuid"] in self.io.vms or cfg["instance_uuid"] in self.appliances or \
                    cfg["instance_uuid"] in self.image_vms:
                raise Conflict(f"VM {cfg['name']} is already running on {self.name}")
            if cfg.get("image"):
                proc = appliances.ApplianceProcess(cfg, self.dir / "appliances" / cfg["name"], self)
                proc.start()
                self.appliances[cfg["instance_uuid"]] = proc
                return {"vm": cfg["name"], "appliance": proc.status()}
            if is_image_vm(cfg):
                try:
                    vm = image_vm(cfg)
                except (ValueError, TypeError, KeyError, OSError, ImageDiskError) as exc:
                    raise BadRequest(f"VM {cfg['name']}: {exc}") from exc
                self.image_vms[vm.uuid] = vm
            else:
                vm = self._runtime(cfg)
                self.io.add_vm(vm, reason)
            wl = cfg.get("workload")
            if wl and wl.get("state") in ("running", "paused"):
                self._start_workload(vm, WorkloadSpec.from_dict(wl["spec"]),
                                     paused=wl["state"] == "paused")
            return self.vm_status(vm.uuid)

    def stop_vm(self, vm_uuid: str, reason: str) -> dict:
        """Power off or migrate away: stop the guest, drain its stream, hand back its state."""
        with self._lock:
            if vm_uuid in self.appliances:
                proc = self.appliances.pop(vm_uuid)
                proc.stop()
                return {"generation": 1, "vm_seq": 0}
            if vm_uuid not in self.io.vms and vm_uuid not in self.image_vms:
                raise NotFound(f"VM {vm_uuid} is not running on {self.name}")
            wl = self.workloads.pop(vm_uuid, None)
            wl_state = None
            if wl is not None:
                wl_state = {"state": wl.state, "spec": wl.spec.to_dict()}
                wl.stop()
                if reason == "vmotion" and wl_state["state"] != "stopped":
                    # The guest keeps running on the new host, from where it is now.
                    wl_state["spec"]["seed"] = wl.gen.rng.randrange(1 << 31)
                    if wl.spec.total_bytes:
                        wl_state["spec"]["total_bytes"] = max(1, wl.spec.total_bytes - wl.written)
            if vm_uuid in self.image_vms:
                vm = self.image_vms.pop(vm_uuid)
                vm.close()
            else:
                vm = self.io.remove_vm(vm_uuid, reason)
            return {"generation": vm.generation, "vm_seq": vm.vm_seq, "workload": wl_state}

    def _content(self, seed: int) -> Content:
        if seed not in self._contents:
            if len(self._contents) > 8:
                self._contents.clear()
            self._contents[seed] = Content(seed)
        return self._contents[seed]

    def _start_workload(self, vm: VMRuntime, spec: WorkloadSpec, paused: bool = False):
        old = self.workloads.pop(vm.uuid, None)
        if old is not None:
            old.stop()
        io = self.io
        if isinstance(vm, ImageVM):
            def write(disk_index, offset, length, src, vm=vm):
                self._image_write(vm, disk_index, offset, src)
        else:
            def write(disk_index, offset, length, src, vm=vm):
                io.write(vm, vm.disks[disk_index], offset, length, lambda view: view.__setitem__(
                    slice(None), src))

        wl = Workload(vm.name, spec, [d.capacity for d in vm.disks], write,
                      salt=vm.generation, content=self._content(spec.seed))
        self.workloads[vm.uuid] = wl
        wl.start(paused=paused)

    def workload(self, vm_uuid: str, body: dict) -> dict:
        vm = self._vm(vm_uuid)
        action = body.get("action", "start")
        wl = self.workloads.get(vm_uuid)
        if action == "start":
            spec = WorkloadSpec.from_dict(body.get("spec", {}))
            self._start_workload(vm, spec)
        elif action in ("pause", "resume", "stop"):
            if wl is None:
                raise Conflict(f"VM {vm.name} has no workload to {action}")
            if action == "pause":
                wl.pause()
            elif action == "resume":
                wl.resume()
            else:
                wl.stop()
                self.workloads.pop(vm_uuid, None)
        else:
            raise BadRequest(f"workload action must be start, pause, resume or stop, not {action!r}")
        return self.vm_status(vm_uuid)

    def write(self, vm_uuid: str, disk: int, offset: int, data: bytes) -> bool:
        vm = self._vm(vm_uuid)
        if not 0 <= disk < len(vm.disks):
            raise BadRequest(f"VM {vm.name} has no disk {disk}")
        if isinstance(vm, ImageVM):
            try:
                self._image_write(vm, disk, offset, data)
            except ValueError as exc:
                raise BadRequest(str(exc)) from exc
            except ImageDiskError as exc:
                raise Conflict(str(exc)) from exc
            return False
        try:
            return self.io.write(vm, vm.disks[disk], offset, len(data),
                                 lambda view: view.__setitem__(slice(None), data))
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc

    def _vm(self, vm_uuid: str) -> VMRuntime | ImageVM:
        vm = self.io.vms.get(vm_uuid) or self.image_vms.get(vm_uuid)
        if vm is None:
            raise NotFound(f"VM {vm_uuid} is not running on {self.name}")
        return vm

    def vm_status(self, vm_uuid: str) -> dict:
        vm = self._vm(vm_uuid)
        wl = self.workloads.get(vm_uuid)
        if isinstance(vm, ImageVM):
            return {"vm": vm.name, "instance_uuid": vm.uuid, "generation": vm.generation,
                    "vm_seq": vm.vm_seq, "mirrored": False,
                    "workload": wl.status() if wl else {"state": "stopped"},
                    "disks": [d.status() for d in vm.disks]}
        return {"vm": vm.name, "instance_uuid": vm.uuid, "generation": vm.generation,
                "vm_seq": vm.vm_seq,
                "workload": wl.status() if wl else {"state": "stopped"},
                "disks": [{"index": d.index, "dirty_blocks": d.dirty_count(),
                           "block_size": d.block, "path": d.path, "capacity_bytes": d.capacity}
                          for d in vm.disks]}

    def status(self) -> dict:
        s = self.io.stats
        ring = self.io.ring
        return {"host": self.name, "site": self.site, "pid": os.getpid(),
                "vms": [self.vm_status(u) for u in [*self.io.vms, *self.image_vms]],
                "appliances": [p.status() for p in self.appliances.values()],
                "mirror": {"attached": self.io.attached, "ring": ring.path,
                           "doorbell": self.doorbell_path, "capacity": ring.capacity,
                           "head": ring._head, "tail": ring.tail(), "next_seq": ring.next_seq},
                "io": dict(vars(s))}

    # -- VRA attachment -----------------------------------------------------------
    def serve_doorbell(self, stop: threading.Event):
        """Accept VRAs on the doorbell socket; one attached at a time."""
        # Bound and listening under a temporary name, then renamed into place: a VRA that
        # sees the doorbell can connect to it (between bind and listen it would be refused).
        tmp = f"{self.doorbell_path}.{os.getpid()}.tmp"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(tmp)
        os.chmod(tmp, 0o600)
        srv.listen(4)
        os.rename(tmp, self.doorbell_path)
        srv.settimeout(0.5)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._vra_session, args=(conn,), daemon=True).start()
        srv.close()

    def _vra_session(self, conn: socket.socket):
        name = None
        try:
            conn.settimeout(5)
            line = conn.makefile("rb").readline(65536)
            hello = json.loads(line or b"{}")
            name = str(hello.get("vra") or "vra")
            try:
                info = self.io.attach(name)
            except RuntimeError as exc:
                conn.sendall(json.dumps({"error": str(exc)}).encode() + b"\n")
                return
            info["host"] = self.name
            conn.sendall(json.dumps(info).encode() + b"\n")
            self.io.ring.doorbell = conn
            conn.settimeout(None)
            log.info("VRA %s attached", name)
            while True:
                data = conn.recv(4096)
                if not data:
                    break
        except (OSError, ValueError) as exc:
            log.warning("VRA session ended: %s", exc)
        finally:
            if name:
                self.io.detach(name)
                log.info("VRA %s detached", name)
            conn.close()

    def shutdown(self):
        for wl in list(self.workloads.values()):
            wl.stop()
        for proc in list(self.appliances.values()):
            proc.stop()
        for vm in list(self.image_vms.values()):
            vm.close()


def create_app(host: Host) -> Flask:
    app = Flask(f"host-{host.name}")

    @app.errorhandler(HTTPError)
    def _err(exc):
        return jsonify({"title": type(exc).__name__, "detail": str(exc), "status": exc.code}), exc.code

    @app.errorhandler(WorkloadError)
    def _wl_err(exc):
        return jsonify({"title": "BadRequest", "detail": str(exc), "status": 400}), 400

    def body() -> dict:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise BadRequest("the request body must be a JSON object")
        return data

    @app.get("/status")
    def status():
        return jsonify(host.status())

    @app.put("/vms/<vm_uuid>")
    def start_vm(vm_uuid):
        cfg = body()
        cfg["instance_uuid"] = vm_uuid
        return jsonify(host.start_vm(cfg, request.args.get("reason", "power-on")))

    @app.delete("/vms/<vm_uuid>")
    def stop_vm(vm_uuid):
        return jsonify(host.stop_vm(vm_uuid, request.args.get("reason", "power-off")))

    @app.get("/vms/<vm_uuid>")
    def vm(vm_uuid):
        return jsonify(host.vm_status(vm_uuid))

    @app.post("/vms/<vm_uuid>/workload")
    def workload(vm_uuid):
        return jsonify(host.workload(vm_uuid, body()))

    @app.post("/vms/<vm_uuid>/write")
    def write(vm_uuid):
        b = body()
        try:
            data = base64.b64decode(b["data"], validate=True)
            disk, offset = int(b.get("disk", 0)), int(b["offset"])
        except (KeyError, ValueError, TypeError) as exc:
            raise BadRequest(f"write takes disk, offset and base64 data: {exc}") from exc
        return jsonify({"mirrored": host.write(vm_uuid, disk, offset, data)})

    @app.get("/vms/<vm_uuid>/disks/<int:disk>/hash")
    def disk_hash(vm_uuid, disk):
        return jsonify(host.disk_hash(vm_uuid, disk))

    @app.post("/vms/<vm_uuid>/disks/<int:disk>/rebase")
    def rebase(vm_uuid, disk):
        b = body()
        if not isinstance(b.get("path"), str) or not b["path"]:
            raise BadRequest("rebase takes path: the plain file that is the disk now")
        return jsonify(host.rebase(vm_uuid, disk, b["path"]))

    @app.get("/vms/<vm_uuid>/disks/<int:disk>/bitmap")
    def bitmap(vm_uuid, disk):
        d = _disk(vm_uuid, disk)
        return jsonify({"block_size": d.block, "blocks": d.nblocks, "dirty_blocks": d.dirty_count(),
                        "bitmap": base64.b64encode(d.bitmap()).decode()})

    @app.post("/vms/<vm_uuid>/disks/<int:disk>/bitmap/clear")
    def bitmap_clear(vm_uuid, disk):
        _disk(vm_uuid, disk).clear_bitmap()
        return jsonify({"cleared": True})

    @app.post("/vms/<vm_uuid>/sync")
    def sync(vm_uuid):
        if isinstance(host._vm(vm_uuid), ImageVM):
            raise Conflict(f"VM {vm_uuid} runs on recovery images: it is not mirrored")
        if not host.io.attached:
            raise Conflict(f"no VRA is attached to {host.name}: nothing to sync to")
        return jsonify({"blocks": host.io.sync(vm_uuid)})

    @app.post("/vms/<vm_uuid>/disks/<int:disk>/sync-blocks")
    def sync_blocks(vm_uuid, disk):
        """Delta sync: stream the listed blocks (``blocks`` and/or ``runs`` of [start, count])."""
        _disk(vm_uuid, disk)
        if not host.io.attached:
            raise Conflict(f"no VRA is attached to {host.name}: nothing to sync to")
        b = body()
        try:
            bs = int(b.get("block_size", 4096))
            blocks = [int(x) for x in b.get("blocks", [])]
            for start, count in b.get("runs", []):
                start, count = int(start), int(count)
                if count < 0 or count > 1 << 32:
                    raise ValueError(f"bad run [{start}, {count}]")
                blocks.extend(range(start, start + count))
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"sync-blocks takes block_size and blocks or runs: {exc}") from exc
        try:
            out = host.io.sync_blocks(vm_uuid, disk, bs, blocks)
        except KeyError as exc:
            raise NotFound(f"VM {vm_uuid} is not running on {host.name}") from exc
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc
        return jsonify(out)

    @app.post("/barrier")
    def barrier():
        b = body()
        try:
            bid, vms = str(b["id"]), [str(u) for u in b["vms"]]
            hold = min(float(b.get("hold_ms", 50)), 1000) / 1000
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest(f"barrier takes id, vms and hold_ms: {exc}") from exc
        try:
            out = host.io.barrier(bid, vms, b.get("info", {}), hold)
        except RuntimeError as exc:
            raise Conflict(str(exc)) from exc
        if b.get("hashes"):   # for tests: the source disks exactly at the cut, while held
            out["hashes"] = {u: [d.sha256() for d in host.io.vms[u].disks]
                             for u in vms if u in host.io.vms}
        out["dirty"] = {u: sum(d.dirty_count() for d in host.io.vms[u].disks)
                        for u in vms if u in host.io.vms}
        return jsonify(out)

    @app.post("/barrier/<bid>/release")
    def release(bid):
        try:
            return jsonify(host.io.release(bid))
        except KeyError as exc:
            raise NotFound(str(exc)) from exc

    def _disk(vm_uuid, disk) -> Disk:
        vm = host._vm(vm_uuid)
        if isinstance(vm, ImageVM):
            raise Conflict(f"VM {vm.name} runs on recovery images: no dirty bitmap, no sync")
        if not 0 <= disk < len(vm.disks):
            raise NotFound(f"VM {vm.name} has no disk {disk}")
        return vm.disks[disk]

    return app


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--state", required=True, help="host state file written by the site controller")
    args = ap.parse_args(argv)
    state = json.loads(Path(args.state).read_text())
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s host {state['host']} %(levelname)s %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    exit_with_parent()
    host = Host(state)
    app = create_app(host)
    server = make_server("127.0.0.1", state.get("port", 0), app, threaded=True)
    stop = threading.Event()
    threading.Thread(target=host.serve_doorbell, args=(stop,), daemon=True).start()

    def _term(*_):
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    write_pidfile(Path(state["pid_file"]))
    port_file = Path(state["port_file"])
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": f"http://127.0.0.1:{server.port}", "pid": os.getpid()}))
    tmp.rename(port_file)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        host.shutdown()
        stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
