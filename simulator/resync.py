"""Resynchronisation through the mirror ring: bitmap sync and delta sync (block lists).

Both read blocks back from a VM's disk under the disk's lock and append them to
the ring in order with the guest's writes, so a consumer that applies the ring
in order ends with the disk's content (docs/FORMAT.md, "Dirty bitmap" and
"Delta sync"). Mixed into ``IOPath``, whose ring, VMs and stats they use.
"""
from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from . import ring as R

if TYPE_CHECKING:
    from .iopath import Disk, VMRuntime

SYNC_RUN_MAX = 64 << 10      # largest SYNC record of a delta sync
ZERO_RUN_MAX = 1 << 20       # most zero bytes one ZERO record stands for
SYNC_BATCH_RUNS = 64         # most runs of a delta sync read and appended under one disk lock hold
SYNC_BATCH_BYTES = 1 << 20   # ... and most bytes


def dirty_blocks(bitmap: bytes):
    """Block numbers set in a bitmap, ascending."""
    for i, byte in enumerate(bitmap):
        if byte:
            for bit in range(8):
                if byte >> bit & 1:
                    yield i * 8 + bit


class ResyncMixin:
    # -- bitmap sync -------------------------------------------------------------
    def sync(self, vm_uuid: str, stop: threading.Event | None = None) -> int:
        """Stream every dirty block of a VM's disks as SYNC records; the number sent.

        The bitmap is taken (copied and cleared) under the disk lock; each block is
        then read and appended under the same lock, so a guest write to it lands
        either before the read (and is in the data) or after it (and follows it in
        the stream). Blocks that could not be sent go back into the bitmap.
        """
        vm = self.vms[vm_uuid]
        sent = 0
        for disk in vm.disks:
            with disk.lock:
                bitmap = disk.take_bitmap()
            blocks = list(dirty_blocks(bitmap))
            for i, b in enumerate(blocks):
                off = b * disk.block
                length = min(disk.block, disk.capacity - off)
                ok = False
                while not ok and self.attached and not (stop and stop.is_set()):
                    with disk.lock:
                        got = self.ring.try_reserve(length)
                        if got is not None:
                            pos, seq, view = got
                            n = os.preadv(disk.fd, [view], off)
                            if n < length:
                                view[n:] = bytes(length - n)
                            vm.vm_seq += 1
                            self.ring.commit_header(pos, R.SYNC, seq, disk.index, vm.generation,
                                                    vm.vm_seq, off, vm.uuid_bytes, view)
                            self.ring.commit(pos)
                            ok = True
                    if not ok:
                        time.sleep(0.002)
                if not ok:
                    with disk.lock:
                        for rest in blocks[i:]:
                            disk.mark_dirty(rest * disk.block, 1)
                    return sent
                sent += 1
                self.stats.sync_blocks += 1
        return sent

    # -- delta sync -------------------------------------------------------------
    def sync_blocks(self, vm_uuid: str, disk_index: int, block_size: int, blocks,
                    stop: threading.Event | None = None) -> dict:
        """Stream chosen blocks of one disk through the ring, in order with the guest's writes.

        Used by a VRA's delta sync: ``blocks`` are the numbers of the ``block_size``
        blocks that differ from the recovery side. Like ``sync``, each piece is read
        and appended under the disk lock, so a guest write to it either precedes the
        read (and is in the data) or follows the record in the stream. All-zero
        blocks become ZERO records (no data; consecutive ones merged, up to
        ``ZERO_RUN_MAX`` bytes), the others SYNC records of up to ``SYNC_RUN_MAX``
        bytes. Blocks that could not be sent (the VRA detached, ``stop``) go into the
        dirty bitmap, so a bitmap sync covers them. Returns the counts.
        """
        vm = self.vms[vm_uuid]
        if not 0 <= disk_index < len(vm.disks):
            raise ValueError(f"VM {vm.name} has no disk {disk_index}")
        disk = vm.disks[disk_index]
        if block_size <= 0 or block_size % 512 or block_size > SYNC_RUN_MAX:
            raise ValueError(f"block_size must be a multiple of 512 up to {SYNC_RUN_MAX}, not {block_size}")
        nblocks = (disk.capacity + block_size - 1) // block_size
        todo = np.unique(np.fromiter((int(b) for b in blocks), dtype=np.int64))
        if todo.size and (todo[0] < 0 or todo[-1] >= nblocks):
            raise ValueError(f"blocks must be in [0, {nblocks}) for disk {disk_index} of VM {vm.name}")
        out = {"blocks": 0, "zero_blocks": 0, "records": 0, "bytes": 0, "unsent": 0}
        # runs of consecutive blocks, each at most one read's worth
        per_read = max(1, ZERO_RUN_MAX // block_size)
        runs: list[list[int]] = []
        if todo.size:
            cut = np.flatnonzero(np.diff(todo) != 1) + 1
            for a, b in zip(np.concatenate(([0], cut)).tolist(), np.concatenate((cut, [todo.size])).tolist()):
                first = int(todo[a])
                for s in range(0, b - a, per_read):
                    runs.append([first + s, min(per_read, b - a - s)])
        i = 0
        while i < len(runs):
            # a batch of runs read and appended under one hold of the disk lock
            j, nbytes = i, 0
            while j < len(runs) and j - i < SYNC_BATCH_RUNS and (j == i or nbytes + runs[j][1] * block_size <= SYNC_BATCH_BYTES):
                nbytes += runs[j][1] * block_size
                j += 1
            if not self.attached or (stop is not None and stop.is_set()):
                break
            with disk.lock:
                done = self._sync_batch(vm, disk, block_size, runs[i:j], out)
            while done and i < j:                 # drop what went into the ring
                if done >= runs[i][1]:
                    done -= runs[i][1]
                    i += 1
                else:
                    runs[i] = [runs[i][0] + done, runs[i][1] - done]
                    done = 0
            if i < j:
                time.sleep(0.002)                 # the ring is full: let the VRA catch up
        if i < len(runs):
            with disk.lock:
                for first, count in runs[i:]:
                    disk.mark_dirty(first * block_size, count * block_size)
            out["unsent"] = sum(c for _, c in runs[i:])
        return out

    def _sync_batch(self, vm: VMRuntime, disk: Disk, bs: int, runs, out: dict) -> int:
        """Read the blocks of ``runs`` ([first, count], ascending) and append them as ZERO/SYNC
        records (caller holds the disk lock); how many blocks, counted through the runs in
        order, went into the ring before it was full. The records are committed together at
        the end (in order), so the VRA wakes once for the batch, not once per record."""
        total = sum(c for _, c in runs)
        buf = bytearray(total * bs)
        mv = memoryview(buf)
        at = 0
        for first, count in runs:
            off0 = first * bs
            length = min(count * bs, disk.capacity - off0)
            n = os.preadv(disk.fd, [mv[at:at + length]], off0)   # past EOF reads as zeros
            if n < length:
                buf[at + n:at + length] = bytes(length - n)
            at += count * bs
        nonzero = np.frombuffer(buf, dtype=np.uint8).reshape(total, bs).any(axis=1).tolist()
        ring, stats = self.ring, self.stats
        per_sync = max(1, SYNC_RUN_MAX // bs)
        reserved = []
        done = base = 0
        try:
            for first, count in runs:
                off0 = first * bs
                k = 0
                while k < count:
                    z = not nonzero[base + k]
                    e = k + 1
                    limit = count if z else min(count, k + per_sync)
                    while e < limit and (not nonzero[base + e]) == z:
                        e += 1
                    off = off0 + k * bs
                    nbytes = min((e - k) * bs, disk.capacity - off)
                    got = ring.try_reserve(8 if z else nbytes)
                    if got is None:
                        return done
                    pos, seq, view = got
                    if z:
                        view[:] = nbytes.to_bytes(8, "little")
                    else:
                        view[:] = mv[(base + k) * bs:(base + k) * bs + nbytes]
                    vm.vm_seq += 1
                    ring.commit_header(pos, R.ZERO if z else R.SYNC, seq, disk.index, vm.generation,
                                       vm.vm_seq, off, vm.uuid_bytes, view)
                    reserved.append(pos)
                    out["records"] += 1
                    if z:
                        out["zero_blocks"] += e - k
                        stats.zero_blocks += e - k
                    else:
                        out["blocks"] += e - k
                        out["bytes"] += nbytes
                        stats.delta_blocks += e - k
                    done += e - k
                    k = e
                base += count
            return done
        finally:
            for pos in reserved:
                ring.commit(pos)
