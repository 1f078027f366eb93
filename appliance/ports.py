"""Listening ports for services started later: VRAs, ZVMs, simulated hosts."""
from __future__ import annotations

import secrets
import socket


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (32768 where it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str, taken: set[int] = frozenset()) -> int:
    """A TCP port on ``host`` that nothing is bound to now, for a service to listen on once it
    has started, and again after a restart. Taken below the kernel's ephemeral range: any
    outgoing connection made meanwhile gets its local port from that range, and one that got
    this port (a keep-alive session lives long) made the service's bind fail with "address in
    use". ``taken``: ports handed out already (services not started yet). The ephemeral range
    itself if nothing below is free."""
    low = _ephemeral_low()
    rnd = secrets.SystemRandom()
    for _ in range(200):
        port = rnd.randrange(max(1024, low // 2), low)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
