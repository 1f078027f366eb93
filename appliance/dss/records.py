"""Journal record values: byte layouts and their checksums (docs/FORMAT.md, "Journal (DSS)").

Every value starts with an 8-byte little-endian XXH3-64 (seed 0) of the record's key followed
by the value's bytes 8..end, so a value that was damaged, or stored under another key, fails
its check. ``unseal``/``decode_*`` raise ``RecordError``; callers wrap it into
``JournalCorrupt`` naming the record and the VPG.
"""
from __future__ import annotations

import json
import struct
from typing import NamedTuple

from xxhash import xxh3_64

from .pos import Pos

VERSION = 1                 # of each record layout that carries a version field
FORMAT_MAGIC = b"TDMDSS01"
FORMAT_VERSION = 3          # of the journal as a whole (the format record): 2 adds block hashes
FORMAT_VERSIONS_READ = (1, 2, 3)    # to index records, 3 entry data in segment files; older
                                    # journals open, are upgraded, and their records stay readable

_CHECK = struct.Struct("<Q")
# checksum, version, flags, disk, length, offset, time, vm
ENTRY_HEADER = struct.Struct("<QBBHIQd16s")
# after the header of an entry with FLAG_SEGMENT: segment, reserved, offset in it, XXH3-64 of the data
ENTRY_REF = struct.Struct("<IIQQ")
# checksum, start, end: the bytes [start, end) of the 4 KiB block that the entry writes
INDEX_VALUE = struct.Struct("<QHH")
# the same, then the block's hash (kernels.block_hashes, HASH_VERSION 1) when the entry writes
# the whole block (start 0, end 4096): format version 2
INDEX_HASHED = struct.Struct("<QHHQ")
# checksum, version, flags (bit 0: tagged), tag length, time; then the UTF-8 tag
CHECKPOINT_VALUE = struct.Struct("<QBBHd")
# checksum, version, sealed generation, durable, promoted, promoting (gen, lsn each), entries, bytes
STATE_VALUE = struct.Struct("<QB3xIIQIQIQQQ")
# checksum, version, capacity
DISK_VALUE = struct.Struct("<QB7xQ")
# checksum, version, vpg_id; then the settings as UTF-8 JSON
VPG_VALUE = struct.Struct("<QB3xI")
# checksum, magic, version, next vpg id
FORMAT_VALUE = struct.Struct("<Q8sII")
assert ENTRY_HEADER.size == 48 and ENTRY_REF.size == 24 and INDEX_VALUE.size == 12 and CHECKPOINT_VALUE.size == 20
assert INDEX_HASHED.size == 20
assert STATE_VALUE.size == 68 and DISK_VALUE.size == 24 and VPG_VALUE.size == 16 and FORMAT_VALUE.size == 24

ENTRY_HEADER_SIZE = ENTRY_HEADER.size
ENTRY_REF_SIZE = ENTRY_HEADER.size + ENTRY_REF.size
FLAG_TAGGED = 1             # checkpoint flags
FLAG_SEGMENT = 1            # entry flags: the data is in a segment file (format version 3)


class SegmentRef(NamedTuple):
    """Where an entry's data is (``segments.Segments.data`` reads it)."""
    seq: int            # the segment
    offset: int         # where the data starts in it
    digest: int         # XXH3-64 of the data


class RecordError(ValueError):
    """A stored value failed its checksum or does not parse."""


def checksum(key: bytes, *parts) -> int:
    h = xxh3_64(key)
    for p in parts:
        h.update(p)
    return h.intdigest()


def seal(key: bytes, body: bytes) -> bytes:
    return _CHECK.pack(checksum(key, body)) + body


def unseal(key: bytes, value: bytes | None, size: int = 8) -> memoryview:
    """Verify ``value`` (at least ``size`` bytes) against ``key``; return it as a memoryview."""
    if value is None:
        raise RecordError("missing")
    if len(value) < size:
        raise RecordError(f"{len(value)} bytes, expected at least {size}")
    mv = memoryview(value)
    h = xxh3_64(key)
    h.update(mv[8:])
    if h.intdigest() != _CHECK.unpack_from(value)[0]:
        raise RecordError("checksum mismatch")
    return mv


