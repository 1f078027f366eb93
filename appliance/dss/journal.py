"""The DSS journal: replicated writes of every VPG of a VRA, in one RocksDB.

A Journal is a log per VPG of entries (replicated writes) in stream order, plus a PIT index
per 4 KiB block, plus checkpoints (consistent cuts). Layout and ordering rules: docs/FORMAT.md,
"Journal (DSS)". In short:

* ``append`` validates a batch (positions strictly after ``durable_pos``, lsn contiguous within a
  generation, a new generation starts at lsn 1), appends the entries' data to the VPG's segment
  file and fdatasyncs it (``segments.py``), then writes entry records (referencing that data),
  index records, checkpoints and the VPG's new state record as ONE WriteBatch with the WAL
  fsynced before it returns (``append.py``). The caller acknowledges the sender only after that. A refused batch writes nothing.
* An image at position P = replica files + entries <= P (``read``). Entries older than the
  history window are promoted into the replica files (``promote``): replica writes, replica
  fsync, then one batch deletes them and records the promoted position. Before the replicas are
  touched a promotion intent is persisted, so a crash in between never serves a checkpoint the
  replicas have already moved past.
* Opening the database replays RocksDB's WAL: a batch is there entirely or not at all. Nothing
  else needs repair on open; ``check`` verifies every record.
* A write to the database that failed once makes the Journal refuse further writes: reopen it.

Thread safety: any method may be called from any thread. Reads run concurrently with appends
and promotion; see ``state.py`` for the locks.
"""
from __future__ import annotations

import os
import threading
import time as _time
import traceback
from dataclasses import replace

from rocksdict import WriteBatch

from . import append as _append
from . import check as _check
from . import checkpoint as _checkpoint
from . import hashes as _hashes
from . import image as _image
from . import keys as K
from . import promotion as _promotion
from . import reader as _reader
from . import records as R
from . import store
from .segments import Segments
from .errors import DSSError, JournalCorrupt, UnknownDisk, UnknownVPG
from .pos import ZERO, Checkpoint, Entry, Pos
from .settings import JournalSettings
from .state import DiskInfo, VpgState
from .timings import AppendTimings


