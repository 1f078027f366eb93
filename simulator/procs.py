"""Process bookkeeping for the lab: pid files, spawning, and stopping exactly what was started.

A pid file holds the pid and the process's start time, so that a stale file
never leads to signalling an unrelated process that reused the pid.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil


def exit_with_parent(interval: float = 0.25):
    """Exit (as after SIGTERM, then hard) when the process that started this one dies.

    A watcher thread rather than PR_SET_PDEATHSIG: that signal fires when the
    *thread* that forked exits, and the site controller spawns hosts from
    short-lived request threads.
    """
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def write_pidfile(path: Path, pid: int | None = None):
    pid = pid or os.getpid()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": pid, "create_time": psutil.Process(pid).create_time()}))
    tmp.rename(path)


def read_pidfile(path: Path) -> psutil.Process | None:
    """The live process a pid file names, or None if it is gone or the pid was reused."""
    try:
        info = json.loads(path.read_text())
        proc = psutil.Process(info["pid"])
        if abs(proc.create_time() - info["create_time"]) > 0.01:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (FileNotFoundError, ValueError, KeyError, psutil.NoSuchProcess):
        return None


def stop_process(proc: psutil.Process | None, timeout: float = 10.0, kill: bool = False):
    """SIGTERM (or SIGKILL), wait, then SIGKILL the process and its children."""
    if proc is None:
        return
    try:
        children = proc.children(recursive=True)
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        for c in children:
            if c.is_running():
                c.kill()
        psutil.wait_procs(children, timeout=5)
    except psutil.NoSuchProcess:
        pass


def spawn(cmd: list[str], log_path: Path, *, env: dict | None = None,
          detach: bool = False) -> subprocess.Popen:
    """Start a child with its output in ``log_path``.

    ``detach`` starts a new session (the lab's site controllers outlive the CLI).
    Children that must die with their parent call ``exit_with_parent()``.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "ab")
    try:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, start_new_session=detach)
    finally:
        out.close()


def wait_for_file(path: Path, timeout: float, proc: subprocess.Popen | None = None) -> dict:
    """Wait for a JSON file a child writes when it is ready; fail early if the child died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                return json.loads(path.read_text())
            except ValueError:
                pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{' '.join(proc.args[:4])} exited with {proc.returncode} "
                               f"before it was ready")
        time.sleep(0.05)
    raise TimeoutError(f"{path} did not appear within {timeout:.0f} s")
