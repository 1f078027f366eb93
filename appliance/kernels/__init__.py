"""Compiled kernels of the replication engine: delta-sync block hashes and dirty bitmaps.

The one place for compiled code, in the style of borgbackup: the plain
functions below check and normalise their arguments and dispatch to

* ``numba_impl``  -- numba, ``cache=True`` (the default), or
* ``reference``   -- pure NumPy/Python, the definition of every result
                     (``TIDEMARK_KERNELS=reference``; slow, for machines where
                     numba is broken and for checking).

On first use ``self_test()`` runs once: every compiled kernel on small seeded
inputs against its reference, plus known-answer hashes; a mismatch raises
``KernelSelfTestError``. The JIT cost is paid once per machine: numba caches
the machine code in its default place (``__pycache__`` beside
``numba_impl.py``, or a per-user cache directory if that is not writable) or in
``NUMBA_CACHE_DIR`` when set.

API (``data``: a uint8 array or any buffer -- bytes, bytearray, memoryview,
mmap -- of a disk region; a contiguous one is read in place, at any alignment,
and only the partial last block is copied; ``block_size``: a positive multiple
of 8, typically 4096)::

    block_hashes(data, block_size)        -> uint64[nblocks]
    zero_block_hash(block_size)           -> int          the hash of an all-zero block (a hole)
    compare_hashes(a, b)                  -> int64[k]     indices where a != b
    zero_blocks(data, block_size)         -> bool[nblocks]
    bitmap_set(bitmap, first_block, count)               set bits [first, first+count) in place
    bitmap_scan(bitmap, nblocks)          -> int64[k]     set bits < nblocks, ascending
    bitmap_runs(bitmap, nblocks)          -> int64[k, 2]  runs of set bits as (start, length)
    xxh3_rows(rows)                       -> uint64[n]    XXH3-64 (seed 0) of each row of a 2-D uint8 array
                                                          (the journal's record checksums, many at once)

``nblocks = ceil(len(data) / block_size)``; the partial last block is treated
as if zero-padded to ``block_size``. Bitmaps: bit ``b`` is bit ``b & 7``
(LSB first) of byte ``b >> 3``, as in the simulator's dirty bitmaps.

Block hash, HASH_VERSION 1 (part of the sync wire format)
----------------------------------------------------------
The hash of a block is XXH64 with seed 0 of its ``block_size`` bytes (the
partial last block zero-padded first), so it can be cross-checked with any
XXH64 implementation (``xxhash.xxh64_intdigest(block)``). It depends on the
content and the length only, not on the position; an all-zero block is hashed
like any other (zero detection is ``zero_blocks``). Because ``block_size`` is a
multiple of 8, XXH64 reduces to the following, all arithmetic modulo 2**64,
``rotl`` a 64-bit left rotation, and the block read as ``n = block_size / 8``
little-endian uint64 words ``w[0..n-1]``::

    P1 = 0x9E3779B185EBCA87   P2 = 0xC2B2AE3D27D4EB4F   P3 = 0x165667B19E3779F9
    P4 = 0x85EBCA77C2B2AE63   P5 = 0x27D4EB2F165667C5

    round(acc, x) = rotl(acc + x * P2, 31) * P1
    merge(h, v)   = (h ^ round(0, v)) * P1 + P4

    if n >= 4:                                  # 4 independent lanes
        v = [P1 + P2, P2, 0, -P1]
        for s in 0 .. n // 4 - 1:               # 32-byte stripes
            v[j] = round(v[j], w[4s + j])   for j = 0..3
        h = rotl(v[0], 1) + rotl(v[1], 7) + rotl(v[2], 12) + rotl(v[3], 18)
        h = merge(merge(merge(merge(h, v[0]), v[1]), v[2]), v[3])
    else:
        h = P5
    h = h + block_size
    for i in 4 * (n // 4) .. n - 1:             # 0 to 3 trailing words
        h = rotl(h ^ round(0, w[i]), 27) * P1 + P4
    h ^= h >> 33;  h *= P2;  h ^= h >> 29;  h *= P3;  h ^= h >> 32     # avalanche
    hash = h

Known answers (block_size 4096): all zero -> 0xac869b6f32d8bbdb;
``bytes(range(256)) * 16`` -> 0x0f6e64be186af6a4. Any change to this
algorithm must bump HASH_VERSION (peers compare it before a delta sync).
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np

from . import reference

__all__ = [
    "HASH_VERSION", "KernelSelfTestError", "backend", "self_test",
    "block_hashes", "zero_block_hash", "compare_hashes", "zero_blocks", "bitmap_set", "bitmap_scan", "bitmap_runs",
    "xxh3_rows",
]

HASH_VERSION = 1
ENV = "TIDEMARK_KERNELS"
BACKENDS = ("numba", "reference")

# (data, block_size, expected hash of each block): wire-format known answers.
KNOWN_ANSWERS = (
    (bytes(4096), 4096, (0xAC869B6F32D8BBDB,)),
    (bytes(range(256)) * 16, 4096, (0x0F6E64BE186AF6A4,)),
    (bytes(range(24)), 24, (0xDD14A0292632BE9B,)),                 # < 4 words: no lanes
    (bytes(range(56)), 56, (0x0CD869F80FF2B918,)),                 # 1 stripe + 3 trailing words
    (bytes(range(8)) + bytes(8), 8, (0x884A173614B81B8D, None)),   # None: checked against reference
)


class KernelSelfTestError(RuntimeError):
    """A kernel gave a wrong result (or could not be compiled) at start-up."""


# -- argument checks ------------------------------------------------------------------
def _as_u8(data) -> np.ndarray:
    """The bytes of ``data`` as a 1-D C-contiguous uint8 array, without a copy when it is contiguous."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise TypeError(f"expected a uint8 array, got {data.dtype}")
        return np.ascontiguousarray(data).reshape(-1)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except ValueError:                             # a non-contiguous memoryview
        return np.frombuffer(memoryview(data).tobytes(), dtype=np.uint8)


