"""Delta sync end to end: lab hosts, protected VRAs, a recovery VRA, the WAN link.

Initial sync into empty replicas, delta sync into an existing replica after the change
tracking was lost, and a delta sync under a running workload: in each case only the differing
4 KiB blocks move (zero blocks as ZERO records without data), and a valid checkpoint taken
afterwards has images equal to the source disks.

Sparse disks (holes on one side, both or neither): only data extents are read, holes on both
sides are not hashed at all, a hole against data is still compared and synced, and the hashes
of both sides (the recovery VRA's zero runs expanded) equal the reference kernels' hashes of the
bytes read plainly.
"""
import base64
import ctypes
import os
import random
import threading
import time

import numpy as np
import pytest
import requests

from appliance import extents, kernels
from appliance.kernels import reference
from test_replication import VPG, check_images, cut, replication, valid_cut, wait_until, workloads

BS = 4096


def _write(lab, vm, disk, offset, data):
    lab.api("site-a", "POST", f"/api/vms/{vm}/write",
            json={"disk": disk, "offset": offset, "data": base64.b64encode(data).decode()})


def _clear_bitmaps(lab, vms):
    for v in vms:
        for d in v["disks"]:
            lab.api("site-a", "POST", f"/api/vms/{v['name']}/disks/{d['index']}/bitmap/clear")


def _pre_existing_data(lab, vms, seed=1, writes=24):
    """Data written before protection started; the dirty bitmaps are then cleared, as for disks
    that were never tracked: only a delta (initial) sync can bring it over."""
    rnd = random.Random(seed)
    for v in vms:
        for d in v["disks"]:
            nblocks = d["capacity_bytes"] // BS
            for _ in range(writes):
                n = rnd.choice((1, 4, 16, 64))
                b = rnd.randrange(nblocks - n)
                _write(lab, v["name"], d["index"], b * BS, rnd.randbytes(n * BS))
    _clear_bitmaps(lab, vms)


def _source_blocks(vms):
    """{(vm uuid, disk): bool array of non-zero 4 KiB blocks} read from the source disk files."""
    out = {}
    for v in vms:
        for d in v["disks"]:
            with open(d["path"], "rb") as f:
                data = f.read(d["capacity_bytes"])
            data += bytes(d["capacity_bytes"] - len(data))
            out[(v["instance_uuid"], d["index"])] = ~kernels.zero_blocks(data, BS)
    return out


@pytest.fixture
def dsetup(tmp_path):
    """test_replication's setup, with data on the source disks before any VRA exists."""
    with replication(tmp_path, before=_pre_existing_data) as s:
        yield s


def sync_all(p):
    return p.call("POST", f"/v1/protected/vpgs/{VPG}/sync", json={"all": True})


def test_initial_sync_moves_only_non_zero_blocks(dsetup):
    rec, leader, prot, vms = dsetup["rec"], dsetup["leader"], dsetup["prot"], dsetup["vms"]
    nonzero = _source_blocks(vms)
    total = sum(int(m.sum()) for m in nonzero.values())
    assert total > 0
    out = [sync_all(p) for p in prot.values()]
    assert sum(len(o["disks"]) for o in out) == sum(len(v["disks"]) for v in vms)
    for o in out:
        for d in o["disks"]:
            want = int(nonzero[(d["vm"], d["disk"])].sum())
            assert d["blocks_differing"] == want        # the replica is empty: every data block
            assert d["blocks_sent"] == want and d["zero_blocks"] == 0
            assert d["blocks_compared"] == len(nonzero[(d["vm"], d["disk"])])
            assert d["bytes_sent"] == want * BS
    final = valid_cut(leader)
    check_images(rec, {final["id"]: final["hashes"]}, vms)
    again = [sync_all(p) for p in prot.values()]            # in sync now: nothing moves
    assert sum(o["blocks_differing"] for o in again) == 0


