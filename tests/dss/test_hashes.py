"""image_hashes(): the delta-sync hashes of a journaled disk image, checked against hashing the
model's bytes (and the point-in-time reader's), with whole-block hashes from the index, partial
blocks through the reader, replica pages, holes, a concurrent promotion, format version 1
records and corrupted records."""
import random
import time

import numpy as np
import pytest

from appliance import kernels
from appliance.dss import Entry, Journal, JournalCorrupt, Pos
from appliance.dss import keys as K
from appliance.dss import records as R

from .conftest import CAPACITY, DISKS, T0, VPG, Model, make_journal, make_workload, promote_while, run_workload

ZERO = np.uint64(kernels.zero_block_hash(4096))


def want_hashes(model: Model, pos, vm, disk, off=0, n=CAPACITY):
    return kernels.block_hashes(bytes(model.disks_at(pos)[(vm, disk)][off:off + n]), 4096)


def assert_hashes(j, model, ranges=((0, CAPACITY),)):
    pos = j.durable_pos(VPG)
    for vm, disk in DISKS:
        for off, n in ranges:
            got_pos, h, hole = j.image_hashes(VPG, vm, disk, off, n)
            assert got_pos == pos
            assert np.array_equal(h, want_hashes(model, pos, vm, disk, off, n)), (vm, disk, off, n)
            assert (h[hole] == ZERO).all()
            # and the reader agrees
            assert np.array_equal(h, kernels.block_hashes(j.read(VPG, vm, disk, off, n, pos), 4096))


