"""The protected side of a VRA: take the host's write stream, send each VPG's part to its recovery VRA.

    host ring ──► Reader ──► per-VPG Sender ──TCP/TLS──► recovery VRA
                    ▲                │
                    └── ring ack ◄───┘  (only once the recovery side made it durable)

The host's ring is the protected side's buffer: a record is acknowledged to
the host (its ring space freed) only when the recovery VRA has journaled it,
so a VRA that dies loses nothing: the host puts what was not acknowledged into
dirty bitmaps, and the restarted VRA syncs them. Records are sent from the
ring's memory without copying until they are packed into a batch.

A VPG that stops streaming from this VRA must not hold the ring: the host frees
ring space only up to the first record something still needs, so one stuck
record stalls every VPG of the host and makes a powered-off VM wait the host's
whole drain timeout. ``unprotect`` therefore releases what its sender will never
send, and a sender replaced by ``protect`` (new target) hands its records to the
new one (why that loses nothing: ``ProtectedSide.unprotect``).
"""
from __future__ import annotations

import collections
import json
import logging
import socket
import ssl
import threading
import time
import uuid as uuidlib

from simulator import ring as R
from simulator.mirror import MirrorClient

from . import wire
from .throttle import PRIORITY_WEIGHTS, Throttle

log = logging.getLogger("tidemark.vra.protected")
BATCH_BYTES = 1 << 20
INFLIGHT_BYTES = 32 << 20
# The ring reader sleeps on the doorbell as soon as the ring is empty (nap window 0). Polling
# first in a loop (sched_yield, as consumers did before they napped) took the GIL back again and
# again, which on a 2-core host cost the VRA about half of its CPU at 80-95 MB/s (72% and 47%
# of a core with 0.5 ms of polling, 23% and 25% without, the same MB/s) and slowed its sender
# thread. A doorbell wake-up costs the host a syscall and the record some tens of microseconds.
RING_NAP_WINDOW_S = 0.0


class Token:
    """A place in the host's ring; done once nothing needs the record any more."""

    __slots__ = ("end", "done")

    def __init__(self, end: int, done: bool = False):
        self.end = end
        self.done = done


