"""How long the journal's appends take, step by step: what an operator (and the replication
bench) reads to tell a slow journal disk from a slow network or a slow source.

Each append is timed in four steps, each one of the durability rule's (docs/FORMAT.md, "Append
and durability"): ``data_write`` (the entries' data into the segment file), ``data_sync`` (its
fdatasync), ``db_write`` (the RocksDB batch: entry and index records, into WAL and memtable;
it waits when RocksDB throttles writes behind its flushes and compactions) and ``wal_sync``
(the WAL's fsync). Per step: the count, the total and the largest; for whole appends also a
histogram, so that a stall of a few appends shows beside a good average.
"""
from __future__ import annotations

import threading
import time

STEPS = ("data_write", "data_sync", "db_write", "wal_sync")
# upper bounds of the histogram's buckets, in seconds (the last bucket has none)
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
SLOW_S = 0.25       # an append slower than this counts as a stall


class AppendTimings:
    """Counters of one Journal; ``snapshot()`` is JSON-ready. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._steps = {s: [0, 0.0, 0.0] for s in STEPS}          # count, total s, max s
        self._appends = [0, 0.0, 0.0, 0]                          # count, total s, max s, bytes
        self._hist = [0] * (len(BUCKETS_S) + 1)
        self._slow = 0
        self._last_slow: float | None = None                      # wall time of the latest stall

    def step(self, name: str, seconds: float) -> None:
        with self._lock:
            c = self._steps[name]
            c[0] += 1
            c[1] += seconds
            if seconds > c[2]:
                c[2] = seconds

    def append(self, seconds: float, nbytes: int) -> None:
        with self._lock:
            a = self._appends
            a[0] += 1
            a[1] += seconds
            a[3] += nbytes
            if seconds > a[2]:
                a[2] = seconds
            i = 0
            while i < len(BUCKETS_S) and seconds > BUCKETS_S[i]:
                i += 1
            self._hist[i] += 1
            if seconds > SLOW_S:
                self._slow += 1
                self._last_slow = time.time()

    def snapshot(self) -> dict:
        with self._lock:
            a = self._appends
            return {
                "appends": a[0], "seconds": round(a[1], 6), "max_s": round(a[2], 6), "bytes": a[3],
                "stalls": self._slow, "stall_threshold_s": SLOW_S, "last_stall_time": self._last_slow,
                "histogram": {"le_s": list(BUCKETS_S) + [None], "counts": list(self._hist)},
                "steps": {s: {"count": c[0], "seconds": round(c[1], 6), "max_s": round(c[2], 6)}
                          for s, c in self._steps.items()},
            }
