"""Change watcher for `simulator.vcenter.VCenterMirror` (the `VCenterWatch` mixin).

Echo suppression: the mirror keeps, per VM, the state the site believes
(name, host name, power state); its own operations update that belief when
they finish. The watcher folds each WaitForUpdatesEx batch into the VM's net
state and calls back only when the net state differs from the belief, which
it then adopts. A VM is not judged while a mirror operation on it runs, nor
until a batch requested after that operation finished has arrived: only such
a batch is sure to contain the operation's updates. (vcsim 0.24 replays
every queued modification after a VM's "enter", whose values are already
final, so comparing net states is also what copes with that.)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

log = logging.getLogger(__name__)
PC = vmodl.query.PropertyCollector


class VCenterWatch:
    """Mixin: echo suppression and ``watch()``; needs ``_connect`` (SmartConnect kwargs)."""

    def _init_watch(self) -> None:
        self._exp_lock = threading.Lock()
        self._believed: dict[str, tuple] = {}  # vm moid -> (name, host, power) the site knows
        self._busy: dict[str, int] = {}        # vm moid, or "new:<name>" while being created
        self._done: dict[str, float] = {}      # vm moid -> when our last operation ended

    @contextmanager
    def _changing(self, vm, state: tuple | None):
        """Wrap one of our operations on ``vm`` (None: a create, which stores the
        new VM in the yielded dict's "vm"); ``state`` is the VM's state after it
        (None: the VM is gone)."""
        key = vm._moId if vm is not None else f"new:{state[0]}"
        out: dict = {}
        with self._exp_lock:
            self._busy[key] = self._busy.get(key, 0) + 1
        ok = False
        try:
            yield out
            ok = True
        finally:
            with self._exp_lock:
                self._busy[key] -= 1
                if not self._busy[key]:
                    del self._busy[key]
                target = vm if vm is not None else out.get("vm")
                if target is not None:
                    moid = target._moId
                    if ok and state is None:
                        self._believed.pop(moid, None)
                        self._done.pop(moid, None)
                    else:
                        if ok:
                            self._believed[moid] = state
                        self._done[moid] = time.monotonic()

    def _judge(self, moid: str, state: tuple, asked_at: float, baseline: bool) -> str:
        """"wait" (our operation may still echo, or the VM's name or a new VM's host is not
        known yet), "same", "report" or "added" (a VM someone else created; belief updated)."""
        with self._exp_lock:
            if moid in self._busy or f"new:{state[0]}" in self._busy \
                    or self._done.get(moid, float("-inf")) >= asked_at:
                return "wait"
            if not baseline and (state[0] is None or
                                 (state[1] is None and moid not in self._believed)):
                # vcsim announced a VM without its name, or a new VM without its host, and
                # they could not be read (``_refresh``) either: judging it now adopted a VM
                # named None (a ZVM's VRA that then never started). Look again next batch.
                return "wait"
            if baseline or self._believed.get(moid) == state:
                self._believed[moid] = state
                return "same"
            verdict = "report" if moid in self._believed else "added"
            self._believed[moid] = state
            return verdict

    def _judge_gone(self, moid: str, asked_at: float) -> str:
        """For a VM that left vcsim: "wait", "same" (our own delete) or "report"."""
        with self._exp_lock:
            if moid in self._busy or self._done.get(moid, float("-inf")) >= asked_at:
                return "wait"
            return "report" if self._believed.pop(moid, None) is not None else "same"

    def watch(self, callback, stop_event: threading.Event,
              ready: threading.Event | None = None) -> None:
        """Report VM changes others make in vcsim until ``stop_event`` is set.

        Runs in the caller's thread (start it in one) on its own session: a
        PropertyCollector filter over a recursive ContainerView of all VMs
        (so VMs created later are watched too), polled by WaitForUpdatesEx
        with maxWaitSeconds=1. When the name, runtime.host or
        runtime.powerState of a VM ends up different from what the site
        believes, it calls ``callback({"vm", "host", "power_state"})`` (net
        state: a change undone within one batch is not reported). The state
        at start is the baseline. A VM someone else created is reported as
        ``{"vm", "host", "power_state", "moid", "added": describe(...)}`` and one
        someone else destroyed as ``{"vm", "moid", "removed": True}``; the
        mirror's own creates and deletes are not reported. Use one
        watcher per mirror. Connection errors end the loop silently once
        ``stop_event`` is set and are raised otherwise; exceptions from
        ``callback`` are logged. ``ready`` is set once the baseline is taken:
        changes made after that are reported.
        """
        si = SmartConnect(**self._connect)
        try:
            content = si.RetrieveContent()
            view = content.viewManager.CreateContainerView(
                content.rootFolder, [vim.VirtualMachine], True)
            trav = PC.TraversalSpec(name="view", path="view", skip=False, type=vim.view.ContainerView)
            spec = PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=view, skip=True, selectSet=[trav])],
                                 propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=[
                                     "name", "runtime.host", "runtime.powerState"])])
            pc = content.propertyCollector
            pc.CreateFilter(spec, partialUpdates=False)
            known: dict[str, dict] = {}  # vm moid -> net state from vcsim
            host_names: dict[str, str] = {}
            pending: set[str] = set()
            version, baseline = "", True
            while not stop_event.is_set():
                asked_at = time.monotonic()
                try:
                    res = pc.WaitForUpdatesEx(version, PC.WaitOptions(maxWaitSeconds=1))
                except Exception:
                    if stop_event.is_set():
                        return
                    raise
                if res is not None:
                    version = res.version
                    for fs in res.filterSet:
                        for ou in fs.objectSet:
                            self._fold(si, ou, known, host_names)
                            pending.add(ou.obj._moId)
                for moid in sorted(pending):
                    cur = known.get(moid)
                    if cur is None:
                        pending.discard(moid)
                        continue
                    if cur.get("gone"):
                        verdict = self._judge_gone(moid, asked_at)
                        if verdict == "wait":
                            continue
                        pending.discard(moid)
                        known.pop(moid, None)
                        if verdict == "report":
                            self._report(callback, {"vm": cur.get("vm"), "moid": moid, "removed": True})
                        continue
                    if cur.get("vm") is None or cur.get("host") is None:
                        self._refresh(si, moid, cur, host_names)
                    state = (cur.get("vm"), cur.get("host"), cur.get("power_state"))
                    verdict = self._judge(moid, state, asked_at, baseline)
                    if verdict == "wait":
                        continue
                    pending.discard(moid)
                    event = {"vm": state[0], "host": state[1], "power_state": state[2]}
                    if verdict == "added":
                        try:
                            event.update(moid=moid, added=describe(si, moid))
                        except Exception as exc:   # gone again already: its leave follows
                            log.warning("could not read new vCenter VM %s: %s", state[0], exc)
                            continue
                    if verdict in ("report", "added"):
                        self._report(callback, event)
                if baseline and ready is not None:
                    ready.set()
                baseline = False
        finally:
            try:
                Disconnect(si)
            except Exception:  # vcsim may already be gone
                pass

    @staticmethod
    def _report(callback, event: dict) -> None:
        try:
            callback(event)
        except Exception:   # the event may hold OVF properties (secrets): log the name only
            log.exception("vcenter watch callback failed for %s", event.get("vm"))

    @staticmethod
    def _refresh(si, moid: str, cur: dict, host_names: dict) -> None:
        """Read a VM's name, host and power state from vcsim itself into ``cur``: the update
        stream can announce a VM just created without them and not send them later (seen once
        in a lab start, for one of the VRA VMs a ZVM created through vCenter)."""
        try:
            vm = vim.VirtualMachine(moid, si._stub)
            name, runtime = vm.name, vm.runtime
            host = _host_name(si, runtime.host, host_names)
        except Exception:   # gone already: its leave follows
            return
        cur["vm"] = name
        cur["host"] = host
        cur["power_state"] = str(runtime.powerState)

    def _fold(self, si, ou, known: dict, host_names: dict) -> None:
        """Apply one ObjectUpdate to ``known`` (a VM that left stays, marked gone, until judged)."""
        moid = ou.obj._moId
        if ou.kind == "leave":
            if moid in known:
                known[moid]["gone"] = True
            return
        cur = known.setdefault(moid, {})
        for change in ou.changeSet:
            if change.name == "runtime.host":
                cur["host"] = _host_name(si, change.val, host_names)
            elif change.name == "runtime.powerState":
                cur["power_state"] = str(change.val)
            elif change.name == "name":
                cur["vm"] = change.val


def _host_name(si, ref, host_names: dict) -> str | None:
    """The name of the host ``ref`` points at (None for none), read once per host."""
    if ref is None:
        return None
    if ref._moId not in host_names:
        host_names[ref._moId] = vim.HostSystem(ref._moId, si._stub).name
    return host_names[ref._moId]


def describe(si, moid: str) -> dict:
    """What the site needs to adopt a VM created through vCenter: its config, disks (backing
    files, recovery images from extraConfig ``tidemark.disk<N>.image``), NICs (re-IP from
    ``guestinfo.tidemark.nic<N>.ip``), appliance image and OVF properties (``tidemark.image``,
    ``tidemark.ovf.<key>``)."""
    cfg = vim.VirtualMachine(moid, si._stub).config
    extra: dict[str, str] = {}
    for opt in cfg.extraConfig or []:
        extra[opt.key] = opt.value
    extra = {k: v for k, v in extra.items() if v not in ("", None)}
    devices = cfg.hardware.device or []
    disks = sorted((d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)),
                   key=lambda d: (d.controllerKey, d.unitNumber or 0))
    cards = [d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)]
    return {
        "instance_uuid": cfg.instanceUuid, "bios_uuid": cfg.uuid,
        "vcpus": cfg.hardware.numCPU, "memory_mib": cfg.hardware.memoryMB,
        "datastore": cfg.files.vmPathName.split("]")[0].lstrip("["),
        "disks": [{"capacity_bytes": d.capacityInBytes or d.capacityInKB * 1024,
                   "file": getattr(d.backing, "fileName", None),
                   "image": json.loads(extra[f"tidemark.disk{i}.image"])
                   if f"tidemark.disk{i}.image" in extra else None} for i, d in enumerate(disks)],
        "nics": [{"network": getattr(d.backing, "deviceName", None), "mac": d.macAddress,
                  "ip": extra.get(f"guestinfo.tidemark.nic{i}.ip")} for i, d in enumerate(cards)],
        "image": extra.get("tidemark.image"),
        "properties": {k[len("tidemark.ovf."):]: v for k, v in extra.items()
                       if k.startswith("tidemark.ovf.")},
    }
