"""Entry data segments (format version 3): data outside RocksDB, its checksum, crash leftovers,
unlinking after promotion, and journals of format version 2 (data inline) opening and mixing."""
import os
import random

import pytest

import appliance.dss.segments as S
from appliance import pagecache
from appliance.dss import DSSError, Journal, JournalCorrupt
from appliance.dss import keys as K
from appliance.dss import records as R

from .conftest import CAPACITY, DISKS, T0, VPG, Model, make_journal, make_workload, read_disks, run_workload


def seg_files(j: Journal) -> list[str]:
    d = j._vpg(VPG).segs.dir
    return sorted(n for n in os.listdir(d) if n.endswith(S.SUFFIX)) if os.path.isdir(d) else []


def entry_ref(j: Journal, pos) -> R.SegmentRef:
    key = K.format_entry_key(j._vpg(VPG).id, pos)
    return R.decode_entry(key, j._entries[key])[5]


def flip_bits(path: str, at: int, mask: int) -> None:
    """Damage one byte of a file in place: XOR the byte at ``at`` with ``mask``."""
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ mask]))


def assert_images(j: Journal, model: Model, cps=None) -> None:
    for cp in (cps if cps is not None else j.checkpoints(VPG)):
        want = model.disks_at(cp.pos)
        assert read_disks(j, cp) == {k: bytes(v) for k, v in want.items()}, cp


def test_entry_data_lives_in_segment_files(tmp_path):
    rng = random.Random(41)
    model = Model()
    j = make_journal(tmp_path / "db", tmp_path / "rep", sync=True)
    try:
        run_workload(j, model, rng, 120)
        # RocksDB holds 72-byte references; the data is in the segment, fsynced
        sizes = {len(v) for v in j._entries.values()}
        assert sizes == {R.ENTRY_REF_SIZE}
        assert seg_files(j) and j._vpg(VPG).segs.nbytes() == sum(len(e.data) for e in model.log)
        assert oct(os.stat(os.path.join(j._vpg(VPG).segs.dir, seg_files(j)[0])).st_mode & 0o777) == "0o600"
        assert_images(j, model, rng.sample(model.checkpoints, 8))
        assert j.check(VPG) == []
    finally:
        j.close()


def test_a_damaged_segment_byte_is_reported_never_served(tmp_path):
    rng = random.Random(42)
    model = Model()
    j = make_journal(tmp_path / "db", tmp_path / "rep")
    run_workload(j, model, rng, 60)
    victim = next(e for e in model.log[20:] if len(e.data) > 100)
    seq, off, _ = entry_ref(j, victim.pos)
    path = os.path.join(j._vpg(VPG).segs.dir, f"{seq:010d}{S.SUFFIX}")
    flip_bits(path, off + 50, 0x10)
    with pytest.raises(JournalCorrupt) as exc:
        j.read(VPG, victim.vm, victim.disk, victim.offset, len(victim.data), victim.pos)
    assert str(victim.pos) in str(exc.value) and "checksum" in str(exc.value)
    problems = j.check(VPG)
    assert len(problems) >= 1 and all(str(victim.pos) in p for p in problems)
    # promotion stops in front of it: the replicas hold exactly the entries before it
    with pytest.raises(JournalCorrupt):
        j.promote(VPG, now=1e12)
    before = model.log[model.log.index(victim) - 1].pos
    at = model.disks_at(before)
    for vm, disk in DISKS:
        assert (tmp_path / "rep" / vm / f"disk{disk}.img").read_bytes() == at[(vm, disk)]
    # a missing segment file is corruption too, not "promoted": it fails instead of retrying
    j.close()
    os.unlink(path)
    j = Journal(str(tmp_path / "db"))
    try:
        with pytest.raises(JournalCorrupt):
            j.read(VPG, victim.vm, victim.disk, victim.offset, len(victim.data), victim.pos)
    finally:
        j.close()


