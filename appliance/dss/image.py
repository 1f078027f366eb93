"""RecoveryImage: one disk at a checkpoint, read through replica + journal, writes to a scratch overlay.

The journal is never written while an image is open: a recovered VM (failover test, failover,
move) starts at once, without copying its disk. The image pins its checkpoint, so promotion
keeps the replica at or before it for as long as the image is open.

Scratch overlay: ``scratch_path`` is a sparse file of the disk's capacity holding the image's
own 4 KiB blocks; ``scratch_path + ".map"`` is a 64-byte header naming the VPG, disk and
checkpoint, then a bitmap with one bit per block (set = the block lives in the scratch file).
A partial write of a block not yet in the overlay first copies the block's content at the
checkpoint. Opening an image on an existing scratch of the same VPG, disk and checkpoint resumes
it (a VRA restart keeps the recovered VM's writes); a scratch of anything else is refused.
The scratch is not fsynced: it survives a process restart, not a host crash.

    open ──read/write──> open
      ├── discard ──> discarded   scratch and map deleted (rollback)
      ├── close ────> closed      scratch kept, resumable
      └── commit ───> committed   replica = image content; scratch deleted
                        1. promote the VPG's journal up to the checkpoint
                        2. one batch: drop every remaining entry, index record and checkpoint of
                           the VPG; durable = promoted = checkpoint position; the checkpoint's
                           generation is closed (the VPG needs a delta sync in a new generation)
                        3. copy the overlay blocks into the replica, fsync it
                      A crash in 1 or 2 leaves the journal consistent; a crash in 3 is finished by
                      opening the image on the same scratch again and committing again.
"""
from __future__ import annotations

import os
import struct
import threading

from rocksdict import WriteBatch

from . import keys as K
from .errors import DSSError
from .pos import ZERO, Checkpoint
from .promotion import promote_while
from .reader import check_range, read_at
from .state import DiskInfo, VpgState
from .store import releases_iterators

MAP_MAGIC = b"TDMSCR01"
# magic, version, vpg id, vm, disk, generation, lsn, checkpoint id, capacity; padded to 64 bytes
MAP_HEADER = struct.Struct("<8sII16sHIQQQ2x")
assert MAP_HEADER.size == 64
_B = K.BLOCK
_SHIFT = K.BLOCK_SHIFT
COPY_CHUNK = 1 << 20


