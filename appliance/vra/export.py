"""Export an image disk into a plain file: a per-VM Restore's commit while the VPG keeps
replicating (the DSS commit would end the VPG's journal generation, so the restored VM gets a
copy of its disk instead, made here where the data is, never through the ZVM).

``POST /v1/recovery/images/{id}/disks/{vm}/{disk}/export {path}`` writes the disk as the
image's VMs see it (checkpoint content plus their writes) into ``path`` (sparse: all-zero
chunks are skipped), fsyncs it and renames it into place, so ``path`` is complete or absent.
"""
from __future__ import annotations

import hashlib
import os

STEP = 4 << 20


def export_disk(images, sid: str, vm: str, disk: int, path: str) -> dict:
    cap = next((d["capacity"] for d in images.get(sid)["disks"]
                if d["vm"] == vm and int(d["disk"]) == disk), None)
    if cap is None:
        raise KeyError(f"image set {sid} has no disk {disk} of VM {vm}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".export"
    h = hashlib.sha256()
    zero = bytes(STEP)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, cap)
        for off in range(0, cap, STEP):
            n = min(STEP, cap - off)
            data = images.read(sid, vm, disk, off, n)
            h.update(data)
            if data != zero[:n]:
                os.pwrite(fd, data, off)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    return {"path": path, "capacity": cap, "sha256": h.hexdigest()}