def test_data_of_a_batch_that_never_committed_is_cut_on_open(tmp_path, monkeypatch):
    rng = random.Random(43)
    model = Model()
    j = make_journal(tmp_path / "db", tmp_path / "rep", sync=True)
    run_workload(j, model, rng, 40)
    durable = j.durable_pos(VPG)
    size = j._vpg(VPG).segs.nbytes()
    # the data of the next batch reaches the segment, then the RocksDB write fails (a crash)
    extra = Model()
    batches = make_workload(extra, rng, 5, first_lsn=durable.lsn + 1)
    real = Journal._write

    def failing(self, wb, step, timed=False):
        if step.startswith("append"):
            raise DSSError("simulated crash before the batch")
        return real(self, wb, step, timed)

    monkeypatch.setattr(Journal, "_write", failing)
    with pytest.raises(DSSError):
        j.append(VPG, *batches[0][:2], time=batches[0][2])
    monkeypatch.setattr(Journal, "_write", real)
    assert j._vpg(VPG).segs.nbytes() > size
    # and a segment file a crash left behind after the last referenced one
    stray = os.path.join(j._vpg(VPG).segs.dir, f"{999:010d}{S.SUFFIX}")
    with open(stray, "wb") as f:
        f.write(b"x" * 5000)
    j.close()
    j = Journal(str(tmp_path / "db"))
    try:
        assert j.durable_pos(VPG) == durable
        assert j._vpg(VPG).segs.nbytes() == size and not os.path.exists(stray)
        assert j.check(VPG) == []
        # the same batch goes again, to the same place, and everything reads back
        for batch, cps, t in batches:
            j.append(VPG, batch, [], time=t)
        model.log.extend(e for b, _, _ in batches for e in b)
        last = model.log[-1].pos
        assert read_disks(j, last) == {k: bytes(v) for k, v in model.disks_at(last).items()}
        assert j.check(VPG) == []
    finally:
        j.close()


