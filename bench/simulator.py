#!/usr/bin/env python
"""Mirrored vs raw guest write speed of the simulated host IO path.

    .venv/bin/python bench/simulator.py [--quick] [--json] [-v] [--block-sizes 64]
                                        [--seconds S] [--slices N]

For each block size (4 KiB, 64 KiB, 1 MiB; random pattern, random content,
seeded) the same guest writes from ``simulator.workload.Generator`` +
``Content`` are issued five ways. In each the guest does the same work per
write: it fills a write buffer with its data (one memory copy from the prepared
content, the same ``fill`` function everywhere) and then the write is issued:

* raw, reused buffer: the guest's buffer is its own, one buffer reused (so it
  stays in the CPU cache), and ``IOPath.raw_write`` writes it to the VM's disk
  file (``Disk.write``: O_DIRECT, as the host writes guest data), no IO filter;
* raw, ring memory: the same, with buffers rotating through the ring's own data
  area (free while no way is mirroring: the bench writes payload bytes there,
  never a header, and the VRA reads nothing past the head), in slots laid out
  like the ring's payloads. So raw and mirrored writes come from the same
  memory: on this machine, the same O_DIRECT writes can be 20-35 µs slower from
  one mapping than from another, depending on which guest memory the mapping
  got (memory the guest freed and reused recently is slow; bench/RESULTS.md,
  eighth session), which is no part of the IO path's cost;
* mirrored: ``IOPath.write`` with a VRA attached: the buffer the guest fills is
  the record's payload in the shared-memory ring, the IO path checksums it,
  writes it to the disk file from the ring (O_DIRECT) and commits it. The VRA is
  a separate process using ``simulator.mirror.MirrorClient``: it polls every
  record (``RingConsumer.poll`` verifies the XXH3 checksum), checks that the
  host seq grows by one, pwrites WRITE payloads to a replica file (in /dev/shm
  unless --replica-dir says otherwise: it only proves the stream complete; a
  protected VRA keeps no replica on the host), and acknowledges every record;
  with the ring empty it waits as ``RingConsumer.wait`` does (naps of 0.2 ms,
  then the doorbell);
* raw, another CPU busy (information only): raw from the ring's memory while a
  plain busy loop runs in another process, keeping a second CPU as busy as the
  VRA keeps one during the mirrored run. On a virtual machine, a busy second
  vCPU can slow the first one's disk writes; this shows how much of the gap is
  that (bench/RESULTS.md, seventh session);
* raw, elsewhere (information only): raw from buffers rotating through a
  separate region as large as the ring, to show the memory effect above.

The disk on this kind of machine (a virtual disk) changes speed by 2-3x within
seconds, so the ways do not run one after the other for long: each block
size runs N short slices (24; 6 with --quick), each slice the five ways over
the same writes in an order that turns from slice to slice. A rate is all
slices' bytes over all slices' time; the ratio (the goal's) is mirrored over
the faster of the first two raw ways. The per-slice ratios (against that
slice's faster plain raw) are printed for the spread, and a 95% interval of
the ratio from resampling the slices with replacement (2000 times): how far
one run's figure can be trusted, given how much its slices differ (runs of
the same code have spread by about +-0.03 at 64 KiB: bench/RESULTS.md, tenth
session). The mirrored time runs
from the first write until the VRA has acknowledged the last record
(sustained, not just what the guest saw; the guest-visible rate is printed as
well).

After the slices, the IO path's own work is measured apart (information only),
on a second IO path with a ring of its own (freed in this process, no VRA):

* warm: the same ``IOPath.write`` to a disk whose writes go to /dev/null, against
  the raw way's fill and the same write to /dev/null: the CPU the path adds to a write
  (reservation, XXH3 checksum, commit), best of 30 rounds, and the ratio that
  cost alone would leave against the raw write time just measured;
* in the write loop: ``IOPath.write`` with real O_DIRECT writes to a second disk
  file, against raw writes of the same ops from the same ring memory,
  alternating, median of 40 rounds. There the path's work runs right after each
  disk wait, as in the guest's loop, with the CPU's caches cold, and costs
  several times what it costs warm (bench/RESULTS.md, fourteenth session). That
  ratio is what the IO path alone leaves; the run's ratio over it is what the VRA
  running beside the guest costs.

The disk and replica files are written once with zeros before timing (no run
pays ext4's first-write conversion of fallocated extents), and the disk file
is then dropped from the page cache (the host writes it with O_DIRECT). The
ring (64 MiB, the host default) and the doorbell live in /dev/shm, where the
lab puts them. At the end, the replica's SHA-256 must equal the disk's.
"""
from __future__ import annotations

import argparse
import json
import math
import mmap
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# This file is itself called simulator.py: its folder must not shadow the simulator package.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != Path(_HERE)]
sys.path.insert(0, str(ROOT))
if getattr(sys.modules.get("simulator"), "__file__", None) == str(Path(__file__).resolve()):
    del sys.modules["simulator"]

from appliance import pagecache  # noqa: E402  (light: ctypes, mmap)
from simulator import ring as R  # noqa: E402  (light: mmap, struct, xxhash)

