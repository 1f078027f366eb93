"""The host IO path in-process: mirror stream, bitmap fallback, crash recovery."""
import os
import random
import threading
import time
import uuid

import pytest

from simulator import ring as R
from simulator.host import Host
from simulator.iopath import sha256_file
from simulator.mirror import MirrorClient, Replayer

MiB = 1 << 20


def make_host(tmp_path, name="h0", ring_capacity=32 * MiB):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    state = {"host": name, "site": "s", "dir": str(d), "ring_path": str(d / "mirror.ring"),
             "ring_capacity": ring_capacity, "sock_path": str(d / "mirror.sock")}
    host = Host(state)
    stop = threading.Event()
    t = threading.Thread(target=host.serve_doorbell, args=(stop,), daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while not os.path.exists(state["sock_path"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return host, stop


def vm_cfg(tmp_path, name, disks=(16 * MiB,)):
    vmdir = tmp_path / "ds" / name
    vmdir.mkdir(parents=True, exist_ok=True)
    return {"name": name, "instance_uuid": str(uuid.uuid5(uuid.NAMESPACE_DNS, name)),
            "disks": [{"index": i, "path": str(vmdir / f"disk{i}.img"), "capacity_bytes": c}
                      for i, c in enumerate(disks)]}


def drain(client, replayer, idle=0.5):
    for rec in client.records(idle_timeout=idle):
        replayer.apply(rec, client.ring.ring_id)
        client.ack()


def stop_consumer(stop, t, timeout=10):
    """Tell a consumer thread to stop once its stream is idle, and check that it did."""
    stop.set()
    t.join(timeout)
    assert not t.is_alive(), "the consumer thread did not stop"


@pytest.fixture
def host(tmp_path):
    h, stop = make_host(tmp_path)
    yield h
    h.shutdown()
    stop.set()


def replica_paths(tmp_path, cfg):
    return [str(tmp_path / f"replica-{cfg['name']}-{d['index']}.img") for d in cfg["disks"]]


def run_workloads(host, cfgs, spec, client, rep, timeout):
    """Power the VMs on with ``spec`` while a thread replays the stream; return once the
    workloads finished, with the replay thread still running (its stop event and thread)."""
    for c in cfgs:
        host.start_vm({**c, "workload": {"state": "running", "spec": spec}}, "power-on")
    stop = threading.Event()
    t = threading.Thread(target=lambda: [drain(client, rep, idle=0.3) for _ in iter(stop.is_set, True)])
    t.start()
    deadline = time.monotonic() + timeout
    while any(w.state != "stopped" for w in host.workloads.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return stop, t


@pytest.mark.parametrize("pattern,seed", [("random", 1), ("sequential", 2), ("hotspot", 3)])
def test_replay_reproduces_source(tmp_path, host, pattern, seed):
    cfgs = [vm_cfg(tmp_path, f"vm{i}", disks=(16 * MiB, 8 * MiB)) for i in range(2)]
    client = MirrorClient(host.doorbell_path, vra="test")
    rep = Replayer({c["instance_uuid"]: replica_paths(tmp_path, c) for c in cfgs})
    spec = {"mbps": 0, "block_sizes": [4096, 65536, 1 << 20], "pattern": pattern, "seed": seed,
            "total_bytes": 24 * MiB}
    stop, t = run_workloads(host, cfgs, spec, client, rep, timeout=60)
    # On a loaded machine the consumer may fall behind the unthrottled guests for more than
    # the 50 ms budget: those writes go to the bitmap, and the stream shows it as vm_seq gaps.
    # A bitmap sync through the ring then brings the replica up to date, in order.
    ring = host.io.ring

    def drained():
        deadline = time.monotonic() + 30
        while ring.tail() != ring._head and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)

    drained()
    assert not rep.gaps or host.io.stats.bitmap_writes     # a gap only where writes went to the bitmap
    for c in cfgs:
        host.io.sync(c["instance_uuid"])     # streamed while the consumer keeps draining
    drained()
    stop_consumer(stop, t)
    drain(client, rep, idle=0.3)
    for c in cfgs:
        for d, replica in zip(c["disks"], replica_paths(tmp_path, c)):
            assert sha256_file(replica, d["capacity_bytes"]) == sha256_file(d["path"], d["capacity_bytes"])
    rep.close()
    client.close()


def test_vra_gone_then_back_bitmap_covers_gap(tmp_path, host):
    cfg = vm_cfg(tmp_path, "vm0")
    host.start_vm(cfg, "power-on")
    uid = cfg["instance_uuid"]
    rep = Replayer({uid: replica_paths(tmp_path, cfg)})
    client = MirrorClient(host.doorbell_path, vra="test")
    spec = {"mbps": 0, "block_sizes": [4096, 65536], "seed": 7}
    host.workload(uid, {"action": "start", "spec": {**spec, "total_bytes": 4 * MiB}})
    time.sleep(0.3)
    drain(client, rep)
    client.close()                         # the VRA goes away (records it had not acked too)
    deadline = time.monotonic() + 5
    while host.io.attached and time.monotonic() < deadline:
        time.sleep(0.01)
    host.workload(uid, {"action": "start", "spec": {**spec, "seed": 8, "total_bytes": 6 * MiB}})
    deadline = time.monotonic() + 30
    while host.workloads[uid].state != "stopped" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host.io.stats.bitmap_writes > 0
    assert host.io.vms[uid].disks[0].dirty_count() > 0
    client = MirrorClient(host.doorbell_path, vra="test")   # back: sync the bitmap in-stream
    host.workload(uid, {"action": "start", "spec": {**spec, "seed": 9, "total_bytes": 4 * MiB,
                                                     "mbps": 20}})
    stop = threading.Event()
    t = threading.Thread(target=lambda: [drain(client, rep, idle=0.1) for _ in iter(stop.is_set, True)])
    t.start()
    try:
        sent = host.io.sync(uid)
        deadline = time.monotonic() + 30
        while host.workloads[uid].state != "stopped" and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop_consumer(stop, t)
    assert sent > 0
    drain(client, rep)
    assert host.io.vms[uid].disks[0].dirty_count() == 0
    d = cfg["disks"][0]
    assert sha256_file(replica_paths(tmp_path, cfg)[0], d["capacity_bytes"]) == \
        sha256_file(d["path"], d["capacity_bytes"])
    client.close()


def test_full_ring_falls_back_to_bitmap_within_budget(tmp_path):
    host, stop = make_host(tmp_path, ring_capacity=2 * MiB)
    try:
        cfg = vm_cfg(tmp_path, "vm0")
        host.start_vm(cfg, "power-on")
        client = MirrorClient(host.doorbell_path, vra="slow")   # attached, never reads
        uid = cfg["instance_uuid"]
        host.workload(uid, {"action": "start", "spec": {"mbps": 0, "block_sizes": [65536],
                                                         "seed": 3, "total_bytes": 8 * MiB}})
        deadline = time.monotonic() + 30
        while host.workloads[uid].state != "stopped" and time.monotonic() < deadline:
            time.sleep(0.05)
        s = host.io.stats
        assert s.mirrored_writes > 0 and s.bitmap_writes > 0
        # 50 ms budget; beyond it only the scheduler's lateness on a busy machine
        assert s.max_stall_ms < 150
        client.close()
    finally:
        host.shutdown()
        stop.set()


def test_corrupt_record_is_detected_not_served(tmp_path, host):
    cfg = vm_cfg(tmp_path, "vm0")
    host.start_vm(cfg, "power-on")
    client = MirrorClient(host.doorbell_path, vra="test")
    host.write(cfg["instance_uuid"], 0, 4096, b"x" * 4096)
    recs = list(client.records(idle_timeout=0.2))
    pos = recs[-1].pos
    off = R.HEADER_SIZE + pos % client.ring.capacity + R.PAYLOAD_OFFSET + 10
    host.io.ring.mm[off] ^= 0xFF           # flip a byte of the payload in the ring
    client.ring.cursor = pos
    with pytest.raises(R.RingCorrupt):
        client.ring.poll()
    client.close()


def test_failed_disk_write_becomes_padding_and_dirty_and_the_stream_goes_on(tmp_path, host):
    """A disk write that fails (here a real EBADF: the disk's write descriptor is read-only)
    fails the guest's write, leaves no half-made record in the ring for the VRA to wait on
    and marks the region dirty; the next write is mirrored as usual, and the replica matches
    the disk once the bitmap is synced."""
    import errno
    from simulator.iopath import dirty_blocks
    cfg = vm_cfg(tmp_path, "vm0")
    host.start_vm(cfg, "power-on")
    uid = cfg["instance_uuid"]
    rep = Replayer({uid: replica_paths(tmp_path, cfg)})
    client = MirrorClient(host.doorbell_path, vra="test")
    disk = host.io.vms[uid].disks[0]
    host.write(uid, 0, 0, b"a" * 65536)
    good_wfd = disk.wfd
    disk.wfd = ro = os.open(disk.path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as err:
            host.write(uid, 0, 5 * 65536, b"b" * 65536)
        assert err.value.errno == errno.EBADF
    finally:
        disk.wfd = good_wfd
        os.close(ro)
    assert set(dirty_blocks(disk.bitmap())) == {5}
    assert host.io.stats.mirrored_writes == 1
    host.write(uid, 0, 7 * 65536, b"c" * 65536)
    recs = list(client.records(idle_timeout=0.3))
    assert [(r.type, r.offset) for r in recs if r.type == R.WRITE] == [(R.WRITE, 0),
                                                                       (R.WRITE, 7 * 65536)]
    for r in recs:
        rep.apply(r, client.ring.ring_id)
    client.ack()
    stop = threading.Event()
    t = threading.Thread(target=lambda: [drain(client, rep, idle=0.1) for _ in iter(stop.is_set, True)])
    t.start()
    try:
        assert host.io.sync(uid) == 1
    finally:
        stop_consumer(stop, t)
    drain(client, rep)
    assert disk.dirty_count() == 0
    d = cfg["disks"][0]
    assert sha256_file(replica_paths(tmp_path, cfg)[0], d["capacity_bytes"]) == \
        sha256_file(d["path"], d["capacity_bytes"])
    client.close()


def test_crash_recovery_marks_uncommitted_and_unconsumed(tmp_path):
    host, stop = make_host(tmp_path)
    cfg = vm_cfg(tmp_path, "vm0")
    host.start_vm(cfg, "power-on")
    client = MirrorClient(host.doorbell_path, vra="test")
    uid = cfg["instance_uuid"]
    vm = host.io.vms[uid]
    host.write(uid, 0, 0, b"a" * 65536)                 # committed, not consumed
    # A write whose producer "died" after the disk write but before the commit:
    pos, seq, view = host.io.ring.try_reserve(65536)
    view[:] = b"b" * 65536
    host.io.ring.commit_header(pos, R.WRITE, seq, 0, vm.generation, vm.vm_seq + 1, 10 * 65536,
                               vm.uuid_bytes, view)
    os.pwrite(vm.disks[0].fd, view, 10 * 65536)
    # Simulate the process dying: nothing more runs; a new host opens the same ring.
    stop.set()
    host2 = Host({**host.state, "running": [cfg]})
    host2.start_vm(cfg, "host-restart")
    dirty = set()
    from simulator.iopath import dirty_blocks
    dirty = set(dirty_blocks(host2.io.vms[uid].disks[0].bitmap()))
    assert {0, 10} <= dirty
    host2.shutdown()
    client.close()


def test_4gib_disk_offsets_beyond_32_bits(tmp_path, host):
    cfg = vm_cfg(tmp_path, "big", disks=(4 << 30,))
    host.start_vm(cfg, "power-on")
    uid = cfg["instance_uuid"]
    client = MirrorClient(host.doorbell_path, vra="test")
    rep = Replayer({uid: replica_paths(tmp_path, cfg)})
    ends = [(4 << 30) - 65536, (1 << 32) - 4096, (3 << 30) + 12288, 0]
    for i, off in enumerate(ends):
        host.write(uid, 0, off, bytes([i + 1]) * 4096)
    drain(client, rep, idle=0.2)
    fd = os.open(replica_paths(tmp_path, cfg)[0], os.O_RDONLY)
    try:
        for i, off in enumerate(ends):
            assert os.pread(fd, 4096, off) == bytes([i + 1]) * 4096
    finally:
        os.close(fd)
    with pytest.raises(Exception):
        host.write(uid, 0, 4 << 30, b"x" * 4096)      # past the end: refused, nothing written
    rep.close()
    client.close()


@pytest.mark.slow
def test_replay_4gib_disks_random_workload(tmp_path, host):
    cfgs = [vm_cfg(tmp_path, f"vm{i}", disks=(4 << 30,)) for i in range(2)]
    client = MirrorClient(host.doorbell_path, vra="test")
    rep = Replayer({c["instance_uuid"]: replica_paths(tmp_path, c) for c in cfgs})
    spec = {"mbps": 0, "block_sizes": [4096, 65536, 1 << 20], "pattern": "random", "seed": 5,
            "total_bytes": 512 * MiB}
    stop, t = run_workloads(host, cfgs, spec, client, rep, timeout=300)
    stop_consumer(stop, t, 30)
    drain(client, rep, idle=0.3)
    assert host.io.stats.bitmap_writes == 0 and rep.gaps == []
    for c in cfgs:
        d = c["disks"][0]
        assert sha256_file(replica_paths(tmp_path, c)[0], d["capacity_bytes"]) == \
            sha256_file(d["path"], d["capacity_bytes"])
    rep.close()
    client.close()


def test_checkpoint_barrier_orders_writes_and_times_out(tmp_path, host):
    cfgs = [vm_cfg(tmp_path, f"vm{i}") for i in range(2)]
    uids = [c["instance_uuid"] for c in cfgs]
    client = MirrorClient(host.doorbell_path, vra="test")
    for c in cfgs:
        host.start_vm({**c, "workload": {"state": "running", "spec": {"mbps": 5, "block_sizes": [4096],
                                                                     "seed": 2}}}, "power-on")
    time.sleep(0.1)
    # A hold long enough that a busy machine cannot make it time out before the release.
    out = host.io.barrier("vpg1:1", uids, {"vpg": "vpg1", "checkpoint": 1}, hold=5)
    assert len(out["held_vms"]) == 2 and out["marker_seq"]
    writes = host.io.stats.writes
    time.sleep(0.1)
    assert host.io.stats.writes == writes          # held: no write completes
    assert host.io.release("vpg1:1")["in_time"] is True
    deadline = time.monotonic() + 5
    while host.io.stats.writes == writes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert host.io.stats.writes > writes             # released: writes go on
    for u in uids:
        host.workload(u, {"action": "stop"})
    recs = []
    for rec in client.records(idle_timeout=0.3):
        recs.append((rec.type, rec.seq, rec.vm_seq, bytes(rec.vm_uuid)))
        client.ack()
    marker = [r for r in recs if r[0] == R.MARKER]
    assert len(marker) == 1 and marker[0][1] == out["marker_seq"]
    host.io.barrier("vpg1:2", uids, {}, hold=0.02)
    time.sleep(0.1)
    assert host.io.release("vpg1:2")["in_time"] is False     # timed out: the cut does not count
    client.close()


def test_sync_blocks_streams_chosen_blocks_in_order_with_zero_records(tmp_path, host):
    """Delta sync's host half: differing blocks go through the ring in order with concurrent
    guest writes; all-zero blocks as ZERO records (8-byte payload), the rest as SYNC."""
    from simulator.host import create_app
    cap = 16 * MiB
    cfg = vm_cfg(tmp_path, "vm0", disks=(cap,))
    uid = cfg["instance_uuid"]
    host.start_vm(cfg, "power-on")
    rnd = random.Random(11)
    for _ in range(200):                                 # data from before protection
        off = rnd.randrange(cap // 4096) * 4096
        host.write(uid, 0, off, rnd.randbytes(4096 * rnd.choice((1, 3, 16))) [:cap - off])
    host.write(uid, 0, 1 * MiB, bytes(256 * 1024))       # a zero region inside written data
    host.io.vms[uid].disks[0].clear_bitmap()            # as if never tracked
    replica = replica_paths(tmp_path, cfg)[0]
    with open(replica, "wb") as f:                       # a stale replica: garbage everywhere
        f.write(rnd.randbytes(cap))
    client = MirrorClient(host.doorbell_path, vra="test")
    rep = Replayer({uid: [replica]})
    types = []

    def drain_counting(idle):
        for rec in client.records(idle_timeout=idle):
            types.append(rec.type)
            if rec.type == R.ZERO:
                assert len(rec.payload) == 8 and R.data_extent(rec)[1] % 4096 == 0
            rep.apply(rec, client.ring.ring_id)
            client.ack()

    stop = threading.Event()
    t = threading.Thread(target=lambda: [drain_counting(0.1) for _ in iter(stop.is_set, True)])
    t.start()
    host.workload(uid, {"action": "start", "spec": {"mbps": 20, "block_sizes": [4096, 65536],
                                                     "seed": 4, "total_bytes": 4 * MiB}})
    try:
        nblocks = cap // 4096
        half = nblocks // 2
        out = host.io.sync_blocks(uid, 0, 4096, range(half))          # the first half directly
        api = create_app(host).test_client()                          # the second half as runs
        r = api.post(f"/vms/{uid}/disks/0/sync-blocks",
                     json={"block_size": 4096, "runs": [[half, nblocks - half]]})
        assert r.status_code == 200, r.get_data(as_text=True)
        out2 = r.get_json()
        deadline = time.monotonic() + 30
        while host.workloads[uid].state != "stopped" and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop_consumer(stop, t)
    drain_counting(0.3)
    assert out["unsent"] == out2["unsent"] == 0
    assert out["blocks"] + out["zero_blocks"] + out2["blocks"] + out2["zero_blocks"] == nblocks
    assert out["zero_blocks"] >= 64                      # the zero region at least
    assert R.ZERO in types and R.SYNC in types
    assert rep.gaps == []
    assert sha256_file(replica, cap) == sha256_file(cfg["disks"][0]["path"], cap)
    st = api.get("/status").get_json()
    d = st["vms"][0]["disks"][0]
    assert d["path"] == cfg["disks"][0]["path"] and d["capacity_bytes"] == cap
    bad = api.post(f"/vms/{uid}/disks/0/sync-blocks", json={"block_size": 4096, "blocks": [nblocks]})
    assert bad.status_code == 400
    rep.close()
    client.close()


def test_sync_blocks_of_scattered_blocks_through_a_ring_that_fills(tmp_path):
    """Isolated blocks go in batches (one disk lock hold, committed together); a batch the ring
    cannot take whole goes in part and the rest follows once the consumer made room."""
    h, stop_bell = make_host(tmp_path, ring_capacity=256 * 1024)      # 64 blocks of ring
    try:
        cap = 16 * MiB
        cfg = vm_cfg(tmp_path, "vm0", disks=(cap,))
        uid = cfg["instance_uuid"]
        h.start_vm(cfg, "power-on")
        rnd = random.Random(12)
        nblocks = cap // 4096
        chosen = sorted(rnd.sample(range(nblocks), 700))
        for b in chosen[::3]:                           # data in a third of them, zeros elsewhere
            h.write(uid, 0, b * 4096, rnd.randbytes(4096))
        h.io.vms[uid].disks[0].clear_bitmap()
        replica = replica_paths(tmp_path, cfg)[0]
        with open(replica, "wb") as f:
            f.write(rnd.randbytes(cap))
        client = MirrorClient(h.doorbell_path, vra="test")
        rep = Replayer({uid: [replica]})
        stop = threading.Event()

        def drain():
            while not stop.is_set():
                for rec in client.records(idle_timeout=0.05):
                    rep.apply(rec, client.ring.ring_id)
                    client.ack()
                    time.sleep(0.0005)                  # a slow consumer: the ring fills
        t = threading.Thread(target=drain)
        t.start()
        try:
            out = h.io.sync_blocks(uid, 0, 4096, chosen + chosen[:5])     # duplicates are fine
        finally:
            stop_consumer(stop, t)
        for rec in client.records(idle_timeout=0.3):
            rep.apply(rec, client.ring.ring_id)
            client.ack()
        assert out["unsent"] == 0 and out["blocks"] + out["zero_blocks"] == len(chosen)
        assert out["blocks"] == len(chosen[::3]) and out["records"] <= len(chosen)
        assert rep.gaps == []
        with open(replica, "rb") as f:
            got = f.read()
        with open(cfg["disks"][0]["path"], "rb") as f:
            src = f.read().ljust(cap, b"\0")
        for b in chosen:
            assert got[b * 4096:(b + 1) * 4096] == src[b * 4096:(b + 1) * 4096], b
        rep.close()
        client.close()
    finally:
        h.shutdown()
        stop_bell.set()


def test_zero_records_of_a_detached_vra_go_to_the_bitmap(tmp_path, host):
    cfg = vm_cfg(tmp_path, "vm0", disks=(4 * MiB,))
    uid = cfg["instance_uuid"]
    host.start_vm(cfg, "power-on")
    client = MirrorClient(host.doorbell_path, vra="test")
    out = host.io.sync_blocks(uid, 0, 4096, [5, 6, 7, 300])     # all zero: ZERO records
    assert out == {"blocks": 0, "zero_blocks": 4, "records": 2, "bytes": 0, "unsent": 0}
    client.close()                                              # never acknowledged
    deadline = time.monotonic() + 5
    while host.io.attached and time.monotonic() < deadline:
        time.sleep(0.01)
    from simulator.iopath import dirty_blocks
    assert set(dirty_blocks(host.io.vms[uid].disks[0].bitmap())) == {0, 300 * 4096 // 65536}   # 64 KiB blocks


def _ring_pair(tmp_path, capacity, hot_window):
    path = str(tmp_path / "hot.ring")
    prod = R.RingProducer(path, capacity, hot_window=hot_window)
    return prod, R.RingConsumer(path)


def _put(prod, n, length, seq_offset=0):
    """Append a WRITE of ``length`` bytes whose content names it; its position, or None if full."""
    got = prod.reserve(length, R.WRITE, 0, 1, n, n * length, b"\1" * 16)
    if got is None:
        return None
    pos, _seq, view = got
    view[:] = n.to_bytes(8, "little") * (length // 8)
    prod.seal(pos, view)
    prod.commit(pos)
    return pos


def test_ring_reuses_its_hot_window_while_the_consumer_keeps_up(tmp_path):
    cap, hot, size = 8 * MiB, 1 * MiB, 64 << 10
    prod, cons = _ring_pair(tmp_path, cap, hot)
    offsets = []
    for n in range(200):                      # 12.5 MiB through an 8 MiB ring, consumer right behind
        pos = _put(prod, n, size)
        offsets.append(pos % cap)
        rec = cons.poll()                     # verifies the checksum; steps over PADs
        assert (rec.type, rec.vm_seq, rec.offset) == (R.WRITE, n, n * size)
        assert bytes(rec.payload[:8]) == n.to_bytes(8, "little") and len(rec.payload) == size
        cons.ack()
    # Every record lies in the first hot window, so the ring's working set stays cache-sized.
    assert max(offsets) + R.record_size(size) <= hot
    assert offsets.count(0) > 10              # it went back to the start many times
    assert cons.poll() is None


def test_ring_lagging_consumer_still_gets_the_whole_capacity(tmp_path):
    cap, hot, size = 8 * MiB, 1 * MiB, 64 << 10
    prod, cons = _ring_pair(tmp_path, cap, hot)
    n = 0
    while _put(prod, n, size) is not None:    # the consumer reads nothing
        n += 1
    assert n * (64 + size) > cap - (64 + size)    # the ring filled up, not just its hot window
    for i in range(n):                        # and everything comes out in order
        rec = cons.poll()
        assert rec.vm_seq == i
    assert cons.poll() is None
    cons.ack()
    # Caught up: the producer returns to the hot window at its next record.
    assert _put(prod, n, size) % cap == 0


def test_ring_crash_recovery_walks_over_an_early_wrap(tmp_path):
    cap, hot, size = 8 * MiB, 1 * MiB, 64 << 10
    prod, cons = _ring_pair(tmp_path, cap, hot)
    n = 0
    while True:                               # consumer keeps up until just before a wrap
        pos = _put(prod, n, size)
        n += 1
        assert cons.poll().vm_seq == n - 1
        cons.ack()
        if pos % cap + 3 * (64 + size) > hot:
            break
    unacked = [_put(prod, n + i, size) for i in range(3)]    # the 2nd one wraps early
    assert unacked[1] % cap == 0 and unacked[1] - unacked[0] > hot
    # A reservation whose producer died after sealing it (its disk write may have happened):
    got = prod.reserve(size, R.WRITE, 0, 1, n + 3, (n + 3) * size, b"\1" * 16)
    prod.seal(got[0], got[2])
    prod2 = R.RingProducer(prod.path, cap, create=False, hot_window=hot)
    prod2._head = prod.head()
    found = [rec.vm_seq for _pos, rec in prod2.pending(recover=True)
             if rec is not None and rec.type == R.WRITE]
    assert found == [n, n + 1, n + 2, n + 3]


def test_disk_writes_direct_and_falls_back_for_unaligned_writes(tmp_path):
    """Guest writes go O_DIRECT where the file system has it; one O_DIRECT refuses is written
    buffered, and buffered reads see both."""
    import mmap

    from simulator.iopath import Disk

    disk = Disk(0, str(tmp_path / "d.img"), 1 << 20, direct=True)
    try:
        aligned = memoryview(mmap.mmap(-1, 8192))
        aligned[:] = b"a" * 8192
        disk.write(aligned, 4096)                   # O_DIRECT when the file system takes it
        disk.write(b"unaligned!", 100)              # not 512-aligned: written buffered
        with open(disk.path, "rb") as f:
            data = f.read(1 << 20)
        assert data[4096:4096 + 8192] == b"a" * 8192
        assert data[100:110] == b"unaligned!"
        assert data[:100] == bytes(100) and data[110:4096] == bytes(4096 - 110)
        aligned.release()
    finally:
        disk.close()
    plain = Disk(1, str(tmp_path / "p.img"), 1 << 16, direct=False)
    try:
        assert plain.dio_fd is None and plain.wfd == plain.fd
        plain.write(b"x" * 10, 3)
        assert os.pread(plain.fd, 10, 3) == b"x" * 10
    finally:
        plain.close()


def test_consumer_naps_then_sleeps_on_the_doorbell(tmp_path):
    """A record committed while the consumer naps needs no doorbell; after the nap window the
    consumer sets consumer_waiting, and the next commit rings the doorbell and wakes it."""
    import socket

    prod, cons = _ring_pair(tmp_path, 8 * MiB, 0)
    host_end, vra_end = socket.socketpair()
    prod.doorbell, cons.doorbell = host_end, vra_end
    try:
        waiting = lambda: R._U32.unpack_from(cons.mm, R._OFF_CONSUMER_WAITING)[0]   # noqa: E731

        def commit_during_wait(n, delay, nap_window):
            """The producer commits record n after ``delay``; (what wait returned, seconds)."""
            t = threading.Timer(delay, _put, (prod, n, 4096))
            t.start()
            t0 = time.monotonic()
            try:
                return cons.wait(5.0, nap_window=nap_window), time.monotonic() - t0
            finally:
                t.join()

        # Within the nap window: the producer commits, the consumer finds it by looking.
        woke, took = commit_during_wait(0, 0.005, nap_window=1.0)
        assert woke and took < 0.5
        assert waiting() == 0                      # it never went to sleep on the doorbell
        vra_end.setblocking(False)
        with pytest.raises(BlockingIOError):       # and no doorbell was rung
            vra_end.recv(16)
        assert cons.poll().vm_seq == 0
        cons.ack()
        # Nothing comes: after the window (and the timeout) it returns False, flag set.
        t0 = time.monotonic()
        assert not cons.wait(0.2, nap_window=0.05)
        assert 0.15 <= time.monotonic() - t0 < 2.0
        assert waiting() == 1
        # Asleep on the doorbell: the commit rings it (and clears the flag), which wakes it.
        woke, took = commit_during_wait(1, 0.05, nap_window=0.0)
        assert woke and took < 2.0
        assert waiting() == 0
        assert cons.poll().vm_seq == 1
    finally:
        host_end.close()
        vra_end.close()
