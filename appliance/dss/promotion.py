"""Promotion: journal entries leave the journal into the replica files, oldest first.

``promote`` moves the entries older than the history window; ``enforce_limits`` moves the oldest
ones past the hard limit. Both run steps of at most STEP_ENTRIES entries / STEP_BYTES bytes:

1. collect the next entries in stream order, verifying each (a corrupt one stops promotion
   with JournalCorrupt: the replica can never move past it);
2. clip the step to the lowest pinned read position (open images, reads in progress), raise
   the recoverable floor to the step's last position T and persist T as the promotion intent
   (state record, WAL sync);
3. pwrite the entries in order to their replica files and fsync each touched replica;
4. one batch deletes the entries, their index records and the checkpoints before T and records
   promoted = T (WAL sync).

A crash after 2 keeps the intent: after reopen the floor is still T, so no checkpoint the
replica may already have moved past is offered, and the next promotion applies the same entries
again (absolute offsets, same order: idempotent).
"""
from __future__ import annotations

import os
import time as _time

from rocksdict import WriteBatch

from . import keys as K
from . import records as R
from .errors import DSSError, JournalCorrupt
from .pos import ZERO, Pos
from .state import VpgState, entry_cost

STEP_ENTRIES = 4096
STEP_BYTES = 64 << 20


def promote(j, v: VpgState, now: float | None = None) -> int:
    cutoff = (_time.time() if now is None else now) - v.settings.history_s
    return promote_while(j, v, lambda t, cost: t < cutoff)


def enforce_limits(j, v: VpgState) -> list[dict]:
    alerts = []
    s = v.settings
    limit = s.hard_limit_bytes
    if limit and v.nbytes > limit:
        before = v.nbytes
        excess = [before - limit]

        def over(t: float, cost: int) -> bool:
            if excess[0] <= 0:
                return False
            excess[0] -= cost
            return True

        n = promote_while(j, v, over)
        held = " Open recovery images hold the rest." if v.nbytes > limit else ""
        alerts.append({"kind": "journal_hard_limit", "vpg": v.name,
                       "detail": f"The journal of VPG {v.name} used {before} bytes, over its hard limit of "
                                 f"{limit}: its {n} oldest entries were promoted and history now starts at "
                                 f"{v.pins.floor}.{held} Raise the limit or shorten the history window."})
    if s.warn_bytes and v.nbytes > s.warn_bytes:
        alerts.append({"kind": "journal_warning", "vpg": v.name,
                       "detail": f"The journal of VPG {v.name} uses {v.nbytes} bytes, over its warning "
                                 f"threshold of {s.warn_bytes}."})
    return alerts


def promote_while(j, v: VpgState, keep_going, upto: Pos | None = None) -> int:
    """Promote entries in stream order while ``keep_going(entry time, entry cost)`` says so and
    (if given) up to ``upto``. Returns the number of entries promoted."""
    total = 0
    with v.promote_lock:
        while True:
            step, done, corrupt = _collect(j, v, keep_going, upto)
            n = _apply(j, v, step) if step else 0
            total += n
            if corrupt is not None and n == len(step):
                raise corrupt                   # the entries before it are promoted; it never is
            if done or not step or n < len(step):
                break
    return total


def _collect(j, v: VpgState, keep_going, upto: Pos | None):
    step = []
    nbytes = 0
    hi = K.vpg_key_range(v.id)[1]
    it = j._entries.iter()
    it.seek(K.format_entry_key(v.id, _after(v.promoted)))
    while True:
        if not it.valid():
            return step, True, None
        key = it.key()
        if key >= hi:
            return step, True, None
        _, pos = K.parse_entry_key(key)
        if upto is not None and pos > upto:
            return step, True, None
        try:
            vmb, disk, offset, length, t, src = R.decode_entry(key, it.value())
        except R.RecordError as exc:
            return step, True, JournalCorrupt(f"entry {pos}", v.name, f"{exc}; promotion stopped before it")
        cost = entry_cost(length, offset)
        if not keep_going(t, cost):
            return step, True, None
        d = v.disks.get((vmb, disk))
        if d is None:
            raise DSSError(f"entry {pos} of VPG {v.name} writes disk {disk} of VM {K.parse_vm(vmb)}, "
                           "which is not registered: run check()")
        try:
            data = v.segs.data(src, length)
        except (ValueError, OSError) as exc:
            return step, True, JournalCorrupt(f"entry {pos}", v.name, f"{exc}; promotion stopped before it")
        if data is None:        # only promotion drops segments, and it holds promote_lock
            raise DSSError(f"entry {pos} of VPG {v.name}: its segment was dropped while it is live")
        step.append((pos, key, d, offset, length, data, cost))
        nbytes += length
        if len(step) >= STEP_ENTRIES or nbytes >= STEP_BYTES:
            return step, False, None
        it.next()


def _apply(j, v: VpgState, step: list) -> int:
    # 2. the floor and the intent, under the write lock: an append either stored its checkpoints
    # before (this step's batch deletes those below the floor) or sees the new floor
    with v.write_lock:
        target = v.pins.limit(step[-1][0])
        if target < step[-1][0]:
            step = [s for s in step if s[0] <= target]
            if not step:
                return 0
            target = step[-1][0]
        j._write(j._batch_put(None, v.state_key, v.state_value(promoting=target)),
                 f"promotion intent of VPG {v.name}")
        v.promoting = target
    # 3. the replicas
    touched = {}
    for _, _, d, offset, length, data, _ in step:
        done = 0
        while done < length:
            done += os.pwrite(d.fd, data[done:], offset + done)
        touched[d.fd] = d
    if j.sync:
        for fd in touched:
            os.fsync(fd)
    # 4. forget what the replicas now hold
    ecf, icf = j._entries_cf, j._index_cf
    freed = 0
    wb = WriteBatch(raw_mode=True)
    for pos, key, d, offset, length, _, cost in step:
        wb.delete(key, ecf)
        freed += cost
        if length:
            for b in range(offset >> K.BLOCK_SHIFT, ((offset + length - 1) >> K.BLOCK_SHIFT) + 1):
                wb.delete(d.prefix + K.format_index_tail(b, pos), icf)
    wb.delete_range(K.checkpoint_key_bound(v.id, ZERO), K.checkpoint_key_bound(v.id, target))
    with v.write_lock:
        wb.put(v.state_key, v.state_value(promoted=target, promoting=target, entries=v.entries - len(step),
                                          nbytes=v.nbytes - freed))
        j._write(wb, f"promotion of VPG {v.name} up to {target}")
        v.promoted = target
        v.entries -= len(step)
        v.nbytes -= freed
    _drop_segments(j, v, target)
    return len(step)


def _drop_segments(j, v: VpgState, target: Pos) -> None:
    """Unlink the segments that hold only entries up to ``target`` (now deleted, durably): all
    before the segment of the oldest entry left, or all but the active one if none is left."""
    hi = K.vpg_key_range(v.id)[1]
    it = j._entries.iter()
    it.seek(K.format_entry_key(v.id, _after(target)))
    keep = None
    if it.valid() and it.key() < hi:
        try:
            src = R.decode_entry(it.key(), it.value())[5]
        except R.RecordError:
            return                      # promotion stops there next time; keep everything
        if not isinstance(src, R.SegmentRef):
            return                      # an inline entry (format version 2): no segment before it
        keep = src.seq
    del it
    v.segs.drop_before(keep)


def _after(p: Pos | None) -> Pos:
    return ZERO if p is None else Pos(p.generation, p.lsn + 1)
