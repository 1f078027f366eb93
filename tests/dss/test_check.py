import random

import pytest

from appliance.dss import Journal, JournalCorrupt
from appliance.dss import keys as K

from .conftest import CAPACITY, VPG, Model, make_journal, read_disks, run_workload


def test_corrupt_entry_is_never_served(tmp_path):
    rng = random.Random(31)
    model = Model()
    j = make_journal(tmp_path / "db", tmp_path / "rep")
    run_workload(j, model, rng, 50)
    assert j.check(VPG) == []
    victim = next(e for e in model.log[10:] if len(e.data) > 100)
    key = K.format_entry_key(j._vpg(VPG).id, victim.pos)
    good = j._entries[key]
    j._entries[key] = good[:60] + bytes([good[60] ^ 1]) + good[61:]        # one flipped bit of data
    with pytest.raises(JournalCorrupt) as exc:
        j.read(VPG, victim.vm, victim.disk, victim.offset, len(victim.data), victim.pos)
    assert str(victim.pos) in str(exc.value) and VPG in str(exc.value)
    problems = j.check(VPG)
    assert len(problems) == 1 and str(victim.pos) in problems[0] and "checksum" in problems[0]
    # garbage of any length, and the record survives a reopen as corrupt
    j._entries[key] = b"garbage"
    j.close()
    j = Journal(str(tmp_path / "db"))
    with pytest.raises(JournalCorrupt):
        read_disks(j, model.log[-1].pos)
    assert any(str(victim.pos) in p for p in j.check(VPG))
    # promotion stops in front of it rather than putting it in a replica
    with pytest.raises(JournalCorrupt):
        j.promote(VPG, now=1e12)
    before = model.log[model.log.index(victim) - 1].pos
    assert j.checkpoints(VPG) == [c for c in model.checkpoints if c.pos >= before]
    at = model.disks_at(before)
    for vm, disk in at:
        assert (tmp_path / "rep" / vm / f"disk{disk}.img").read_bytes() == at[(vm, disk)]
    with pytest.raises(JournalCorrupt):                 # usage names the corrupt oldest entry too
        j.usage(VPG)
    j.close()


def test_corrupt_index_record_and_moved_record_are_detected(journal, model):
    run_workload(journal, model, random.Random(32), 30)
    v = journal._vpg(VPG)
    e = model.log[5]
    ikey = K.format_index_key(v.id, K.format_vm(e.vm), e.disk, e.offset >> 12, e.pos)
    journal._index[ikey] = journal._index[ikey][:8] + b"\x00\x00\xff\x0f"
    with pytest.raises(JournalCorrupt):
        journal.read(VPG, e.vm, e.disk, e.offset & ~4095, 4096, e.pos)
    # a valid record stored under another key fails too (the key is part of the checksum)
    a, b = model.log[7], model.log[8]
    ka, kb = (K.format_entry_key(v.id, x.pos) for x in (a, b))
    journal._entries[kb] = journal._entries[ka]
    problems = journal.check(VPG)
    assert any("index" in p and str(e.pos) in p for p in problems)
    assert any(str(b.pos) in p and "checksum" in p for p in problems)
    with pytest.raises(JournalCorrupt):
        journal.read(VPG, b.vm, b.disk, 0, CAPACITY, b.pos)
