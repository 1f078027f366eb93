"""Simulated WAN link between two lab sites.

Replication appliances of site A reach site B only through a :class:`Link`: a
TCP forwarder listening on 127.0.0.1 that relays every accepted connection to a
target ``(host, port)``.  The link runs inside the site controller process and
can be cut, restored and shaped (shared token-bucket bandwidth per direction
plus one-way latency).

Plain threads and blocking sockets. The link's own thread (``link-<name>``)
accepts on every route and runs the control calls (routes, cut, shape, stats);
each connection has one pump thread per direction. Unshaped, a pump moves each
chunk itself with blocking calls: ``os.splice`` from the socket into a pipe and
from the pipe into the other socket (the bytes never enter this process; where
there is no splice, one read into a reused buffer and one send), so waiting for
data or for room costs no wakeups beyond the kernel's. Shaped, the
pump stamps every chunk with its due time (arrival + latency) and queues it,
and the direction's writer thread waits for the due time and for bandwidth
tokens, then sends. Latency is thus pipelined and never lowers throughput below
the bandwidth limit. A cut or a failed connection wakes blocked reads at once
(``shutdown(SHUT_RD)``, which sends nothing) and blocked sends within
``IO_POLL_S`` (``SO_SNDTIMEO``); sockets are closed only once every thread of
the connection has finished, with an RST unless both directions ended with EOF.
"""
from __future__ import annotations

import collections
import fcntl
import logging
import os
import queue
import selectors
import socket
import struct
import threading
import time
from concurrent.futures import Future

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024            # read size per recv (one reused buffer per direction)
QUEUE_BYTES = 4 * 1024 * 1024  # queued bytes per direction when shaped, on top of bandwidth*latency
MAX_INFLIGHT = 64 * 1024 * 1024
BURST_S = 0.05                 # token bucket depth, in seconds of traffic
CALL_TIMEOUT = 5.0              # bound on every cross-thread call
DROP_TIMEOUT = 2.0              # bound on waiting for dropped connections to close
SPLICE = hasattr(os, "splice")  # unshaped chunks go socket -> pipe -> socket in the kernel
IO_POLL_S = 0.2                 # a send blocked on a full peer looks at the connection this often


def _close(sock: socket.socket, rst: bool = True) -> None:
    """Close ``sock``; with ``rst`` send an RST (SO_LINGER 0) instead of a FIN."""
    if rst:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    sock.close()


def _pipe() -> tuple[int, int]:
    """A pipe that holds a whole CHUNK, for splice."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, CHUNK)
    except OSError:            # above the system's pipe-max-size: the default size works too
        pass
    return r, w


class _Gone(Exception):
    """The connection was dropped or failed: its threads stop."""


class _Bucket:
    """Token bucket (bytes/s) shared by all connections of one direction; thread-safe."""

    def __init__(self) -> None:
        self.rate: float | None = None
        self.tokens = self.stamp = 0.0
        self.lock = threading.Lock()

    def reset(self, rate: float | None, now: float) -> None:
        with self.lock:
            self.rate, self.tokens, self.stamp = rate, 0.0, now

    def piece(self) -> int:
        """Largest send unit: ~10 ms of traffic, so shaped output is smooth."""
        rate = self.rate
        return CHUNK if rate is None else int(min(CHUNK, max(16384, rate / 100)))

    def take(self, n: int) -> float:
        """Take ``n`` bytes' tokens; the seconds to wait before sending them."""
        with self.lock:
            rate = self.rate
            if rate is None:
                return 0.0
            now = time.monotonic()
            self.tokens = min(max(rate * BURST_S, 65536.0), self.tokens + (now - self.stamp) * rate)
            self.stamp = now
            self.tokens -= n   # go into debt and wait it off: concurrent takers queue up fairly
            return -self.tokens / rate if self.tokens < 0 else 0.0


