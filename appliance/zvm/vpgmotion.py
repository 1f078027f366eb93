"""Following a protected VM across a vMotion.

Every protected VRA of a VPG is given all of the VPG's VMs, so a VM that moves between hosts
already in the VPG simply goes on streaming from its new host's VRA (the host drains the VM's
stream before it runs elsewhere: docs/vra.md). A VM that moves to a host whose VRA is not in
the VPG yet makes that VRA part of it:

    vm_moved ─► record the new host ─► protect on the new host's VRA (participants updated on
    the leader) ─► delta sync of that VRA's disks of the VPG (only differing blocks move:
    writes made before the VRA protected the VPG) ─► VmMoved event

A VRA whose host no longer runs any VM of the VPG stays a participant until the next update
of the VPG: it holds barriers for no VM, which costs nothing.
"""
from __future__ import annotations

import logging

from .errors import ZVMError

log = logging.getLogger("tidemark.zvm.vpgmotion")


def follow_vm(vpgs, vpg_id: str, vm_id: str, new_host: str) -> bool:
    """Make protection follow VM ``vm_id`` to ``new_host``; True if a VRA joined the VPG."""
    with vpgs.update(vpg_id) as doc:
        vm = next((m for m in doc["vms"] if m["vmIdentifier"] == vm_id), None)
        if vm is None or vm["hostIdentifier"] == new_host:
            return False
        old_host, vm["hostIdentifier"] = vm["hostIdentifier"], new_host
    vpg = vpgs.get(vpg_id)
    if vpg["state"].get("paused") or vpg["state"]["status"] == 7 or not vpg.get("recoveryVra") \
            or not vpg.get("_recovery"):
        return False                  # protected again from the new hosts on resume / creation
    known = {e["hostIdentifier"] for e in vpg.get("protectedVras", [])}
    link = vpgs.link(vpg)
    if new_host in known:
        vpgs.zvm.events.record("VmMoved", f"VM {vm['name']} of VPG {vpg['name']} moved from host "
                               f"{old_host} to {new_host}; its VRA protects the VPG already",
                               entity="VPG", vpg=link)
        return False
    try:
        before = {e["identifier"] for e in vpg.get("protectedVras", [])}
        vpg = vpgs.protect(vpg)
        new_ids = {e["identifier"] for e in vpg["protectedVras"]} - before
        vpgs.set_state(vpg_id, syncing=True)
        try:
            out = vpgs.sync(vpg, new_ids)
        finally:
            vpgs.set_state(vpg_id, syncing=False)
    except ZVMError as exc:
        vpgs.set_state(vpg_id, lastError=f"following VM {vm['name']} to host {new_host}: {exc}")
        log.warning("VPG %s: could not follow VM %s to host %s: %s", vpg["name"], vm["name"],
                    new_host, exc)
        raise
    vpgs.zvm.events.record("VmMoved", f"VM {vm['name']} of VPG {vpg['name']} moved from host "
                           f"{old_host} to {new_host}; that host's VRA joined the VPG "
                           f"({out['blocks_differing']} blocks delta-synced)", entity="VPG", vpg=link)
    return True
