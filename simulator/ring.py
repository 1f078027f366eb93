"""The mirror ring: a host's IO path hands every guest write to its VRA through this.

A ring is a file mapped into the host process (producer) and the VRA process
(consumer), the way a hypervisor's IO filter shares the guest's buffers with a
replication appliance on the same host. The byte layout, the commit rule and
the ordering rules are specified in ``docs/FORMAT.md`` ("Mirror ring"); this
module is the one implementation of both sides.

Positions are byte counts that only grow; ``pos % capacity`` is the place in
the data area. Every record starts at a 512-byte boundary, its payload 512 bytes
after its 64-byte header (so that the IO path can write it to the disk with
O_DIRECT straight from the ring), and it never wraps: when
the space left before the end of the data area is too small, a PAD record fills
it. The producer reserves space under its lock (which also hands out the
per-host sequence number) and writes the header there, magic and checksum still
0; the payload is then filled in place, the checksum written and finally the
magic word, which is the commit marker. While the consumer keeps up, the
producer goes back to the start of the data area early (PAD), so that the ring
in use stays within a cache-sized hot window. The consumer reads records in position
order, stops at the first uncommitted one, verifies the checksum, and frees
space by advancing ``tail`` once it has dealt with a record.
"""
from __future__ import annotations

import mmap
import os
import socket
import struct
import threading
import time
from typing import NamedTuple

import xxhash

RING_MAGIC = b"TDMRING1"
RING_VERSION = 2
HEADER_SIZE = 4096

# Ring header fields, each on its own cache line.
_OFF_HEAD = 64
_OFF_TAIL = 128
_OFF_CONSUMER_WAITING = 192
_RING_HDR = struct.Struct("<8sIIQQ")  # magic, version, header size, capacity, ring id
assert _RING_HDR.size == 32
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")

RECORD_MAGIC = 0x52444D54  # b"TMDR" little-endian: the commit marker
REC = struct.Struct("<IHHIIQQQ16sQ")
# magic, type, disk, length, generation, seq, vm_seq, offset, vm uuid, checksum
assert REC.size == 64
# Records start at 512-byte boundaries and a record's payload starts 512 bytes after its header
# (bytes 64..511 of a record are unused), so that the IO path can write a payload from the ring
# to the disk with O_DIRECT, which wants the memory and the file offset 512-aligned.
REC_ALIGN = 512
PAYLOAD_OFFSET = 512
assert REC_ALIGN == PAYLOAD_OFFSET == 512   # RingProducer.reserve and _Mapped.read inline 511/-512
# How a consumer waits for the next record (a policy, not part of the format): it looks again
# after naps of CONSUMER_NAP for up to CONSUMER_NAP_WINDOW, and only then sets consumer_waiting
# and sleeps on the doorbell. Under a steady stream the host so rings no doorbell (a syscall and
# a cross-CPU wake-up per record), and between records the consumer's CPU is free: a nap lets it
# halt, where the 0.5 ms of polling (sched_yield) this replaced kept it busy, and on a virtual
# machine a busy second vCPU slows the guest's disk writes on the first (bench/RESULTS.md, ninth
# session: mirrored writes 4-19% faster per slice than with polling, paired in the same slices).
CONSUMER_NAP = 0.0002
CONSUMER_NAP_WINDOW = 0.02
# A producer whose consumer keeps up may reuse only this much of the ring, so that it stays in
# the CPU caches (``reserve``). Off (0) by default: the PAD that takes the producer back to the
# start holds the rest of the lap until every record before it is released, and a VRA releases
# a record only once the recovery site acknowledged it; so at each early wrap the ring is, for
# that round trip, only a window's size: 8 MiB was 80 ms at 100 MB/s, and one 250 ms journal
# commit sent the lab's guests to their bitmaps (bench/RESULTS.md). Kept for A/B runs
# (``bench/simulator.py --hot-window-mib``), where it made no measurable difference either.
HOT_WINDOW = 0