class Journal:
    """All VPG journals of one VRA in one RocksDB at ``path``. Opening it recovers it."""

    def __init__(self, path: str, *, sync: bool = True):
        self.path = path
        self.sync = sync
        os.makedirs(path, exist_ok=True)
        try:
            self._db, self._cache = store.open_db(path)
        except Exception as exc:
            raise DSSError(f"cannot open the journal database at {path}: {exc}") from exc
        self._entries = self._db.get_column_family(store.ENTRIES_CF)
        self._index = self._db.get_column_family(store.INDEX_CF)
        self._entries_cf = self._db.get_column_family_handle(store.ENTRIES_CF)
        self._seg_root = os.path.join(path, "segments")
        self._index_cf = self._db.get_column_family_handle(store.INDEX_CF)
        self._wopt = store.write_options(False)      # durability: see _write
        self.timings = AppendTimings()          # how long appends take, step by step
        self._lock = threading.Lock()          # the VPG registry and the format record
        self._vpgs: dict[str, VpgState] = {}
        self._failed: BaseException | None = None
        self._closed = False
        try:
            self._load()
        except BaseException as exc:
            traceback.clear_frames(exc.__traceback__)      # let go of iterators, then of the database
            self.close()
            raise

    # -- opening and closing ----------------------------------------------------------
    def _load(self) -> None:
        raw = self._db.get(K.FORMAT_KEY)
        if raw is None:
            self._next_id = 1
            self._write(self._batch_put(None, K.FORMAT_KEY, R.encode_format(K.FORMAT_KEY, 1)), "create")
        else:
            self._next_id, version = self._decode("format record", "-", R.decode_format,
                                                  K.FORMAT_KEY, raw)
            if version != R.FORMAT_VERSION:     # its records stay readable; new ones are newer
                self._write(self._batch_put(None, K.FORMAT_KEY,
                                            R.encode_format(K.FORMAT_KEY, self._next_id)), "upgrade")
        it = self._db.iter()
        it.seek(K.VPG_KEY_RANGE[0])
        found = []
        while it.valid() and it.key() < K.VPG_KEY_RANGE[1]:
            found.append((it.key(), it.value()))
            it.next()
        del it
        for key, value in found:
            name = K.parse_vpg_key(key)
            vpg_id, settings = self._decode("VPG record", name, R.decode_vpg, key, value)
            skey = K.format_state_key(vpg_id)
            sealed, durable, promoted, promoting, entries, nbytes = self._decode(
                "state record", name, R.decode_state, skey, self._db.get(skey))
            v = VpgState(name, vpg_id, JournalSettings.from_dict(settings), sealed, durable, promoted,
                         promoting, entries, nbytes)
            v.segs = Segments(self._seg_root, vpg_id, self.sync, self.timings)
            self._recover_segments(v)
            lo, hi = K.disk_key_range(vpg_id)
            it = self._db.iter()
            it.seek(lo)
            while it.valid() and it.key() < hi:
                _, vmb, disk = K.parse_disk_key(it.key())
                capacity = self._decode("disk record", name, R.decode_disk, it.key(), it.value())
                self._open_disk(v, vmb, disk, capacity)
                it.next()
            del it
            lo, hi = K.progress_key_range(vpg_id)
            it = self._db.iter()
            it.seek(lo)
            while it.valid() and it.key() < hi:
                _, source = K.parse_progress_key(it.key())
                v.progress[source] = self._decode(f"progress of source {source}", name, R.decode_progress,
                                                  it.key(), it.value())
                it.next()
            del it
            self._vpgs[name] = v

    def _recover_segments(self, v: VpgState) -> None:
        """Open the VPG's entry data segments, cutting what no durable entry references
        (segments.py): the oldest and the newest live entry say which segments are live."""
        lo, hi = K.vpg_key_range(v.id)
        first = last = None
        it = self._entries.iter()
        try:
            it.seek(K.format_entry_key(v.id, _after(v.promoted)))
            if it.valid() and it.key() < hi:
                src = R.decode_entry(it.key(), it.value())[5]
                first = src.seq if isinstance(src, R.SegmentRef) else None
                it.seek_for_prev(hi)
                _, _, _, length, _, src = R.decode_entry(it.key(), it.value())
                last = (src.seq, src.offset + length) if isinstance(src, R.SegmentRef) else None
        except R.RecordError:
            del it
            v.segs.recover(None, None, keep_all=True)   # check() names the corrupt record
            return
        del it
        v.segs.recover(first, last)

    def close(self) -> None:
        """Close replica files and the database. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for v in self._vpgs.values():
                v.close_disks()
                v.segs.close()
            self._vpgs = {}
            del self._entries_cf, self._index_cf
            self._entries.close()
            self._index.close()
            self._db.close()
            del self._entries, self._index, self._db

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- VPGs ----------------------------------------------------------------------------
    def create_vpg(self, vpg: str, settings: JournalSettings) -> None:
        """Create a VPG's journal (idempotent: an existing VPG takes the given settings)."""
        settings.validate()
        with self._lock:
            if vpg in self._vpgs:
                exists = True
            else:
                exists = False
                vpg_id = self._next_id
                v = VpgState(vpg, vpg_id, replace(settings))
                v.segs = Segments(self._seg_root, vpg_id, self.sync, self.timings)
                v.segs.recover(None, None)          # leftovers of a deleted VPG of that id: none
                os.makedirs(settings.replica_dir, exist_ok=True)
                wb = self._batch_put(None, K.format_vpg_key(vpg),
                                     R.encode_vpg(K.format_vpg_key(vpg), vpg_id, settings.to_dict()))
                wb.put(v.state_key, v.state_value())
                wb.put(K.FORMAT_KEY, R.encode_format(K.FORMAT_KEY, vpg_id + 1))
                self._write(wb, f"create VPG {vpg}")
                self._next_id = vpg_id + 1
                self._vpgs[vpg] = v
        if exists and self.settings(vpg) != settings:
            self.set_settings(vpg, settings)

    def set_settings(self, vpg: str, settings: JournalSettings) -> None:
        settings.validate()
        v = self._vpg(vpg)
        with v.write_lock:
            if settings.replica_dir != v.settings.replica_dir and v.disks:
                raise DSSError(f"VPG {vpg} has registered replica disks in {v.settings.replica_dir}: "
                               "its replica_dir cannot change")
            key = K.format_vpg_key(vpg)
            self._write(self._batch_put(None, key, R.encode_vpg(key, v.id, settings.to_dict())),
                        f"settings of VPG {vpg}")
            v.settings = replace(settings)

    def settings(self, vpg: str) -> JournalSettings:
        return replace(self._vpg(vpg).settings)

    def vpgs(self) -> list[str]:
        with self._lock:
            return sorted(self._vpgs)

    @store.releases_iterators
    def delete_vpg(self, vpg: str, keep_replicas: bool) -> None:
        """Delete a VPG's journal, checkpoints and state; its replica files too unless ``keep_replicas``."""
        v = self._vpg(vpg)
        with v.promote_lock, v.pins.exclusive(), v.write_lock:
            wb = WriteBatch(raw_mode=True)
            wb.delete(K.format_vpg_key(vpg))
            wb.delete(v.state_key)
            wb.delete_range(*K.disk_key_range(v.id))
            wb.delete_range(*K.checkpoint_key_range(v.id))
            wb.delete_range(*K.progress_key_range(v.id))
            wb.delete_range(*K.vpg_key_range(v.id), self._entries_cf)
            wb.delete_range(*K.vpg_key_range(v.id), self._index_cf)
            self._write(wb, f"delete VPG {vpg}")
            with self._lock:
                del self._vpgs[vpg]
            v.close_disks()
            v.segs.remove()
            v.pins.floor = K.MAX_POS
        if not keep_replicas:
            for d in v.disks.values():
                if os.path.exists(d.path):
                    os.unlink(d.path)
                try:
                    os.rmdir(os.path.dirname(d.path))
                except OSError:
                    pass

    # -- replica disks ---------------------------------------------------------------------
    def register_disk(self, vpg: str, vm: str, disk: int, capacity: int) -> None:
        """Register a disk and create its sparse replica file ``<replica_dir>/<vm>/disk<N>.img``.
        Registering again with a larger capacity grows the replica."""
        v = self._vpg(vpg)
        vmb = K.format_vm(vm)
        if capacity <= 0 or not 0 <= disk < 0x10000:
            raise ValueError(f"disk {disk} with capacity {capacity}: need 0 <= disk < 65536 and capacity > 0")
        with v.write_lock:
            d = v.disks.get((vmb, disk))
            if d is not None and capacity < d.capacity:
                raise DSSError(f"disk {disk} of VM {d.vm} has {d.capacity} bytes: a replica cannot shrink")
            if d is not None and capacity == d.capacity:
                return
            key = K.format_disk_key(v.id, vmb, disk)
            self._write(self._batch_put(None, key, R.encode_disk(key, capacity)), f"register disk of VPG {vpg}")
            self._open_disk(v, vmb, disk, capacity)

    def _open_disk(self, v: VpgState, vmb: bytes, disk: int, capacity: int) -> None:
        vm = K.parse_vm(vmb)
        path = os.path.join(v.settings.replica_dir, vm, f"disk{disk}.img")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        old = v.disks.get((vmb, disk))
        fd = old.fd if old is not None else os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(fd).st_size < capacity:
            os.ftruncate(fd, capacity)
        v.disks[(vmb, disk)] = DiskInfo(vm, vmb, disk, capacity, path, fd, K.index_disk_prefix(v.id, vmb, disk))
        v.names.clear()

    def disks(self, vpg: str) -> list[tuple[str, int, int]]:
        return sorted((d.vm, d.disk, d.capacity) for d in self._vpg(vpg).disks.values())

    # -- the write path ------------------------------------------------------------------------
    @store.releases_iterators
    def append(self, vpg: str, entries: list[Entry], checkpoints: list[Checkpoint] = (), *,
               time: float | None = None, progress: dict[str, int] | None = None) -> Pos | None:
        """Make ``entries`` and ``checkpoints`` durable as one batch; return the new durable position.

        ``time`` is the entry time (default: now). ``progress`` ({source: seq}) is stored in the
        same batch: the VRA's record of how far each sender's stream is durable (``progress()``).
        Raises DuplicateEntry if any entry is at or before the durable position, StreamGap if the
        first entry does not follow it, InvalidAppend for anything else wrong; nothing is written then.
        """
        v = self._vpg(vpg)
        now = _time.time() if time is None else float(time)
        return _append.append(self, v, entries, checkpoints, now, progress)

    def durable_pos(self, vpg: str) -> Pos | None:
        return self._vpg(vpg).durable

    def progress(self, vpg: str) -> dict[str, int]:
        """{source: seq} as last stored by a durable ``append(..., progress=...)``."""
        return dict(self._vpg(vpg).progress)

    # -- checkpoints -------------------------------------------------------------------------------
    @store.releases_iterators
    def checkpoints(self, vpg: str, *, since: float | None = None, tag_only: bool = False) -> list[Checkpoint]:
        """Recoverable checkpoints in stream order (time >= ``since``; tagged ones only if ``tag_only``)."""
        return _checkpoint.listing(self, self._vpg(vpg), since, tag_only)

    @store.releases_iterators
    def latest_checkpoint(self, vpg: str, tagged: bool = False) -> Checkpoint | None:
        return _checkpoint.latest(self, self._vpg(vpg), tagged)

    # -- reads, promotion, limits, images, check: one module each ----------------------------------
    @store.releases_iterators
    def read(self, vpg: str, vm: str, disk: int, offset: int, length: int, at: Checkpoint | Pos) -> bytes:
        """The bytes of a disk as they were at a checkpoint or position: replica + entries <= at."""
        return _reader.read(self, vpg, vm, disk, offset, length, at)

    def replica_range(self, vpg: str, vm: str, disk: int, offset: int, length: int):
        """Context manager: ``(durable pos, view of the replica's bytes or None)``; the view only
        when no journal entry touches the range, so it is the image at that position there."""
        return _reader.replica_range(self, vpg, vm, disk, offset, length)

    def replica_extents(self, vpg: str, vm: str, disk: int, offset: int, length: int):
        """The replica file's data extents in the range (``[(start, end), ...]``, the rest holes:
        zeros), or None if the file system cannot tell; use inside ``replica_range``'s context
        where it gave a view (there the replica is the image)."""
        return _reader.replica_extents(self, vpg, vm, disk, offset, length)

    def image_hashes(self, vpg: str, vm: str, disk: int, offset: int, length: int):
        """``(durable pos, hash per 4 KiB block, replica hole per block)`` of the image at the
        durable position (``hashes.py``): what delta sync compares a source disk against."""
        return _hashes.image_hashes(self, vpg, vm, disk, offset, length)

    @store.releases_iterators
    def promote(self, vpg: str, now: float | None = None) -> int:
        """Apply the entries older than the history window to the replicas; return how many."""
        return _promotion.promote(self, self._vpg(vpg), now)

    @store.releases_iterators
    def enforce_limits(self, vpg: str) -> list[dict]:
        """Warning and hard limit alerts; past the hard limit the oldest history is promoted."""
        return _promotion.enforce_limits(self, self._vpg(vpg))

    @store.releases_iterators
    def check(self, vpg: str) -> list[str]:
        """Verify every record of a VPG (checksums, index consistency, counters); list the problems."""
        return _check.check(self, self._vpg(vpg))

    @store.releases_iterators
    def image(self, vpg: str, vm: str, disk: int, checkpoint: Checkpoint, scratch_path: str):
        """A disk at ``checkpoint`` with a scratch overlay for writes (RecoveryImage)."""
        v = self._vpg(vpg)
        return _image.RecoveryImage(self, v, self._disk(v, vm, disk), checkpoint, scratch_path)

    @store.releases_iterators
    def usage(self, vpg: str) -> dict:
        v = self._vpg(vpg)
        oldest = newest = None
        lo, hi = K.vpg_key_range(v.id)
        it = self._entries.iter()
        it.seek(K.format_entry_key(v.id, _after(v.promoted)))
        if it.valid() and it.key() < hi:
            oldest = self._entry_time(v, it.key(), it.value())
        it.seek_for_prev(hi)
        if it.valid() and it.key() >= lo:
            newest = self._entry_time(v, it.key(), it.value())
        del it
        first, last = _checkpoint.first(self, v), _checkpoint.latest(self, v, False)
        span = (last.time - first.time) if first and last else 0.0     # recoverable history
        return {"bytes": v.nbytes, "entries": v.entries, "oldest_time": oldest, "newest_time": newest,
                "history_s_actual": span, "promoted_pos": v.promoted, "durable_pos": v.durable,
                "hard_limit_bytes": v.settings.hard_limit_bytes, "warn_bytes": v.settings.warn_bytes}

    def _entry_time(self, v: VpgState, key: bytes, value: bytes) -> float:
        return self._decode(f"entry {K.parse_entry_key(key)[1]}", v.name, R.decode_entry, key, value)[4]

    # -- helpers -------------------------------------------------------------------------------------
    def _vpg(self, vpg: str) -> VpgState:
        v = self._vpgs.get(vpg)
        if v is None:
            if self._closed:
                raise DSSError(f"the journal at {self.path} is closed")
            raise UnknownVPG(vpg)
        return v

    def _disk(self, v: VpgState, vm: str, disk: int) -> DiskInfo:
        d = v.names.get((vm, disk))
        if d is None:
            try:
                d = v.disks.get((K.format_vm(vm), disk))
            except (ValueError, TypeError, AttributeError):
                d = None
            if d is None:
                raise UnknownDisk(disk, vm, v.name)
            v.names[(vm, disk)] = d
        return d

    @staticmethod
    def _decode(what: str, vpg: str, fn, key: bytes, value):
        try:
            return fn(key, value)
        except R.RecordError as exc:
            raise JournalCorrupt(what, vpg, exc) from None

    def _batch_put(self, cf, key: bytes, value: bytes) -> WriteBatch:
        wb = WriteBatch(raw_mode=True)
        if cf is None:
            wb.put(key, value)
        else:
            wb.put(key, value, cf)
        return wb

    def _check_writable(self) -> None:
        if self._closed:
            raise DSSError(f"the journal at {self.path} is closed")
        if self._failed is not None:
            raise DSSError(f"a write to the journal at {self.path} failed earlier ({self._failed}): "
                           "reopen it to recover")

    def _write(self, wb: WriteBatch, step: str, timed: bool = False) -> None:
        """Write one batch; when ``sync``, return only after the WAL is fsynced.

        The fsync is a separate ``flush_wal(sync=True)`` rather than a write with sync=True: the
        result on disk is the same, but rocksdict holds the GIL through a synced write and
        releases it in flush_wal, so other threads (reads, the network) run during the fsync,
        and concurrent appends of different VPGs share fsyncs. The batch is visible to readers
        before it is durable; the read path never looks past ``durable_pos`` and checkpoint
        listings skip checkpoints of appends in flight. A failure poisons the Journal for writes.
        """
        self._check_writable()
        clock = _time.perf_counter
        try:
            t0 = clock()
            self._db.write(wb, self._wopt)
            t1 = clock()
            if self.sync:
                self._db.flush_wal(True)
            if timed:                   # an append's: its db_write and wal_sync steps
                self.timings.step("db_write", t1 - t0)
                if self.sync:
                    self.timings.step("wal_sync", clock() - t1)
        except Exception as exc:
            self._failed = exc
            raise DSSError(f"{step}: journal write failed: {exc}") from exc


def _after(p: Pos | None) -> Pos:
    """The lowest position that sorts after ``p``."""
    return ZERO if p is None else Pos(p.generation, p.lsn + 1)