def test_promotion_unlinks_segments_it_emptied(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "SEGMENT_BYTES", 256 << 10)
    rng = random.Random(44)
    model = Model()
    j = make_journal(tmp_path / "db", tmp_path / "rep", history_s=3600)
    try:
        run_workload(j, model, rng, 300)
        files = seg_files(j)
        assert len(files) > 4
        half = model.times[len(model.times) // 2]
        j.promote(VPG, now=half + 3600)
        oldest = next(e for e in model.log if e.pos > j._vpg(VPG).promoted)
        first_live = entry_ref(j, oldest.pos)[0]
        left = seg_files(j)
        assert left and all(int(n[:-4]) >= first_live for n in left) and len(left) < len(files)
        assert_images(j, model)
        assert j.check(VPG) == []
        j.close()
        j = Journal(str(tmp_path / "db"))                  # reopen: nothing live was lost
        assert_images(j, model)
        j.promote(VPG, now=T0 + 1e6)                      # everything: only the active one is left
        assert len(seg_files(j)) == 1 and j.check(VPG) == []
        run_workload(j, model, rng, 50)                    # appends carry on in it
        assert_images(j, model)
        assert j.check(VPG) == []
    finally:
        j.close()


def test_image_commit_and_delete_drop_the_segments(tmp_path):
    rng = random.Random(45)
    model = Model()
    j = make_journal(tmp_path / "db", tmp_path / "rep")
    try:
        run_workload(j, model, rng, 60)
        cp = model.checkpoints[-1]
        vm, disk = DISKS[0]
        img = j.image(VPG, vm, disk, cp, str(tmp_path / "scratch"))
        img.commit()
        assert seg_files(j) == []
        run_workload(j, model, rng, 20, generation=cp.pos.generation + 1)
        assert seg_files(j) and j.check(VPG) == []
        segdir = j._vpg(VPG).segs.dir
        j.delete_vpg(VPG, keep_replicas=False)
        assert not os.path.exists(segdir)
    finally:
        j.close()


def _to_format_2(j: Journal) -> int:
    """Rewrite every entry with its data inline, drop the segment files, format record 2."""
    v = j._vpg(VPG)
    n = 0
    for key, value in list(j._entries.items()):
        vmb, disk, offset, length, t, src = R.decode_entry(key, value)
        if isinstance(src, R.SegmentRef):
            data = v.segs.read(src[0], src[1], length, src[2])
            j._entries[key] = R.encode_entry(key, vmb, disk, offset, data, t)
            n += 1
    v.segs.drop_all()
    fmt = R.FORMAT_VALUE.pack(0, R.FORMAT_MAGIC, 2, j._next_id)[8:]
    j._db.put(K.FORMAT_KEY, R.seal(K.FORMAT_KEY, fmt))
    return n


def test_a_format_2_journal_opens_and_its_inline_entries_mix_with_segments(tmp_path):
    rng = random.Random(46)
    model = Model()
    j = make_journal(tmp_path / "db", tmp_path / "rep")
    run_workload(j, model, rng, 80)
    assert _to_format_2(j) > 0
    j.close()
    j = Journal(str(tmp_path / "db"))
    try:
        assert R.decode_format(K.FORMAT_KEY, j._db.get(K.FORMAT_KEY))[1] == R.FORMAT_VERSION
        assert seg_files(j) == []
        assert_images(j, model)
        run_workload(j, model, rng, 80)                    # new entries: in segments
        assert seg_files(j) and j.check(VPG) == []
        j.close()
        j = Journal(str(tmp_path / "db"))                  # both kinds live: nothing cut
        assert_images(j, model)
        j.promote(VPG, now=model.times[100] + j.settings(VPG).history_s)
        assert_images(j, model)
        j.promote(VPG, now=1e12)
        assert j.check(VPG) == []
        at = model.disks_at(model.log[-1].pos)
        for vm, disk in DISKS:
            assert (tmp_path / "rep" / vm / f"disk{disk}.img").read_bytes() == at[(vm, disk)]
    finally:
        j.close()


def test_append_timings_count_every_step(tmp_path):
    """Journal.timings: each append timed as a whole and by step, as GET /v1/status shows it."""
    rng = random.Random(43)
    model = Model()
    j = make_journal(tmp_path / "db", tmp_path / "rep", sync=True)
    try:
        before = j.timings.snapshot()["appends"]
        run_workload(j, model, rng, 30)
        snap = j.timings.snapshot()
        n = snap["appends"] - before
        assert n > 0
        assert sum(snap["histogram"]["counts"]) == snap["appends"]
        assert len(snap["histogram"]["counts"]) == len(snap["histogram"]["le_s"])
        assert snap["bytes"] > 0 and snap["max_s"] > 0 and snap["seconds"] >= snap["max_s"]
        steps = snap["steps"]
        # every append writes RocksDB (and fsyncs its WAL); the ones with data also write and
        # fdatasync a segment; the journal's other writes (VPG, disks) are not appends
        assert steps["db_write"]["count"] == steps["wal_sync"]["count"] == snap["appends"]
        assert 0 < steps["data_write"]["count"] == steps["data_sync"]["count"] <= n
        assert all(s["seconds"] >= s["max_s"] >= 0 for s in steps.values())
    finally:
        j.close()


def _drop_from_page_cache(j: Journal) -> bool:
    """Drop the segments from the page cache (True once no page of them is resident)."""
    d = j._vpg(VPG).segs.dir
    return pagecache.drop(os.path.join(d, n) for n in os.listdir(d))


def test_entry_data_not_in_the_page_cache_is_read_and_checked(tmp_path, monkeypatch):
    """A PIT read whose entries' data the page cache does not hold: a first pass asks the cache
    without waiting (which starts the disk reads), a second reads what it lacked; the images are
    right and a damaged byte is still caught, whichever pass reads it.

    Whether the first pass finds a piece is the kernel's race: a non-blocking read of a page it
    lacks starts the disk read and answers EAGAIN unless that read has already finished, which
    on a fast (virtual) disk it sometimes has. So the reads from a cold cache are checked for
    their result, and the second pass alone is checked with the first pass finding nothing."""
    rng = random.Random(49)
    model = Model()
    j = make_journal(tmp_path / "db", tmp_path / "rep", sync=True)
    try:
        run_workload(j, model, rng, 150)
        segs = j._vpg(VPG).segs
        cps = rng.sample(model.checkpoints, 8)
        victim = next(e for e in model.log[30:] if len(e.data) > 100)
        seq, off, _ = entry_ref(j, victim.pos)
        seg = segs._segs[seq]
        path = seg.path
        cold = _drop_from_page_cache(j)
        assert_images(j, model, cps)                        # from a cold cache: both passes
        got = segs._cached(seg, off, len(victim.data))
        assert got is not None and bytes(got) == victim.data
        if cold:
            assert pagecache.resident_pages(path) > 0       # the reads brought the data in

        asked = []

        def nothing_cached(seg, offset, length):            # every piece left to the second pass
            asked.append((seg.seq, offset, length))
            return None

        monkeypatch.setattr(segs, "_cached", nothing_cached)
        assert_images(j, model, cps)
        img = j.read(VPG, victim.vm, victim.disk, 0, CAPACITY, victim.pos)
        assert img[victim.offset:victim.offset + len(victim.data)] == victim.data
        assert (seq, off, len(victim.data)) in asked
        flip_bits(path, off + 7, 0x01)
        with pytest.raises(JournalCorrupt) as exc:          # caught by the second pass
            j.read(VPG, victim.vm, victim.disk, 0, CAPACITY, victim.pos)
        assert str(victim.pos) in str(exc.value) and "checksum" in str(exc.value)
        monkeypatch.undo()
        _drop_from_page_cache(j)
        with pytest.raises(JournalCorrupt) as exc:          # and by whichever pass reads it
            j.read(VPG, victim.vm, victim.disk, 0, CAPACITY, victim.pos)
        assert str(victim.pos) in str(exc.value) and "checksum" in str(exc.value)
    finally:
        j.close()


def test_without_non_blocking_reads_entry_data_is_read_in_place(tmp_path):
    rng = random.Random(50)
    model = Model()
    j = make_journal(tmp_path / "db", tmp_path / "rep", sync=True)
    try:
        run_workload(j, model, rng, 60)
        j._vpg(VPG).segs._nowait = False              # as on a file system without RWF_NOWAIT
        _drop_from_page_cache(j)
        assert_images(j, model, rng.sample(model.checkpoints, 6))
    finally:
        j.close()
