"""Tasks: every multi-step operation is a persisted state machine.

An ``Operation`` subclass lists its ``steps`` (and the ``rollback_steps`` that undo them); the
task document in the store records the phase, the index of the step in progress, the
operation's own data and a history of steps with their times. The runner persists the index
*before* a step runs, so a restart of the ZVM re-runs the step that was in progress: every
step is idempotent (it checks what is already done). ``Tasks.resume()`` at start-up picks up
every task that was in progress or waiting for the user.

    submit ──> forward steps ──────────────────────────────> Completed (6)
                  │  a step raises, or returns ROLLBACK        
                  └──> rollback steps ──> Failed (4) (or Stopped (5) when the user asked)
                  │  a step calls wait_for(...)
                  └──> WaitingForUserInput (2) ── signal / deadline ──> next step

Task states on the wire (``Status.State``): 1 InProgress, 2 WaitingForUserInput, 3 Paused,
4 Failed, 5 Stopped, 6 Completed, 7 Cancelling.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
import traceback

from .errors import Conflict, NotFound, ZVMError
from .events import _iso

log = logging.getLogger("tidemark.zvm.tasks")

IN_PROGRESS, WAITING, PAUSED, FAILED, STOPPED, COMPLETED, CANCELLING = 1, 2, 3, 4, 5, 6, 7
STATE_NAMES = {1: "InProgress", 2: "WaitingForUserInput", 3: "Paused", 4: "Failed",
               5: "Stopped", 6: "Completed", 7: "Cancelling"}
ACTIVE = (IN_PROGRESS, WAITING, PAUSED, CANCELLING)
ROLLBACK = object()          # a step returns this to switch to the rollback steps
OPERATIONS: dict[str, type["Operation"]] = {}


def operation(cls):
    """Register an Operation subclass under its ``type``."""
    OPERATIONS[cls.type] = cls
    return cls


class StepFailed(ZVMError):
    """A step of the operation failed."""
    status, title = 409, "Operation failed"


class Operation:
    type = "Operation"
    steps: tuple[str, ...] = ()
    rollback_steps: tuple[str, ...] = ()
    exclusive = True            # one exclusive operation per VPG at a time
    cancellable = False

    def __init__(self, zvm, tasks: "Tasks", task: dict):
        self.zvm, self.tasks, self.task = zvm, tasks, task

    # -- for steps
    @property
    def data(self) -> dict:
        return self.task["data"]

    @property
    def params(self) -> dict:
        return self.task["params"]

    def save(self) -> None:
        t = self.task
        if t.get("state") == WAITING:
            # saved while waiting (a ``poll`` of wait_for): a signal stored since this task read
            # its document must survive the save
            with self.tasks.store.transaction():
                stored = self.tasks.store.get("tasks", t["identifier"])
                if stored and stored.get("signal"):
                    t["signal"] = stored["signal"]
                self.tasks.save(t)
            return
        self.tasks.save(t)

    def note(self, text: str) -> None:
        """Add a line to the current step's record (reports show it)."""
        self.task["history"][-1].setdefault("notes", []).append(text)
        self.save()

    def wait_for(self, signals: tuple[str, ...], timeout_s: float | None,
                 default: str | None = None, poll=None, poll_s: float = 1.0) -> tuple[str, dict]:
        """Wait for the user: a signal (``Tasks.signal``) or, after ``timeout_s``, ``default``.
        The deadline is persisted, so a restart keeps waiting for the same time. ``poll()``, if
        given, runs every ``poll_s`` seconds meanwhile (work the operation can do while it
        waits) until it returns True; an exception of it is logged and it runs again later."""
        t = self.task
        if t.get("deadline") is None and timeout_s is not None:
            t["deadline"] = time.time() + timeout_s
        t["waitingFor"] = list(signals)
        t["state"] = WAITING
        self.save()
        next_poll = time.monotonic() if poll else None
        try:
            while True:
                doc = self.tasks.store.get("tasks", t["identifier"])
                sig = (doc or {}).get("signal")
                if sig and sig["name"] in signals:
                    return sig["name"], sig.get("params", {})
                if t.get("deadline") is not None and time.time() >= t["deadline"] and default:
                    return default, {}
                if next_poll is not None and time.monotonic() >= next_poll:
                    try:
                        done = poll()
                    except ZVMError as exc:
                        log.warning("task %s: while waiting: %s", t["identifier"], exc)
                        done = False
                    next_poll = None if done else time.monotonic() + poll_s
                    continue          # a signal may have come while it ran
                if self.tasks.stopping.wait(0.2):
                    raise _Shutdown()
        finally:
            t.update({"state": IN_PROGRESS, "deadline": None, "waitingFor": [],
                      "signal": (self.tasks.store.get("tasks", t["identifier"]) or {}).get("signal")})
            self.save()

    def on_done(self, ok: bool) -> None:
        """Called once when the task ends (reports, events)."""


