"""VM disks backed by a recovery image on a VRA, instead of a local file.

A recovered VM (failover test, failover, move, clone, restore) starts at once on a host of the
recovery site: each of its disks reads and writes a disk of a VRA image set
(docs/vra.md, "Recovery images") over the VRA's image IO protocol (TCP, checksummed frames,
docs/FORMAT.md), one connection per disk, found through the VRA's control API. Nothing is
copied before the VM runs, whatever the disk size.

    image ──rebase(path)──> file       after the image set was committed, the replica file
                                       IS the disk: the host switches to it without stopping
                                       the VM (the disk lock is held across the switch)

While a disk is image-backed its writes go to the image's scratch overlay and are NOT
mirrored to a VRA (no ring, no dirty bitmap). Once every disk of the VM is a plain file the
host moves the VM into its IO path, and from then on its writes are mirrored like any other.

A VRA that does not answer (restarting) is retried with a bounded backoff for
``retry_s`` seconds; the guest's IO waits meanwhile, then fails with ``ImageDiskError``.
"""
from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from dataclasses import dataclass

import requests
import xxhash

from appliance.vra import image_io as P
from appliance.vra import wire

RETRY_S = 60.0            # how long guest IO waits for an unreachable VRA before it fails
IO_CHUNK = 16 << 20       # most bytes one IREAD or IWRITE frame moves
HASH_STEP = 4 << 20
SPEC_FIELDS = ("url", "image", "vm", "disk")


class ImageDiskError(Exception):
    """IO on an image-backed disk failed: {}"""


class DiskMoved(Exception):
    """The disk was switched to the host's IO path meanwhile: write through the VM again."""


@dataclass(frozen=True)
class ImageSpec:
    """Where an image-backed disk lives: a disk ``vm``/``disk`` of image set ``image`` on the VRA at ``url``."""

    url: str
    token: str
    image: str
    vm: str
    disk: int

    @classmethod
    def from_dict(cls, d: dict) -> "ImageSpec":
        if not isinstance(d, dict):
            raise ValueError("a disk's image must be an object {url, token, image, vm, disk}")
        missing = [k for k in (*SPEC_FIELDS, "token") if d.get(k) in (None, "")]
        if missing:
            raise ValueError(f"a disk's image needs {', '.join(missing)}")
        url = str(d["url"]).rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"image url {url!r} is not an http(s) URL of a VRA's control API")
        return cls(url, str(d["token"]), str(d["image"]), str(d["vm"]), int(d["disk"]))

    def public(self) -> dict:
        """The spec without its token (what the inventory and the API show)."""
        return {"url": self.url, "image": self.image, "vm": self.vm, "disk": self.disk}

    @property
    def path(self) -> str:
        return f"/v1/recovery/images/{self.image}/disks/{self.vm}/{self.disk}"


