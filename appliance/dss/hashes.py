"""image_hashes(): per-4 KiB block hashes of a disk image at the durable position, for delta sync.

The image is the replica file overlaid by the journal's entries (``reader.py``). Reading it
through the point-in-time reader costs a Python pass per block; here the index answers instead:
the index record of a block an entry writes whole carries the block's hash (format version 2,
``append.py``), so one forward scan over the range's index keys, parsed with NumPy, gives every
block whose newest version at the position is a whole-block write, without reading an entry.
What a scan found is kept in memory per 16 MiB step and kept up to date by every append
(``hashcache.py``), so the next delta sync of the disk reads no index at all for it.
What is left comes from elsewhere:

* blocks no entry at or before the position touches: the replica file, hashed in place (only
  its data extents; holes are zero blocks, reported as such so the caller can skip them);
* blocks whose newest version wrote part of the block, or was journaled by format version 1
  (no hash): read through the point-in-time reader, then hashed.

Consistency with promotion is the reader's argument (``reader.py``): the position is pinned
before the index scan, so promotion only ever applies entries at or before it, and it writes
the replica before it deletes what it applied. A block with no version in the scan therefore
reads the same from the replica at any moment of a promotion, and a block with one is answered
from the index record's hash, which is the content of that version whatever happens to the
entry afterwards. The pin also holds a recovery commit (which clears the cache) back until the
answer is complete.
"""
from __future__ import annotations

import struct
from itertools import compress

import numpy as np
from rocksdict import ReadOptions

from appliance import kernels
from appliance.extents import file_hashes, mask_runs

from . import keys as K
from .errors import JournalCorrupt
from .hashcache import NONE, PART, STEP_BLOCKS as _STEP, WHOLE, Step
from .pos import ZERO, Pos
from .reader import _index_name, check_range, read_at

_Q = struct.Struct(">Q")
_BLOCK = K.BLOCK
_SHIFT = K.BLOCK_SHIFT
_KEY = np.dtype([("prefix", "V22"), ("block", ">u8"), ("gen", ">u4"), ("lsn", ">u8")])
_HASHED = np.dtype([("check", "<u8"), ("start", "<u2"), ("end", "<u2"), ("hash", "<u8")])
_PLAIN = np.dtype([("check", "<u8"), ("start", "<u2"), ("end", "<u2")])
assert _KEY.itemsize == K.INDEX_KEY_SIZE and _HASHED.itemsize == 20 and _PLAIN.itemsize == 12


