"""Replication wire frames between a protected VRA and a recovery VRA.

Specified in docs/FORMAT.md ("Replication wire protocol"). A frame is a 24-byte
header and a payload; the header's checksum covers the header's first 16 bytes
and the payload as sent (compressed or not), so corruption on the wire is
caught before anything is decompressed or parsed.
"""
from __future__ import annotations

import json
import socket
import ssl
import struct
from dataclasses import dataclass

import lz4.block
import xxhash

MAGIC = b"TDMW"
VERSION = 1
FRAME = struct.Struct("<4sBBHIIQ")   # magic, version, type, flags, length, raw length, checksum
assert FRAME.size == 24
MAX_FRAME = 64 << 20

HELLO, WELCOME, BATCH, ACK, ERROR = 1, 2, 3, 4, 5
F_LZ4 = 1

# Records inside a BATCH payload.
REC = struct.Struct("<BBHIQQ16s")    # kind, reserved, disk, length, offset, source seq, vm uuid
assert REC.size == 40
R_WRITE, R_MARKER, R_COMMIT, R_ATTACH_VM, R_DETACH_VM, R_GAP = 1, 2, 3, 4, 5, 6
R_ZERO = 7                            # zeros at (disk, offset); data is their u64 length
ZERO_LEN = struct.Struct("<Q")
BATCH_HDR = struct.Struct("<QI")      # first source seq, record count


class WireError(Exception):
    """A replication frame is malformed or failed its checksum: {0}"""


@dataclass
class Rec:
    kind: int
    seq: int            # source sequence number (per protected VRA and VPG), contiguous from 1
    vm: bytes = b"\0" * 16
    disk: int = 0
    offset: int = 0
    data: bytes | memoryview = b""


def _checksum(header16: bytes, payload) -> int:
    h = xxhash.xxh3_64(header16)
    h.update(payload)
    return h.intdigest()


class Compression:
    """Adaptive lz4 for one stream: compress while it pays, probe now and then when it does not.

    lz4 on incompressible data (encrypted or already compressed guest data, the usual case for
    media and databases with their own compression) costs ~1.5-2.5 ms of CPU per MiB for
    nothing. After a frame that did not shrink by ``MIN_SAVING``, the next ``SKIP`` frames go
    uncompressed; each further miss doubles the pause (up to ``MAX_SKIP``), a hit ends it.
    The receiver needs nothing: each frame says whether it is compressed (F_LZ4).
    """

    MIN_SAVING = 0.05
    SKIP = 4
    MAX_SKIP = 64

    def __init__(self):
        self._skip = 0          # frames left to send raw
        self._pause = 0         # the pause after the next miss
        self.tried = self.skipped = 0          # frames lz4 ran on, frames sent raw without trying

    def pack(self, payload):
        """(payload to send, compressed?)"""
        if self._skip:
            self._skip -= 1
            self.skipped += 1
            return payload, False
        self.tried += 1
        packed = lz4.block.compress(payload, store_size=False)
        if len(packed) <= len(payload) * (1 - self.MIN_SAVING):
            self._pause = 0
            return packed, True
        self._pause = min(self.MAX_SKIP, self._pause * 2 or self.SKIP)
        self._skip = self._pause
        if len(packed) < len(payload):
            return packed, True
        return payload, False


def encode(ftype: int, payload: bytes | bytearray | memoryview, compress: bool | Compression = False) -> list:
    """The buffers of one frame (header, payload), ready for sendmsg. ``compress``: lz4 when it
    shrinks the payload; a ``Compression`` decides per frame (adaptive, per stream)."""
    raw_len = len(payload)
    flags = 0
    if compress and raw_len > 256:
        if isinstance(compress, Compression):
            packed, done = compress.pack(payload)
        else:
            packed = lz4.block.compress(payload, store_size=False)
            done = len(packed) < raw_len
        if done:
            payload, flags = packed, F_LZ4
    if len(payload) > MAX_FRAME:
        raise WireError(f"frame of {len(payload)} bytes exceeds the {MAX_FRAME}-byte limit")
    head = struct.pack("<4sBBHII", MAGIC, VERSION, ftype, flags, len(payload), raw_len)
    return [head + struct.pack("<Q", _checksum(head, payload)), payload]


