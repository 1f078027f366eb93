"""VPG-wide crash-consistent checkpoints, coordinated across the VRAs of the VPG's hosts.

The protocol (docs/FORMAT.md, "Checkpoint coordination"), run by the VPG's
leader, a protected VRA of the site::

    leader                      every participant VRA (the leader too)      its host
      │  barrier(k) ─────────────►  POST /barrier (VPG VMs on this host) ───►  hold writes,
      │                                                                      append MARKER k
      │  ◄──────── held / dirty ──                                          (≤ hold_ms)
      │  release(k) ─────────────►  POST /barrier/k/release ────────────────►  resume writes
      │  ◄──────── in_time ───────
      │  COMMIT k {valid, time, tag} in the leader's own stream
      ▼
  recovery VRA: all MARKER k seen → cut at that position; COMMIT k valid → Checkpoint k

A checkpoint is valid when every participant held its barrier, released it in
time, and had no VM of the VPG with dirty blocks (a bitmap sync in progress
means the replica is not crash-consistent yet). An invalid one still goes
through the stream (the markers keep the merge moving) but becomes no
checkpoint.
"""
from __future__ import annotations

import logging
import threading
import time

import requests

log = logging.getLogger("tidemark.vra.checkpoint")


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
        self.last: dict | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _post(self, url: str, path: str, body: dict | None = None) -> dict:
        r = requests.post(url + path, json=body or {}, timeout=5,
                          headers={"Authorization": f"Bearer {self.tokens.get(url, self.token)}"})
        r.raise_for_status()
        return r.json()

    def checkpoint(self, tag: str | None = None, hashes: bool = False,
                   hold_ms: int | None = None) -> dict:
        """Take one checkpoint now; its id, time, validity and (with ``hashes``) the source disk hashes."""
        with self._lock:
            k = max(self.last_id + 1, int(time.time() * 1000))
            self.last_id = k
            names = sorted(self.participants)
            body = {"checkpoint": k, "participants": names, "hold_ms": hold_ms or self.hold_ms,
                    "hashes": hashes}
            held, marked, valid, source_hashes, problems = [], [], True, {}, []
            t_cut = time.time()
            for name in names:
                try:
                    out = self._post(self.participants[name], f"/v1/protected/vpgs/{self.vpg}/barrier", body)
                    held.append(name)
                    if out.get("marker_seq") is None:
                        # The host holds the writes but no VRA is attached to take a marker
                        # (e.g. just restarted): this participant's stream has no cut.
                        valid = False
                        problems.append(f"{name}: no marker (VRA not attached to its host)")
                    else:
                        marked.append(name)
                    source_hashes.update(out.get("hashes") or {})
                    if any(out.get("dirty", {}).values()):
                        valid = False
                        problems.append(f"{name}: bitmap sync pending")
                except requests.RequestException as exc:
                    valid = False
                    problems.append(f"{name}: barrier failed: {exc}")
            for name in held:
                try:
                    out = self._post(self.participants[name],
                                     f"/v1/protected/vpgs/{self.vpg}/barrier/{k}/release")
                    if not out.get("in_time"):
                        valid = False
                        problems.append(f"{name}: barrier timed out")
                except requests.RequestException as exc:
                    valid = False
                    problems.append(f"{name}: release failed: {exc}")
            if len(marked) < len(names) and self.recovery_url:
                # Some participant wrote no marker: tell the recovery side not to wait for it.
                try:
                    self._post(self.recovery_url, f"/v1/recovery/vpgs/{self.vpg}/barriers/{k}/abort")
                except requests.RequestException as exc:
                    problems.append(f"abort of barrier {k} failed: {exc}")
            info = {"valid": valid, "time": t_cut, "tag": tag}
            self.commit(self.vpg, k, info)
            self.taken += 1
            self.invalid += 0 if valid else 1
            self.last = {"id": k, **info, "problems": problems, "hashes": source_hashes}
            if problems:
                log.info("VPG %s checkpoint %d not valid: %s", self.vpg, k, "; ".join(problems))
            return self.last

    def start(self):
        if self._thread is None and self.interval > 0:
            self._thread = threading.Thread(target=self._loop, name=f"checkpoints-{self.vpg}",
                                            daemon=True)
            self._thread.start()

    def _loop(self):
        while not self._stop.wait(self.interval):
            try:
                self.checkpoint()
            except Exception as exc:   # keep taking checkpoints; the next one may work
                log.warning("VPG %s: checkpoint failed: %s", self.vpg, exc)

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
