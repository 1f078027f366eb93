"""The recovery image IO protocol: hosts read and write image disks over TCP (docs/FORMAT.md,
"Recovery image IO protocol").

Frames are the replication wire frames (``wire.py``: 24-byte header, XXH3-64 over header and
payload) with types of their own. One connection per image disk: IHELLO names the image, the
disk and the VRA's token; then IREAD / IWRITE requests, one at a time, each answered in order
by IDATA / IDONE or IERROR. The address is published by the control API
(``GET /v1/recovery/images/{id}`` -> ``io``); it changes when the VRA restarts, so a client
that lost its connection asks the control API again.
"""
from __future__ import annotations

import hmac
import json
import logging
import socket
import struct
import threading

from appliance.dss import DSSError

from . import wire
from .images import ImageError, ImageRegistry

log = logging.getLogger("tidemark.vra.image_io")

IHELLO, IWELCOME, IREAD, IDATA, IWRITE, IDONE, IERROR = 16, 17, 18, 19, 20, 21, 22
READ = struct.Struct("<QI")       # offset, length
WRITE = struct.Struct("<Q")       # offset; the data follows
HELLO_TIMEOUT = 10.0


def error_frame(status: int, detail: str) -> list:
    return wire.encode_json(IERROR, {"status": status, "error": detail})


class ImageIOServer:
    """Serves the image registry's disks on ``(host, port)``; a thread per connection."""

    def __init__(self, registry: ImageRegistry, token: str, host: str = "127.0.0.1", port: int = 0):
        self.registry = registry
        self._token = token.encode()
        self._sock = socket.create_server((host, port))
        self.address = self._sock.getsockname()[:2]
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def start(self) -> None:
        threading.Thread(target=self._accept, name="image-io", daemon=True).start()

    def stop(self) -> None:
        self._stopping = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="image-io-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(HELLO_TIMEOUT)
            hello = wire.recv_json(conn, IHELLO)
            if not hmac.compare_digest(str(hello.get("token", "")).encode(), self._token):
                wire.send(conn, error_frame(401, "wrong token: use the VRA's token"))
                return
            try:
                sid, vm, disk = str(hello["image"]), str(hello["vm"]), int(hello["disk"])
                info = self.registry.disk_info(sid, vm, disk)
            except (KeyError, ValueError, TypeError) as exc:
                wire.send(conn, error_frame(400, f"IHELLO takes token, image, vm and disk: {exc}"))
                return
            except ImageError as exc:
                wire.send(conn, error_frame(exc.status, str(exc)))
                return
            wire.send(conn, wire.encode_json(IWELCOME, info))
            conn.settimeout(None)
            while True:
                ftype, payload = wire.recv(conn)
                wire.send(conn, self._handle(sid, vm, disk, ftype, payload))
        except (OSError, ConnectionError, wire.WireError) as exc:
            if not self._stopping:
                log.debug("image IO connection ended: %s", exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _handle(self, sid: str, vm: str, disk: int, ftype: int, payload: bytes) -> list:
        try:
            if ftype == IREAD and len(payload) == READ.size:
                offset, length = READ.unpack(payload)
                return wire.encode(IDATA, self.registry.read(sid, vm, disk, offset, length))
            if ftype == IWRITE and len(payload) >= WRITE.size:
                (offset,) = WRITE.unpack_from(payload)
                self.registry.write(sid, vm, disk, offset, memoryview(payload)[WRITE.size:])
                return wire.encode(IDONE, b"")
            return error_frame(400, f"unexpected frame type {ftype} of {len(payload)} bytes")
        except ImageError as exc:
            return error_frame(exc.status, str(exc))
        except DSSError as exc:
            return error_frame(exc.http_status if exc.http_status < 500 else 409, str(exc))


def decode_error(payload: bytes) -> tuple[int, str]:
    try:
        e = json.loads(payload)
        return int(e.get("status", 500)), str(e.get("error", "image IO refused"))
    except (ValueError, TypeError):
        return 500, "image IO refused (unreadable error frame)"