def encode_json(ftype: int, obj: dict) -> list:
    return encode(ftype, json.dumps(obj, sort_keys=True).encode())


def send(sock: socket.socket, buffers: list):
    if isinstance(sock, ssl.SSLSocket):        # TLS has no sendmsg; records are framed anyway
        for b in buffers:
            sock.sendall(b)
        return
    total = sum(len(b) for b in buffers)
    sent = sock.sendmsg(buffers)
    if sent < total:   # rare: finish the rest the slow way
        data = b"".join(bytes(b) for b in buffers)
        sock.sendall(data[sent:])


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("peer closed the connection")
        got += k
    return buf


def recv(sock: socket.socket, copy: bool = True) -> tuple[int, bytes]:
    """Read one frame: (type, payload decompressed). Raises WireError on any corruption.
    With ``copy`` False the payload may be a bytearray of the frame's own (no copy into bytes)."""
    head = _recv_exact(sock, FRAME.size)
    magic, version, ftype, flags, length, raw_len, checksum = FRAME.unpack(head)
    if magic != MAGIC:
        raise WireError(f"bad magic {bytes(magic)!r}")
    if version != VERSION:
        raise WireError(f"unsupported frame version {version}")
    if length > MAX_FRAME or raw_len > MAX_FRAME:
        raise WireError(f"frame of {length} bytes exceeds the limit")
    payload = _recv_exact(sock, length)
    if _checksum(bytes(head[:16]), payload) != checksum:
        raise WireError(f"checksum mismatch on a type-{ftype} frame of {length} bytes")
    if flags & F_LZ4:
        try:
            payload = lz4.block.decompress(payload, uncompressed_size=raw_len)
        except lz4.block.LZ4BlockError as exc:
            raise WireError(f"lz4 payload does not decompress: {exc}") from exc
    if len(payload) != raw_len:
        raise WireError(f"payload is {len(payload)} bytes, header says {raw_len}")
    return ftype, bytes(payload) if copy and not isinstance(payload, bytes) else payload


def recv_json(sock: socket.socket, expect: int) -> dict:
    ftype, payload = recv(sock)
    if ftype == ERROR:
        raise ConnectionError(json.loads(payload).get("error", "peer refused"))
    if ftype != expect:
        raise WireError(f"expected a type-{expect} frame, got type {ftype}")
    try:
        return json.loads(payload)
    except ValueError as exc:
        raise WireError(f"control frame is not JSON: {exc}") from exc


def pack_batch(recs: list[Rec]) -> bytes:
    parts = [BATCH_HDR.pack(recs[0].seq if recs else 0, len(recs))]
    for r in recs:
        parts.append(REC.pack(r.kind, 0, r.disk, len(r.data), r.offset, r.seq, r.vm))
        parts.append(r.data)
    return b"".join(parts)


def unpack_batch(payload: bytes) -> list[Rec]:
    if len(payload) < BATCH_HDR.size:
        raise WireError("batch shorter than its header")
    first, count = BATCH_HDR.unpack_from(payload, 0)
    view = memoryview(payload)
    pos = BATCH_HDR.size
    out = []
    for i in range(count):
        if pos + REC.size > len(payload):
            raise WireError(f"batch truncated at record {i}")
        kind, _r, disk, length, offset, seq, vm = REC.unpack_from(payload, pos)
        pos += REC.size
        if pos + length > len(payload):
            raise WireError(f"record {i} runs past the end of the batch")
        if seq != first + i:
            raise WireError(f"record {i} has seq {seq}, expected {first + i}")
        out.append(Rec(kind, seq, vm, disk, offset, view[pos:pos + length]))
        pos += length
    if pos != len(payload):
        raise WireError("trailing bytes after the last record")
    return out