KiB = 1024
MiB = 1024 * KiB
BLOCK_SIZES = (4 * KiB, 64 * KiB, MiB)
GOAL_BS = 64 * KiB
GOAL_RATIO = 0.8


# -- the VRA: a separate process ------------------------------------------------------
def vra_main(doorbell: str, replica: str, conn, cpu: int | None = None):
    """Take the host's stream, verify every record, apply writes to ``replica``, ack each."""
    from simulator.mirror import MirrorClient

    if cpu is not None:
        os.sched_setaffinity(0, {cpu})

    client = MirrorClient(doorbell, vra="bench-vra")
    ring = client.ring
    fd = os.open(replica, os.O_RDWR)
    records = writes = nbytes = seq_errors = other = 0
    idle = 0.0
    last_seq = None

    def stats(**extra):
        return {"records": records, "writes": writes, "bytes": nbytes, "seq_errors": seq_errors,
                "other": other, "idle_s": idle, **extra}

    conn.send("ready")
    poll, ack, pwrite, perf_counter = ring.poll, ring.ack, os.pwrite, time.perf_counter
    WRITE, SYNC = R.WRITE, R.SYNC
    try:
        while True:
            try:
                rec = poll()              # verifies the record's XXH3 checksum
            except R.RingCorrupt as exc:
                conn.send(stats(error=str(exc)))
                return
            if rec is not None:
                seq = rec.seq
                if last_seq is not None and seq != last_seq + 1:
                    seq_errors += 1
                last_seq = seq
                rtype = rec.type
                if rtype == WRITE or rtype == SYNC:
                    payload = rec.payload
                    pwrite(fd, payload, rec.offset)
                    writes += 1
                    nbytes += len(payload)
                    del payload
                else:
                    other += 1
                records += 1
                del rec
                ack()                     # after the record is applied: frees its ring space
                continue
            if conn.poll():
                if conn.recv() == "stop":
                    break
                conn.send(stats())
                continue
            t0 = perf_counter()
            ring.wait(0.05)               # naps up to 20 ms, then sleeps on the doorbell
            idle += perf_counter() - t0
    finally:
        os.close(fd)
        client.close()


def busy_main(run, stop):
    """A plain busy loop while ``run`` is set: keeps a CPU as busy as a working VRA keeps it."""
    while not stop.is_set():
        if run.wait(0.2):
            x = 0
            while run.is_set():
                for _ in range(1000):
                    x += 1


# -- helpers ---------------------------------------------------------------------------------
def preallocate(path: str, size: int, written: bool = True, cached: bool = True):
    """Allocate the whole file and read it once, so that every page is cached and clean.

    ``written``: write every block once (zeros), like an eager-zeroed thick disk, so that no
    timed run pays the filesystem's conversion of never-written (fallocated) extents, which
    makes a file slower the first time each region is written and so drifts from run to run.
    Otherwise only fallocate. ``cached`` False: instead of the read, drop the file from the
    page cache (a disk the host writes with O_DIRECT: a cached page would cost the first
    direct write of its range an invalidation).
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        if written:
            zero = bytes(8 * MiB)
            for off in range(0, size, len(zero)):
                os.pwrite(fd, zero[:min(len(zero), size - off)], off)
            os.fsync(fd)
        else:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError:
                pass  # a filesystem without fallocate: the read pass still caches the pages
        if not cached:
            if not pagecache.drop([path]):
                print(f"note: the page cache kept some of {path}", file=sys.stderr)
            return
        buf = bytearray(8 * MiB)
        view = memoryview(buf)
        for off in range(0, size, len(buf)):
            os.preadv(fd, [view[:min(len(buf), size - off)]], off)
    finally:
        os.close(fd)


def make_ops(bs: int, n: int, seed: int, capacity: int, content):
    """n writes of the workload generator: [(offset, source view)], all of size bs."""
    from simulator.workload import Generator, WorkloadSpec

    spec = WorkloadSpec(mbps=0, block_sizes=[bs], pattern="random", mix={"random": 1.0},
                        seed=seed)
    gen = Generator(spec, [capacity])
    ops = []
    for _ in range(n):
        _disk, off, size, kind = gen.next()
        ops.append((off, content.source(kind, size, gen.rng)))
    return ops


def _filler(src):
    """The guest's work for one write: fill the buffer it is given with its data."""
    return lambda view: view.__setitem__(slice(None), src)


def ring_slots(region, bs: int) -> list:
    """Views of ``bs`` bytes into ``region``, laid out like the ring's payloads (one per record
    of ``bs`` bytes, each 512 bytes after its record's start)."""
    step = R.record_size(bs)
    return [region[p + R.PAYLOAD_OFFSET:p + R.PAYLOAD_OFFSET + bs]
            for p in range(0, len(region) - step + 1, step)]


