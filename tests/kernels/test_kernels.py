"""appliance.kernels: every compiled kernel against its reference (and XXH64 against the xxhash library)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import xxhash

import appliance.kernels as K
from appliance.kernels import reference as R

ROOT = Path(__file__).resolve().parents[2]
BLOCK_SIZES = (8, 16, 24, 32, 40, 56, 64, 256, 4096, 4104)


@pytest.fixture(autouse=True, scope="module")
def _numba_backend():
    assert K.backend() == "numba", "run these tests without TIDEMARK_KERNELS set"


def rng(seed=0):
    return np.random.default_rng(seed)


def xxh64_blocks(data: bytes, block_size: int) -> list[int]:
    """The wire format, by an independent implementation: XXH64 (seed 0) of each zero-padded block."""
    n = -(-len(data) // block_size)
    padded = data + bytes(n * block_size - len(data))
    return [xxhash.xxh64_intdigest(padded[i * block_size:(i + 1) * block_size]) for i in range(n)]


def lengths(bs):
    return sorted({0, 1, 7, 8, 9, bs - 1, bs, bs + 1, 2 * bs + 8, 3 * bs - 5, 5 * bs})


def buffers(raw: bytes, offset: int):
    """The same bytes as several buffer kinds, starting ``offset`` bytes into an allocation (unaligned)."""
    backing = bytearray(offset) + bytearray(raw)
    arr = np.frombuffer(bytes(backing), dtype=np.uint8)[offset:]          # read-only
    yield "ndarray-ro", arr
    yield "ndarray", np.array(backing, dtype=np.uint8)[offset:]
    yield "bytes", bytes(raw)
    yield "memoryview", memoryview(backing)[offset:]


# -- block_hashes -----------------------------------------------------------------------------
@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_block_hashes_match_reference_and_xxh64(bs):
    g = rng(bs)
    for n in lengths(bs):
        raw = g.integers(0, 256, n, dtype=np.uint8).tobytes()
        want = xxh64_blocks(raw, bs)
        ref = R.block_hashes(np.frombuffer(raw, dtype=np.uint8), bs)
        assert ref.dtype == np.uint64 and [int(x) for x in ref] == want, (bs, n)
        for offset in (0, 1, 3):
            for kind, buf in buffers(raw, offset):
                got = K.block_hashes(buf, bs)
                assert got.dtype == np.uint64 and got.shape == (len(want),), (bs, n, kind)
                assert [int(x) for x in got] == want, (bs, n, offset, kind)


def test_block_hashes_edge_cases():
    assert K.block_hashes(b"", 4096).shape == (0,)
    assert K.block_hashes(np.zeros(0, np.uint8), 8).dtype == np.uint64
    one = K.block_hashes(b"\x01", 4096)
    assert [int(x) for x in one] == [xxhash.xxh64_intdigest(b"\x01" + bytes(4095))]
    # the partial last block is hashed as if zero-padded
    assert K.block_hashes(b"\x01", 4096)[0] == K.block_hashes(b"\x01" + bytes(4095), 4096)[0]
    # a 2-D array is read as its bytes
    data = rng(1).integers(0, 256, (4, 4096), dtype=np.uint8)
    assert np.array_equal(K.block_hashes(data, 4096), K.block_hashes(data.tobytes(), 4096))
    # a non-contiguous array is read in logical order
    strided = rng(2).integers(0, 256, 2 * 8192, dtype=np.uint8)[::2]
    assert np.array_equal(K.block_hashes(strided, 4096), K.block_hashes(strided.tobytes(), 4096))


def test_block_hashes_known_answers_and_zero_block_not_special():
    assert K.HASH_VERSION == 1
    assert int(K.block_hashes(bytes(4096), 4096)[0]) == 0xAC869B6F32D8BBDB
    assert int(K.block_hashes(bytes(range(256)) * 16, 4096)[0]) == 0x0F6E64BE186AF6A4
    # the all-zero block is hashed like any other block: no 0 (or other) sentinel
    assert int(K.block_hashes(bytes(4096), 4096)[0]) == xxhash.xxh64_intdigest(bytes(4096)) != 0
    # content only: equal blocks at different positions hash equal, whatever block size says the length
    g = rng(3)
    block = g.integers(0, 256, 4096, dtype=np.uint8)
    data = np.concatenate([block, g.integers(0, 256, 4096, dtype=np.uint8), block])
    h = K.block_hashes(data, 4096)
    assert h[0] == h[2] != h[1]
    assert K.block_hashes(bytes(4096), 4096)[0] != K.block_hashes(bytes(8192), 8192)[0]


@pytest.mark.parametrize("base", ["random", "zero"])
def test_block_hash_changes_with_any_single_byte(base):
    g = rng(4)
    data = (g.integers(0, 256, 4 * 4096, dtype=np.uint8) if base == "random"
            else np.zeros(4 * 4096, dtype=np.uint8))
    before = K.block_hashes(data, 4096)
    positions = [0, 1, 7, 8, 31, 32, 4095, 4096, 8191, 4 * 4096 - 1] + list(g.integers(0, data.size, 20))
    for pos in positions:
        for flip in (0x01, 0x80, 0xFF):
            changed = data.copy()
            changed[pos] ^= flip
            after = K.block_hashes(changed, 4096)
            differ = K.compare_hashes(before, after)
            assert differ.tolist() == [pos // 4096], (pos, flip)


# -- compare_hashes ---------------------------------------------------------------------------
def test_compare_hashes_matches_reference():
    g = rng(5)
    for n in (0, 1, 2, 7, 1000, 100_000):
        a = g.integers(0, 2**64, n, dtype=np.uint64)
        for frac in (0.0, 0.01, 0.5, 1.0):
            b = a.copy()
            k = int(n * frac)
            b[g.choice(n, k, replace=False)] ^= g.integers(1, 2**64, k, dtype=np.uint64)
            got = K.compare_hashes(a, b)
            want = R.compare_hashes(a, b)
            assert got.dtype == np.int64 and np.array_equal(got, want), (n, frac)
            assert len(got) == k
    a = np.arange(10, dtype=np.uint64)
    assert K.compare_hashes(a, a).tolist() == []
    b = a.copy()
    b[[0, 9]] = 99
    assert K.compare_hashes(a, b).tolist() == [0, 9]
    with pytest.raises(ValueError):
        K.compare_hashes(a, a[:5])
    with pytest.raises(TypeError):
        K.compare_hashes(a.astype(np.int64), a.astype(np.int64))


# -- zero_blocks ------------------------------------------------------------------------------
@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_zero_blocks_matches_reference(bs):
    g = rng(100 + bs)
    for n in lengths(bs):
        data = np.zeros(n, dtype=np.uint8)
        nblocks = -(-n // bs)
        # about half of the blocks get exactly one non-zero byte, at a random place (incl. first/last byte)
        for b in range(nblocks):
            if g.random() < 0.5:
                lo, hi = b * bs, min((b + 1) * bs, n)
                pos = int(g.choice([lo, hi - 1, int(g.integers(lo, hi))]))
                data[pos] = g.integers(1, 256)
        want = R.zero_blocks(data, bs)
        assert want.dtype == np.bool_ and want.shape == (nblocks,)
        for offset in (0, 1, 5):
            for kind, buf in buffers(data.tobytes(), offset):
                got = K.zero_blocks(buf, bs)
                assert got.dtype == np.bool_ and np.array_equal(got, want), (bs, n, offset, kind)


def test_zero_blocks_edge_cases():
    assert K.zero_blocks(b"", 4096).shape == (0,)
    assert K.zero_blocks(b"\x00", 4096).tolist() == [True]
    assert K.zero_blocks(b"\x01", 4096).tolist() == [False]
    assert K.zero_blocks(bytes(3 * 4096 + 5), 4096).tolist() == [True] * 4
    data = bytearray(3 * 4096 + 5)
    data[-1] = 1                                   # only in the partial last block
    assert K.zero_blocks(data, 4096).tolist() == [True, True, True, False]
    data = bytearray(3 * 4096)
    data[2 * 4096 - 1] = 1                         # last byte of block 1
    assert K.zero_blocks(data, 4096).tolist() == [True, False, True]
    data = np.random.default_rng(6).integers(1, 256, 4 * 4096, dtype=np.uint8)
    assert not K.zero_blocks(data, 4096).any()


def test_argument_checks():
    for bs in (0, -8, 12, 4095):
        with pytest.raises(ValueError):
            K.block_hashes(b"abc", bs)
        with pytest.raises(ValueError):
            K.zero_blocks(b"abc", bs)
    with pytest.raises(TypeError):
        K.block_hashes(np.zeros(8, np.uint16), 8)


# -- bitmaps ----------------------------------------------------------------------------------
def test_xxh3_rows_match_the_xxhash_library():
    """Record checksums: XXH3-64 seed 0 of each row, every width (compiled for 17..128 bytes)."""
    g = rng(7)
    for width in list(range(0, 140)) + [240, 241, 1000]:
        rows = g.integers(0, 256, (9, width), dtype=np.uint8)
        want = [xxhash.xxh3_64_intdigest(r.tobytes()) for r in rows]
        assert [int(x) for x in K.xxh3_rows(rows)] == want, width
        assert [int(x) for x in R.xxh3_rows(rows)] == want, width
    # a non-contiguous view (columns of a wider array), and no rows
    wide = g.integers(0, 256, (50, 80), dtype=np.uint8)
    assert [int(x) for x in K.xxh3_rows(wide[:, 10:64])] == \
        [xxhash.xxh3_64_intdigest(r.tobytes()) for r in wide[:, 10:64]]
    assert K.xxh3_rows(np.zeros((0, 54), dtype=np.uint8)).shape == (0,)
    with pytest.raises(TypeError):
        K.xxh3_rows(np.zeros(54, dtype=np.uint8))
    with pytest.raises(TypeError):
        K.xxh3_rows(np.zeros((2, 54), dtype=np.int64))


def oracle_scan(bitmap: bytes, nblocks: int) -> list[int]:
    return [b for b in range(nblocks) if bitmap[b >> 3] >> (b & 7) & 1]


def oracle_runs(bitmap: bytes, nblocks: int) -> list[list[int]]:
    runs = []
    for b in oracle_scan(bitmap, nblocks):
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1][1] += 1
        else:
            runs.append([b, 1])
    return runs


def random_bitmap(g, nbytes, density):
    if density == "runs":                          # long runs crossing byte and word boundaries
        bits = np.zeros(nbytes * 8, dtype=np.uint8)
        pos = 0
        while pos < bits.size:
            length = int(g.integers(1, 200))
            if g.random() < 0.5:
                bits[pos:pos + length] = 1
            pos += length
        return np.packbits(bits, bitorder="little")
    return np.packbits((g.random(nbytes * 8) < density).astype(np.uint8), bitorder="little")


@pytest.mark.parametrize("nbytes", [0, 1, 7, 8, 9, 15, 16, 17, 37, 1000])
@pytest.mark.parametrize("density", [0.0, 0.03, 0.5, 0.97, 1.0, "runs"])
def test_bitmap_scan_and_runs_match_reference(nbytes, density):
    g = rng(nbytes)
    bm = random_bitmap(g, nbytes, density)
    nbits = 8 * nbytes
    for nblocks in sorted({0, 1, 7, 8, 9, 63, 64, 65, nbits - 9, nbits - 1, nbits,
                           int(g.integers(0, nbits + 1))}):
        if not 0 <= nblocks <= nbits:
            continue
        want_scan = R.bitmap_scan(bm, nblocks)
        want_runs = R.bitmap_runs(bm, nblocks)
        assert want_scan.tolist() == oracle_scan(bm.tobytes(), nblocks)
        assert want_runs.tolist() == oracle_runs(bm.tobytes(), nblocks)
        for offset in (0, 3):
            for kind, buf in buffers(bm.tobytes(), offset):
                got = K.bitmap_scan(buf, nblocks)
                assert got.dtype == np.int64 and np.array_equal(got, want_scan), (nblocks, offset, kind)
                got = K.bitmap_runs(buf, nblocks)
                assert got.dtype == np.int64 and got.shape == (len(want_runs), 2)
                assert np.array_equal(got, want_runs), (nblocks, offset, kind)


def test_bitmap_runs_across_boundaries():
    bm = np.zeros(20, dtype=np.uint8)
    K.bitmap_set(bm, 5, 65)                        # bits 5..69: crosses 8 bytes and a 64-bit word
    K.bitmap_set(bm, 71, 1)
    K.bitmap_set(bm, 127, 33)                      # 127..159: crosses the second word boundary, to the end
    assert K.bitmap_runs(bm, 160).tolist() == [[5, 65], [71, 1], [127, 33]]
    assert K.bitmap_runs(bm, 128).tolist() == [[5, 65], [71, 1], [127, 1]]   # cut by nblocks
    assert K.bitmap_runs(bm, 64).tolist() == [[5, 59]]
    assert K.bitmap_scan(bm, 72).tolist() == list(range(5, 70)) + [71]
    bm[:] = 0xFF
    assert K.bitmap_runs(bm, 160).tolist() == [[0, 160]]
    assert K.bitmap_runs(bm, 0).shape == (0, 2)
    assert K.bitmap_scan(bm, 0).shape == (0,)
    # set bits past nblocks are ignored
    bm = np.zeros(3, dtype=np.uint8)
    bm[2] = 0b1000_0001
    assert K.bitmap_scan(bm, 17).tolist() == [16]
    assert K.bitmap_runs(bm, 16).tolist() == []
    with pytest.raises(ValueError):
        K.bitmap_scan(bm, 25)
    with pytest.raises(ValueError):
        K.bitmap_runs(bm, -1)


def test_bitmap_set_matches_reference():
    g = rng(7)
    for nbytes in (1, 2, 7, 8, 9, 17, 37, 300):
        nbits = 8 * nbytes
        ranges = [(0, 0), (0, 1), (0, nbits), (nbits - 1, 1), (7, 1), (7, 2), (8, 8), (3, 5), (6, 11),
                  (63, 2), (64, 64)]
        ranges += [(int(f), int(g.integers(0, nbits - f + 1))) for f in g.integers(0, nbits, 20)]
        for first, count in ranges:
            if first + count > nbits:
                continue
            base = random_bitmap(g, nbytes, float(g.choice([0.0, 0.1, 0.9])))
            want = base.copy()
            R.bitmap_set(want, first, count)
            assert oracle_scan(want.tobytes(), nbits) == sorted(
                set(oracle_scan(base.tobytes(), nbits)) | set(range(first, first + count)))
            got = base.copy()
            assert K.bitmap_set(got, first, count) is None
            assert np.array_equal(got, want), (nbytes, first, count)
            # writable buffers are updated in place, including at an unaligned offset
            buf = bytearray(3) + bytearray(base.tobytes())
            K.bitmap_set(memoryview(buf)[3:], first, count)
            assert bytes(buf[3:]) == want.tobytes()
            assert bytes(buf[:3]) == bytes(3)


def test_bitmap_set_checks():
    bm = np.zeros(4, dtype=np.uint8)
    for first, count in ((-1, 1), (0, -1), (0, 33), (32, 1), (30, 3)):
        with pytest.raises(ValueError):
            K.bitmap_set(bm, first, count)
    K.bitmap_set(bm, 32, 0)                        # an empty range at the end is fine
    with pytest.raises(ValueError):
        K.bitmap_set(bytes(4), 0, 1)               # read-only
    with pytest.raises(ValueError):
        K.bitmap_set(np.zeros(8, np.uint8)[::2], 0, 1)
    assert bm.tolist() == [0, 0, 0, 0]


def test_bitmap_convention_matches_simulator():
    """Bit b is bit b & 7 (LSB first) of byte b >> 3, as simulator.iopath's dirty bitmaps."""
    bm = bytearray(4)
    for b in (0, 9, 31):
        bm[b >> 3] |= 1 << (b & 7)
    assert K.bitmap_scan(bm, 32).tolist() == [0, 9, 31]
    mine = np.zeros(4, np.uint8)
    for b in (0, 9, 31):
        K.bitmap_set(mine, b, 1)
    assert mine.tobytes() == bytes(bm)


