"""append(): the journal's write path (docs/FORMAT.md, "Journal (DSS)", "Append and durability").

Validate the whole batch first (nothing is written if any of it is refused), then append the
entries' data to the VPG's segment file and fdatasync it (``segments.py``; both release the
GIL), then build one WriteBatch (entry records referencing that data, one index record per
4 KiB block, checkpoints, progress, the new state record) and write it with the WAL fsynced
(``Journal._write``) before returning. The index
record of a block the entry writes whole carries the block's hash (``kernels.block_hashes``), so
delta sync learns the image's hashes from the index without reading entries (``hashes.py``).
"""
from __future__ import annotations

import struct
import time

import numpy as np
from rocksdict import WriteBatch
from xxhash import xxh3_64_intdigest as _xxh3

from appliance.kernels import block_hashes

from . import keys as K
from . import records as R
from .errors import DSSError, DuplicateEntry, InvalidAppend, StreamGap
from .pos import Checkpoint, Entry, Pos
from .state import VpgState, entry_cost

_ENTRY_KEY = struct.Struct(">IIQ")
_INDEX_TAIL = struct.Struct(">QIQ")
_INDEX_BODY = struct.Struct("<HH")
_CHECK = struct.Struct("<Q")
_HASHES = struct.Struct("<HHQ")
_SMALL = 65536                          # entries up to this size: whole blocks hashed together
_NO_HASHES = np.zeros(0, dtype=np.uint64)


def append(j, v: VpgState, entries: list[Entry], checkpoints: list[Checkpoint], now: float,
           progress: dict[str, int] | None) -> Pos | None:
    with v.write_lock:
        t0 = time.perf_counter()
        out = _append(j, v, entries, checkpoints, now, progress)
        j.timings.append(time.perf_counter() - t0, sum(len(e.data) for e in entries))
        return out


def _append(j, v: VpgState, entries: list[Entry], checkpoints: list[Checkpoint], now: float,
            progress: dict[str, int] | None) -> Pos | None:
    j._check_writable()
    durable = v.durable
    prev = durable
    disks = []
    for e in entries:
        p = e.pos
        if prev is not None and p <= prev:
            if durable is not None and p <= durable:
                raise DuplicateEntry(p, v.name, durable)
            raise InvalidAppend(v.name, f"entry {p} does not follow entry {prev} of the same batch")
        if prev is not None and p.generation == prev.generation:
            if p.lsn != prev.lsn + 1:
                raise StreamGap(p, v.name, durable, f"lsn {prev.lsn + 1} expected")
        elif p.lsn != 1:
            raise StreamGap(p, v.name, durable, "a generation starts at lsn 1")
        if p.generation <= v.sealed:
            raise StreamGap(p, v.name, durable, f"generations up to {v.sealed} were closed by a "
                                             "recovery commit")
        d = j._disk(v, e.vm, e.disk)
        if e.offset < 0 or e.offset + len(e.data) > d.capacity:
            raise InvalidAppend(v.name, f"entry {p} writes {len(e.data)} bytes at offset {e.offset} "
                                     f"of a {d.capacity}-byte disk")
        disks.append(d)
        prev = p
    if prev is None and checkpoints and all(cp.pos.lsn == 0 for cp in checkpoints):
        # Nothing journaled yet: a checkpoint at (generation, 0) is the replicas as they are
        # (an idle VPG, or an initial sync that found nothing to send). It makes that
        # position durable, and the generation's first entry follows it at lsn 1.
        prev = max(cp.pos for cp in checkpoints)
    floor = v.pins.floor
    for cp in checkpoints:
        if prev is None or cp.pos > prev:
            raise InvalidAppend(v.name, f"checkpoint {cp.id} at {cp.pos} is after the last entry {prev}")
        if cp.pos < floor:
            raise InvalidAppend(v.name, f"checkpoint {cp.id} at {cp.pos} is before the recoverable "
                                     f"history, which starts at {floor}")
    refs = iter(_write_data(j, v, entries))
    whole = iter(_whole_hashes(entries))
    updates = []                        # per entry with data: what the hash cache learns
    wb = WriteBatch(raw_mode=True)
    put, ecf, icf = wb.put, j._entries_cf, j._index_cf
    vpg_id = v.id
    added = 0
    for e, d in zip(entries, disks):
        gen, lsn = e.pos.generation, e.pos.lsn
        ekey = _ENTRY_KEY.pack(vpg_id, gen, lsn)
        data, off = e.data, e.offset
        added += entry_cost(len(data), off)
        if not data:
            put(ekey, R.encode_entry(ekey, d.vmb, e.disk, off, data, now), ecf)
            continue
        seq, at = next(refs)
        put(ekey, R.encode_entry_ref(ekey, d.vmb, e.disk, off, len(data), now, seq, at, _xxh3(data)),
            ecf)
        # one index record per 4 KiB block written: [start, end) of the block
        end = off + len(data)
        first, last = off >> K.BLOCK_SHIFT, (end - 1) >> K.BLOCK_SHIFT
        prefix = d.prefix
        # the blocks written whole: [full0, full1), hashed by _whole_hashes
        full0, full1, hashed = next(whole)
        hashes = hashed.tolist()
        updates.append(((d.vmb, d.disk), first, last, full0, full1, hashed))
        for b in range(first, last + 1):
            if full0 <= b < full1:
                body = _HASHES.pack(0, K.BLOCK, hashes[b - full0])
            else:
                base = b << K.BLOCK_SHIFT
                body = _INDEX_BODY.pack(off - base if off > base else 0,
                                        end - base if end < base + K.BLOCK else K.BLOCK)
            ikey = prefix + _INDEX_TAIL.pack(b, gen, lsn)
            put(ikey, _CHECK.pack(_xxh3(ikey + body)) + body, icf)
    ckeys = []
    for cp in checkpoints:
        ckey = K.format_checkpoint_key(vpg_id, cp.pos, cp.id)
        wb.put(ckey, R.encode_checkpoint(ckey, cp.time, cp.tag))
        ckeys.append(ckey)
    wb.put(v.state_key, v.state_value(durable=prev, entries=v.entries + len(entries),
                                      nbytes=v.nbytes + added))
    for source, seq in (progress or {}).items():
        pkey = K.format_progress_key(vpg_id, source)
        wb.put(pkey, R.encode_progress(pkey, int(seq)))
    v.pending.update(ckeys)             # visible before durable: hidden until the fsync
    j._write(wb, f"append to VPG {v.name}", timed=True)
    v.pending.difference_update(ckeys)
    if progress:
        v.progress.update((s_, int(q)) for s_, q in progress.items())
    with v.hashes.lock:                 # the hash cache moves with the durable position
        v.hashes.note(updates)
        v.durable = prev
    v.entries += len(entries)
    v.nbytes += added
    return prev


