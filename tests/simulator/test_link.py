"""Tests for simulator.link: a TCP forwarder simulating the WAN link between sites.

Real sockets on loopback; test servers run in threads; every wait is bounded.
"""
from __future__ import annotations

import hashlib
import os
import queue
import socket
import statistics
import threading
import time

import pytest

from simulator.link import Link
from waiting import wait_until

pytestmark = pytest.mark.timeout(120)

IO_TIMEOUT = 15.0
MB = 1_000_000


class Server:
    """Threaded TCP server on 127.0.0.1; ``handler(conn, server)`` runs per connection."""

    def __init__(self, handler):
        self.handler = handler
        self.results: queue.Queue = queue.Queue()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.conns: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(IO_TIMEOUT)
            self.conns.append(conn)
            t = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _run(self, conn):
        try:
            self.handler(conn, self)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self.threads:
            t.join(5)
        assert not self.thread.is_alive()
        assert not any(t.is_alive() for t in self.threads)


def echo_handler(conn, server):
    buf = memoryview(bytearray(256 * 1024))
    while n := conn.recv_into(buf):
        conn.sendall(buf[:n])
    conn.shutdown(socket.SHUT_WR)


def sink_handler(conn, server):
    """Count bytes until EOF; report (bytes, first_byte_time, last_byte_time)."""
    buf = memoryview(bytearray(256 * 1024))
    total, first, last = 0, None, None
    while n := conn.recv_into(buf):
        last = time.monotonic()
        if first is None:
            first, total = last, -n   # rate counts bytes after the first chunk
        total += n
    server.results.put((total, first, last))


@pytest.fixture
def echo():
    server = Server(echo_handler)
    yield server
    server.close()


@pytest.fixture
def sink():
    server = Server(sink_handler)
    yield server
    server.close()


@pytest.fixture
def link():
    lk = Link("a-b")
    lk.start()
    yield lk
    lk.stop()
    assert not [t for t in threading.enumerate() if t.name == "link-a-b"]


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return data


def send_stream(sock: socket.socket, payload, chunk: int = 1 << 20) -> threading.Thread:
    """Send ``payload`` then half-close, in a background thread."""
    def run():
        view = memoryview(payload)
        try:
            for off in range(0, len(view), chunk):
                sock.sendall(view[off:off + chunk])
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def is_broken(sock: socket.socket, timeout: float = 1.0) -> bool:
    """True if the peer closed or reset ``sock`` within ``timeout``."""
    sock.settimeout(timeout)
    try:
        sock.sendall(b"ping")
        return sock.recv(16) == b""
    except (ConnectionError, OSError) as exc:
        return not isinstance(exc, socket.timeout)


def sink_rate(link: Link, sink: Server, nbytes: int, conns: int = 1) -> float:
    """Send ``nbytes`` over each of ``conns`` connections; return total MB/s at the sink."""
    port = link.add_route("127.0.0.1", sink.port)
    socks = [connect(port) for _ in range(conns)]
    payload = bytes(nbytes)
    senders = [send_stream(s, payload) for s in socks]
    results = [sink.results.get(timeout=IO_TIMEOUT * 2) for _ in socks]
    for t, s in zip(senders, socks):
        t.join(IO_TIMEOUT)
        s.close()
    total = sum(r[0] for r in results)
    span = max(r[2] for r in results) - min(r[1] for r in results)
    return total / span / MB


def test_data_passes_both_ways_intact(link, echo):
    port = link.add_route("127.0.0.1", echo.port)
    payload = os.urandom(50 * MB)
    sock = connect(port)
    start = time.monotonic()
    sender = send_stream(sock, payload)
    digest, received = hashlib.sha256(), 0
    buf = memoryview(bytearray(256 * 1024))
    while n := sock.recv_into(buf):
        digest.update(buf[:n])
        received += n
    elapsed = time.monotonic() - start
    sender.join(IO_TIMEOUT)
    sock.close()
    print(f"echo 50 MB through link: {received / elapsed / MB:.0f} MB/s each way")
    assert received == len(payload)
    assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        st = link.stats()
        if st["connections"] == 0 and st["bytes_ba"] == len(payload):
            break
        time.sleep(0.02)
    assert st["bytes_ab"] == st["bytes_ba"] == len(payload)
    assert st["connections"] == 0


def test_unshaped_throughput(link, sink):
    rate = sink_rate(link, sink, 200 * MB)
    print(f"unshaped one-way: {rate:.0f} MB/s")
    assert rate > 50    # loose floor (a busy machine); typically several hundred MB/s


def test_routes_idempotent_stats_and_remove(link, echo, sink):
    p1 = link.add_route("127.0.0.1", echo.port)
    assert link.add_route("127.0.0.1", echo.port) == p1
    p2 = link.add_route("127.0.0.1", sink.port)
    assert p2 != p1
    st = link.stats()
    assert st["name"] == "a-b" and st["cut"] is False
    assert st["bandwidth_mbps"] is None and st["latency_ms"] is None
    assert {r["port"] for r in st["routes"]} == {p1, p2}
    assert {"port": p1, "target": ("127.0.0.1", echo.port)} in st["routes"]
    sock = connect(p1)
    sock.sendall(b"hello")
    assert recv_exact(sock, 5) == b"hello"
    assert link.stats()["connections"] == 1
    link.remove_route(p1)
    assert [r["port"] for r in link.stats()["routes"]] == [p2]
    assert is_broken(sock)
    sock.close()
    with pytest.raises(OSError):
        connect(p1).close()
    with pytest.raises(KeyError):
        link.remove_route(p1)


