"""Simulated WAN link between two lab sites.

Replication appliances of site A reach site B only through a :class:`Link`: a
TCP forwarder listening on 127.0.0.1 that relays every accepted connection to a
target ``(host, port)``.  The link runs inside the site controller process, in
its own daemon thread with a private asyncio loop, and can be cut, restored and
shaped (shared token-bucket bandwidth per direction plus one-way latency).

Each connection direction is a pipeline of two tasks: a reader that stamps
every chunk with its due time (arrival + latency) and queues it, and a writer
that waits for the due time and for bandwidth tokens, then sends.  Latency is
thus pipelined and never lowers throughput below the bandwidth limit.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import socket
import struct
import threading

log = logging.getLogger(__name__)

CHUNK = 256 * 1024            # read size per recv
QUEUE_BYTES = 4 * 1024 * 1024  # queued bytes per direction, on top of bandwidth*latency
MAX_INFLIGHT = 64 * 1024 * 1024
BURST_S = 0.05                 # token bucket depth, in seconds of traffic
CALL_TIMEOUT = 5.0              # bound on every cross-thread call
DROP_TIMEOUT = 2.0              # bound on waiting for dropped connections to close


def _close(sock: socket.socket, rst: bool = True) -> None:
    """Close ``sock``; with ``rst`` send an RST (SO_LINGER 0) instead of a FIN."""
    if rst:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    sock.close()


class _Bucket:
    """Token bucket (bytes/s) shared by all connections of one direction."""

    def __init__(self) -> None:
        self.rate: float | None = None
        self.tokens = self.stamp = 0.0

    def reset(self, rate: float | None, now: float) -> None:
        self.rate, self.tokens, self.stamp = rate, 0.0, now

    def piece(self) -> int:
        """Largest send unit: ~10 ms of traffic, so shaped output is smooth."""
        return CHUNK if self.rate is None else int(min(CHUNK, max(16384, self.rate / 100)))

    async def take(self, n: int, now: float) -> None:
        rate = self.rate
        if rate is None:
            return
        self.tokens = min(max(rate * BURST_S, 65536.0), self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        self.tokens -= n   # go into debt and wait it off: concurrent takers queue up fairly
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / rate)


class _ChunkQueue:
    """FIFO of ``(due, data)`` chunks (None = EOF) bounded in bytes by ``limit()``."""

    def __init__(self, limit) -> None:
        self.items, self.size, self.limit = collections.deque(), 0, limit
        self.not_empty, self.not_full = asyncio.Event(), asyncio.Event()

    async def put(self, item) -> None:
        while self.size >= self.limit():
            self.not_full.clear()
            await self.not_full.wait()
        self.items.append(item)
        self.size += len(item[1]) if item else 0
        self.not_empty.set()

    async def get(self):
        while not self.items:
            self.not_empty.clear()
            await self.not_empty.wait()
        item = self.items.popleft()
        self.size -= len(item[1]) if item else 0
        self.not_full.set()
        return item


class _Conn:
    """One forwarded connection: client socket, target socket, pump tasks."""

    def __init__(self, port: int, csock: socket.socket) -> None:
        self.port, self.csock = port, csock
        self.tsock: socket.socket | None = None
        self.task: asyncio.Task | None = None
        self.pumps: list[asyncio.Task] = []
        self.closed = asyncio.Event()
        self.dropped = False

    def close(self, abort: bool) -> None:
        if not self.closed.is_set():
            for sock in filter(None, (self.csock, self.tsock)):
                _close(sock, rst=abort)
            self.closed.set()


class Link:
    """A TCP forwarder simulating a WAN link; all public methods are thread-safe."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._routes: dict[int, dict] = {}     # port -> {"target", "sock", "task"}
        self._conns: set[_Conn] = set()
        self._cut = False
        self._bandwidth_mbps: float | None = None
        self._latency_ms: float | None = None
        self._buckets = {"ab": _Bucket(), "ba": _Bucket()}
        self._bytes = {"ab": 0, "ba": 0}

    # ---- lifecycle -------------------------------------------------------
    def start(self) -> None:
        """Start the loop thread (no-op if running)."""
        if self._thread is not None and self._thread.is_alive():
            return
        loop = self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=f"link-{self.name}", daemon=True)
        self._thread.start()
        self._call(lambda: [b.reset(b.rate, loop.time()) for b in self._buckets.values()])

    def stop(self, timeout: float = CALL_TIMEOUT) -> None:
        """Close all routes and connections, stop the loop and join the thread."""
        thread, loop = self._thread, self._loop
        if thread is not None and loop is not None and thread.is_alive():
            try:
                self._call(self._shutdown)
            except Exception:  # noqa: BLE001 - stop must always finish
                log.exception("link %s: unclean shutdown", self.name)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
        self._thread = self._loop = None

    def _call(self, fn):
        """Run ``fn()`` (sync or coroutine function) on the loop; return its result."""
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            raise RuntimeError(f"link {self.name} is not started")

        async def wrapper():
            res = fn()
            return await res if asyncio.iscoroutine(res) else res

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(CALL_TIMEOUT)

    async def _shutdown(self) -> None:
        for port in list(self._routes):
            await self._remove_route(port)
        await self._drop(list(self._conns))

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
        task = self._loop.create_task(self._accept_loop(port, sock, target))
        self._routes[port] = {"target": target, "sock": sock, "task": task}
        return port

    def remove_route(self, port: int) -> None:
        """Close the listener on ``port`` and its connections (KeyError if unknown)."""
        if not self._call(lambda: self._remove_route(port)):
            raise KeyError(port)

    async def _remove_route(self, port: int) -> bool:
        route = self._routes.pop(port, None)
        if route is None:
            return False
        route["task"].cancel()
        await asyncio.wait([route["task"]], timeout=DROP_TIMEOUT)
        route["sock"].close()
        await self._drop([c for c in self._conns if c.port == port])
        return True

    # ---- cut / shape / stats ---------------------------------------------
    def cut(self) -> None:
        """Drop (RST) every forwarded connection and refuse new ones until restore()."""
        def do():
            self._cut = True
            return self._drop(list(self._conns))
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
            for bucket in self._buckets.values():
                bucket.reset(rate, self._loop.time())
        self._call(do)

    def stats(self) -> dict:
        """Snapshot: name, cut, shaping, open connections, bytes per direction, routes."""
        return self._call(lambda: {
            "name": self.name, "cut": self._cut,
            "bandwidth_mbps": self._bandwidth_mbps, "latency_ms": self._latency_ms,
            "connections": len(self._conns),
            "bytes_ab": self._bytes["ab"], "bytes_ba": self._bytes["ba"],
            "routes": [{"port": p, "target": r["target"]} for p, r in sorted(self._routes.items())],
        })

    # ---- forwarding ------------------------------------------------------
    async def _drop(self, conns: list[_Conn]) -> None:
        """Abort ``conns`` and wait (bounded) until their sockets are closed."""
        for conn in conns:
            conn.dropped = True
            conn.task.cancel()
        if conns:
            await asyncio.wait([self._loop.create_task(c.closed.wait()) for c in conns],
                               timeout=DROP_TIMEOUT)

    async def _accept_loop(self, port: int, lsock: socket.socket, target) -> None:
        loop = self._loop
        while True:
            try:
                csock, _ = await loop.sock_accept(lsock)
            except OSError as exc:   # e.g. EMFILE: back off instead of spinning
                log.warning("link %s: accept on %d failed: %s", self.name, port, exc)
                await asyncio.sleep(0.1)
                continue
            if self._cut:
                _close(csock)
                continue
            conn = _Conn(port, csock)
            self._conns.add(conn)
            conn.task = loop.create_task(self._serve(conn, target))
            conn.task.add_done_callback(lambda task, c=conn: self._finish(c, task))

    async def _serve(self, conn: _Conn, target) -> bool:
        """Connect to the target and pump both ways; True if both ended with EOF."""
        loop = self._loop
        try:
            conn.tsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            for sock in (conn.csock, conn.tsock):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            async with asyncio.timeout(CALL_TIMEOUT):  # unlike wait_for (3.11), never swallows a cancel
                await loop.sock_connect(conn.tsock, target)
        except (OSError, TimeoutError) as exc:
            log.debug("link %s: connection to %s failed: %s", self.name, target, exc)
            return False
        if conn.dropped:   # belt and braces: cut() raced with the connect
            return False
        for src, dst, direction in ((conn.csock, conn.tsock, "ab"), (conn.tsock, conn.csock, "ba")):
            queue = _ChunkQueue(self._queue_limit)
            conn.pumps.append(loop.create_task(self._read(src, queue)))
            conn.pumps.append(loop.create_task(self._write(dst, queue, direction)))
        done, _ = await asyncio.wait(conn.pumps, return_when=asyncio.FIRST_EXCEPTION)
        return not any(t.exception() is not None for t in done)

    def _finish(self, conn: _Conn, task: asyncio.Task) -> None:
        """Done-callback of a connection task (also runs if cancelled before starting).

        Sockets are closed only once every pump has finished, so no fd stays
        registered with the selector; anything but a clean EOF both ways is an RST."""
        self._conns.discard(conn)
        graceful = not task.cancelled() and task.exception() is None and task.result()
        pending = [t for t in conn.pumps if not t.done()]

        def maybe_close(_=None) -> None:
            if all(t.done() for t in conn.pumps):
                for t in conn.pumps:   # mark pump errors (resets) as retrieved
                    t.cancelled() or t.exception()
                conn.close(abort=not graceful)
        for t in pending:
            t.cancel()
            t.add_done_callback(maybe_close)
        maybe_close()

    def _queue_limit(self) -> int:
        """Queue room: a base plus the bytes in flight at full rate during the latency."""
        inflight = (self._buckets["ab"].rate or 1e9) * (self._latency_ms or 0.0) / 1000.0
        return QUEUE_BYTES + int(min(MAX_INFLIGHT, inflight))

    async def _read(self, src: socket.socket, queue: _ChunkQueue) -> None:
        loop = self._loop
        while True:
            data = await loop.sock_recv(src, CHUNK)
            if not data:
                await queue.put(None)
                return
            await queue.put((loop.time() + (self._latency_ms or 0.0) / 1000.0, data))

    async def _write(self, dst: socket.socket, queue: _ChunkQueue, direction: str) -> None:
        loop, bucket = self._loop, self._buckets[direction]
        while True:
            item = await queue.get()
            if item is None:
                dst.shutdown(socket.SHUT_WR)
                return
            due, data = item
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            view, piece = memoryview(data), bucket.piece()
            for off in range(0, len(view), piece):
                part = view[off:off + piece]
                await bucket.take(len(part), loop.time())
                await loop.sock_sendall(dst, part)
                self._bytes[direction] += len(part)
