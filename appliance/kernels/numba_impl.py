"""Compiled kernels (numba, ``cache=True``): the default implementation.

Same contract as ``reference``: arguments are already checked and normalised
by ``appliance.kernels`` (1-D C-contiguous uint8 arrays, ``block_size`` a
positive multiple of 8, bit ranges inside the bitmap), results are bit for bit
those of the reference.

The wrappers here cut the input into the part made of whole blocks, which the
jitted loops read through a uint64 view of the caller's buffer (no copy),
and the partial last block, which is copied into a zero-padded block. The view
may be read-only (numba compiles and caches a variant for it) or unaligned
(numba's array type does not record alignment; its loads are unaligned-safe on
x86-64 and aarch64, and the self-test hashes a buffer at offset 1). Words are
read in native order, so on a big-endian machine the self-test's known-answer
hashes fail and ``TIDEMARK_KERNELS=reference`` must be used. Bitmaps are read
64 bits at a time the same way; the last, partial word is assembled from
bytes. All loops release the GIL (``nogil=True``), so callers may hash several
regions at once from threads. Indices in the hot loops are uint64, which
spares numba's negative-index wraparound code and lets LLVM vectorise the
zero check.

Integer typing: numba turns ``uint64 op int64`` into float64, so every
constant and shift count below is an explicit ``np.uint64``.
"""
from __future__ import annotations

import numba
import numpy as np

U64 = np.uint64
P1 = U64(0x9E3779B185EBCA87)
P2 = U64(0xC2B2AE3D27D4EB4F)
P3 = U64(0x165667B19E3779F9)
P4 = U64(0x85EBCA77C2B2AE63)
P5 = U64(0x27D4EB2F165667C5)
V1 = U64((0x9E3779B185EBCA87 + 0xC2B2AE3D27D4EB4F) & 0xFFFFFFFFFFFFFFFF)
V4 = U64(-0x9E3779B185EBCA87 & 0xFFFFFFFFFFFFFFFF)
ZERO = U64(0)
ONE = U64(1)
ALL = U64(0xFFFFFFFFFFFFFFFF)
# trailing-zero count of a single set bit: table[(bit * DEBRUIJN) >> 58]
DEBRUIJN = U64(0x03F79D71B4CB0A89)
_DB_TABLE = np.zeros(64, dtype=np.int64)
for _i in range(64):
    _DB_TABLE[((1 << _i) * 0x03F79D71B4CB0A89 & 0xFFFFFFFFFFFFFFFF) >> 58] = _i
DB_TABLE = _DB_TABLE

_jit = numba.njit(cache=True, nogil=True)


# -- block hash (XXH64, seed 0) -------------------------------------------------------
@_jit
def _rotl(x, r):
    return (x << U64(r)) | (x >> U64(64 - r))


@_jit
def _round(acc, word):
    acc = acc + word * P2
    acc = (acc << U64(31)) | (acc >> U64(33))
    return acc * P1


@_jit
def _merge(h, v):
    h = h ^ _round(ZERO, v)
    return h * P1 + P4


@_jit
def _hash_blocks(words, nwords, out):
    """out[b] = XXH64 of words[b * nwords:(b + 1) * nwords] (nwords 64-bit words per block)."""
    nstripes = nwords // 4
    length = U64(nwords * 8)
    nw = U64(nwords)
    for b in range(out.shape[0]):
        base = U64(b) * nw                        # unsigned indices: no negative-index wraparound code
        if nstripes:
            v1 = V1
            v2 = P2
            v3 = ZERO
            v4 = V4
            i = base
            end = base + U64(4 * nstripes)
            while i < end:
                v1 = _round(v1, words[i])
                v2 = _round(v2, words[i + U64(1)])
                v3 = _round(v3, words[i + U64(2)])
                v4 = _round(v4, words[i + U64(3)])
                i += U64(4)
            h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
            h = _merge(h, v1)
            h = _merge(h, v2)
            h = _merge(h, v3)
            h = _merge(h, v4)
        else:
            h = P5
        h = h + length
        for i in range(4 * nstripes, nwords):
            h = h ^ _round(ZERO, words[base + U64(i)])
            h = _rotl(h, 27) * P1 + P4
        h = h ^ (h >> U64(33))
        h = h * P2
        h = h ^ (h >> U64(29))
        h = h * P3
        h = h ^ (h >> U64(32))
        out[b] = h


def _split(data: np.ndarray, block_size: int):
    """(uint64 view of the whole blocks, zero-padded copy of the partial last block or None)."""
    nfull = data.size // block_size
    words = data[:nfull * block_size].view(np.uint64)
    rest = data.size - nfull * block_size
    tail = None
    if rest:
        tail = np.zeros(block_size, dtype=np.uint8)
        tail[:rest] = data[nfull * block_size:]
        tail = tail.view(np.uint64)
    return nfull, words, tail


