import random
import threading
import time

import pytest

from appliance.dss import Entry, Journal, NotRecoverable, Pos

from .conftest import (CAPACITY, DISKS, T0, VPG, Model, make_journal, make_workload, promote_while,
                       read_disks, run_workload)


def assert_disks_at(j, model, cp):
    want = model.disks_at(cp.pos)
    got = read_disks(j, cp)
    for k in DISKS:
        assert got[k] == want[k], f"{k} at {cp}"


def test_reads_at_random_checkpoints_match_the_model(tmp_path):
    rng = random.Random(11)
    model = Model()
    j = make_journal(tmp_path / "db", tmp_path / "rep")
    run_workload(j, model, rng, 300, cp_every=7)
    cps = j.checkpoints(VPG)
    assert cps == model.checkpoints
    for cp in rng.sample(cps, 12) + [cps[0], cps[-1]]:
        assert_disks_at(j, model, cp)
    # partial, unaligned reads at arbitrary positions (not only checkpoints)
    for _ in range(200):
        vm, disk = rng.choice(DISKS)
        pos = rng.choice(model.log).pos
        off = rng.randrange(CAPACITY)
        n = rng.randrange(min(70000, CAPACITY - off) + 1)
        want = model.disks_at(pos)[(vm, disk)][off:off + n]
        assert j.read(VPG, vm, disk, off, n, pos) == want
    # after reopen
    j.close()
    j = Journal(str(tmp_path / "db"))
    for cp in rng.sample(cps, 6):
        assert_disks_at(j, model, cp)
    # past the durable position: the newest state
    assert read_disks(j, Pos(9, 9)) == model.disks_at(model.log[-1].pos)
    j.close()


def test_never_written_regions_read_as_zeros(journal, model):
    vm, disk = DISKS[0]
    assert journal.read(VPG, vm, disk, 0, 8192, Pos(0, 0)) == bytes(8192)
    journal.append(VPG, [Entry(Pos(1, 1), vm, disk, 4095, b"ab")])
    assert journal.read(VPG, vm, disk, 4090, 10, Pos(1, 1)) == bytes(5) + b"ab" + bytes(3)
    assert journal.read(VPG, vm, disk, 4090, 10, Pos(0, 0)) == bytes(10)
    with pytest.raises(ValueError):
        journal.read(VPG, vm, disk, CAPACITY - 1, 2, Pos(1, 1))


def test_partial_block_entries_keep_older_data_underneath(journal):
    vm, disk = DISKS[1]
    base = bytes(range(256)) * 16                                  # one full block
    journal.append(VPG, [Entry(Pos(1, 1), vm, disk, 8192, base),
                         Entry(Pos(1, 2), vm, disk, 8192 + 100, b"X" * 10),
                         Entry(Pos(1, 3), vm, disk, 8192 + 4000, b"Y" * 200),    # spans two blocks
                         Entry(Pos(1, 4), vm, disk, 8192 + 105, b"Z")])
    want = bytearray(base + bytes(4096))
    want[100:110] = b"X" * 10
    want[4000:4200] = b"Y" * 200
    want[105] = ord("Z")
    assert journal.read(VPG, vm, disk, 8192, 8192, Pos(1, 4)) == bytes(want)
    want[105] = ord("X")
    assert journal.read(VPG, vm, disk, 8192, 8192, Pos(1, 3)) == bytes(want)


