"""The protected site's part of a live recovery (Failover, Move): ``SourceSide`` answers
``/v1/internal/vpgs/{id}/source/...`` there (routes/failover.py), and ``tell_protected_site``
tells it, from the recovery site, what an operation run while it was down left for it.
"""
from __future__ import annotations

import logging
import time

from ..errors import Conflict, NotFound, Unavailable, ZVMError
from ..hypervisor.errors import NotFound as HvNotFound
from ..vpgs import MEETING_SLA, RECOVERED, SUB_NONE

log = logging.getLogger("tidemark.zvm.failover")

SOURCE_CALL_S = 120           # shutdowns, checkpoints at the protected site
RESUME_CALL_S = 3600          # replication resumed there (a delta sync)


class SourceSide:
    """What a live recovery asks of the VPG's protected site (``/v1/internal/vpgs/{id}/source``)."""

    def __init__(self, zvm):
        self.zvm = zvm

    @property
    def vpgs(self):
        return self.zvm.services["vpgs"]

    def _vpg(self, vpg_id: str) -> dict:
        vpg = self.vpgs.get(vpg_id)
        if vpg["role"] != "protected":
            raise Conflict(f"VPG {vpg['name']} is not protected from this site")
        return vpg

    def state(self, vpg_id: str, body: dict) -> None:
        self._vpg(vpg_id)
        self.vpgs.set_state(vpg_id, status=int(body["status"]), substatus=int(body["substatus"]),
                            activeProcess=body.get("activeProcess"))

    def shutdown(self, vpg_id: str, force: bool, vms: list[str] | None) -> dict:
        """Power off the VPG's source VMs (all, or ``vms``); which ones were running."""
        vpg = self._vpg(vpg_id)
        hv = self.zvm.hypervisor
        off, names = [], []
        for m in vpg["vms"]:
            if vms and m["vmIdentifier"] not in vms:
                continue
            try:
                vm = hv.vm(m["vmIdentifier"])
            except HvNotFound:
                continue
            if vm.power_state == "poweredOn":
                hv.power_off(vm.id, graceful=not force)
                off.append(vm.id)
                names.append(vm.name)
        return {"poweredOff": off, "names": names}

    def power_on(self, vpg_id: str, vms: list[str]) -> dict:
        self.vpgs.get(vpg_id)
        hv = self.zvm.hypervisor
        on = []
        for vid in vms:
            try:
                if hv.vm(vid).power_state != "poweredOn":
                    hv.power_on(vid)
                    on.append(vid)
            except HvNotFound:
                continue
        return {"poweredOn": on}

    def checkpoint(self, vpg_id: str, tag: str | None, timeout_s: float = 90.0) -> dict:
        """A valid checkpoint taken now, once it is recoverable at the recovery site: every
        write before it is durable there."""
        vpg = self._vpg(vpg_id)
        deadline = time.monotonic() + timeout_s
        return self.vpgs.recoverable_checkpoint(vpg, tag, deadline, step_s=0.3)[1]

    def stop(self, vpg_id: str) -> None:
        self.vpgs.unprotect(self._vpg(vpg_id))

    def resume(self, vpg_id: str) -> dict:
        """Protect again and delta-sync (a rolled-back failover or move): nothing written at the
        source meanwhile is lost. The status monitor takes the VPG over again."""
        vpg = self._vpg(vpg_id)
        vpg = self.vpgs.protect(vpg)
        self.vpgs.set_state(vpg_id, syncing=True)
        try:
            out = self.vpgs.sync(vpg)
        finally:
            self.vpgs.set_state(vpg_id, syncing=False, status=MEETING_SLA, substatus=SUB_NONE,
                                activeProcess=None)
        return out

    def recovered(self, vpg_id: str, delete_source_vms: bool) -> None:
        """After a commit without reverse protection: replication stays off, the VPG shows
        Recovered; a Move removes the source VMs (keeping their disk files) unless kept."""
        vpg = self._vpg(vpg_id)
        self.vpgs.unprotect(vpg, ignore_errors=True)
        hv = self.zvm.hypervisor
        if delete_source_vms:
            for m in vpg["vms"]:
                try:
                    hv.delete_vm(m["vmIdentifier"], keep_disks=True)
                except HvNotFound:
                    pass
        self.vpgs.set_state(vpg_id, status=RECOVERED, substatus=SUB_NONE, activeProcess=None)