class RecoveryImage:
    def __init__(self, j, v: VpgState, d: DiskInfo, checkpoint: Checkpoint, scratch_path: str):
        self._j, self._v, self._d = j, v, d
        self.checkpoint = checkpoint
        self.capacity = d.capacity
        self.scratch_path = scratch_path
        self.replica_path = d.path      # after commit, the disk's content lives here
        self._lock = threading.Lock()
        pos = checkpoint.pos
        if v.durable is None or pos > v.durable:
            pos = v.durable or ZERO
        self._pos = pos
        v.pins.pin(pos, image=self)
        try:
            self._open_scratch()
        except BaseException:
            v.pins.unpin(image=self)
            raise
        self._open = True

    def _open_scratch(self) -> None:
        d, cp = self._d, self.checkpoint
        nblocks = (d.capacity + _B - 1) >> _SHIFT
        header = MAP_HEADER.pack(MAP_MAGIC, 1, self._v.id, d.vmb, d.disk, cp.pos.generation, cp.pos.lsn,
                                 cp.id, d.capacity)
        map_path = self.scratch_path + ".map"
        if os.path.exists(self.scratch_path) or os.path.exists(map_path):
            try:
                with open(map_path, "rb") as f:
                    old = f.read()
            except OSError:
                old = b""
            if old[:64] != header or len(old) != 64 + (nblocks + 7) // 8:
                raise DSSError(f"scratch {self.scratch_path} belongs to another image (or its map is missing): "
                               "discard it or choose another path")
            self._map = bytearray(old[64:])
        else:
            self._map = bytearray((nblocks + 7) // 8)
            with open(map_path, "wb") as f:
                f.write(header + self._map)
        self._sfd = os.open(self.scratch_path, os.O_RDWR | os.O_CREAT, 0o600)
        self._mfd = os.open(map_path, os.O_RDWR)
        if os.fstat(self._sfd).st_size < d.capacity:
            os.ftruncate(self._sfd, d.capacity)

    # -- IO ----------------------------------------------------------------------------
    @releases_iterators
    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            self._check_open()
            check_range(self._d, offset, length)
            return self._read(offset, length)

    def _read(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        out = bytearray(length)
        end = offset + length
        m = self._map
        block, last = offset >> _SHIFT, (end - 1) >> _SHIFT
        while block <= last:
            mine = m[block >> 3] >> (block & 7) & 1
            run = block + 1
            while run <= last and (m[run >> 3] >> (run & 7) & 1) == mine:
                run += 1
            a, b = max(offset, block << _SHIFT), min(end, run << _SHIFT)
            if mine:
                data = os.pread(self._sfd, b - a, a)
            else:
                data = read_at(self._j, self._v, self._d, a, b - a, self._pos)
            out[a - offset:b - offset] = data
            block = run
        return bytes(out)

    @releases_iterators
    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            self._check_open()
            check_range(self._d, offset, len(data))
            if not data:
                return
            end = offset + len(data)
            first, last = offset >> _SHIFT, (end - 1) >> _SHIFT
            start, stop = first << _SHIFT, min((last + 1) << _SHIFT, self.capacity)
            if start == offset and stop == end:
                buf = data
            else:                               # partial first or last block: merge with what is there
                buf = bytearray(stop - start)
                if offset > start or (first == last and end < stop):
                    hi = min(start + _B, stop)
                    buf[:hi - start] = self._read(start, hi - start)
                if end < stop and last != first:
                    lo = last << _SHIFT
                    buf[lo - start:] = self._read(lo, stop - lo)
                buf[offset - start:end - start] = data
            done = 0
            while done < len(buf):
                done += os.pwrite(self._sfd, memoryview(buf)[done:], start + done)
            m = self._map
            for b in range(first, last + 1):
                m[b >> 3] |= 1 << (b & 7)
            os.pwrite(self._mfd, m[first >> 3:(last >> 3) + 1], MAP_HEADER.size + (first >> 3))

    # -- endings -----------------------------------------------------------------------------
    def discard(self) -> None:
        """Roll back: forget the overlay (scratch and map deleted). The journal is untouched."""
        with self._lock:
            self._release(delete=True)

    def close(self) -> None:
        """Release the checkpoint; keep the scratch so that the image can be opened again."""
        with self._lock:
            self._release(delete=False)

    @releases_iterators
    def commit(self) -> None:
        """Make the replica the image's content; drop the VPG's journal after the checkpoint."""
        j, v, d, pos = self._j, self._v, self._d, self._pos
        with self._lock:
            self._check_open()
            same_disk = lambda other: (other._d.vmb, other._d.disk) == (d.vmb, d.disk)  # noqa: E731
            with v.pins.exclusive(image=self, same_disk=same_disk):
                promote_while(j, v, lambda t, cost: True, upto=pos)
                with v.promote_lock, v.write_lock:
                    wb = WriteBatch(raw_mode=True)
                    wb.delete_range(*K.vpg_key_range(v.id), j._entries_cf)
                    wb.delete_range(*K.vpg_key_range(v.id), j._index_cf)
                    wb.delete_range(*K.checkpoint_key_range(v.id))
                    sealed = max(v.sealed, pos.generation)
                    at = pos if pos != ZERO else None
                    wb.put(v.state_key, v.state_value(sealed=sealed, durable=at, promoted=at, promoting=at,
                                                      entries=0, nbytes=0))
                    j._write(wb, f"commit of an image of VPG {v.name} at {pos}")
                    with v.hashes.lock:         # the image went back: forget the block hashes
                        v.hashes.clear()
                        v.sealed, v.durable, v.promoted, v.promoting = sealed, at, at, at
                    v.entries = v.nbytes = 0
                    v.segs.drop_all()
                    v.pins.floor = pos
                self._copy_overlay()
            self._release(delete=True)

    def _copy_overlay(self) -> None:
        m, d = self._map, self._d
        nblocks = (self.capacity + _B - 1) >> _SHIFT
        chunk = COPY_CHUNK >> _SHIFT
        block = 0
        while block < nblocks:
            if block & 7 == 0 and not m[block >> 3]:
                block += 8
                continue
            if not m[block >> 3] >> (block & 7) & 1:
                block += 1
                continue
            run = block + 1
            while run < nblocks and m[run >> 3] >> (run & 7) & 1 and run - block < chunk:
                run += 1
            a, b = block << _SHIFT, min(run << _SHIFT, self.capacity)
            data = os.pread(self._sfd, b - a, a)
            done = 0
            while done < len(data):
                done += os.pwrite(d.fd, memoryview(data)[done:], a + done)
            block = run
        os.fsync(d.fd)

    def _release(self, delete: bool) -> None:
        if not self._open:
            if delete:
                self._unlink()
            return
        self._open = False
        os.close(self._sfd)
        os.close(self._mfd)
        self._v.pins.unpin(image=self)
        if delete:
            self._unlink()

    def _unlink(self) -> None:
        for p in (self.scratch_path, self.scratch_path + ".map"):
            if os.path.exists(p):
                os.unlink(p)

    def _check_open(self) -> None:
        if not self._open:
            raise DSSError(f"the recovery image at {self.scratch_path} is closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