# -- entries ----------------------------------------------------------------------------
def encode_entry(key: bytes, vm: bytes, disk: int, offset: int, data, time: float) -> bytes:
    """An entry with its data inline (format versions 1 and 2; still written for empty entries)."""
    head = ENTRY_HEADER.pack(0, VERSION, 0, disk, len(data), offset, time, vm)
    c = checksum(key, memoryview(head)[8:], data)
    return b"".join((_CHECK.pack(c), head[8:], data))


def encode_entry_ref(key: bytes, vm: bytes, disk: int, offset: int, length: int, time: float,
                     seq: int, seg_offset: int, digest: int) -> bytes:
    """An entry whose ``length`` bytes of data are at ``seg_offset`` of segment ``seq``."""
    head = ENTRY_HEADER.pack(0, VERSION, FLAG_SEGMENT, disk, length, offset, time, vm)
    return seal(key, head[8:] + ENTRY_REF.pack(seq, 0, seg_offset, digest))


def decode_entry(key: bytes, value: bytes | None):
    """-> (vm, disk, offset, length, time, data): ``data`` a memoryview of the inline data, or a
    ``SegmentRef`` (``Segments.data`` gives the bytes either way)."""
    mv = unseal(key, value, ENTRY_HEADER_SIZE)
    _, version, flags, disk, length, offset, time, vm = ENTRY_HEADER.unpack_from(value)
    if version != VERSION:
        raise RecordError(f"version {version}")
    if flags & FLAG_SEGMENT:
        if len(value) != ENTRY_REF_SIZE:
            raise RecordError(f"a segment reference of {len(value)} bytes")
        seq, _, seg_offset, digest = ENTRY_REF.unpack_from(value, ENTRY_HEADER_SIZE)
        return vm, disk, offset, length, time, SegmentRef(seq, seg_offset, digest)
    if len(value) != ENTRY_HEADER_SIZE + length:
        raise RecordError(f"length {length} of {len(value)} bytes")
    return vm, disk, offset, length, time, mv[ENTRY_HEADER_SIZE:]


def peek_entry_time(value: bytes) -> float:
    """The entry time, without verification (callers verify before using the entry)."""
    return ENTRY_HEADER.unpack_from(value)[6]


# -- index ------------------------------------------------------------------------------
def encode_index(key: bytes, start: int, end: int, block_hash: int | None = None) -> bytes:
    """An index record; ``block_hash`` only for a whole block (start 0, end 4096)."""
    if block_hash is None:
        body = INDEX_VALUE.pack(0, start, end)[8:]
    else:
        body = INDEX_HASHED.pack(0, start, end, block_hash)[8:]
    return _CHECK.pack(checksum(key, body)) + body


def decode_index(key: bytes, value: bytes) -> tuple[int, int]:
    """(start, end) of a verified index record (either layout)."""
    return decode_index_hash(key, value)[:2]


def decode_index_hash(key: bytes, value: bytes) -> tuple[int, int, int | None]:
    """(start, end, block hash or None) of a verified index record."""
    unseal(key, value, INDEX_VALUE.size)
    if len(value) == INDEX_VALUE.size:
        _, start, end = INDEX_VALUE.unpack(value)
        return start, end, None
    if len(value) == INDEX_HASHED.size:
        _, start, end, h = INDEX_HASHED.unpack(value)
        if (start, end) != (0, 4096):
            raise RecordError(f"a block hash on a record of bytes [{start}, {end}) of its block")
        return start, end, h
    raise RecordError(f"{len(value)} bytes")


# -- checkpoints ------------------------------------------------------------------------------
def encode_checkpoint(key: bytes, time: float, tag: str | None) -> bytes:
    raw = (tag or "").encode()
    flags = FLAG_TAGGED if tag is not None else 0
    return seal(key, CHECKPOINT_VALUE.pack(0, VERSION, flags, len(raw), time)[8:] + raw)