# Record types.
WRITE = 1      # a guest write: payload is the data written at (disk, offset)
PAD = 2        # filler up to the end of the data area, or a record abandoned by a crash
ATTACH_VM = 3  # a VM's stream starts (or resumes) on this host: payload is JSON
DETACH_VM = 4  # a VM's stream ends on this host (vMotion away, power off): payload is JSON
SYNC = 5       # a block read from the disk during a bitmap sync: payload is the data
ATTACH = 6     # a VRA attached to this ring: payload is JSON (dirty disks to sync)
MARKER = 7     # a checkpoint barrier: every write acknowledged before it precedes it
ZERO = 8       # zero blocks read during a delta sync: payload is the u64 length of zeros at offset
TYPE_NAMES = {WRITE: "write", PAD: "pad", ATTACH_VM: "attach_vm", DETACH_VM: "detach_vm",
              SYNC: "sync", ATTACH: "attach", MARKER: "marker", ZERO: "zero"}
DATA_TYPES = (WRITE, SYNC, ZERO)   # records that change a disk
_ZERO_LEN = struct.Struct("<Q")


def data_extent(rec) -> tuple[int, int]:
    """(offset, length) of the disk bytes a WRITE, SYNC or ZERO record changes."""
    if rec.type == ZERO:
        return rec.offset, _ZERO_LEN.unpack_from(rec.payload, 0)[0]
    return rec.offset, len(rec.payload)


class RingError(Exception):
    """Mirror ring error."""


class RingCorrupt(RingError):
    """A committed ring record failed its checksum; it is never served as data."""


def align(n: int) -> int:
    return (n + REC_ALIGN - 1) & ~(REC_ALIGN - 1)


def record_size(length: int) -> int:
    """Ring bytes a record with ``length`` payload bytes takes (header, gap, aligned payload)."""
    return PAYLOAD_OFFSET + align(length)


def record_checksum(header: memoryview | bytes, payload) -> int:
    """XXH3-64 of header bytes 4..56 (everything but magic and checksum) and the payload."""
    h = xxhash.xxh3_64(header[4:56])
    h.update(payload)
    return h.intdigest()


class Record(NamedTuple):
    """A committed record (immutable; a tuple, so that a consumer makes one per record cheaply)."""

    pos: int            # ring position of the record's header
    end: int            # position just past the record (where the next one starts)
    type: int
    disk: int
    generation: int
    seq: int
    vm_seq: int
    offset: int
    vm_uuid: bytes
    payload: memoryview  # a view into the ring: copy it before acknowledging

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type, str(self.type))


_new_record = tuple.__new__   # Record(...) without the keyword-handling __new__ (hot path)
_xxh3_64 = xxhash.xxh3_64


