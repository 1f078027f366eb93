"""Preseeded replica disks: a recovery VPG's replica that IS an existing disk file.

Reverse protection after a failover or move journals into the original VMs' disks at the
original site: they already hold (almost) what the recovered VMs hold, so the delta sync that
follows moves only the blocks that differ. ``PUT /v1/recovery/vpgs/{vpg}`` takes
``disks: [{vm, disk, capacity, preseed: "/path/of/the/file"}]``: before the disk is registered
its replica path ``<replica_dir>/<vm>/disk<N>.img`` becomes a symbolic link to that file, so the
journal promotes into it and reads it, and deleting the VPG (even without ``keep_replicas``)
removes the link, never the file.
"""
from __future__ import annotations

import os
import uuid


class PreseedError(ValueError):
    """The preseed file cannot be the replica (missing, too small, or another replica exists)."""


def replica_path(replica_dir: str, vm: str, disk: int) -> str:
    """Where the journal keeps the replica of ``vm``'s disk (as ``Journal._open_disk`` names it)."""
    return os.path.join(replica_dir, str(uuid.UUID(vm)), f"disk{disk}.img")


def link_replica(replica_dir: str, vm: str, disk: int, capacity: int, source: str) -> str:
    """Make the replica path a link to ``source``; idempotent. Refuses a replica that exists and
    is not that link (its data would be lost) and a file smaller than the disk."""
    source = os.path.abspath(source)
    if not os.path.isfile(source):
        raise PreseedError(f"preseed file {source} does not exist")
    if os.path.getsize(source) < capacity:
        raise PreseedError(f"preseed file {source} has {os.path.getsize(source)} bytes, "
                           f"the disk {capacity}")
    path = replica_path(replica_dir, vm, disk)
    if os.path.islink(path):
        if os.path.realpath(path) == os.path.realpath(source):
            return path
        raise PreseedError(f"replica {path} already links to {os.readlink(path)}")
    if os.path.exists(path):
        raise PreseedError(f"replica {path} exists as a file of its own: drop the VPG first")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.symlink(source, path)
    return path
