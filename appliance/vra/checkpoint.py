"""VPG-wide crash-consistent checkpoints, coordinated across the VRAs of the VPG's hosts.

The protocol (docs/FORMAT.md, "Checkpoint coordination"), run by the VPG's
leader, a protected VRA of the site::

    leader                      every participant VRA (the leader too)      its host
      │  barrier(k) ══ all at once ═►  POST /barrier (VPG VMs on this host) ─►  hold writes,
      │                                                                      append MARKER k
      │  ◄──────── held / dirty ──  (wait for every answer)                  (≤ hold_ms)
      │  release(k) ══ all at once ═►  POST /barrier/k/release ─────────────►  resume writes
      │  ◄──────── in_time ───────
      │  COMMIT k {valid, time, tag} in the leader's own stream
      ▼
  recovery VRA: all MARKER k seen → cut at that position; COMMIT k valid → Checkpoint k

A checkpoint is valid when every participant held its barrier, released it in
time, and had no VM of the VPG with dirty blocks (a bitmap sync in progress
means the replica is not crash-consistent yet). An invalid one still goes
through the stream (the markers keep the merge moving) but becomes no
checkpoint.

The barrier calls go to all participants at once, and the releases only once
every barrier call has answered (or failed). Every hold must span one common
moment, the last barrier's answer (``t_held``). A host's hold does when its
release came in time (``in_time``), or when ``t_held`` came before
``t0 + hold`` (``t0``: when the barrier calls went out; the host started its
hold timer after it), so its timer had not yet run out: measured on the
leader's clock alone. A host whose hold ran out before either makes the
checkpoint invalid. Each participant has a keep-alive HTTP session, so a step
costs one request on an open connection, not a TCP handshake.

After an invalid checkpoint the loop tries again sooner (``RETRY_FIRST_S``,
doubling up to ``interval``), so RPO recovers within a fraction of the
interval once the cause is gone; a lasting cause costs a few extra holds, each
still at most ``hold_ms``.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

log = logging.getLogger("tidemark.vra.checkpoint")

RETRY_FIRST_S = 0.25          # first retry after an invalid checkpoint; doubles up to the interval
TIMEOUT = (2.0, 5.0)          # (connect, read) seconds of a coordination call
HOST_MAX_HOLD_MS = 1000       # a host holds at most this long whatever hold_ms asks
MAX_PENDING_ABORTS = 8        # barrier aborts queued for the recovery VRA at most


class Coordinator:
    """Takes checkpoints of one VPG: ``checkpoint()`` once, or every ``interval`` seconds."""

    def __init__(self, vpg: str, participants: dict[str, str], token: str, commit,
                 interval: float = 5.0, hold_ms: int = 50, recovery_url: str | None = None,
                 recovery_token: str | None = None):
        self.vpg = vpg
        self.token = token
        # VRA name -> control URL; a participant given as {url, token} has a token of its own
        self.participants: dict[str, str] = {}
        self.tokens: dict[str, str] = {}         # control URL -> its bearer token
        for name, p in participants.items():
            url = p["url"] if isinstance(p, dict) else p
            self.participants[name] = url
            if isinstance(p, dict) and p.get("token"):
                self.tokens[url] = p["token"]
        if recovery_url and recovery_token:
            self.tokens[recovery_url] = recovery_token
        self.commit = commit                     # callable(vpg, k, info): the leader's COMMIT
        self.interval = interval
        self.hold_ms = hold_ms
        self.recovery_url = recovery_url         # to abort a barrier that cannot complete
        self.last_id = 0
        self.taken = 0
        self.invalid = 0
        self.failed_in_row = 0                   # invalid checkpoints since the last valid one
        self.last: dict | None = None
        self._sessions: dict[str, requests.Session] = {}                  # control URL -> keep-alive
        for url in self.participants.values():
            self._session(url)
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.participants)),
                                        thread_name_prefix=f"barrier-{vpg}")
        # aborts of barriers at the recovery VRA, off the checkpoint path (own keep-alive session:
        # a requests.Session is not shared between threads that use it at once)
        self._abort_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"abort-{vpg}")
        self._abort_session = requests.Session()
        if recovery_url:
            self._abort_session.headers["Authorization"] = \
                f"Bearer {self.tokens.get(recovery_url, self.token)}"
        self._lock_aborts = threading.Lock()
        self._aborts_pending = 0
        self.aborted = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _session(self, url: str) -> requests.Session:
        s = self._sessions.get(url)
        if s is None:
            s = self._sessions[url] = requests.Session()
            s.headers["Authorization"] = f"Bearer {self.tokens.get(url, self.token)}"
        return s

    def _post(self, url: str, path: str, body: dict | None = None) -> tuple[dict, float]:
        """POST on the participant's keep-alive session: (answer, round trip in ms)."""
        t0 = time.perf_counter()
        r = self._session(url).post(url + path, json=body or {}, timeout=TIMEOUT)
        r.raise_for_status()
        return r.json(), (time.perf_counter() - t0) * 1000

    def _call_all(self, names: list[str], path_of, body: dict | None = None) -> dict:
        """One call per participant, all at once: name -> (answer, ms) or the exception."""
        futs = {n: self._pool.submit(self._post, self.participants[n], path_of(n), body) for n in names}
        out = {}
        for n, f in futs.items():
            try:
                out[n] = f.result()
            except requests.RequestException as exc:
                out[n] = exc
        return out

    def checkpoint(self, tag: str | None = None, hashes: bool = False,
                   hold_ms: int | None = None) -> dict:
        """Take one checkpoint now; its id, time, validity and (with ``hashes``) the source disk hashes."""
        with self._lock:
            k = max(self.last_id + 1, int(time.time() * 1000))
            self.last_id = k
            names = sorted(self.participants)
            body = {"checkpoint": k, "participants": names, "hold_ms": hold_ms or self.hold_ms,
                    "hashes": hashes}
            held, valid, source_hashes, problems = [], True, {}, []
            timing: dict = {"barrier_ms": {}, "host_barrier_ms": {}, "release_ms": {},
                            "host_release_ms": {}}
            hold_s = min(body["hold_ms"], HOST_MAX_HOLD_MS) / 1000
            t_cut = time.time()
            t0 = time.perf_counter()
            barriers = self._call_all(names, lambda n: f"/v1/protected/vpgs/{self.vpg}/barrier", body)
            t_held = time.perf_counter()
            # Every host started its hold timer after t0 (when the calls went out) and took its
            # barrier before its answer came, so a host holds at least over [its answer,
            # t0 + hold]: if the last answer came before t0 + hold, every hold spans t_held.
            timer_covers = t_held < t0 + hold_s
            for name in names:
                res = barriers[name]
                if isinstance(res, Exception):
                    valid = False
                    problems.append(f"{name}: barrier failed: {res}")
                    continue
                out, ms = res
                held.append(name)
                timing["barrier_ms"][name] = round(ms, 2)
                if out.get("host_ms") is not None:
                    timing["host_barrier_ms"][name] = out["host_ms"]
                if out.get("marker_seq") is None:
                    # The host holds the writes but no VRA is attached to take a marker
                    # (e.g. just restarted): this participant's stream has no cut.
                    valid = False
                    problems.append(f"{name}: no marker (VRA not attached to its host)")
                source_hashes.update(out.get("hashes") or {})
                dirty = {k: v for k, v in (out.get("dirty") or {}).items() if v}
                if dirty:
                    valid = False
                    problems.append(f"{name}: cut not consistent: " + ", ".join(
                        "a delta sync running" if k == "delta-sync" else
                        f"VM {k}: {v} dirty blocks (bitmap sync pending)" for k, v in dirty.items()))
            # Releases only after every barrier answered: all holds overlap at this moment.
            releases = self._call_all(held, lambda n: f"/v1/protected/vpgs/{self.vpg}/barrier/{k}/release")
            t_end = time.perf_counter()
            for name in held:
                res = releases[name]
                if isinstance(res, Exception):
                    valid = False
                    problems.append(f"{name}: release failed: {res}")
                    continue
                out, ms = res
                timing["release_ms"][name] = round(ms, 2)
                if out.get("host_ms") is not None:
                    timing["host_release_ms"][name] = out["host_ms"]
                if not out.get("in_time") and not timer_covers:
                    valid = False
                    problems.append(f"{name}: barrier timed out (held > {body['hold_ms']} ms; "
                                    f"barrier {timing['barrier_ms'].get(name)} ms, release {round(ms, 2)} ms)")
            timing["all_held_ms"] = round((t_held - t0) * 1000, 2)      # first barrier sent .. last answered
            timing["timer_covers"] = timer_covers
            timing["span_ms"] = round((t_end - t0) * 1000, 2)          # .. last release answered
            if not valid and self.recovery_url:
                # Some participant wrote no marker, or the cut is not consistent: tell the
                # recovery side not to wait for barrier k (its streams would hold each other
                # up for a cut that is no checkpoint). In the background: a slow recovery VRA
                # must not delay the commit or the next checkpoint.
                self._abort(k)
            info = {"valid": valid, "time": t_cut, "tag": tag}
            # A valid COMMIT follows the leader's own MARKER k in its stream (the commit waits
            # for it). An invalid one makes no checkpoint wherever it lands, so it does not wait:
            # when the leader's host wrote no marker, waiting would stall the next checkpoint.
            self.commit(self.vpg, k, info, **({} if valid else {"timeout": 0.0}))
            self.taken += 1
            self.invalid += 0 if valid else 1
            self.failed_in_row = 0 if valid else self.failed_in_row + 1
            self.last = {"id": k, **info, "problems": problems, "hashes": source_hashes,
                         "timing": timing}
            if problems:
                log.info("VPG %s checkpoint %d not valid: %s", self.vpg, k, "; ".join(problems))
            return self.last

    def _abort(self, k: int):
        """Ask the recovery VRA to abandon barrier k, in the background (at most a few queued)."""
        with self._lock_aborts:
            if self._aborts_pending >= MAX_PENDING_ABORTS:
                log.warning("VPG %s: barrier %d not aborted at the recovery VRA (%d aborts pending)",
                            self.vpg, k, self._aborts_pending)
                return
            self._aborts_pending += 1

        def run():
            try:
                url = self.recovery_url
                r = self._abort_session.post(f"{url}/v1/recovery/vpgs/{self.vpg}/barriers/{k}/abort",
                                             json={}, timeout=TIMEOUT)
                r.raise_for_status()
                self.aborted += 1
            except requests.RequestException as exc:
                log.warning("VPG %s: abort of barrier %d at the recovery VRA failed: %s",
                            self.vpg, k, exc)
            finally:
                with self._lock_aborts:
                    self._aborts_pending -= 1
        try:
            self._abort_pool.submit(run)
        except RuntimeError:          # stopped
            with self._lock_aborts:
                self._aborts_pending -= 1

    def next_wait(self) -> float:
        """Seconds until the loop's next checkpoint: the interval, sooner after invalid ones."""
        if self.failed_in_row == 0:
            return self.interval
        return min(self.interval, RETRY_FIRST_S * 2 ** (self.failed_in_row - 1))

    def start(self):
        if self._thread is None and self.interval > 0:
            self._thread = threading.Thread(target=self._loop, name=f"checkpoints-{self.vpg}",
                                            daemon=True)
            self._thread.start()

    def _loop(self):
        while not self._stop.wait(self.next_wait()):
            try:
                self.checkpoint()
            except Exception as exc:   # keep taking checkpoints; the next one may work
                self.failed_in_row += 1
                log.warning("VPG %s: checkpoint failed: %s", self.vpg, exc)

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self._pool.shutdown(wait=False)
        self._abort_pool.shutdown(wait=False)
        self._abort_session.close()
        for s in list(self._sessions.values()):
            s.close()
