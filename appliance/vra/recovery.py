"""The recovery side of a VRA: receive VPG streams, merge them in order, journal them durably.

Each protected VRA of the site sends, per VPG, one stream ("source") of
records numbered 1, 2, 3 ... (``seq``). The recovery VRA merges the sources of
a VPG into one totally ordered stream (positions ``Pos(generation, lsn)``),
appends it to the DSS journal and acknowledges each source's records only once
they are durable. The ordering rules (docs/FORMAT.md, "Replication"):

- Records of one source keep their order.
- A MARKER k is a checkpoint barrier: a source that reaches it waits until
  every participant of barrier k has reached it too, so every record before
  any marker k precedes the cut and every record after follows it. The wait
  ends without a cut (barrier k is abandoned) only when it cannot complete or
  is not wanted: the leader aborted k (a participant wrote no marker, or the
  checkpoint is invalid), a missing participant already passed k, every
  missing participant is connected and sent nothing for ``BARRIER_TIMEOUT``,
  or ``BARRIER_MAX_WAIT`` passed. A marker behind its participant's backlog,
  or behind a broken connection, is waited for: the leader reported that
  checkpoint valid, and it becomes recoverable.
- COMMIT k, sent by the VPG's leader after all barriers were released in time,
  turns the cut into a checkpoint.
- Writes of a VM that moved between hosts need no extra rule: the protected
  side acknowledges its host's ring only after this side made the records
  durable, and a vMotion waits for that before the VM runs on its new host.

A source that reconnects says who it is; the answer is the highest seq made
durable for it, and it resends from there: no gap, no duplicate.
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

from appliance.dss import Checkpoint, Entry, Pos

from . import wire

log = logging.getLogger("tidemark.vra.recovery")
BARRIER_TIMEOUT = 10.0          # a barrier none of whose missing participants progressed this long: abandoned
BARRIER_MAX_WAIT = 120.0        # no barrier is waited for longer than this, progress or not
BARRIERS_KEPT = 4096            # outcomes of settled (and leader-aborted) barriers remembered


MAX_GROUP_BYTES = 16 << 20      # a source waits while this much is pending its group commit
IDLE_EXIT_S = 5.0                # a committer thread with nothing to do for this long exits


class _Group:
    """What the next journal append of a VPG makes durable: entries of any sources, checkpoints,
    and each source's highest seq in it."""

    __slots__ = ("entries", "checkpoints", "progress", "nbytes")

    def __init__(self):
        self.entries: list[Entry] = []
        self.checkpoints: list[Checkpoint] = []
        self.progress: dict[str, int] = {}
        self.nbytes = 0

    def __bool__(self):
        return bool(self.entries or self.checkpoints or self.progress)


class _Barrier:
    """One barrier k while sources wait at it. Waiters keep a reference: once settled (cut or
    abandoned) it is out of ``VPGTarget.barriers``, and its outcome stays on the object, so a
    waiter that wakes late cannot miss it (a COMMIT may already have consumed the cut)."""

    __slots__ = ("k", "participants", "arrived", "started", "done", "cut")

    def __init__(self, k: int, participants: set[str]):
        self.k = k
        self.participants = participants
        self.arrived: set[str] = set()
        self.started = time.monotonic()
        self.done = False
        self.cut: Pos | None = None


