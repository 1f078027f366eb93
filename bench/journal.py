#!/usr/bin/env python
"""DSS journal: durable ingest against raw RocksDB, and point-in-time read latency.

    .venv/bin/python bench/journal.py [--quick] [--json] [--dir DIR]

(a) Ingest, WAL fsynced before each write returns (the journal's durability rule):
    * raw:     a plain RocksDB WriteBatch of 64 KiB values (sequential 16-byte keys) into the
               ``entries`` column family of a database opened with the journal's own options;
               this is the "raw limit" that other benches compare to;
    * journal: ``Journal(sync=True).append`` of 64 KiB entries at random 64 KiB-aligned offsets
               of 4 disks (entry + 16 index records + state record per batch, XXH3 checksums).
    Batches of 1, 2 and 4 MiB; a fresh database for each run; MB/s of entry data.
(b) PIT reads: a journal of N entries of 4 KiB at random 4 KiB-aligned offsets of one 4 GiB disk,
    ``--pit-layout hot`` (default): in its first N/4 blocks, so that a read meets about as many
    entries at every N; ``spread``: anywhere on the disk (a short journal then holds almost
    nothing a read touches, and the read's own work grows with N) (checkpoint every 1000 entries; built with sync=False since build speed is not measured
    here, then memtables flushed and compactions waited for), N = 1e3, 1e5, 1e6 (1e3, 1e4, 1e5
    with --quick). Latency of
    ``Journal.read`` of 64 KiB at a random 4 KiB-aligned offset and a random checkpoint:
    p50/p99, and growth against log N. Goal: p99 <= 2 ms at 1e6 entries.
(c) The same reads on the largest journal while another thread appends 1 MiB batches with
    sync=True, twice: as the Journal does it (write, then ``flush_wal(sync=True)``, which
    releases the GIL during the fsync) and with a synced write (rocksdict holds the GIL
    through the fsync; the reads stall behind it). Python threads share the GIL, so the
    interpreter's switch interval (5 ms by default; ``--switch-interval``) bounds these stalls.
(d) For information, the same reads on the largest journal right after its segment files (the
    entries' data) were written back and dropped from the page cache, as a restarted VRA or one
    short of memory finds them; RocksDB's files stay cached.
Each ingest figure is the best of 2 runs (1 with --quick), raw and journal alternating.
"""
from __future__ import annotations

import argparse
import json
import math
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
sys.path.insert(0, str(ROOT))

from rocksdict import WriteBatch  # noqa: E402

from appliance import pagecache  # noqa: E402
from appliance.dss import Checkpoint, Entry, Journal, JournalSettings, Pos  # noqa: E402
from appliance.dss import store  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
VALUE = 64 * KiB
BATCHES = (1 * MiB, 2 * MiB, 4 * MiB)
READ = 64 * KiB
GOAL_P99_MS = 2.0


def ingest_raw(path: str, batch: int, total: int, payload: bytes) -> float:
    db, cache = store.open_db(path)
    cf = db.get_column_family_handle(store.ENTRIES_CF)
    wopt = store.write_options(True)
    per = batch // VALUE
    n = total // batch
    t0 = time.perf_counter()
    k = 0
    for _ in range(n):
        wb = WriteBatch(raw_mode=True)
        for _ in range(per):
            k += 1
            wb.put(k.to_bytes(16, "big"), payload[k % 64:k % 64 + VALUE], cf)
        db.write(wb, wopt)
    dt = time.perf_counter() - t0
    del cf
    db.close()
    return n * batch / dt / 1e6