class _Shutdown(Exception):
    pass


class Tasks:
    def __init__(self, zvm, store):
        self.zvm, self.store = zvm, store
        self.stopping = threading.Event()
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    # -- documents
    def save(self, task: dict) -> None:
        task["progress"] = int(task.get("progress", 0))
        self.store.put("tasks", task["identifier"], task)

    def get(self, tid: str) -> dict:
        doc = self.store.get("tasks", tid)
        if doc is None:
            raise NotFound(f"no task {tid}")
        return doc

    def list(self) -> list[dict]:
        return self.store.all("tasks", limit=10000)

    def active_for(self, vpg_id: str) -> list[dict]:
        return [t for t in self.list() if t.get("vpg") == vpg_id and t["state"] in ACTIVE]

    # -- running
    def submit(self, op_type: str, params: dict, *, vpg: dict | None = None, user: str = "",
               related_sites: list[dict] = ()) -> dict:
        cls = OPERATIONS[op_type]
        now = time.time()
        tid = f"{op_type}.{int(now * 1000)}.{secrets.token_hex(4)}"
        task = {
            "identifier": tid, "type": op_type, "state": IN_PROGRESS, "progress": 0,
            "initiatedBy": user, "started": now, "completed": None, "completeReason": "",
            "isCancellable": cls.cancellable, "vpg": (vpg or {}).get("identifier"),
            "vpgLink": vpg, "sites": list(related_sites), "params": params, "data": {},
            "phase": "forward", "index": 0, "history": [], "signal": None, "deadline": None,
            "_created": now,
        }
        with self._lock:
            if cls.exclusive and vpg:
                busy = [t for t in self.active_for(vpg["identifier"])
                        if OPERATIONS.get(t["type"], Operation).exclusive]
                if busy:
                    raise Conflict(f"VPG {vpg.get('name', vpg['identifier'])} is busy with "
                                   f"{busy[0]['type']} (task {busy[0]['identifier']}); "
                                   "wait for it or finish it first")
            self.save(task)
            self._start(task)
        return task

    def signal(self, tid: str, name: str, params: dict | None = None) -> dict:
        with self.store.transaction():
            task = self.get(tid)
            if task["state"] not in ACTIVE:
                raise Conflict(f"task {tid} has ended")
            if name not in task.get("waitingFor", []) and task["state"] == WAITING:
                raise Conflict(f"task {tid} waits for {task.get('waitingFor')}, not {name}")
            task["signal"] = {"name": name, "params": params or {}, "time": time.time()}
            self.store.put("tasks", tid, task)
        return task

    def resume(self) -> list[str]:
        """Start-up: continue every task that was running when the ZVM stopped."""
        resumed = []
        for task in self.list():
            if task["state"] in ACTIVE and task["identifier"] not in self._threads:
                if task["type"] not in OPERATIONS:
                    task.update(state=FAILED, completed=time.time(),
                                completeReason="this ZVM does not know the operation any more")
                    self.save(task)
                    continue
                self.zvm.events.record("OperationResumed",
                                       f"{task['type']} resumed after a ZVM restart at step "
                                       f"{_step_name(task)}", entity="VPG", vpg=task.get("vpgLink"))
                self._start(task)
                resumed.append(task["identifier"])
        return resumed

    def _start(self, task: dict) -> None:
        th = threading.Thread(target=self._run, args=(task["identifier"],),
                              name=f"task-{task['type']}", daemon=True)
        self._threads[task["identifier"]] = th
        th.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        for th in list(self._threads.values()):
            th.join(timeout)

    def wait(self, tid: str, timeout: float = 60.0) -> dict:
        """Block until a task leaves the active states (tests and the CLI use the API instead)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            t = self.get(tid)
            if t["state"] not in ACTIVE or t["state"] == WAITING:
                return t
            time.sleep(0.1)
        raise TimeoutError(f"task {tid} still running after {timeout} s")

    def _run(self, tid: str) -> None:
        task = self.get(tid)
        op = OPERATIONS[task["type"]](self.zvm, self, task)
        try:
            while not self.stopping.is_set():
                steps = op.steps if task["phase"] == "forward" else op.rollback_steps
                if task["index"] >= len(steps):
                    self._finish(op, COMPLETED if task["phase"] == "forward" else
                                 (STOPPED if task.get("stoppedByUser") else FAILED))
                    return
                name = steps[task["index"]]
                hist = task["history"]
                if not hist or hist[-1]["step"] != f"{task['phase']}:{name}" or hist[-1].get("end"):
                    hist.append({"step": f"{task['phase']}:{name}", "start": time.time(),
                                 "end": None, "result": None})
                self.save(task)
                fn = getattr(op, ("step_" if task["phase"] == "forward" else "undo_") + name)
                try:
                    nxt = fn()
                except _Shutdown:
                    return
                except Exception as exc:    # noqa: BLE001 - any failure of a step ends it
                    log.warning("task %s step %s failed: %s", tid, name, exc)
                    log.debug("%s", traceback.format_exc())
                    hist[-1].update(end=time.time(), result=f"Failed: {exc}")
                    if task["phase"] == "forward" and op.rollback_steps:
                        task.update(phase="rollback", index=0,
                                    completeReason=f"{name} failed: {exc}")
                        self.save(task)
                        continue
                    task["completeReason"] = task.get("completeReason") or f"{name} failed: {exc}"
                    self._finish(op, FAILED)
                    return
                hist[-1].update(end=time.time(), result="Succeeded")
                if nxt is ROLLBACK:
                    task.update(phase="rollback", index=0)
                elif isinstance(nxt, str):
                    task["index"] = list(steps).index(nxt)
                else:
                    task["index"] += 1
                if task["phase"] == "forward":
                    task["progress"] = max(task["progress"],
                                           min(99, 100 * task["index"] // max(1, len(op.steps))))
                self.save(task)
        finally:
            self._threads.pop(tid, None)

    def _finish(self, op: Operation, state: int) -> None:
        task = op.task
        task.update(state=state, completed=time.time(), deadline=None, waitingFor=[])
        if state == COMPLETED:
            task["progress"] = 100
        # The report and events first, then the end of the task: whoever sees the task finished
        # finds its report (a crash in between resumes the task, which writes them again).
        try:
            op.on_done(state == COMPLETED)
        except Exception as exc:   # noqa: BLE001 - a report must not change the task's result
            log.warning("task %s: on_done failed: %s", task["identifier"], exc)
        self.save(task)


def _step_name(task: dict) -> str:
    return task["history"][-1]["step"] if task.get("history") else "start"


def task_api(task: dict, site_link: dict) -> dict:
    """A task as the reference API spells it (TaskApi)."""
    tid = task["identifier"]
    return {
        "taskIdentifier": tid,
        "link": {"rel": "self", "href": f"/v1/tasks/{tid}", "type": "TaskApi", "identifier": tid},
        "type": task["type"],
        "status": {"state": task["state"], "progress": task["progress"]},
        "initiatedBy": task["initiatedBy"],
        "started": _iso(task["started"]), "completed": _iso(task["completed"]),
        "completeReason": task.get("completeReason", ""),
        "isCancellable": task["isCancellable"],
        "relatedEntities": {"vpgs": [task["vpgLink"]] if task.get("vpgLink") else [],
                            "sites": task.get("sites") or [site_link], "hosts": [],
                            "flrSessions": []},
        "generation": len(task.get("history", [])),
        "steps": [{"step": h["step"], "start": _iso(h["start"]), "end": _iso(h["end"]),
                   "result": h["result"], **({"notes": h["notes"]} if h.get("notes") else {})}
                  for h in task.get("history", [])],
    }