def run_raw(io, disk, ops, bs, region=None) -> float:
    """The guest fills a buffer of its own and writes it to the disk, no IO filter.

    ``region`` None: one buffer, reused, so it stays in the CPU cache (the guest's fill at its
    cheapest). Otherwise the buffers rotate through ``region`` (as large as the ring) in
    512-aligned slots laid out like the ring's payloads, so the disk sees writes from changing
    memory, as it does from the ring.
    """
    fills = [(off, _filler(src)) for off, src in ops]
    raw_write = io.raw_write
    if region is None:
        buf = memoryview(mmap.mmap(-1, bs))   # page-aligned, as O_DIRECT wants
        t0 = time.perf_counter()
        for off, fill in fills:
            fill(buf)
            raw_write(disk, off, buf)
        return time.perf_counter() - t0
    slots = ring_slots(region, bs)
    nslots = len(slots)
    t0 = time.perf_counter()
    for i, (off, fill) in enumerate(fills):
        buf = slots[i % nslots]
        fill(buf)
        raw_write(disk, off, buf)
    return time.perf_counter() - t0


def run_mirrored(io, vm, disk, ops, bs) -> tuple[float, float]:
    """(guest-visible seconds, seconds until the VRA acknowledged everything)."""
    fills = [(off, _filler(src)) for off, src in ops]
    write = io.write
    ring = io.ring
    t0 = time.perf_counter()
    for off, fill in fills:
        write(vm, disk, off, bs, fill)
    t1 = time.perf_counter()
    deadline = time.monotonic() + 120
    while ring.tail() < ring._head:
        if time.monotonic() > deadline:
            raise RuntimeError("the VRA stopped acknowledging records")
        time.sleep(0.0002)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t0


def flush():
    os.sync()


BOOT_RESAMPLES = 2000


def ratio_interval(t_reused, t_ring, t_mirrored, resamples=BOOT_RESAMPLES) -> tuple[float, float]:
    """95% interval of the ratio (mirrored over the faster raw way, all slices' bytes over all
    slices' time) by resampling the slices with replacement: how far one run's ratio can be
    trusted, given how much the slices differ."""
    rng = random.Random(20261127)
    k = len(t_mirrored)
    ratios = []
    for _ in range(resamples):
        idx = [rng.randrange(k) for _ in range(k)]
        ratios.append(min(sum(t_reused[i] for i in idx), sum(t_ring[i] for i in idx))
                      / sum(t_mirrored[i] for i in idx))
    ratios.sort()
    return ratios[int(0.025 * resamples)], ratios[int(0.975 * resamples) - 1]


CPU_ROUNDS = 30
LOOP_ROUNDS = 40


