"""Point-in-time reads: a disk as it was at position P = replica file + journal entries <= P.

One seek in the index column family to ``disk prefix | first block`` and a forward scan to the
range's last block collect, per 4 KiB block, its index records at or before P (the scan steps
over records after P). A block with more than SCAN_VERSIONS records is passed by a seek to the
next block and read by a reverse seek (``seek_for_prev``) to ``disk prefix | block | P`` instead,
so a hot block costs O(log n), never a walk over its whole history. Per block, versions are
taken newest first until the requested bytes are covered (an entry that wrote only part of the
block does not hide what lies underneath); what is still uncovered comes from the replica. The
entries are fetched in one multi-get, their data read together (``segments.Segments.data_many``:
what the page cache holds at once, the disk reads of the rest started together), and applied
oldest first over the replica bytes.

Consistency with a concurrent promotion (which only ever moves the replica up to a position
<= every pinned read position): the index iterator is created first, the replica read second,
the entries fetched last. Promotion writes and fsyncs the replica before it deletes the
entries it applied, so if an entry the iterator saw has gone by the time it is fetched, the
read starts over; otherwise every byte not covered by an entry the iterator saw is the same in
the replica at any moment of that promotion.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import struct

from xxhash import xxh3_64_intdigest as _xxh3

from . import keys as K
from . import records as R
from .errors import DSSError, JournalCorrupt
from .pos import ZERO, Checkpoint, Pos
from .segments import ReadFailed
from .state import DiskInfo, VpgState

RETRIES = 16
SCAN_VERSIONS = 16      # versions of one block read by the forward scan before it seeks past them
_INDEX_TAIL = struct.Struct(">QIQ")
_Q = struct.Struct(">Q")
_POS_TAIL = struct.Struct(">IQ")
_INDEX_VALUE = R.INDEX_VALUE
_BLOCK = K.BLOCK
_SHIFT = K.BLOCK_SHIFT


def read(j, vpg: str, vm: str, disk: int, offset: int, length: int, at: Checkpoint | Pos) -> bytes:
    v = j._vpg(vpg)
    d = j._disk(v, vm, disk)
    pos = at.pos if isinstance(at, Checkpoint) else at
    check_range(d, offset, length)
    durable = v.durable
    if durable is None or pos > durable:
        pos = durable or ZERO
    pins = v.pins
    pins.pin(pos)
    try:
        return read_at(j, v, d, offset, length, pos)
    finally:
        pins.unpin(pos)


@contextlib.contextmanager
def replica_range(j, vpg: str, vm: str, disk: int, offset: int, length: int):
    """``(pos, view)``: the durable position, and when no journal entry touches
    ``[offset, offset + length)`` a read-only view of the replica file's bytes there (then the
    image at ``pos`` of that range); ``view`` is None when entries do (read through ``read``).
    ``pos`` stays pinned while the context is open, so promotion cannot move the range past it.
    The view must not be kept after the context closes."""
    v = j._vpg(vpg)
    d = j._disk(v, vm, disk)
    check_range(d, offset, length)
    pos = v.durable or ZERO
    v.pins.pin(pos)
    try:
        mm = view = None
        if length:
            it = j._index.iter()
            it.seek(d.prefix + _Q.pack(offset >> _SHIFT))
            touched = it.valid() and it.key() < d.prefix + _Q.pack(((offset + length - 1) >> _SHIFT) + 1)
            del it
            if not touched:
                start = offset - offset % mmap.ALLOCATIONGRANULARITY
                mm = mmap.mmap(d.fd, offset + length - start, access=mmap.ACCESS_READ, offset=start)
                view = memoryview(mm)[offset - start:]
        try:
            yield pos, view
        finally:
            if view is not None:
                view.release()
                try:
                    mm.close()
                except BufferError:             # a caller kept a view: the GC closes it later
                    pass
    finally:
        v.pins.unpin(pos)


def replica_extents(j, vpg: str, vm: str, disk: int, offset: int, length: int):
    """The replica file's data extents in ``[offset, offset + length)`` (``appliance.extents``):
    ``[(start, end), ...]``, the rest being holes (zeros); None if the file system cannot tell.
    Of the image only where ``replica_range`` gave a view, and inside that context (the range
    is stable while its position is pinned)."""
    from appliance.extents import data_extents
    v = j._vpg(vpg)
    d = j._disk(v, vm, disk)
    check_range(d, offset, length)
    return data_extents(d.fd, offset, length)


def check_range(d: DiskInfo, offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > d.capacity:
        raise ValueError(f"{length} bytes at offset {offset} are outside disk {d.disk} of VM {d.vm} "
                         f"({d.capacity} bytes)")


def read_at(j, v: VpgState, d: DiskInfo, offset: int, length: int, pos: Pos) -> bytes:
    """The bytes at ``pos``; the caller holds a pin at ``pos`` (so promotion stays <= pos)."""
    if length == 0:
        return b""
    for _ in range(RETRIES):
        out = _read_once(j._index, j._entries, v, d, offset, length, pos)
        if out is not None:
            return out
    raise DSSError(f"read of VPG {v.name} at {pos} kept racing with promotion; retry")


def _read_once(index, entries, v: VpgState, d: DiskInfo, offset: int, length: int, pos: Pos):
    it = index.iter()                                   # 1. the index as of now (a snapshot)
    end = offset + length
    first = offset >> _SHIFT
    last = (end - 1) >> _SHIFT
    prefix = d.prefix
    ptail = (pos.generation, pos.lsn)
    seek, valid, key, value, nxt = it.seek, it.valid, it.key, it.value, it.next
    # One forward scan over the range's index keys (block, then position order) collects, per
    # block, its versions at or before ``pos``. A block with more than SCAN_VERSIONS versions
    # is skipped by a seek to the next block, and walked back from ``pos`` alone (_walk).
    versions: dict[int, list] = {}
    crowded = []
    hi_key = prefix + _Q.pack(last + 1)
    seek(prefix + _Q.pack(first))
    cur = -1
    count = 0
    past = False
    while valid():
        k = key()
        if k >= hi_key:
            break
        block, gen, lsn = _INDEX_TAIL.unpack_from(k, 22)
        if block != cur:
            cur, count, past = block, 0, False
        count += 1
        if count > SCAN_VERSIONS:
            if not past:
                crowded.append(block)
                versions.pop(block, None)
            cur = -1
            seek(prefix + _Q.pack(block + 1))
            continue
        if past or (gen, lsn) > ptail:
            past = True                                 # the block's later versions follow
        else:
            versions.setdefault(block, []).append((k, *_index_value(k, value(), v, d)))
        nxt()
    # Per block, the newest versions until the requested bytes are covered; the byte ranges
    # each entry supplies, merged where they touch.
    spans: dict[bytes, list] = {}                       # entry key -> [[a, b, index key]] absolute
    covered = 0
    for block, newest_first in [(b, reversed(x)) for b, x in versions.items()] + \
            [(b, _walk(it, prefix + _Q.pack(b), _POS_TAIL.pack(*ptail), v, d)) for b in crowded]:
        base = block << _SHIFT
        lo = offset - base if offset > base else 0
        hi = end - base if end < base + _BLOCK else _BLOCK
        pieces = _cover(newest_first, lo, hi)
        if not pieces:
            continue
        if len(pieces) == 1 and pieces[0][1] <= lo and pieces[0][2] >= hi:
            covered += hi - lo
        for k, s, e in pieces:
            a = base + (s if s > lo else lo)
            b = base + (e if e < hi else hi)
            lst = spans.setdefault(k[:4] + k[30:], [])
            if lst and lst[-1][1] == a:
                lst[-1][1] = b
            else:
                lst.append([a, b, k])
    if covered == length:                               # every byte from entries: no replica read
        buf = bytearray(length)
    else:
        buf = bytearray(os.pread(d.fd, length, offset))     # 2. the replica
        if len(buf) < length:
            buf.extend(bytes(length - len(buf)))            # beyond the file's end: never written
    if not spans:
        return bytes(buf)
    # 3. the entries, in one multi-get, their data read together (segments.data_many), applied
    # in position order (so, per block, oldest first)
    ekeys = sorted(spans)
    raws = entries.get(ekeys)
    found = []
    for ekey, raw in zip(ekeys, raws):
        if raw is None:
            return None                                 # promoted since step 1: start over
        try:
            _, _, eoff, elen, _, src = R.decode_entry(ekey, raw)
        except R.RecordError as exc:
            raise JournalCorrupt(f"entry {K.parse_entry_key(ekey)[1]}", v.name, exc) from None
        found.append((eoff, elen, src))
    try:
        datas = v.segs.data_many([(src, elen) for _, elen, src in found])
    except ReadFailed as exc:
        raise JournalCorrupt(f"entry {K.parse_entry_key(ekeys[exc.item])[1]}", v.name, exc) from None
    for ekey, (eoff, elen, _), data in zip(ekeys, found, datas):
        if data is None:
            return None                                 # promoted since step 1: start over
        for a, b, k in spans[ekey]:
            if a < eoff or b > eoff + elen:
                raise JournalCorrupt(_index_name(k, d), v.name, "index record does not match its entry")
            buf[a - offset:b - offset] = data[a - eoff:b - eoff]
    return bytes(buf)


def _index_value(k: bytes, val: bytes, v: VpgState, d: DiskInfo) -> tuple[int, int]:
    """(start, end) of a verified index record."""
    if len(val) != 12 and len(val) != 20:          # 20: a whole block's, with its hash
        raise JournalCorrupt(_index_name(k, d), v.name, f"index record of {len(val)} bytes")
    c, s, e = _INDEX_VALUE.unpack_from(val)
    if _xxh3(k + val[8:]) != c:
        raise JournalCorrupt(_index_name(k, d), v.name, "index record checksum mismatch")
    return s, e


def _walk(it, bkey: bytes, tail: bytes, v: VpgState, d: DiskInfo):
    """A block's versions at or before a position, newest first (one reverse seek, then prev)."""
    it.seek_for_prev(bkey + tail)
    while it.valid():
        k = it.key()
        if k[:30] != bkey:
            return
        yield (k, *_index_value(k, it.value(), v, d))
        it.prev()


def _cover(newest_first, lo: int, hi: int) -> list:
    """The versions (newest first) needed to cover [lo, hi) of a block, or as much as they can."""
    pieces = None
    for k, s, e in newest_first:
        if e > lo and s < hi:
            if pieces is None:
                pieces = [(k, s, e)]
                if s <= lo and e >= hi:
                    break
            else:
                pieces.append((k, s, e))
                if _covers(pieces, lo, hi):
                    break
    return pieces


def _covers(pieces, lo: int, hi: int) -> bool:
    """Whether the pieces' byte ranges together cover [lo, hi)."""
    reach = lo
    for _, s, e in sorted(pieces, key=lambda p: p[1]):
        if s > reach:
            return False
        if e > reach:
            reach = e
            if reach >= hi:
                return True
    return reach >= hi


def _index_name(k: bytes, d: DiskInfo) -> str:
    _, _, _, block, pos = K.parse_index_key(k)
    return f"index {pos} block {block} of disk {d.disk} of VM {d.vm}"