class Sender:
    """One VPG's stream from this VRA to the VPG's recovery VRA; reconnects and resumes."""

    def __init__(self, vpg: str, source: str, target: tuple[str, int], token: str,
                 compress: bool = True, tls: ssl.SSLContext | None = None, on_done=None,
                 throttle: Throttle | None = None, priority: str = "Medium"):
        self.vpg, self.source, self.target, self.token = vpg, source, tuple(target), token
        self.tls, self.on_done = tls, on_done
        self.compress = wire.Compression() if compress else False    # lz4 where it pays
        self.throttle, self.weight = throttle, PRIORITY_WEIGHTS[priority]
        self.cond = threading.Condition()
        self.queue: collections.deque = collections.deque()    # (Rec, Token) not sent yet
        self.unacked: collections.deque = collections.deque()  # (Rec, Token) sent, not durable
        self.next_seq = 1
        self.inflight = 0
        self.connected = False
        self.sent_bytes = 0
        self.acked_seq = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._release = False        # on stop: release what was not sent (see ``stop``)
        self.thread = threading.Thread(target=self._run, name=f"sender-{vpg}", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self, release: bool = False) -> bool:
        """Stop streaming; True once the thread has ended (it is given 5 s).

        With ``release`` the records not acknowledged yet are marked done, so that the
        ring is freed past them: only for records nothing will need (the caller's
        argument). Without it they stay pending, and the host puts them into dirty
        bitmaps when the VRA detaches (a VRA shutting down must not free them).
        """
        self._release = self._release or release
        self._stop.set()
        with self.cond:
            self.cond.notify_all()
        sock = self._sock
        if sock is not None:          # a send blocked on a stalled link returns now
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.thread.is_alive():
            self.thread.join(5)
        ended = not self.thread.is_alive()
        if ended and self._release:   # else the thread releases them as it ends
            self.release_pending()
        return ended

    def take_pending(self) -> list:
        """Everything sent but not durable and everything not sent yet, in stream order;
        the sender forgets them (a stopped sender's records, for another one to send)."""
        with self.cond:
            items = list(self.unacked) + list(self.queue)
            self.unacked.clear()
            self.queue.clear()
            self.inflight = 0
        return items

    def release_pending(self) -> int:
        """Mark every pending record done (free its ring space); how many there were."""
        items = self.take_pending()
        for _rec, tok in items:
            tok.done = True
        if items and self.on_done:
            self.on_done()
        return len(items)

    def adopt(self, items: list) -> int:
        """Before ``start``: send a replaced sender's pending records first, renumbered in
        this source; its data records only (WRITE, ZERO). Its MARKER and COMMIT records are
        dropped (marked done): those barriers end abandoned, no checkpoint is made at them.
        How many records were adopted."""
        if self.thread.is_alive():
            raise RuntimeError("adopt before start only")
        dropped = False
        with self.cond:
            data = [(r, t) for r, t in items if r.kind in (wire.R_WRITE, wire.R_ZERO)]
            for r, t in items:
                if r.kind not in (wire.R_WRITE, wire.R_ZERO):
                    t.done = dropped = True
            merged = data + list(self.queue)
            self.queue.clear()
            for i, (r, t) in enumerate(merged, start=1):
                self.queue.append((wire.Rec(r.kind, i, r.vm, r.disk, r.offset, r.data), t))
            self.next_seq = len(merged) + 1
        if dropped and self.on_done:
            self.on_done()
        return len(data)

    def enqueue(self, kind: int, token: Token, vm: bytes = b"\0" * 16, disk: int = 0,
                offset: int = 0, data=b""):
        with self.cond:
            rec = wire.Rec(kind, self.next_seq, vm, disk, offset, data)
            self.next_seq += 1
            self.queue.append((rec, token))
            self.cond.notify_all()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.target, timeout=5)
        self._sock = sock             # ``stop`` shuts it down: no wait for a WELCOME that never comes
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        if self.tls is not None:
            sock = self._sock = self.tls.wrap_socket(sock, server_hostname=self.target[0])
        wire.send(sock, wire.encode_json(wire.HELLO, {"token": self.token, "source": self.source,
                                                      "vpg": self.vpg}))
        welcome = wire.recv_json(sock, wire.WELCOME)
        sock.settimeout(None)
        self._acked(int(welcome["durable_seq"]))
        with self.cond:   # resend whatever was sent but not made durable, in order
            self.queue.extendleft(reversed(self.unacked))
            self.unacked.clear()
            self.inflight = 0
        return sock

    def _acked(self, seq: int):
        with self.cond:
            self.acked_seq = max(self.acked_seq, seq)
            while self.unacked and self.unacked[0][0].seq <= seq:
                rec, tok = self.unacked.popleft()
                self.inflight -= len(rec.data)
                tok.done = True
            while self.queue and self.queue[0][0].seq <= seq:   # durable before a reconnect
                rec, tok = self.queue.popleft()
                tok.done = True
            self.cond.notify_all()
        if self.on_done:
            self.on_done()

    def _run(self):
        try:
            self._stream()
        finally:
            if self._release:
                self.release_pending()

    def _stream(self):
        backoff = 0.1
        while not self._stop.is_set():
            try:
                sock = self._connect()
            except (OSError, ConnectionError, wire.WireError) as exc:
                self._sock = None
                self.last_error = f"connect to {self.target[0]}:{self.target[1]}: {exc}"
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.1
            self._sock = sock
            self.connected, self.last_error = True, None
            reader = threading.Thread(target=self._read_acks, args=(sock,), daemon=True)
            reader.start()
            try:
                self._send_loop(sock)
            except (OSError, ConnectionError, wire.WireError) as exc:
                self.last_error = str(exc)
                log.warning("VPG %s: stream to %s broke: %s", self.vpg, self.target, exc)
            except Exception as exc:   # a bug must not end the stream for good: log, reconnect
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("VPG %s: sender failed", self.vpg)
                self._stop.wait(1.0)
            finally:
                self.connected = False
                self._sock = None
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
                reader.join(5)

    def _send_loop(self, sock):
        while not self._stop.is_set():
            with self.cond:
                while not self._stop.is_set() and (not self.queue or self.inflight >= INFLIGHT_BYTES):
                    if not self.connected:
                        raise ConnectionError("acknowledgement stream ended")
                    self.cond.wait(0.2)
                batch, size = [], 0
                while self.queue and size < BATCH_BYTES:
                    item = self.queue.popleft()
                    batch.append(item)
                    size += len(item[0].data) + wire.REC.size
                self.unacked.extend(batch)
                self.inflight += sum(len(r.data) for r, _ in batch)
            if batch:
                frame = wire.encode(wire.BATCH, wire.pack_batch([r for r, _ in batch]), self.compress)
                if self.throttle is not None:
                    self.throttle.acquire(self.vpg, len(frame[1]), self.weight, self._stop)
                wire.send(sock, frame)
                self.sent_bytes += len(frame[1])

    def _read_acks(self, sock):
        try:
            while True:
                ack = wire.recv_json(sock, wire.ACK)
                self._acked(int(ack["durable_seq"]))
        except (OSError, ConnectionError, wire.WireError, ValueError):
            self.connected = False
            with self.cond:
                self.cond.notify_all()

    def status(self) -> dict:
        with self.cond:
            return {"vpg": self.vpg, "target": f"{self.target[0]}:{self.target[1]}",
                    "connected": self.connected, "queued": len(self.queue),
                    "unacked": len(self.unacked), "acked_seq": self.acked_seq,
                    "next_seq": self.next_seq, "sent_bytes": self.sent_bytes,
                    "last_error": self.last_error}


