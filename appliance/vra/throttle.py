"""Bandwidth limit for replication, shared by the VPGs of a VRA by priority.

A limit (MB/s, 1 MB = 10^6 bytes), optionally only inside a daily time window
(``"22:00-06:00"``, local time; outside it the link is not limited). VPGs share
it by priority weight (High 3, Medium 2, Low 1) with start-time fair queueing:
each batch gets a tag ``max(virtual clock, the VPG's last tag) + bytes/weight``
and the lowest tag goes next, so a busy High VPG gets three times the bandwidth
of a busy Low one, and bandwidth an idle VPG does not use goes to the others.
"""
from __future__ import annotations

import datetime
import threading
import time

PRIORITY_WEIGHTS = {"High": 3, "Medium": 2, "Low": 1}


def parse_window(window: str | None) -> tuple[int, int] | None:
    """``"HH:MM-HH:MM"`` as minutes of the day (start, end); None for always."""
    if not window:
        return None
    try:
        a, b = window.split("-")
        start = [int(x) for x in a.split(":")]
        end = [int(x) for x in b.split(":")]
        s, e = start[0] * 60 + start[1], end[0] * 60 + end[1]
    except (ValueError, IndexError) as exc:
        raise ValueError(f"a time window looks like 22:00-06:00, not {window!r}") from exc
    if not (0 <= s < 1440 and 0 <= e < 1440):
        raise ValueError(f"time window {window!r} is outside 00:00-23:59")
    return s, e


class Throttle:
    def __init__(self, mbps: float | None = None, window: str | None = None, clock=None):
        self.cond = threading.Condition()
        self.clock = clock or (lambda: datetime.datetime.now().time())
        self.set(mbps, window)
        self.next_free = 0.0
        self.vclock = 0.0
        self.last_tag: dict[str, float] = {}
        self.waiting: list[list] = []
        self.granted: dict[str, int] = {}

    def set(self, mbps: float | None, window: str | None = None):
        if mbps is not None and mbps <= 0:
            raise ValueError("a bandwidth limit must be positive (or none)")
        with self.cond:
            self.rate = None if mbps is None else mbps * 1e6
            self.window = parse_window(window)
            self.cond.notify_all()

    def active(self) -> bool:
        """Is the limit in force now?"""
        if self.rate is None:
            return False
        if self.window is None:
            return True
        t = self.clock()
        m = t.hour * 60 + t.minute
        s, e = self.window
        return s <= m < e if s <= e else (m >= s or m < e)

    def acquire(self, key: str, nbytes: int, weight: float = 2, stop: threading.Event | None = None):
        """Wait until ``key`` may send ``nbytes``."""
        with self.cond:
            tag = max(self.vclock, self.last_tag.get(key, 0.0)) + nbytes / max(weight, 0.001)
            self.last_tag[key] = tag
            req = [tag, key, nbytes]
            self.waiting.append(req)
            try:
                while not (stop and stop.is_set()):
                    now = time.monotonic()
                    if not self.active():
                        break
                    first = min(self.waiting)
                    if first is req and now >= self.next_free:
                        self.next_free = max(now, self.next_free) + nbytes / self.rate
                        self.vclock = tag
                        break
                    self.cond.wait(max(0.001, min(0.05, self.next_free - now)))
            finally:
                self.waiting.remove(req)
                self.granted[key] = self.granted.get(key, 0) + nbytes
                self.cond.notify_all()

    def status(self) -> dict:
        return {"bandwidth_mbps": None if self.rate is None else self.rate / 1e6,
                "window": None if self.window is None else "%02d:%02d-%02d:%02d" % (
                    self.window[0] // 60, self.window[0] % 60, self.window[1] // 60,
                    self.window[1] % 60),
                "active": self.active(), "granted_bytes": dict(self.granted)}
