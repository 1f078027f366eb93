import os
import random

import pytest

from appliance.dss import (Checkpoint, DSSError, DuplicateEntry, Entry, InvalidAppend, Journal, JournalSettings,
                           Pos, StreamGap, UnknownDisk, UnknownVPG)

from .conftest import CAPACITY, DISKS, T0, VMS, VPG, Model, make_journal, read_disks, run_workload


def snapshot(j):
    return (j.durable_pos(VPG), j.usage(VPG), j.checkpoints(VPG), read_disks(j, j.durable_pos(VPG) or Pos(0, 0)))


def test_vpg_lifecycle_is_persisted(tmp_path):
    j = make_journal(tmp_path / "db", tmp_path / "rep", history_s=7200)
    j.create_vpg(VPG, JournalSettings(replica_dir=str(tmp_path / "rep"), history_s=7200))    # idempotent
    j.create_vpg("other", JournalSettings(replica_dir=str(tmp_path / "rep2")))
    j.set_settings("other", JournalSettings(replica_dir=str(tmp_path / "rep2"), warn_bytes=5))
    assert j.vpgs() == ["other", VPG]
    assert os.path.getsize(tmp_path / "rep" / VMS[0] / "disk1.img") == CAPACITY
    j.close()
    j = Journal(str(tmp_path / "db"))
    assert j.vpgs() == ["other", VPG]
    assert j.settings(VPG).history_s == 7200
    assert j.settings("other").warn_bytes == 5
    assert j.disks(VPG) == sorted((vm, d, CAPACITY) for vm, d in DISKS)
    with pytest.raises(ValueError):
        j.set_settings(VPG, JournalSettings(replica_dir=str(tmp_path / "rep"), history_s=60))
    with pytest.raises(UnknownVPG):
        j.durable_pos("nope")
    j.close()


def test_append_is_durable_across_reopen(tmp_path):
    rng = random.Random(3)
    model = Model()
    j = make_journal(tmp_path / "db", tmp_path / "rep", sync=True)
    run_workload(j, model, rng, 40)
    before = snapshot(j)
    j.close()
    j = Journal(str(tmp_path / "db"))
    assert snapshot(j) == before
    assert j.durable_pos(VPG) == model.log[-1].pos
    assert j.check(VPG) == []
    j.close()


def test_duplicate_append_is_refused_and_changes_nothing(journal, model):
    rng = random.Random(4)
    run_workload(journal, model, rng, 20)
    before = snapshot(journal)
    vm, disk = DISKS[0]
    again = [Entry(e.pos, e.vm, e.disk, e.offset, b"z" * len(e.data)) for e in model.log[-3:]]
    with pytest.raises(DuplicateEntry) as exc:
        journal.append(VPG, again, [Checkpoint(999, model.log[-1].pos, 1.0)])
    assert str(model.log[-1].pos) in str(exc.value)
    # a batch that starts with a duplicate and goes on with new entries is refused whole
    last = model.log[-1].pos
    mixed = [Entry(last, vm, disk, 0, b"a"), Entry(Pos(1, last.lsn + 1), vm, disk, 0, b"b")]
    with pytest.raises(DuplicateEntry):
        journal.append(VPG, mixed)
    with pytest.raises(DuplicateEntry):
        journal.append(VPG, [Entry(Pos(0, 5), vm, disk, 0, b"old generation")])
    assert snapshot(journal) == before
    assert journal.check(VPG) == []


def test_gaps_and_bad_batches_are_refused(journal, model):
    run_workload(journal, model, random.Random(5), 10)
    last = journal.durable_pos(VPG)
    vm, disk = DISKS[1]
    before = snapshot(journal)
    with pytest.raises(StreamGap):
        journal.append(VPG, [Entry(Pos(1, last.lsn + 2), vm, disk, 0, b"x")])
    with pytest.raises(StreamGap):
        journal.append(VPG, [Entry(Pos(2, 2), vm, disk, 0, b"x")])       # a generation starts at lsn 1
    with pytest.raises(StreamGap):                                        # gap inside the batch
        journal.append(VPG, [Entry(Pos(1, last.lsn + 1), vm, disk, 0, b"x"),
                             Entry(Pos(1, last.lsn + 3), vm, disk, 0, b"y")])
    with pytest.raises(InvalidAppend):                                    # beyond the disk
        journal.append(VPG, [Entry(Pos(1, last.lsn + 1), vm, disk, CAPACITY - 1, b"xy")])
    with pytest.raises(InvalidAppend):                                    # checkpoint after the batch
        journal.append(VPG, [Entry(Pos(1, last.lsn + 1), vm, disk, 0, b"x")],
                       [Checkpoint(50, Pos(1, last.lsn + 2), 1.0)])
    with pytest.raises(UnknownDisk):
        journal.append(VPG, [Entry(Pos(1, last.lsn + 1), vm, 7, 0, b"x")])
    assert snapshot(journal) == before
    # a new generation starts at lsn 1
    assert journal.append(VPG, [Entry(Pos(2, 1), vm, disk, 5, b"new")]) == Pos(2, 1)
    assert journal.read(VPG, vm, disk, 5, 3, Pos(2, 1)) == b"new"


def test_checkpoint_queries(journal, model):
    run_workload(journal, model, random.Random(6), 60, cp_every=3)
    cps = journal.checkpoints(VPG)
    assert cps == model.checkpoints
    assert journal.checkpoints(VPG, tag_only=True) == [c for c in cps if c.tag]
    assert journal.checkpoints(VPG, since=cps[5].time) == cps[5:]
    assert journal.latest_checkpoint(VPG) == cps[-1]
    assert journal.latest_checkpoint(VPG, tagged=True) == [c for c in cps if c.tag][-1]
    # checkpoint-only append
    journal.append(VPG, [], [Checkpoint(1000, journal.durable_pos(VPG), cps[-1].time + 1, "manual")])
    assert journal.latest_checkpoint(VPG, tagged=True).tag == "manual"