def tell_protected_site(zvm, vpg: dict) -> bool:
    """At the recovery site: a failover committed while the VPG's protected site did not answer
    left ``_sourcePending`` in the VPG document; tell that site now, when it answers again. It
    shuts the source VMs down if the failover's shutdown policy asked for it (they restarted with
    their hosts, next to the recovered VMs), stops replicating the VPG (its VRAs were restarted
    with their saved protection) and shows the VPG Recovered. True once told (or nothing is
    left to tell); False while the protected site is still unreachable: the next pass tries
    again. Called by the VPG status monitor (vpgstatus.py) on every pass."""
    pending = vpg.get("_sourcePending")
    if not pending or vpg["role"] != "recovery":
        return True
    if pending.get("rollback"):
        return _tell_rolled_back(zvm, vpg, pending)
    vpgs = zvm.services["vpgs"]
    sites = zvm.services.get("sites")
    vid = vpg["identifier"]
    try:
        if sites is not None and not sites.peer(vpg["protectedSiteIdentifier"]).get("reachable", True):
            return False                  # the peer monitor says it is down: no call to wait on
    except NotFound:
        pass                              # unpaired: the call below says so
    base = f"/v1/internal/vpgs/{vid}/source"
    done = []
    try:
        # replication off first (nothing the source VMs wrote since the failover counts), then
        # the VMs the failover would have shut down, then (a Move) their removal
        vpgs.peer_call(vpg, "POST", f"{base}/recovered", timeout=SOURCE_CALL_S,
                       json={"deleteSourceVms": False})
        done.append("replication off there, the VPG Recovered")
        if pending.get("shutdown"):
            ans = vpgs.peer_call(vpg, "POST", f"{base}/shutdown", timeout=SOURCE_CALL_S, json={
                "force": pending["shutdown"] == 2, "vms": pending.get("vms") or None})
            done.append(f"source VMs shut down: {', '.join(ans.get('names') or []) or 'none was running'}")
        if pending.get("deleteSourceVms"):
            vpgs.peer_call(vpg, "POST", f"{base}/recovered", timeout=SOURCE_CALL_S,
                           json={"deleteSourceVms": True})
            done.append("source VMs removed (disk files kept)")
        text = f"VPG {vpg['name']}: its protected site answers again after the failover: " + \
            "; ".join(done)
        ok = True
    except Unavailable:
        return False
    except (Conflict, NotFound) as exc:   # not protected from there any more (changed there)
        text = f"VPG {vpg['name']}: its protected site answers again but took nothing: {exc}"
        ok = False
    except ZVMError as exc:               # anything else: the next pass asks again
        log.warning("VPG %s: telling the protected site it is recovered: %s", vpg["name"], exc)
        return False
    return _source_settled(zvm, vpg, text, ok)


def _source_settled(zvm, vpg: dict, text: str, ok: bool) -> bool:
    """The protected site's part of a failover is done (or refused for good): forget it, say so."""
    vpgs = zvm.services["vpgs"]
    with vpgs.update(vpg["identifier"]) as d:
        d.pop("_sourcePending", None)
    zvm.events.record("Failover", text, entity="VPG", success=ok, vpg=vpgs.link(vpg))
    log.info("%s", text)
    return True


def _tell_rolled_back(zvm, vpg: dict, pending: dict) -> bool:
    """``tell_protected_site`` for a failover rolled back while the protected site was down:
    power on the source VMs the failover had shut down, then resume replication there
    (protect and a delta sync: what the source VMs wrote meanwhile is not lost; the VPG
    shows MeetingSLA there again)."""
    vpgs = zvm.services["vpgs"]
    sites = zvm.services.get("sites")
    vid = vpg["identifier"]
    try:
        if sites is not None and not sites.peer(vpg["protectedSiteIdentifier"]).get("reachable", True):
            return False
    except NotFound:
        pass
    base = f"/v1/internal/vpgs/{vid}/source"
    done = []
    try:
        if pending.get("powerOn"):
            ans = vpgs.peer_call(vpg, "POST", f"{base}/poweron", timeout=SOURCE_CALL_S,
                                 json={"vms": pending["powerOn"]})
            done.append(f"source VMs powered on again: {len(ans.get('poweredOn') or [])}")
        if pending.get("resume"):
            ans = vpgs.peer_call(vpg, "POST", f"{base}/resume", timeout=RESUME_CALL_S, json={})
            n = ans.get("blocksDiffering", ans.get("blocks_differing"))
            done.append(f"replication resumed: delta sync {n} blocks differed")
        text = f"VPG {vpg['name']}: its protected site answers again after the failover was " \
               "rolled back: " + "; ".join(done or ["nothing to do"])
        ok = True
    except Unavailable:
        return False
    except (Conflict, NotFound) as exc:
        text = f"VPG {vpg['name']}: its protected site answers again but took nothing: {exc}"
        ok = False
    except ZVMError as exc:
        log.warning("VPG %s: telling the protected site the failover was rolled back: %s",
                    vpg["name"], exc)
        return False
    return _source_settled(zvm, vpg, text, ok)
