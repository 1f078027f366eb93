"""Journal keys: paired ``format_*`` / ``parse_*`` functions, one pair per key kind.

All key integers are big-endian so that the byte order of keys is their logical order
(VPG, then position; or VPG, disk, block, then position). Layouts: docs/FORMAT.md, "Journal (DSS)".

Column family ``default`` (meta): ``F`` format, ``V`` VPG, ``S`` state, ``D`` disk, ``C`` checkpoint,
``P`` source progress.
Column family ``entries``: one key per entry, ``vpg_id | generation | lsn``.
Column family ``index``: one key per 4 KiB block an entry touches,
``vpg_id | vm | disk | block | generation | lsn``.
"""
from __future__ import annotations

import struct
import uuid

from .pos import Pos

BLOCK_SHIFT = 12
BLOCK = 1 << BLOCK_SHIFT          # PIT index granularity: 4 KiB

_U32 = struct.Struct(">I")
_POS = struct.Struct(">IQ")                     # generation, lsn
_ENTRY = struct.Struct(">IIQ")                  # vpg_id, generation, lsn
_INDEX_TAIL = struct.Struct(">QIQ")             # block, generation, lsn
_INDEX = struct.Struct(">I16sHQIQ")             # vpg_id, vm, disk, block, generation, lsn
_DISK = struct.Struct(">cI16sH")                # 'D', vpg_id, vm, disk
_CHECKPOINT = struct.Struct(">cIIQQ")           # 'C', vpg_id, generation, lsn, checkpoint id
assert _ENTRY.size == 16 and _INDEX.size == 42 and _DISK.size == 23 and _CHECKPOINT.size == 25

ENTRY_KEY_SIZE = _ENTRY.size
INDEX_KEY_SIZE = _INDEX.size
MAX_POS = Pos(0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF)

FORMAT_KEY = b"F"


# -- VM ids ----------------------------------------------------------------------------
def format_vm(vm: str) -> bytes:
    """The 16 raw bytes of a VM's instance UUID (any form ``uuid.UUID`` accepts)."""
    return uuid.UUID(vm).bytes


def parse_vm(raw: bytes) -> str:
    return str(uuid.UUID(bytes=raw))


# -- meta: VPG record, state, disks, checkpoints --------------------------------------
def format_vpg_key(name: str) -> bytes:
    return b"V" + name.encode()


def parse_vpg_key(key: bytes) -> str:
    assert key[:1] == b"V", key
    return key[1:].decode()


VPG_KEY_RANGE = (b"V", b"W")


def format_state_key(vpg_id: int) -> bytes:
    return b"S" + _U32.pack(vpg_id)


def parse_state_key(key: bytes) -> int:
    assert key[:1] == b"S" and len(key) == 5, key
    return _U32.unpack_from(key, 1)[0]


def format_disk_key(vpg_id: int, vm: bytes, disk: int) -> bytes:
    return _DISK.pack(b"D", vpg_id, vm, disk)


def parse_disk_key(key: bytes) -> tuple[int, bytes, int]:
    tag, vpg_id, vm, disk = _DISK.unpack(key)
    assert tag == b"D", key
    return vpg_id, vm, disk


def disk_key_range(vpg_id: int) -> tuple[bytes, bytes]:
    return b"D" + _U32.pack(vpg_id), b"D" + _U32.pack(vpg_id + 1)


def format_checkpoint_key(vpg_id: int, pos: Pos, cp_id: int) -> bytes:
    return _CHECKPOINT.pack(b"C", vpg_id, pos.generation, pos.lsn, cp_id)


def parse_checkpoint_key(key: bytes) -> tuple[int, Pos, int]:
    tag, vpg_id, gen, lsn, cp_id = _CHECKPOINT.unpack(key)
    assert tag == b"C", key
    return vpg_id, Pos(gen, lsn), cp_id


def checkpoint_key_bound(vpg_id: int, pos: Pos) -> bytes:
    """Sorts before every checkpoint key of ``vpg_id`` at ``pos`` and after those before ``pos``."""
    return b"C" + _U32.pack(vpg_id) + _POS.pack(pos.generation, pos.lsn)


def checkpoint_key_range(vpg_id: int) -> tuple[bytes, bytes]:
    return b"C" + _U32.pack(vpg_id), b"C" + _U32.pack(vpg_id + 1)


def format_progress_key(vpg_id: int, source: str) -> bytes:
    return b"P" + _U32.pack(vpg_id) + source.encode()


def parse_progress_key(key: bytes) -> tuple[int, str]:
    assert key[:1] == b"P", key
    return _U32.unpack_from(key, 1)[0], key[5:].decode()


def progress_key_range(vpg_id: int) -> tuple[bytes, bytes]:
    return b"P" + _U32.pack(vpg_id), b"P" + _U32.pack(vpg_id + 1)


# -- entries ------------------------------------------------------------------------------
def format_entry_key(vpg_id: int, pos: Pos) -> bytes:
    return _ENTRY.pack(vpg_id, pos.generation, pos.lsn)


def parse_entry_key(key: bytes) -> tuple[int, Pos]:
    vpg_id, gen, lsn = _ENTRY.unpack(key)
    return vpg_id, Pos(gen, lsn)


def vpg_prefix(vpg_id: int) -> bytes:
    """The first 4 bytes of every entries and index key of a VPG."""
    return _U32.pack(vpg_id)


def vpg_key_range(vpg_id: int) -> tuple[bytes, bytes]:
    """[lo, hi) covering every entries or index key of a VPG."""
    return _U32.pack(vpg_id), _U32.pack(vpg_id + 1)


# -- index --------------------------------------------------------------------------------
def format_index_key(vpg_id: int, vm: bytes, disk: int, block: int, pos: Pos) -> bytes:
    return _INDEX.pack(vpg_id, vm, disk, block, pos.generation, pos.lsn)


def parse_index_key(key: bytes) -> tuple[int, bytes, int, int, Pos]:
    vpg_id, vm, disk, block, gen, lsn = _INDEX.unpack(key)
    return vpg_id, vm, disk, block, Pos(gen, lsn)


def index_disk_prefix(vpg_id: int, vm: bytes, disk: int) -> bytes:
    """The first 22 bytes of every index key of one disk; append ``format_index_tail``."""
    return _INDEX.pack(vpg_id, vm, disk, 0, 0, 0)[:22]


def format_index_tail(block: int, pos: Pos) -> bytes:
    return _INDEX_TAIL.pack(block, pos.generation, pos.lsn)


def index_entry_key(index_key: bytes) -> bytes:
    """The entries key that an index key points to (``vpg_id | generation | lsn``)."""
    return index_key[:4] + index_key[30:42]
