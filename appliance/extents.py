"""Allocated extents of sparse files, for delta sync (docs/FORMAT.md, "Delta sync").

A hole of a sparse file reads as zeros, so a range that is a hole needs no read to be hashed:
its blocks hash as the zero block (``kernels.zero_block_hash``). ``data_extents`` asks the
file system with ``lseek(SEEK_DATA / SEEK_HOLE)``; where it cannot tell (no SEEK_DATA on this
platform or file system) the answer is ``None`` and callers read everything, as before. File
systems without real hole tracking answer "all data" (Linux's generic fallback), which is
also correct, just not faster.

Only the file position of ``fd`` moves: callers that share a descriptor must use
``pread``/``pwrite`` (or mmap), as the VRA and the DSS do.
"""
from __future__ import annotations

import errno
import mmap
import os

import numpy as np

SEEK_DATA = getattr(os, "SEEK_DATA", None)
SEEK_HOLE = getattr(os, "SEEK_HOLE", None)
_UNSUPPORTED = {errno.EINVAL, getattr(errno, "EOPNOTSUPP", errno.EINVAL), getattr(errno, "ENOTSUP", errno.EINVAL)}


def data_extents(fd: int, offset: int, length: int) -> list[tuple[int, int]] | None:
    """The parts of ``[offset, offset + length)`` of the open file ``fd`` that may hold data, as
    ascending, disjoint ``(start, end)`` byte ranges clipped to the range; everything else
    (holes, and whatever lies past the end of the file) reads as zeros. ``None``: the file
    system cannot tell, read the whole range."""
    if SEEK_DATA is None or SEEK_HOLE is None:
        return None
    end = offset + length
    out: list[tuple[int, int]] = []
    pos = offset
    try:
        while pos < end:
            try:
                start = os.lseek(fd, pos, SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:       # no data at or after pos (or pos past EOF)
                    break
                raise
            if start >= end:
                break
            stop = os.lseek(fd, start, SEEK_HOLE)  # EOF counts as a hole
            out.append((start, min(stop, end)))
            pos = stop
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return None
        raise
    return out


def block_runs(extents, offset: int, length: int, block_size: int) -> list[tuple[int, int]]:
    """Blocks of ``[offset, offset + length)`` (``offset`` a multiple of ``block_size``) that
    overlap any of ``extents``, as ``(first, count)`` runs numbered from ``offset``; merged and
    ascending. Blocks not in a run lie wholly in holes."""
    nblocks = -(-length // block_size)
    out: list[list[int]] = []
    for a, b in extents:
        a, b = max(a, offset), min(b, offset + length)
        if a >= b:
            continue
        first = (a - offset) // block_size
        last = min(nblocks, -(-(b - offset) // block_size))      # exclusive
        if out and first <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][0] + out[-1][1], last) - out[-1][0]
        else:
            out.append([first, last - first])
    return [(f, c) for f, c in out]


def mask_runs(mask) -> list[tuple[int, int]]:
    """(start, count) of each run of True in the bool array ``mask``, ascending."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], np.asarray(mask, dtype=np.int8), [0]))))
    return list(zip(edges[::2].tolist(), (edges[1::2] - edges[::2]).tolist()))


def index_runs(idx) -> list[tuple[int, int]]:
    """Runs of consecutive ints in an ascending sequence: [(start, count), ...]."""
    out: list[list[int]] = []
    for i in (int(x) for x in idx):
        if out and out[-1][0] + out[-1][1] == i:
            out[-1][1] += 1
        else:
            out.append([i, 1])
    return [(a, b) for a, b in out]


def file_hashes(fd: int, offset: int, length: int, block_size: int, buf=None):
    """Hole-aware ``kernels.block_hashes`` of ``[offset, offset + length)`` of the open file
    ``fd`` (``offset`` a multiple of ``block_size``): ``(hashes uint64[nblocks], hole
    bool[nblocks], bytes read)``. Only the blocks that overlap data extents are read and
    hashed; a block wholly in a hole or past the end of the file is zeros and gets the
    zero-block hash, with ``hole`` set. Without hole information everything is read (``hole``
    all False). The result equals ``kernels.block_hashes`` of the bytes read plainly.

    The data is hashed where it lies in the page cache, through a read-only mapping of the
    file up to its current end (a third of the time of copying it out with ``pread`` first);
    what lies past the end reads as zeros, and where the file cannot be mapped it is read into
    ``buf`` (a writable buffer of at least ``length`` bytes, or a new one). The file must not
    shrink while this runs (disk and replica files never do)."""
    from appliance import kernels
    nb = -(-length // block_size)
    ext = data_extents(fd, offset, length)
    if ext is None:
        ext = [(offset, offset + length)]
    hashes = np.full(nb, kernels.zero_block_hash(block_size), dtype=np.uint64)
    hole = np.ones(nb, dtype=bool)
    runs = block_runs(ext, offset, length, block_size)
    if not runs:
        return hashes, hole, 0
    lo = offset + runs[0][0] * block_size
    hi = min(offset + length, offset + (runs[-1][0] + runs[-1][1]) * block_size)
    end = min(hi, os.fstat(fd).st_size)             # mapped: [start, end)
    start = lo - lo % mmap.ALLOCATIONGRANULARITY
    mm = view = None
    if end > lo:
        try:
            mm = mmap.mmap(fd, end - start, access=mmap.ACCESS_READ, offset=start)
        except (OSError, ValueError):
            mm = None                               # cannot be mapped: read it
        else:
            if hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(mm)
    nread = 0
    try:
        for s, c in runs:
            a, b = offset + s * block_size, min(offset + length, offset + (s + c) * block_size)
            if view is not None and b <= end:
                part = view[a - start:b - start]
            else:
                part = memoryview(buf if buf is not None and len(buf) >= b - a else bytearray(b - a))[:b - a]
                got = os.preadv(fd, [part], a) if a < end or view is None else 0
                if got < b - a:                     # past the file's end: zeros
                    part[got:] = bytes(b - a - got)
            hashes[s:s + c] = kernels.block_hashes(part, block_size)
            hole[s:s + c] = False
            nread += b - a
            part.release()
    finally:
        if view is not None:
            view.release()
        if mm is not None:
            try:
                mm.close()
            except BufferError:                     # an export still alive: the GC closes it
                pass
    return hashes, hole, nread