def ingest_journal(path: str, batch: int, total: int, payload: bytes, rng: random.Random) -> float:
    j = Journal(path, sync=True)
    j.create_vpg("bench", JournalSettings(replica_dir=path + "-replica"))
    vms = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(2)]
    disk_size = 16 * GiB
    for vm in vms:
        for disk in range(2):
            j.register_disk("bench", vm, disk, disk_size)
    per = batch // VALUE
    n = total // batch
    lsn = 0
    t0 = time.perf_counter()
    for _ in range(n):
        entries = []
        for _ in range(per):
            lsn += 1
            entries.append(Entry(Pos(1, lsn), vms[lsn & 1], (lsn >> 1) & 1,
                                 rng.randrange(disk_size // VALUE) * VALUE, payload[lsn % 64:lsn % 64 + VALUE]))
        j.append("bench", entries, [Checkpoint(lsn, Pos(1, lsn), time.time())])
    dt = time.perf_counter() - t0
    j.close()
    return n * batch / dt / 1e6


HOT_VERSIONS = 4     # "hot" layout: writes per block of the written region, on average


def read_region(n: int, disk_size: int, layout: str) -> int:
    """Bytes at the start of the disk that a journal of ``n`` entries writes (and reads go to).

    ``spread``: the whole disk (4 KiB entries at random offsets of 4 GiB: a short journal
    holds almost nothing a 64 KiB read touches, a long one several entries per read, so
    the reads' work itself grows with n). ``hot``: a region of n / HOT_VERSIONS blocks, so
    that at every length a read meets the same mix (about HOT_VERSIONS versions per block by
    the end, three quarters of a read's blocks from the journal at a random checkpoint) and
    only the journal's length differs: what "growing no faster than log n" is about."""
    if layout == "spread":
        return disk_size
    return min(disk_size, max(READ, n // HOT_VERSIONS * 4 * KiB))


def build_read_journal(path: str, n: int, rng: random.Random, vm: str, disk_size: int,
                       layout: str = "spread"):
    j = Journal(path, sync=False)
    j.create_vpg("bench", JournalSettings(replica_dir=path + "-replica"))
    j.register_disk("bench", vm, 0, disk_size)
    blocks = read_region(n, disk_size, layout) // (4 * KiB)
    # a checkpoint every 1000 entries (every n / 16 for short journals in the hot layout, so
    # that their reads too land at points spread over their history)
    every = 1000 if layout == "spread" else max(1, min(1000, n // 16))
    per_batch = min(256, every)
    payload = os.urandom(8 * KiB)
    t0 = time.perf_counter()
    lsn = 0
    cps = []
    while lsn < n:
        entries = []
        for _ in range(min(per_batch, n - lsn)):
            lsn += 1
            o = lsn % 4096
            entries.append(Entry(Pos(1, lsn), vm, 0, rng.randrange(blocks) * 4 * KiB, payload[o:o + 4 * KiB]))
        new = []
        if lsn % every < per_batch or lsn == n:
            new.append(Checkpoint(len(cps) + 1, Pos(1, lsn), time.time()))
            cps.extend(new)
        j.append("bench", entries, new)
    build_s = time.perf_counter() - t0
    j._index.flush()
    j._entries.flush()
    settle(j)
    return j, cps, build_s


def settle(j: Journal, limit_s: float = 180.0) -> float:
    """Wait until RocksDB has no compaction running or pending (a settled LSM), at most ``limit_s``."""
    t0 = time.perf_counter()
    props = ("rocksdb.compaction-pending", "rocksdb.num-running-compactions", "rocksdb.num-running-flushes")
    while time.perf_counter() - t0 < limit_s:
        if not any(cf.property_int_value(p) for cf in (j._entries, j._index) for p in props):
            break
        time.sleep(0.2)
    return time.perf_counter() - t0


def read_latency(j: Journal, cps, vm: str, disk_size: int, reads: int, rng: random.Random,
                 region: int | None = None) -> dict:
    """Latency of 64 KiB reads at random 4 KiB-aligned offsets of the first ``region`` bytes
    (default: the whole disk) at random checkpoints."""
    blocks = (min(region or disk_size, disk_size) - READ) // (4 * KiB) + 1
    for _ in range(min(200, reads)):                  # warm-up
        j.read("bench", vm, 0, rng.randrange(blocks) * 4 * KiB, READ, rng.choice(cps))
    lat = []
    perf = time.perf_counter
    for _ in range(reads):
        off = rng.randrange(blocks) * 4 * KiB
        cp = rng.choice(cps)
        t0 = perf()
        j.read("bench", vm, 0, off, READ, cp)
        lat.append(perf() - t0)
    lat.sort()
    return {"p50_ms": lat[len(lat) // 2] * 1e3, "p99_ms": lat[int(len(lat) * 0.99)] * 1e3,
            "mean_ms": sum(lat) / len(lat) * 1e3, "max_ms": lat[-1] * 1e3}


def drop_segments_from_cache(j: Journal) -> None:
    """Write back and drop the journal's segment files (entry data) from the page cache; say so
    if some of their pages stay (then the cold figures are partly warm)."""
    paths = [os.path.join(root, name) for root, _dirs, files in os.walk(j._seg_root) for name in files]
    if not pagecache.drop(paths):
        print("note: the page cache kept some entry data; cold read figures are partly warm",
              file=sys.stderr)


def read_latency_cold(j: Journal, cps, vm: str, disk_size: int, reads: int, rng: random.Random,
                      region: int | None = None) -> dict:
    """The same reads right after the entry data was dropped from the page cache: the journal
    data as a restarted VRA, or one short of memory, finds it (RocksDB's files stay cached)."""
    drop_segments_from_cache(j)
    return read_latency(j, cps, vm, disk_size, reads, rng, region)


def read_latency_during_ingest(j: Journal, cps, vm: str, disk_size: int, reads: int, rng: random.Random,
                               gil_held: bool, region: int | None = None) -> dict:
    """PIT reads while another thread appends 1 MiB batches (16 x 64 KiB) with the WAL fsynced."""
    saved = (j.sync, j._wopt)
    if gil_held:
        j.sync, j._wopt = False, store.write_options(True)
    else:
        j.sync = True
    stop = threading.Event()
    written = [0]
    payload = os.urandom(VALUE + 64)
    first_lsn = j.durable_pos("bench").lsn

    def writer():
        lsn = first_lsn
        r = random.Random(7)
        while not stop.is_set():
            batch = []
            for _ in range(16):
                lsn += 1
                batch.append(Entry(Pos(1, lsn), vm, 0, r.randrange(disk_size // VALUE) * VALUE,
                                   payload[lsn % 64:lsn % 64 + VALUE]))
            j.append("bench", batch)
            written[0] += 16 * VALUE

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.2)
    t0 = time.perf_counter()
    try:
        r = read_latency(j, cps, vm, disk_size, reads, rng, region)
    finally:
        dt = time.perf_counter() - t0
        stop.set()
        t.join()
        j.sync, j._wopt = saved
    r["ingest_mbps"] = written[0] / dt / 1e6
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller runs (about a minute)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--dir", default=None, help="where to put the databases (default: system temp)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--skip-ingest", action="store_true")
    ap.add_argument("--skip-read", action="store_true")
    ap.add_argument("--sizes", default=None, help="comma separated journal lengths for (b)")
    ap.add_argument("--pit-layout", choices=("hot", "spread"), default="hot",
                    help="(b)'s journals: 'hot' (default), n/4 blocks written about 4 times each, so "
                         "that reads meet the same mix at every length; 'spread', n blocks at random "
                         "offsets of the whole disk (see read_region)")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval in seconds (Python's default: 0.005)")
    args = ap.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))
    rng = random.Random(args.seed)
    base = tempfile.mkdtemp(prefix="tidemark-bench-journal-", dir=args.dir)
    out: dict = {"quick": args.quick, "loadavg_at_start": os.getloadavg()[0], "switch_interval_s": sys.getswitchinterval(), "ingest": [], "pit": []}
    t_start = time.perf_counter()
    try:
        if not args.skip_ingest:
            total = 256 * MiB if args.quick else 1 * GiB
            payload = os.urandom(VALUE + 64)
            say(f"(a) durable ingest of {total // MiB} MiB of 64 KiB values per run, WAL fsync per batch")
            say(f"{'batch':>7} {'raw MB/s':>9} {'journal MB/s':>13} {'ratio':>6}")
            for i, batch in enumerate(BATCHES):
                raw = jr = 0.0
                for _ in range(1 if args.quick else 2):
                    raw = max(raw, ingest_raw(os.path.join(base, f"raw{i}"), batch, total, payload))
                    shutil.rmtree(os.path.join(base, f"raw{i}"))
                    jr = max(jr, ingest_journal(os.path.join(base, f"j{i}"), batch, total, payload, rng))
                    shutil.rmtree(os.path.join(base, f"j{i}"))
                    shutil.rmtree(os.path.join(base, f"j{i}-replica"), ignore_errors=True)
                out["ingest"].append({"batch_bytes": batch, "raw_mbps": raw, "journal_mbps": jr,
                                      "ratio": jr / raw})
                say(f"{batch // MiB:>3} MiB {raw:>9.1f} {jr:>13.1f} {jr / raw:>6.2f}")
        if not args.skip_read:
            sizes = (1_000, 10_000, 100_000) if args.quick else (1_000, 100_000, 1_000_000)
            if args.sizes:
                sizes = tuple(int(float(x)) for x in args.sizes.split(","))
            reads = 2000 if args.quick else 5000
            disk_size = 4 * GiB
            vm = str(uuid.UUID(int=rng.getrandbits(128)))
            say(f"(b) PIT read of 64 KiB at a random checkpoint; 4 KiB entries at random offsets of a 4 GiB disk "
                f"({args.pit_layout} layout); {reads} reads per size")
            say(f"{'entries':>9} {'build s':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'p50 x':>6} "
                f"{'log n x':>8}")
            first = None
            for n in sizes:
                path = os.path.join(base, f"pit{n}")
                j, cps, build_s = build_read_journal(path, n, rng, vm, disk_size, args.pit_layout)
                region = read_region(n, disk_size, args.pit_layout)
                r = read_latency(j, cps, vm, disk_size, reads, rng, region)
                if n == sizes[-1]:
                    c = read_latency_cold(j, cps, vm, disk_size, reads // 2, rng, region)
                    c.update(entries=n)
                    out["pit_cold"] = c
                    for gil_held in (False, True):
                        c = read_latency_during_ingest(j, cps, vm, disk_size, reads // 2, rng, gil_held, region)
                        c.update(entries=n,
                                 fsync="synced write (GIL held)" if gil_held else "flush_wal (GIL released)")
                        out.setdefault("pit_during_ingest", []).append(c)
                j.close()
                shutil.rmtree(path)
                shutil.rmtree(path + "-replica", ignore_errors=True)
                first = first or (r["p50_ms"], math.log(n))
                r.update(entries=n, build_s=build_s, p50_growth=r["p50_ms"] / first[0],
                         log_n_growth=math.log(n) / first[1])
                out["pit"].append(r)
                say(f"{n:>9} {build_s:>8.1f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {r['mean_ms']:>8.3f} "
                    f"{r['p50_growth']:>6.2f} {r['log_n_growth']:>8.2f}")
            if "pit_cold" in out:
                c = out["pit_cold"]
                say(f"(d) same reads at {c['entries']} entries, the entries' data dropped from the page "
                    f"cache first (information): p50 {c['p50_ms']:.3f} ms, p99 {c['p99_ms']:.3f} ms")
            for c in out.get("pit_during_ingest", []):
                say(f"(c) same reads at {c['entries']} entries while appending 1 MiB batches, fsync by {c['fsync']}: "
                    f"p50 {c['p50_ms']:.3f} ms, p99 {c['p99_ms']:.3f} ms, ingest {c['ingest_mbps']:.1f} MB/s")
            last = out["pit"][-1]
            out["goal"] = {"p99_ms": GOAL_P99_MS, "entries": last["entries"], "met": last["p99_ms"] <= GOAL_P99_MS}
            say(f"goal: p99 <= {GOAL_P99_MS} ms at {last['entries']} entries: "
                f"{'met' if out['goal']['met'] else 'NOT met'} ({last['p99_ms']:.3f} ms)")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    out["elapsed_s"] = time.perf_counter() - t_start
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"elapsed {out['elapsed_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
