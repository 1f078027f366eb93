"""Build and run the vcsim launcher (simulator/vcsim/main.go).

The launcher is govmomi's vCenter simulator with an empty inventory, built from
the Debian packages golang-go and golang-github-vmware-govmomi-dev in GOPATH
mode (no network needed). `simulator.vcenter` re-exports everything here.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

GOPATH = Path("/usr/share/gocode")
GOVMOMI_SRC = GOPATH / "src/github.com/vmware/govmomi/simulator"
MAIN_GO = Path(__file__).resolve().parent / "vcsim" / "main.go"
APT_COMMAND = "sudo apt-get install -y golang-go golang-github-vmware-govmomi-dev"


class VcsimBuildError(RuntimeError):
    """The vcsim launcher could not be built (toolchain missing or go build failed)."""


def _go_binary() -> str | None:
    return shutil.which("go") or next(
        (p for p in ("/usr/lib/go/bin/go", "/usr/local/go/bin/go") if os.access(p, os.X_OK)), None)


def build_vcsim(build_dir: Path, source: Path = MAIN_GO, timeout: float = 600.0) -> Path:
    """Build the launcher into ``build_dir/vcsim`` and return its path.

    The build is skipped when the binary exists and ``build_dir/vcsim.sha256``
    holds the sha256 of ``source`` (content-based, so checkouts that only touch
    mtimes do not trigger a rebuild). The Go build cache lives in
    ``build_dir/gocache``; a cold build takes about 30 s.

    Raises:
        VcsimBuildError: ``go`` or the govmomi sources are missing (the message
            names the apt-get command), or ``go build`` failed.
    """
    build_dir = Path(build_dir).resolve()
    binary, stamp = build_dir / "vcsim", build_dir / "vcsim.sha256"
    digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    if binary.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return binary
    go = _go_binary()
    if go is None:
        raise VcsimBuildError(f"the Go toolchain is not installed; run: {APT_COMMAND}")
    if not GOVMOMI_SRC.is_dir():
        raise VcsimBuildError(f"govmomi sources missing at {GOVMOMI_SRC}; run: {APT_COMMAND}")
    build_dir.mkdir(parents=True, exist_ok=True)
    tmp = build_dir / f".vcsim.{os.getpid()}.tmp"
    env = dict(os.environ, GOPATH=str(GOPATH), GO111MODULE="off", GOFLAGS="",
               GOCACHE=str(build_dir / "gocache"), CGO_ENABLED="0")
    try:
        proc = subprocess.run([go, "build", "-o", str(tmp), str(source)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise VcsimBuildError(f"go build of {source} timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise VcsimBuildError(f"go build of {source} failed (exit {proc.returncode}):\n"
                              f"{proc.stderr.strip()}")
    os.replace(tmp, binary)  # atomic: concurrent builders never see a partial binary
    stamp.write_text(digest + "\n")
    return binary


class Vcsim:
    """One vcsim process: ``start()`` it, use ``.url``, ``stop()`` it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.pid: int | None = None

    def start(self, binary: Path, log_path: Path, *, listen: str = "127.0.0.1:0",
              tls: bool = False, username: str = "user", password: str = "pass",
              timeout: float = 30.0) -> str:
        """Start vcsim, wait (at most ``timeout`` s) for its JSON line, return its URL.

        stderr (vcsim's log) is appended to ``log_path``. The process gets its
        own session so terminal signals aimed at the caller do not reach it.
        """
        if self.proc is not None:
            raise RuntimeError(f"vcsim already started (pid {self.pid})")
        args = [str(binary), "-listen", listen, "-username", username, "-password", password]
        if tls:
            args.append("-tls")
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=log, start_new_session=True)
        self.pid = self.proc.pid
        try:
            info = json.loads(self._read_line(timeout))
        except Exception:
            self.stop()
            raise
        self.url = info["url"]
        return self.url

    def _read_line(self, timeout: float) -> bytes:
        fd, buf = self.proc.stdout.fileno(), b""
        deadline = time.monotonic() + timeout
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"vcsim (pid {self.pid}) printed no URL within {timeout} s")
            ready, _, _ = select.select([fd], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise RuntimeError(f"vcsim (pid {self.pid}) exited with code "
                                       f"{self.proc.wait(5)} before printing its URL")
                buf += chunk
        return buf.split(b"\n", 1)[0]

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` s; reap and return the exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if proc.stdout:
            proc.stdout.close()
        return proc.returncode

    def __enter__(self) -> "Vcsim":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
