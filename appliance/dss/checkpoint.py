"""Checkpoint queries: recoverable checkpoints are those at or after the floor whose append is durable."""
from __future__ import annotations

from . import keys as K
from . import records as R
from .errors import JournalCorrupt
from .pos import Checkpoint
from .state import VpgState


def listing(j, v: VpgState, since: float | None, tag_only: bool) -> list[Checkpoint]:
    out = []
    it = j._db.iter()
    it.seek(K.checkpoint_key_bound(v.id, v.pins.floor))
    hi = K.checkpoint_key_range(v.id)[1]
    while it.valid():
        key = it.key()
        if key >= hi:
            break
        if key not in v.pending:
            cp = decode(v, key, it.value())
            if (since is None or cp.time >= since) and (not tag_only or cp.tag is not None):
                out.append(cp)
        it.next()
    return out


def first(j, v: VpgState) -> Checkpoint | None:
    """The oldest recoverable checkpoint."""
    it = j._db.iter()
    it.seek(K.checkpoint_key_bound(v.id, v.pins.floor))
    hi = K.checkpoint_key_range(v.id)[1]
    while it.valid() and it.key() < hi:
        if it.key() not in v.pending:
            return decode(v, it.key(), it.value())
        it.next()
    return None


def latest(j, v: VpgState, tagged: bool) -> Checkpoint | None:
    lo, hi = K.checkpoint_key_bound(v.id, v.pins.floor), K.checkpoint_key_range(v.id)[1]
    it = j._db.iter()
    it.seek_for_prev(hi)
    while it.valid() and it.key() >= lo:
        if it.key() not in v.pending:
            cp = decode(v, it.key(), it.value())
            if not tagged or cp.tag is not None:
                return cp
        it.prev()
    return None


def decode(v: VpgState, key: bytes, value: bytes) -> Checkpoint:
    _, pos, cp_id = K.parse_checkpoint_key(key)
    try:
        t, tag = R.decode_checkpoint(key, value)
    except R.RecordError as exc:
        raise JournalCorrupt(f"checkpoint {cp_id} at {pos}", v.name, exc) from None
    return Checkpoint(cp_id, pos, t, tag)
