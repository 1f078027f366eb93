"""Fixtures for the DSS tests: a real RocksDB journal in tmp_path and an in-memory model of the disks."""
from __future__ import annotations

import random
import threading
import uuid

import pytest

from appliance.dss import Checkpoint, Entry, Journal, JournalSettings, Pos

VMS = [str(uuid.UUID(int=0x1111 << 96 | 1)), str(uuid.UUID(int=0x2222 << 96 | 2))]
DISKS = [(vm, d) for vm in VMS for d in (0, 1)]
CAPACITY = 1 << 20
VPG = "vpg-1"
T0 = 1_000_000.0          # entry times of the workloads (the "time" kwarg of append)


class Model:
    """The disks as a list of writes in stream order; replayed up to any position."""

    def promotable(self, cutoff: float) -> int:
        """How many entries, from the start, are older than ``cutoff``."""
        n = 0
        while n < len(self.times) and self.times[n] < cutoff:
            n += 1
        return n

    def __init__(self, capacity: int = CAPACITY):
        self.capacity = capacity
        self.log: list[Entry] = []
        self.times: list[float] = []        # entry time of each entry of the log
        self.checkpoints: list[Checkpoint] = []

    def disks_at(self, pos: Pos, base: dict | None = None) -> dict:
        out = {k: bytearray(base[k]) if base else bytearray(self.capacity) for k in DISKS}
        for e in self.log:
            if e.pos > pos:
                break
            out[(e.vm, e.disk)][e.offset:e.offset + len(e.data)] = e.data
        return out


def random_write(rng: random.Random, capacity: int) -> tuple[int, bytes]:
    size = min(capacity, max(1, int(2 ** rng.uniform(0, 18))))       # 1 B .. 256 KiB, log-uniform
    offset = rng.randrange(capacity - size + 1)
    if rng.random() < 0.4:
        offset &= ~4095                                                  # some 4 KiB aligned
    return offset, rng.randbytes(size)


def make_workload(model: Model, rng: random.Random, n: int, *, cp_every: int = 5, generation: int = 1,
                  first_lsn: int = 1, t0: float = T0) -> list[tuple[list[Entry], list[Checkpoint], float]]:
    """``n`` random writes in random batches of 1..8, a checkpoint every ``cp_every`` entries;
    a batch ending at lsn i has entry time t0 + i. Recorded in ``model``; returns the batches."""
    out = []
    lsn = first_lsn - 1
    done = 0
    while done < n:
        batch, cps = [], []
        for _ in range(min(rng.randint(1, 8), n - done)):
            lsn += 1
            done += 1
            vm, disk = rng.choice(DISKS)
            offset, data = random_write(rng, model.capacity)
            e = Entry(Pos(generation, lsn), vm, disk, offset, data)
            batch.append(e)
            if lsn % cp_every == 0:
                cps.append(Checkpoint(len(model.checkpoints) + len(cps) + 1, e.pos, t0 + lsn,
                                      "tag" if lsn % (cp_every * 4) == 0 else None))
        model.log.extend(batch)
        model.times.extend([t0 + lsn] * len(batch))
        model.checkpoints.extend(cps)
        out.append((batch, cps, t0 + lsn))
    return out


def run_workload(j: Journal, model: Model, rng: random.Random, n: int, *, cp_every: int = 5,
                 generation: int = 1, t0: float = T0, vpg: str = VPG) -> None:
    """Append ``n`` random writes (``make_workload``) after the durable position."""
    last = j.durable_pos(vpg)
    first = last.lsn + 1 if last is not None and last.generation == generation else 1
    for batch, cps, t in make_workload(model, rng, n, cp_every=cp_every, generation=generation,
                                       first_lsn=first, t0=t0):
        j.append(vpg, batch, cps, time=t)


def read_disks(j: Journal, at, vpg: str = VPG, capacity: int = CAPACITY) -> dict:
    return {k: j.read(vpg, k[0], k[1], 0, capacity, at) for k in DISKS}


def make_journal(path, replica_dir, *, sync: bool = False, **settings) -> Journal:
    j = Journal(str(path), sync=sync)
    j.create_vpg(VPG, JournalSettings(replica_dir=str(replica_dir), **settings))
    for vm, d in DISKS:
        j.register_disk(VPG, vm, d, CAPACITY)
    return j


@pytest.fixture
def journal(tmp_path):
    j = make_journal(tmp_path / "db", tmp_path / "replicas")
    yield j
    j.close()


@pytest.fixture
def model():
    return Model()


def promote_while(j: Journal, now: float, work, threads: int = 2) -> int:
    """Promote up to ``now`` in many small steps (7 entries each) while ``threads`` threads run
    ``work(stop)`` until it is set; how many entries were promoted."""
    import appliance.dss.promotion as P
    stop = threading.Event()
    ths = [threading.Thread(target=work, args=(stop,)) for _ in range(threads)]
    for t in ths:
        t.start()
    old = P.STEP_ENTRIES
    P.STEP_ENTRIES = 7
    try:
        return j.promote(VPG, now=now)
    finally:
        P.STEP_ENTRIES = old
        stop.set()
        for t in ths:
            t.join()
