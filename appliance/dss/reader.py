"""Point-in-time reads: a disk as it was at position P = replica file + journal entries <= P.

Per 4 KiB block of the range, one reverse seek (``seek_for_prev``) in the index column family
to ``disk prefix | block | P`` lands on the newest entry <= P that wrote the block, in O(log n).
An entry that wrote only part of the block does not hide what lies underneath: the walk goes on
to older entries of the block (``prev``) until the requested bytes are covered or the block's
index keys end; what is still uncovered comes from the replica. Entries are then applied oldest
first over the replica bytes.

Consistency with a concurrent promotion (which only ever moves the replica up to a position
<= every pinned read position): the index iterator is created first, the replica read second,
the entries fetched last. Promotion writes and fsyncs the replica before it deletes the
entries it applied, so if an entry the iterator saw has gone by the time it is fetched, the
read starts over; otherwise every byte not covered by an entry the iterator saw is the same in
the replica at any moment of that promotion.
"""
from __future__ import annotations

import os
import struct

from xxhash import xxh3_64_intdigest as _xxh3

from . import keys as K
from . import records as R
from .errors import DSSError, JournalCorrupt
from .pos import ZERO, Checkpoint, Pos
from .state import DiskInfo, VpgState

RETRIES = 16
_Q = struct.Struct(">Q")
_POS_TAIL = struct.Struct(">IQ")
_INDEX_VALUE = R.INDEX_VALUE
_HEAD = R.ENTRY_HEADER_SIZE
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
    it = index.iter()                                   # 1. the index as of now
    buf = bytearray(os.pread(d.fd, length, offset))     # 2. the replica
    if len(buf) < length:
        buf.extend(bytes(length - len(buf)))            # beyond the file's end: never written
    end = offset + length
    tail = _POS_TAIL.pack(pos.generation, pos.lsn)
    prefix = d.prefix
    seek, valid, key, value, prev = it.seek_for_prev, it.valid, it.key, it.value, it.prev
    fetched = {}
    block = offset >> _SHIFT
    last = (end - 1) >> _SHIFT
    while block <= last:
        base = block << _SHIFT
        lo = offset - base if offset > base else 0
        hi = end - base if end < base + _BLOCK else _BLOCK
        bkey = prefix + _Q.pack(block)
        seek(bkey + tail)
        pieces = None
        while valid():
            k = key()
            if k[:30] != bkey:
                break
            val = value()
            if len(val) != 12:
                raise JournalCorrupt(_index_name(k, d), v.name, f"index record of {len(val)} bytes")
            c, s, e = _INDEX_VALUE.unpack(val)
            if _xxh3(k + val[8:]) != c:
                raise JournalCorrupt(_index_name(k, d), v.name, "index record checksum mismatch")
            if e > lo and s < hi:
                if pieces is None:
                    pieces = [(k, s, e)]
                    if s <= lo and e >= hi:
                        break
                else:
                    pieces.append((k, s, e))
                    if _covers(pieces, lo, hi):
                        break
            prev()
        if pieces is not None:
            for k, s, e in reversed(pieces):
                ekey = k[:4] + k[30:]
                ent = fetched.get(ekey)
                if ent is None:
                    raw = entries.get(ekey)
                    if raw is None:
                        return None                     # promoted since step 1: start over
                    try:
                        ent = R.decode_entry(ekey, raw)
                    except R.RecordError as exc:
                        raise JournalCorrupt(f"entry {K.parse_entry_key(ekey)[1]}", v.name, exc) from None
                    fetched[ekey] = ent
                _, _, eoff, elen, _, mv = ent
                a = base + (s if s > lo else lo)
                b = base + (e if e < hi else hi)
                if a < eoff or b > eoff + elen:
                    raise JournalCorrupt(_index_name(k, d), v.name, "index record does not match its entry")
                buf[a - offset:b - offset] = mv[_HEAD + a - eoff:_HEAD + b - eoff]
        block += 1
    return bytes(buf)


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
