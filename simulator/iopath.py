"""A host's IO path: the role of the hypervisor's IO filter.

Every guest write lands in the VM's disk file and, while a VRA is attached to
the host, is mirrored into the host's ring (``ring.py``) in order, with a
per-host sequence number (``seq``) and a per-VM one (``vm_seq``). When no VRA is
attached, or the ring stays full for longer than the stall budget (50 ms), the
write is recorded in the disk's dirty bitmap instead; the guest never waits
longer than that. A bitmap sync later reads the dirty blocks back from the disk
*inside the stream* (SYNC records), so the consumer applies them in order with
the writes around them.

Ordering for one write (crash safety, see docs/FORMAT.md):
1. reserve the record (seq, vm_seq; its header is written then, magic and
   checksum 0), let the guest fill the payload in place, write the checksum;
2. pwrite the payload to the disk file;
3. write the magic (commit): the consumer may now apply it;
4. acknowledge the guest.
A host that dies between 2 and 3 leaves an uncommitted reservation: recovery
marks its region dirty and turns it into padding, so the bitmap covers it.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass, field


from . import ring as R
from .resync import ResyncMixin, dirty_blocks  # noqa: F401  (dirty_blocks re-exported)

DIRTY_BLOCK = 64 << 10       # bitmap granularity
STALL_BUDGET = 0.050         # longest a guest write may wait for ring space
# Guest writes go to the disk file with O_DIRECT, as a hypervisor writes a VM's disk: the
# datastore, not the host's page cache, takes the write (ESXi has no page cache for VMFS;
# Hyper-V and QEMU cache=none write unbuffered). Reads stay buffered; the kernel keeps the two
# coherent (a direct write writes back and drops the cached pages of its range).
DIRECT_IO = os.environ.get("TIDEMARK_DISK_DIRECT_IO", "1") != "0"
_EINVAL = 22


class Disk:
    """A virtual disk: a sparse file plus a persistent dirty bitmap (one bit per 64 KiB)."""

    def __init__(self, index: int, path: str, capacity: int, block: int = DIRTY_BLOCK,
                 direct: bool | None = None):
        self.index = index
        self.path = path
        self.capacity = capacity
        self.block = block
        self.nblocks = (capacity + block - 1) // block
        self.lock = threading.Lock()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self.fd).st_size < capacity:
            os.ftruncate(self.fd, capacity)
        # Where guest writes go: an O_DIRECT descriptor of the same file when the file system
        # takes one, else the buffered one. ``write`` falls back to the buffered descriptor
        # for a write O_DIRECT refuses (not 512-aligned).
        self.dio_fd: int | None = None
        if DIRECT_IO if direct is None else direct:
            try:
                self.dio_fd = os.open(path, os.O_RDWR | os.O_DIRECT)
            except (OSError, AttributeError):
                self.dio_fd = None
        self.wfd = self.fd if self.dio_fd is None else self.dio_fd
        self._scratch: mmap.mmap | None = None   # aligned buffer for unmirrored writes
        self.cbt_path = path + ".cbt"
        nbytes = max(4096, (self.nblocks + 7) // 8)
        self._cbt_fd = os.open(self.cbt_path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._cbt_fd).st_size != nbytes:
            os.ftruncate(self._cbt_fd, nbytes)
        self._cbt = mmap.mmap(self._cbt_fd, nbytes)

    def close(self):
        self._cbt.flush()
        self._cbt.close()
        os.close(self._cbt_fd)
        if self.dio_fd is not None:
            os.close(self.dio_fd)
        os.close(self.fd)

    # -- data -------------------------------------------------------------
    def write(self, view, offset: int):
        """Write ``view`` at ``offset``: O_DIRECT when it can be, buffered otherwise."""
        try:
            os.pwrite(self.wfd, view, offset)
        except OSError as exc:
            if exc.errno != _EINVAL or self.wfd == self.fd:
                raise
            os.pwrite(self.fd, view, offset)   # refused before any byte was written

    def scratch(self, length: int) -> memoryview:
        """A page-aligned buffer of ``length`` bytes for a write that is not mirrored (callers
        hold ``lock``; valid until the next call)."""
        if self._scratch is None or len(self._scratch) < length:
            self._scratch = mmap.mmap(-1, max(length, 64 << 10))   # the old one goes with its views
        return memoryview(self._scratch)[:length]

    # -- dirty bitmap ---------------------------------------------------
    def mark_dirty(self, offset: int, length: int):
        first = offset // self.block
        last = (offset + max(length, 1) - 1) // self.block
        cbt = self._cbt
        for b in range(first, min(last, self.nblocks - 1) + 1):
            cbt[b >> 3] |= 1 << (b & 7)

    def bitmap(self) -> bytes:
        return bytes(self._cbt[:(self.nblocks + 7) // 8])

    def dirty_count(self) -> int:
        return int.from_bytes(self._cbt[:(self.nblocks + 7) // 8], "little").bit_count()

    def take_bitmap(self) -> bytes:
        """Copy and clear the bitmap (callers hold ``lock``)."""
        data = self.bitmap()
        self._cbt[:len(data)] = bytes(len(data))
        return data

    def clear_bitmap(self):
        with self.lock:
            self.take_bitmap()

    def sha256(self) -> str:
        return sha256_file(self.path, self.capacity)


def sha256_file(path: str, capacity: int) -> str:
    """SHA-256 of a disk's content as its VM sees it (``capacity`` bytes, holes read as zeros)."""
    h = hashlib.sha256()
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    with open(path, "rb") as f:
        left = capacity
        while left > 0:
            n = f.readinto(view[:min(left, len(buf))])
            if not n:
                break
            h.update(view[:n])
            left -= n
        if left > 0:  # a file shorter than its capacity reads as zeros past its end
            zero = bytes(min(left, 4 << 20))
            while left > 0:
                n = min(left, len(zero))
                h.update(zero[:n])
                left -= n
    return h.hexdigest()


