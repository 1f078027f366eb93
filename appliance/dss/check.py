"""check(): verify every record of one VPG and the consistency between them.

* the VPG, state, disk and checkpoint records pass their checksums; checkpoints lie between the
  recoverable floor and the durable position;
* every entry passes its checksum, its data (inline, or in a segment file) passes its own, lies after the promoted position and at or before the
  durable one, follows its predecessor (lsn + 1, or lsn 1 of a newer generation), writes a
  registered disk within its capacity, and has one matching index record per block it writes;
* every index record passes its checksum and points at an entry that writes that block range;
  the hash a whole block's record carries is that of the entry's bytes there;
* the entry and byte counters of the state record match what is stored.

Memory stays flat: the cross checks are point lookups, not in-memory maps.
"""
from __future__ import annotations

from appliance.kernels import block_hashes

from . import keys as K
from . import records as R
from .pos import Pos
from .state import VpgState, entry_cost

MAX_PROBLEMS = 1000


def check(j, v: VpgState) -> list[str]:
    problems: list[str] = []

    def bad(msg: str) -> bool:
        if len(problems) < MAX_PROBLEMS:
            problems.append(msg)
        return False

    _check_meta(j, v, bad)
    lo, hi = K.vpg_key_range(v.id)
    # entries
    entries = nbytes = 0
    prev: Pos | None = v.promoted
    it = j._entries.iter()
    it.seek(lo)
    while it.valid() and it.key() < hi:
        key = it.key()
        _, pos = K.parse_entry_key(key)
        entries += 1
        try:
            vmb, disk, offset, length, _, src = R.decode_entry(key, it.value())
            if v.segs.data(src, length) is None:
                raise R.RecordError(f"its segment {src.seq} was dropped")
        except (R.RecordError, ValueError, OSError) as exc:
            bad(f"entry {pos}: {exc}")
            nbytes = None                       # a corrupt entry's size is unknown: counters not compared
            prev = pos
            it.next()
            continue
        if nbytes is not None:
            nbytes += entry_cost(length, offset)
        if v.promoted is not None and pos <= v.promoted:
            bad(f"entry {pos}: at or before the promoted position {v.promoted}")
        if v.durable is None or pos > v.durable:
            bad(f"entry {pos}: after the durable position {v.durable}")
        if prev is not None and not (Pos(prev.generation, prev.lsn + 1) == pos
                                     or (pos.generation > prev.generation and pos.lsn == 1)):
            bad(f"entry {pos}: does not follow {prev}")
        prev = pos
        d = v.disks.get((vmb, disk))
        if d is None:
            bad(f"entry {pos}: disk {disk} of VM {K.parse_vm(vmb)} is not registered")
            it.next()
            continue
        if offset + length > d.capacity:
            bad(f"entry {pos}: {length} bytes at {offset} beyond the disk's {d.capacity} bytes")
        end = offset + length
        if length:
            first, last = offset >> K.BLOCK_SHIFT, (end - 1) >> K.BLOCK_SHIFT
            for b in range(first, last + 1):
                base = b << K.BLOCK_SHIFT
                want = (offset - base if b == first else 0, end - base if b == last else K.BLOCK)
                ikey = d.prefix + K.format_index_tail(b, pos)
                try:
                    got = R.decode_index(ikey, j._index.get(ikey))
                except R.RecordError as exc:
                    bad(f"entry {pos}: index record of block {b}: {exc}")
                    continue
                if got != want:
                    bad(f"entry {pos}: index record of block {b} says bytes {got}, the entry writes {want}")
        it.next()
    del it
    if nbytes is not None and (entries, nbytes) != (v.entries, v.nbytes):
        bad(f"state record counts {v.entries} entries / {v.nbytes} bytes, the journal holds "
            f"{entries} / {nbytes}")
    # index records
    it = j._index.iter()
    it.seek(lo)
    while it.valid() and it.key() < hi:
        key = it.key()
        _, vmb, disk, block, pos = K.parse_index_key(key)
        name = f"index {pos} block {block} of disk {disk} of VM {K.parse_vm(vmb)}"
        try:
            s, e, h = R.decode_index_hash(key, it.value())
        except R.RecordError as exc:
            bad(f"{name}: {exc}")
            it.next()
            continue
        ekey = K.index_entry_key(key)
        raw = j._entries.get(ekey)
        if raw is None:
            bad(f"{name}: its entry is missing")
        else:
            try:
                evm, edisk, offset, length, _, data = R.decode_entry(ekey, raw)
                if h is not None:
                    data = v.segs.data(data, length)
            except (R.RecordError, ValueError, OSError):
                pass                    # reported with the entries
            else:
                base = block << K.BLOCK_SHIFT
                if (evm, edisk) != (vmb, disk) or base + s < offset or base + e > offset + length or s >= e:
                    bad(f"{name}: bytes [{s}, {e}) do not match its entry")
                elif h is not None and data is not None:
                    at = base - offset
                    if int(block_hashes(memoryview(data)[at:at + K.BLOCK], K.BLOCK)[0]) != h:
                        bad(f"{name}: its block hash does not match its entry's data")
        it.next()
    return problems


def _check_meta(j, v: VpgState, bad) -> None:
    key = K.format_vpg_key(v.name)
    for what, k, fn in (("VPG record", key, R.decode_vpg), ("state record", v.state_key, R.decode_state)):
        try:
            fn(k, j._db.get(k))
        except R.RecordError as exc:
            bad(f"{what}: {exc}")
    for lo, hi, what in (K.disk_key_range(v.id) + ("disk",), K.checkpoint_key_range(v.id) + ("checkpoint",)):
        it = j._db.iter()
        it.seek(lo)
        while it.valid() and it.key() < hi:
            k = it.key()
            try:
                if what == "disk":
                    R.decode_disk(k, it.value())
                else:
                    R.decode_checkpoint(k, it.value())
                    _, pos, cp_id = K.parse_checkpoint_key(k)
                    if v.promoted is not None and pos < v.promoted:
                        bad(f"checkpoint {cp_id} at {pos}: before the promoted position {v.promoted}")
                    if v.durable is None or pos > v.durable:
                        bad(f"checkpoint {cp_id} at {pos}: after the durable position {v.durable}")
            except R.RecordError as exc:
                bad(f"{what} record {k.hex()}: {exc}")
            it.next()
