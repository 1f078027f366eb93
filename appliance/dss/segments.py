"""Entry data segments: the bytes of journal entries, outside RocksDB (format version 3).

An entry record in RocksDB is small: its header and a reference ``(segment, offset, XXH3 of
the data)``; the data itself is appended to the VPG's active segment file,
``<journal>/segments/<vpg_id>/<seq>.seg``, in stream order. Why: rocksdict holds the GIL while
RocksDB copies a WriteBatch into its WAL and memtable (about 3 ms per MiB here), stalling every
other thread of the VRA (the receivers, the API), and every byte then goes through the
memtable, a flush and compactions. ``os.pwritev`` and ``os.fdatasync`` release the GIL and the
data is written once (docs/FORMAT.md, "Entry data segments").

Ordering (``append.py``): the batch's data is written and fdatasynced before the RocksDB batch
that references it; so a durable entry's data is always durable. A crash in between leaves
unreferenced bytes after the last referenced one, cut off when the journal opens (``recover``).

Life cycle: a segment is rolled over at ``SEGMENT_BYTES``; segments whose entries have all been
promoted (or dropped by an image commit) are unlinked after the RocksDB batch that deleted
those entries is durable. A reader holds the ``Segment`` object while it reads, so a segment
unlinked meanwhile stays readable until the reader is done (the descriptor closes with the
last reference); a reader that finds the segment gone treats the entry as promoted.
"""
from __future__ import annotations

import errno
import os
import shutil
import threading
import time

from xxhash import xxh3_64_intdigest as _xxh3

from .records import SegmentRef


SEGMENT_BYTES = 64 << 20
SUFFIX = ".seg"
_IOV_MAX = 1024
# Reads of many entries' data (``data_many``, a PIT read meets about a dozen, each at its own
# place in the segments) first ask the page cache without waiting (``RWF_NOWAIT``): what it
# holds is read at once, and for what it lacks the kernel starts the disk reads (readahead)
# before returning EAGAIN, so that the second pass, which waits for them, waits for all of them
# at once rather than one disk round trip after the other.
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


class ReadFailed(ValueError):
    """``data_many``: item ``item`` could not be read or failed its checksum."""

    def __init__(self, item: int, exc: Exception):
        super().__init__(str(exc))
        self.item = item


class Segment:
    """One open segment file; its descriptor closes when the last reference goes."""

    __slots__ = ("seq", "path", "fd", "size")

    def __init__(self, seq: int, path: str, fd: int, size: int):
        self.seq, self.path, self.fd, self.size = seq, path, fd, size

    def __del__(self):
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


