"""vCenter simulation for vSphere-style sites: mirror a site inventory into vcsim.

`VCenterMirror` creates, through pyvmomi, the datacenter, cluster, hosts,
datastores, networks and VMs a site inventory describes, applies the site's
later changes (create/delete/rename/relocate/power) and watches vcsim for
changes made by others (e.g. a raw pyvmomi vMotion) to report them back.

What govmomi 0.24's vcsim honours (read from its simulator/*.go, checked by
tests/simulator/test_vcenter.py):

* CreateVM_Task keeps spec.instanceUuid and spec.uuid (vm.create() applies the
  spec over the path-derived defaults); ``create_vm`` still verifies and falls
  back to ReconfigVM_Task, which also applies instanceUuid.
* Disks: a backing file with no fileOperation must already exist (vcsim only
  stat()s it); fileOperation=create makes an empty file (only *.vmdk names
  work: it makes X-flat.vmdk and X.vmdk). Real disk files under a datastore are
  referenced as they are; a missing one becomes an empty stub in the VM's vcsim
  directory (below). Destroy_Task deletes every attached disk file, as vSphere
  does: ``delete_vm`` detaches the site's disks first, a raw Destroy_Task will
  delete them.
* VM files: vcsim writes <name>.vmx, .nvram and vmware.log next to
  files.vmPathName and Destroy_Task deletes that whole directory, so VM files
  live in ``<datastore>/.vcsim/<instance_uuid>/``, never next to the site's disks.
* CreateLocalDatastore(name, path) needs an existing directory and is called
  once per host (capacity comes from the file system, not the inventory).
* AddPortGroup creates a vim.Network on the first host only (a second host
  gets DuplicateName). Isolated networks go on a vSwitch without uplinks.
* Host cpu/memory/state are not mirrored (every host is the stock simulated
  ESX, connected). RelocateVM_Task updates runtime.host and resourcePool only:
  the hosts' ``vm`` lists keep the creation host, so read runtime.host.
* WaitForUpdatesEx: see simulator/vcenter_watch.py.
"""

from __future__ import annotations

import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

from simulator.vcenter_watch import VCenterWatch
from simulator.vcsim_process import MAIN_GO, Vcsim, VcsimBuildError, build_vcsim

__all__ = ["MAIN_GO", "VCenterMirror", "Vcsim", "VcsimBuildError", "build_vcsim"]

PC = vmodl.query.PropertyCollector
VCSIM_DIR = ".vcsim"            # per-datastore directory holding vcsim's own VM files
ISOLATED_VSWITCH = "vSwitch-isolated"
TASK_TIMEOUT = 60.0


def _extra(vm: dict) -> dict:
    """extraConfig the ZVM's vSphere adapter reads: appliance image, NICs' re-IP addresses
    (keys as in appliance/zvm/hypervisor/vsphere_specs.py; OVF properties stay out: secrets)."""
    out = {f"guestinfo.tidemark.nic{i}.ip": n["ip"] for i, n in enumerate(vm.get("nics", []))
           if n.get("ip")}
    if vm.get("image"):
        out["tidemark.image"] = vm["image"]
    return out


def _wait(task, timeout: float = TASK_TIMEOUT):
    """Poll a task (no PropertyCollector involved) until it ends; return its result."""
    deadline = time.monotonic() + timeout
    while True:
        info = task.info
        if info.state == vim.TaskInfo.State.success:
            return info.result
        if info.state == vim.TaskInfo.State.error:
            raise info.error
        if time.monotonic() > deadline:
            raise TimeoutError(f"task {task._moId} still {info.state} after {timeout} s")
        time.sleep(0.02)


