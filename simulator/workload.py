"""Guest write workloads: seeded, rate-limited, with a pattern and a content mix.

A workload is what a VM's guest does to its disks. It is fully described by a
``WorkloadSpec`` (JSON-friendly), and the same spec with the same seed issues
the same writes. Content comes from prepared buffers so that generating it costs
one memory copy, as a guest filling its page cache would.
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np

KiB = 1024
MiB = 1024 * 1024
PATTERNS = ("random", "sequential", "hotspot")


class WorkloadError(ValueError):
    """Invalid workload settings: {0}"""


@dataclass
class WorkloadSpec:
    mbps: float = 1.0                       # MB/s (1e6 bytes) to write; 0 = as fast as possible
    iops: float = 0.0                       # writes per second cap; 0 = no cap
    block_sizes: list[int] = field(default_factory=lambda: [4 * KiB, 64 * KiB])
    pattern: str = "random"                 # random | sequential | hotspot
    hotspot_fraction: float = 0.1           # hotspot: share of the disk that gets ...
    hotspot_share: float = 0.9              # ... this share of the writes
    mix: dict = field(default_factory=lambda: {"random": 0.6, "repetitive": 0.3, "zero": 0.1})
    seed: int = 1
    total_bytes: int = 0                    # stop after this many bytes; 0 = run until stopped

    @classmethod
    def from_dict(cls, d: dict) -> "WorkloadSpec":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = set(d) - set(known)
        if unknown:
            raise WorkloadError(f"unknown workload settings: {', '.join(sorted(unknown))}")
        spec = cls(**known)
        spec.validate()
        return spec

    def validate(self):
        if self.pattern not in PATTERNS:
            raise WorkloadError(f"pattern must be one of {', '.join(PATTERNS)}, not {self.pattern!r}")
        if self.mbps < 0 or self.iops < 0:
            raise WorkloadError("mbps and iops must not be negative")
        if not self.block_sizes or any(b < 4 * KiB or b > MiB or b % (4 * KiB)
                                       for b in self.block_sizes):
            raise WorkloadError("block sizes must be multiples of 4 KiB from 4 KiB to 1 MiB")
        if not self.mix or any(k not in ("random", "repetitive", "zero") or v < 0
                               for k, v in self.mix.items()) or sum(self.mix.values()) <= 0:
            raise WorkloadError("mix takes non-negative shares of random, repetitive and zero")
        if not 0 < self.hotspot_fraction <= 1 or not 0 <= self.hotspot_share <= 1:
            raise WorkloadError("hotspot fraction must be in (0, 1] and share in [0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)


class Content:
    """Prepared source buffers: a seeded random pool, a repeated pattern, zeros."""

    POOL = 16 * MiB

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.pool = memoryview(rng.integers(0, 256, self.POOL + MiB, dtype=np.uint8).tobytes())
        pattern = rng.integers(0, 256, 4 * KiB, dtype=np.uint8).tobytes()
        self.repetitive = memoryview(pattern * (MiB // len(pattern)))
        self.zero = memoryview(bytes(MiB))

    def source(self, kind: str, n: int, rng: random.Random) -> memoryview:
        if kind == "random":
            o = rng.randrange(0, self.POOL // 8) * 8
            return self.pool[o:o + n]
        if kind == "repetitive":
            return self.repetitive[:n]
        return self.zero[:n]


class Generator:
    """The sequence of (disk, offset, length, content) a spec produces for a set of disks."""

    def __init__(self, spec: WorkloadSpec, capacities: list[int], salt: int = 0):
        self.spec = spec
        self.capacities = capacities
        self.rng = random.Random(spec.seed * 1_000_003 + salt)
        self.kinds = list(spec.mix)
        self.weights = [spec.mix[k] for k in self.kinds]
        self.next_seq_offset = [0] * len(capacities)

    def next(self) -> tuple[int, int, int, str]:
        rng = self.rng
        disk = rng.randrange(len(self.capacities)) if len(self.capacities) > 1 else 0
        cap = self.capacities[disk]
        bs = min(rng.choice(self.spec.block_sizes), cap)
        slots = cap // bs
        pattern = self.spec.pattern
        if pattern == "sequential":
            off = self.next_seq_offset[disk]
            if off + bs > cap:
                off = 0
            self.next_seq_offset[disk] = off + bs
        elif pattern == "hotspot" and rng.random() < self.spec.hotspot_share:
            hot = max(1, int(slots * self.spec.hotspot_fraction))
            off = rng.randrange(hot) * bs
        else:
            off = rng.randrange(slots) * bs
        kind = rng.choices(self.kinds, self.weights)[0] if len(self.kinds) > 1 else self.kinds[0]
        return disk, off, bs, kind


class Workload:
    """A guest's write loop in a thread: start, pause, resume, stop.

    ``write(disk, offset, length, source)`` is the host's IO path; it copies
    ``source`` into whatever buffer it writes from.
    """

    def __init__(self, name: str, spec: WorkloadSpec, capacities: list[int], write,
                 salt: int = 0, content: Content | None = None):
        self.name = name
        self.spec = spec
        self.gen = Generator(spec, capacities, salt)
        self.content = content or Content(spec.seed)
        self._write = write
        self._run = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self.written = 0
        self.writes = 0
        self.error: str | None = None
        self._thread: threading.Thread | None = None

    @property
    def state(self) -> str:
        if self._thread is None or not self._thread.is_alive():
            return "stopped"
        return "running" if self._run.is_set() else "paused"

    def start(self, paused: bool = False):
        if not paused:
            self._run.set()
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name=f"workload-{self.name}",
                                            daemon=True)
            self._thread.start()

    def pause(self, timeout: float = 5.0) -> bool:
        """Stop issuing writes; True once no write is in flight."""
        self._run.clear()
        return self._idle.wait(timeout)

    def resume(self):
        self._run.set()

    def stop(self, timeout: float = 5.0):
        self._stop.set()
        self._run.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self):
        spec = self.spec
        byte_rate = spec.mbps * 1e6
        gap_iops = 1.0 / spec.iops if spec.iops else 0.0
        t_next = time.monotonic()
        try:
            while not self._stop.is_set():
                if not self._run.is_set():
                    self._idle.set()
                    self._run.wait(0.2)
                    t_next = time.monotonic()
                    continue
                self._idle.clear()
                if not self._run.is_set():
                    continue
                disk, off, bs, kind = self.gen.next()
                src = self.content.source(kind, bs, self.gen.rng)
                self._write(disk, off, bs, src)
                self.written += bs
                self.writes += 1
                if spec.total_bytes and self.written >= spec.total_bytes:
                    break
                gap = max(bs / byte_rate if byte_rate else 0.0, gap_iops)
                if gap:
                    t_next += gap
                    delay = t_next - time.monotonic()
                    if delay > 0:
                        self._idle.set()
                        self._stop.wait(delay)
                    elif delay < -1.0:
                        t_next = time.monotonic()  # do not burst to catch up after a long stall
        except Exception as exc:  # reported in the VM's workload status
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._run.clear()
            self._idle.set()

    def status(self) -> dict:
        return {"state": self.state, "spec": self.spec.to_dict(), "written_bytes": self.written,
                "writes": self.writes, "error": self.error}