class ImageClient:
    """One image disk: reads and writes over the image IO protocol, the rest over the control API.

    Not thread-safe: ``ImageDisk`` serialises the calls."""

    def __init__(self, spec: ImageSpec, retry_s: float = RETRY_S, closed: threading.Event | None = None):
        self.spec = spec
        self.retry_s = retry_s
        self.closed = closed or threading.Event()
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {spec.token}"
        self.sock: socket.socket | None = None
        self.retries = 0

    # -- the image IO protocol ------------------------------------------------------------
    def _connect(self) -> None:
        info = self._call("GET", f"/v1/recovery/images/{self.spec.image}").json()
        if not info.get("io"):
            raise ImageDiskError(f"the VRA at {self.spec.url} serves no image IO")
        sock = socket.create_connection((info["io"]["host"], int(info["io"]["port"])), timeout=10)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            wire.send(sock, wire.encode_json(P.IHELLO, {"token": self.spec.token, "image": self.spec.image,
                                                        "vm": self.spec.vm, "disk": self.spec.disk}))
            ftype, payload = wire.recv(sock)
            if ftype == P.IERROR:
                status, msg = P.decode_error(payload)
                raise ImageDiskError(f"VRA: {msg} ({status})")
            if ftype != P.IWELCOME:
                raise wire.WireError(f"expected IWELCOME, got frame type {ftype}")
            sock.settimeout(30)
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def _drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _io(self, frame: list, want: int) -> bytes:
        """Send one request, its answer's payload; reconnects and retries within ``retry_s``."""
        deadline = time.monotonic() + self.retry_s
        delay = 0.05
        while True:
            try:
                if self.sock is None:
                    self._connect()
                wire.send(self.sock, frame)
                ftype, payload = wire.recv(self.sock)
                if ftype == want:
                    return payload
                if ftype != P.IERROR:
                    raise wire.WireError(f"expected frame type {want}, got {ftype}")
                status, msg = P.decode_error(payload)
                if status != 409 or "being committed" not in msg:
                    raise ImageDiskError(f"VRA: {msg} ({status})")
                why = msg
            except (OSError, ConnectionError, wire.WireError) as exc:
                why = f"image IO failed ({type(exc).__name__}: {exc})"
                self._drop()
            if self.closed.is_set():
                raise ImageDiskError(f"disk closed while {why}")
            if time.monotonic() + delay > deadline:
                raise ImageDiskError(f"{why}; gave up after {self.retry_s:.0f} s")
            self.retries += 1
            self.closed.wait(delay)
            delay = min(delay * 2, 0.5)

    def _call(self, method: str, path: str, timeout: float = 30, session=None, **kw) -> requests.Response:
        deadline = time.monotonic() + self.retry_s
        delay = 0.05
        session = session or self.session
        while True:
            try:
                r = session.request(method, self.spec.url + path, timeout=timeout, **kw)
                if r.status_code < 400:
                    if method == "GET" and "X-Tidemark-XXH3" in r.headers and \
                            xxhash.xxh3_64_hexdigest(r.content) != r.headers["X-Tidemark-XXH3"]:
                        why = "a read came back with a wrong checksum"
                    else:
                        return r
                elif r.status_code >= 500 or "being committed" in r.text:
                    why = f"VRA answered {r.status_code}"
                else:
                    raise ImageDiskError(_detail(r))
            except requests.RequestException as exc:
                why = f"VRA unreachable ({type(exc).__name__})"
                session.close()               # a fresh connection next time
            if self.closed.is_set():
                raise ImageDiskError(f"disk closed while {why}")
            if time.monotonic() + delay > deadline:
                raise ImageDiskError(f"{why} for {self.retry_s:.0f} s on {self.spec.url}{path}")
            self.retries += 1
            self.closed.wait(delay)
            delay = min(delay * 2, 0.5)

    def info(self) -> dict:
        """The image set as the VRA describes it (checks that the disk is there)."""
        s = self._call("GET", f"/v1/recovery/images/{self.spec.image}").json()
        d = next((x for x in s["disks"] if x["vm"] == self.spec.vm and x["disk"] == self.spec.disk), None)
        if d is None:
            raise ImageDiskError(f"image {self.spec.image} has no disk {self.spec.disk} of VM {self.spec.vm}")
        return {**s, "capacity": d["capacity"]}

    def read(self, offset: int, length: int) -> bytes:
        parts = []
        for o in range(offset, offset + length, IO_CHUNK):
            n = min(IO_CHUNK, offset + length - o)
            data = self._io(wire.encode(P.IREAD, P.READ.pack(o, n)), P.IDATA)
            if len(data) != n:
                raise ImageDiskError(f"asked {n} bytes at {o}, got {len(data)}")
            parts.append(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        for o in range(0, len(view), IO_CHUNK):
            chunk = view[o:o + IO_CHUNK]
            self._io(wire.encode(P.IWRITE, P.WRITE.pack(offset + o) + chunk), P.IDONE)

    def sha256(self) -> str:
        """Computed by the VRA: every write of the disk goes there, so it is what the VM sees.
        Its own session, so that guest IO goes on meanwhile."""
        with requests.Session() as s:
            s.headers.update(self.session.headers)
            return self._call("GET", self.spec.path + "/hash", timeout=3600, session=s).json()["sha256"]

    def abort(self) -> None:
        """Wake a request waiting on the socket (from another thread, before ``close``)."""
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._drop()
        self.session.close()


class FileBacking:
    def __init__(self, path: str, capacity: int):
        if not os.path.isfile(path):
            raise ImageDiskError(f"{path} is not a file")
        self.path = path
        self.fd = os.open(path, os.O_RDWR)
        if os.fstat(self.fd).st_size < capacity:
            os.ftruncate(self.fd, capacity)

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        return data + bytes(length - len(data))

    def write(self, offset: int, data) -> None:
        view, done = memoryview(data), 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)

    def close(self) -> None:
        os.close(self.fd)