class _Mapped:
    def __init__(self, path: str, create: bool, capacity: int = 0):
        self.path = path
        if create and (capacity <= 0 or capacity % REC_ALIGN):
            raise RingError(f"ring capacity {capacity} is not a positive multiple of {REC_ALIGN}")
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        self.fd = os.open(path, flags, 0o600)
        if create:
            os.ftruncate(self.fd, HEADER_SIZE + capacity)
        size = os.fstat(self.fd).st_size
        self.mm = mmap.mmap(self.fd, size)
        self.view = memoryview(self.mm)
        if create:
            _RING_HDR.pack_into(self.mm, 0, RING_MAGIC, RING_VERSION, HEADER_SIZE, capacity,
                                int.from_bytes(os.urandom(8), "little"))
        magic, version, hsize, cap, ring_id = _RING_HDR.unpack_from(self.mm, 0)
        if magic != RING_MAGIC or version != RING_VERSION or hsize != HEADER_SIZE:
            raise RingError(f"{path}: not a version-{RING_VERSION} mirror ring")
        if HEADER_SIZE + cap != size or cap % REC_ALIGN:
            raise RingError(f"{path}: size {size} does not match capacity {cap}")
        self.capacity = cap
        self.ring_id = ring_id

    def head(self) -> int:
        return _U64.unpack_from(self.mm, _OFF_HEAD)[0]

    def tail(self) -> int:
        return _U64.unpack_from(self.mm, _OFF_TAIL)[0]

    def close(self):
        os.close(self.fd)
        try:
            self.view.release()
            self.mm.close()
        except BufferError:
            pass  # records still hold views into the ring; the mapping goes with the last of them

    def read(self, pos: int, verify: bool = True) -> Record | None:
        """The committed record at ``pos``, or None while it is still being filled."""
        off = HEADER_SIZE + pos % self.capacity
        view = self.view
        (magic, rtype, disk, length, gen, seq, vm_seq, offset, vm_uuid,
         checksum) = REC.unpack_from(view, off)
        if magic != RECORD_MAGIC:
            return None
        payload = view[off + PAYLOAD_OFFSET:off + PAYLOAD_OFFSET + length]
        if verify and rtype != PAD:
            h = _xxh3_64(view[off + 4:off + 56])   # record_checksum, inlined
            h.update(payload)
            if h.intdigest() != checksum:
                raise RingCorrupt(f"{self.path}: record at position {pos} (seq {seq}) failed its "
                                  f"checksum; it was not applied. Detach and resync this host.")
        return _new_record(Record, (pos, pos + PAYLOAD_OFFSET + ((length + 511) & -512), rtype, disk,
                                    gen, seq,
                                    vm_seq, offset, vm_uuid, payload))