# -- self-test and back-ends ------------------------------------------------------------------
def test_self_test_passes_and_is_cheap():
    K.self_test()                                  # compiled (or loaded from the cache) by now
    assert K.self_test() < 0.5
    assert K.self_test("reference") < 0.5


def test_self_test_reports_a_wrong_kernel():
    broken = types.SimpleNamespace(**{name: getattr(R, name) for name in (
        "block_hashes", "compare_hashes", "zero_blocks", "bitmap_set", "bitmap_scan", "bitmap_runs")})
    broken.__name__ = "broken"
    broken.bitmap_runs = lambda bm, n: R.bitmap_runs(bm, n)[:-1]
    with pytest.raises(K.KernelSelfTestError) as err:
        K._run_self_test(broken, "numba")
    assert "bitmap_runs" in str(err.value) and "TIDEMARK_KERNELS=reference" in str(err.value)

    def crash(data, bs):
        raise RuntimeError("boom")
    broken.bitmap_runs = R.bitmap_runs
    broken.zero_blocks = crash
    with pytest.raises(K.KernelSelfTestError, match="boom.*TIDEMARK_KERNELS=reference"):
        K._run_self_test(broken, "numba")


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})


def test_reference_backend_via_env():
    code = """
        import json, sys
        import numpy as np
        import appliance.kernels as K
        data = np.random.default_rng(8).integers(0, 256, 5 * 4096 + 77, dtype=np.uint8)
        data[4096:8192] = 0
        bm = np.packbits(np.random.default_rng(9).random(300) < 0.4, bitorder="little")
        K.bitmap_set(bm, 3, 70)
        out = dict(
            backend=K.backend(),
            hashes=[int(x) for x in K.block_hashes(data, 4096)],
            zero=K.zero_blocks(data, 4096).tolist(),
            scan=K.bitmap_scan(bm, 299).tolist(),
            runs=K.bitmap_runs(bm, 299).tolist(),
            numba_loaded="numba" in sys.modules or "appliance.kernels.numba_impl" in sys.modules,
        )
        print(json.dumps(out))
    """
    results = {}
    for name in ("reference", "numba"):
        proc = run_python(code, TIDEMARK_KERNELS=name)
        assert proc.returncode == 0, proc.stderr
        results[name] = json.loads(proc.stdout)
    ref, nb = results["reference"], results["numba"]
    assert ref["backend"] == "reference" and not ref["numba_loaded"]
    assert nb["backend"] == "numba" and nb["numba_loaded"]
    for key in ("hashes", "zero", "scan", "runs"):
        assert ref[key] == nb[key], key
    assert ref["zero"] == [False, True, False, False, False, False]

    proc = run_python("import appliance.kernels as K; K.block_hashes(b'', 8)", TIDEMARK_KERNELS="fortran")
    assert proc.returncode != 0 and "TIDEMARK_KERNELS" in proc.stderr


