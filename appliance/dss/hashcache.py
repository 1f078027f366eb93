"""What the journal knows of each 4 KiB block's newest version at the durable position, kept in
memory per VPG for delta sync (``hashes.py``; docs/FORMAT.md, "Delta sync").

Per block one of: NONE (no entry at or before the durable position writes it: the replica
answers), WHOLE (the newest version wrote the whole block, and its hash is kept: what the
index record carries) or PART (the newest version wrote part of the block, or carries no
hash: the point-in-time reader answers). It is kept per step of ``STEP_BLOCKS`` blocks
(16 MiB of disk), only for the steps delta sync asked for: the first request of a step scans
the index as before (``hashes._scan``) and stores the result; from then on every append
updates it (``note``, from ``append.py``) in the same hold of ``lock`` in which it moves the
durable position, so a step read under ``lock`` is exactly the image at ``v.durable``. The
2 GiB disk of the replication bench is 128 steps whose index scans (524288 records) cost
0.3-0.45 s per delta sync; answered from here they cost a copy.

Why this is the image at the durable position, whatever happens around it:

* an append's entries reach the cache and the durable position together (one hold of
  ``lock``); a scan that builds a step reads the durable position P and registers itself
  under ``lock`` too, so an append is either wholly at or before P (its records are in the
  index before that, the scan sees them) or wholly after (the scan skips its records, as
  after P, and ``note`` hands them to the builder, which applies them, in order, to what it
  stores);
* promotion moves entries into the replica without changing the image at any position from
  the floor on: WHOLE keeps its hash, PART is read through the reader, and a NONE block is
  one no entry wrote, which promotion does not touch either;
* a recovery commit (entries after a checkpoint dropped) and a deleted VPG change or end the
  image: ``clear`` (under ``lock``, with the new durable position) forgets everything;
* nothing here is on disk: a reopened journal starts empty and scans again.

Only what an append computed from the bytes it received is kept (never replica content, which
is read when asked). The index records on disk stay as they are; ``check`` still compares
each with its entry.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

STEP_BLOCKS = 4096          # blocks per cached step: 16 MiB of disk
MAX_STEPS = 4096            # per VPG: 64 GiB of disk images; 36 KiB per step at most (144 MiB)
NONE, WHOLE, PART = 0, 1, 2


class Step:
    """One step's blocks: ``kind`` (uint8) and ``hash`` (uint64, valid where WHOLE), or both
    None while every block is NONE."""
    __slots__ = ("kind", "hash")

    def __init__(self, kind: np.ndarray | None = None, hash: np.ndarray | None = None):
        self.kind, self.hash = kind, hash

    def copy(self) -> "Step":
        return Step(None if self.kind is None else self.kind.copy(),
                    None if self.hash is None else self.hash.copy())

    def apply(self, s: int, upd) -> None:
        """Apply one entry's update ``(dkey, first, last, full0, full1, hashes)`` (blocks
        ``first..last`` written, ``[full0, full1)`` of them whole, with ``hashes``) to this,
        step ``s``: only the blocks that lie in it."""
        _, first, last, full0, full1, hashes = upd
        lo = s * STEP_BLOCKS
        a, b = max(first, lo), min(last + 1, lo + STEP_BLOCKS)
        if a >= b:
            return
        if self.kind is None:
            self.kind = np.zeros(STEP_BLOCKS, dtype=np.uint8)
            self.hash = np.zeros(STEP_BLOCKS, dtype=np.uint64)
        if b - a == 1 and full0 <= a < full1:             # the usual isolated block: no slices
            self.kind[a - lo] = WHOLE
            self.hash[a - lo] = hashes[a - full0]
            return
        self.kind[a - lo:b - lo] = PART
        fa, fb = max(full0, a), min(full1, b)
        if fa < fb:
            self.kind[fa - lo:fb - lo] = WHOLE
            self.hash[fa - lo:fb - lo] = hashes[fa - full0:fb - full0]


class HashCache:
    """The cached steps of one VPG, keyed by ``(disk key, step)``; see the module doc."""

    def __init__(self, max_steps: int = MAX_STEPS):
        self.lock = threading.Lock()
        self.max_steps = max_steps
        self._steps: OrderedDict = OrderedDict()      # (dkey, step) -> Step, least recent first
        self._building: dict = {}                     # (dkey, step) -> [pending update lists]
        self._epoch = 0

    # -- under lock ---------------------------------------------------------------------------
    def note(self, updates: list) -> None:
        """One append's updates, in entry order (caller holds ``lock`` and moves the durable
        position in the same hold)."""
        if not (self._steps or self._building):
            return
        steps, building = self._steps, self._building
        for upd in updates:
            dkey, first, last = upd[0], upd[1], upd[2]
            for s in range(first // STEP_BLOCKS, last // STEP_BLOCKS + 1):
                key = (dkey, s)
                st = steps.get(key)
                if st is not None:
                    st.apply(s, upd)
                for pend in building.get(key, ()):
                    pend.append(upd)

    def clear(self) -> None:
        """Forget everything (caller holds ``lock``): the image changed other than by appends."""
        self._steps.clear()
        self._epoch += 1

    def get(self, dkey, s: int) -> Step | None:
        """A copy of step ``s`` of disk ``dkey``, or None if it is not cached (caller holds ``lock``)."""
        st = self._steps.get((dkey, s))
        if st is None:
            return None
        self._steps.move_to_end((dkey, s))
        return st.copy()

    def start(self, dkey, steps) -> tuple[int, list]:
        """Register a scan of ``steps`` of disk ``dkey`` at the durable position read in the
        same hold of ``lock``; -> the token for ``finish``."""
        pend: list = []
        for s in steps:
            self._building.setdefault((dkey, s), []).append(pend)
        return self._epoch, pend

    # -- takes lock ---------------------------------------------------------------------------
    def finish(self, dkey, token, built: dict) -> None:
        """The scan registered by ``start`` ended; ``built`` ({step: Step}) is what it found
        (possibly not every step: it failed). Each is stored with the appends that came after
        the scan's position applied to it, unless the cache was cleared meanwhile."""
        epoch, pend = token
        with self.lock:
            for key in [k for k, lists in self._building.items() if any(p is pend for p in lists)]:
                lists = [p for p in self._building[key] if p is not pend]
                if lists:
                    self._building[key] = lists
                else:
                    del self._building[key]
            if epoch != self._epoch:
                return
            for s, st in built.items():
                st = st.copy()
                for upd in pend:
                    if upd[0] == dkey:
                        st.apply(s, upd)
                self._steps[(dkey, s)] = st
                self._steps.move_to_end((dkey, s))
            while len(self._steps) > self.max_steps:
                self._steps.popitem(last=False)