class RingProducer(_Mapped):
    """The host side. Thread safe: guest writes of all VMs on a host share one ring."""

    def __init__(self, path: str, capacity: int = 64 << 20, create: bool = True,
                 hot_window: int = HOT_WINDOW):
        super().__init__(path, create, capacity)
        self._lock = threading.Lock()
        self.doorbell: socket.socket | None = None
        self.next_seq = 1
        self._head = self.head()
        # Producer policy, not part of the format: see ``reserve``. A window of at
        # least half the ring would gain nothing, so such rings fill linearly.
        self.hot_window = hot_window if 0 < hot_window <= self.capacity >> 1 else self.capacity
        self._hot_lag = self.hot_window >> 1

    def set_head(self, pos: int):
        self._head = pos
        _U64.pack_into(self.mm, _OFF_HEAD, pos)

    def reset(self):
        """Drop everything unconsumed (the caller has put it into dirty bitmaps)."""
        with self._lock:
            _U64.pack_into(self.mm, _OFF_TAIL, self._head)

    def free_space(self) -> int:
        return self.capacity - (self._head - self.tail())

    def reserve(self, length: int, rtype: int = 0, disk: int = 0, generation: int = 0,
                vm_seq: int = 0, offset: int = 0, vm_uuid: bytes = b"\0" * 16
                ) -> tuple[int, int, memoryview] | None:
        """Reserve a record of ``length`` payload bytes: (position, seq, payload view) or None if full.

        The header is written at once with these fields, its checksum and magic
        still 0: the record is not committed until ``commit`` writes the magic,
        and recovery can step over (and mark dirty) a reservation whose producer
        died. ``seal`` then writes the checksum once the payload is filled.

        Placement: a record starts at the head unless fewer bytes than it needs
        are left before the end of the data area, or the head is past the hot
        window while the consumer is close behind (at most half a window): then
        a PAD fills the rest of the lap and the record goes to the start. A
        consumer that keeps up therefore works in the first ``hot_window`` bytes
        of the ring, which stay in the CPU caches; one that falls behind gets
        the whole capacity.
        """
        need = PAYLOAD_OFFSET + ((length + 511) & -512)   # record_size(length), inlined
        cap = self.capacity
        if need > cap >> 1:
            raise RingError(f"record of {length} bytes is too large for a {cap}-byte ring")
        view = self.view
        with self._lock:
            pos = self._head
            off = pos % cap
            room = cap - off
            tail = _U64.unpack_from(view, _OFF_TAIL)[0]
            if room < need:
                pad = room
            elif (off + need > self.hot_window and pos - tail <= self._hot_lag
                  and pos + room + need - tail <= cap):
                pad = room                               # back to the hot start of the ring
            else:
                pad = 0
            if pos + pad + need - tail > cap:
                return None
            if pad:
                self._write_pad(pos, pad)
                pos += pad
                off = 0
            base = HEADER_SIZE + off
            seq = self.next_seq
            self.next_seq = seq + 1
            REC.pack_into(view, base, 0, rtype, disk, length, generation, seq, vm_seq, offset,
                          vm_uuid, 0)
            self._head = head = pos + need               # set_head, inlined
            _U64.pack_into(view, _OFF_HEAD, head)
        base += PAYLOAD_OFFSET
        return pos, seq, view[base:base + length]

    def try_reserve(self, length: int) -> tuple[int, int, memoryview] | None:
        """Reserve a record whose header ``commit_header`` writes later (see ``reserve``)."""
        return self.reserve(length)

    def seal(self, pos: int, payload: memoryview):
        """Write the checksum of a record ``reserve`` wrote the header of, once its payload is filled."""
        base = HEADER_SIZE + pos % self.capacity
        view = self.view
        h = _xxh3_64(view[base + 4:base + 56])           # record_checksum, inlined
        h.update(payload)
        _U64.pack_into(view, base + 56, h.intdigest())

    def _write_pad(self, pos: int, size: int):
        base = HEADER_SIZE + pos % self.capacity
        REC.pack_into(self.mm, base, 0, PAD, 0, size - PAYLOAD_OFFSET, 0, 0, 0, 0, b"\0" * 16, 0)
        _U32.pack_into(self.mm, base, RECORD_MAGIC)

    def abandon(self, pos: int):
        """Turn a reserved record into a PAD of the same size (committed), so the consumer steps
        over it: one whose disk write failed, or one left uncommitted by a crash."""
        base = HEADER_SIZE + pos % self.capacity
        length = _U32.unpack_from(self.mm, base + 8)[0]
        REC.pack_into(self.mm, base, 0, PAD, 0, length, 0, 0, 0, 0, b"\0" * 16, 0)
        _U32.pack_into(self.mm, base, RECORD_MAGIC)

    def commit_header(self, pos: int, rtype: int, seq: int, disk: int, generation: int,
                      vm_seq: int, offset: int, vm_uuid: bytes, payload: memoryview):
        """Write the header and checksum of a reserved record, still without its magic."""
        base = HEADER_SIZE + pos % self.capacity
        view = self.view
        REC.pack_into(view, base, 0, rtype, disk, len(payload), generation, seq, vm_seq, offset,
                      vm_uuid, 0)
        h = _xxh3_64(view[base + 4:base + 56])           # record_checksum, inlined
        h.update(payload)
        _U64.pack_into(view, base + 56, h.intdigest())

    def commit(self, pos: int):
        """Write the magic of a record: from then on the consumer sees it."""
        view = self.view
        _U32.pack_into(view, HEADER_SIZE + pos % self.capacity, RECORD_MAGIC)
        if _U32.unpack_from(view, _OFF_CONSUMER_WAITING)[0]:
            self.ring_doorbell()

    def ring_doorbell(self):
        _U32.pack_into(self.mm, _OFF_CONSUMER_WAITING, 0)
        bell = self.doorbell
        if bell is not None:
            try:
                bell.send(b"\x01", socket.MSG_DONTWAIT)
            except (BlockingIOError, OSError):
                pass  # a full doorbell has already woken the consumer; a dead one is noticed elsewhere

    def append(self, rtype: int, payload: bytes, *, disk: int = 0, generation: int = 0,
               vm_seq: int = 0, offset: int = 0, vm_uuid: bytes = b"\0" * 16,
               deadline: float | None = None) -> int | None:
        """Append a whole record, waiting for space until ``deadline`` (None: forever). Its seq or None."""
        while True:
            got = self.try_reserve(len(payload))
            if got is not None:
                break
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(0.0005)
        pos, seq, view = got
        view[:] = payload
        self.commit_header(pos, rtype, seq, disk, generation, vm_seq, offset, vm_uuid, view)
        self.commit(pos)
        return seq

    def pending(self, recover: bool = False):
        """Records not yet acknowledged by the consumer (tail..head), in order, as (pos, record).

        A reservation without its magic was still being written when its producer
        stopped. With ``recover`` (after a crash) it is turned into a PAD, and if
        its header and payload were complete (checksum matches: the disk write
        may have happened) it is yielded too, so the caller can mark it dirty;
        otherwise it is yielded as None.
        """
        pos = self.tail()
        while pos < self._head:
            base = HEADER_SIZE + pos % self.capacity
            if _U32.unpack_from(self.mm, base)[0] == RECORD_MAGIC:
                rec = self.read(pos, verify=False)
                yield pos, rec
                pos = rec.end
                continue
            length = _U32.unpack_from(self.mm, base + 8)[0]
            rec = None
            if recover:
                _U32.pack_into(self.mm, base, RECORD_MAGIC)
                try:
                    rec = self.read(pos, verify=True)
                except RingCorrupt:
                    rec = None
                self.abandon(pos)
            yield pos, rec
            pos += record_size(length)


