#!/usr/bin/env python
"""Speed of the compiled replication kernels, beside this machine's memory read bandwidth.

    .venv/bin/python bench/kernels.py [--quick] [--json] [--mib N] [--repeat R]

One thread, one buffer of N MiB (256) of seeded random data and one of zeros,
both written first so that every page is real memory (not the shared zero
page). After a warm-up (JIT or numba cache load, the start-up self-test, one
untimed pass of each measurement) each figure is the best of R runs (3; 1 with
--quick, which also uses 32 MiB):

* block_hashes 4 KiB   -- ``appliance.kernels.block_hashes(data, 4096)`` (and 64 KiB blocks);
* numpy read           -- ``np.sum`` over a uint64 view of the same buffer: what one core
                          can read from memory with a vectorised loop;
* numpy copy           -- ``np.copyto`` of the buffer (a memcpy: reads and writes N MiB);
* zero_blocks          -- on the random buffer (every block ends at its first 256 bytes)
                          and on the zero buffer (every byte read).

GB/s are 10**9 bytes of input per second. The goal is block_hashes at 4 KiB
>= 4 GB/s per core; the ratio to numpy's read bandwidth says how close the
hash is to the memory limit. The hashes of a sample of blocks are checked
against ``xxhash.xxh64_intdigest`` (the wire format is XXH64 of each block):
exit status 1 on a mismatch.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import xxhash  # noqa: E402

import appliance.kernels as K  # noqa: E402

MiB = 1 << 20
GOAL_GBPS = 4.0


def best_of(fn, repeat: int) -> float:
    fn()                                           # untimed pass: page-in, caches, JIT
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=None, help="buffer size in MiB (256; 32 with --quick)")
    ap.add_argument("--repeat", type=int, default=None, help="best of R runs (3; 1 with --quick)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    mib = args.mib or (32 if args.quick else 256)
    repeat = args.repeat or (1 if args.quick else 3)
    n = mib * MiB

    t0 = time.perf_counter()
    K.block_hashes(b"", 4096)                      # first use: numba compile or cache load + self-test
    first_use = time.perf_counter() - t0
    self_test = K.self_test()

    data = np.random.default_rng(2024).integers(0, 2**64, n // 8, dtype=np.uint64, endpoint=False).view(np.uint8)
    zeros = np.empty(n, dtype=np.uint8)
    zeros.fill(0)
    dst = np.empty(n, dtype=np.uint8)
    dst.fill(1)
    words = data.view(np.uint64)

    secs = {
        "block_hashes_4k": best_of(lambda: K.block_hashes(data, 4096), repeat),
        "block_hashes_64k": best_of(lambda: K.block_hashes(data, 65536), repeat),
        "numpy_read": best_of(lambda: words.sum(), repeat),
        "numpy_copy": best_of(lambda: np.copyto(dst, data), repeat),
        "zero_blocks_random": best_of(lambda: K.zero_blocks(data, 4096), repeat),
        "zero_blocks_zero": best_of(lambda: K.zero_blocks(zeros, 4096), repeat),
    }
    gbps = {k: n / s / 1e9 for k, s in secs.items()}

    # correctness on a sample: the wire format is XXH64 (seed 0) of each block
    hashes = K.block_hashes(data, 4096)
    sample = np.random.default_rng(7).choice(len(hashes), 64, replace=False)
    mismatches = sum(int(hashes[i]) != xxhash.xxh64_intdigest(data[i * 4096:(i + 1) * 4096]) for i in sample)
    zero_ok = bool(K.zero_blocks(zeros, 4096).all() and not K.zero_blocks(data, 4096).any())

    ratio = gbps["block_hashes_4k"] / gbps["numpy_read"]
    goal_ok = gbps["block_hashes_4k"] >= GOAL_GBPS
    ok = mismatches == 0 and zero_ok
    if args.json:
        print(json.dumps({
            "mib": mib, "repeat": repeat, "backend": K.backend(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "gbps": {k: round(v, 3) for k, v in gbps.items()}, "hash_to_read_ratio": round(ratio, 3),
            "first_use_s": round(first_use, 3), "self_test_s": round(self_test, 4),
            "hash_sample_mismatches": mismatches, "zero_blocks_ok": zero_ok,
            "goal": {"min_gbps_per_core": GOAL_GBPS, "pass": goal_ok},
        }))
    else:
        import numba
        print(f"{cpu_model()}, {os.cpu_count()} cores; numpy {np.__version__}, numba {numba.__version__}; "
              f"backend {K.backend()}; one thread, {mib} MiB, best of {repeat}")
        print(f"first use (compile or cache load + self-test) {first_use:.2f} s; self-test alone {self_test * 1e3:.0f} ms")
        print(f"{'':24}{'GB/s':>8}")
        print(f"{'block_hashes 4 KiB':24}{gbps['block_hashes_4k']:8.2f}   "
              f"({ratio:.2f} x numpy read)")
        print(f"{'block_hashes 64 KiB':24}{gbps['block_hashes_64k']:8.2f}")
        print(f"{'numpy read (sum u64)':24}{gbps['numpy_read']:8.2f}")
        print(f"{'numpy copy (copyto)':24}{gbps['numpy_copy']:8.2f}")
        print(f"{'zero_blocks, random':24}{gbps['zero_blocks_random']:8.2f}   (early exit per block)")
        print(f"{'zero_blocks, all zero':24}{gbps['zero_blocks_zero']:8.2f}   "
              f"({gbps['zero_blocks_zero'] / gbps['numpy_read']:.2f} x numpy read)")
        print(f"hash sample vs xxhash.xxh64: {'OK' if not mismatches else f'{mismatches} MISMATCHES'}; "
              f"zero_blocks: {'OK' if zero_ok else 'WRONG'}")
        print(f"goal: >= {GOAL_GBPS:g} GB/s per core (block_hashes 4 KiB): "
              f"{'PASS' if goal_ok else 'MISS'} ({gbps['block_hashes_4k']:.2f})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