class ProtectedSide:
    """Reads the host's mirror ring and routes each record to its VPG's sender."""

    def __init__(self, name: str, doorbell: str, token: str, epoch: int | None = None,
                 tls: ssl.SSLContext | None = None):
        self.name = name
        self.doorbell = doorbell
        self.token = token
        self.epoch = epoch or int(time.time() * 1000)
        self.tls = tls
        self.throttle = Throttle()
        self.vpgs: dict[str, dict] = {}
        self.senders: dict[str, Sender] = {}
        self.vm_vpg: dict[bytes, str] = {}
        self.markers: dict[str, int] = {}           # VPG -> last barrier routed
        # VPG -> times it was unprotected in this epoch: a VPG protected again streams as a new
        # source (``name/epoch.n``), so its records are not taken for ones already durable
        self.restarts: dict[str, int] = {}
        self.tokens: collections.deque[Token] = collections.deque()
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.client: MirrorClient | None = None
        self.attached_info: dict | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="protected-reader", daemon=True)

    @property
    def source(self) -> str:
        return f"{self.name}/{self.epoch}"

    def source_for(self, vpg: str) -> str:
        n = self.restarts.get(vpg, 0)
        return self.source + (f".{n}" if n else "")

    def start(self):
        self.thread.start()

    def stop(self):
        self._stop.set()
        self.thread.join(5)
        for s in list(self.senders.values()):
            s.stop()

    def protect(self, vpg: str, vms: list[str], target: tuple[str, int], compress: bool = True,
                priority: str = "Medium", target_token: str | None = None):
        """Start (or update) sending a VPG's writes to its recovery VRA (``target_token``: the
        recovery VRA's token, when it is not this VRA's own)."""
        if priority not in PRIORITY_WEIGHTS:
            raise ValueError(f"priority is one of {', '.join(PRIORITY_WEIGHTS)}")
        replaced = new = None
        with self.lock:
            old = self.vpgs.get(vpg)
            token = target_token or self.token
            self.vpgs[vpg] = {"vms": list(vms), "target": tuple(target), "compress": compress,
                              "priority": priority, "token": token}
            if old and vpg in self.senders and (old["target"], old["token"]) != (tuple(target), token):
                replaced = self.senders.pop(vpg)
                self.restarts[vpg] = self.restarts.get(vpg, 0) + 1
            for u in list(self.vm_vpg):
                if self.vm_vpg[u] == vpg:
                    del self.vm_vpg[u]
            for u in vms:
                self.vm_vpg[uuidlib.UUID(u).bytes] = vpg
            if vpg in self.senders:
                s = self.senders[vpg]
                s.weight = PRIORITY_WEIGHTS[priority]
                if bool(compress) != bool(s.compress):
                    s.compress = wire.Compression() if compress else False
            else:   # started below, once it holds what a replaced sender did not deliver
                new = Sender(vpg, self.source_for(vpg), target, token, compress, self.tls, self._advance,
                             self.throttle, priority)
                self.senders[vpg] = new
        if replaced is not None:
            # The VPG stays protected from here: whatever the old stream did not make durable
            # goes first in the new one (records the old target had made durable but not
            # acknowledged are sent again: rewriting them in order changes no later state).
            replaced.stop()
            n = new.adopt(replaced.take_pending())
            if n:
                log.info("VPG %s: %d records of the replaced stream go to %s:%d", vpg, n, *target)
        if new is not None:
            new.start()

    def unprotect(self, vpg: str):
        """Stop streaming a VPG; release the records its sender still held.

        Releasing them (their ring space freed, no bitmap bit set) loses nothing, because a
        VPG is unprotected on a VRA only when
        - it is no longer replicated from this site (pause, delete, a failover or move
          stopping replication, a failed creation): whatever resumes replicating it (resume,
          a rolled-back failover or move, reverse protection) runs a delta sync of all of its
          disks, which compares the whole disks with the recovery side; or
        - this VRA's host no longer runs a VM of it (its VMs moved away or left the VPG): a
          VM leaves a host only after the host drained its stream (DETACH_VM, up to 10 s;
          what is still unacknowledged then goes into the VM's dirty bitmap, which travels
          with the VM), so what is left here is in a bitmap already or belongs to no VPG.
        Records routed after this call go nowhere (the VPG has no sender), as before.
        """
        with self.lock:
            self.vpgs.pop(vpg, None)
            self.vm_vpg = {u: v for u, v in self.vm_vpg.items() if v != vpg}
            s = self.senders.pop(vpg, None)
            if s:
                self.restarts[vpg] = self.restarts.get(vpg, 0) + 1
        if s:
            if not s.stop(release=True):
                log.warning("VPG %s: its sender did not stop within 5 s; its records are released "
                            "when it does", vpg)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.client = MirrorClient(self.doorbell, vra=self.name)
            except (OSError, ConnectionError) as exc:
                log.warning("cannot attach to the host at %s: %s", self.doorbell, exc)
                self._stop.wait(1.0)
                continue
            self.attached_info = self.client.info
            try:
                self._read(self.client)
            except (ConnectionError, R.RingCorrupt) as exc:
                log.error("mirror stream ended: %s", exc)
            finally:
                with self.lock:
                    client, self.client = self.client, None
                    self.tokens.clear()
                client.close()
                self._new_epoch()

    def _new_epoch(self):
        """After a detach: what was not durable is in the host's bitmaps now, and the ring's
        memory may be reused, so every sender starts over as a new source (a new epoch)."""
        with self.lock:
            old = list(self.senders.values())
            self.senders = {}
            self.epoch = max(self.epoch + 1, int(time.time() * 1000))
        for s in old:
            s.stop()
        with self.lock:
            for vpg, cfg in self.vpgs.items():
                s = Sender(vpg, self.source_for(vpg), cfg["target"], cfg["token"], cfg["compress"], self.tls,
                           self._advance, self.throttle, cfg["priority"])
                self.senders[vpg] = s
                s.start()

    def _read(self, client: MirrorClient):
        ring = client.ring
        while not self._stop.is_set():
            rec = ring.poll()
            if rec is None:
                ring.wait(0.05, nap_window=RING_NAP_WINDOW_S)
                continue
            tok = Token(rec.end)
            with self.lock:
                self.tokens.append(tok)
                vpg = None
                if rec.type in (R.WRITE, R.SYNC):
                    vpg = self.vm_vpg.get(bytes(rec.vm_uuid))
                    if vpg is not None:
                        self.senders[vpg].enqueue(wire.R_WRITE, tok, bytes(rec.vm_uuid), rec.disk,
                                                  rec.offset, rec.payload)
                elif rec.type == R.ZERO:
                    vpg = self.vm_vpg.get(bytes(rec.vm_uuid))
                    if vpg is not None:
                        self.senders[vpg].enqueue(wire.R_ZERO, tok, bytes(rec.vm_uuid), rec.disk,
                                                  rec.offset, bytes(rec.payload[:8]))
                elif rec.type == R.MARKER:
                    info = json.loads(bytes(rec.payload))
                    vpg = info.get("vpg")
                    if vpg in self.senders:
                        self.senders[vpg].enqueue(wire.R_MARKER, tok, data=bytes(rec.payload))
                        self.markers[vpg] = int(info["checkpoint"])
                        self.cond.notify_all()
                    else:
                        vpg = None
                if vpg is None:
                    tok.done = True
            self._advance()

    def _advance(self):
        """Free the ring up to the first record something still needs."""
        with self.lock:   # under the lock: two threads must never move the tail backwards
            client = self.client
            end = None
            while self.tokens and self.tokens[0].done:
                end = self.tokens.popleft().end
            if end is not None and client is not None:
                try:
                    client.ring.ack(end)
                except ValueError:
                    pass  # the ring was closed under us (detach); the host covers it by bitmaps

    def commit(self, vpg: str, checkpoint: int, info: dict, timeout: float = 5.0):
        """Send COMMIT for a barrier after this VRA's own marker of it."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.markers.get(vpg, -1) < checkpoint and time.monotonic() < deadline:
                self.cond.wait(0.05)
            if vpg not in self.senders:
                raise KeyError(f"VPG {vpg} is not protected by {self.name}")
            tok = Token(-1, done=True)
            self.senders[vpg].enqueue(wire.R_COMMIT, tok, data=json.dumps(
                {**info, "checkpoint": checkpoint}).encode())

    def status(self) -> dict:
        return {"source": self.source, "attached": self.client is not None,
                "throttle": self.throttle.status(),
                "vpgs": {v: s.status() for v, s in self.senders.items()},
                "pending_ring_records": len(self.tokens)}