def test_cut_and_restore(link, echo):
    port = link.add_route("127.0.0.1", echo.port)
    sock = connect(port)
    sock.sendall(b"before")
    assert recv_exact(sock, 6) == b"before"
    # a reader blocked on the connection must see it break promptly
    outcome: queue.Queue = queue.Queue()

    def reader():
        try:
            outcome.put(sock.recv(16))
        except OSError as exc:
            outcome.put(exc)
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    time.sleep(0.1)
    start = time.monotonic()
    link.cut()
    result = outcome.get(timeout=2)
    assert time.monotonic() - start < 1.0
    assert result == b"" or isinstance(result, ConnectionError), result
    t.join(2)
    sock.close()
    st = link.stats()
    assert st["cut"] is True and st["connections"] == 0
    # new connections are refused or closed while cut
    for _ in range(3):
        try:
            s = connect(port)
        except OSError:
            continue
        assert is_broken(s)
        s.close()
    link.restore()
    assert link.stats()["cut"] is False
    sock = connect(port)
    sock.sendall(b"after")
    assert recv_exact(sock, 5) == b"after"
    sock.close()


# A shaped link never goes faster than its limit (+15%); it may go slower when the machine is
# busy and the forwarder's threads wait for a CPU.
MIN_SHAPED = 14.0


def test_bandwidth_limit(link, sink):
    link.shape(bandwidth_mbps=20, latency_ms=None)
    assert link.stats()["bandwidth_mbps"] == 20
    rate = sink_rate(link, sink, 40 * MB)
    assert MIN_SHAPED <= rate <= 23.0, rate


def test_bandwidth_limit_return_direction(link, echo):
    """Echo: both directions shaped at 20 MB/s, measured on the way back."""
    link.shape(bandwidth_mbps=20)
    sock = connect(link.add_route("127.0.0.1", echo.port))
    sender = send_stream(sock, bytes(40 * MB))
    buf = memoryview(bytearray(256 * 1024))
    first = sock.recv_into(buf)
    start, total = time.monotonic(), 0
    while n := sock.recv_into(buf):
        total += n
    rate = total / (time.monotonic() - start) / MB
    sender.join(IO_TIMEOUT)
    sock.close()
    assert first > 0 and MIN_SHAPED <= rate <= 23.0, rate


def test_bandwidth_shared_by_connections(link, sink):
    link.shape(bandwidth_mbps=20)
    rate = sink_rate(link, sink, 20 * MB, conns=2)
    assert MIN_SHAPED <= rate <= 23.0, rate


def test_latency_does_not_reduce_bandwidth(link, sink):
    link.shape(bandwidth_mbps=20, latency_ms=50)
    rate = sink_rate(link, sink, 40 * MB)
    assert MIN_SHAPED <= rate <= 23.0, rate


def rtts(port: int, count: int = 7) -> list[float]:
    sock = connect(port)
    out = []
    for i in range(count):
        msg = f"ping{i:04d}".encode()
        start = time.monotonic()
        sock.sendall(msg)
        assert recv_exact(sock, len(msg)) == msg
        out.append(time.monotonic() - start)
    sock.close()
    return out


def test_latency_adds_to_round_trip(link, echo):
    port = link.add_route("127.0.0.1", echo.port)
    assert statistics.median(rtts(port)) < 0.05
    link.shape(bandwidth_mbps=None, latency_ms=50)
    assert link.stats()["latency_ms"] == 50
    samples = rtts(port)
    assert min(samples) >= 0.09, samples                 # the latency is always added
    assert statistics.median(samples) <= 0.2 and max(samples) < 1.0, samples
    link.shape(None, None)
    assert statistics.median(rtts(port)) < 0.05


def test_stop_closes_everything(echo):
    lk = Link("stopme")
    lk.start()
    port = lk.add_route("127.0.0.1", echo.port)
    sock = connect(port)
    sock.sendall(b"x")
    assert recv_exact(sock, 1) == b"x"
    thread = next(t for t in threading.enumerate() if t.name == "link-stopme")
    start = time.monotonic()
    lk.stop()
    assert time.monotonic() - start < 5
    assert not thread.is_alive()
    assert is_broken(sock)
    sock.close()
    with pytest.raises(OSError):
        connect(port).close()
    lk.stop()  # idempotent
    with pytest.raises(RuntimeError):
        lk.add_route("127.0.0.1", echo.port)


def test_unreachable_target_closes_client(link):
    dead = socket.create_server(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    port = link.add_route("127.0.0.1", dead_port)
    try:
        sock = connect(port)
    except ConnectionError:
        pass   # the RST may already arrive while connect() waits
    else:
        assert is_broken(sock, timeout=2.0)
        sock.close()
    assert link.stats()["connections"] == 0


def test_cut_during_connection_storm(link, echo):
    """Cut while clients keep connecting: returns fast and leaves nothing open."""
    port = link.add_route("127.0.0.1", echo.port)
    stop = threading.Event()
    socks: list[socket.socket] = []

    def storm():
        while not stop.is_set() and len(socks) < 150:
            try:
                socks.append(connect(port))
            except OSError:
                pass
    threads = [threading.Thread(target=storm, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    start = time.monotonic()
    open_before = link.stats()["connections"]
    link.cut()
    elapsed = time.monotonic() - start
    stop.set()
    print(f"cut of {open_before} connections took {elapsed * 1000:.0f} ms")
    assert open_before > 0 and elapsed < 3.0   # generous: ~150 busy threads here
    for t in threads:
        t.join(5)
    wait_until(lambda: link.stats()["connections"] == 0, 10, what="the cut connections to close")
    for s in socks:
        assert is_broken(s, timeout=2.0)
        s.close()
    link.restore()
    s = connect(port)
    s.sendall(b"ok")
    assert recv_exact(s, 2) == b"ok"
    s.close()
