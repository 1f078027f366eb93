"""The ZVM service object: the store, auth, events, alerts, tasks, the hypervisor connection and
the background jobs of one site's management server. Views and the CLI call its domain
services; nothing here knows about HTTP.

Background work follows the house pattern: a public synchronous method (``sync_inventory()``,
``monitor()``) plus a thin loop (``Jobs``) that calls it, so tests call the method directly and
run with the loops off (``background=False``).
"""
from __future__ import annotations

import logging
import threading
import time
import uuid

from .auth import Auth
from .config import ZVMConfig
from .events import Alerts, Events
from .store import Store
from .tasks import Tasks

log = logging.getLogger("tidemark.zvm")
VERSION = "0.1.0"
API_VERSION = "1.0"


class Jobs:
    """Thin loops around public synchronous methods."""

    def __init__(self):
        self._jobs: list[tuple[str, float, callable]] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.errors: dict[str, str] = {}

    def add(self, name: str, interval_s: float, fn) -> None:
        self._jobs.append((name, interval_s, fn))
        if self._threads:            # already running: start this one too
            self._spawn(name, interval_s, fn)

    def start(self) -> None:
        for name, interval, fn in self._jobs:
            self._spawn(name, interval, fn)

    def _spawn(self, name, interval, fn):
        def loop():
            while not self._stop.is_set():
                try:
                    fn()
                    self.errors.pop(name, None)
                except Exception as exc:   # noqa: BLE001 - a loop survives a failed pass
                    if self.errors.get(name) != str(exc):
                        log.warning("job %s failed: %s", name, exc)
                    self.errors[name] = str(exc)
                self._stop.wait(interval)
        th = threading.Thread(target=loop, name=f"job-{name}", daemon=True)
        th.start()
        self._threads.append(th)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for th in self._threads:
            th.join(timeout)


class ZVM:
    def __init__(self, cfg: ZVMConfig, *, background: bool = True):
        self.cfg = cfg
        self.store = Store(cfg.db_path)
        self.auth = Auth(self.store, cfg.token_ttl_s)
        self.site_id = self.store.meta("site_id")
        if not self.site_id:
            self.site_id = cfg.site_id or str(uuid.uuid4())
            self.store.set_meta("site_id", self.site_id)
        self.started = time.time()
        self.events = Events(self.store, self.site_link)
        self.alerts = Alerts(self.store, self.events, self.site_link)
        self.tasks = Tasks(self, self.store)
        self.jobs = Jobs()
        self.metrics: list = []          # callables returning Prometheus text lines
        self._hv = None
        self._hv_lock = threading.Lock()
        self.background = background
        self.services: dict[str, object] = {}     # domain services by area (sites, vras, vpgs...)

    # -- identity
    def site_link(self) -> dict:
        return {"rel": "self", "href": "/v1/localsite", "type": "LocalSiteApi",
                "identifier": self.site_id}

    @property
    def hypervisor(self):
        """The hypervisor manager of this site (docs/zvm-hypervisors.md), connected on first use."""
        with self._hv_lock:
            if self._hv is None:
                from .hypervisor import connect
                settings = dict(self.cfg.hypervisor)
                self._hv = connect(settings.pop("kind"), **settings)
            return self._hv

    # -- life cycle
    def start(self) -> None:
        for svc in self.services.values():
            hook = getattr(svc, "on_start", None)
            if hook:
                hook()
        self.events.record("ZvmStarted", f"ZVM of site {self.cfg.site_name} started",
                           entity="Site")
        if self.background:
            self.jobs.start()
            self.tasks.resume()

    def stop(self) -> None:
        self.jobs.stop()
        self.tasks.stop()
        self.store.close()