class Segments:
    """The segment files of one VPG. ``write`` is called under the VPG's write lock."""

    def __init__(self, root: str, vpg_id: int, sync: bool, timings=None):
        self.dir = os.path.join(root, f"{vpg_id:08d}")
        self.sync = sync
        self.timings = timings          # an AppendTimings (data_write, data_sync), or None
        self._lock = threading.Lock()
        self._segs: dict[int, Segment] = {}
        self._active: Segment | None = None
        self._next = 1
        self._floor = 1         # segments below it were dropped on purpose (promoted)
        self._nowait = bool(_NOWAIT)

    # -- opening ------------------------------------------------------------------------------
    def recover(self, first: int | None, last: tuple[int, int] | None, *, keep_all: bool = False) -> None:
        """Open the segment files. ``last``: (segment, end of its data) of the newest live entry,
        None when no live entry references a segment (then every file is unreferenced);
        ``first``: the segment of the oldest live entry, None if that entry has its data inline
        (a journal of format version 2). Files before ``first`` (promoted) or after ``last``
        (written by a batch that never committed) are deleted, and the newest is cut to its
        referenced end. ``keep_all`` (the live entries could not be read): every file is
        opened as it is, and the next write starts a new segment."""
        os.makedirs(self.dir, 0o700, exist_ok=True)
        found = {}
        for name in os.listdir(self.dir):
            if name.endswith(SUFFIX) and name[:-len(SUFFIX)].isdigit():
                found[int(name[:-len(SUFFIX)])] = os.path.join(self.dir, name)
        for seq, path in sorted(found.items()):
            if not keep_all and (last is None or seq > last[0] or (first is not None and seq < first)):
                os.unlink(path)             # promoted, or written by a batch that never committed
                continue
            fd = os.open(path, os.O_RDWR)
            size = os.fstat(fd).st_size
            if not keep_all and seq == last[0] and size > last[1]:
                os.ftruncate(fd, last[1])   # the tail of a batch that never committed
                size = last[1]
            self._segs[seq] = Segment(seq, path, fd, size)
        self._next = max(found, default=0) + 1
        self._floor = min(self._segs, default=self._next)
        if not keep_all and last is not None and last[0] in self._segs:
            self._active = self._segs[last[0]]
        self._fsync_dir()

    # -- the write path -------------------------------------------------------------------------
    def write(self, datas: list) -> list[tuple[int, int]]:
        """Append the non-empty ``datas`` (in order) and make them durable when ``sync``;
        return ``(segment, offset)`` of each. On an error nothing is referenced: the next
        write goes to the same place."""
        total = sum(len(d) for d in datas)
        seg = self._active
        if seg is None or (seg.size and seg.size + total > SEGMENT_BYTES):
            seg = self._roll()
        out = []
        at = seg.size
        for d in datas:
            out.append((seg.seq, at))
            at += len(d)
        pos = seg.size
        t0 = time.perf_counter()
        for i in range(0, len(datas), _IOV_MAX):
            chunk = datas[i:i + _IOV_MAX]
            want = sum(len(d) for d in chunk)
            n = os.pwritev(seg.fd, chunk, pos)
            if n != want:               # a short write (a full file system): finish it or fail
                rest = b"".join(bytes(d) for d in chunk)[n:]
                while rest:
                    k = os.pwrite(seg.fd, rest, pos + n)
                    if k <= 0:
                        raise OSError(f"short write to {seg.path}")
                    n += k
                    rest = rest[k:]
            pos += want
        t1 = time.perf_counter()
        if self.sync:
            try:
                os.fdatasync(seg.fd)
            except OSError as exc:
                exc.fsync = True        # the file's content is unknown now: the caller poisons
                raise
        if self.timings is not None:
            self.timings.step("data_write", t1 - t0)
            if self.sync:
                self.timings.step("data_sync", time.perf_counter() - t1)
        seg.size = pos
        return out

    def _roll(self) -> Segment:
        os.makedirs(self.dir, 0o700, exist_ok=True)
        seq = self._next
        path = os.path.join(self.dir, f"{seq:010d}{SUFFIX}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        seg = Segment(seq, path, fd, 0)
        self._fsync_dir()               # the new file's name is durable before data references it
        with self._lock:
            self._segs[seq] = seg
            self._next = seq + 1
            self._active = seg
        return seg

    # -- reads ------------------------------------------------------------------------------------
    def data(self, src, length: int):
        """The data of an entry from ``records.decode_entry``: inline data as it is, or its
        segment's bytes, verified (``read``: None if the segment was dropped)."""
        if isinstance(src, SegmentRef):
            return self.read(src.seq, src.offset, length, src.digest)
        return src

    def read(self, seq: int, offset: int, length: int, digest: int):
        """The data of an entry, verified: bytes; None if the segment was dropped (promoted
        since the entry record was read); raises ValueError if the segment is missing or the
        data does not match ``digest``."""
        seg = self._segment(seq)
        if seg is None:
            return None
        return self._verified(seg, offset, length, digest, os.pread(seg.fd, length, offset))

    def data_many(self, items: list) -> list:
        """``data`` of many entries, ``[(src, length)]``, in that order (None for an entry whose
        segment was dropped). What the page cache holds is read at once (a non-blocking
        ``preadv``, which also starts the disk reads of the rest); then the rest. Raises
        ``ReadFailed`` (a ValueError naming the item) for the first that is missing or fails
        its checksum."""
        out = [None] * len(items)
        misses = []
        for i, (src, length) in enumerate(items):
            if not isinstance(src, SegmentRef):
                out[i] = src
                continue
            try:
                seg = self._segment(src.seq)
            except ValueError as exc:
                raise ReadFailed(i, exc) from None
            if seg is None:
                continue
            try:
                data = self._cached(seg, src.offset, length)
            except OSError as exc:
                raise ReadFailed(i, exc) from None
            if data is None:
                misses.append((i, seg, src, length))
            else:
                out[i] = (seg, src, length, data)
        for i, seg, src, length in misses:         # their reads started in the first pass
            try:
                out[i] = (seg, src, length, os.pread(seg.fd, length, src.offset))
            except OSError as exc:
                raise ReadFailed(i, exc) from None
        for i, got in enumerate(out):
            if type(got) is tuple:
                seg, src, length, data = got
                try:
                    out[i] = self._verified(seg, src.offset, length, src.digest, data)
                except ValueError as exc:
                    raise ReadFailed(i, exc) from None
        return out

    def _segment(self, seq: int) -> Segment | None:
        """The open segment ``seq``; None if it was dropped (promoted), ValueError if missing."""
        with self._lock:
            seg = self._segs.get(seq)
            floor = self._floor
        if seg is None:
            if seq < floor:
                return None
            raise ValueError(f"segment {seq} is missing from {self.dir}")
        return seg

    def _cached(self, seg: Segment, offset: int, length: int):
        """The bytes at ``offset`` if the page cache holds all of them, else None. Where the
        file system cannot tell (no non-blocking reads), they are read here, one by one."""
        if not self._nowait:
            return os.pread(seg.fd, length, offset)
        buf = bytearray(length)
        try:
            n = os.preadv(seg.fd, [buf], offset, _NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self._nowait = False        # a file system without non-blocking reads
            return os.pread(seg.fd, length, offset)
        return buf if n == length else None

    @staticmethod
    def _verified(seg: Segment, offset: int, length: int, digest: int, data):
        if len(data) != length:
            raise ValueError(f"segment {seg.seq} holds {len(data)} of the {length} bytes at offset {offset}")
        if _xxh3(data) != digest:
            raise ValueError(f"data checksum mismatch in segment {seg.seq} at offset {offset}")
        return data

    # -- letting go ---------------------------------------------------------------------------------
    def drop_before(self, seq: int | None) -> int:
        """Unlink the segments before ``seq`` (None: all but the active one); return how many."""
        with self._lock:
            act = self._active.seq if self._active is not None else None
            upto = act if seq is None or (act is not None and seq > act) else seq
            if upto is None:
                upto = self._next
            segs = [self._segs.pop(s) for s in [s for s in self._segs if s < upto]]
            self._floor = max(self._floor, upto)
        for s in segs:
            try:
                os.unlink(s.path)
            except FileNotFoundError:
                pass
        return len(segs)

    def drop_all(self) -> None:
        """Unlink every segment (the journal's entries were all dropped); the next write starts
        a new one."""
        with self._lock:
            segs = list(self._segs.values())
            self._segs.clear()
            self._active = None
            self._floor = self._next
        for s in segs:
            try:
                os.unlink(s.path)
            except FileNotFoundError:
                pass

    def nbytes(self) -> int:
        with self._lock:
            return sum(s.size for s in self._segs.values())

    def close(self) -> None:
        with self._lock:
            self._segs.clear()
            self._active = None

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _fsync_dir(self) -> None:
        if not self.sync:
            return
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

