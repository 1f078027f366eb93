import os
import random

import pytest

from appliance.dss import DSSError, Entry, ImageBusy, Journal, NotRecoverable, Pos, StreamGap

from .conftest import CAPACITY, DISKS, VMS, VPG, Model, make_journal, read_disks, run_workload


@pytest.fixture
def setup(tmp_path):
    rng = random.Random(41)
    model = Model()
    j = make_journal(tmp_path / "db", tmp_path / "rep")
    run_workload(j, model, rng, 120, cp_every=8)
    yield j, model, rng, tmp_path
    j.close()


def apply(buf: bytearray, offset: int, data: bytes):
    buf[offset:offset + len(data)] = data


def test_image_reads_writes_and_discard(setup):
    j, model, rng, tmp = setup
    cp = model.checkpoints[6]
    vm, disk = DISKS[2]
    want = bytearray(model.disks_at(cp.pos)[(vm, disk)])
    scratch = str(tmp / "scratch.img")
    img = j.image(VPG, vm, disk, cp, scratch)
    assert img.capacity == CAPACITY
    assert img.read(0, CAPACITY) == want
    for _ in range(60):
        off = rng.randrange(CAPACITY)
        data = rng.randbytes(rng.randrange(1, min(20000, CAPACITY - off) + 1))
        img.write(off, data)
        apply(want, off, data)
        o2 = rng.randrange(CAPACITY)
        n2 = rng.randrange(min(9000, CAPACITY - o2) + 1)
        assert img.read(o2, n2) == want[o2:o2 + n2]
    assert img.read(0, CAPACITY) == want
    # close and open again on the same scratch: the overlay is kept
    img.close()
    with pytest.raises(DSSError):
        img.read(0, 1)
    with pytest.raises(DSSError):                                    # another checkpoint on it: refused
        j.image(VPG, vm, disk, model.checkpoints[5], scratch)
    img = j.image(VPG, vm, disk, cp, scratch)
    assert img.read(0, CAPACITY) == want
    img.discard()
    assert not os.path.exists(scratch) and not os.path.exists(scratch + ".map")
    # the journal was never written
    assert read_disks(j, cp) == model.disks_at(cp.pos)
    assert j.checkpoints(VPG) == model.checkpoints and j.check(VPG) == []


def test_commit_makes_the_replica_the_image(setup):
    j, model, rng, tmp = setup
    cp = model.checkpoints[4]
    vm, disk = DISKS[1]
    img = j.image(VPG, vm, disk, cp, str(tmp / "s1"))
    other = j.image(VPG, VMS[0], 0, model.checkpoints[2], str(tmp / "s2"))
    with pytest.raises(ImageBusy):                                    # an image at another checkpoint is open
        img.commit()
    other.discard()
    for _ in range(30):
        off = rng.randrange(CAPACITY - 5000)
        img.write(off, rng.randbytes(rng.randrange(1, 5000)))
    content = img.read(0, CAPACITY)
    twin = j.image(VPG, vm, disk, cp, str(tmp / "s4"))
    with pytest.raises(ImageBusy):                                    # the same disk twice: refused
        twin.commit()
    twin.discard()
    sibling = j.image(VPG, VMS[0], 0, cp, str(tmp / "s3"))           # same VM, same checkpoint: allowed
    img.commit()
    assert not os.path.exists(tmp / "s1")
    assert (tmp / "rep" / vm / f"disk{disk}.img").read_bytes() == content
    assert j.read(VPG, vm, disk, 0, CAPACITY, cp.pos) == content
    # the other disks are at the checkpoint, their replicas too
    at = model.disks_at(cp.pos)
    assert sibling.read(0, CAPACITY) == at[(VMS[0], 0)]
    sibling.discard()
    for k in DISKS:
        if k != (vm, disk):
            assert (tmp / "rep" / k[0] / f"disk{k[1]}.img").read_bytes() == at[k]
    # entries after the checkpoint are gone; the VPG needs a new generation (delta sync)
    u = j.usage(VPG)
    assert u["entries"] == 0 and u["durable_pos"] == cp.pos and j.checkpoints(VPG) == []
    with pytest.raises(StreamGap):
        j.append(VPG, [Entry(Pos(1, cp.pos.lsn + 1), vm, disk, 0, b"x")])
    with pytest.raises(NotRecoverable):
        j.read(VPG, vm, disk, 0, 1, model.checkpoints[0])
    assert j.append(VPG, [Entry(Pos(2, 1), vm, disk, 0, b"new")]) == Pos(2, 1)
    assert j.check(VPG) == []
    j.close()
    j2 = Journal(str(tmp / "db"))
    assert j2.durable_pos(VPG) == Pos(2, 1)
    assert j2.read(VPG, vm, disk, 0, CAPACITY, Pos(2, 1)) == b"new" + content[3:]
    j2.close()


def test_commit_can_be_finished_after_a_crash_in_the_overlay_copy(setup, monkeypatch):
    import appliance.dss.image as I

    j, model, rng, tmp = setup
    cp = model.checkpoints[3]
    vm, disk = DISKS[0]
    img = j.image(VPG, vm, disk, cp, str(tmp / "s"))
    for off in range(0, CAPACITY, 70000):
        img.write(off, rng.randbytes(3000))
    content = img.read(0, CAPACITY)

    def crash(fd):
        raise KeyboardInterrupt("crash")

    monkeypatch.setattr(I.os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        img.commit()
    monkeypatch.undo()
    j.close()
    j = Journal(str(tmp / "db"))
    img = j.image(VPG, vm, disk, cp, str(tmp / "s"))
    assert img.read(0, CAPACITY) == content
    img.commit()
    assert (tmp / "rep" / vm / f"disk{disk}.img").read_bytes() == content
    j.close()