class VPGTarget:
    """The merge state of one VPG on its recovery VRA, and its group commit.

    Connection threads (one per source) assign positions to their records in arrival order
    and add them to the pending group; one committer thread appends the whole group to the
    journal (one WAL fsync for all of it) and then acknowledges each source that had records
    in it. While an append is being fsynced the next group fills, so under load a group holds
    several network batches of several sources (docs/FORMAT.md, "Append and durability").
    """

    def __init__(self, journal, vpg: str):
        self.journal = journal
        self.vpg = vpg
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)      # group, positions, barriers, acks
        durable = journal.durable_pos(vpg)
        self.pos = durable or Pos(1, 0)                  # last position assigned
        self.progress: dict[str, int] = journal.progress(vpg)     # durable, per source
        self.accepted: dict[str, int] = dict(self.progress)       # in a group, per source
        self.group = _Group()
        self.barriers: dict[int, _Barrier] = {}   # barriers some source waits at
        self.cut: dict[int, Pos] = {}             # barrier -> its cut, until its COMMIT comes
        # barrier -> its cut, or None if abandoned; with barriers the leader aborted before any
        # marker of them came (bounded: the oldest are forgotten)
        self.settled: collections.OrderedDict[int, Pos | None] = collections.OrderedDict()
        self.reached: dict[str, int] = {}         # participant (VRA name) -> highest marker it reached
        self.active: dict[str, float] = {}        # participant -> last time a batch of it arrived
        self.waiting: dict[str, int] = {}         # participant -> its threads waiting at a barrier
        self.lost: list[int] = []                 # valid COMMITs whose barrier had been abandoned
        self.errors: list[str] = []
        self.links: dict[str, tuple] = {}         # source -> (ack(seq), drop()) of its connection
        self.appends = 0                          # journal appends (fsyncs) made
        self._committer: threading.Thread | None = None
        self._closed = False

    # -- called by a source's connection thread -------------------------------------------
    def durable_seq(self, source: str) -> int:
        return self.progress.get(source, 0)

    def attach(self, source: str, ack, drop) -> None:
        """The source's current connection: where its ACKs go, and how to drop it."""
        with self.lock:
            self.links[source] = (ack, drop)
            self.active[_participant(source)] = time.monotonic()   # it resends from here

    def detach(self, source: str, ack) -> None:
        with self.lock:
            if self.links.get(source, (None,))[0] is ack:
                del self.links[source]

    def handle(self, source: str, recs: list[wire.Rec], ack=None) -> int:
        """Add a batch of a source to the pending group commit (after the barrier waits its
        markers need); the highest seq of the source accepted so far. The committer sends
        the ACK once the group is durable. ``ack``: the calling connection's (see ``attach``);
        a connection the source has replaced stops at its next barrier."""
        self.active[_participant(source)] = time.monotonic()    # progress, for barrier waits
        with self.lock:
            done = self.accepted.get(source, 0)
        recs = [r for r in recs if r.seq > done]           # a resend after reconnect
        if recs and recs[0].seq != done + 1:
            raise wire.WireError(f"source {source} skipped from seq {done} to {recs[0].seq}")
        run: list[wire.Rec] = []
        for r in recs:
            if r.kind == wire.R_MARKER:
                self._add(source, run)
                run = []
                self._barrier(source, r)
                if ack is not None and self.links.get(source, (None,))[0] is not ack:
                    # the source reconnected while this (dead) connection waited: the new one
                    # resends from what was accepted, so this one must add nothing more
                    raise ConnectionError(f"source {source} is connected again elsewhere")
                self._add(source, [r])                     # records the progress past the marker
            elif r.kind == wire.R_COMMIT:
                self._add(source, run)
                run = []
                self._commit(source, r)
            else:
                run.append(r)
        self._add(source, run)
        with self.lock:
            accepted = self.accepted.get(source, done)
            if accepted <= self.progress.get(source, 0):
                # nothing of it pending (all of it was durable already): acknowledge now
                link = self.links.get(source)
                if link is not None:
                    _call(link[0], self.progress.get(source, 0))
            return accepted

    def _entries(self, recs: list[wire.Rec]) -> list[tuple]:
        out = []
        for r in recs:
            if r.kind == wire.R_WRITE:
                # a view of the frame's own buffer, which nothing reuses: no copy before the journal's
                out.append((str(uuidlib.UUID(bytes=bytes(r.vm))), r.disk, r.offset, r.data))
            elif r.kind == wire.R_ZERO:
                # Journaled as an ordinary entry of zero bytes (simple; the journal has no
                # zero-entry record): the WAN carried 8 bytes, the journal stores the zeros.
                if len(r.data) != wire.ZERO_LEN.size:
                    raise wire.WireError(f"ZERO record {r.seq} carries {len(r.data)} bytes, not 8")
                (length,) = wire.ZERO_LEN.unpack(bytes(r.data))
                if not 0 < length <= wire.MAX_FRAME:
                    raise wire.WireError(f"ZERO record {r.seq} of {length} bytes")
                out.append((str(uuidlib.UUID(bytes=bytes(r.vm))), r.disk, r.offset, bytes(length)))
        return out

    def _add(self, source: str, recs: list[wire.Rec], checkpoint: Checkpoint | None = None):
        """Assign positions to ``recs`` and put them (and ``checkpoint``) in the pending group."""
        if not recs and checkpoint is None:
            return
        data = self._entries(recs)
        nbytes = sum(len(x[3]) for x in data)
        with self.cond:
            while self.group.nbytes >= MAX_GROUP_BYTES and not self._closed:
                self.cond.wait(1.0)                       # backpressure: the journal is behind
            if self._closed:
                raise ConnectionError(f"VPG {self.vpg} is no longer received here")
            seq = recs[-1].seq if recs else None
            if seq is not None and recs[0].seq != self.accepted.get(source, 0) + 1:
                # the group this source's earlier records were in failed meanwhile
                raise wire.WireError(f"source {source}: seq {recs[0].seq} does not follow "
                                     f"{self.accepted.get(source, 0)}; reconnect")
            g = self.group
            pos = self.pos
            for vm, disk, offset, payload in data:
                pos = Pos(pos.generation, pos.lsn + 1)
                g.entries.append(Entry(pos, vm, disk, offset, payload))
            self.pos = pos
            g.nbytes += nbytes
            if checkpoint is not None:
                g.checkpoints.append(checkpoint)
            if seq is not None:
                g.progress[source] = seq
                self.accepted[source] = seq
            if self._committer is None:
                self._committer = threading.Thread(target=self._commit_loop, name=f"commit-{self.vpg}",
                                                   daemon=True)
                self._committer.start()
            self.cond.notify_all()

    # -- the committer ----------------------------------------------------------------------
    def _commit_loop(self):
        while True:
            with self.cond:
                idle = time.monotonic() + IDLE_EXIT_S
                while not self.group and not self._closed:
                    left = idle - time.monotonic()
                    if left <= 0:
                        self._committer = None
                        return
                    self.cond.wait(left)
                if self._closed:
                    self._committer = None
                    return
                g, self.group = self.group, _Group()
                self.cond.notify_all()                    # sources waiting on a full group
            try:
                self.journal.append(self.vpg, g.entries, g.checkpoints, progress=g.progress)
            except Exception as exc:
                self._failed(exc)
                continue
            with self.cond:
                self.appends += 1
                self.progress.update(g.progress)
                acks = [(self.links.get(s), q) for s, q in g.progress.items()]
            for link, seq in acks:
                if link is not None:
                    _call(link[0], seq)

    def _failed(self, exc: BaseException):
        """A group did not become durable: forget every pending record and drop every source's
        connection; each reconnects and resends from what is durable (WELCOME)."""
        log.error("VPG %s: journal append failed, sources resend from what is durable: %s", self.vpg, exc)
        with self.cond:
            self.errors.append(f"journal append: {exc}")
            del self.errors[:-20]
            self.group = _Group()
            try:
                self.pos = self.journal.durable_pos(self.vpg) or Pos(1, 0)
            except Exception:             # the VPG was deleted: nothing more is appended anyway
                self._closed = True
            self.accepted = dict(self.progress)
            links = list(self.links.values())
            self.cond.notify_all()
        for _ack, drop in links:
            _call(drop)

    def close(self):
        """Stop committing (the VPG was dropped or the receiver stops)."""
        with self.cond:
            self._closed = True
            self.cond.notify_all()

    # -- barriers and checkpoints -------------------------------------------------------------
    def _barrier(self, source: str, r: wire.Rec):
        """Wait at MARKER k until barrier k is settled: cut (every participant reached it) or
        abandoned (docs/FORMAT.md, "Checkpoint coordination")."""
        info = json.loads(bytes(r.data))
        k, participants = int(info["checkpoint"]), set(info["participants"])
        name = _participant(source)
        with self.cond:
            self.reached[name] = max(self.reached.get(name, 0), k)
            # A participant's markers come in barrier order, so it will never reach an open
            # barrier below k that it has not reached: those cannot complete.
            for j, b in list(self.barriers.items()):
                if j < k and name in b.participants and name not in b.arrived:
                    self._settle(b, None, f"{name} passed it")
            if k in self.settled:
                return                                    # cut or abandoned already
            b = self.barriers.get(k)
            if b is None:
                b = self.barriers[k] = _Barrier(k, participants)
            b.arrived.add(name)
            if b.participants <= b.arrived:
                self._settle(b, self.pos)
                return
            passed = [p for p in b.participants - b.arrived if self.reached.get(p, 0) > k]
            if passed:
                self._settle(b, None, f"{', '.join(sorted(passed))} passed it")
                return
            self.waiting[name] = self.waiting.get(name, 0) + 1
            try:
                while not b.done:
                    if self._closed:
                        raise ConnectionError(f"VPG {self.vpg} is no longer received here")
                    now = time.monotonic()
                    missing = b.participants - b.arrived
                    if now - b.started >= BARRIER_MAX_WAIT:
                        self._settle(b, None, f"waited {BARRIER_MAX_WAIT:.0f} s for "
                                              f"{', '.join(sorted(missing))}")
                        break
                    connected = {_participant(src) for src in self.links}
                    if not any(self._may_reach(p, b, now, connected) for p in missing):
                        self._settle(b, None, f"no progress from {', '.join(sorted(missing))} "
                                              f"for {BARRIER_TIMEOUT:.0f} s")
                        break
                    self.cond.wait(min(1.0, BARRIER_TIMEOUT / 4))
            finally:
                self.waiting[name] -= 1

    def _may_reach(self, p: str, b: _Barrier, now: float, connected: set[str]) -> bool:
        """Whether missing participant ``p`` may still reach barrier ``b``: it sent a batch in the
        last BARRIER_TIMEOUT (its marker may be behind a backlog), it waits at a barrier itself
        (that wait ends by these same rules), or it is not connected (it resends what was not
        durable when it connects again). Connected and silent, it has nothing more to send: its
        marker is not coming (its stream lost it, e.g. a new epoch after a restart)."""
        return (bool(self.waiting.get(p)) or p not in connected
                or now - max(self.active.get(p, 0.0), b.started) < BARRIER_TIMEOUT)

    def _settle(self, b: _Barrier, cut: Pos | None, why: str = ""):
        """Barrier ``b`` is done (lock held): its cut, or None when it is abandoned."""
        b.done, b.cut = True, cut
        self.barriers.pop(b.k, None)
        self._remember(b.k, cut)
        if cut is not None:
            self.cut[b.k] = cut
        else:
            log.warning("VPG %s: barrier %d abandoned (%s)", self.vpg, b.k, why)
        self.cond.notify_all()

    def _remember(self, k: int, cut: Pos | None):
        self.settled[k] = cut
        while len(self.settled) > BARRIERS_KEPT:
            self.settled.popitem(last=False)

    def abort(self, k: int, why: str = "aborted by the leader"):
        """Barrier k is not wanted (the leader: a participant wrote no marker, or the checkpoint
        is invalid): stop waiting for it, and do not wait at markers of it still to come."""
        with self.cond:
            b = self.barriers.get(k)
            if b is not None:
                self._settle(b, None, why)
            elif k not in self.settled:
                self._remember(k, None)

    def _commit(self, source: str, r: wire.Rec):
        info = json.loads(bytes(r.data))
        k = int(info["checkpoint"])
        valid = bool(info.get("valid", True))
        with self.cond:
            cut = self.cut.pop(k, None)
            for old in [x for x in self.cut if x < k]:   # COMMITs come in barrier order
                self.cut.pop(old)
            if valid and cut is None:
                # Only when a participant's marker cannot come (its stream lost it: a new epoch,
                # or a recovery VRA restart lost the barrier's state after some of its markers
                # were durable), or after BARRIER_MAX_WAIT.
                log.error("VPG %s: checkpoint %d is valid at the leader but barrier %d was %s: "
                          "it is not recoverable", self.vpg, k, k,
                          "abandoned" if k in self.settled else "not complete")
                self.lost.append(k)
                del self.lost[:-100]
            b = self.barriers.get(k)
            if b is not None:
                # its COMMIT is consumed: a cut made now would become no checkpoint
                self._settle(b, None, "its COMMIT came first" if valid else "its checkpoint is invalid")
        if not valid:
            self.abort(k, "its checkpoint is invalid")
        cp = None
        if cut is not None and valid:
            # The cut's entries are in this group or an earlier one: groups are appended in order.
            # A cut at lsn 0 (nothing journaled yet) is a checkpoint of the replicas as they are.
            cp = Checkpoint(k, cut, float(info["time"]), info.get("tag"))
        self._add(source, [r], cp)


