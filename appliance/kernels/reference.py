"""Reference kernels: plain NumPy/Python, written for clarity, not speed.

Each function here defines what its compiled twin in ``numba_impl`` must
return, bit for bit; ``appliance.kernels.self_test`` and the tests compare the
two. They are also the fallback when numba is unusable
(``TIDEMARK_KERNELS=reference``).

Arguments are already checked and normalised by ``appliance.kernels``: ``data``
and ``bitmap`` are 1-D C-contiguous uint8 arrays, ``block_size`` is a positive
multiple of 8, bit ranges lie inside the bitmap. The block hash (XXH64, seed 0,
of each zero-padded block) is specified in the docstring of
``appliance.kernels``; this module spells it out in NumPy, vectorised over the
blocks (one step per 8-byte word position).
"""
from __future__ import annotations

import numpy as np

U64 = np.uint64
P1 = U64(0x9E3779B185EBCA87)
P2 = U64(0xC2B2AE3D27D4EB4F)
P3 = U64(0x165667B19E3779F9)
P4 = U64(0x85EBCA77C2B2AE63)
P5 = U64(0x27D4EB2F165667C5)
_MASK64 = (1 << 64) - 1


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << U64(r)) | (x >> U64(64 - r))


def _round(acc: np.ndarray, word: np.ndarray) -> np.ndarray:
    acc = acc + word * P2
    acc = _rotl(acc, 31)
    return acc * P1


def _merge(h: np.ndarray, v: np.ndarray) -> np.ndarray:
    h = h ^ _round(np.zeros_like(v), v)
    return h * P1 + P4


def _avalanche(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> U64(33))
    h = h * P2
    h = h ^ (h >> U64(29))
    h = h * P3
    return h ^ (h >> U64(32))


def _padded_words(data: np.ndarray, block_size: int) -> np.ndarray:
    """The blocks as little-endian uint64 words, shape (nblocks, block_size // 8), last block zero-padded."""
    nblocks = -(-data.size // block_size)
    padded = np.zeros(nblocks * block_size, dtype=np.uint8)
    padded[:data.size] = data
    return padded.view("<u8").reshape(nblocks, block_size // 8).astype(np.uint64)


def block_hashes(data: np.ndarray, block_size: int) -> np.ndarray:
    words = _padded_words(data, block_size)
    nblocks, nwords = words.shape
    with np.errstate(over="ignore"):
        if nwords >= 4:
            v = np.empty((nblocks, 4), dtype=np.uint64)
            v[:, 0] = U64((int(P1) + int(P2)) & _MASK64)
            v[:, 1] = P2
            v[:, 2] = 0
            v[:, 3] = U64(-int(P1) & _MASK64)
            nstripes = nwords // 4
            for s in range(nstripes):
                v = _round(v, words[:, 4 * s:4 * s + 4])
            h = _rotl(v[:, 0], 1) + _rotl(v[:, 1], 7) + _rotl(v[:, 2], 12) + _rotl(v[:, 3], 18)
            for j in range(4):
                h = _merge(h, v[:, j])
        else:
            nstripes = 0
            h = np.full(nblocks, P5, dtype=np.uint64)
        h = h + U64(block_size)
        for i in range(4 * nstripes, nwords):
            h = h ^ _round(np.zeros(nblocks, dtype=np.uint64), words[:, i])
            h = _rotl(h, 27) * P1 + P4
        return _avalanche(h).astype(np.uint64)


def compare_hashes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.flatnonzero(a != b).astype(np.int64)


def zero_blocks(data: np.ndarray, block_size: int) -> np.ndarray:
    nblocks = -(-data.size // block_size)
    padded = np.zeros(nblocks * block_size, dtype=np.uint8)
    padded[:data.size] = data
    return ~padded.reshape(nblocks, block_size).any(axis=1)


def _bits(bitmap: np.ndarray, nblocks: int) -> np.ndarray:
    return np.unpackbits(bitmap, count=nblocks, bitorder="little").astype(bool)


def bitmap_set(bitmap: np.ndarray, first_block: int, count: int) -> None:
    if count == 0:
        return
    bits = np.unpackbits(bitmap, bitorder="little")
    bits[first_block:first_block + count] = 1
    bitmap[:] = np.packbits(bits, bitorder="little")


def bitmap_scan(bitmap: np.ndarray, nblocks: int) -> np.ndarray:
    return np.flatnonzero(_bits(bitmap, nblocks)).astype(np.int64)


def bitmap_runs(bitmap: np.ndarray, nblocks: int) -> np.ndarray:
    edges = np.diff(np.concatenate(([0], _bits(bitmap, nblocks).astype(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    runs = np.empty((starts.size, 2), dtype=np.int64)
    runs[:, 0] = starts
    runs[:, 1] = ends - starts
    return runs


# -- record checksums (XXH3-64, seed 0) --------------------------------------------------
def xxh3_rows(rows: np.ndarray) -> np.ndarray:
    """XXH3-64 (seed 0) of each row of a 2-D uint8 array: the ``xxhash`` library's, row by row."""
    from xxhash import xxh3_64_intdigest
    return np.fromiter((xxh3_64_intdigest(r.tobytes()) for r in rows), dtype=np.uint64, count=rows.shape[0])