class ImageDisk:
    """A VM disk read and written through a VRA image, until ``rebase`` switches it to a file."""

    def __init__(self, index: int, capacity: int, spec: ImageSpec | None = None, path: str | None = None,
                 retry_s: float = RETRY_S):
        self.index = index
        self.capacity = capacity
        self.spec = spec
        self.lock = threading.Lock()
        self._closed = threading.Event()
        self.backing = ImageClient(spec, retry_s, self._closed) if spec else FileBacking(path, capacity)
        self.moved = False

    @property
    def path(self) -> str | None:
        return self.backing.path if isinstance(self.backing, FileBacking) else None

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.capacity:
            raise ValueError(f"[{offset}, {offset + length}) is outside disk {self.index} "
                             f"of {self.capacity} bytes")

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        with self.lock:
            if self.moved:
                raise DiskMoved()
            return self.backing.read(offset, length)

    def write(self, offset: int, data) -> None:
        self._check(offset, len(data))
        with self.lock:
            if self.moved:
                raise DiskMoved()
            self.backing.write(offset, data)

    def sha256(self) -> str:
        if self.moved:
            raise DiskMoved()
        if self.spec:
            return self.backing.sha256()
        h = hashlib.sha256()
        for off in range(0, self.capacity, HASH_STEP):
            h.update(self.read(off, min(HASH_STEP, self.capacity - off)))
        return h.hexdigest()

    def rebase(self, path: str) -> None:
        """Switch to the plain file ``path`` (the committed replica), between two guest IOs."""
        new = FileBacking(path, self.capacity)
        with self.lock:
            old, self.backing, self.spec = self.backing, new, None
        old.close()

    def status(self) -> dict:
        out = {"index": self.index, "capacity_bytes": self.capacity, "path": self.path,
               "backing": "image" if self.spec else "file", "dirty_blocks": 0}
        if self.spec:
            out["image"] = self.spec.public()
            out["retries"] = self.backing.retries
        return out

    def close(self) -> None:
        self._closed.set()
        if isinstance(self.backing, ImageClient):
            self.backing.abort()
        with self.lock:
            self.backing.close()


class ImageVM:
    """A powered-on VM with at least one image-backed disk: outside the host's IO path (not mirrored)."""

    def __init__(self, uuid: str, name: str, disks: list[ImageDisk], generation: int = 1, vm_seq: int = 0):
        self.uuid, self.name, self.disks = uuid, name, disks
        self.generation, self.vm_seq = generation, vm_seq

    def write(self, disk: int, offset: int, data) -> None:
        self.disks[disk].write(offset, data)
        self.vm_seq += 1

    def close(self) -> None:
        for d in self.disks:
            d.close()


def image_vm(cfg: dict, retry_s: float = RETRY_S) -> ImageVM:
    """The ImageVM of a VM config whose disks have ``image`` specs (with tokens) or paths."""
    disks = []
    try:
        for d in cfg.get("disks", []):
            spec = ImageSpec.from_dict(d["image"]) if d.get("image") else None
            disks.append(ImageDisk(d["index"], d["capacity_bytes"], spec, d.get("path"), retry_s))
    except BaseException:
        for x in disks:
            x.close()
        raise
    return ImageVM(cfg["instance_uuid"], cfg["name"], disks, cfg.get("generation", 1), cfg.get("vm_seq", 0))


def is_image_vm(cfg: dict) -> bool:
    return any(d.get("image") for d in cfg.get("disks", []))


def sha256_image(spec: ImageSpec, capacity: int) -> str:
    """SHA-256 of an image disk read straight from its VRA (a powered-off recovered VM)."""
    d = ImageDisk(0, capacity, spec)
    try:
        return d.sha256()
    finally:
        d.close()


def _detail(r: requests.Response) -> str:
    try:
        return f"VRA: {r.json().get('detail', r.text)} ({r.status_code})"
    except ValueError:
        return f"VRA answered {r.status_code}: {r.text[:200]}"