def _as_bitmap(bitmap, writable: bool = False) -> np.ndarray:
    if isinstance(bitmap, np.ndarray):
        if bitmap.dtype != np.uint8 or bitmap.ndim != 1:
            raise TypeError(f"a bitmap is a 1-D uint8 array, got {bitmap.dtype} with {bitmap.ndim} dimensions")
        if writable and not bitmap.flags.c_contiguous:
            raise ValueError("bitmap_set needs a contiguous bitmap to update in place")
        arr = np.ascontiguousarray(bitmap)
    else:
        arr = np.frombuffer(bitmap, dtype=np.uint8)
    if writable and not arr.flags.writeable:
        raise ValueError("bitmap_set needs a writable bitmap")
    return arr


def _check_block_size(block_size) -> int:
    block_size = int(block_size)
    if block_size <= 0 or block_size % 8:
        raise ValueError(f"block_size must be a positive multiple of 8, got {block_size}")
    return block_size


def _check_nblocks(bitmap: np.ndarray, nblocks) -> int:
    nblocks = int(nblocks)
    if not 0 <= nblocks <= 8 * bitmap.size:
        raise ValueError(f"nblocks {nblocks} outside a bitmap of {bitmap.size} bytes")
    return nblocks


def _as_hashes(a) -> np.ndarray:
    a = np.ascontiguousarray(a)
    if a.dtype != np.uint64 or a.ndim != 1:
        raise TypeError(f"hashes are a 1-D uint64 array, got {a.dtype} with {a.ndim} dimensions")
    return a


# -- dispatch -------------------------------------------------------------------------
_lock = threading.Lock()
_impl = None          # the module in use, once self-tested
_failure = None       # the KernelSelfTestError of a failed start-up, raised again on every call