def test_first_use_runs_the_self_test_once():
    code = """
        import time
        import appliance.kernels as K
        calls = []
        real = K._run_self_test
        K._run_self_test = lambda impl, name: (calls.append(name), real(impl, name))
        K.block_hashes(b"x", 8); K.zero_blocks(b"x", 8); K.bitmap_scan(b"x", 8)
        first_use = list(calls)
        t = time.perf_counter()
        K.self_test()
        print(first_use, time.perf_counter() - t)
    """
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    calls, seconds = proc.stdout.rsplit(" ", 1)
    assert calls == "['numba']"
    assert float(seconds) < 0.5


def test_concurrent_first_use():
    """Threads calling at once all get correct results (the GIL is released in the kernels)."""
    from concurrent.futures import ThreadPoolExecutor
    data = rng(10).integers(0, 256, 64 * 4096, dtype=np.uint8)
    want = R.block_hashes(data, 4096)
    with ThreadPoolExecutor(4) as pool:
        for got in pool.map(lambda _: K.block_hashes(data, 4096), range(8)):
            assert np.array_equal(got, want)


def test_numba_cache_is_used():
    """cache=True: a second process loads the machine code from numba's cache instead of compiling it."""
    K.self_test()                                  # this process has compiled (and cached) what the self-test needs
    code = """
        import appliance.kernels as K
        from appliance.kernels import numba_impl as N
        K.self_test()
        stats = [f.stats for f in vars(N).values() if hasattr(f, "stats")]
        print(sum(sum(s.cache_hits.values()) for s in stats), sum(sum(s.cache_misses.values()) for s in stats))
    """
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    hits, misses = map(int, proc.stdout.split())
    assert hits > 0 and misses == 0, (hits, misses)