class _Direction:
    """One direction of a connection: the chunks queued for its writer while shaped."""

    def __init__(self, conn: _Conn, src: socket.socket, dst: socket.socket, name: str) -> None:
        self.conn, self.src, self.dst, self.name = conn, src, dst, name
        self.items: collections.deque = collections.deque()   # (due, data) or None (EOF)
        self.size = 0
        self.busy = False          # the writer is sending an item it took
        self.writer: threading.Thread | None = None
        self.cond = threading.Condition()

    def idle(self) -> bool:
        """Nothing queued or being sent by the writer (lock held): the reader may send itself."""
        return not self.items and not self.busy


class _Conn:
    """One forwarded connection: client socket, target socket, its threads."""

    def __init__(self, link: Link, port: int, csock: socket.socket) -> None:
        self.link, self.port, self.csock = link, port, csock
        self.tsock: socket.socket | None = None
        self.dirs: list[_Direction] = []
        self.gone = threading.Event()      # dropped, or a direction failed: every thread stops
        self.dropped = False
        self.closed = threading.Event()
        self.lock = threading.Lock()
        self.live = 0                      # threads of this connection still running
        self.eofs = 0                      # directions that ended with a clean EOF

    def spawn(self, fn, *args, name: str) -> threading.Thread:
        with self.lock:
            self.live += 1
        t = threading.Thread(target=self._run, args=(fn, *args), name=name, daemon=True)
        try:
            t.start()
        except RuntimeError:                # no more threads: this connection cannot go on
            self.stop()
            with self.lock:
                self.live -= 1
                last = self.live == 0
            if last:
                self.finish()
            raise
        return t

    def _run(self, fn, *args) -> None:
        try:
            fn(*args)
        except _Gone:
            pass
        except OSError as exc:              # a reset or refused target: abort the connection
            log.debug("link %s: connection on %d ended: %s", self.link.name, self.port, exc)
            self.stop()
        except Exception:                   # noqa: BLE001 - a bug must not leave sockets open
            log.exception("link %s: relay thread failed", self.link.name)
            self.stop()
        finally:
            with self.lock:
                self.live -= 1
                last = self.live == 0
            if last:
                self.finish()

    def stop(self, dropped: bool = False) -> None:
        """Make every thread of the connection stop: reads wake now, sends within IO_POLL_S."""
        with self.lock:
            self.dropped = self.dropped or dropped
            if self.gone.is_set():
                return
            self.gone.set()
        for sock in filter(None, (self.csock, self.tsock)):
            try:
                sock.shutdown(socket.SHUT_RD)   # wakes a blocked recv; sends nothing to the peer
            except OSError:
                pass
        for d in self.dirs:
            with d.cond:
                d.cond.notify_all()

    def eof(self) -> None:
        with self.lock:
            self.eofs += 1

    def finish(self) -> None:
        """All threads are done: close both sockets, an RST unless both directions ended in EOF."""
        graceful = self.eofs == 2 and not self.gone.is_set()
        # out of the link's count before the peers can see the close: whoever sees the socket
        # end then never finds it still counted in stats()
        self.link._forget(self)
        for sock in filter(None, (self.csock, self.tsock)):
            _close(sock, rst=not graceful)
        self.closed.set()