def test_delta_sync_after_lost_change_tracking(dsetup):
    lab, rec, leader, prot, vms = dsetup["lab"], dsetup["rec"], dsetup["leader"], dsetup["prot"], dsetup["vms"]
    for p in prot.values():
        sync_all(p)
    first = valid_cut(leader)
    check_images(rec, {first["id"]: first["hashes"]}, vms)
    # Everything streamed is durable and acknowledged: the ring of h1 is empty.
    host = "site-a-h1"
    url = lab.api("site-a", "GET", f"/api/hosts/{host}")["url"]
    mirror = lambda: requests.get(url + "/status", timeout=10).json()["mirror"]
    wait_until(lambda: (lambda m: m["head"] == m["tail"])(mirror()), what="the ring to drain")
    other = prot[host]
    other.stop()                                                  # the host tracks in its bitmap
    wait_until(lambda: not mirror()["attached"], what="the VRA to detach")
    mine = [v for v in vms if v["host"] == host]
    assert mine
    nonzero = _source_blocks(mine)
    rnd = random.Random(5)
    changed = zeroed = 0
    for v in mine:
        for d in v["disks"]:
            nz = nonzero[(v["instance_uuid"], d["index"])]
            nblocks = len(nz)
            data_blocks = [int(b) for b in np.flatnonzero(nz)]
            zero_these = set(rnd.sample(data_blocks, min(4, len(data_blocks))))
            new = set(rnd.sample(range(nblocks), nblocks // 100)) - zero_these    # ~1%
            for b in zero_these:
                _write(lab, v["name"], d["index"], b * BS, bytes(BS))
            for b in new:
                _write(lab, v["name"], d["index"], b * BS, rnd.randbytes(BS))
            changed += len(new) + len(zero_these)
            zeroed += len(zero_these)
    _clear_bitmaps(lab, mine)                                     # the change tracking is lost
    other.start()
    out = sync_all(other)
    assert out["blocks_differing"] == changed
    assert out["zero_blocks"] == zeroed and out["blocks_sent"] == changed - zeroed
    assert out["blocks_compared"] == sum(d["capacity_bytes"] // BS for v in mine for d in v["disks"])
    assert sync_all(prot["site-a-h0"])["blocks_differing"] == 0
    final = valid_cut(leader)
    check_images(rec, {final["id"]: final["hashes"]}, vms)


def _behind_the_filter(vms, seed):
    """Random content over every source disk, written into the disk files directly (as by
    something the IO filter never saw): only a delta sync brings it over."""
    rnd = random.Random(seed)
    for v in vms:
        for d in v["disks"]:
            fd = os.open(d["path"], os.O_WRONLY)
            try:
                os.pwrite(fd, rnd.randbytes(d["capacity_bytes"]), 0)
                os.fsync(fd)
            finally:
                os.close(fd)


def test_delta_sync_under_a_running_workload_converges(dsetup):
    lab, rec, leader, prot, vms = dsetup["lab"], dsetup["rec"], dsetup["leader"], dsetup["prot"], dsetup["vms"]
    # Every block differs, more per host than its 16 MiB ring holds, and the senders are held
    # to 2 MB/s: each host's delta sync waits for ring space for seconds, under the workload.
    _behind_the_filter(vms, seed=5)
    for p in prot.values():
        p.call("PUT", "/v1/protected/bandwidth", json={"mbps": 2.0})
    workloads(lab, vms, "start", mbps=3.0)
    results, errors = [], []

    def run(p):
        try:
            results.append(sync_all(p))
        except Exception as exc:        # reported below
            errors.append(exc)

    def syncs(p):
        st = p.call("GET", "/v1/status").get("delta_syncs", {}).get(VPG) or {}
        return st.get("running", 0), st.get("started", 0)

    threads = [threading.Thread(target=run, args=(p,)) for p in prot.values()]
    for t in threads:
        t.start()
    # A checkpoint taken while a delta sync runs is never valid, and says why. A cut counts when
    # a sync of the same VRA ran just before it and just after it with none started in between:
    # then one sync ran through the whole barrier (one that ended just before the barrier
    # leaves a consistent cut).
    checked = 0
    deadline = time.monotonic() + 30
    while checked < 3 and time.monotonic() < deadline and any(t.is_alive() for t in threads):
        for name, p in prot.items():
            r0, s0 = syncs(p)
            if r0:
                out = cut(leader, {})
                r1, s1 = syncs(p)
                if r1 and s1 == s0:
                    assert not out["valid"], (out, (r0, s0), (r1, s1))
                    assert any(pr.startswith(f"{p.name}:") and "a delta sync running" in pr
                               for pr in out["problems"]), out["problems"]
                    checked += 1
        time.sleep(0.05)
    assert checked, "no checkpoint was taken while a delta sync ran through it"
    for p in prot.values():
        p.call("PUT", "/v1/protected/bandwidth", json={"mbps": None})
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a delta sync did not end"
    assert not errors, errors
    assert sum(r["blocks_sent"] for r in results) > 0       # the first round moved the data
    time.sleep(0.5)
    workloads(lab, vms, "stop")
    for p in prot.values():
        sync_all(p)                                 # the final pass: little or nothing differs
    final = valid_cut(leader)
    check_images(rec, {final["id"]: final["hashes"]}, vms)


# -- sparse disks ------------------------------------------------------------------------------
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _punch(path, offset, length):
    """Deallocate a range of a disk file behind the IO filter (a TRIM the VRA never sees)."""
    fd = os.open(path, os.O_RDWR)
    try:
        if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), path)
    finally:
        os.close(fd)


def _extents(path, capacity):
    fd = os.open(path, os.O_RDONLY)
    try:
        return extents.data_extents(fd, 0, capacity)
    finally:
        os.close(fd)


def _sparse_data(lab, vms):
    """Three data extents per disk (64 KiB, one block, the last block), the rest holes."""
    rnd = random.Random(3)
    for v in vms:
        for d in v["disks"]:
            cap = d["capacity_bytes"]
            for off, n in ((cap // 8, 64 << 10), (cap // 2 + 3 * BS, BS), (cap - BS, BS)):
                _write(lab, v["name"], d["index"], off, rnd.randbytes(n))
    _clear_bitmaps(lab, vms)


def _reference_hashes(path, capacity):
    with open(path, "rb") as f:
        data = f.read(capacity)
    data += bytes(capacity - len(data))
    return reference.block_hashes(np.frombuffer(data, dtype=np.uint8), BS)


def _recovery_hashes(rec, vm, disk, capacity, zero_runs):
    """The recovery VRA's hashes of a whole disk (format 2 expanded), and its zero-run blocks."""
    h = rec.call("GET", f"/v1/recovery/vpgs/{VPG}/disks/{vm}/{disk}/hashes",
                 params={"offset": 0, "length": capacity, "block_size": BS,
                         **({"zero_runs": 1} if zero_runs else {})})
    got = np.frombuffer(base64.b64decode(h["hashes"]), dtype="<u8")
    nb = -(-capacity // BS)
    if not zero_runs:
        assert "format" not in h and "zero_runs" not in h
        return got, 0
    assert h["format"] == 2
    hole = np.zeros(nb, dtype=bool)
    for first, count in h["zero_runs"]:
        assert not hole[first:first + count].any()
        hole[first:first + count] = True
    full = np.full(nb, reference.block_hashes(np.zeros(BS, dtype=np.uint8), BS)[0], dtype=np.uint64)
    full[~hole] = got
    return full, int(hole.sum())


def _binary_hashes(rec, vm, disk, offset, length):
    """The recovery VRA's binary (format 3) answer, frames expanded: (hashes, zero-run blocks)."""
    from test_replication import H
    r = requests.get(f"{rec.url}/v1/recovery/vpgs/{VPG}/disks/{vm}/{disk}/hashes", headers=H, timeout=60,
                     params={"offset": offset, "length": length, "block_size": BS, "zero_runs": 1, "format": 3})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "application/x-tidemark-hashes"
    assert r.headers["X-Tidemark-Hash-Format"] == "3"
    assert r.headers["X-Tidemark-Hash-Version"] == str(kernels.HASH_VERSION)
    assert (int(r.headers["X-Tidemark-Offset"]), int(r.headers["X-Tidemark-Length"])) == (offset, length)
    body, at, parts, in_runs = r.content, 0, [], 0
    zero = reference.block_hashes(np.zeros(BS, dtype=np.uint8), BS)[0]
    while at < len(body):
        count, nruns = np.frombuffer(body, dtype="<u4", count=2, offset=at)
        assert count != 0xFFFFFFFF, body[at + 8:].decode()
        at += 8
        hole = np.zeros(int(count), dtype=bool)
        for first, c in np.frombuffer(body, dtype="<u4", count=2 * int(nruns), offset=at).reshape(-1, 2).tolist():
            assert c > 0 and not hole[first:first + c].any()
            hole[first:first + c] = True
        at += 8 * int(nruns)
        full = np.full(int(count), zero, dtype=np.uint64)
        k = int(count - hole.sum())
        full[~hole] = np.frombuffer(body, dtype="<u8", count=k, offset=at)
        at += 8 * k
        parts.append(full)
        in_runs += int(hole.sum())
    got = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
    assert len(got) == -(-length // BS)
    return got, in_runs


def _check_recovery_hashes(rec, vms):
    """Every answer format equals the reference hashes of the source disks; blocks in zero runs."""
    in_runs = 0
    for v in vms:
        for d in v["disks"]:
            cap = d["capacity_bytes"]
            want = _reference_hashes(d["path"], cap)
            for zr in (False, True):
                got, n = _recovery_hashes(rec, v["instance_uuid"], d["index"], cap, zr)
                assert np.array_equal(got, want), f"{v['name']} disk {d['index']} (zero_runs {zr})"
                in_runs += n
            # binary, streamed per 16 MiB step: the whole disk, and a range not on a step boundary
            got, m = _binary_hashes(rec, v["instance_uuid"], d["index"], 0, cap)
            assert np.array_equal(got, want) and m == n, f"{v['name']} disk {d['index']} (format 3)"
            got, _ = _binary_hashes(rec, v["instance_uuid"], d["index"], 5 * BS, cap - 5 * BS - 100)
            assert np.array_equal(got[:-1], want[5:-1]), f"{v['name']} disk {d['index']} (format 3, part)"
    return in_runs


def _promote_all(rec, tmp):
    """Promote the whole journal into the replicas (hard limit 1 byte, then none again): the
    replicas then hold the data in place, sparse, and no journal entry touches them."""
    disks_body = {"replica_dir": str(tmp / "replicas")}
    rec.call("PUT", f"/v1/recovery/vpgs/{VPG}", json={**disks_body, "hard_limit_bytes": 1})
    rec.call("POST", "/v1/recovery/maintain")
    rec.call("PUT", f"/v1/recovery/vpgs/{VPG}", json=disks_body)
    assert rec.call("GET", f"/v1/recovery/vpgs/{VPG}/usage")["entries"] == 0


def test_file_hashes_of_a_sparse_file_equal_the_reference(tmp_path):
    path = tmp_path / "disk"
    cap = 9 * (1 << 20) + 1000                      # a partial last block
    rnd = random.Random(11)
    with open(path, "wb") as f:
        f.truncate(cap)
        for off, n in ((5000, 3000), (1 << 20, 64 << 10), (4 << 20, BS), (cap - 500, 500)):
            f.seek(off)
            f.write(rnd.randbytes(n))
        f.seek(6 << 20)
        f.write(bytes(2 * BS))                       # allocated zeros: data, hashed as zeros
    fd = os.open(path, os.O_RDONLY)
    try:
        for off, n in ((0, cap), (BS, 3 << 20), (2 << 20, 1 << 20), (cap - 1000, 1000), (0, cap + (1 << 20))):
            hashes, hole, nread = extents.file_hashes(fd, off, n, BS)
            data = os.pread(fd, n, off)
            want = reference.block_hashes(np.frombuffer(data + bytes(n - len(data)), dtype=np.uint8), BS)
            assert np.array_equal(hashes, want), (off, n)
            read_blocks = int((~hole).sum())          # the last one may be partial
            assert BS * (read_blocks - 1) < nread <= BS * read_blocks or read_blocks == nread == 0
            assert not (~reference.zero_blocks(np.frombuffer(data + bytes(n - len(data)), dtype=np.uint8),
                                               BS) & hole).any()      # a hole block is zeros
        hashes, hole, nread = extents.file_hashes(fd, 0, cap, BS)
        assert nread < cap // 8 and hole.sum() > 0.9 * len(hole)  # the holes were not read
    finally:
        os.close(fd)


@pytest.fixture
def ssetup(tmp_path):
    """test_replication's setup with sparse source disks: a few data extents each."""
    with replication(tmp_path, before=_sparse_data) as s:
        yield s


def test_initial_sync_of_sparse_disks_reads_only_their_data(ssetup):
    rec, leader, prot, vms = ssetup["rec"], ssetup["leader"], ssetup["prot"], ssetup["vms"]
    nonzero = _source_blocks(vms)
    # the empty replicas are holes: format 2 answers them without a hash
    for v in vms:
        for d in v["disks"]:
            got, n = _recovery_hashes(rec, v["instance_uuid"], d["index"], d["capacity_bytes"], True)
            assert n == -(-d["capacity_bytes"] // BS)
    out = [sync_all(p) for p in prot.values()]
    for o in out:
        for d in o["disks"]:
            nz = nonzero[(d["vm"], d["disk"])]
            want = int(nz.sum())
            assert want == 16 + 1 + 1
            assert d["blocks_differing"] == want and d["blocks_sent"] == want and d["zero_blocks"] == 0
            assert d["blocks_compared"] == len(nz)
            assert want * BS <= d["bytes_read"] < len(nz) * BS // 8       # holes were not read
            # every block not read is a hole on both sides: neither read nor hashed anywhere
            assert d["blocks_in_holes"] == len(nz) - d["bytes_read"] // BS
    final = valid_cut(leader)
    check_images(rec, {final["id"]: final["hashes"]}, vms)
    _check_recovery_hashes(rec, vms)
    _promote_all(rec, ssetup["tmp"])                # now the replicas are sparse files too
    assert _check_recovery_hashes(rec, vms) > 0
    again = [sync_all(p) for p in prot.values()]
    assert sum(o["blocks_differing"] for o in again) == 0
    assert sum(o["blocks_in_holes"] for o in again) > 0.9 * sum(o["blocks_compared"] for o in again)


def test_replica_data_where_the_source_has_a_hole_is_zeroed(dsetup):
    rec, leader, prot, vms = dsetup["rec"], dsetup["leader"], dsetup["prot"], dsetup["vms"]
    for p in prot.values():
        sync_all(p)
    first = valid_cut(leader)
    check_images(rec, {first["id"]: first["hashes"]}, vms)
    _promote_all(rec, dsetup["tmp"])                # the data is in the replica files now
    before = _source_blocks(vms)
    rnd = random.Random(9)
    punched = 0
    for v in vms:
        for d in v["disks"]:
            data = _extents(d["path"], d["capacity_bytes"])
            assert data, "the source should have data extents"
            for a, b in rnd.sample(data, min(3, len(data))):      # whole extents, and a part
                _punch(d["path"], a, b - a)
            a, b = max(data, key=lambda e: e[1] - e[0])
            if b - a > 2 * BS:
                _punch(d["path"], a + BS, BS)
            nz = before[(v["instance_uuid"], d["index"])]
            punched += int((nz & ~_source_blocks([v])[(v["instance_uuid"], d["index"])]).sum())
    assert punched > 0
    out = [sync_all(p) for p in prot.values()]
    assert sum(o["blocks_differing"] for o in out) == punched
    assert sum(o["zero_blocks"] for o in out) == punched          # as ZERO records, no data
    assert sum(o["blocks_sent"] for o in out) == 0
    assert sum(o["bytes_sent"] for o in out) == 0
    final = valid_cut(leader)
    check_images(rec, {final["id"]: final["hashes"]}, vms)
    _check_recovery_hashes(rec, vms)
    assert sum(sync_all(p)["blocks_differing"] for p in prot.values()) == 0


def test_delta_sync_of_sparse_source_into_sparse_replica(ssetup):
    rec, leader, prot, vms = ssetup["rec"], ssetup["leader"], ssetup["prot"], ssetup["vms"]
    for p in prot.values():
        sync_all(p)
    first = valid_cut(leader)
    check_images(rec, {first["id"]: first["hashes"]}, vms)
    _promote_all(rec, ssetup["tmp"])
    # Behind the IO filter: the first extent punched, new data where both sides had holes,
    # and new data over the second extent (data against data).
    rnd = random.Random(13)
    changed = zeroed = 0
    for v in vms:
        for d in v["disks"]:
            cap = d["capacity_bytes"]
            _punch(d["path"], cap // 8, 64 << 10)
            zeroed += 16
            fd = os.open(d["path"], os.O_WRONLY)
            try:
                for off in (BS, cap // 4, cap // 4 + BS, cap // 2 + 3 * BS):
                    os.pwrite(fd, rnd.randbytes(BS), off)
            finally:
                os.close(fd)
            changed += 4
    out = [sync_all(p) for p in prot.values()]
    assert sum(o["blocks_differing"] for o in out) == changed + zeroed
    assert sum(o["zero_blocks"] for o in out) == zeroed
    assert sum(o["blocks_sent"] for o in out) == changed
    compared = sum(o["blocks_compared"] for o in out)
    assert sum(o["blocks_in_holes"] for o in out) > 0.9 * compared
    assert sum(o["bytes_read"] for o in out) < compared * BS // 8
    final = valid_cut(leader)
    check_images(rec, {final["id"]: final["hashes"]}, vms)
    _check_recovery_hashes(rec, vms)
    assert sum(sync_all(p)["blocks_differing"] for p in prot.values()) == 0
