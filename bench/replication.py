#!/usr/bin/env python
"""End-to-end replication: throughput, RPO, delta sync, hash kernel and PIT reads, beside raw limits.

    .venv/bin/python bench/replication.py [--quick] [--json] [--dir DIR]

Everything runs on loopback in one run and is stopped at the end:

* raw limits: loopback TCP between two processes (1 MiB buffers); raw RocksDB WriteBatch
  ingest of 64 KiB values in ~1 MiB batches with the WAL fsynced (``bench/journal.py``'s
  ``ingest_raw``; 512 MiB per run, best of 2, one run with --quick: a sustained rate, like the
  one it is compared with); ``lz4.block.compress`` of 1 MiB of the workloads' random content (1 core).
* replicated throughput: a lab (``simulator.lab.Lab``, 2 sites, 2 hosts, 8 VMs), one recovery
  VRA (journal_sync true) and one protected VRA per host, routed through the lab's WAN link,
  as in ``tests/vra/test_replication.py``. The protected site's datastores (the guests' disk
  files) live in /dev/shm and the recovery journal and replicas on the disk, as on the separate
  storage of two real sites: the raw limits are the recovery side's own, measured alone, so the
  protected site's page-cache writeback must not land on the journal's disk either (with 8 VMs
  it made journal fsyncs stall for over 0.25 s; bench/RESULTS.md). ``--protected-storage
  disk`` puts both sites on the one disk, for comparison. (The RPO and delta-sync phases run
  on a lab of their own with the protected datastores on the disk, beside rsync's files.)
  Workloads of 64 KiB blocks, random pattern, random content, on 1 VM and then on all 8 (both hosts), each after the previous phase's backlog
  (queued, unacknowledged, dirty bitmaps) cleared. MB/s made durable = growth of the recovery
  journal's usage bytes (``GET /v1/recovery/vpgs/<vpg>/usage``) over a steady window after a
  warm-up. The figure (``throughput_mbps_*``) is the sustained rate: the guests offer rising
  rates (fractions of the raw RocksDB limit measured in the same run), and the answer is the
  durable MB/s at the highest rate at which nothing fell back to the dirty bitmaps and the
  journal kept pace with what the guests wrote (``throughput_steps_*`` has each step). For
  information (not with --quick), also the same with unthrottled guests (``throughput_unthrottled_mbps_*``): on
  two cores such guests take the CPU the path needs, overflow the rings, and part of their
  data then moves by bitmap sync. Goal: >= 0.8 of the weakest raw limit.
* RPO (first, on the fresh lab, after one valid checkpoint on the quiet VPG): 8 VMs at
  6.25 MB/s each (50 MB/s total), leader checkpoints every 1 s; ``rpo_s`` from
  the recovery VRA's ``GET /v1/status`` every 0.2 s for 30 s (10 s with --quick) after a
  warm-up; p50/p99. Goal: p99 <= 5 s.
* delta sync of a 2 GiB disk (256 MiB with --quick; the lab's disks are that size) with 1% of
  its 4 KiB blocks changed, beside ``rsync --inplace --no-whole-file -B 4096`` on the same two
  files. VM 0's disk is filled with random content behind the IO filter, brought to the replica by
  a first (untimed) ``POST /v1/protected/vpgs/<vpg>/sync``, copied (the rsync destination), then
  1% of its blocks are rewritten behind the filter. Delta sync time runs from the POST until the
  senders have nothing queued or unacknowledged and no bitmap is dirty (durable at the recovery
  site); a second pass must find no differing block. Without the endpoint (older VRAs): "not
  available", and rsync runs on two plain files. Goal: >= 8x faster than rsync.
* ``appliance.kernels.block_hashes`` at 4 KiB, GB/s on one core. Goal: >= 4.
* PIT read p99 of 64 KiB at 1e3, 1e5, 1e6 journal records (1e3, 1e4, 1e5 with --quick), from
  ``bench/journal.py``, best of 3 rounds of reads per length. The journals' 4 KiB entries go
  to the disk's first n/4 blocks (``--pit-layout hot``), so that a read meets the same work at
  every length and only the journal's length differs; ``--pit-layout spread`` puts them
  anywhere on a 4 GiB disk (then a 1e3 journal holds almost nothing a read touches). Goal:
  <= 2 ms at the largest, growth no faster than log n.

MB/s are 10**6 bytes per second.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_HERE = Path(__file__).resolve().parent
# bench/ holds a simulator.py of its own: it must not shadow the simulator package.
sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != _HERE]
sys.path.insert(0, str(ROOT))

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TOKEN = "bench-replication-token"
H = {"Authorization": f"Bearer {TOKEN}"}
VPG = "bench"
THROUGHPUT_GOAL = 0.8
RPO_GOAL_S = 5.0
DELTA_GOAL_X = 8.0
HASH_GOAL = 4.0
PIT_GOAL_MS = 2.0


def _load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", _HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- raw limits --------------------------------------------------------------------------------
def _tcp_sink(port_q, res_q, total):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port_q.put(srv.getsockname()[1])
    c, _ = srv.accept()
    buf = bytearray(MiB)
    got = 0
    t0 = None
    while got < total:
        n = c.recv_into(buf)
        if not n:
            break
        if t0 is None:
            t0 = time.perf_counter()
        got += n
    dt = time.perf_counter() - t0
    c.sendall(b"k")
    c.close()
    srv.close()
    res_q.put((got, dt))


def raw_tcp(total: int) -> float:
    ctx = mp.get_context("spawn")
    port_q, res_q = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_tcp_sink, args=(port_q, res_q, total), daemon=True)
    p.start()
    try:
        port = port_q.get(timeout=30)
        s = socket.create_connection(("127.0.0.1", port))
        buf = os.urandom(MiB)
        sent = 0
        while sent < total:
            s.sendall(buf)
            sent += len(buf)
        s.recv(1)
        s.close()
        got, dt = res_q.get(timeout=60)
        return got / dt / 1e6
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join(5)


def random_content(n: int, seed: int = 1) -> bytes:
    """``n`` bytes of what the workloads write with mix random:1 (their seeded random pool)."""
    from simulator.workload import Content
    c = Content(seed)
    return bytes(c.pool[:n])


def raw_lz4(data: bytes, seconds: float) -> float:
    import lz4.block
    lz4.block.compress(data)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        lz4.block.compress(data)
        n += 1
    return n * len(data) / (time.perf_counter() - t0) / 1e6


# -- the lab and the VRAs ----------------------------------------------------------------------
class VRAProc:
    def __init__(self, base: Path, name: str, **cfg):
        from simulator.procs import spawn, wait_for_file
        self.dir = base / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.cfg = {"name": name, "token": TOKEN, **cfg, "ready_file": str(self.dir / "ready.json"),
                    "state_dir": str(self.dir / "state")}
        (self.dir / "vra.json").write_text(json.dumps(self.cfg))
        self.proc = spawn([sys.executable, "-m", "appliance.vra.service", "--config",
                           str(self.dir / "vra.json")], self.dir / "vra.log")
        try:
            info = wait_for_file(Path(self.cfg["ready_file"]), 60, self.proc)
        except BaseException:
            self.stop()
            raise
        self.url = info["control_url"]
        self.replication = info["replication"]

    def stop(self):
        import psutil
        from simulator.procs import stop_process
        if self.proc.poll() is None:
            try:
                stop_process(psutil.Process(self.proc.pid), timeout=10)
            except psutil.NoSuchProcess:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def call(self, method, path, **kw):
        import requests
        r = requests.request(method, self.url + path, headers=H, timeout=kw.pop("timeout", 30), **kw)
        if r.status_code >= 400:
            raise RuntimeError(f"{self.name} {method} {path}: {r.status_code} {r.text}")
        return r.json() if r.content else None


class Rig:
    """A lab with 8 VMs on 2 hosts, a recovery VRA and one protected VRA per host."""

    def __init__(self, base: Path, disk_mib: int, lab_dir: Path | None = None, ring_mib: int = 256):
        from simulator.lab import Lab
        self.base = base
        self.vras: list[VRAProc] = []
        self.lab_dir = lab_dir
        self.lab = Lab(lab_dir or base / "lab")
        try:
            self._setup(base, disk_mib, ring_mib)
        except BaseException:
            self.down()
            raise

    def _setup(self, base: Path, disk_mib: int, ring_mib: int):
        self.lab.up(sites=2, hosts=2, vms=8, disk_mib=disk_mib, workload=False, ring_mib=ring_mib)
        st = {s["name"]: s for s in self.lab.status()["sites"]}
        a = st["site-a"]
        self.vms = a["vms"]
        self.rec = VRAProc(base, "vra-site-b-h0", journal_path=str(base / "journal"), journal_sync=True)
        self.vras.append(self.rec)
        disks = [{"vm": v["instance_uuid"], "disk": d["index"], "capacity": d["capacity_bytes"]}
                 for v in self.vms for d in v["disks"]]
        self.rec.call("PUT", f"/v1/recovery/vpgs/{VPG}", json={"replica_dir": str(base / "replicas"),
                                                               "disks": disks})
        route = self.lab.api("site-a", "POST", "/api/links", json={
            "peer": "site-b", "target_host": self.rec.replication[0],
            "target_port": self.rec.replication[1]})
        self.prot: dict[str, VRAProc] = {}
        self.host_urls: dict[str, str] = {}
        for h in a["hosts"]:
            host = self.lab.api("site-a", "GET", f"/api/hosts/{h['name']}")
            self.host_urls[h["name"]] = host["url"]
            p = VRAProc(base, f"vra-{h['name']}", doorbell=host["mirror"]["doorbell"], host_url=host["url"])
            self.vras.append(p)
            self.prot[h["name"]] = p
        self.leader = self.prot[a["hosts"][0]["name"]]
        self.participants = {p.name: p.url for p in self.prot.values()}
        self.route_port = route["port"]
        self.protect(0)

    def protect(self, interval_s: float, only_leader: bool = False):
        for p in self.prot.values():
            if only_leader and p is not self.leader:
                continue
            p.call("PUT", f"/v1/protected/vpgs/{VPG}", json={
                "vms": [v["instance_uuid"] for v in self.vms], "target_host": "127.0.0.1",
                "target_port": self.route_port, "compress": True, "leader": p is self.leader,
                "participants": self.participants, "interval_s": interval_s, "recovery_url": self.rec.url})

    def workloads(self, vms, action, mbps=0.0):
        for i, v in enumerate(vms):
            body = {"action": action}
            if action == "start":
                body["spec"] = {"mbps": mbps, "block_sizes": [64 * KiB], "pattern": "random",
                                "mix": {"random": 1.0}, "seed": 100 + i}
            self.lab.workload(v["name"], body)

    def cpu_roles(self) -> dict:
        """{role: [psutil.Process]}: the processes of the rig by what they do, for CPU figures."""
        import psutil
        roles = {"recovery VRA": [], "protected VRAs": [], "hosts": [], "sites and WAN link": []}
        lab_dir = str(self.lab.dir)
        for v in self.vras:
            try:
                roles["recovery VRA" if v is self.rec else "protected VRAs"].append(psutil.Process(v.proc.pid))
            except psutil.NoSuchProcess:
                pass
        for p in psutil.process_iter(["cmdline"]):
            c = " ".join(p.info["cmdline"] or [])
            if lab_dir in c:
                roles["hosts" if "simulator.host" in c else "sites and WAN link"].append(p)
        return roles

    def journal_appends(self) -> dict | None:
        return self.rec.call("GET", "/v1/status")["recovery"].get("journal_appends")

    def journal_bytes(self) -> int:
        return int(self.rec.call("GET", f"/v1/recovery/vpgs/{VPG}/usage")["bytes"])

    def dirty_blocks(self) -> int:
        import requests
        return sum(d["dirty_blocks"] for u in self.host_urls.values()
                   for vm in requests.get(u + "/status", timeout=10).json()["vms"] for d in vm["disks"])

    def mirrored_bytes(self) -> int:
        """Bytes the protected hosts' IO paths mirrored to their VRAs so far."""
        return sum(s.get("mirrored_bytes", 0) for s in self.lab.api("site-a", "GET", "/api/stats").values())

    def bitmap_writes(self) -> int:
        return sum(s.get("bitmap_writes", 0) for s in self.lab.api("site-a", "GET", "/api/stats").values())

    def drained(self) -> bool:
        if self.dirty_blocks():
            return False
        for p in self.prot.values():
            st = p.call("GET", "/v1/status")["protected"]
            s = st["vpgs"].get(VPG)
            if s is None or not s["connected"] or s["queued"] or s["unacked"] or st["pending_ring_records"]:
                return False
        return True

    def wait_drained(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.drained():
                return True
            time.sleep(0.2)
        return False

    def wait_connected(self, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if all((p.call("GET", "/v1/status")["protected"]["vpgs"].get(VPG) or {}).get("connected")
                       for p in self.prot.values()):
                    return True
            except Exception:
                pass
            time.sleep(0.2)
        return False

    def down(self):
        """Stop everything and delete what the lab wrote (the recovery journal of a full run
        holds tens of GB: the PIT phase after it needs the room)."""
        try:
            self._down()
        finally:
            for d in [self.lab_dir or self.base / "lab", self.base / "journal", self.base / "replicas",
                      *(v.dir for v in self.vras)]:
                shutil.rmtree(d, ignore_errors=True)

    def _down(self):
        for v in self.vras:
            try:
                v.stop()
            except Exception as exc:
                print(f"warning: stopping {v.name}: {exc}", file=sys.stderr)
        self.lab.down()


def measure_throughput(rig: Rig, vms, warm_s: float, window_s: float, say, drain_after: bool = True) -> float:
    if not rig.wait_drained(90):
        say("  (warning: the previous phase's backlog did not clear within 90 s)")
    bw0 = rig.bitmap_writes()
    rig.workloads(vms, "start", mbps=0)
    try:
        time.sleep(warm_s)
        b0, t0 = rig.journal_bytes(), time.monotonic()
        samples = []
        while time.monotonic() - t0 < window_s:
            time.sleep(0.5)
            samples.append((time.monotonic() - t0, rig.journal_bytes() - b0))
        b1, t1 = rig.journal_bytes(), time.monotonic()
    finally:
        rig.workloads(vms, "stop")
    bw = rig.bitmap_writes() - bw0
    if bw:
        say(f"  (rings overflowed: {bw} writes went to dirty bitmaps during this run)")
    mbps = (b1 - b0) / (t1 - t0) / 1e6
    t2 = time.monotonic()
    if not drain_after:              # the last phase on this lab: nothing measured after it
        return mbps
    if not rig.wait_drained(90):
        say("  (warning: the senders did not drain and the bitmaps did not clear within 90 s)")
    say(f"  (backlog drained {time.monotonic() - t2:.1f} s after the workloads stopped)")
    return mbps


def measure_sustained(rig: Rig, vms, rates, warm_s: float, window_s: float, say) -> tuple[float, list]:
    """The replicated throughput the path sustains: offered rates (MB/s in total, spread over
    ``vms``) in ascending order, each for a window after a warm-up; a rate is kept up with when
    no write fell back to a dirty bitmap and the recovery journal grew by at least 95% of what
    the guests wrote and the IO path mirrored in the same window. The answer is the journal's
    growth (MB/s durable) at the highest rate kept up with, and every step's figures."""
    best, steps = 0.0, []
    for rate in rates:
        if not rig.wait_drained(60):
            say("  (the previous step's backlog did not clear within 60 s: stopping)")
            break
        bw0 = rig.bitmap_writes()
        roles = rig.cpu_roles()
        rig.workloads(vms, "start", mbps=rate / len(vms))
        try:
            time.sleep(warm_s)
            m0, b0, t0 = rig.mirrored_bytes(), rig.journal_bytes(), time.monotonic()
            c0, a0 = _cpu(roles), rig.journal_appends()
            time.sleep(window_s)
            m1, b1, t1 = rig.mirrored_bytes(), rig.journal_bytes(), time.monotonic()
            c1, a1 = _cpu(roles), rig.journal_appends()
        finally:
            rig.workloads(vms, "stop")
        bw = rig.bitmap_writes() - bw0
        wrote, durable = (m1 - m0) / (t1 - t0) / 1e6, (b1 - b0) / (t1 - t0) / 1e6
        kept = bw == 0 and durable >= 0.95 * wrote
        cpu = {r: round((c1[r] - c0[r]) / (t1 - t0) * 100, 1) for r in c0}
        appends = _appends_between(a0, a1)
        steps.append({"offered_mbps": rate, "written_mbps": wrote, "durable_mbps": durable,
                      "bitmap_writes": bw, "kept_up": kept, "cpu_percent": cpu, "journal_appends": appends})
        say(f"    offered {rate:6.1f} MB/s: guests wrote {wrote:6.1f}, durable {durable:6.1f} MB/s, "
            f"{bw} writes to bitmaps: {'kept up' if kept else 'fell behind'}")
        say("      CPU % of one core: " + ", ".join(f"{r} {c:.0f}" for r, c in cpu.items()) +
            f"; all {sum(cpu.values()):.0f} of {os.cpu_count() * 100}")
        if appends:
            say(f"      journal appends: {appends['appends']}, mean {appends['mean_ms']:.0f} ms, "
                f"{appends['stalls']} over {appends['stall_threshold_s'] * 1e3:.0f} ms; seconds per step: " +
                ", ".join(f"{k} {v:.2f}" for k, v in appends["step_seconds"].items()))
        if not kept:
            break
        best = max(best, durable)
    return best, steps


def _appends_between(a0: dict | None, a1: dict | None) -> dict | None:
    """The recovery journal's append timings (``GET /v1/status``) over a window: appends, mean,
    stalls, seconds spent in each step (docs/vra.md); None from a VRA without them."""
    if not a0 or not a1:
        return None
    n = a1["appends"] - a0["appends"]
    return {"appends": n, "mean_ms": (a1["seconds"] - a0["seconds"]) / n * 1e3 if n else 0.0,
            "stalls": a1["stalls"] - a0["stalls"], "stall_threshold_s": a1["stall_threshold_s"],
            "histogram": [c1 - c0 for c0, c1 in zip(a0["histogram"]["counts"], a1["histogram"]["counts"])],
            "step_seconds": {k: a1["steps"][k]["seconds"] - a0["steps"][k]["seconds"] for k in a1["steps"]}}


def _cpu(roles: dict) -> dict:
    """CPU seconds (user + system) used so far by each role's processes."""
    import psutil
    out = {}
    for role, procs in roles.items():
        t = 0.0
        for p in procs:
            try:
                c = p.cpu_times()
                t += c.user + c.system
            except psutil.NoSuchProcess:
                pass
        out[role] = t
    return out


def measure_rpo(rig: Rig, warm_s: float, window_s: float) -> tuple[list[float], dict]:
    if not rig.wait_drained(90):
        print("  (warning: the backlog did not clear within 90 s before the RPO run)", file=sys.stderr)
    deadline = time.monotonic() + 30          # a first recoverable checkpoint on a quiet VPG
    while time.monotonic() < deadline:
        if rig.leader.call("POST", f"/v1/protected/vpgs/{VPG}/checkpoints", json={})["valid"]:
            break
        time.sleep(0.5)
    deadline = time.monotonic() + 15          # ... recoverable (its COMMIT journaled) before sampling
    while time.monotonic() < deadline:
        if rig.rec.call("GET", "/v1/status")["recovery"]["vpgs"].get(VPG, {}).get("rpo_s") is not None:
            break
        time.sleep(0.2)
    rig.protect(1.0, only_leader=True)
    rig.workloads(rig.vms, "start", mbps=50.0 / len(rig.vms))
    rpos = []
    try:
        time.sleep(warm_s)
        t0 = time.monotonic()
        b0 = rig.journal_bytes()
        nxt = t0
        while time.monotonic() - t0 < window_s:
            r = rig.rec.call("GET", "/v1/status")["recovery"]["vpgs"].get(VPG, {}).get("rpo_s")
            rpos.append(float("inf") if r is None else float(r))
            nxt += 0.2
            time.sleep(max(0.0, nxt - time.monotonic()))
        rate = (rig.journal_bytes() - b0) / (time.monotonic() - t0) / 1e6
        coord = rig.leader.call("GET", "/v1/status")["coordinators"].get(VPG, {})
        coord["problems"] = (coord.get("last") or {}).get("problems")
    finally:
        rig.workloads(rig.vms, "stop")
        rig.protect(0, only_leader=True)
    return rpos, {"mbps_window": rate, "taken": coord.get("taken"), "invalid": coord.get("invalid"),
                  "problems": coord.get("problems")}


def _change_blocks(path: str, size: int, rng) -> int:
    blocks = size // (4 * KiB)
    changed = rng.choice(blocks, blocks // 100, replace=False)
    fd = os.open(path, os.O_WRONLY)
    try:
        for b in changed:
            os.pwrite(fd, rng.bytes(4 * KiB), int(b) * 4 * KiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(changed)


def measure_delta_sync(rig: Rig, base: Path, say, notes) -> tuple[float | None, float | None]:
    """Delta sync of VM 0's disk 0 (1% of its 4 KiB blocks changed behind the IO filter's back)
    through the VRA, end to end (POST .../sync until the recovery journal holds it durably and no
    bitmap is dirty), then rsync of the same source file onto a copy of its previous content."""
    import numpy as np
    import requests
    vm = rig.vms[0]
    uid = vm["instance_uuid"]
    prot = rig.prot[vm["host"]]
    st = requests.get(rig.host_urls[vm["host"]] + "/status", timeout=10).json()
    d = next(x for v in st["vms"] if v["instance_uuid"] == uid for x in v["disks"] if x["index"] == 0)
    path, size = d["path"], int(d["capacity_bytes"])
    rng = np.random.default_rng(5)
    fd = os.open(path, os.O_WRONLY)                 # random content, written behind the filter
    try:
        for off in range(0, size, 64 * MiB):
            os.pwrite(fd, rng.bytes(min(64 * MiB, size - off)), off)
        os.fsync(fd)
    finally:
        os.close(fd)
    body = {"vm": uid, "disk": 0}
    t0 = time.perf_counter()
    first = prot.call("POST", f"/v1/protected/vpgs/{VPG}/sync", json=body, timeout=1800)
    if not rig.wait_drained(600):
        notes.append("the initial delta sync did not drain within 600 s")
    say(f"  initial sync (replica behind by the whole disk): {time.perf_counter() - t0:.2f} s, "
        f"{first.get('blocks_differing')} of {first.get('blocks_compared')} blocks differed")
    dst = base / "delta-dst.img"
    shutil.copyfile(path, dst)                      # what the replica holds now
    old = time.time() - 86400                       # so that rsync does not skip it by size + mtime
    os.utime(dst, (old, old))
    nchanged = _change_blocks(path, size, rng)
    # as run_rsync does before its run: the copy's 2 GiB of dirty pages go to the disk now,
    # not during the delta sync, whose journal fsyncs would wait behind them
    os.sync()
    load = os.getloadavg()
    t0 = time.perf_counter()
    r = prot.call("POST", f"/v1/protected/vpgs/{VPG}/sync", json=body, timeout=1800)
    deadline = time.monotonic() + 600                # drained: polled every 20 ms (not 0.2 s)
    while not (ok := rig.drained()) and time.monotonic() < deadline:
        time.sleep(0.02)
    delta_s = time.perf_counter() - t0
    if not ok:
        notes.append("the delta sync did not drain within 600 s")
        delta_s = None
    check = prot.call("POST", f"/v1/protected/vpgs/{VPG}/sync", json=body, timeout=1800)
    rig.wait_drained(120)
    say(f"  delta sync ({nchanged} blocks changed): "
        f"{'n/a' if delta_s is None else f'{delta_s:.2f} s'} end to end (VRA-reported {r.get('seconds')} s: "
        f"hashing the source {r.get('seconds_hashing')} s, waiting for the recovery side's hashes "
        f"{r.get('seconds_waiting_recovery')} s, streaming {r.get('seconds_streaming')} s), "
        f"{r.get('blocks_differing')} blocks differed, {r.get('blocks_sent')} sent; "
        f"a second pass found {check.get('blocks_differing')} differing; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if check.get("blocks_differing"):
        notes.append(f"delta sync did not converge: a second pass found {check['blocks_differing']} "
                     "differing blocks")
    load = os.getloadavg()
    rsync_s = run_rsync(Path(path), dst, 900)
    if rsync_s is not None:
        same = subprocess.run(["cmp", "-s", path, str(dst)]).returncode == 0
        say(f"  rsync --inplace --no-whole-file -B 4096: {rsync_s:.2f} s (files equal after: {same}; "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
        if not same:
            notes.append("rsync left the files different")
    dst.unlink(missing_ok=True)
    return delta_s, rsync_s


def _f(x, nd=2):
    return "n/a" if x is None else f"{x:.{nd}f}"


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))]


# -- delta sync --------------------------------------------------------------------------------
def delta_sync_endpoint() -> bool:
    src = "".join((ROOT / "appliance" / "vra" / f).read_text() for f in ("service.py", "api.py")
                  if (ROOT / "appliance" / "vra" / f).exists())
    return "/v1/protected/vpgs/<vpg>/sync" in src


def make_delta_files(base: Path, size: int, seed: int = 5) -> tuple[Path, Path, int]:
    import numpy as np
    rng = np.random.default_rng(seed)
    src, dst = base / "delta-src.img", base / "delta-dst.img"
    chunk = 64 * MiB
    with open(dst, "wb") as f:
        for off in range(0, size, chunk):
            f.write(rng.integers(0, 256, min(chunk, size - off), dtype=np.uint8).tobytes())
    shutil.copyfile(dst, src)
    blocks = size // (4 * KiB)
    changed = rng.choice(blocks, blocks // 100, replace=False)
    fd = os.open(src, os.O_WRONLY)
    try:
        for b in changed:
            os.pwrite(fd, rng.integers(0, 256, 4 * KiB, dtype=np.uint8).tobytes(), int(b) * 4 * KiB)
    finally:
        os.close(fd)
    old = time.time() - 86400                       # so that rsync does not skip it by size + mtime
    os.utime(dst, (old, old))
    return src, dst, len(changed)


def run_rsync(src: Path, dst: Path, timeout: float) -> float | None:
    if shutil.which("rsync") is None:
        return None
    subprocess.run(["sync"], check=False)
    t0 = time.perf_counter()
    subprocess.run(["rsync", "--inplace", "--no-whole-file", "-B", "4096", str(src), str(dst)],
                   check=True, timeout=timeout, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


# -- hash kernel -------------------------------------------------------------------------------
def hash_gbps(mib: int, repeat: int) -> float:
    import numpy as np
    import appliance.kernels as K
    K.block_hashes(b"", 4096)
    data = np.random.default_rng(2024).integers(0, 2**64, mib * MiB // 8, dtype=np.uint64).view(np.uint8)
    K.block_hashes(data, 4096)
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        K.block_hashes(data, 4096)
        best = min(best, time.perf_counter() - t0)
    return mib * MiB / best / 1e9


# -- PIT reads ---------------------------------------------------------------------------------
# Rounds of PIT reads per journal length, the best p99 counting: a ratio of p99s measured
# minutes apart moved with the machine (one 1e3 journal's two rounds: 0.660 and 0.383 ms).
PIT_ROUNDS = 3


def pit_reads(base: Path, sizes, reads: int, say, layout: str = "hot", rounds: int = PIT_ROUNDS) -> dict:
    """Per journal length: the PIT read latency (``bench/journal.py``'s ``read_latency``) of
    ``rounds`` rounds of ``reads`` reads; the round with the lower p99 counts (the others are
    printed), so that one burst of another process's work does not decide a ratio of p99s."""
    bj = _load_bench("journal")
    rng = random.Random(1)
    vm = str(uuid.UUID(int=rng.getrandbits(128)))
    disk_size = 4 * GiB
    out = {}
    for n in sizes:
        path = str(base / f"pit{n}")
        j, cps, build_s = bj.build_read_journal(path, n, rng, vm, disk_size, layout)
        region = bj.read_region(n, disk_size, layout)
        try:
            runs = [bj.read_latency(j, cps, vm, disk_size, reads, rng, region) for _ in range(rounds)]
        finally:
            j.close()
            shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(path + "-replica", ignore_errors=True)
        r = min(runs, key=lambda x: x["p99_ms"])
        out[n] = r
        rounds_p99 = ", ".join(f"{x['p99_ms']:.3f}" for x in runs)
        say(f"  {n:>9} entries: build {build_s:.1f} s, p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms "
            f"(p99 of each round: {rounds_p99})")
    return out


def _show_failures(base: Path, rig) -> None:
    """Before the bench's folders go: the end of every process log that holds a traceback
    (the lab's sites and hosts, the VRAs), on stderr, so that a failed run says why."""
    dirs = {base} | ({rig.lab_dir} if rig is not None and rig.lab_dir else set())
    for d in dirs:
        for log in sorted(d.rglob("*.log")):
            try:
                text = log.read_text(errors="replace")
            except OSError:
                continue
            if "Traceback" in text:
                at = text.rfind("Traceback")
                print(f"--- {log} (from its last traceback)\n{text[max(0, at - 2000):at + 6000]}",
                      file=sys.stderr, flush=True)


def goal(ok, text, value):
    if ok is None:
        return f"goal: {text}: n/a ({value})"
    return f"goal: {text}: {'PASS' if ok else 'MISS'} ({value})"


PIT_LAYOUTS = {
    "hot": "in the disk's first n/4 blocks, about 4 writes per block, so a read meets the same mix of "
           "journal and replica at every length (default)",
    "spread": "anywhere on a 4 GiB disk, so a short journal holds almost nothing a read touches and "
              "the read's own work grows with n",
}
PHASES = ("raw", "rpo", "delta", "throughput", "hash", "pit")


def raw_limits(res: dict, base: Path, q: bool, say) -> None:
    """The machine's own limits: loopback TCP, RocksDB ingest with WAL fsync, lz4."""
    res["raw_tcp_mbps"] = raw_tcp((512 if q else 2048) * MiB)
    say(f"  loopback TCP, 1 MiB buffers, 2 processes: {res['raw_tcp_mbps']:.0f} MB/s")
    bj = _load_bench("journal")
    payload = random_content(64 * KiB + 64, seed=3)
    rdb = 0.0
    # 512 MiB per run, --quick too: a shorter run ends before RocksDB's memtable flushes and
    # L0 compactions catch up and reads ~25% faster (128 MiB: 155-161 MB/s where 512 MiB and
    # 1 GiB give 126-130 on the same disk, bench/RESULTS.md), which no sustained rate can match.
    for i in range(1 if q else 2):
        p = str(base / f"raw{i}")
        rdb = max(rdb, bj.ingest_raw(p, MiB, 512 * MiB, payload))
        shutil.rmtree(p, ignore_errors=True)
    res["raw_rocksdb_mbps"] = rdb
    say(f"  RocksDB WriteBatch, 1 MiB batches of 64 KiB values, WAL fsync: {rdb:.0f} MB/s")
    res["raw_lz4_mbps"] = raw_lz4(random_content(MiB, seed=4), 1.0 if q else 3.0)
    say(f"  lz4.block.compress, 1 MiB random content, 1 core: {res['raw_lz4_mbps']:.0f} MB/s")


def measure_rpo_phase(rig, res: dict, q: bool, say, notes: list) -> None:
    rpos, info = measure_rpo(rig, 2.0 if q else 5.0, 10.0 if q else 30.0)
    finite = [r for r in rpos if math.isfinite(r)]
    if info.get("invalid"):
        notes.append(f"RPO run: {info['invalid']} of {info['taken']} checkpoints invalid; last problems: "
                     f"{info.get('problems')}")
    if len(finite) < len(rpos):
        notes.append(f"{len(rpos) - len(finite)} of {len(rpos)} RPO samples had no recoverable checkpoint")
    if rpos:
        res["rpo_p50_s"] = pct(rpos, 0.5) if math.isfinite(pct(rpos, 0.5)) else None
        res["rpo_p99_s"] = pct(rpos, 0.99) if math.isfinite(pct(rpos, 0.99)) else None
    say(f"  RPO at 8 x 6.25 MB/s, checkpoint every 1 s, {len(rpos)} samples: p50 {_f(res['rpo_p50_s'])} s, "
        f"p99 {_f(res['rpo_p99_s'])} s (max {max(rpos) if rpos else float('nan'):.2f}; journal grew "
        f"{info['mbps_window']:.1f} MB/s over the window; checkpoints taken {info['taken']}, "
        f"invalid {info['invalid']})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller runs (under 2 minutes)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--dir", default=None, help="where to put labs, journals and files (default: system temp)")
    ap.add_argument("--protected-storage", choices=("disk", "shm"), default="shm",
                    help="where the throughput phase's protected datastores (the guests' disks) live: in /dev/shm, "
                         "as on a separate storage system at a real protected site (default), or on "
                         "the bench disk with the recovery journal")
    ap.add_argument("--ring-mib", type=int, default=256,
                    help="each protected host's mirror ring (the IO filter's replication buffer) in MiB; "
                         "default 256, the lab's own; larger rings ride out longer stalls of the path")
    ap.add_argument("--pit-layout", choices=sorted(PIT_LAYOUTS), default="hot",
                    help="where the PIT journals' 4 KiB entries land: " +
                         "; ".join(f"{k}: {v}" for k, v in sorted(PIT_LAYOUTS.items())))
    ap.add_argument("--only", default=",".join(PHASES),
                    help=f"comma-separated phases to run, of {','.join(PHASES)} (default: all)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if only - set(PHASES):
        ap.error(f"--only: unknown phases {sorted(only - set(PHASES))}; known: {','.join(PHASES)}")
    q = args.quick
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else \
        (lambda *a: print(*a, flush=True))
    base = Path(tempfile.mkdtemp(prefix="tidemark-bench-repl-", dir=args.dir))
    res = {k: None for k in ("throughput_mbps_1vm", "throughput_mbps_8vm", "raw_tcp_mbps", "raw_rocksdb_mbps",
                             "raw_lz4_mbps", "rpo_p50_s", "rpo_p99_s", "delta_sync_s", "rsync_s",
                             "hash_gbps_per_core", "pit_read_p99_ms")}
    notes = []
    t_start = time.perf_counter()
    rig = None
    old_term = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        # raw limits
        phases = {}

        def mark(name, _t=[time.perf_counter()]):
            now = time.perf_counter()
            phases[name] = now - _t[0]
            _t[0] = now

        say("raw limits")
        if "raw" not in only:
            say("  (skipped)")
        else:
            raw_limits(res, base, q, say)
        mark("raw limits")
        def lab_up(storage: str) -> Rig:
            lab_dir = Path(tempfile.mkdtemp(prefix="tidemark-bench-lab-", dir="/dev/shm")) \
                if storage == "shm" else None
            r = Rig(base, disk_mib=256 if q else 2048, lab_dir=lab_dir, ring_mib=args.ring_mib)
            say(f"replication (lab: 2 sites, 8 VMs on 2 hosts, {args.ring_mib} MiB ring per host; "
                "journal_sync true; via the WAN link; "
                f"protected datastores {'in /dev/shm' if lab_dir else 'on the bench disk'}, recovery "
                "journal and replicas on the bench disk)")
            if not r.wait_connected(30):
                notes.append("protected senders did not all connect within 30 s")
            mark(f"lab up ({storage})")
            return r

        res["ring_mib"] = args.ring_mib
        # RPO and delta sync: the protected datastores on the bench disk, where rsync's two
        # files are too (tmpfs has no large folios here: hashing a 2 GiB disk from /dev/shm
        # took 0.9-1.0 s against 0.42 s from ext4's page cache, whatever the way of reading)
        if only & {"rpo", "delta"}:
            rig = lab_up("disk")
        if "rpo" in only:
            measure_rpo_phase(rig, res, q, say, notes)
            mark("RPO")
        size = (256 * MiB) if q else (2 * GiB)
        if "delta" in only and delta_sync_endpoint():
            say(f"delta sync: {size // MiB} MiB disk of VM 0, 1% of 4 KiB blocks changed")
            try:
                res["delta_sync_s"], res["rsync_s"] = measure_delta_sync(rig, base, say, notes)
            except Exception as exc:
                notes.append(f"delta sync failed: {exc}")
                say(f"  delta sync failed: {exc}")
            mark("delta sync, rsync")
        if rig is not None and "throughput" in only:
            rig.down()
            rig = None
        # throughput: the protected datastores where --protected-storage says (default /dev/shm)
        if "throughput" in only:
            rig = lab_up(args.protected_storage)
            res["protected_storage"] = args.protected_storage
        if "throughput" in only:
            warm, window = (1.0, 3.0) if q else (3.0, 12.0)
            one = [rig.vms[0]]
            hosts = sorted({v["host"] for v in rig.vms})
            base_rate = res["raw_rocksdb_mbps"] or 100.0
            fractions = (0.25, 0.5, 0.8) if q else (0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
            for key, vms, label in (("1vm", one, "1 VM"), ("8vm", rig.vms, f"8 VMs ({len(hosts)} hosts)")):
                say(f"  {label}, sustained: offered rates {', '.join(f'{f:g}' for f in fractions)} x "
                    f"{base_rate:.0f} MB/s (the RocksDB raw limit), {window:g} s each")
                best, steps = measure_sustained(rig, vms, [f * base_rate for f in fractions],
                                                1.0 if q else 2.0, window, say)
                res[f"throughput_mbps_{key}"] = best
                res[f"throughput_steps_{key}"] = steps
                say(f"  {label}: {best:.1f} MB/s durable, sustained")
                mark(f"{label} sustained")
                if q:       # information only, and its drain took up to 17 s: --quick stays < 2 min
                    continue
                res[f"throughput_unthrottled_mbps_{key}"] = measure_throughput(
                    rig, vms, warm, window, say, drain_after=key == "1vm")
                say(f"  {label}, unthrottled guests (information): "
                    f"{res[f'throughput_unthrottled_mbps_{key}']:.1f} MB/s durable")
                mark(f"{label} unthrottled")
        if rig is not None:
            rig.down()
            rig = None
        if "delta" in only and (not delta_sync_endpoint() or res["rsync_s"] is None):
            if not delta_sync_endpoint():
                notes.append("delta sync: the VRA has no POST /v1/protected/vpgs/<vpg>/sync endpoint yet")
                say(f"delta sync: not available yet ({size // MiB} MiB file, 1% of 4 KiB blocks changed)")
            src, dst, nchanged = make_delta_files(base, size)
            res["rsync_s"] = run_rsync(src, dst, 900)
            if res["rsync_s"] is None:
                notes.append("rsync is not installed")
            else:
                same = subprocess.run(["cmp", "-s", str(src), str(dst)]).returncode == 0
                say(f"  rsync --inplace --no-whole-file -B 4096: {res['rsync_s']:.2f} s "
                    f"({nchanged} blocks changed; files equal after: {same})")
            src.unlink(missing_ok=True)
            dst.unlink(missing_ok=True)

        if "hash" in only:
            res["hash_gbps_per_core"] = hash_gbps(32 if q else 256, 1 if q else 3)
            say(f"block_hashes 4 KiB, one core: {res['hash_gbps_per_core']:.2f} GB/s")
            mark("hash")
        if "pit" in only:
            sizes = (1_000, 10_000, 100_000) if q else (1_000, 100_000, 1_000_000)
            say(f"PIT read p99, 64 KiB at a random checkpoint ({1500 if q else 5000} reads per size, {PIT_ROUNDS} rounds; "
                f"{args.pit_layout} layout: {PIT_LAYOUTS[args.pit_layout]})")
            pit = pit_reads(base, sizes, 1500 if q else 5000, say, args.pit_layout)
            res["pit_read_p99_ms"] = {str(n): r["p99_ms"] for n, r in pit.items()}
            res["pit_layout"] = args.pit_layout
            mark("PIT reads")
        notes.append("phase seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))
        if only != set(PHASES):
            notes.append(f"only these phases ran: {','.join(p_ for p_ in PHASES if p_ in only)}")
    except KeyboardInterrupt:
        notes.append("interrupted")
        raise
    except Exception:
        _show_failures(base, rig)
        raise
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if rig is not None:
            rig.down()
        shutil.rmtree(base, ignore_errors=True)

    # goals (of the phases that ran)
    raw = {k: res[k] for k in ("raw_tcp_mbps", "raw_rocksdb_mbps", "raw_lz4_mbps") if res[k]}
    weakest_k = min(raw, key=raw.get) if raw else None
    weakest = raw[weakest_k] if raw else None
    say("")
    if raw:
        say(f"{'':32}{'MB/s':>9}{'/ weakest raw':>15}")
        for name, k in (("replicated, 1 VM", "throughput_mbps_1vm"), ("replicated, 8 VMs", "throughput_mbps_8vm"),
                        ("raw loopback TCP", "raw_tcp_mbps"), ("raw RocksDB WAL-sync ingest", "raw_rocksdb_mbps"),
                        ("raw lz4 compress", "raw_lz4_mbps")):
            v = res[k]
            say(f"{name:32}{v:9.1f}{v / weakest:15.2f}" if v is not None else f"{name:32}{'n/a':>9}")
        say(f"weakest raw limit: {weakest_k} ({weakest:.0f} MB/s)")
    if "throughput" in only:
        for k in ("throughput_mbps_1vm", "throughput_mbps_8vm"):
            v = res[k]
            say(goal(v >= THROUGHPUT_GOAL * weakest, f"{k} >= {THROUGHPUT_GOAL} of the weakest raw limit",
                     f"{v / weakest:.2f}") if weakest else f"{k}: {v:.1f} MB/s (raw limits not run)")
    if "rpo" in only:
        p99 = res["rpo_p99_s"]
        say(goal(p99 is not None and p99 <= RPO_GOAL_S, f"RPO p99 <= {RPO_GOAL_S:g} s",
                 f"p50 {_f(res['rpo_p50_s'])} s, p99 {_f(p99)} s"))
    if "delta" in only:
        if res["delta_sync_s"] is None:
            say(goal(None, f"delta sync >= {DELTA_GOAL_X:g}x faster than rsync",
                     f"delta sync not available; rsync {res['rsync_s']:.2f} s" if res["rsync_s"] else
                     "delta sync not available"))
        else:
            x = res["rsync_s"] / res["delta_sync_s"]
            say(goal(x >= DELTA_GOAL_X, f"delta sync >= {DELTA_GOAL_X:g}x faster than rsync", f"{x:.1f}x"))
    if "hash" in only:
        h = res["hash_gbps_per_core"]
        say(goal(h >= HASH_GOAL, f"block_hashes 4 KiB >= {HASH_GOAL:g} GB/s per core", f"{h:.2f}"))
    if "pit" in only:
        pits = {int(k): v for k, v in res["pit_read_p99_ms"].items()}
        ns = sorted(pits)
        lo, hi = ns[0], ns[-1]
        growth, log_growth = pits[hi] / pits[lo], math.log(hi) / math.log(lo)
        say("PIT read p99: " + ", ".join(f"{n:g} entries {pits[n]:.3f} ms" for n in ns))
        say(goal(pits[hi] <= PIT_GOAL_MS and growth <= log_growth,
                 f"PIT read p99 <= {PIT_GOAL_MS:g} ms at {hi:g} entries, growth no faster than log n",
                 f"{pits[hi]:.3f} ms; growth {growth:.2f}x vs log n {log_growth:.2f}x"))
    if q:
        notes.append("--quick: smaller sizes (256 MiB delta sync, PIT journals up to 1e5, 3 s steps, no "
                     "unthrottled runs): its figures are a smoke test; the goals are set for the full "
                     "run's sizes")
    for n in notes:
        say(f"note: {n}")
    say(f"elapsed {time.perf_counter() - t_start:.1f} s")
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