def backend() -> str:
    """The backend chosen by ``TIDEMARK_KERNELS``: ``numba`` (default) or ``reference``."""
    name = os.environ.get(ENV, "").strip().lower() or "numba"
    if name not in BACKENDS:
        raise ValueError(f"{ENV}={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def _fallback_hint(name: str) -> str:
    if name == "reference":
        return "the reference kernels are the definition of every result: this is a bug in appliance/kernels/reference.py"
    return (f"do not use the compiled kernels on this machine: set {ENV}=reference to run on the "
            f"pure NumPy reference kernels (correct, much slower) and report this failure")


def _load(name: str):
    if name == "reference":
        return reference
    try:
        from . import numba_impl
    except Exception as exc:  # numba missing or broken
        raise KernelSelfTestError(f"appliance.kernels: cannot load the numba kernels ({exc!r}); "
                                  f"{_fallback_hint(name)}") from exc
    return numba_impl


def _kernels():
    global _impl, _failure
    impl = _impl
    if impl is not None:
        return impl
    with _lock:
        if _impl is None:
            if _failure is not None:
                raise _failure
            name = backend()
            try:
                impl = _load(name)
                _run_self_test(impl, name)
            except KernelSelfTestError as exc:
                _failure = exc
                raise
            _impl = impl
        return _impl


# -- self-test ------------------------------------------------------------------------
def _self_test_cases():
    """(kernel name, description, args) on small seeded inputs; args are normalised already."""
    rng = np.random.default_rng(0x71DE)
    data = rng.integers(0, 256, 3 * 4096 + 1000, dtype=np.uint8)
    data[4096:8192] = 0                                          # an all-zero block
    data[8192 + 100] = 0                                         # a block with a zero byte
    raw = bytes(1) + data.tobytes()
    unaligned = np.frombuffer(raw, dtype=np.uint8)[1:]           # read-only, offset 1
    cases = []
    for desc, buf in (("aligned", data), ("unaligned read-only", unaligned)):
        for bs in (4096, 64, 40, 8):
            for n in (buf.size, 4096, 4097, 7, 1, 0):
                cases.append(("block_hashes", f"{desc}, {n} bytes, block_size {bs}", (buf[:n], bs)))
                cases.append(("zero_blocks", f"{desc}, {n} bytes, block_size {bs}", (buf[:n], bs)))
    zeros = np.zeros(2 * 4096 + 24, dtype=np.uint8)
    for bs in (4096, 64, 40):
        cases.append(("zero_blocks", f"all zero, block_size {bs}", (zeros, bs)))
    a = rng.integers(0, 2**64, 1000, dtype=np.uint64)
    b = a.copy()
    b[rng.choice(1000, 37, replace=False)] ^= np.uint64(1 << 63)
    for n in (1000, 1, 0):
        cases.append(("compare_hashes", f"{n} hashes", (a[:n], b[:n])))
    dense = (rng.random(37 * 8) < 0.7).astype(np.uint8)
    sparse = (rng.random(37 * 8) < 0.05).astype(np.uint8)
    for desc, bits in (("dense", dense), ("sparse", sparse), ("full", np.ones(37 * 8, np.uint8))):
        bm = np.packbits(bits, bitorder="little")
        for n in (0, 1, 63, 64, 65, 291, 296):
            cases.append(("bitmap_scan", f"{desc} bitmap of 37 bytes, {n} blocks", (bm, n)))
            cases.append(("bitmap_runs", f"{desc} bitmap of 37 bytes, {n} blocks", (bm, n)))
    sparse_bm = np.packbits(sparse, bitorder="little")
    for first, count in ((0, 0), (3, 1), (5, 20), (7, 2), (8, 8), (63, 2), (64, 64), (0, 296), (100, 150), (295, 1)):
        cases.append(("bitmap_set", f"bits [{first}, {first + count}) of 37 bytes", (sparse_bm, first, count)))
    rows = rng.integers(0, 256, (40, 130), dtype=np.uint8)
    for width in (17, 24, 32, 33, 46, 54, 64, 65, 80, 96, 97, 128, 16, 0, 129):
        cases.append(("xxh3_rows", f"40 rows of {width} bytes", (np.ascontiguousarray(rows[:, :width]),)))
    cases.append(("xxh3_rows", "0 rows of 54 bytes", (np.zeros((0, 54), dtype=np.uint8),)))
    return cases


def _same(got, want) -> str | None:
    """Why ``got`` is not ``want``, or None."""
    if not isinstance(got, np.ndarray):
        return f"returned {type(got).__name__}, expected an array"
    if got.dtype != want.dtype or got.shape != want.shape:
        return f"returned {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}"
    if not np.array_equal(got, want):
        bad = np.flatnonzero((got != want).reshape(len(got), -1).any(axis=1)) if len(got) else []
        return f"wrong values at {len(bad)} indices, first {int(bad[0])}: {got[bad[0]]} instead of {want[bad[0]]}"
    return None


def _run_self_test(impl, name: str) -> None:
    def fail(kernel, desc, why):
        raise KernelSelfTestError(f"appliance.kernels self-test failed: {kernel} ({name} backend) on {desc}: "
                                  f"{why}; {_fallback_hint(name)}")

    try:
        for data, bs, expected in KNOWN_ANSWERS:
            u8 = np.frombuffer(data, dtype=np.uint8)
            for mod in ((impl,) if impl is reference else (impl, reference)):
                got = mod.block_hashes(u8, bs)
                want = [reference.block_hashes(u8, bs)[i] if e is None else e for i, e in enumerate(expected)]
                if [int(x) for x in got] != [int(x) for x in want]:
                    fail("block_hashes", f"the known answer for {len(data)} bytes, block_size {bs}",
                         f"{[hex(x) for x in got]} instead of {[hex(x) for x in want]} "
                         f"({mod.__name__.rsplit('.', 1)[-1]})")
        if impl is reference:
            return
        for kernel, desc, args in _self_test_cases():
            if kernel == "bitmap_set":
                bm, first, count = args
                got_bm, want_bm = bm.copy(), bm.copy()
                impl.bitmap_set(got_bm, first, count)
                reference.bitmap_set(want_bm, first, count)
                got, want = got_bm, want_bm
            else:
                got = getattr(impl, kernel)(*args)
                want = getattr(reference, kernel)(*args)
            why = _same(got, want)
            if why:
                fail(kernel, desc, why)
    except KernelSelfTestError:
        raise
    except Exception as exc:  # a compile error, a crash in a kernel
        raise KernelSelfTestError(f"appliance.kernels self-test failed: {name} backend raised {exc!r}; "
                                  f"{_fallback_hint(name)}") from exc


def self_test(name: str | None = None) -> float:
    """Check the kernels of backend ``name`` (default: the one ``TIDEMARK_KERNELS`` selects) against the
    reference and the known-answer hashes; return the seconds it took. Raises KernelSelfTestError."""
    name = name or backend()
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}: expected one of {', '.join(BACKENDS)}")
    t0 = time.perf_counter()
    _run_self_test(_load(name), name)
    return time.perf_counter() - t0