class RingConsumer(_Mapped):
    """The VRA side: reads records in order and acknowledges them to free space."""

    def __init__(self, path: str):
        super().__init__(path, create=False)
        self.cursor = self.tail()
        self.doorbell: socket.socket | None = None

    def poll(self) -> Record | None:
        """The next committed record after the cursor, or None. Advances the cursor (not the tail)."""
        view = self.view
        while True:
            cursor = self.cursor
            if cursor >= _U64.unpack_from(view, _OFF_HEAD)[0]:
                return None
            rec = self.read(cursor)
            if rec is None:
                return None
            self.cursor = rec[1]                         # rec.end
            if rec[2] != PAD:                            # rec.type
                return rec

    def ack(self, pos: int | None = None):
        """Free everything before ``pos`` (default: the cursor)."""
        _U64.pack_into(self.view, _OFF_TAIL, self.cursor if pos is None else pos)

    def _committed(self) -> bool:
        """True if the record at the cursor is committed (its magic is written)."""
        cursor = self.cursor
        view = self.view
        return (cursor < _U64.unpack_from(view, _OFF_HEAD)[0] and
                _U32.unpack_from(view, HEADER_SIZE + cursor % self.capacity)[0] == RECORD_MAGIC)

    def wait(self, timeout: float, nap_window: float = CONSUMER_NAP_WINDOW) -> bool:
        """Sleep until a record is committed, the producer rings the doorbell or ``timeout``
        passes; True if data may be there.

        It first looks again after each nap of ``CONSUMER_NAP`` for up to ``nap_window``
        seconds (0: sleep on the doorbell at once): a producer that commits within that time
        never has to ring the doorbell, which costs it a syscall and a cross-CPU wake-up.
        """
        if self._committed():
            return True
        start = time.monotonic()
        end = start + min(nap_window, timeout)
        while time.monotonic() < end:
            time.sleep(CONSUMER_NAP)
            if self._committed():
                return True
        timeout -= time.monotonic() - start
        if timeout <= 0:
            return False
        _U32.pack_into(self.mm, _OFF_CONSUMER_WAITING, 1)
        if self._committed():
            return True
        if self.doorbell is None:
            time.sleep(min(timeout, 0.002))
            return False
        self.doorbell.settimeout(timeout)
        try:
            data = self.doorbell.recv(4096)
        except TimeoutError:
            return False
        if not data:
            raise ConnectionError("host closed the mirror doorbell")
        return True