def _whole_hashes(entries: list[Entry]) -> list[tuple[int, int, object]]:
    """Per non-empty entry ``(full0, full1, hashes)``: the blocks ``[full0, full1)`` it writes
    whole and their hashes (uint64 array). The whole blocks of entries of up to 64 KiB are
    hashed together in one kernel call (a delta sync's isolated blocks are one entry each: a
    call per entry cost more than the hashing), bigger ones each in its own."""
    shift, bs = K.BLOCK_SHIFT, K.BLOCK
    out, small, at = [], [], 0
    for e in entries:
        data, off = e.data, e.offset
        if not data:
            continue
        full0 = (off + bs - 1) >> shift
        full1 = (off + len(data)) >> shift
        if full1 <= full0:
            out.append((full0, full0, _NO_HASHES))
        elif len(data) > _SMALL:
            out.append((full0, full1, block_hashes(memoryview(data)[(full0 << shift) - off:
                                                                    (full1 << shift) - off], bs)))
        else:
            part = memoryview(data)[(full0 << shift) - off:(full1 << shift) - off]
            small.append(part)
            out.append((full0, full1, (at, at + full1 - full0)))
            at += full1 - full0
    if small:
        hashed = block_hashes(small[0] if len(small) == 1 else b"".join(small), bs)
        out = [(a, b, hashed[h[0]:h[1]]) if isinstance(h, tuple) else (a, b, h) for a, b, h in out]
    return out


def _write_data(j, v: VpgState, entries: list[Entry]) -> list[tuple[int, int]]:
    """Append the batch's data to the VPG's segment, durable when the journal syncs: (segment,
    offset) of each non-empty entry. A failed write references nothing and the next append
    writes the same place again; a failed fdatasync poisons the journal like a failed WAL sync
    (what the file holds is unknown)."""
    datas = [e.data for e in entries if e.data]
    if not datas:
        return []
    try:
        return v.segs.write(datas)
    except OSError as exc:
        if getattr(exc, "fsync", False):
            j._failed = exc
        raise DSSError(f"append to VPG {v.name}: cannot write the entries' data to "
                       f"{v.segs.dir}: {exc}") from exc