class VCenterMirror(VCenterWatch):
    """A pyvmomi session on vcsim that mirrors one site's inventory.

    Methods are serialised by a lock and safe to call from several threads;
    ``watch(callback, stop_event)`` (from `VCenterWatch`) opens its own session.
    """

    def __init__(self, url: str, user: str = "user", password: str = "pass") -> None:
        u = urlparse(url)
        tls = u.scheme == "https"
        self._connect = dict(host=u.hostname, port=u.port or (443 if tls else 80), user=user,
                             pwd=password, protocol=u.scheme or "http", path=u.path or "/sdk")
        if tls:
            self._connect["disableSslCertValidation"] = True
        self.si = SmartConnect(**self._connect)
        self.content = self.si.RetrieveContent()
        self._lock = threading.RLock()
        self._adopt: dict[str, tuple] = {}  # VM name -> (moid, power) of a vCenter-made VM adopted
        self._init_watch()

    def close(self) -> None:
        """Log out of vcsim."""
        Disconnect(self.si)

    # ----------------------------------------------------------------- lookups
    def _collect(self, vimtype, props: list[str]) -> list[tuple]:
        """[(moref, {prop: value})] for every ``vimtype`` object in the inventory."""
        content = self.content
        view = content.viewManager.CreateContainerView(content.rootFolder, [vimtype], True)
        try:
            trav = PC.TraversalSpec(name="view", path="view", skip=False, type=vim.view.ContainerView)
            spec = PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=view, skip=True, selectSet=[trav])],
                                 propSet=[PC.PropertySpec(type=vimtype, pathSet=props)])
            res = content.propertyCollector.RetrievePropertiesEx([spec], PC.RetrieveOptions())
            out = []
            while res:
                out += [(o.obj, {p.name: p.val for p in o.propSet}) for o in res.objects]
                res = (content.propertyCollector.ContinueRetrievePropertiesEx(res.token)
                       if res.token else None)
            return out
        finally:
            view.DestroyView()

    def _by_name(self, vimtype, name: str, required: bool = True):
        obj = next((o for o, p in self._collect(vimtype, ["name"]) if p.get("name") == name), None)
        if obj is None and required:
            raise LookupError(f"no {vimtype.__name__} named {name!r} in vcsim")
        return obj

    def _vm(self, name: str) -> vim.VirtualMachine:
        return self._by_name(vim.VirtualMachine, name)

    def _host(self, name: str) -> vim.HostSystem:
        return self._by_name(vim.HostSystem, name)

    def _datacenter(self, name: str) -> vim.Datacenter:
        dc = next((e for e in self.content.rootFolder.childEntity
                   if isinstance(e, vim.Datacenter) and e.name == name), None)
        return dc or self.content.rootFolder.CreateDatacenter(name=name)

    # -------------------------------------------------------------------- sync
    def sync(self, inventory: dict) -> None:
        """Create in vcsim whatever of ``inventory`` is missing (idempotent).

        Existing VMs (found by instance uuid, else name) are renamed, relocated
        and powered to match; objects vcsim has but the inventory lacks are kept.
        """
        with self._lock:
            dc = self._datacenter(inventory["datacenter"])
            clusters = {c.name: c for c in dc.hostFolder.childEntity}
            for c in inventory.get("clusters", []):
                if c["name"] not in clusters:
                    clusters[c["name"]] = dc.hostFolder.CreateClusterEx(
                        name=c["name"], spec=vim.cluster.ConfigSpecEx())
            hosts = {o.name: o for o, _ in self._collect(vim.HostSystem, ["name"])}
            for h in inventory.get("hosts", []):
                if h["name"] in hosts:
                    continue
                spec = vim.host.ConnectSpec(hostName=h["name"], force=True)
                if h.get("cluster"):
                    task = clusters[h["cluster"]].AddHost_Task(spec=spec, asConnected=True)
                else:
                    task = dc.hostFolder.AddStandaloneHost_Task(spec=spec, addConnected=True)
                hosts[h["name"]] = _wait(task)
            site_hosts = [hosts[h["name"]] for h in inventory.get("hosts", [])]
            for ds in inventory.get("datastores", []):
                Path(ds["path"]).mkdir(parents=True, exist_ok=True)
                for host in site_hosts:
                    if all(d.name != ds["name"] for d in host.datastore):
                        host.configManager.datastoreSystem.CreateLocalDatastore(
                            name=ds["name"], path=str(Path(ds["path"]).resolve()))
            self._sync_networks(dc, inventory.get("networks", []), site_hosts)
            by_uuid = {p.get("config.instanceUuid"): o for o, p in
                       self._collect(vim.VirtualMachine, ["config.instanceUuid"])}
            for vm in inventory.get("vms", []):
                obj = (by_uuid.get(vm.get("instance_uuid") or "-")
                       or self._by_name(vim.VirtualMachine, vm["name"], required=False))
                if obj is None:
                    self.create_vm(inventory, vm)
                    continue
                if obj.name != vm["name"]:
                    self.rename_vm(obj.name, vm["name"])
                self.relocate(vm["name"], vm["host"])
                self._set_power(obj, vm.get("power_state", "poweredOff"))

    def _sync_networks(self, dc, networks: list[dict], hosts: list) -> None:
        existing = {n.name for n in dc.network}
        missing = [n for n in networks if n["name"] not in existing]
        if not missing:
            return
        if not hosts:
            raise ValueError("networks need at least one host to carry their port groups")
        netsys = hosts[0].configManager.networkSystem
        for net in missing:
            vswitch = "vSwitch0"
            if net.get("isolated"):
                vswitch = ISOLATED_VSWITCH
                if all(v.name != vswitch for v in netsys.networkInfo.vswitch):
                    netsys.AddVirtualSwitch(vswitchName=vswitch)
            netsys.AddPortGroup(portgrp=vim.host.PortGroup.Specification(
                name=net["name"], vlanId=0, vswitchName=vswitch, policy=vim.host.NetworkPolicy()))

    # --------------------------------------------------------------------- VMs
    @contextmanager
    def adopting(self, name: str, moid: str, power_state: str):
        """While inside, ``create_vm`` of a VM named ``name`` takes the existing vcsim VM
        ``moid`` (created through vCenter by someone else) instead of creating one; the site
        then applies ``power_state``, the state the watch reported, which is what it believes."""
        with self._lock:
            self._adopt[name] = (moid, power_state)
        try:
            yield
        finally:
            with self._lock:
                self._adopt.pop(name, None)

    def create_vm(self, site_inventory: dict, vm: dict) -> vim.VirtualMachine:
        """Create ``vm`` (an inventory VM dict) on its host, then set its power state."""
        with self._lock:
            if vm["name"] in self._adopt:
                moid, power = self._adopt[vm["name"]]
                obj = vim.VirtualMachine(moid, self.si._stub)
                with self._changing(obj, (vm["name"], vm["host"], power)):
                    pass
                return obj
            dc = self._datacenter(site_inventory["datacenter"])
            ds_paths = {d["name"]: Path(d["path"]).resolve() for d in site_inventory["datastores"]}
            host = self._host(vm["host"])
            for _, p in self._collect(vim.VirtualMachine, ["name", "config.instanceUuid"]):
                if p.get("name") == vm["name"] or (
                        vm.get("instance_uuid") and p.get("config.instanceUuid") == vm["instance_uuid"]):
                    raise ValueError(f"VM {vm['name']!r} (or its instance uuid) already in vcsim")
            key = vm.get("instance_uuid") or vm["name"]
            vm_dir = ds_paths[vm["datastore"]] / VCSIM_DIR / key
            shutil.rmtree(vm_dir, ignore_errors=True)  # left over by an earlier vcsim run
            vm_dir.parent.mkdir(parents=True, exist_ok=True)
            vmx = f"[{vm['datastore']}] {VCSIM_DIR}/{key}/{vm['name']}.vmx"
            spec = vim.vm.ConfigSpec(
                name=vm["name"], instanceUuid=vm.get("instance_uuid"), uuid=vm.get("bios_uuid"),
                numCPUs=vm.get("vcpus", 1), memoryMB=vm.get("memory_mib", 512),
                guestId="otherGuest64", files=vim.vm.FileInfo(vmPathName=vmx),
                deviceChange=self._devices(vm, ds_paths, key, {n.name: n for n in dc.network}),
                extraConfig=[vim.option.OptionValue(key=k, value=v) for k, v in _extra(vm).items()])
            power = vm.get("power_state", "poweredOff")
            with self._changing(None, (vm["name"], vm["host"], power)) as created:
                created["vm"] = obj = _wait(dc.vmFolder.CreateVM_Task(
                    config=spec, pool=host.parent.resourcePool, host=host))
                if spec.instanceUuid and obj.config.instanceUuid != spec.instanceUuid:
                    _wait(obj.ReconfigVM_Task(vim.vm.ConfigSpec(instanceUuid=spec.instanceUuid)))
                if power in ("poweredOn", "suspended"):
                    _wait(obj.PowerOnVM_Task())
                if power == "suspended":
                    _wait(obj.SuspendVM_Task())
            return obj

    def _devices(self, vm: dict, ds_paths: dict, key: str, networks: dict) -> list:
        """Device specs: one PVSCSI controller, the disks, one vmxnet3 NIC per nic."""
        add = vim.vm.device.VirtualDeviceSpec.Operation.add
        ctrl = vim.vm.device.ParaVirtualSCSIController(
            key=-100, busNumber=0, sharedBus=vim.vm.device.VirtualSCSIController.Sharing.noSharing)
        changes = [vim.vm.device.VirtualDeviceSpec(operation=add, device=ctrl)]
        units = (u for u in range(64) if u != 7)  # unit 7 is the SCSI controller itself
        for disk in sorted(vm.get("disks", []), key=lambda d: d.get("index", 0)):
            ds = disk.get("datastore", vm["datastore"])
            real = Path(disk["path"]).resolve() if disk.get("path") else None
            file_op = None
            if real and real.is_relative_to(ds_paths[ds]) and real.is_file() and (
                    real.suffix != ".vmdk" or real.with_name(real.stem + "-flat.vmdk").is_file()):
                name = f"[{ds}] {real.relative_to(ds_paths[ds]).as_posix()}"
            else:  # vcsim creates (and on destroy deletes) an empty stub in our own directory
                ds, file_op = vm["datastore"], vim.vm.device.VirtualDeviceSpec.FileOperation.create
                name = f"[{ds}] {VCSIM_DIR}/{key}/disk{disk.get('index', 0)}.vmdk"
            backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=name, diskMode="persistent", thinProvisioned=True)
            device = vim.vm.device.VirtualDisk(
                key=-(1000 + disk.get("index", 0)), controllerKey=-100, unitNumber=next(units),
                capacityInBytes=disk["capacity_bytes"], capacityInKB=disk["capacity_bytes"] // 1024,
                backing=backing)
            changes.append(vim.vm.device.VirtualDeviceSpec(
                operation=add, device=device, fileOperation=file_op))
        for i, nic in enumerate(vm.get("nics", [])):
            net = networks.get(nic["network"])
            if net is None:
                raise LookupError(f"network {nic['network']!r} of VM {vm['name']!r} not in vcsim")
            device = vim.vm.device.VirtualVmxnet3(
                key=-(2000 + i), addressType="manual", macAddress=nic["mac"],
                backing=vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
                    deviceName=net.name, network=net),
                connectable=vim.vm.device.VirtualDevice.ConnectInfo(
                    startConnected=True, connected=True, allowGuestControl=True))
            changes.append(vim.vm.device.VirtualDeviceSpec(operation=add, device=device))
        return changes

    def delete_vm(self, name: str) -> None:
        """Power off (if needed) and destroy the VM, keeping the site's disk files.

        Destroy_Task deletes every attached disk file (as vSphere does), so the
        disks that are not vcsim stubs are detached first; vcsim then deletes the
        VM's own .vcsim directory.
        """
        with self._lock:
            vm = self._by_name(vim.VirtualMachine, name, required=False)
            if vm is None:   # destroyed through vCenter already
                return
            self._set_power(vm, "poweredOff")
            site_disks = [d for d in vm.config.hardware.device
                          if isinstance(d, vim.vm.device.VirtualDisk)
                          and f"] {VCSIM_DIR}/" not in d.backing.fileName]
            if site_disks:
                remove = vim.vm.device.VirtualDeviceSpec.Operation.remove
                _wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[
                    vim.vm.device.VirtualDeviceSpec(operation=remove, device=d)
                    for d in site_disks])))
            with self._changing(vm, None):
                _wait(vm.Destroy_Task())

    def set_nics(self, site_inventory: dict, vm: dict) -> None:
        """Make the VM's cards match ``vm["nics"]`` (network, MAC) and its re-IP extraConfig."""
        with self._lock:
            obj = self._vm(vm["name"])
            dc = self._datacenter(site_inventory["datacenter"])
            nets = {n.name: n for n in dc.network}
            cards = [d for d in obj.config.hardware.device
                     if isinstance(d, vim.vm.device.VirtualEthernetCard)]
            op = vim.vm.device.VirtualDeviceSpec.Operation
            changes = []
            for i, nic in enumerate(vm["nics"]):
                if nic["network"] not in nets:
                    raise LookupError(f"network {nic['network']!r} not in vcsim")
                dev = cards[i] if i < len(cards) else vim.vm.device.VirtualVmxnet3(
                    key=-(2000 + i), connectable=vim.vm.device.VirtualDevice.ConnectInfo(
                        startConnected=True, connected=True, allowGuestControl=True))
                dev.addressType, dev.macAddress = "manual", nic["mac"]
                dev.backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
                    deviceName=nic["network"], network=nets[nic["network"]])
                changes.append(vim.vm.device.VirtualDeviceSpec(
                    operation=op.edit if i < len(cards) else op.add, device=dev))
            changes += [vim.vm.device.VirtualDeviceSpec(operation=op.remove, device=d)
                        for d in cards[len(vm["nics"]):]]
            extra = {**{f"guestinfo.tidemark.nic{i}.ip": "" for i in range(len(cards))}, **_extra(vm)}
            extra.pop("tidemark.image", None)
            with self._changing(obj, (obj.name, obj.runtime.host.name, str(obj.runtime.powerState))):
                _wait(obj.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=changes, extraConfig=[
                    vim.option.OptionValue(key=k, value=v) for k, v in extra.items()])))

    def rename_vm(self, old: str, new: str) -> None:
        """Rename a VM (vcsim keeps its files where they are)."""
        with self._lock:
            vm = self._vm(old)
            with self._changing(vm, (new, vm.runtime.host.name, str(vm.runtime.powerState))):
                _wait(vm.Rename_Task(newName=new))

    def relocate(self, vm_name: str, host_name: str) -> None:
        """vMotion ``vm_name`` to ``host_name`` (RelocateVM_Task with host and pool)."""
        with self._lock:
            vm, host = self._vm(vm_name), self._host(host_name)
            if vm.runtime.host == host:
                return
            spec = vim.vm.RelocateSpec(host=host, pool=host.parent.resourcePool)
            with self._changing(vm, (vm_name, host_name, str(vm.runtime.powerState))):
                _wait(vm.RelocateVM_Task(spec=spec))

    def power(self, vm_name: str, on: bool) -> None:
        """Power a VM on or off (no-op when it already is)."""
        with self._lock:
            self._set_power(self._vm(vm_name), "poweredOn" if on else "poweredOff")

    def _set_power(self, vm, state: str) -> None:
        current = str(vm.runtime.powerState)
        if current == state:
            return
        name, host = vm.name, vm.runtime.host.name
        if state == "suspended" and current == "poweredOff":
            self._set_power(vm, "poweredOn")
        task = {"poweredOn": vm.PowerOnVM_Task, "poweredOff": vm.PowerOffVM_Task,
                "suspended": vm.SuspendVM_Task}[state]
        with self._changing(vm, (name, host, state)):
            _wait(task())

    # ------------------------------------------------------------- read back
    def snapshot(self) -> dict:
        """{"hosts": [names], "vms": [{name, instance_uuid, host, power_state, disks}]}."""
        with self._lock:
            hosts = {o._moId: p.get("name") for o, p in self._collect(vim.HostSystem, ["name"])}
            vms = []
            props = ["name", "config.instanceUuid", "runtime.host", "runtime.powerState",
                     "config.hardware.device"]
            for _, p in self._collect(vim.VirtualMachine, props):
                host = p.get("runtime.host")
                disks = [d.capacityInBytes or d.capacityInKB * 1024
                         for d in p.get("config.hardware.device", [])
                         if isinstance(d, vim.vm.device.VirtualDisk)]
                vms.append({"name": p.get("name"), "instance_uuid": p.get("config.instanceUuid"),
                            "host": hosts.get(host._moId) if host else None,
                            "power_state": str(p.get("runtime.powerState")), "disks": disks})
            return {"hosts": sorted(hosts.values()), "vms": sorted(vms, key=lambda v: v["name"])}
