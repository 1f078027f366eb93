import random

import pytest

from appliance.dss import Journal, JournalSettings, NotRecoverable

from .conftest import CAPACITY, DISKS, T0, VMS, VPG, Model, make_journal, read_disks, run_workload

HOUR = 3600.0


def replica(tmp_path, vm, disk):
    return (tmp_path / "rep" / vm / f"disk{disk}.img").read_bytes()


def test_promote_moves_old_entries_into_the_replicas(tmp_path):
    rng = random.Random(21)
    model = Model()
    j = make_journal(tmp_path / "db", tmp_path / "rep", history_s=HOUR)
    run_workload(j, model, rng, 300, cp_every=6)          # entry lsn i has time T0 + i
    cps = model.checkpoints
    assert j.promote(VPG, now=T0 + 100) == 0              # nothing older than an hour yet
    n = j.promote(VPG, now=T0 + HOUR + 150.5)              # entries older than T0 + 150.5
    assert n == model.promotable(T0 + 150.5) > 100
    promoted = model.log[n - 1].pos
    u = j.usage(VPG)
    assert u["promoted_pos"] == promoted and u["entries"] == 300 - n and u["durable_pos"] == model.log[-1].pos
    assert (u["oldest_time"], u["newest_time"]) == (model.times[n], model.times[-1])
    # the replicas hold exactly the entries <= the promoted position
    at = model.disks_at(promoted)
    for vm, disk in DISKS:
        assert replica(tmp_path, vm, disk) == at[(vm, disk)]
    # checkpoints before it are gone; the others read as the model says
    left = j.checkpoints(VPG)
    assert left == [c for c in cps if c.pos >= promoted]
    with pytest.raises(NotRecoverable):
        j.read(VPG, VMS[0], 0, 0, 10, cps[0])
    for cp in [left[0], left[len(left) // 2], left[-1]]:
        assert read_disks(j, cp) == model.disks_at(cp.pos)
    assert j.check(VPG) == []
    # again: idempotent; and after reopen
    assert j.promote(VPG, now=T0 + HOUR + 150.5) == 0
    j.close()
    j = Journal(str(tmp_path / "db"))
    assert j.checkpoints(VPG) == left
    for cp in rng.sample(left, 4):
        assert read_disks(j, cp) == model.disks_at(cp.pos)
    assert j.promote(VPG, now=T0 + HOUR + 10_000) == 300 - n   # everything
    assert j.usage(VPG)["entries"] == 0 and j.usage(VPG)["bytes"] == 0
    assert j.checkpoints(VPG) == [cps[-1]]
    assert read_disks(j, cps[-1]) == model.disks_at(cps[-1].pos)
    assert j.check(VPG) == []
    j.close()


def test_promotion_crash_after_intent_is_recovered(tmp_path, monkeypatch):
    """A crash between the replica writes and the delete batch: the floor holds, promotion redoes."""
    import appliance.dss.promotion as P

    rng = random.Random(22)
    model = Model()
    j = make_journal(tmp_path / "db", tmp_path / "rep", history_s=HOUR)
    run_workload(j, model, rng, 100, cp_every=5)

    def crash(*a, **k):
        raise KeyboardInterrupt("crash")

    real_fsync = P.os.fsync
    monkeypatch.setattr(P.os, "fsync", crash)
    j.sync = True
    n = model.promotable(T0 + 60.5)
    mid = model.log[n - 1].pos
    with pytest.raises(KeyboardInterrupt):
        j.promote(VPG, now=T0 + HOUR + 60.5)
    monkeypatch.setattr(P.os, "fsync", real_fsync)
    j.close()
    j = Journal(str(tmp_path / "db"))
    assert j.usage(VPG)["promoted_pos"] is None and j.usage(VPG)["entries"] == 100
    assert j.checkpoints(VPG) == [c for c in model.checkpoints if c.pos >= mid]     # the intent's floor
    with pytest.raises(NotRecoverable):
        j.read(VPG, VMS[0], 0, 0, 10, model.log[n - 2].pos)
    assert read_disks(j, mid) == model.disks_at(mid)
    assert j.promote(VPG, now=T0 + HOUR + 60.5) == n
    for vm, disk in DISKS:
        assert replica(tmp_path, vm, disk) == model.disks_at(mid)[(vm, disk)]
    assert j.check(VPG) == []
    j.close()


def test_hard_limit_evicts_the_oldest_history_only(tmp_path):
    rng = random.Random(23)
    model = Model()
    j = make_journal(tmp_path / "db", tmp_path / "rep", history_s=30 * 86400)
    run_workload(j, model, rng, 200, cp_every=4)
    full = j.usage(VPG)
    limit = full["bytes"] // 3
    j.set_settings(VPG, JournalSettings(replica_dir=str(tmp_path / "rep"), history_s=30 * 86400,
                                        hard_limit_bytes=limit))
    alerts = j.enforce_limits(VPG)
    assert [a["kind"] for a in alerts] == ["journal_hard_limit"]
    assert alerts[0]["vpg"] == VPG and str(limit) in alerts[0]["detail"]
    u = j.usage(VPG)
    assert 0 < u["bytes"] <= limit and u["entries"] < full["entries"]
    assert u["history_s_actual"] < full["history_s_actual"]
    left = j.checkpoints(VPG)
    assert left and left == [c for c in model.checkpoints if c.pos >= u["promoted_pos"]]
    assert left[-1] == model.checkpoints[-1]                                   # newest stay
    for cp in [left[0], left[-1]]:
        assert read_disks(j, cp) == model.disks_at(cp.pos)
    assert j.enforce_limits(VPG) == []                                         # under the limit now
    assert j.check(VPG) == []
    j.close()


def test_warning_threshold(journal, model, tmp_path):
    run_workload(journal, model, random.Random(24), 30)
    used = journal.usage(VPG)["bytes"]
    journal.set_settings(VPG, JournalSettings(replica_dir=str(tmp_path / "replicas"), warn_bytes=used // 2))
    alerts = journal.enforce_limits(VPG)
    assert [a["kind"] for a in alerts] == ["journal_warning"] and alerts[0]["vpg"] == VPG
    assert journal.usage(VPG)["bytes"] == used                                 # nothing promoted
    journal.set_settings(VPG, JournalSettings(replica_dir=str(tmp_path / "replicas"), warn_bytes=used * 2))
    assert journal.enforce_limits(VPG) == []


def test_open_image_holds_promotion_back(tmp_path):
    rng = random.Random(25)
    model = Model()
    j = make_journal(tmp_path / "db", tmp_path / "rep", history_s=HOUR)
    run_workload(j, model, rng, 100, cp_every=10)
    cp = model.checkpoints[2]                                                  # at lsn 30
    img = j.image(VPG, VMS[1], 0, cp, str(tmp_path / "scratch"))
    assert j.promote(VPG, now=T0 + HOUR + 1000) == 30          # up to the image's checkpoint only
    assert j.checkpoints(VPG)[0] == cp
    assert img.read(0, CAPACITY) == model.disks_at(cp.pos)[(VMS[1], 0)]
    img.discard()
    assert j.promote(VPG, now=T0 + HOUR + 1000) == 70
    j.close()