def test_reads_stay_correct_while_promotion_runs(tmp_path):
    rng = random.Random(12)
    model = Model()
    j = make_journal(tmp_path / "db", tmp_path / "rep")
    run_workload(j, model, rng, 400, cp_every=10)
    cps = j.checkpoints(VPG)
    late = cps[len(cps) // 2:]
    wants = {cp: model.disks_at(cp.pos) for cp in late[-4:]}
    errors = []

    def reader(stop):
        r = random.Random(1)
        while not stop.is_set():
            cp = r.choice(list(wants))
            vm, disk = r.choice(DISKS)
            off = r.randrange(0, CAPACITY - 65536, 512)
            try:
                got = j.read(VPG, vm, disk, off, 65536, cp)
            except NotRecoverable:
                continue
            if got != wants[cp][(vm, disk)][off:off + 65536]:
                errors.append((cp, vm, disk, off))

    # promote in many small steps up to the middle of the history
    n = promote_while(j, T0 + late[0].pos.lsn + j.settings(VPG).history_s, reader)
    assert n > 0 and not errors
    j.close()


def test_reads_stay_correct_while_appends_run(tmp_path):
    model = Model()
    work = make_workload(model, random.Random(13), 400, cp_every=9)
    j = make_journal(tmp_path / "db", tmp_path / "rep", sync=True)
    wants = {}
    errors = []
    done = threading.Event()

    def appender():
        for batch, cps, t in work:
            j.append(VPG, batch, cps, time=t)
            if cps:
                time.sleep(0.001)    # let the reader see this checkpoint (the GIL may not)
        done.set()

    t = threading.Thread(target=appender)
    t.start()
    r = random.Random(2)
    reads = 0
    while not done.is_set() or reads < 20:
        cp = j.latest_checkpoint(VPG)
        if cp is None:
            continue
        assert cp.pos <= j.durable_pos(VPG)
        if cp not in wants:
            wants[cp] = model.disks_at(cp.pos)
        vm, disk = r.choice(DISKS)
        off = r.randrange(CAPACITY - 100000)
        if j.read(VPG, vm, disk, off, 100000, cp) != wants[cp][(vm, disk)][off:off + 100000]:
            errors.append(cp)
        reads += 1
    t.join()
    assert not errors and len(wants) > 3
    assert j.checkpoints(VPG) == model.checkpoints and j.check(VPG) == []
    j.close()


def test_hot_blocks_with_long_histories_read_right_at_every_position(journal):
    """More versions of a block than the forward scan reads (SCAN_VERSIONS): partial writes
    over each other, read at every position, against a byte model."""
    from appliance.dss import reader
    vm, disk = DISKS[0]
    rng = random.Random(5)
    state = bytearray(3 * 4096)
    history = []
    n = 3 * reader.SCAN_VERSIONS + 5
    for lsn in range(1, n + 1):
        off = 4096 + rng.randrange(4096) if lsn % 3 else 4096       # block 1, sometimes all of it
        data = bytes([lsn]) * (rng.randrange(1, 4096 + 4096 - (off - 4096)) if lsn % 3 else 4096)
        journal.append(VPG, [Entry(Pos(1, lsn), vm, disk, off, data)])
        state[off:off + len(data)] = data
        history.append(bytes(state))
    for lsn in range(1, n + 1):
        assert journal.read(VPG, vm, disk, 0, 3 * 4096, Pos(1, lsn)) == history[lsn - 1], lsn
        assert journal.read(VPG, vm, disk, 4096 + 100, 5000, Pos(1, lsn)) == history[lsn - 1][4196:9196]


def test_replica_range_is_a_view_only_where_no_entry_touches_it(journal):
    vm, disk = DISKS[0]
    journal.append(VPG, [Entry(Pos(1, 1), vm, disk, 8192 + 10, b"abc")], time=T0)
    with journal.replica_range(VPG, vm, disk, 0, 8192) as (pos, view):
        assert pos == Pos(1, 1) and bytes(view) == bytes(8192)
    with journal.replica_range(VPG, vm, disk, 4096, 8192) as (pos, view):
        assert view is None                                     # block 2 has an entry
    assert journal.promote(VPG, now=T0 + 10**9) == 1
    with journal.replica_range(VPG, vm, disk, 8192, 4096) as (pos, view):
        assert bytes(view) == journal.read(VPG, vm, disk, 8192, 4096, pos)
        assert bytes(view[10:13]) == b"abc"
