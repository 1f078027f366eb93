"""Recovery image sets: every disk of a VPG (or of some of its VMs) at one checkpoint, served to hosts.

A FailoverTest, Failover, Move, Clone or Restore asks the recovery VRA for an image set; the
simulator's (or a hypervisor's) host then runs the recovered VMs with these images as their
disks, reading and writing them over the control API (docs/vra.md, "Recovery images"). Each
disk is a DSS ``RecoveryImage``: reads go through replica + journal at the checkpoint, writes
go to a scratch overlay, the journal is never written, and replication of the VPG continues
into the journal meanwhile. Opening a set reads no disk data, whatever the disk size.

    open ──IO──> open
      ├── discard ──> (gone)       scratch files dropped; journal and replicas untouched
      └── commit ───> committing ──> committed ──discard──> (gone)
                       the DSS commit of each disk in turn (replica := image content, the VPG's
                       journal dropped, its generation closed). Committed: the replica files ARE
                       the disks; IO is served from them until every host has rebased its VM
                       onto the plain file and the set is discarded (which then drops nothing).

The registry is persisted (``registry.json``, 0600) after every change of state. A restarted
VRA opens its sets again before it journals or promotes anything: an open set resumes on its
scratch (the recovered VMs' writes are kept), a set caught ``committing`` is committed again
(the DSS commit is idempotent: a disk already committed has an empty overlay and no journal),
a committed set serves its replica files again. A set whose checkpoint is no longer
recoverable is shown as ``failed`` with the reason, until it is discarded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance.dss import DSSError
from appliance.dss.pos import Checkpoint, Pos

log = logging.getLogger("tidemark.vra.images")
MAX_IO = 64 << 20            # most bytes one read or write of an image may move
HASH_STEP = 4 << 20


class ImageError(Exception):
    """A recovery image request was refused; ``status`` is its HTTP status."""

    status = 400


class UnknownImage(ImageError):
    status = 404


class ImageConflict(ImageError):
    status = 409


@dataclass
class Slot:
    """One disk of an image set: its RecoveryImage while open, the replica file once committed."""

    vm: str
    disk: int
    capacity: int
    scratch: str
    replica: str = ""
    image: object = None         # appliance.dss.image.RecoveryImage while open
    fd: int | None = None        # the replica file, once committed
    lock: threading.Lock = field(default_factory=threading.Lock)

    def public(self) -> dict:
        return {"vm": self.vm, "disk": self.disk, "capacity": self.capacity,
                **({"path": self.replica} if self.fd is not None else {})}


@dataclass
class ImageSet:
    id: str
    vpg: str
    checkpoint: Checkpoint
    scratch_dir: str
    state: str                   # open | committing | committed | failed
    created: float
    slots: dict = field(default_factory=dict)     # (vm, disk) -> Slot
    error: str = ""
    own_dir: bool = True         # the scratch folder was made for this set (removed with it)

    def public(self) -> dict:
        cp = self.checkpoint
        out = {"image": self.id, "vpg": self.vpg, "checkpoint": cp.id, "pos": str(cp.pos),
               "checkpoint_time": cp.time, "tag": cp.tag, "state": self.state, "created": self.created,
               "disks": [s.public() for s in self.slots.values()]}
        if self.error:
            out["error"] = self.error
        return out

    def saved(self) -> dict:
        cp = self.checkpoint
        return {"vpg": self.vpg, "checkpoint": {"id": cp.id, "pos": str(cp.pos), "time": cp.time,
                                                "tag": cp.tag},
                "scratch_dir": self.scratch_dir, "own_dir": self.own_dir, "state": self.state,
                "created": self.created,
                "disks": [{"vm": s.vm, "disk": s.disk, "capacity": s.capacity, "scratch": s.scratch,
                           "replica": s.replica} for s in self.slots.values()]}


class ImageRegistry:
    """The recovery VRA's image sets; ``root`` holds registry.json and the default scratch folders."""

    def __init__(self, journal, root: str):
        self.j = journal
        self.root = Path(root)
        self._sets: dict[str, ImageSet] = {}
        self.io_address: tuple[str, int] | None = None   # the image IO protocol's listener (image_io.py)
        self._lock = threading.Lock()        # the table and registry.json; never held across IO
        self._copies: dict[tuple, dict] = {}   # (set, vm, disk) -> copy job (copy_to), in memory

    # -- persistence ------------------------------------------------------------------------
    @property
    def _file(self) -> Path:
        return self.root / "registry.json"

    def _save(self) -> None:
        with self._lock:
            data = {i: s.saved() for i, s in self._sets.items()}
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self._file.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            tmp.rename(self._file)

    def resume(self) -> None:
        """Open every persisted set again (see the module docstring); call before journaling starts."""
        if not self._file.exists():
            return
        for sid, d in json.loads(self._file.read_text()).items():
            c = d["checkpoint"]
            s = ImageSet(sid, d["vpg"], Checkpoint(int(c["id"]), Pos.parse(c["pos"]), float(c["time"]),
                                                   c.get("tag")),
                         d["scratch_dir"], d["state"], float(d["created"]), own_dir=d.get("own_dir", True))
            for x in d["disks"]:
                s.slots[(x["vm"], x["disk"])] = Slot(x["vm"], int(x["disk"]), int(x["capacity"]),
                                                     x["scratch"], x.get("replica", ""))
            self._sets[sid] = s
            try:
                if s.state in ("open", "committing"):
                    for slot in s.slots.values():
                        slot.image = self.j.image(s.vpg, slot.vm, slot.disk, s.checkpoint, slot.scratch)
                        slot.replica = slot.image.replica_path
                    if s.state == "committing":
                        self._commit(s)
                elif s.state == "committed":
                    for slot in s.slots.values():
                        slot.fd = os.open(slot.replica, os.O_RDWR)
                log.info("image set %s of VPG %s at checkpoint %d resumed (%s)",
                         sid, s.vpg, s.checkpoint.id, s.state)
            except (DSSError, OSError) as exc:
                self._close_slots(s)
                s.state, s.error = "failed", f"could not resume: {exc}"
                log.error("image set %s of VPG %s: %s", sid, s.vpg, s.error)
        self._save()

    # -- lifecycle ------------------------------------------------------------------------------
    def open(self, vpg: str, checkpoint: int, scratch_dir: str | None = None,
             vms: list[str] | None = None) -> dict:
        """Open an image of every disk of the VPG (or of ``vms``) at a recoverable checkpoint."""
        cp = next((c for c in self.j.checkpoints(vpg) if c.id == checkpoint), None)
        if cp is None:
            have = [c.id for c in self.j.checkpoints(vpg)]
            span = f"{have[0]}..{have[-1]}" if have else "none yet"
            raise ImageConflict(f"checkpoint {checkpoint} of VPG {vpg} is not recoverable "
                                f"(recoverable: {span}): pick one from GET /v1/recovery/vpgs/{vpg}/checkpoints")
        disks = self.j.disks(vpg)
        if vms is not None:
            unknown = set(vms) - {vm for vm, _d, _c in disks}
            if unknown:
                raise UnknownImage(f"VPG {vpg} has no VM {', '.join(sorted(unknown))}")
            disks = [x for x in disks if x[0] in set(vms)]
        if not disks:
            raise ImageConflict(f"VPG {vpg} has no registered disks to open")
        sid = "img-" + secrets.token_hex(6)
        own = not scratch_dir
        sdir = Path(scratch_dir) if scratch_dir else self.root / sid
        try:
            sdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ImageError(f"scratch_dir {sdir}: {exc}") from exc
        s = ImageSet(sid, vpg, cp, str(sdir), "open", time.time(), own_dir=own)
        try:
            for vm, disk, cap in disks:
                slot = Slot(vm, disk, cap, str(sdir / f"{sid}-{vm}-{disk}.scratch"))
                slot.image = self.j.image(vpg, vm, disk, cp, slot.scratch)
                slot.replica = slot.image.replica_path
                s.slots[(vm, disk)] = slot
        except BaseException:
            self._drop(s)
            raise
        with self._lock:
            self._sets[sid] = s
        self._save()
        log.info("image set %s of VPG %s at checkpoint %d (%s): %d disks", sid, vpg, cp.id, cp.pos,
                 len(s.slots))
        return self._public(s)

    def _public(self, s: ImageSet) -> dict:
        out = s.public()
        if self.io_address:
            out["io"] = {"host": self.io_address[0], "port": self.io_address[1]}
        return out

    def list(self) -> list[dict]:
        with self._lock:
            sets = list(self._sets.values())
        return [self._public(s) for s in sets]

    def get(self, sid: str) -> dict:
        return self._public(self._set(sid))

    def disk_info(self, sid: str, vm: str, disk: int) -> dict:
        """What an IO client needs to know of one disk (raises UnknownImage)."""
        s = self._set(sid)
        return {"capacity": self._slot(sid, vm, disk, 0, 0).capacity, "state": s.state}

    def discard(self, sid: str) -> None:
        """Roll back: the overlay is dropped, journal and replica untouched (committed: just forget)."""
        s = self._set(sid)
        with self._lock:
            self._sets.pop(sid, None)
        self._drop(s)
        self._save()
        log.info("image set %s of VPG %s discarded", sid, s.vpg)

    def commit(self, sid: str) -> dict:
        """Promote: each disk's replica becomes its image content; the VPG's journal is dropped."""
        s = self._set(sid)
        if s.state == "committed":
            return self._public(s)
        if s.state not in ("open", "committing"):    # committing: a failed commit, tried again
            raise ImageConflict(f"image set {sid} is {s.state}: {s.error or 'it cannot be committed'}")
        s.state = "committing"
        self._save()
        try:
            self._commit(s)
        except DSSError:
            # ImageBusy (another set of the VPG at another checkpoint) fails before anything changed
            # on the first disk; later failures are finished by a restart or another commit call.
            if all(slot.image is not None for slot in s.slots.values()):
                s.state = "open"
            self._save()
            raise
        self._save()
        log.info("image set %s of VPG %s committed at checkpoint %d", sid, s.vpg, s.checkpoint.id)
        return self._public(s)

    def _commit(self, s: ImageSet) -> None:
        for slot in s.slots.values():
            with slot.lock:
                if slot.image is None:
                    continue
                slot.image.commit()
                slot.image = None
                slot.fd = os.open(slot.replica, os.O_RDWR)
        s.state = "committed"

    def copy_to(self, sid: str, vm: str, disk: int, path: str) -> dict:
        """Write the disk as the set's VMs see it into the existing file ``path`` (e.g. a clone's
        new disk), in a background thread; ``copy_status`` follows it. Asking again for the same
        path while it copies or after it is done answers that job; the jobs are in memory only
        (after a VRA restart, ask again: the copy starts over and writes the same bytes)."""
        slot = self._slot(sid, vm, disk, 0, 0)
        if not os.path.isfile(path):
            raise ImageError(f"{path} is not a file: create the target disk first")
        key = (sid, vm, disk)
        with self._lock:
            job = self._copies.get(key)
            if job and job["path"] == path and job["state"] in ("copying", "done"):
                return dict(job)
            job = {"path": path, "state": "copying", "bytes_done": 0, "bytes_total": slot.capacity,
                   "error": ""}
            self._copies[key] = job
        threading.Thread(target=self._copy, args=(key, job), name=f"copy-{sid}", daemon=True).start()
        return dict(job)

    def copy_status(self, sid: str, vm: str, disk: int) -> dict:
        with self._lock:
            job = self._copies.get((sid, vm, disk))
        if job is None:
            raise UnknownImage(f"no copy of disk {disk} of VM {vm} of image {sid} on this VRA "
                               "(since its last start): ask for it again")
        return dict(job)

    def _copy(self, key: tuple, job: dict) -> None:
        sid, vm, disk = key
        zero = bytes(HASH_STEP)
        try:
            fd = os.open(job["path"], os.O_RDWR)
            try:
                if os.fstat(fd).st_size < job["bytes_total"]:
                    os.ftruncate(fd, job["bytes_total"])
                for off in range(0, job["bytes_total"], HASH_STEP):
                    n = min(HASH_STEP, job["bytes_total"] - off)
                    data = self.read(sid, vm, disk, off, n)
                    # the target is usually new and sparse: leave zero chunks that are zero there
                    if data != zero[:n] or os.pread(fd, n, off) != zero[:n]:
                        view, done = memoryview(data), 0
                        while done < n:
                            done += os.pwrite(fd, view[done:], off + done)
                    job["bytes_done"] = off + n
                os.fsync(fd)
            finally:
                os.close(fd)
            job["state"] = "done"
            log.info("image %s disk %d of VM %s copied into %s", sid, disk, vm, job["path"])
        except (ImageError, DSSError, OSError) as exc:
            job.update(state="failed", error=str(exc))
            log.warning("copy of image %s disk %d of VM %s failed: %s", sid, disk, vm, exc)

    def close(self) -> None:
        """VRA shutdown: release the images (scratch kept, resumable) and the replica files."""
        with self._lock:
            sets = list(self._sets.values())
        for s in sets:
            self._close_slots(s)

    # -- IO ----------------------------------------------------------------------------------------
    def read(self, sid: str, vm: str, disk: int, offset: int, length: int) -> bytes:
        slot = self._slot(sid, vm, disk, offset, length)
        with slot.lock:
            if slot.image is not None:
                return slot.image.read(offset, length)
            data = os.pread(self._fd(sid, slot), length, offset)
        return data + bytes(length - len(data))

    def write(self, sid: str, vm: str, disk: int, offset: int, data: bytes) -> None:
        slot = self._slot(sid, vm, disk, offset, len(data))
        with slot.lock:
            if slot.image is not None:
                slot.image.write(offset, data)
                return
            fd, view, done = self._fd(sid, slot), memoryview(data), 0
            while done < len(data):
                done += os.pwrite(fd, view[done:], offset + done)

    def sha256(self, sid: str, vm: str, disk: int) -> str:
        """SHA-256 of the disk as a VM of this image sees it now (checkpoint content + its writes)."""
        slot = self._slot(sid, vm, disk, 0, 0)
        h = hashlib.sha256()
        for off in range(0, slot.capacity, HASH_STEP):
            h.update(self.read(sid, vm, disk, off, min(HASH_STEP, slot.capacity - off)))
        return h.hexdigest()

    # -- helpers -------------------------------------------------------------------------------------
    def _set(self, sid: str) -> ImageSet:
        with self._lock:
            s = self._sets.get(sid)
        if s is None:
            raise UnknownImage(f"no recovery image {sid} on this VRA: GET /v1/recovery/images lists them")
        return s

    def _slot(self, sid: str, vm: str, disk: int, offset: int, length: int) -> Slot:
        s = self._set(sid)
        slot = s.slots.get((vm, disk))
        if slot is None:
            raise UnknownImage(f"image {sid} has no disk {disk} of VM {vm}")
        if s.state == "failed":
            raise ImageConflict(f"image {sid} failed: {s.error}; discard it")
        if offset < 0 or length < 0 or offset + length > slot.capacity:
            raise ImageError(f"{length} bytes at offset {offset} are outside the disk "
                             f"({slot.capacity} bytes)")
        if length > MAX_IO:
            raise ImageError(f"at most {MAX_IO} bytes per read or write")
        return slot

    @staticmethod
    def _fd(sid: str, slot: Slot) -> int:
        if slot.fd is None:       # between the DSS commit of this disk and its replica being opened
            raise ImageConflict(f"image {sid} disk {slot.disk} of VM {slot.vm} is being committed: retry")
        return slot.fd

    def _close_slots(self, s: ImageSet, discard: bool = False) -> None:
        """Close every disk of a set (scratch kept, resumable), or with ``discard`` drop its
        scratch overlays too."""
        for slot in s.slots.values():
            with slot.lock:
                if slot.image is not None:
                    slot.image.discard() if discard else slot.image.close()
                    slot.image = None
                if slot.fd is not None:
                    os.close(slot.fd)
                    slot.fd = None
                if discard:
                    for p in (slot.scratch, slot.scratch + ".map"):
                        Path(p).unlink(missing_ok=True)

    def _drop(self, s: ImageSet) -> None:
        self._close_slots(s, discard=True)
        if s.own_dir:
            shutil.rmtree(s.scratch_dir, ignore_errors=True)