def block_hashes(data: np.ndarray, block_size: int) -> np.ndarray:
    nfull, words, tail = _split(data, block_size)
    out = np.empty(nfull + (tail is not None), dtype=np.uint64)
    nwords = block_size // 8
    if nfull:
        _hash_blocks(words, nwords, out[:nfull])
    if tail is not None:
        _hash_blocks(tail, nwords, out[nfull:])
    return out


# -- zero blocks ----------------------------------------------------------------------
@_jit
def _zero_blocks(words, nwords, out):
    """out[b] = block b (nwords words) is all zero; stops reading a block at its first non-zero 256 bytes."""
    nw = U64(nwords)
    for b in range(out.shape[0]):
        base = U64(b) * nw                        # unsigned indices: the OR loop vectorises
        end = base + nw
        zero = True
        i = base
        if nwords % 32 == 0:
            while i < end:
                acc = ZERO
                for j in range(32):
                    acc |= words[i + U64(j)]
                if acc != ZERO:
                    zero = False
                    break
                i += U64(32)
        else:
            while i < end:
                if words[i] != ZERO:
                    zero = False
                    break
                i += ONE
        out[b] = zero


def zero_blocks(data: np.ndarray, block_size: int) -> np.ndarray:
    nfull, words, tail = _split(data, block_size)
    out = np.empty(nfull + (tail is not None), dtype=np.bool_)
    nwords = block_size // 8
    if nfull:
        _zero_blocks(words, nwords, out[:nfull])
    if tail is not None:
        _zero_blocks(tail, nwords, out[nfull:])
    return out


# -- hash comparison ------------------------------------------------------------------
@_jit
def _compare(a, b):
    n = 0
    for i in range(a.shape[0]):
        if a[i] != b[i]:
            n += 1
    out = np.empty(n, dtype=np.int64)
    k = 0
    for i in range(a.shape[0]):
        if a[i] != b[i]:
            out[k] = i
            k += 1
    return out


def compare_hashes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return _compare(a, b)


# -- record checksums (XXH3-64, seed 0, of 17 to 128 bytes) --------------------------
# XXH3's default secret, the first 128 of its 192 bytes (all that inputs of up to 128 bytes use),
# as 16 little-endian words
_XXH3_SECRET = np.frombuffer(bytes([
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
]), dtype="<u8").astype(np.uint64)
_M32 = U64(0xFFFFFFFF)
_X3_AVALANCHE = U64(0x165667919E3779F9)
XXH3_MIN, XXH3_MAX = 17, 128           # the input lengths _xxh3_rows handles


@_jit
def _rd64(rows, i, o):
    """The little-endian uint64 at rows[i, o:o + 8]."""
    x = ZERO
    for k in range(7, -1, -1):
        x = (x << U64(8)) | U64(rows[i, o + k])
    return x


@_jit
def _mul_fold64(a, b):
    """The 128-bit product of a and b, its low and high halves xor-ed (XXH3's mul128_fold64)."""
    a_lo = a & _M32
    a_hi = a >> U64(32)
    b_lo = b & _M32
    b_hi = b >> U64(32)
    lo_lo = a_lo * b_lo
    hi_lo = a_hi * b_lo
    lo_hi = a_lo * b_hi
    hi_hi = a_hi * b_hi
    cross = (lo_lo >> U64(32)) + (hi_lo & _M32) + lo_hi
    upper = (hi_lo >> U64(32)) + (cross >> U64(32)) + hi_hi
    lower = (cross << U64(32)) | (lo_lo & _M32)
    return lower ^ upper


@_jit
def _mix16(rows, i, o, s):
    return _mul_fold64(_rd64(rows, i, o) ^ _XXH3_SECRET[s], _rd64(rows, i, o + 8) ^ _XXH3_SECRET[s + 1])


@_jit
def _xxh3_rows(rows, out):
    """out[i] = XXH3-64 (seed 0) of rows[i] (17 to 128 bytes: XXH3_len_17to128_64b)."""
    n = rows.shape[1]
    for i in range(rows.shape[0]):
        acc = U64(n) * P1
        if n > 32:
            if n > 64:
                if n > 96:
                    acc += _mix16(rows, i, 48, 12) + _mix16(rows, i, n - 64, 14)
                acc += _mix16(rows, i, 32, 8) + _mix16(rows, i, n - 48, 10)
            acc += _mix16(rows, i, 16, 4) + _mix16(rows, i, n - 32, 6)
        acc += _mix16(rows, i, 0, 0) + _mix16(rows, i, n - 16, 2)
        acc = acc ^ (acc >> U64(37))
        acc = acc * _X3_AVALANCHE
        out[i] = acc ^ (acc >> U64(32))