class Link:
    """A TCP forwarder simulating a WAN link; all public methods are thread-safe."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._calls: queue.SimpleQueue | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._sel: selectors.BaseSelector | None = None
        self._running = False
        self._routes: dict[int, dict] = {}     # port -> {"target", "sock"}
        self._conns: set[_Conn] = set()
        self._lock = threading.Lock()          # _conns, _bytes
        self._cut = False
        self._bandwidth_mbps: float | None = None
        self._latency_ms: float | None = None
        self._buckets = {"ab": _Bucket(), "ba": _Bucket()}
        self._bytes = {"ab": 0, "ba": 0}

    # ---- lifecycle -------------------------------------------------------
    def start(self) -> None:
        """Start the link's thread (no-op if running)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._calls = queue.SimpleQueue()
        self._wake = socket.socketpair()
        self._wake[0].setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._wake[0], selectors.EVENT_READ, None)
        self._running = True
        self._thread = threading.Thread(target=self._loop, name=f"link-{self.name}", daemon=True)
        self._thread.start()
        now = time.monotonic()
        self._call(lambda: [b.reset(b.rate, now) for b in self._buckets.values()])

    def stop(self, timeout: float = CALL_TIMEOUT) -> None:
        """Close all routes and connections, stop the thread and join it."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            try:
                self._call(self._shutdown)
            except Exception:  # noqa: BLE001 - stop must always finish
                log.exception("link %s: unclean shutdown", self.name)
            self._running = False
            self._poke()
            thread.join(timeout)
        self._thread = None

    def _poke(self) -> None:
        try:
            self._wake[1].send(b"x")
        except (OSError, TypeError):
            pass

    def _call(self, fn):
        """Run ``fn()`` on the link's thread; return its result (or raise its exception)."""
        if self._thread is None or not self._thread.is_alive() or not self._running:
            raise RuntimeError(f"link {self.name} is not started")
        fut: Future = Future()
        self._calls.put((fn, fut))
        self._poke()
        return fut.result(CALL_TIMEOUT)

    def _loop(self) -> None:
        sel = self._sel
        try:
            while self._running:
                for key, _ in sel.select():
                    if key.data is None:
                        try:
                            while self._wake[0].recv(4096):
                                pass
                        except BlockingIOError:
                            pass
                    else:
                        self._accept(*key.data)
                while True:
                    try:
                        fn, fut = self._calls.get_nowait()
                    except queue.Empty:
                        break
                    if fut.set_running_or_notify_cancel():
                        try:
                            fut.set_result(fn())
                        except BaseException as exc:   # noqa: BLE001 - handed to the caller
                            fut.set_exception(exc)
        finally:
            for route in self._routes.values():
                route["sock"].close()
            self._routes.clear()
            sel.close()
            for s in self._wake:
                s.close()
            while True:   # calls that raced with the stop get an answer, not a timeout
                try:
                    _fn, fut = self._calls.get_nowait()
                except queue.Empty:
                    break
                fut.set_exception(RuntimeError(f"link {self.name} is stopped"))

    def _shutdown(self) -> None:
        for port in list(self._routes):
            self._remove_route(port)
        self._drop(list(self._conns))

    # ---- routes ----------------------------------------------------------
    def add_route(self, target_host: str, target_port: int) -> int:
        """Listen on a free 127.0.0.1 port forwarding to the target; return the port.

        Idempotent: a target that already has a route gets the same port."""
        return self._call(lambda: self._add_route((target_host, int(target_port))))

    def _add_route(self, target: tuple[str, int]) -> int:
        for port, route in self._routes.items():
            if route["target"] == target:
                return port
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sock.setblocking(False)
        port = sock.getsockname()[1]
        self._sel.register(sock, selectors.EVENT_READ, (port, sock, target))
        self._routes[port] = {"target": target, "sock": sock}
        return port

    def remove_route(self, port: int) -> None:
        """Close the listener on ``port`` and its connections (KeyError if unknown)."""
        if not self._call(lambda: self._remove_route(port)):
            raise KeyError(port)

    def _remove_route(self, port: int) -> bool:
        route = self._routes.pop(port, None)
        if route is None:
            return False
        self._sel.unregister(route["sock"])
        route["sock"].close()
        with self._lock:
            conns = [c for c in self._conns if c.port == port]
        self._drop(conns)
        return True

    # ---- cut / shape / stats ---------------------------------------------
    def cut(self) -> None:
        """Drop (RST) every forwarded connection and refuse new ones until restore()."""
        def do():
            self._cut = True
            with self._lock:
                conns = list(self._conns)
            self._drop(conns)
        self._call(do)

    def restore(self) -> None:
        """Let new connections through again after cut()."""
        self._call(lambda: setattr(self, "_cut", False))

    def shape(self, bandwidth_mbps: float | None = None, latency_ms: float | None = None) -> None:
        """Set the per-direction bandwidth limit in MB/s (1e6 B/s; None = unlimited)
        and the one-way latency in ms (None/0 = none), for all connections."""
        if bandwidth_mbps is not None and bandwidth_mbps <= 0:
            raise ValueError("bandwidth_mbps must be > 0 or None")
        if latency_ms is not None and latency_ms < 0:
            raise ValueError("latency_ms must be >= 0 or None")

        def do():
            self._bandwidth_mbps = None if bandwidth_mbps is None else float(bandwidth_mbps)
            self._latency_ms = float(latency_ms) if latency_ms else None
            rate = None if bandwidth_mbps is None else bandwidth_mbps * 1e6
            now = time.monotonic()
            for bucket in self._buckets.values():
                bucket.reset(rate, now)
        self._call(do)

    def stats(self) -> dict:
        """Snapshot: name, cut, shaping, open connections, bytes per direction, routes."""
        def do():
            with self._lock:
                conns, nbytes = len(self._conns), dict(self._bytes)
            return {
                "name": self.name, "cut": self._cut,
                "bandwidth_mbps": self._bandwidth_mbps, "latency_ms": self._latency_ms,
                "connections": conns,
                "bytes_ab": nbytes["ab"], "bytes_ba": nbytes["ba"],
                "routes": [{"port": p, "target": r["target"]} for p, r in sorted(self._routes.items())],
            }
        return self._call(do)

    # ---- forwarding ------------------------------------------------------
    def _drop(self, conns: list[_Conn]) -> None:
        """Abort ``conns`` and wait (bounded) until their sockets are closed."""
        for conn in conns:
            conn.stop(dropped=True)
        deadline = time.monotonic() + DROP_TIMEOUT
        for conn in conns:
            if not conn.closed.wait(max(0.0, deadline - time.monotonic())):
                log.warning("link %s: a dropped connection did not close within %.0f s",
                            self.name, DROP_TIMEOUT)
                break

    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _accept(self, port: int, lsock: socket.socket, target) -> None:
        while True:
            try:
                csock, _ = lsock.accept()
            except BlockingIOError:
                return
            except OSError as exc:   # e.g. EMFILE: leave the rest queued for the next round
                log.warning("link %s: accept on %d failed: %s", self.name, port, exc)
                time.sleep(0.1)
                return
            if self._cut:
                _close(csock)
                continue
            csock.setblocking(True)
            conn = _Conn(self, port, csock)
            with self._lock:
                self._conns.add(conn)
            try:
                conn.spawn(self._serve, conn, target, name=f"link-{self.name}:{port}")
            except RuntimeError as exc:
                log.warning("link %s: connection on %d refused: %s", self.name, port, exc)

    def _serve(self, conn: _Conn, target) -> None:
        """Connect to the target, then pump client -> target in this thread."""
        try:
            conn.tsock = socket.create_connection(target, timeout=CALL_TIMEOUT)
        except OSError as exc:
            log.debug("link %s: connection to %s failed: %s", self.name, target, exc)
            conn.stop()
            return
        if conn.gone.is_set():   # cut() raced with the connect
            return
        tv = struct.pack("ll", int(IO_POLL_S), int(IO_POLL_S % 1 * 1e6))
        for sock in (conn.csock, conn.tsock):
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        ab = _Direction(conn, conn.csock, conn.tsock, "ab")
        ba = _Direction(conn, conn.tsock, conn.csock, "ba")
        conn.dirs = [ab, ba]
        if conn.gone.is_set():
            return
        conn.spawn(self._pump, ba, name=f"link-{self.name}:{conn.port}:ba")
        self._pump(ab)

    def _shaped(self) -> bool:
        return self._latency_ms is not None or self._buckets["ab"].rate is not None

    def _count(self, direction: str, n: int) -> None:
        with self._lock:
            self._bytes[direction] += n

    def _send(self, conn: _Conn, dst: socket.socket, view: memoryview) -> None:
        """Send all of ``view`` (blocking; a blocked send looks at the connection every IO_POLL_S)."""
        while view:
            try:
                n = dst.send(view)
            except BlockingIOError:       # SO_SNDTIMEO passed with nothing sent
                if conn.gone.is_set():
                    raise _Gone from None
                continue
            view = view[n:]

    def _queue_limit(self) -> int:
        """Queue room: a base plus the bytes in flight at full rate during the latency."""
        inflight = (self._buckets["ab"].rate or 1e9) * (self._latency_ms or 0.0) / 1000.0
        return QUEUE_BYTES + int(min(MAX_INFLIGHT, inflight))

    def _pump(self, d: _Direction) -> None:
        """Read ``d.src`` until EOF; move each chunk now (unshaped) or queue it for the writer."""
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        pipe = None
        try:
            while True:
                with d.cond:
                    direct = d.idle() and not self._shaped()
                if direct and SPLICE:
                    if pipe is None:
                        pipe = _pipe()
                    if not self._splice(d, pipe):
                        return
                elif not self._chunk(d, buf, view):
                    return
        finally:
            if pipe is not None:
                os.close(pipe[0])
                os.close(pipe[1])

    def _splice(self, d: _Direction, pipe: tuple[int, int]) -> bool:
        """Move one chunk from ``d.src`` to ``d.dst`` through ``pipe``, in the kernel (no copy
        through this process); False at EOF."""
        conn = d.conn
        n = os.splice(d.src.fileno(), pipe[1], CHUNK)
        if conn.gone.is_set():
            raise _Gone
        if not n:
            d.dst.shutdown(socket.SHUT_WR)
            conn.eof()
            return False
        while n:
            try:
                m = os.splice(pipe[0], d.dst.fileno(), n)
            except BlockingIOError:       # SO_SNDTIMEO passed with nothing sent
                if conn.gone.is_set():
                    raise _Gone from None
                continue
            n -= m
            self._count(d.name, m)
        return True

    def _chunk(self, d: _Direction, buf: bytearray, view: memoryview) -> bool:
        """Read one chunk of ``d.src`` into ``buf`` (reused); send it now (unshaped) or queue a
        copy for the writer; False at EOF."""
        conn = d.conn
        n = d.src.recv_into(buf)
        if conn.gone.is_set():
            raise _Gone
        with d.cond:
            direct = d.idle() and not self._shaped()
            if not direct:
                while d.size >= self._queue_limit() and not conn.gone.is_set():
                    d.cond.wait(IO_POLL_S)
                if conn.gone.is_set():
                    raise _Gone
                due = time.monotonic() + (self._latency_ms or 0.0) / 1000.0
                d.items.append((due, bytes(view[:n])) if n else None)
                d.size += n
                if d.writer is None:
                    d.writer = conn.spawn(self._write, d, name=f"link-{self.name}:{conn.port}:{d.name}w")
                d.cond.notify_all()
        if direct:
            if not n:
                d.dst.shutdown(socket.SHUT_WR)
                conn.eof()
                return False
            self._send(conn, d.dst, view[:n])
            self._count(d.name, n)
            return True
        return bool(n)                 # at EOF the writer half-closes once the queue is sent

    def _write(self, d: _Direction) -> None:
        """Send ``d``'s queued chunks, each at its due time and within the bandwidth."""
        conn, bucket = d.conn, self._buckets[d.name]
        while True:
            with d.cond:
                while not d.items and not conn.gone.is_set():
                    d.cond.wait()
                if conn.gone.is_set():
                    raise _Gone
                item = d.items.popleft()
                d.busy = True
            if item is None:
                d.dst.shutdown(socket.SHUT_WR)
                conn.eof()
                return
            due, data = item
            delay = due - time.monotonic()
            if delay > 0 and conn.gone.wait(delay):
                raise _Gone
            view, piece = memoryview(data), bucket.piece()
            for off in range(0, len(view), piece):
                part = view[off:off + piece]
                wait = bucket.take(len(part))
                if wait > 0 and conn.gone.wait(wait):
                    raise _Gone
                self._send(conn, d.dst, part)
                self._count(d.name, len(part))
            with d.cond:
                d.size -= len(data)
                d.busy = False
                d.cond.notify_all()