def test_hashes_of_a_journaled_image_match_its_bytes(journal):
    rng = random.Random(31)
    model = Model()
    run_workload(journal, model, rng, 400, cp_every=9)
    ranges = [(0, CAPACITY), (CAPACITY - 4096, 4096), (4096 * 7, 4096 * 33 + 100)]
    ranges += [(rng.randrange(0, CAPACITY // 4096) * 4096, rng.randrange(1, 200_000)) for _ in range(6)]
    ranges = [(o, min(n, CAPACITY - o)) for o, n in ranges]
    assert_hashes(journal, model, ranges)
    # a never-written disk region with no replica data is a hole
    e = Entry(Pos(1, len(model.log) + 1), DISKS[0][0], DISKS[0][1], 0, b"\1" * 4096)
    journal.append(VPG, [e], [], time=T0 + 10_000)
    model.log.append(e)
    _, h, hole = journal.image_hashes(VPG, DISKS[3][0], DISKS[3][1], 0, CAPACITY)
    written = {b for x in model.log if (x.vm, x.disk) == DISKS[3]
               for b in range(x.offset >> 12, ((x.offset + len(x.data) - 1) >> 12) + 1)}
    assert set(np.flatnonzero(~hole).tolist()) == written
    assert_hashes(journal, model)


def test_whole_blocks_are_answered_by_the_index(journal):
    """Aligned whole-block writes carry their hash in the index record (no entry is read)."""
    vm, disk = DISKS[0]
    data = random.Random(2).randbytes(65536)
    journal.append(VPG, [Entry(Pos(1, 1), vm, disk, 8192, data)], [], time=T0)
    ikey = journal._disk(journal._vpg(VPG), vm, disk).prefix + K.format_index_tail(3, Pos(1, 1))
    s, e, h = R.decode_index_hash(ikey, journal._index.get(ikey))
    assert (s, e) == (0, 4096) and h == int(kernels.block_hashes(data[4096:8192], 4096)[0])
    # the entry can go: the hash still answers (a promotion deletes entries after the replica)
    journal._entries.delete(K.format_entry_key(journal._vpg(VPG).id, Pos(1, 1)))
    _, hashes, hole = journal.image_hashes(VPG, vm, disk, 8192, 65536)
    assert np.array_equal(hashes, kernels.block_hashes(data, 4096)) and not hole.any()


def test_hashes_stay_right_while_promotion_runs(tmp_path):
    rng = random.Random(32)
    model = Model()
    j = make_journal(tmp_path / "db", tmp_path / "rep")
    run_workload(j, model, rng, 400, cp_every=10)
    pos = j.durable_pos(VPG)
    wants = {k: want_hashes(model, pos, *k) for k in DISKS}
    errors = []

    def hasher(stop):
        r = random.Random(1)
        while not stop.is_set():
            k = r.choice(DISKS)
            _, h, _ = j.image_hashes(VPG, k[0], k[1], 0, CAPACITY)
            if not np.array_equal(h, wants[k]):
                errors.append(k)

    n = promote_while(j, T0 + pos.lsn + 1 + j.settings(VPG).history_s, hasher)
    assert n > 0 and not errors
    assert_hashes(j, model)          # now mostly from the replica pages
    j.close()


def _downgrade(j: Journal) -> int:
    """Rewrite every hashed index record in the version 1 layout, and the format record as 1."""
    it = j._index.iter()
    it.seek(b"")
    old = []
    while it.valid():
        if len(it.value()) == 20:
            old.append(it.key())
        it.next()
    del it
    for k in old:
        j._index.put(k, R.encode_index(k, 0, 4096))
    fmt = R.FORMAT_VALUE.pack(0, R.FORMAT_MAGIC, 1, j._next_id)[8:]
    j._db.put(K.FORMAT_KEY, R.seal(K.FORMAT_KEY, fmt))
    return len(old)


def test_a_version_1_journal_opens_upgrades_and_hashes_through_the_reader(tmp_path):
    rng = random.Random(33)
    model = Model()
    j = make_journal(tmp_path / "db", tmp_path / "rep")
    run_workload(j, model, rng, 200, cp_every=9)
    assert _downgrade(j) > 0
    j.close()
    j = Journal(str(tmp_path / "db"))
    try:
        assert R.decode_format(K.FORMAT_KEY, j._db.get(K.FORMAT_KEY))[1] == R.FORMAT_VERSION
        assert_hashes(j, model)
        run_workload(j, model, rng, 100, cp_every=9)        # new records hashed, old ones not
        assert_hashes(j, model)
        assert j.check(VPG) == []
    finally:
        j.close()


def test_a_newer_journal_is_refused(tmp_path):
    j = make_journal(tmp_path / "db", tmp_path / "rep")
    j._db.put(K.FORMAT_KEY, R.seal(K.FORMAT_KEY, R.FORMAT_VALUE.pack(0, R.FORMAT_MAGIC, 99, 2)[8:]))
    j.close()
    with pytest.raises(Exception, match="version"):
        Journal(str(tmp_path / "db"))


def _hashed_key(j):
    it = j._index.iter()
    it.seek(b"")
    while it.valid():
        if len(it.value()) == 20:
            k = it.key()
            del it
            return k
        it.next()
    raise AssertionError("no hashed index record")


def test_a_corrupt_hash_record_is_reported_never_served(journal):
    vm, disk = DISKS[1]
    journal.append(VPG, [Entry(Pos(1, 1), vm, disk, 0, b"\7" * 16384)], [], time=T0)
    k = _hashed_key(journal)
    good = journal._index.get(k)
    bad = bytearray(good)
    bad[15] ^= 0x40                                  # inside the hash: the checksum fails
    journal._index.put(k, bytes(bad))
    with pytest.raises(JournalCorrupt, match="checksum"):
        journal.image_hashes(VPG, vm, disk, 0, 16384)
    # a wrong hash under a valid checksum (written so by a bug): check() compares it with the data
    _, _, h = R.decode_index_hash(k, good)
    journal._index.put(k, R.encode_index(k, 0, 4096, h ^ 1))
    assert any("block hash does not match" in p for p in journal.check(VPG))
    journal._index.put(k, good)
    assert journal.check(VPG) == []


# -- the hash cache (hashcache.py): what a scan found, kept up to date by appends -------------
@pytest.fixture
def small_steps(monkeypatch):
    """Steps of 64 blocks, so that the 1 MiB test disks are 4 steps each."""
    import appliance.dss.hashcache as HC
    import appliance.dss.hashes as H
    monkeypatch.setattr(HC, "STEP_BLOCKS", 64)
    monkeypatch.setattr(H, "_STEP", 64)


def test_cached_hashes_follow_appends_promotion_and_a_commit(tmp_path, small_steps):
    rng = random.Random(34)
    model = Model()
    j = make_journal(tmp_path / "db", tmp_path / "rep")
    try:
        run_workload(j, model, rng, 150, cp_every=9)
        v = j._vpg(VPG)
        ranges = [(0, CAPACITY), (4096 * 60, 4096 * 10 + 5), (CAPACITY - 8192, 8192)]
        assert_hashes(j, model, ranges)                      # scans: the steps are cached now
        assert len(v.hashes._steps) == 4 * len(DISKS) and not v.hashes._building
        for _ in range(3):                                   # answered from the cache, kept up to date
            run_workload(j, model, rng, 60, cp_every=9)
            assert_hashes(j, model, ranges)
        # isolated whole blocks (a delta sync's) over partial writes and the other way round
        lsn = j.durable_pos(VPG).lsn
        es = []
        for b in rng.sample(range(CAPACITY // 4096), 40):
            lsn += 1
            vm, disk = rng.choice(DISKS)
            es.append(Entry(Pos(1, lsn), vm, disk, b * 4096, rng.randbytes(4096)))
        for _ in range(10):
            lsn += 1
            vm, disk = rng.choice(DISKS)
            es.append(Entry(Pos(1, lsn), vm, disk, rng.randrange(CAPACITY - 5000), rng.randbytes(5000)))
        j.append(VPG, es, [], time=T0 + lsn)
        model.log.extend(es)
        model.times.extend([T0 + lsn] * len(es))
        assert_hashes(j, model, ranges)
        # promotion moves entries into the replicas: the image, and its hashes, stay
        pos = j.durable_pos(VPG)
        assert j.promote(VPG, now=T0 + pos.lsn // 2 + j.settings(VPG).history_s) > 0
        assert_hashes(j, model, ranges)
        # a small cache: steps are dropped and scanned again
        v.hashes.max_steps = 3
        with v.hashes.lock:
            v.hashes.clear()
        assert_hashes(j, model, ranges)
        assert len(v.hashes._steps) <= 3
        # a commit at an older checkpoint drops the entries after it: the cache forgets them
        cp = model.checkpoints[-3]
        vm, disk = DISKS[0]
        img = j.image(VPG, vm, disk, cp, str(tmp_path / "scratch"))
        img.commit()
        assert not v.hashes._steps
        del model.log[cp.pos.lsn:]
        assert_hashes(j, model, ranges)
        assert j.check(VPG) == []
    finally:
        j.close()


def test_cached_hashes_are_the_image_at_their_position_while_appends_run(tmp_path, small_steps):
    """Appends in one thread, hashes in two: every answer is the image at the position it names."""
    import threading
    rng = random.Random(35)
    model = Model()
    j = make_journal(tmp_path / "db", tmp_path / "rep")
    try:
        run_workload(j, model, rng, 40, cp_every=9)
        batches = make_workload(model, rng, 400, cp_every=9, first_lsn=j.durable_pos(VPG).lsn + 1)
        stop = threading.Event()
        errors, answers = [], []

        def hasher(seed):
            r = random.Random(seed)
            while not stop.is_set():
                if r.random() < 0.3:                     # scans again, appends running meanwhile
                    with j._vpg(VPG).hashes.lock:
                        j._vpg(VPG).hashes.clear()
                vm, disk = r.choice(DISKS)
                off = r.randrange(CAPACITY // 4096) * 4096
                n = min(CAPACITY - off, r.randrange(1, CAPACITY))
                pos, h, _ = j.image_hashes(VPG, vm, disk, off, n)
                answers.append(pos)
                if not np.array_equal(h, want_hashes(model, pos, vm, disk, off, n)):
                    errors.append((pos, vm, disk, off, n))

        ths = [threading.Thread(target=hasher, args=(i,)) for i in range(2)]
        for t in ths:
            t.start()
        try:
            for batch, cps, t in batches:
                j.append(VPG, batch, cps, time=t)
                if cps:
                    time.sleep(0.001)    # let the hashers see this position (the GIL may not)
        finally:
            stop.set()
            for t in ths:
                t.join(60)
        assert not errors, errors[:3]
        assert len(set(answers)) > 5                     # hashed at many positions along the way
        assert_hashes(j, model)
    finally:
        j.close()
