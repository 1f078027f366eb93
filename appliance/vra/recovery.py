"""The recovery side of a VRA: receive VPG streams, merge them in order, journal them durably.

Each protected VRA of the site sends, per VPG, one stream ("source") of
records numbered 1, 2, 3 ... (``seq``). The recovery VRA merges the sources of
a VPG into one totally ordered stream (positions ``Pos(generation, lsn)``),
appends it to the DSS journal and acknowledges each source's records only once
they are durable. The ordering rules (docs/FORMAT.md, "Replication"):

- Records of one source keep their order.
- A MARKER k is a checkpoint barrier: a source that reaches it waits until
  every participant of barrier k has reached it too (or the barrier times out
  and is abandoned), so every record before any marker k precedes the cut and
  every record after follows it.
- COMMIT k, sent by the VPG's leader after all barriers were released in time,
  turns the cut into a checkpoint.
- Writes of a VM that moved between hosts need no extra rule: the protected
  side acknowledges its host's ring only after this side made the records
  durable, and a vMotion waits for that before the VM runs on its new host.

A source that reconnects says who it is; the answer is the highest seq made
durable for it, and it resends from there: no gap, no duplicate.
"""
from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import time
import uuid as uuidlib

from appliance.dss import Checkpoint, Entry, Pos

from . import wire

log = logging.getLogger("tidemark.vra.recovery")
BARRIER_TIMEOUT = 10.0


class VPGTarget:
    """The merge state of one VPG on its recovery VRA."""

    def __init__(self, journal, vpg: str):
        self.journal = journal
        self.vpg = vpg
        self.cond = threading.Condition()
        self.append_lock = threading.Lock()
        durable = journal.durable_pos(vpg)
        self.pos = durable or Pos(1, 0)
        self.progress: dict[str, int] = journal.progress(vpg)
        self.arrived: dict[int, set[str]] = {}     # barrier -> sources that reached it
        self.cut: dict[int, Pos] = {}             # barrier -> position of the cut once complete
        self.abandoned: set[int] = set()
        self.errors: list[str] = []

    # -- called by a source's connection thread -------------------------------------------
    def durable_seq(self, source: str) -> int:
        return self.progress.get(source, 0)

    def handle(self, source: str, recs: list[wire.Rec]) -> int:
        """Journal a batch of a source; the highest seq now durable for it."""
        done = self.progress.get(source, 0)
        recs = [r for r in recs if r.seq > done]           # a resend after reconnect
        if recs and recs[0].seq != done + 1:
            raise wire.WireError(f"source {source} skipped from seq {done} to {recs[0].seq}")
        run: list[wire.Rec] = []
        for r in recs:
            if r.kind == wire.R_MARKER:
                self._append(source, run)
                run = []
                self._barrier(source, r)
                self._append(source, [r])                  # records the progress past the marker
            elif r.kind == wire.R_COMMIT:
                self._append(source, run)
                run = []
                self._commit(source, r)
            else:
                run.append(r)
        self._append(source, run)
        return self.progress.get(source, done)

    def _append(self, source: str, recs: list[wire.Rec]):
        if not recs:
            return
        with self.append_lock:
            entries = []
            pos = self.pos
            for r in recs:
                if r.kind == wire.R_WRITE:
                    pos = Pos(pos.generation, pos.lsn + 1)
                    entries.append(Entry(pos, str(uuidlib.UUID(bytes=bytes(r.vm))), r.disk, r.offset,
                                         bytes(r.data)))
                elif r.kind == wire.R_ZERO:
                    # Journaled as an ordinary entry of zero bytes (simple; the journal has no
                    # zero-entry record): the WAN carried 8 bytes, the journal stores the zeros.
                    if len(r.data) != wire.ZERO_LEN.size:
                        raise wire.WireError(f"ZERO record {r.seq} carries {len(r.data)} bytes, not 8")
                    (length,) = wire.ZERO_LEN.unpack(bytes(r.data))
                    if not 0 < length <= wire.MAX_FRAME:
                        raise wire.WireError(f"ZERO record {r.seq} of {length} bytes")
                    pos = Pos(pos.generation, pos.lsn + 1)
                    entries.append(Entry(pos, str(uuidlib.UUID(bytes=bytes(r.vm))), r.disk, r.offset,
                                         bytes(length)))
            self.journal.append(self.vpg, entries, progress={source: recs[-1].seq})
            self.pos = pos
            self.progress[source] = recs[-1].seq

    def _barrier(self, source: str, r: wire.Rec):
        info = json.loads(bytes(r.data))
        k, participants = int(info["checkpoint"]), set(info["participants"])
        deadline = time.monotonic() + BARRIER_TIMEOUT
        with self.cond:
            if k in self.abandoned or k in self.cut:
                return
            self.arrived.setdefault(k, set()).add(source.split("/")[0])
            if participants <= self.arrived[k]:
                with self.append_lock:
                    self.cut[k] = self.pos
                self.arrived.pop(k, None)
                self.cond.notify_all()
                return
            while k not in self.cut and k not in self.abandoned:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("VPG %s: barrier %d abandoned (waited for %s)", self.vpg, k,
                                ", ".join(sorted(participants - self.arrived.get(k, set()))))
                    self.abandoned.add(k)
                    self.arrived.pop(k, None)
                    self.cond.notify_all()
                    return
                self.cond.wait(left)

    def abort(self, k: int):
        """The leader knows barrier k cannot complete (a participant failed): stop waiting for it."""
        with self.cond:
            if k not in self.cut:
                self.abandoned.add(k)
                self.arrived.pop(k, None)
                self.cond.notify_all()

    def _commit(self, source: str, r: wire.Rec):
        info = json.loads(bytes(r.data))
        k = int(info["checkpoint"])
        with self.cond:
            cut = self.cut.pop(k, None)
            for old in [x for x in self.cut if x < k]:
                self.cut.pop(old)
            self.abandoned = {x for x in self.abandoned if x >= k}   # barriers only grow
        with self.append_lock:
            if cut is not None and cut.lsn > 0 and info.get("valid", True):
                cp = Checkpoint(k, cut, float(info["time"]), info.get("tag"))
                self.journal.append(self.vpg, [], [cp], progress={source: r.seq})
            else:
                self.journal.append(self.vpg, [], progress={source: r.seq})
            self.progress[source] = r.seq


