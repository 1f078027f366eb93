"""The consumer side of a host's mirror: what a VRA uses to take the host's write stream.

    client = MirrorClient(doorbell_path, vra="vra-h0")   # attach
    for rec in client.records(idle_timeout=1.0):
        ...                                                # apply rec, then
        client.ack()                                       # free its ring space
    client.close()                                         # detach: the host falls back to bitmaps

``Replayer`` applies the stream of chosen VMs to replica disk files: the
reference consumer the simulator's tests use to prove the stream is complete.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid as uuidlib

from . import ring as R


class MirrorClient:
    def __init__(self, doorbell_path: str, vra: str = "vra", timeout: float = 10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(doorbell_path)
        self.sock.sendall(json.dumps({"vra": vra}).encode() + b"\n")
        line = b""
        while not line.endswith(b"\n"):
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("host closed the doorbell during attach")
            line += chunk
        self.info = json.loads(line)
        if "error" in self.info:
            self.sock.close()
            raise ConnectionError(self.info["error"])
        self.ring = R.RingConsumer(self.info["ring"])
        self.ring.cursor = self.info["tail"]
        self.ring.doorbell = self.sock

    def records(self, idle_timeout: float = 1.0, max_records: int | None = None):
        """Yield records until none arrives for ``idle_timeout`` seconds."""
        n = 0
        idle_since = time.monotonic()
        while max_records is None or n < max_records:
            rec = self.ring.poll()
            if rec is not None:
                n += 1
                idle_since = time.monotonic()
                yield rec
                continue
            if time.monotonic() - idle_since > idle_timeout:
                return
            self.ring.wait(min(0.05, idle_timeout))

    def ack(self):
        self.ring.ack()

    def close(self):
        try:
            self.sock.close()
        finally:
            self.ring.close()


_APPLIED = frozenset((*R.DATA_TYPES, R.ATTACH_VM, R.DETACH_VM))


class StreamError(Exception):
    """The mirrored stream broke one of its rules: {0}"""


class Replayer:
    """Applies WRITE, SYNC and ZERO records of the given VMs to replica files, checking the order rules.

    ``targets`` maps a VM's instance UUID to a list of replica paths (one per disk).
    Per VM, vm_seq must grow by one from record to record within a generation;
    a jump means writes went to the dirty bitmap, and is recorded in ``gaps``
    until a SYNC covers it (the caller runs the sync).
    """

    def __init__(self, targets: dict[str, list[str]]):
        self.fds = {uuidlib.UUID(u).bytes: [os.open(p, os.O_RDWR | os.O_CREAT, 0o600) for p in paths]
                    for u, paths in targets.items()}
        self.last: dict[bytes, tuple[int, int]] = {}
        self.gaps: list[tuple[str, int, int]] = []
        self.applied = 0
        self.last_seq: dict[int, int] = {}

    def apply(self, rec: R.Record, ring_id: int = 0):
        """Apply one record read from the ring ``ring_id`` (host seq is checked per ring)."""
        last = self.last_seq.get(ring_id)
        if last is not None and rec.seq <= last:
            raise StreamError(f"host seq went from {last} to {rec.seq}")
        self.last_seq[ring_id] = rec.seq
        key = bytes(rec.vm_uuid)
        if key not in self.fds or rec.type not in _APPLIED:
            return
        prev = self.last.get(key)
        if rec.type == R.ATTACH_VM:
            info = json.loads(bytes(rec.payload))
            if prev and prev[0] == rec.generation and info["next_vm_seq"] != prev[1] + 1:
                self.gaps.append((str(uuidlib.UUID(bytes=key)), prev[1], info["next_vm_seq"]))
            self.last[key] = (rec.generation, info["next_vm_seq"] - 1)
            return
        if rec.type == R.DETACH_VM:
            info = json.loads(bytes(rec.payload))
            if prev and prev[0] == rec.generation and info["last_vm_seq"] != prev[1]:
                self.gaps.append((str(uuidlib.UUID(bytes=key)), prev[1], info["last_vm_seq"]))
            return
        if prev is not None and prev[0] == rec.generation:
            if rec.vm_seq <= prev[1]:
                raise StreamError(f"vm_seq went from {prev[1]} to {rec.vm_seq} (duplicate or reorder)")
            if rec.vm_seq != prev[1] + 1:
                self.gaps.append((str(uuidlib.UUID(bytes=key)), prev[1], rec.vm_seq))
        self.last[key] = (rec.generation, rec.vm_seq)
        if rec.type in (R.WRITE, R.SYNC):
            os.pwrite(self.fds[key][rec.disk], rec.payload, rec.offset)
            self.applied += 1
        elif rec.type == R.ZERO:
            offset, length = R.data_extent(rec)
            os.pwrite(self.fds[key][rec.disk], bytes(length), offset)
            self.applied += 1

    def close(self):
        for fds in self.fds.values():
            for fd in fds:
                os.close(fd)