def decode_checkpoint(key: bytes, value: bytes) -> tuple[float, str | None]:
    unseal(key, value, CHECKPOINT_VALUE.size)
    _, version, flags, n, time = CHECKPOINT_VALUE.unpack_from(value)
    if version != VERSION or len(value) != CHECKPOINT_VALUE.size + n:
        raise RecordError(f"version {version}, tag length {n}")
    tag = bytes(value[CHECKPOINT_VALUE.size:]).decode() if flags & FLAG_TAGGED else None
    return time, tag


# -- VPG state ---------------------------------------------------------------------------------
def _pos(p: Pos | None) -> tuple[int, int]:
    return (p.generation, p.lsn) if p is not None else (0, 0)


def _unpos(gen: int, lsn: int) -> Pos | None:
    return Pos(gen, lsn) if (gen, lsn) != (0, 0) else None


def encode_state(key: bytes, sealed: int, durable, promoted, promoting, entries: int, nbytes: int) -> bytes:
    body = STATE_VALUE.pack(0, VERSION, sealed, *_pos(durable), *_pos(promoted), *_pos(promoting),
                            entries, nbytes)[8:]
    return seal(key, body)


def decode_state(key: bytes, value: bytes):
    """-> (sealed generation, durable, promoted, promoting, entries, bytes); positions may be None."""
    unseal(key, value, STATE_VALUE.size)
    _, version, sealed, dg, dl, pg, pl, qg, ql, entries, nbytes = STATE_VALUE.unpack(value)
    if version != VERSION:
        raise RecordError(f"version {version}")
    return sealed, _unpos(dg, dl), _unpos(pg, pl), _unpos(qg, ql), entries, nbytes


# -- source progress ------------------------------------------------------------------------------
# checksum, version, seq
PROGRESS_VALUE = struct.Struct("<QB7xQ")


def encode_progress(key: bytes, seq: int) -> bytes:
    return seal(key, PROGRESS_VALUE.pack(0, VERSION, seq)[8:])


def decode_progress(key: bytes, value: bytes) -> int:
    unseal(key, value, PROGRESS_VALUE.size)
    return PROGRESS_VALUE.unpack(value)[2]


# -- disks, VPGs, format -------------------------------------------------------------------------
def encode_disk(key: bytes, capacity: int) -> bytes:
    return seal(key, DISK_VALUE.pack(0, VERSION, capacity)[8:])


def decode_disk(key: bytes, value: bytes) -> int:
    unseal(key, value, DISK_VALUE.size)
    _, version, capacity = DISK_VALUE.unpack(value)
    return capacity


def encode_vpg(key: bytes, vpg_id: int, settings: dict) -> bytes:
    return seal(key, VPG_VALUE.pack(0, VERSION, vpg_id)[8:] + json.dumps(settings, sort_keys=True).encode())


def decode_vpg(key: bytes, value: bytes) -> tuple[int, dict]:
    unseal(key, value, VPG_VALUE.size)
    _, version, vpg_id = VPG_VALUE.unpack_from(value)
    return vpg_id, json.loads(bytes(value[VPG_VALUE.size:]))


def encode_format(key: bytes, next_vpg_id: int) -> bytes:
    return seal(key, FORMAT_VALUE.pack(0, FORMAT_MAGIC, FORMAT_VERSION, next_vpg_id)[8:])


def decode_format(key: bytes, value: bytes) -> tuple[int, int]:
    """(next vpg id, format version) of a journal this code can open."""
    unseal(key, value, FORMAT_VALUE.size)
    _, magic, version, next_id = FORMAT_VALUE.unpack(value)
    if magic != FORMAT_MAGIC or version not in FORMAT_VERSIONS_READ:
        raise RecordError(f"magic {magic!r} version {version}: not a Tidemark journal of version "
                          f"{' or '.join(map(str, FORMAT_VERSIONS_READ))}")
    return next_id, version