@dataclass
class VMRuntime:
    """A powered-on VM as its host sees it."""

    uuid: str
    name: str
    disks: list[Disk]
    generation: int = 1
    vm_seq: int = 0
    uuid_bytes: bytes = b""

    def __post_init__(self):
        self.uuid_bytes = uuidlib.UUID(self.uuid).bytes


@dataclass
class IOStats:
    writes: int = 0
    bytes: int = 0
    mirrored_writes: int = 0
    mirrored_bytes: int = 0
    bitmap_writes: int = 0
    bitmap_bytes: int = 0
    sync_blocks: int = 0
    delta_blocks: int = 0
    zero_blocks: int = 0
    max_stall_ms: float = 0.0
    stalls_over_budget: int = 0
    started: float = field(default_factory=time.time)


class IOPath(ResyncMixin):
    """The host-wide write path and mirror state."""

    def __init__(self, ring_path: str, ring_capacity: int = 64 << 20,
                 stall_budget: float = STALL_BUDGET):
        self.ring_path = ring_path
        self.ring = R.RingProducer(ring_path, ring_capacity, create=not os.path.exists(ring_path))
        self.stall_budget = stall_budget
        self.attached: str | None = None   # name of the attached VRA
        self.overflow = False              # the ring overflowed: bitmap mode until it drains
        self.vms: dict[str, VMRuntime] = {}
        self.stats = IOStats()
        self._lock = threading.RLock()     # attach/detach/VM table changes
        self._barriers: dict[str, dict] = {}
        self._barrier_lock = threading.Lock()

    # -- guest writes -----------------------------------------------------
    def write(self, vm: VMRuntime, disk: Disk, offset: int, length: int, fill) -> bool:
        """One guest write; ``fill(view)`` writes the data into a buffer. True if mirrored.

        While mirroring, the buffer the guest fills is the record's payload in the
        ring (shared memory), and the disk write is made from it: the data is
        copied once, by the guest, as with an IO filter that shares the guest's
        buffers with the replication appliance.
        """
        if offset < 0 or length <= 0 or offset + length > disk.capacity:
            raise ValueError(f"write [{offset}, {offset + length}) is outside disk {disk.index} "
                             f"of {disk.capacity} bytes")
        ring = self.ring
        stats = self.stats
        with disk.lock:
            vm.vm_seq = vm_seq = vm.vm_seq + 1
            got = None
            if self.attached and not (self.overflow and self._still_overflowing()):
                got = ring.reserve(length, R.WRITE, disk.index, vm.generation, vm_seq, offset,
                                   vm.uuid_bytes)
                if got is None:
                    got = self._wait_for_room(vm, disk, offset, length, vm_seq)
            if got is not None:
                pos, _seq, view = got
                fill(view)
                ring.seal(pos, view)
                try:
                    disk.write(view, offset)
                except OSError:
                    self._abandon(disk, offset, length, pos)
                    raise
                ring.commit(pos)
                stats.mirrored_writes += 1
                stats.mirrored_bytes += length
            else:
                disk.mark_dirty(offset, length)
                buf = disk.scratch(length)
                fill(buf)
                disk.write(buf, offset)
                del buf
                stats.bitmap_writes += 1
                stats.bitmap_bytes += length
            stats.writes += 1
            stats.bytes += length
        return got is not None

    def _abandon(self, disk: Disk, offset: int, length: int, pos: int):
        """The disk write of a reserved record failed (a full datastore, say): the record becomes
        padding, so the VRA's stream goes on past it, and the region is marked dirty (the write
        may have reached part of it); the caller gives the guest the error."""
        disk.mark_dirty(offset, length)
        self.ring.abandon(pos)

    def _wait_for_room(self, vm: VMRuntime, disk: Disk, offset: int, length: int, vm_seq: int):
        """The ring is full: wait up to the stall budget for the VRA to free room (then bitmap mode)."""
        ring, stats = self.ring, self.stats
        t0 = time.monotonic()
        deadline = t0 + self.stall_budget
        got = None
        while got is None and time.monotonic() < deadline and self.attached:
            time.sleep(0.0005)
            got = ring.reserve(length, R.WRITE, disk.index, vm.generation, vm_seq, offset,
                               vm.uuid_bytes)
        stall = (time.monotonic() - t0) * 1000
        if stall > stats.max_stall_ms:
            stats.max_stall_ms = stall
        if got is None:
            self.overflow = True   # the VRA is behind: bitmap mode until it catches up
        return got

    def _still_overflowing(self) -> bool:
        """In bitmap mode after an overflow, writes skip the ring (no 50 ms wait each) until
        the VRA has freed half of it."""
        if self.ring.free_space() >= self.ring.capacity // 2:
            self.overflow = False
        return self.overflow

    def raw_write(self, disk: Disk, offset: int, view) -> None:
        """A write with no IO filter at all (benchmark baseline): the same disk write as ``write``."""
        disk.write(view, offset)

    # -- VMs -----------------------------------------------------------------
    def add_vm(self, vm: VMRuntime, reason: str):
        with self._lock:
            self.vms[vm.uuid] = vm
            self._control(vm, R.ATTACH_VM, {"vm": vm.name, "reason": reason,
                                            "generation": vm.generation,
                                            "next_vm_seq": vm.vm_seq + 1,
                                            "dirty": self._dirty_of(vm)})

    def remove_vm(self, vm_uuid: str, reason: str, drain_timeout: float = 10.0) -> VMRuntime:
        """Stop mirroring a VM: DETACH_VM, wait until the VRA took everything of it, close its disks.

        Whatever of the VM the VRA has not acknowledged by the timeout goes into
        the VM's dirty bitmap, which travels with it.
        """
        with self._lock:
            vm = self.vms.pop(vm_uuid)
            for d in vm.disks:
                d.lock.acquire()
            try:
                end = self._control(vm, R.DETACH_VM, {"vm": vm.name, "reason": reason,
                                                      "generation": vm.generation,
                                                      "last_vm_seq": vm.vm_seq})
            finally:
                for d in vm.disks:
                    d.lock.release()
        if end is not None:
            deadline = time.monotonic() + drain_timeout
            while self.attached and self.ring.tail() < end and time.monotonic() < deadline:
                time.sleep(0.002)
            if self.ring.tail() < end:
                with self._lock:
                    self._mark_pending({vm.uuid_bytes: vm})
        for d in vm.disks:
            d.close()
        return vm

    def _dirty_of(self, vm: VMRuntime) -> list[dict]:
        return [{"disk": d.index, "dirty_blocks": d.dirty_count(), "block_size": d.block}
                for d in vm.disks if d.dirty_count()]

    def _control(self, vm: VMRuntime | None, rtype: int, info: dict) -> int | None:
        """Append a control record if a VRA is attached; the position after it, else None."""
        if not self.attached:
            return None
        payload = json.dumps(info, sort_keys=True).encode()
        kw = {"generation": vm.generation, "vm_seq": vm.vm_seq, "vm_uuid": vm.uuid_bytes} if vm else {}
        seq = self.ring.append(rtype, payload, deadline=time.monotonic() + 5, **kw)
        if seq is None:
            return None
        return self.ring._head

    # -- VRA attach / detach ---------------------------------------------------
    def _all_disk_locks(self):
        return self._lock_disks(self.vms.values())

    @staticmethod
    def _lock_disks(vms) -> list[Disk]:
        """Take the disk locks of ``vms`` in one global order (VM uuid, disk), so no two takers deadlock."""
        disks = [d for vm in sorted(vms, key=lambda v: v.uuid) for d in vm.disks]
        for d in disks:
            d.lock.acquire()
        return disks

    # -- checkpoint barriers -------------------------------------------------------
    def barrier(self, barrier_id: str, vm_uuids: list[str], info: dict,
                hold: float = STALL_BUDGET) -> dict:
        """Hold the writes of these VMs, append a MARKER, and keep holding until ``release``.

        Every write of these VMs acknowledged before the barrier precedes the
        marker in the ring; none is acknowledged between the marker and the
        release. Held for at most ``hold`` seconds (the guest stall budget): a
        barrier that times out is released by itself and reports so at release.
        """
        with self._lock:
            if barrier_id in self._barriers:
                raise RuntimeError(f"barrier {barrier_id} is already held")
            vms = [self.vms[u] for u in vm_uuids if u in self.vms]
            t0 = time.monotonic()
            disks = self._lock_disks(vms)
            seq = None
            if self.attached:
                payload = json.dumps({**info, "barrier": barrier_id,
                                      "vms": [v.uuid for v in vms]}, sort_keys=True).encode()
                seq = self.ring.append(R.MARKER, payload, deadline=t0 + hold)
            entry = {"disks": disks, "released": False, "timed_out": False}
            timer = threading.Timer(max(0.0, hold - (time.monotonic() - t0)), self._release,
                                    args=(barrier_id, True))
            entry["timer"] = timer
            self._barriers[barrier_id] = entry
            timer.start()
            return {"barrier": barrier_id, "held_vms": [v.name for v in vms], "marker_seq": seq}

    def release(self, barrier_id: str) -> dict:
        """Release a barrier; ``in_time`` is False if it had timed out (the cut is not valid)."""
        entry = self._barriers.get(barrier_id)
        if entry is None:
            raise KeyError(f"no barrier {barrier_id}")
        entry["timer"].cancel()
        timed_out = self._release(barrier_id, False)
        return {"barrier": barrier_id, "in_time": not timed_out}

    def _release(self, barrier_id: str, by_timer: bool) -> bool:
        with self._barrier_lock:
            entry = self._barriers.get(barrier_id)
            if entry is None:
                return True
            if not entry["released"]:
                entry["released"] = True
                entry["timed_out"] = by_timer
                for d in entry["disks"]:
                    d.lock.release()
            if not by_timer:
                del self._barriers[barrier_id]
            elif len(self._barriers) > 1000:   # forget timed-out barriers nobody asked about
                self._barriers.pop(next(iter(self._barriers)))
            return entry["timed_out"]

    def attach(self, vra: str) -> dict:
        with self._lock:
            if self.attached:
                raise RuntimeError(f"VRA {self.attached} is already attached to this host")
            disks = self._all_disk_locks()
            try:
                self._mark_pending({vm.uuid_bytes: vm for vm in self.vms.values()})
                self.ring.reset()
                self.attached = vra
                vms = [{"vm": vm.name, "uuid": vm.uuid, "generation": vm.generation,
                        "next_vm_seq": vm.vm_seq + 1, "dirty": self._dirty_of(vm)}
                       for vm in self.vms.values()]
                self.ring.append(R.ATTACH, json.dumps({"vra": vra, "vms": vms}).encode(),
                                 deadline=time.monotonic() + 1)
                return {"ring": self.ring_path, "capacity": self.ring.capacity,
                        "ring_id": self.ring.ring_id, "tail": self.ring.tail(), "vms": vms}
            finally:
                for d in disks:
                    d.lock.release()

    def detach(self, vra: str | None = None):
        """The VRA went away: everything it had not acknowledged goes into dirty bitmaps."""
        with self._lock:
            if not self.attached or (vra and vra != self.attached):
                return
            self.attached = None
            disks = self._all_disk_locks()
            try:
                self._mark_pending({vm.uuid_bytes: vm for vm in self.vms.values()})
                self.ring.reset()
                self.ring.doorbell = None
            finally:
                for d in disks:
                    d.lock.release()

    def _mark_pending(self, vms: dict[bytes, VMRuntime]):
        """Put every unacknowledged data record of ``vms`` into their dirty bitmaps."""
        for _pos, rec in self.ring.pending():
            if rec is not None and rec.type in R.DATA_TYPES:
                vm = vms.get(bytes(rec.vm_uuid))
                if vm is not None and rec.disk < len(vm.disks):
                    vm.disks[rec.disk].mark_dirty(*R.data_extent(rec))

    def recover(self, vms: dict[bytes, VMRuntime]):
        """After a host restart: cover everything the ring held, committed or not, by bitmaps."""
        with self._lock:
            for pos, rec in self.ring.pending(recover=True):
                if rec is None:
                    continue
                if rec.type in R.DATA_TYPES:
                    vm = vms.get(bytes(rec.vm_uuid))
                    if vm is not None and rec.disk < len(vm.disks):
                        vm.disks[rec.disk].mark_dirty(*R.data_extent(rec))
            self.ring.reset()

    def close(self):
        self.ring.close()
