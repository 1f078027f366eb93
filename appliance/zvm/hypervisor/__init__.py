"""Hypervisor adapters of the ZVM behind one small interface (docs/zvm-hypervisors.md).

    hv = connect("simulator", url="http://127.0.0.1:8xxx")
    hv = connect("vsphere", host="vc.example", user="...", password="...", insecure=False)
"""
from __future__ import annotations

from .base import (APPLIANCE_IMAGES, CHANGE_KINDS, Change, Cluster, Datastore, Disk, DiskSpec,
                   Folder, Host, Hypervisor, Network, Nic, NicSpec, RecoveryImage, ResourcePool,
                   SiteInfo, Snapshot, VM, VMSpec, Watch, diff)
from .errors import (AuthenticationFailed, HypervisorError, InvalidSpec, InvalidState, NotFound,
                     Unreachable)

BACKENDS = ("simulator", "vsphere")


def connect(kind: str, **settings) -> Hypervisor:
    """A `Hypervisor` for ``kind``: 'simulator' (url) or 'vsphere' (host, port, user,
    password, protocol 'https'|'http', insecure: skip certificate checks, ca_file)."""
    if kind == "simulator":
        from .simulator import SimulatorHypervisor
        return SimulatorHypervisor(**settings)
    if kind == "vsphere":
        from .vsphere import VSphereHypervisor
        return VSphereHypervisor(**settings)
    raise InvalidSpec(f"unknown hypervisor kind {kind!r}; known: {', '.join(BACKENDS)}")


__all__ = ["APPLIANCE_IMAGES", "AuthenticationFailed", "BACKENDS", "CHANGE_KINDS", "Change",
           "Cluster", "Datastore", "Disk", "DiskSpec", "Folder", "Host", "Hypervisor",
           "HypervisorError", "InvalidSpec", "InvalidState", "Network", "Nic", "NicSpec", "NotFound",
           "RecoveryImage", "ResourcePool", "SiteInfo", "Snapshot", "Unreachable", "VM", "VMSpec",
           "Watch", "connect", "diff"]