class Receiver:
    """The recovery VRA's listener: one thread per connected source."""

    def __init__(self, journal, token: str, host: str = "127.0.0.1", port: int = 0,
                 tls: ssl.SSLContext | None = None):
        self.journal = journal
        self.token = token
        self.tls = tls
        self.targets: dict[str, VPGTarget] = {}
        self._lock = threading.Lock()
        self.sock = socket.create_server((host, port), reuse_port=False)
        self.sock.settimeout(0.5)
        self.address = self.sock.getsockname()
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self.thread = threading.Thread(target=self._accept, name="receiver", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        self._stop.set()
        self.thread.join(5)
        self.sock.close()
        for c in list(self._conns):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def target(self, vpg: str) -> VPGTarget:
        with self._lock:
            if vpg not in self.targets:
                if vpg not in self.journal.vpgs():
                    raise KeyError(f"VPG {vpg} is not protected to this VRA")
                self.targets[vpg] = VPGTarget(self.journal, vpg)
            return self.targets[vpg]

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _addr = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        source = "?"
        try:
            conn.settimeout(30)
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            self._conns.add(conn)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello = wire.recv_json(conn, wire.HELLO)
            if hello.get("token") != self.token:
                wire.send(conn, wire.encode_json(wire.ERROR, {"error": "authentication failed"}))
                return
            source, vpg = str(hello["source"]), str(hello["vpg"])
            try:
                target = self.target(vpg)
            except KeyError as exc:
                wire.send(conn, wire.encode_json(wire.ERROR, {"error": str(exc)}))
                return
            wire.send(conn, wire.encode_json(wire.WELCOME, {"durable_seq": target.durable_seq(source)}))
            conn.settimeout(None)
            while not self._stop.is_set():
                ftype, payload = wire.recv(conn)
                if ftype != wire.BATCH:
                    raise wire.WireError(f"unexpected frame type {ftype} in a stream")
                durable = target.handle(source, wire.unpack_batch(payload))
                wire.send(conn, wire.encode_json(wire.ACK, {"durable_seq": durable}))
        except (ConnectionError, OSError) as exc:
            log.info("source %s disconnected: %s", source, exc)
        except wire.WireError as exc:
            log.error("source %s sent a bad frame, dropping the connection: %s", source, exc)
        finally:
            self._conns.discard(conn)
            conn.close()