def image_hashes(j, vpg: str, vm: str, disk: int, offset: int, length: int
                 ) -> tuple[Pos, np.ndarray, np.ndarray]:
    """``(pos, hashes, hole)`` for ``[offset, offset + length)`` (``offset`` a multiple of
    4 KiB): the durable position hashed, one ``kernels.block_hashes`` value per 4 KiB block (the
    range's last partial block zero-padded, as read), and per block whether it is a replica hole that no
    entry touches (its hash is then the zero block's)."""
    v = j._vpg(vpg)
    d = j._disk(v, vm, disk)
    check_range(d, offset, length)
    if offset % _BLOCK:
        raise ValueError(f"offset {offset} is not a multiple of {_BLOCK}")
    nb = -(-length // _BLOCK)
    pin = v.durable or ZERO
    v.pins.pin(pin)            # no recovery commit until unpinned; promotion stays at or before it
    try:
        return _hashes(j, v, d, offset, length, nb)
    finally:
        v.pins.unpin(pin)


def _hashes(j, v, d, offset: int, length: int, nb: int):
    """The blocks' kinds at the durable position from the cache (``hashcache.py``), scanning the
    index for the steps it does not hold, then the hashes: WHOLE from there, NONE from the
    replica's pages (holes: zero blocks), PART through the reader."""
    cache = v.hashes
    dkey = (d.vmb, d.disk)
    first = offset >> _SHIFT
    steps = range(first // _STEP, (first + nb - 1) // _STEP + 1)
    with cache.lock:
        pos = v.durable or ZERO                       # >= the pinned position
        have = {s: cache.get(dkey, s) for s in steps}
        todo = [s for s in steps if have[s] is None]
        token = cache.start(dkey, todo) if todo else None
    if todo:
        built = {}
        try:
            dblocks = -(-d.capacity // _BLOCK)
            for s in todo:
                built[s] = _scan(j, v, d, s * _STEP, min(_STEP, dblocks - s * _STEP), pos)
        finally:
            cache.finish(dkey, token, built)
        have.update(built)
    kind = np.zeros(nb, dtype=np.uint8)
    hashes = np.zeros(nb, dtype=np.uint64)
    for s in steps:
        st = have[s]
        if st.kind is None:
            continue
        lo = s * _STEP
        a, b = max(first, lo), min(first + nb, lo + _STEP)
        kind[a - first:b - first] = st.kind[a - lo:b - lo]
        hashes[a - first:b - first] = st.hash[a - lo:b - lo]
    if length % _BLOCK and kind[-1] != NONE:
        kind[-1] = PART          # the range ends inside that block: hashed zero-padded, as read
    hole = np.zeros(nb, dtype=bool)
    # blocks no entry at or before pos touches: the replica's bytes (holes: zero blocks)
    for s, c in mask_runs(kind == NONE):
        off = offset + s * _BLOCK
        n = min(c * _BLOCK, offset + length - off)
        hashes[s:s + c], hole[s:s + c], _ = file_hashes(d.fd, off, n, _BLOCK)
    # blocks whose newest version wrote part of them (or carries no hash): the reader
    for s, c in mask_runs(kind == PART):
        off = offset + s * _BLOCK
        n = min(c * _BLOCK, offset + length - off)
        hashes[s:s + c] = kernels.block_hashes(read_at(j, v, d, off, n, pos), _BLOCK)
    return pos, hashes, hole


def _scan(j, v, d, first: int, nb: int, pos: Pos) -> Step:
    """Blocks ``[first, first + nb)`` (within the disk) at ``pos`` from one forward scan of the
    index: per block its newest version at or before ``pos``, NONE, WHOLE (with its hash) or
    PART. Python touches each record once to collect it, then only C-level loops (map, join,
    compress): parsing and checking are NumPy and the checksum kernel over all at once."""
    ro = ReadOptions()
    ro.set_iterate_upper_bound(d.prefix + _Q.pack(first + nb))
    keys, vals = [], []
    kadd, vadd = keys.append, vals.append
    for k, val in j._index.items(from_key=d.prefix + _Q.pack(first), read_opt=ro):
        kadd(k)
        vadd(val)
    st = Step()
    if not keys:
        return st
    n = len(keys)
    if set(map(len, keys)) != {K.INDEX_KEY_SIZE}:
        bad = next(k for k in keys if len(k) != K.INDEX_KEY_SIZE)
        raise JournalCorrupt(f"index key {bad.hex()}", v.name, "a key of the wrong length")
    kraw = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(n, K.INDEX_KEY_SIZE)
    ka = kraw.view(_KEY)[:, 0]
    blocks = ka["block"].astype(np.int64)
    gen, lsn = ka["gen"], ka["lsn"]
    at = (gen < pos.generation) | ((gen == pos.generation) & (lsn <= pos.lsn))
    idx = np.flatnonzero(at)
    if not idx.size:
        return st
    b_at = blocks[idx]
    newest = idx[np.append(b_at[1:] != b_at[:-1], True)]     # keys sort by block, pos
    hashed = _verified(kraw, vals, newest, v, d)
    st.kind = np.zeros(_STEP, dtype=np.uint8)
    st.hash = np.zeros(_STEP, dtype=np.uint64)
    st.kind[blocks[newest] - first] = PART
    sel = newest[hashed.mask]
    if sel.size:
        if not ((hashed.start == 0) & (hashed.end == _BLOCK)).all():
            i = int(sel[np.flatnonzero((hashed.start != 0) | (hashed.end != _BLOCK))[0]])
            raise JournalCorrupt(_index_name(keys[i], d), v.name,
                                 "a block hash on a record of part of its block")
        st.kind[blocks[sel] - first] = WHOLE
        st.hash[blocks[sel] - first] = hashed.hash
    return st


class _Hashed:
    """The hashed records among the selected ones: ``mask`` (per selected record: 20 bytes,
    carries a hash), and for those ``start``, ``end``, ``hash``."""
    __slots__ = ("mask", "start", "end", "hash")


def _verified(kraw: np.ndarray, vals, sel: np.ndarray, v, d) -> _Hashed:
    """Check the records ``sel`` (indices into ``kraw``, the keys as rows, and ``vals``): each
    value 12 or 20 bytes and its checksum (its first 8 bytes: XXH3 of the key and the rest,
    ``kernels.xxh3_rows`` over all of them at once)."""
    n = kraw.shape[0]
    sizes = set(map(len, vals))
    out = _Hashed()
    if sizes == {_HASHED.itemsize}:                   # the usual case: every record hashed
        groups = {_HASHED.itemsize: (np.arange(n), np.frombuffer(b"".join(vals), dtype=np.uint8))}
        is20 = np.ones(sel.size, dtype=bool)
    else:
        size = np.fromiter(map(len, vals), dtype=np.int64, count=n)
        if not np.isin(size[sel], (12, 20)).all():
            i = int(sel[np.flatnonzero(~np.isin(size[sel], (12, 20)))[0]])
            raise JournalCorrupt(_index_name(bytes(kraw[i]), d), v.name,
                                 f"index record of {int(size[i])} bytes")
        groups = {}
        for w in (12, 20):
            m = size == w
            if m.any():
                groups[w] = (np.cumsum(m) - 1,
                             np.frombuffer(b"".join(compress(vals, m.tolist())), dtype=np.uint8))
        is20 = size[sel] == 20
    for w, (row, raw) in groups.items():
        pick = sel[is20] if w == 20 else sel[~is20]
        if not pick.size:
            continue
        recs = raw.reshape(-1, w)
        if pick.size == n:                            # every record: no copies of the rows
            krows = kraw
        else:
            krows, recs = kraw[pick], recs[row[pick]]
        rv = recs.view(_HASHED if w == 20 else _PLAIN)[:, 0]
        got = kernels.xxh3_rows(np.concatenate((krows, recs[:, 8:]), axis=1))
        if not np.array_equal(got, rv["check"]):
            i = int(pick[np.flatnonzero(got != rv["check"])[0]])
            raise JournalCorrupt(_index_name(bytes(kraw[i]), d), v.name, "index record checksum mismatch")
        if w == 20:
            out.start, out.end, out.hash = rv["start"], rv["end"], rv["hash"]
    out.mask = is20
    if not is20.any():
        out.start = out.end = np.zeros(0, dtype=np.uint16)
        out.hash = np.zeros(0, dtype=np.uint64)
    return out
