"""In-memory state of one VPG's journal: positions, counters, disks, locks and read pins.

Locks, always taken in this order:

* ``promote_lock``: one promotion (or image commit, or delete) of the VPG at a time;
* ``write_lock``: serialises the WriteBatches that rewrite the VPG's state record (append,
  each promotion step, settings); an append holds it across its WAL sync;
* ``pins``: a condition variable, held only for a few instructions.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

from . import keys as K
from . import records as R
from .errors import ImageBusy, NotRecoverable
from .hashcache import HashCache
from .pos import ZERO, Pos
from .settings import JournalSettings


@dataclass
class DiskInfo:
    vm: str             # canonical instance UUID
    vmb: bytes          # its 16 raw bytes
    disk: int
    capacity: int
    path: str           # the replica file
    fd: int
    prefix: bytes       # K.index_disk_prefix(vpg_id, vmb, disk)


class Pins:
    """Positions being read. Promotion never moves the replica past the lowest pinned position.

    ``floor`` is the lowest recoverable position: nothing below it may be pinned (reads of it
    fail with NotRecoverable). Promotion raises the floor *before* it writes the replica.
    Transient pins belong to one read call; image pins live as long as a RecoveryImage.
    """

    def __init__(self, vpg: str, floor: Pos):
        self.vpg = vpg
        self.floor = floor
        self._cond = threading.Condition()
        self._reads: dict[Pos, int] = {}
        self._images: dict[object, Pos] = {}
        self._exclusive = False

    def pin(self, pos: Pos, image: object = None) -> None:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            if pos < self.floor:
                raise NotRecoverable(pos, self.vpg, self.floor)
            if image is not None:
                self._images[image] = pos
            else:
                self._reads[pos] = self._reads.get(pos, 0) + 1

    def unpin(self, pos: Pos | None = None, image: object = None) -> None:
        with self._cond:
            if image is not None:
                self._images.pop(image, None)
            else:
                n = self._reads[pos] - 1
                if n:
                    self._reads[pos] = n
                else:
                    del self._reads[pos]
            self._cond.notify_all()

    def limit(self, target: Pos) -> Pos:
        """Clip ``target`` to the lowest pin, raise the floor to it and return it."""
        with self._cond:
            low = min((*self._reads, *self._images.values()), default=None)
            if low is not None and low < target:
                target = low
            if target > self.floor:
                self.floor = target
            return target

    def images(self) -> list[Pos]:
        with self._cond:
            return list(self._images.values())

    @contextmanager
    def exclusive(self, image: object = None, same_disk=None):
        """Wait out transient reads and hold new ones back. Images other than ``image`` must be at
        ``image``'s position and, if ``same_disk`` is given, must not satisfy it."""
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            mine = self._images.get(image) if image is not None else None
            for other, pos in self._images.items():
                if other is image:
                    continue
                if mine is None or pos != mine:
                    raise ImageBusy(self.vpg, "recovery images open", "close or discard them first")
                if same_disk is not None and same_disk(other):
                    raise ImageBusy(self.vpg, "another image of the same disk open", "discard it first")
            self._exclusive = True
            while self._reads:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


@dataclass
class VpgState:
    name: str
    id: int
    settings: JournalSettings
    sealed: int = 0                     # generations <= sealed were closed by a recovery commit
    durable: Pos | None = None          # newest entry made durable by append
    promoted: Pos | None = None         # newest entry applied to the replicas and deleted
    promoting: Pos | None = None        # promotion intent: the replicas may hold entries up to here
    entries: int = 0
    nbytes: int = 0
    disks: dict = field(default_factory=dict)     # (vmb, disk) -> DiskInfo
    names: dict = field(default_factory=dict)     # (vm as given, disk) -> DiskInfo
    pending: set = field(default_factory=set)     # checkpoint keys written but not yet fsynced
    progress: dict = field(default_factory=dict)  # source -> highest seq made durable (for the VRA)
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    promote_lock: threading.Lock = field(default_factory=threading.Lock)
    pins: Pins = None
    segs: object = None                 # segments.Segments: the entries' data
    hashes: HashCache = field(default_factory=HashCache)   # per-block kinds/hashes at durable

    def __post_init__(self):
        self.pins = Pins(self.name, self.floor())

    def floor(self) -> Pos:
        return max(self.promoted or ZERO, self.promoting or ZERO)

    @property
    def state_key(self) -> bytes:
        return K.format_state_key(self.id)

    def state_value(self, **change) -> bytes:
        s = {"sealed": self.sealed, "durable": self.durable, "promoted": self.promoted,
             "promoting": self.promoting, "entries": self.entries, "nbytes": self.nbytes, **change}
        return R.encode_state(self.state_key, s["sealed"], s["durable"], s["promoted"], s["promoting"],
                              s["entries"], s["nbytes"])

    def close_disks(self) -> None:
        for d in self.disks.values():
            if d.fd >= 0:
                os.close(d.fd)
                d.fd = -1


INDEX_RECORD_BYTES = K.INDEX_KEY_SIZE + R.INDEX_VALUE.size


def entry_cost(length: int, offset: int) -> int:
    """Bytes an entry occupies in the journal: its record plus its index records (keys included)."""
    nblocks = ((offset + length - 1) >> K.BLOCK_SHIFT) - (offset >> K.BLOCK_SHIFT) + 1 if length else 0
    return K.ENTRY_KEY_SIZE + R.ENTRY_HEADER_SIZE + length + nblocks * INDEX_RECORD_BYTES