def _participant(source: str) -> str:
    """The participant (VRA name) of a source ``<vra name>/<epoch>``."""
    return source.split("/")[0]


def _call(fn, *args):
    try:
        fn(*args)
    except Exception as exc:      # the connection is gone: its thread notices and cleans up
        log.debug("acknowledgement or drop failed: %s", exc)


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
        with self._lock:
            for t in self.targets.values():
                t.close()
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
        target = acker = None
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
            send_lock = threading.Lock()

            def ack(seq: int, conn=conn):
                with send_lock:
                    wire.send(conn, wire.encode_json(wire.ACK, {"durable_seq": seq}))

            def drop(conn=conn):
                conn.shutdown(socket.SHUT_RDWR)

            target.attach(source, ack, drop)
            acker = ack
            with send_lock:
                wire.send(conn, wire.encode_json(wire.WELCOME, {"durable_seq": target.durable_seq(source)}))
            conn.settimeout(None)
            while not self._stop.is_set():
                ftype, payload = wire.recv(conn, copy=False)
                if ftype != wire.BATCH:
                    raise wire.WireError(f"unexpected frame type {ftype} in a stream")
                target.handle(source, wire.unpack_batch(payload), ack)   # ACKed by the committer
        except (ConnectionError, OSError) as exc:
            log.info("source %s disconnected: %s", source, exc)
        except wire.WireError as exc:
            log.error("source %s sent a bad frame, dropping the connection: %s", source, exc)
        finally:
            if target is not None and acker is not None:
                target.detach(source, acker)
            self._conns.discard(conn)
            conn.close()