def test_delete_vpg(tmp_path):
    rng = random.Random(7)
    j = make_journal(tmp_path / "db", tmp_path / "rep")
    j.create_vpg("keep", JournalSettings(replica_dir=str(tmp_path / "keep")))
    j.register_disk("keep", VMS[0], 0, CAPACITY)
    run_workload(j, Model(), rng, 20)
    j.append("keep", [Entry(Pos(1, 1), VMS[0], 0, 10, b"kept")])
    j.promote("keep", now=1e12)
    j.delete_vpg(VPG, keep_replicas=False)
    assert not (tmp_path / "rep" / VMS[0] / "disk0.img").exists()
    assert j.read("keep", VMS[0], 0, 8, 8, Pos(1, 1)) == bytes(2) + b"kept" + bytes(2)     # untouched
    assert j.check("keep") == []
    j.delete_vpg("keep", keep_replicas=True)
    assert (tmp_path / "keep" / VMS[0] / "disk0.img").exists()
    assert j.vpgs() == []
    with pytest.raises(UnknownVPG):
        j.read(VPG, VMS[0], 0, 0, 10, Pos(1, 1))
    j.close()
    j = Journal(str(tmp_path / "db"))
    assert j.vpgs() == []
    # a new VPG of the same name starts empty, and nothing of the old one is left in the database
    j.create_vpg(VPG, JournalSettings(replica_dir=str(tmp_path / "rep")))
    assert j.durable_pos(VPG) is None and j.checkpoints(VPG) == [] and j.usage(VPG)["entries"] == 0
    assert list(j._entries.keys()) == [] and list(j._index.keys()) == []
    j.close()


def test_disks_grow_but_never_shrink_and_replica_dir_is_fixed(journal, tmp_path):
    vm = VMS[0]
    journal.register_disk(VPG, vm, 0, CAPACITY * 2)
    assert (vm, 0, CAPACITY * 2) in journal.disks(VPG)
    assert os.path.getsize(tmp_path / "replicas" / vm / "disk0.img") == CAPACITY * 2
    with pytest.raises(DSSError):
        journal.register_disk(VPG, vm, 0, CAPACITY)
    with pytest.raises(DSSError):
        journal.set_settings(VPG, JournalSettings(replica_dir=str(tmp_path / "elsewhere")))
    with pytest.raises(UnknownDisk):
        journal.read(VPG, "not-a-uuid", 0, 0, 1, Pos(0, 0))


def test_source_progress_is_stored_with_the_batch(tmp_path):
    j = make_journal(tmp_path / "db", tmp_path / "rep", sync=True)
    vm, disk = DISKS[0]
    assert j.progress(VPG) == {}
    j.append(VPG, [Entry(Pos(1, 1), vm, disk, 0, b"a")], progress={"host-1/vpg": 7})
    j.append(VPG, [], progress={"host-2/vpg": 3})                       # progress only
    with pytest.raises(DuplicateEntry):
        j.append(VPG, [Entry(Pos(1, 1), vm, disk, 0, b"a")], progress={"host-1/vpg": 99})
    assert j.progress(VPG) == {"host-1/vpg": 7, "host-2/vpg": 3}
    j.close()
    j = Journal(str(tmp_path / "db"))
    assert j.progress(VPG) == {"host-1/vpg": 7, "host-2/vpg": 3}
    j.delete_vpg(VPG, keep_replicas=False)
    j.create_vpg(VPG, JournalSettings(replica_dir=str(tmp_path / "rep")))
    assert j.progress(VPG) == {}
    j.close()


def test_an_empty_journal_takes_a_checkpoint_of_the_replicas(tmp_path):
    """An idle VPG (or an initial sync that found nothing to send) has nothing journaled: a
    checkpoint at (generation, 0) is recoverable and reads the replicas; writes follow it."""
    j = make_journal(tmp_path / "db", tmp_path / "replicas")
    try:
        vm, disk = DISKS[0]
        assert j.durable_pos(VPG) is None and j.checkpoints(VPG) == []
        cp = Checkpoint(1, Pos(1, 0), T0, "idle")
        j.append(VPG, [], [cp])
        assert j.durable_pos(VPG) == Pos(1, 0) and j.checkpoints(VPG) == [cp]
        assert j.read(VPG, vm, disk, 0, 8192, cp) == bytes(8192)
        with pytest.raises(Exception, match="after the last entry"):   # not past what exists
            j.append(VPG, [], [Checkpoint(2, Pos(1, 1), T0 + 1, None)])
        j.append(VPG, [Entry(Pos(1, 1), vm, disk, 4096, b"x" * 4096)],
                 [Checkpoint(2, Pos(1, 1), T0 + 1, None)])
        assert j.read(VPG, vm, disk, 4096, 4096, j.checkpoints(VPG)[-1]) == b"x" * 4096
        assert j.read(VPG, vm, disk, 4096, 4096, cp) == bytes(4096)
    finally:
        j.close()
    j = make_journal(tmp_path / "db", tmp_path / "replicas")      # and after a reopen
    try:
        assert j.durable_pos(VPG) == Pos(1, 1) and [c.id for c in j.checkpoints(VPG)] == [1, 2]
    finally:
        j.close()
