"""Delta sync end to end: lab hosts, protected VRAs, a recovery VRA, the WAN link.

Initial sync into empty replicas, delta sync into an existing replica after the change
tracking was lost, and a delta sync under a running workload: in each case only the differing
4 KiB blocks move (zero blocks as ZERO records without data), and a valid checkpoint taken
afterwards has images equal to the source disks.
"""
import base64
import random
import threading
import time

import numpy as np
import pytest
import requests

from appliance import kernels
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


def test_delta_sync_under_a_running_workload_converges(dsetup):
    lab, rec, leader, prot, vms = dsetup["lab"], dsetup["rec"], dsetup["leader"], dsetup["prot"], dsetup["vms"]
    workloads(lab, vms, "start", mbps=3.0)
    results, errors = {}, []

    def run(name, p):
        try:
            results[name] = sync_all(p)
        except Exception as exc:        # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n, p)) for n, p in prot.items()]
    for t in threads:
        t.start()
    # A checkpoint taken while a delta sync runs is never valid.
    seen = None
    deadline = time.monotonic() + 30
    while seen is None and time.monotonic() < deadline and any(t.is_alive() for t in threads):
        for p in prot.values():
            if (p.call("GET", "/v1/status").get("delta_syncs", {}).get(VPG) or {}).get("running"):
                seen = p
        if seen is None:
            time.sleep(0.01)
    if seen is not None:
        assert not cut(leader, {})["valid"]
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sum(r["blocks_sent"] for r in results.values()) > 0
    time.sleep(0.5)
    workloads(lab, vms, "stop")
    for p in prot.values():
        sync_all(p)                                 # the final pass: little or nothing differs
    final = valid_cut(leader)
    check_images(rec, {final["id"]: final["hashes"]}, vms)