# -- the kernels ----------------------------------------------------------------------
def block_hashes(data, block_size: int) -> np.ndarray:
    """One 64-bit hash (HASH_VERSION 1, see the module doc) per ``block_size`` block of ``data``."""
    u8 = _as_u8(data)
    block_size = _check_block_size(block_size)
    return _kernels().block_hashes(u8, block_size)


def zero_block_hash(block_size: int) -> int:
    """The hash of an all-zero ``block_size`` block: what every block of a hole hashes to, so delta
    sync answers holes without reading them (the last partial block of a disk too: it is
    hashed zero-padded)."""
    block_size = _check_block_size(block_size)
    h = _zero_hashes.get(block_size)
    if h is None:
        h = _zero_hashes[block_size] = int(block_hashes(np.zeros(block_size, dtype=np.uint8), block_size)[0])
    return h


_zero_hashes: dict[int, int] = {}


def compare_hashes(a, b) -> np.ndarray:
    """Indices (int64, ascending) where the equal-length uint64 hash arrays ``a`` and ``b`` differ."""
    a, b = _as_hashes(a), _as_hashes(b)
    if a.shape != b.shape:
        raise ValueError(f"hash arrays differ in length: {a.size} and {b.size}")
    return _kernels().compare_hashes(a, b)


def zero_blocks(data, block_size: int) -> np.ndarray:
    """Which ``block_size`` blocks of ``data`` are all zero (bool per block)."""
    u8 = _as_u8(data)
    block_size = _check_block_size(block_size)
    return _kernels().zero_blocks(u8, block_size)


def bitmap_set(bitmap, first_block: int, count: int) -> None:
    """Set bits [first_block, first_block + count) of ``bitmap`` (uint8 array or writable buffer) in place."""
    bm = _as_bitmap(bitmap, writable=True)
    first_block, count = int(first_block), int(count)
    if first_block < 0 or count < 0 or first_block + count > 8 * bm.size:
        raise ValueError(f"bits [{first_block}, {first_block + count}) outside a bitmap of {bm.size} bytes")
    _kernels().bitmap_set(bm, first_block, count)


def bitmap_scan(bitmap, nblocks: int) -> np.ndarray:
    """Indices (int64, ascending) of the set bits among the first ``nblocks`` bits."""
    bm = _as_bitmap(bitmap)
    return _kernels().bitmap_scan(bm, _check_nblocks(bm, nblocks))


def bitmap_runs(bitmap, nblocks: int) -> np.ndarray:
    """Runs of consecutive set bits among the first ``nblocks`` bits, int64 shape (k, 2): (start, length)."""
    bm = _as_bitmap(bitmap)
    return _kernels().bitmap_runs(bm, _check_nblocks(bm, nblocks))


def xxh3_rows(rows) -> np.ndarray:
    """XXH3-64 (seed 0, ``xxhash.xxh3_64_intdigest``) of each row of the 2-D uint8 array ``rows``:
    the checksums of many journal records at once (compiled for rows of 17 to 128 bytes; other
    widths are hashed row by row)."""
    if not isinstance(rows, np.ndarray) or rows.dtype != np.uint8 or rows.ndim != 2:
        raise TypeError("rows must be a 2-D uint8 array")
    return _kernels().xxh3_rows(np.ascontiguousarray(rows))