def path_cpu_cost(bs, ops, region, ring_dir, ring_mib, loop_disk: str | None = None,
                  rounds=CPU_ROUNDS, loop_rounds=LOOP_ROUNDS) -> dict:
    """The IO path's own cost per write with no VRA in the way, measured two ways.

    A second IO path on a ring of its own (freed by this process after each round, so no
    VRA runs) writes ``ops`` through ``IOPath.write``:

    * **warm** (``cpu_mirrored_us``, ``cpu_raw_us``): to a disk whose writes go to /dev/null,
      against the raw way filling buffers rotating through ``region`` and writing them to
      /dev/null the same way. Best
      of ``rounds``: the CPU of the work itself, with the caches warm from the write before.
    * **in the write loop** (``loop_mirrored_us``, ``loop_raw_us``), with ``loop_disk`` (a
      second disk file beside the real one, written once and dropped from the page cache): the
      same ``IOPath.write`` with real O_DIRECT disk writes, against raw writes of the same ops
      from the same ring memory, alternating, median of ``loop_rounds``. Here the path's work
      runs where it does in the guest's loop, right after each disk wait, with the caches
      cold: on this machine it costs several times what it costs warm (bench/RESULTS.md,
      fourteenth session). The ratio of the two is the ratio the IO path alone leaves; the
      mirrored ratio of the run is that times what the VRA running beside it costs.
    """
    from simulator.iopath import IOPath, VMRuntime, Disk

    scratch = Path(tempfile.mkdtemp(prefix="tidemark-bench-cpu-", dir=ring_dir))
    io = cons = disk = ldisk = None
    null_fd = -1
    try:
        io = IOPath(str(scratch / "cpu.ring"), ring_mib * MiB)
        data = io.ring.view[R.HEADER_SIZE:]
        for off in range(0, len(data), 8 * MiB):    # touched once: no round pays first faults
            n = min(8 * MiB, len(data) - off)
            data[off:off + n] = bytes(n)
        del data
        disk = Disk(0, str(scratch / "cpu.img"), max(off for off, _ in ops) + bs, direct=False)
        vm = VMRuntime(str(uuid.uuid5(uuid.NAMESPACE_DNS, "bench-cpu")), "bench-cpu", [disk])
        io.vms[vm.uuid] = vm
        # This disk object only: no disk in the way. Its writes, the raw way's and the IO
        # path's, go to /dev/null, so that both sides make the same one cheap system call per
        # write.
        null_fd = os.open(os.devnull, os.O_WRONLY)
        disk.write = lambda view, offset: os.pwrite(null_fd, view, offset)
        io.attached = "bench-cpu"
        cons = R.RingConsumer(str(scratch / "cpu.ring"))
        fills = [(off, _filler(src)) for off, src in ops]
        slots = ring_slots(region, bs)
        write, raw_write = io.write, io.raw_write

        def free():
            cons.cursor = io.ring._head
            cons.ack()                                  # frees the round's records

        best_m = best_r = math.inf
        k = 0
        for _ in range(rounds):
            t0 = time.perf_counter()
            for off, fill in fills:
                write(vm, disk, off, bs, fill)
            t1 = time.perf_counter()
            free()
            t2 = time.perf_counter()
            for off, fill in fills:
                buf = slots[k % len(slots)]
                k += 1
                fill(buf)
                raw_write(disk, off, buf)
            t3 = time.perf_counter()
            best_m = min(best_m, (t1 - t0) / len(fills))
            best_r = min(best_r, (t3 - t2) / len(fills))
        out = {"cpu_mirrored_us": best_m * 1e6, "cpu_raw_us": best_r * 1e6}
        if loop_disk is not None:
            ldisk = Disk(0, loop_disk, os.path.getsize(loop_disk))   # O_DIRECT, as the host's
            vm.disks = [ldisk]
            ring_area = io.ring.view[R.HEADER_SIZE:R.HEADER_SIZE + io.ring.capacity]
            rslots = ring_slots(ring_area, bs)
            t_m, t_r = [], []
            for i in range(loop_rounds):
                for side in (("mirrored", "raw") if i % 2 == 0 else ("raw", "mirrored")):
                    if side == "mirrored":
                        t0 = time.perf_counter()
                        for off, fill in fills:
                            write(vm, ldisk, off, bs, fill)
                            free()                      # no VRA: each record freed at once
                        t_m.append(time.perf_counter() - t0)
                    else:                               # the same memory, the ring being empty
                        t0 = time.perf_counter()
                        for off, fill in fills:
                            buf = rslots[k % len(rslots)]
                            k += 1
                            fill(buf)
                            raw_write(ldisk, off, buf)
                            free()                      # the same bookkeeping as the other side
                        t_r.append(time.perf_counter() - t0)
            del rslots, ring_area
            out["loop_mirrored_us"] = sorted(t_m)[len(t_m) // 2] / len(fills) * 1e6
            out["loop_raw_us"] = sorted(t_r)[len(t_r) // 2] / len(fills) * 1e6
        if io.stats.bitmap_writes:
            raise RuntimeError("the CPU-cost ring overflowed")
        return out
    finally:
        if cons is not None:
            cons.close()
        for d in (disk, ldisk):
            if d is not None:
                d.close()
        if io is not None:
            io.close()
        if null_fd >= 0:
            os.close(null_fd)
        shutil.rmtree(scratch, ignore_errors=True)


# -- main ------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 repetition, short runs (< ~60 s)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--disk-mib", type=int, default=256, help="disk size (default 256 MiB)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="raw writing time per block size, over all slices (default 6, 1.5 with "
                         "--quick); each of the other ways takes about as long")
    ap.add_argument("--slices", type=int, default=None,
                    help="slices per block size, each writing the five ways (default 24, 6 with "
                         "--quick)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every slice")
    ap.add_argument("--ring-mib", type=int, default=64, help="ring capacity (default 64 MiB, the host's)")
    ap.add_argument("--dir", default=None, help="where to put the disk files (default: system temp)")
    ap.add_argument("--ring-dir", default="/dev/shm" if os.access("/dev/shm", os.W_OK) else None,
                    help="where to put the ring and doorbell (default /dev/shm, as the lab does)")
    ap.add_argument("--replica-dir", default=None,
                    help="where the bench VRA keeps its replica (default: with the ring, in "
                         "/dev/shm; 'disk': beside the disk file). The replica only proves the "
                         "stream complete: a protected VRA forwards writes and keeps none on the "
                         "host, so a second ext4 writer on the host would charge the IO path "
                         "with work it does not cause")
    ap.add_argument("--block-sizes", default=None, help="comma separated KiB, e.g. 64")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--pin", action="store_true",
                    help="pin the host (guest writes) and the VRA to different CPUs")
    ap.add_argument("--disk-init", choices=("written", "fallocate"), default="written",
                    help="disk and replica files: every block written once (default) or only "
                         "fallocated (first writes then pay extent conversion)")
    ap.add_argument("--hot-window-mib", type=float, default=None,
                    help="the ring producer's hot window (default: simulator.ring.HOT_WINDOW; "
                         "0: none, the ring is used linearly)")
    args = ap.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (1.5 if args.quick else 6.0)
    slices = args.slices if args.slices is not None else (6 if args.quick else 24)
    sizes = ([int(x) * KiB for x in args.block_sizes.split(",")] if args.block_sizes
             else list(BLOCK_SIZES))
    capacity = args.disk_mib * MiB
    if capacity < max(sizes):
        ap.error("the disk must hold at least one write of the largest block size")

    from simulator.host import Host
    from simulator.iopath import sha256_file
    from simulator.workload import Content

    def log(msg):
        if not args.json:
            print(msg, flush=True)

    started = time.monotonic()
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="tidemark-bench-", dir=args.dir))
    host = proc = parent_conn = shm = replica_path = busy = busy_stop = None
    stop = threading.Event()
    results = {}
    try:
        hdir = work / "h0"
        hdir.mkdir()
        # Ring and doorbell where the lab puts them (simulator/site.py): shared memory.
        shm = Path(tempfile.mkdtemp(prefix="tidemark-bench-", dir=args.ring_dir))
        state = {"host": "bench-h0", "site": "bench", "dir": str(hdir),
                 "ring_path": str(shm / "h0.ring"), "ring_capacity": args.ring_mib * MiB,
                 "sock_path": str(shm / "h0.sock")}
        disk_path = str(work / "disk0.img")
        rdir = work if args.replica_dir == "disk" else Path(args.replica_dir) if args.replica_dir else shm
        replica_path = str(rdir / "replica0.img")
        log(f"pre-allocating {args.disk_mib} MiB disk in {work}, replica in {rdir} ...")
        preallocate(disk_path, capacity, args.disk_init == "written", cached=False)   # O_DIRECT
        preallocate(replica_path, capacity, args.disk_init == "written")
        # A second disk beside the real one, for the IO path measured in the write loop with no
        # VRA (path_cpu_cost): the real disk must stay in step with the VRA's replica.
        loop_disk_path = str(work / "loop0.img")
        preallocate(loop_disk_path, capacity, args.disk_init == "written", cached=False)
        flush()
        host = Host(state)
        threading.Thread(target=host.serve_doorbell, args=(stop,), daemon=True).start()
        deadline = time.monotonic() + 5
        while not os.path.exists(state["sock_path"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        cfg = {"name": "bench-vm", "instance_uuid": str(uuid.uuid5(uuid.NAMESPACE_DNS, "bench-vm")),
               "disks": [{"index": 0, "path": disk_path, "capacity_bytes": capacity}]}
        host.start_vm(cfg, "power-on")
        io = host.io
        doorbells = [0]
        ring_doorbell = io.ring.ring_doorbell

        def counting_doorbell():            # diagnostics: how often the producer woke the VRA
            doorbells[0] += 1
            ring_doorbell()
        io.ring.ring_doorbell = counting_doorbell
        vm = io.vms[cfg["instance_uuid"]]
        disk = vm.disks[0]

        ctx = mp.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe()
        cpus = sorted(os.sched_getaffinity(0))
        pin = args.pin and len(cpus) >= 2
        proc = ctx.Process(target=vra_main, args=(state["sock_path"], replica_path, child_conn,
                                                  cpus[1] if pin else None),
                           name="bench-vra", daemon=True)
        proc.start()
        busy_run, busy_stop = ctx.Event(), ctx.Event()
        busy = ctx.Process(target=busy_main, args=(busy_run, busy_stop), name="bench-busy", daemon=True)
        busy.start()
        if not parent_conn.poll(30) or parent_conn.recv() != "ready":
            raise RuntimeError("the VRA process did not start")
        if pin:  # the guest (this process) on one CPU, the VRA on another
            os.sched_setaffinity(0, {cpus[0]})
        deadline = time.monotonic() + 5
        while not io.attached and time.monotonic() < deadline:
            time.sleep(0.01)
        if not io.attached:
            raise RuntimeError("the VRA did not attach")
        direct = disk.dio_fd is not None
        log(f"VRA attached (pid {proc.pid}); ring {args.ring_mib} MiB in {shm}; disk writes "
            f"{'O_DIRECT' if direct else 'buffered (the file system refused O_DIRECT)'}; "
            f"{slices} slices, ~{seconds:g} s of raw writing per block size")

        if args.hot_window_mib is not None:
            hw = int(args.hot_window_mib * MiB)
            io.ring.hot_window = hw if 0 < hw <= io.ring.capacity >> 1 else io.ring.capacity
            io.ring._hot_lag = io.ring.hot_window >> 1
        log(f"ring hot window {io.ring.hot_window / MiB:g} MiB")
        # The rotating raw buffers: the ring's own data area (free between the ways: the bench
        # writes payload bytes there, never a header, and the VRA reads nothing past the head),
        # so that raw and mirrored writes come from the same memory; and, for information, a
        # separate region of the same size, touched once as the warm-up touches the ring.
        ring_area = io.ring.view[R.HEADER_SIZE:R.HEADER_SIZE + io.ring.capacity]
        region = memoryview(mmap.mmap(-1, args.ring_mib * MiB))
        region[:] = bytes(len(region))
        content = Content(args.seed)

        def vra_stats():
            parent_conn.send("stats")
            if not parent_conn.poll(30):
                raise RuntimeError("the VRA process does not answer")
            st = parent_conn.recv()
            if "error" in st:
                raise RuntimeError(f"VRA: {st['error']}")
            return st

        for bs in sizes:
            # Calibrate: how many writes make a raw slice of about seconds / slices.
            probe = make_ops(bs, max(16, (64 * MiB) // bs), args.seed * 7919 + bs, capacity, content)
            dt = run_raw(io, disk, probe, bs)
            n = max(16, math.ceil(seconds / slices * len(probe) / max(dt, 1e-6)))
            vra_before = vra_stats()
            bm_before = io.stats.bitmap_writes
            run_mirrored(io, vm, disk, probe, bs)   # warm-up; also keeps the replica in step
            n_probe = len(probe)
            del probe
            t_guest_sum = idle_sum = 0.0
            bitmap_writes = doorbell_count = 0
            pair_ratios = []
            slice_times = {side: [] for side in ("reused", "ring", "mirrored", "busy", "elsewhere")}
            nbytes = n * bs
            for i in range(slices):
                ops = make_ops(bs, n, args.seed * 1_000_003 + bs * 31 + i, capacity, content)
                flush()
                # Runs of the same writes (the same data: the replica check holds whatever the
                # order), in an order that turns each slice, so drift favours no side.
                order = ("reused", "ring", "mirrored", "busy", "elsewhere")
                order = order[i % 5:] + order[:i % 5]
                t = {}
                for side in order:
                    if side in ("ring", "busy") and io.ring.tail() != io.ring._head:
                        raise RuntimeError("raw writes from the ring's memory need an empty ring")
                    if side == "mirrored":
                        bm0, db0, idle0 = io.stats.bitmap_writes, doorbells[0], vra_stats()["idle_s"]
                        t_guest, t["mirrored"] = run_mirrored(io, vm, disk, ops, bs)
                        idle_sum += vra_stats()["idle_s"] - idle0
                        bitmap_writes += io.stats.bitmap_writes - bm0
                        doorbell_count += doorbells[0] - db0
                    elif side == "busy":              # informational: another CPU kept busy
                        busy_run.set()
                        time.sleep(0.01)
                        t[side] = run_raw(io, disk, ops, bs, ring_area)
                        busy_run.clear()
                    else:
                        t[side] = run_raw(io, disk, ops, bs, {"reused": None, "ring": ring_area,
                                                              "elsewhere": region}[side])
                t_guest_sum += t_guest
                pair_ratios.append(min(t["reused"], t["ring"]) / t["mirrored"])
                for side, times in slice_times.items():
                    times.append(t[side])
                if args.verbose:
                    log(f"  {bs // KiB:>5} KiB slice {i + 1}/{slices}: {n} writes, raw "
                        f"{nbytes / t['reused'] / 1e6:7.1f} (reused) {nbytes / t['ring'] / 1e6:7.1f} "
                        f"(ring memory) {nbytes / t['elsewhere'] / 1e6:7.1f} (elsewhere) MB/s, mirrored {nbytes / t['mirrored'] / 1e6:7.1f} MB/s, "
                        f"ratio {pair_ratios[-1]:.3f}")
                del ops
            total = nbytes * slices
            t_reused, t_ring, t_mir_sum, t_busy, t_else = (
                sum(slice_times[side]) for side in ("reused", "ring", "mirrored", "busy", "elsewhere"))
            reused_mbps = total / t_reused / 1e6
            ring_mbps = total / t_ring / 1e6
            raw_mbps = max(reused_mbps, ring_mbps)   # the baseline: the faster raw way
            mir_mbps = total / t_mir_sum / 1e6
            busy_mbps = total / t_busy / 1e6
            else_mbps = total / t_else / 1e6
            # The VRA reports its idle time between its waits, so a wait begun just before a
            # mirrored run counts whole: a nearly idle VRA can add up to a little over 100%.
            idle_share = min(1.0, idle_sum / t_mir_sum)
            prs = sorted(pair_ratios)
            lo, hi = ratio_interval(slice_times["reused"], slice_times["ring"],
                                    slice_times["mirrored"])
            log(f"  {bs // KiB:>5} KiB: {slices} slices of {n} writes; raw {raw_mbps:.1f} MB/s, "
                f"mirrored {mir_mbps:.1f} MB/s, ratio {mir_mbps / raw_mbps:.3f} (95% interval "
                f"{lo:.3f}-{hi:.3f}; slices "
                f"{prs[0]:.3f} / median {prs[len(prs) // 2]:.3f} / {prs[-1]:.3f}); VRA idle "
                f"{idle_share:.0%}; {doorbell_count} doorbells; raw with another CPU busy "
                f"{busy_mbps:.1f} MB/s, mirrored / that {mir_mbps / busy_mbps:.3f}; raw from a "
                f"separate region {else_mbps:.1f} MB/s")
            # The IO path's own work with no VRA (information): warm, without the disk (what the
            # path adds to a write, and the ratio that alone would leave at this raw speed), and
            # in the write loop, with a disk (the ratio the path leaves where it really runs).
            n_cpu = max(8, min(500, args.ring_mib * MiB // 2 // R.record_size(bs)))
            cost = path_cpu_cost(
                bs, make_ops(bs, n_cpu, args.seed * 65_537 + bs, capacity, content), region,
                str(shm), args.ring_mib, loop_disk_path)
            cpu_mir, cpu_raw = cost["cpu_mirrored_us"], cost["cpu_raw_us"]
            path_us = cpu_mir - cpu_raw
            raw_us = bs / raw_mbps                  # µs per raw write (MB/s = bytes per µs)
            path_ratio = raw_us / (raw_us + path_us)
            loop_mir, loop_raw = cost["loop_mirrored_us"], cost["loop_raw_us"]
            loop_ratio = loop_raw / loop_mir
            vra_share = mir_mbps / raw_mbps / loop_ratio   # what the VRA beside the guest costs
            log(f"  {bs // KiB:>5} KiB: the IO path's own work {path_us:.1f} µs per write "
                f"(mirrored {cpu_mir:.1f} - raw {cpu_raw:.1f} µs of CPU, writes to /dev/null, best "
                f"of {CPU_ROUNDS} rounds of {n_cpu}); against {raw_us:.1f} µs per raw write that alone "
                f"would leave a ratio of {path_ratio:.3f}")
            log(f"  {bs // KiB:>5} KiB: in the write loop, with O_DIRECT writes to a second disk and "
                f"no VRA: mirrored {loop_mir:.1f} µs, raw {loop_raw:.1f} µs per write (median of "
                f"{LOOP_ROUNDS} alternating rounds of {n_cpu}): the path costs {loop_mir - loop_raw:.1f} "
                f"µs there, ratio {loop_ratio:.3f}; the run's ratio over that (what the VRA beside "
                f"the guest costs) {vra_share:.3f}")
            vra_after = vra_stats()
            applied = vra_after["writes"] - vra_before["writes"]
            warmup_bitmap = io.stats.bitmap_writes - bm_before - bitmap_writes
            mirrored_expected = n_probe + n * slices - bitmap_writes - warmup_bitmap
            src_sha = sha256_file(disk_path, capacity)
            rep_sha = sha256_file(replica_path, capacity)
            seq_errors = vra_after["seq_errors"] - vra_before["seq_errors"]
            match = src_sha == rep_sha and applied == mirrored_expected and seq_errors == 0
            results[f"{bs // KiB}KiB"] = {
                "block_size": bs, "slices": slices, "writes_per_slice": n,
                "raw_mbps": round(raw_mbps, 1), "mirrored_mbps": round(mir_mbps, 1),
                "mirrored_guest_mbps": round(total / t_guest_sum / 1e6, 1),
                "raw_reused_buffer_mbps": round(reused_mbps, 1),
                "raw_ring_memory_mbps": round(ring_mbps, 1),
                "raw_separate_region_mbps": round(else_mbps, 1),
                "raw_other_cpu_busy_mbps": round(busy_mbps, 1),
                "ratio_vs_raw_other_cpu_busy": round(mir_mbps / busy_mbps, 3),
                "vra_idle_share": round(idle_share, 3),
                "path_cpu_us": round(path_us, 2), "path_cpu_mirrored_us": round(cpu_mir, 2),
                "path_cpu_raw_us": round(cpu_raw, 2), "raw_us_per_write": round(raw_us, 1),
                "ratio_path_alone": round(path_ratio, 3),
                "path_loop_mirrored_us": round(loop_mir, 1), "path_loop_raw_us": round(loop_raw, 1),
                "ratio_path_in_loop": round(loop_ratio, 3),
                "ratio_vra_share": round(vra_share, 3),
                "ratio": round(mir_mbps / raw_mbps, 3),
                "ratio_interval_95": [round(lo, 3), round(hi, 3)],
                "pair_ratios": [round(x, 3) for x in pair_ratios],
                "pair_ratio_median": round(prs[len(prs) // 2], 3),
                "bitmap_writes": bitmap_writes, "replica_match": match,
                "vra_applied": applied, "vra_seq_errors": seq_errors,
            }
            if warmup_bitmap:
                log(f"  ({warmup_bitmap} warm-up writes fell back to the dirty bitmap; the replica "
                    f"cannot match: nothing syncs the bitmap in this benchmark)")
            if bitmap_writes:
                log(f"  !!! {bitmap_writes} writes of {bs // KiB} KiB fell back to the dirty bitmap: "
                    f"this mirrored figure does NOT count !!!")
            if not match:
                log(f"  !!! replica MISMATCH at {bs // KiB} KiB (sha {src_sha[:12]} vs {rep_sha[:12]}, "
                    f"applied {applied} of {mirrored_expected}, seq errors {seq_errors})")
        io_stats = dict(vars(io.stats))
        hot_window = io.ring.hot_window
    finally:
        if busy is not None:
            busy_stop.set()
            busy.join(5)
            if busy.is_alive():
                busy.terminate()
                busy.join(5)
        if parent_conn is not None:
            try:
                parent_conn.send("stop")
            except OSError:
                pass
        if proc is not None:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        if host is not None:
            host.shutdown()
            stop.set()
            host.io.close()
        if replica_path is not None and args.replica_dir not in (None, "disk"):
            Path(replica_path).unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
        if shm is not None:
            shutil.rmtree(shm, ignore_errors=True)

    goal = results.get(f"{GOAL_BS // KiB}KiB")
    goal_ok = bool(goal and goal["ratio"] >= GOAL_RATIO and goal["bitmap_writes"] == 0
                   and goal["replica_match"])
    elapsed = time.monotonic() - started
    load = (round(load_before, 2), round(os.getloadavg()[0], 2))
    if args.json:
        print(json.dumps({"disk_mib": args.disk_mib, "ring_mib": args.ring_mib, "slices": slices,
                          "raw_seconds": seconds, "disk_writes": "O_DIRECT" if direct else "buffered",
                          "consumer_ack": "every record",
                          "hot_window": hot_window,
                          "results": results,
                          "goal": {"block_size": GOAL_BS, "min_ratio": GOAL_RATIO,
                                   "pass": goal_ok},
                          "max_stall_ms": round(io_stats["max_stall_ms"], 2),
                          "elapsed_s": round(elapsed, 1), "loadavg_1min_before_after": load}))
    else:
        print()
        print(f"disk {args.disk_mib} MiB, ring {args.ring_mib} MiB (hot window "
              f"{hot_window / MiB:g} MiB), {slices} slices of the five ways, disk writes "
              f"{'O_DIRECT' if direct else 'buffered'}, VRA in a separate process acking every record")
        print(f"{'block':>7} {'raw MB/s':>9} {'(reused':>8} {'ring mem)':>9} {'mirrored MB/s':>14} "
              f"{'ratio':>6} {'slices min/med/max':>20} {'bitmap writes':>14} {'replica':>8} | "
              f"{'guest-visible':>13} {'VRA idle':>8} {'raw, CPU busy':>13} {'ratio':>6} "
              f"{'raw elsewhere':>13}")
        for r in results.values():
            pr = r["pair_ratios"]
            spread = f"{min(pr):.3f}/{r['pair_ratio_median']:.3f}/{max(pr):.3f}"
            print(f"{r['block_size'] // KiB:>4} KiB {r['raw_mbps']:>9.1f} {r['raw_reused_buffer_mbps']:>8.1f} "
                  f"{r['raw_ring_memory_mbps']:>9.1f} {r['mirrored_mbps']:>14.1f} "
                  f"{r['ratio']:>6.3f} {spread:>20} {r['bitmap_writes']:>14} "
                  f"{'OK' if r['replica_match'] else 'MISMATCH':>8} | {r['mirrored_guest_mbps']:>13.1f} "
                  f"{r['vra_idle_share']:>8.0%} {r['raw_other_cpu_busy_mbps']:>13.1f} "
                  f"{r['ratio_vs_raw_other_cpu_busy']:>6.3f} {r['raw_separate_region_mbps']:>13.1f}")
        print("(each slice writes the same seeded writes five ways, in turn: raw from one reused "
              "buffer, raw from buffers rotating through the ring's own memory, mirrored, raw from "
              "the ring's memory with another CPU busy, and raw from a separate region; raw MB/s "
              "is the faster of the first two, the baseline of the ratio. raw, CPU busy and raw "
              "elsewhere: information only. "
              "MB/s: all slices' bytes over all "
              "slices' time. mirrored: until the VRA acked the last record; guest-visible: until the "
              "last mirrored write returned)")
        print("the IO path's own work per write (CPU, no disk, no VRA; information only): " + "; ".join(
            f"{r['block_size'] // KiB} KiB {r['path_cpu_us']:.1f} µs of {r['raw_us_per_write']:.1f} "
            f"µs per raw write, ratio it alone leaves {r['ratio_path_alone']:.3f}"
            for r in results.values()))
        print("the IO path in the write loop (O_DIRECT writes to a second disk, no VRA; information "
              "only): " + "; ".join(
                  f"{r['block_size'] // KiB} KiB mirrored {r['path_loop_mirrored_us']:.1f} µs, raw "
                  f"{r['path_loop_raw_us']:.1f} µs per write, ratio {r['ratio_path_in_loop']:.3f}; "
                  f"the run's ratio over that (the VRA's share) {r['ratio_vra_share']:.3f}"
                  for r in results.values()))
        print("95% interval of each ratio, resampling the slices (how far one run's figure can be "
              "trusted): " + "; ".join(
                  f"{r['block_size'] // KiB} KiB {r['ratio_interval_95'][0]:.3f}-"
                  f"{r['ratio_interval_95'][1]:.3f}" for r in results.values()))
        if any(r["bitmap_writes"] for r in results.values()):
            print("!!! some mirrored runs fell back to the dirty bitmap: those figures do not count !!!")
        print(f"max ring stall {io_stats['max_stall_ms']:.2f} ms; elapsed {elapsed:.1f} s; "
              f"load average {load[0]} before, {load[1]} after (other work on the machine skews all figures)")
        if goal:
            print(f"goal: ratio >= {GOAL_RATIO} at {GOAL_BS // KiB} KiB: "
                  f"{'PASS' if goal_ok else 'MISS'} ({goal['ratio']:.3f}; 95% interval "
                  f"{goal['ratio_interval_95'][0]:.3f}-{goal['ratio_interval_95'][1]:.3f})")
        else:
            print(f"goal: ratio >= {GOAL_RATIO} at {GOAL_BS // KiB} KiB: not measured")
    return 0 if all(r["replica_match"] and not r["bitmap_writes"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