def xxh3_rows(rows: np.ndarray) -> np.ndarray:
    if not XXH3_MIN <= rows.shape[1] <= XXH3_MAX:
        from .reference import xxh3_rows as ref
        return ref(rows)                   # other lengths: the library, row by row
    out = np.empty(rows.shape[0], dtype=np.uint64)
    _xxh3_rows(rows, out)
    return out


# -- bitmaps --------------------------------------------------------------------------
@_jit
def _set_bits(bitmap, first, count):
    if count <= 0:
        return
    last = first + count - 1                     # inclusive
    fb = first >> 3
    lb = last >> 3
    lo = np.uint8((0xFF << (first & 7)) & 0xFF)
    hi = np.uint8(0xFF >> (7 - (last & 7)))
    if fb == lb:
        bitmap[fb] |= lo & hi
        return
    bitmap[fb] |= lo
    for i in range(fb + 1, lb):
        bitmap[i] = np.uint8(0xFF)
    bitmap[lb] |= hi


def bitmap_set(bitmap: np.ndarray, first_block: int, count: int) -> None:
    _set_bits(bitmap, first_block, count)


@_jit
def _word(bitmap, words, w, nbits):
    """Bits [64w, 64w + 64) of the bitmap as an integer (bit k = block 64w + k), bits >= nbits cleared."""
    if w < words.shape[0]:
        x = words[w]
    else:
        x = ZERO
        for k in range(8):
            i = w * 8 + k
            if i < bitmap.shape[0]:
                x |= U64(bitmap[i]) << U64(8 * k)
    rem = nbits - w * 64
    if rem < 64:
        x &= (ONE << U64(rem)) - ONE
    return x


@_jit
def _popcount(x):
    x = x - ((x >> U64(1)) & U64(0x5555555555555555))
    x = (x & U64(0x3333333333333333)) + ((x >> U64(2)) & U64(0x3333333333333333))
    x = (x + (x >> U64(4))) & U64(0x0F0F0F0F0F0F0F0F)
    return (x * U64(0x0101010101010101)) >> U64(56)


@_jit
def _ctz_bit(bit):
    """Index of the single set bit of ``bit``."""
    return DB_TABLE[np.int64((bit * DEBRUIJN) >> U64(58))]


@_jit
def _scan(bitmap, words, nbits):
    nw = (nbits + 63) // 64
    n = 0
    for w in range(nw):
        x = _word(bitmap, words, w, nbits)
        if x != ZERO:
            n += np.int64(_popcount(x))
    out = np.empty(n, dtype=np.int64)
    k = 0
    for w in range(nw):
        x = _word(bitmap, words, w, nbits)
        while x != ZERO:
            bit = x & (~x + ONE)
            out[k] = w * 64 + _ctz_bit(bit)
            k += 1
            x ^= bit
    return out


def _bitmap_words(bitmap: np.ndarray, nblocks: int) -> np.ndarray:
    nbytes = min((nblocks + 7) // 8, bitmap.size)
    return bitmap[:nbytes // 8 * 8].view(np.uint64)


def bitmap_scan(bitmap: np.ndarray, nblocks: int) -> np.ndarray:
    return _scan(bitmap, _bitmap_words(bitmap, nblocks), nblocks)


@_jit
def _runs(bitmap, words, nbits):
    """Runs of set bits: a start is a set bit after a clear one, an end a clear bit after a set one."""
    nw = (nbits + 63) // 64
    n = 0
    carry = ZERO                                  # last bit of the previous word
    for w in range(nw):
        x = _word(bitmap, words, w, nbits)
        starts = x & ~((x << ONE) | carry)
        if starts != ZERO:
            n += np.int64(_popcount(starts))
        carry = x >> U64(63)
    out = np.empty((n, 2), dtype=np.int64)
    k = 0
    start = 0
    carry = ZERO
    for w in range(nw):
        x = _word(bitmap, words, w, nbits)
        edges = x ^ ((x << ONE) | carry)
        carry = x >> U64(63)
        while edges != ZERO:
            bit = edges & (~edges + ONE)
            pos = w * 64 + _ctz_bit(bit)
            if x & bit:
                start = pos
            else:
                out[k, 0] = start
                out[k, 1] = pos - start
                k += 1
            edges ^= bit
    if k < n:                                     # a run reaching the last block
        out[k, 0] = start
        out[k, 1] = nbits - start
    return out


def bitmap_runs(bitmap: np.ndarray, nblocks: int) -> np.ndarray:
    return _runs(bitmap, _bitmap_words(bitmap, nblocks), nblocks)
