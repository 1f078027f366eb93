"""vCenter through pyvmomi as a `Hypervisor` (tested against vcsim, govmomi's vCenter simulator).

Reads go through one PropertyCollector ``RetrievePropertiesEx`` over a recursive
ContainerView per call (never one round trip per VM); ``poll()`` reads VMs and hosts in one
such call. Operations are vSphere tasks, waited for: PowerOnVM_Task, ShutdownGuest (then
PowerOffVM_Task if the guest has not stopped), RelocateVM_Task, CreateVM_Task, ReconfigVM_Task,
Destroy_Task. Appliance images, OVF properties, recovery-image disks and re-IP settings travel
in extraConfig keys (vsphere_specs.py). The password is never logged nor kept in a repr.
"""
from __future__ import annotations

import http.client
import logging
import ssl
import time
from contextlib import contextmanager

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

from . import vsphere_specs as specs
from .base import (Cluster, Datastore, Disk, Folder, Host, Hypervisor, Network, Nic, NicSpec,
                   ResourcePool, SiteInfo, Snapshot, VM, VMSpec)
from .errors import (AuthenticationFailed, HypervisorError, InvalidSpec, InvalidState, NotFound,
                     Unreachable)

log = logging.getLogger("tidemark.zvm.hypervisor.vsphere")
PC = vmodl.query.PropertyCollector
VM_PROPS = ["name", "config.instanceUuid", "runtime.host", "runtime.powerState",
            "config.hardware.numCPU", "config.hardware.memoryMB", "config.hardware.device",
            "config.extraConfig", "guest.net", "config.template"]
_STATE_FAULTS = (vim.fault.InvalidState, vim.fault.InvalidPowerState, vim.fault.InvalidHostState,
                 vim.fault.TaskInProgress)
_SPEC_FAULTS = (vim.fault.DuplicateName, vmodl.fault.InvalidArgument, vim.fault.InvalidDeviceSpec,
                vim.fault.FileFault, vim.fault.VmConfigFault, vmodl.fault.NotSupported)


@contextmanager
def faults(what: str):
    """Turn pyvmomi faults and socket errors into the adapter's errors, naming the step."""
    try:
        yield
    except HypervisorError:
        raise
    except vim.fault.InvalidLogin as exc:
        raise AuthenticationFailed(f"{what}: vCenter refused the user name or password") from exc
    except vmodl.fault.ManagedObjectNotFound as exc:
        raise NotFound(f"{what}: the object is gone from vCenter ({exc.obj}); list the inventory again") from exc
    except _STATE_FAULTS as exc:
        raise InvalidState(f"{what}: {exc.msg or type(exc).__name__}") from exc
    except _SPEC_FAULTS as exc:
        raise InvalidSpec(f"{what}: {exc.msg or type(exc).__name__}") from exc
    except vmodl.MethodFault as exc:
        raise HypervisorError(f"{what}: {type(exc).__name__}: {exc.msg}") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise Unreachable(f"{what}: vCenter does not answer ({exc}); check its address and that it runs") from exc


class VSphereHypervisor(Hypervisor):
    kind = "vsphere"

    def __init__(self, host: str, user: str, password: str, port: int | None = None,
                 protocol: str = "https", insecure: bool = False, ca_file: str | None = None,
                 path: str = "/sdk", datacenter: str | None = None, task_timeout: float = 300.0,
                 shutdown_timeout: float = 120.0):
        super().__init__()
        self.address = f"{protocol}://{host}:{port or (443 if protocol == 'https' else 80)}{path}"
        kw = dict(host=host, port=port or (443 if protocol == "https" else 80), user=user, pwd=password,
                  protocol=protocol, path=path)
        if protocol == "https":
            if insecure:
                kw["disableSslCertValidation"] = True
            elif ca_file:
                kw["sslContext"] = ssl.create_default_context(cafile=ca_file)
        self.task_timeout, self.shutdown_timeout = task_timeout, shutdown_timeout
        with faults(f"log in to {self.address} as {user}"):
            self.si = SmartConnect(**kw)
            self.content = self.si.RetrieveContent()
        self._dc_name = datacenter

    def __repr__(self) -> str:
        return f"VSphereHypervisor({self.address})"

    def close(self) -> None:
        try:
            Disconnect(self.si)
        except Exception:   # already gone: nothing to release
            pass

    # ----------------------------------------------------------------- plumbing
    def _ref(self, vimtype, moid: str):
        return vimtype(moid, self.si._stub)

    def _retrieve(self, wanted: list[tuple], obj=None) -> dict:
        """{vimtype: [(moref, {prop: value})]} in one call, over all objects (or ``obj``)."""
        content = self.content
        view = None
        if obj is None:
            view = content.viewManager.CreateContainerView(content.rootFolder, [t for t, _ in wanted], True)
            trav = PC.TraversalSpec(name="view", path="view", skip=False, type=vim.view.ContainerView)
            ospec = PC.ObjectSpec(obj=view, skip=True, selectSet=[trav])
        else:
            ospec = PC.ObjectSpec(obj=obj, skip=False)
        try:
            spec = PC.FilterSpec(objectSet=[ospec],
                                 propSet=[PC.PropertySpec(type=t, pathSet=p) for t, p in wanted])
            res = content.propertyCollector.RetrievePropertiesEx([spec], PC.RetrieveOptions())
            out = {t: [] for t, _ in wanted}
            named = {t for t, p in wanted if "name" in p}
            while res:
                for o in res.objects:
                    for t in out:
                        if isinstance(o.obj, t):
                            props = {p.name: p.val for p in o.propSet or []}
                            if t in named and "name" not in props:
                                break       # being created or destroyed as we read: not there yet
                            out[t].append((o.obj, props))
                            break
                res = (content.propertyCollector.ContinueRetrievePropertiesEx(res.token)
                       if res.token else None)
            return out
        finally:
            if view is not None:
                view.DestroyView()

    def _collect(self, vimtype, props: list[str]) -> list[tuple]:
        with faults(f"read {vimtype.__name__} objects"):
            return self._retrieve([(vimtype, props)])[vimtype]

    def _wait(self, task, what: str, timeout: float | None = None):
        deadline = time.monotonic() + (timeout or self.task_timeout)
        with faults(what):
            while True:
                info = task.info
                if info.state == vim.TaskInfo.State.success:
                    return info.result
                if info.state == vim.TaskInfo.State.error:
                    raise info.error
                if time.monotonic() > deadline:
                    raise HypervisorError(f"{what}: task {task._moId} still {info.state} after "
                                          f"{timeout or self.task_timeout:.0f} s")
                time.sleep(0.05)

    def _datacenter(self):
        dcs = [o for o, p in self._collect(vim.Datacenter, ["name"])
               if self._dc_name in (None, p.get("name"))]
        if not dcs:
            raise NotFound(f"vCenter {self.address} has no datacenter {self._dc_name or ''}".strip())
        return dcs[0]

    def _vm_obj(self, vm_id: str):
        with faults(f"find VM {vm_id}"):
            vm = self._ref(vim.VirtualMachine, vm_id)
            found = self._retrieve([(vim.VirtualMachine, ["name"])], obj=vm)[vim.VirtualMachine]
        if not found:
            raise NotFound(f"no VM with id {vm_id!r}: it may have been deleted; list the VMs again")
        return vm

    def _host_obj(self, host_id: str):
        hosts = {o._moId: o for o, _ in self._collect(vim.HostSystem, ["name"])}
        if host_id not in hosts:
            raise NotFound(f"no host with id {host_id!r} in vCenter")
        return hosts[host_id]

    # ---------------------------------------------------------------- inventory
    def site(self) -> SiteInfo:
        with faults("read the datacenter"):
            dc = self._datacenter()
            return SiteInfo(name=dc.name, kind="vsphere", datacenter=dc.name,
                            version=self.content.about.fullName)

    def hosts(self) -> list[Host]:
        out = []
        for o, p in self._collect(vim.HostSystem, ["name", "parent", "runtime.connectionState"]):
            parent = p.get("parent")
            out.append(Host(id=o._moId, name=p["name"],
                            cluster_id=parent._moId if isinstance(parent, vim.ClusterComputeResource) else None,
                            state="connected" if p.get("runtime.connectionState") == "connected"
                            else "disconnected"))
        return sorted(out, key=lambda h: h.name)

    def clusters(self) -> list[Cluster]:
        return sorted((Cluster(id=o._moId, name=p["name"], host_ids=tuple(h._moId for h in p.get("host", [])))
                       for o, p in self._collect(vim.ClusterComputeResource, ["name", "host"])),
                      key=lambda c: c.name)

    def datastores(self) -> list[Datastore]:
        return sorted((Datastore(id=o._moId, name=p["name"], capacity_bytes=p["summary.capacity"],
                                 free_bytes=p["summary.freeSpace"])
                       for o, p in self._collect(vim.Datastore, ["name", "summary.capacity",
                                                                 "summary.freeSpace"])),
                      key=lambda d: d.name)

    def datastore_path(self, datastore_id: str) -> str | None:
        """A local datastore's folder (vcsim: the real directory); None for ds:/// URLs."""
        found = {o._moId: p.get("info.url") for o, p in self._collect(vim.Datastore, ["info.url"])}
        if datastore_id not in found:
            raise NotFound(f"no datastore with id {datastore_id!r} in vCenter")
        url = found[datastore_id] or ""
        return url if url.startswith("/") else None

    def networks(self) -> list[Network]:
        """Networks; a standard port group is isolated when its vSwitch has no uplink on any host."""
        with faults("read the networks"):
            got = self._retrieve([(vim.Network, ["name"]),
                                  (vim.HostSystem, ["configManager.networkSystem", "config.network"])])
            systems = [p["configManager.networkSystem"] for _, p in got[vim.HostSystem]
                       if p.get("configManager.networkSystem") is not None]
            infos = []
            if systems:    # one more call for all hosts' vSwitches and port groups
                spec = PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=s) for s in systems],
                                     propSet=[PC.PropertySpec(type=vim.host.NetworkSystem,
                                                              pathSet=["networkInfo"])])
                res = self.content.propertyCollector.RetrievePropertiesEx([spec], PC.RetrieveOptions())
                infos = [ps.val for o in (res.objects if res else []) for ps in o.propSet or []]
        # A vSwitch counts as uplinked when either view lists a physical NIC (vcsim 0.24 keeps
        # them in config.network only, and adds new vSwitches to networkInfo only).
        switch_up = {v.name for _, p in got[vim.HostSystem] if p.get("config.network")
                     for v in p["config.network"].vswitch or [] if v.pnic}
        uplinked: dict[str, bool] = {}
        for cfg in infos:
            up = {v.name: bool(v.pnic) or v.name in switch_up for v in cfg.vswitch or []}
            for pg in cfg.portgroup or []:
                uplinked[pg.spec.name] = uplinked.get(pg.spec.name, False) or up.get(pg.spec.vswitchName, False)
        return sorted((Network(id=o._moId, name=p["name"],
                               isolated=not uplinked.get(p["name"], True))
                       for o, p in got[vim.Network]), key=lambda n: n.name)

    def folders(self) -> list[Folder]:
        return sorted((Folder(id=o._moId, name=p["name"], parent_id=getattr(p.get("parent"), "_moId", None))
                       for o, p in self._collect(vim.Folder, ["name", "parent", "childType"])
                       if "VirtualMachine" in (p.get("childType") or [])), key=lambda f: f.id)

    def resource_pools(self) -> list[ResourcePool]:
        out = []
        for o, p in self._collect(vim.ResourcePool, ["name", "owner"]):
            owner = p.get("owner")
            out.append(ResourcePool(id=o._moId, name=p["name"], cluster_id=owner._moId if isinstance(
                owner, vim.ClusterComputeResource) else None))
        return sorted(out, key=lambda r: r.id)

    def _ds_names(self) -> dict[str, str]:
        return {p["name"]: o._moId for o, p in self._collect(vim.Datastore, ["name"])}

    @staticmethod
    def _disk_ds(backing, ds_ids: dict[str, str]) -> str | None:
        """A disk's datastore id: from its "[name] path" (vcsim's backing.datastore is not a
        datastore MoRef), else from backing.datastore."""
        name = (getattr(backing, "fileName", "") or "").partition("]")[0].lstrip("[")
        if name in ds_ids:
            return ds_ids[name]
        return getattr(getattr(backing, "datastore", None), "_moId", None)

    def _vm_from(self, obj, p: dict, ds_ids: dict[str, str]) -> VM | None:
        if not p.get("config.instanceUuid") or p.get("config.template"):
            return None       # being created, or a template
        extra = specs.extra_config(p.get("config.extraConfig"))
        devices = p.get("config.hardware.device") or []
        guest_ip = {}
        for g in p.get("guest.net") or []:
            if g.ipAddress:
                guest_ip[g.deviceConfigId] = g.ipAddress[0]
        cards = [d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)]
        nics = []
        for i, d in enumerate(cards):
            b = d.backing
            net = getattr(b, "network", None)
            net_id = net._moId if net is not None else getattr(getattr(b, "port", None), "portgroupKey", None)
            nics.append(Nic(index=i, id=str(d.key), network_id=net_id, mac=d.macAddress or "",
                            ip=extra.get(specs.nic_key(i, "ip")) or guest_ip.get(d.key)))
        disks = sorted((d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)),
                       key=lambda d: (d.controllerKey, d.unitNumber or 0))
        return VM(id=obj._moId, name=p["name"], instance_uuid=p["config.instanceUuid"],
                  host_id=getattr(p.get("runtime.host"), "_moId", None),
                  power_state=str(p.get("runtime.powerState")), cpus=p.get("config.hardware.numCPU", 0),
                  memory_mib=p.get("config.hardware.memoryMB", 0), nics=tuple(nics),
                  disks=tuple(Disk(index=i, capacity_bytes=d.capacityInBytes or d.capacityInKB * 1024,
                                   datastore_id=self._disk_ds(d.backing, ds_ids),
                                   path=getattr(d.backing, "fileName", "") or "")
                              for i, d in enumerate(disks)),
                  image=extra.get(specs.IMAGE_KEY))

    def vms(self) -> list[VM]:
        with faults("read the VMs"):
            got = self._retrieve([(vim.VirtualMachine, VM_PROPS), (vim.Datastore, ["name"])])
        ds_ids = {p["name"]: o._moId for o, p in got[vim.Datastore]}
        out = (self._vm_from(o, p, ds_ids) for o, p in got[vim.VirtualMachine])
        return sorted((v for v in out if v is not None), key=lambda v: v.name)

    def vm(self, vm_id: str) -> VM:
        obj = self._vm_obj(vm_id)
        with faults(f"read VM {vm_id}"):
            found = self._retrieve([(vim.VirtualMachine, VM_PROPS)], obj=obj)[vim.VirtualMachine]
        vm = self._vm_from(*found[0], self._ds_names()) if found else None
        if vm is None:
            raise NotFound(f"no VM with id {vm_id!r} (or it is a template, or still being created)")
        return vm

    def _state(self) -> Snapshot:
        with faults("read VM and host states"):
            got = self._retrieve([(vim.VirtualMachine, ["name", "runtime.host", "runtime.powerState",
                                                        "config.template"]),
                                  (vim.HostSystem, ["name", "runtime.connectionState"])])
        return Snapshot(
            vms={o._moId: (p.get("name"), getattr(p.get("runtime.host"), "_moId", None),
                           str(p.get("runtime.powerState")))
                 for o, p in got[vim.VirtualMachine] if not p.get("config.template")},
            hosts={o._moId: (p.get("name"), "connected" if p.get("runtime.connectionState") == "connected"
                             else "disconnected") for o, p in got[vim.HostSystem]})

    # --------------------------------------------------------------- operations
    def _power_state(self, vm) -> str:
        with faults(f"read the power state of {vm._moId}"):
            return str(vm.runtime.powerState)

    def power_on(self, vm_id: str) -> None:
        vm = self._vm_obj(vm_id)
        if self._power_state(vm) != "poweredOn":
            self._wait(vm.PowerOnVM_Task(), f"power on VM {vm_id}")

    def power_off(self, vm_id: str, graceful: bool = True) -> None:
        vm = self._vm_obj(vm_id)
        if self._power_state(vm) == "poweredOff":
            return
        if graceful:
            try:
                with faults(f"shut down the guest of VM {vm_id}"):
                    vm.ShutdownGuest()
                deadline = time.monotonic() + self.shutdown_timeout
                while time.monotonic() < deadline:
                    if self._power_state(vm) == "poweredOff":
                        return
                    time.sleep(0.1)
                log.warning("guest of VM %s did not shut down in %.0f s: powering off",
                            vm_id, self.shutdown_timeout)
            except (NotFound, Unreachable):
                raise
            except HypervisorError as exc:    # no VMware Tools, a guest that refuses, ...
                log.info("graceful shutdown of VM %s refused (%s): powering off", vm_id, exc)
            if self._power_state(vm) == "poweredOff":
                return
        self._wait(vm.PowerOffVM_Task(), f"power off VM {vm_id}")

    def relocate(self, vm_id: str, host_id: str) -> None:
        vm, host = self._vm_obj(vm_id), self._host_obj(host_id)
        with faults(f"vMotion VM {vm_id} to {host_id}"):
            if vm.runtime.host == host:
                return
            task = vm.RelocateVM_Task(spec=vim.vm.RelocateSpec(host=host, pool=host.parent.resourcePool))
        self._wait(task, f"vMotion VM {vm_id} to {host_id}")

    def _networks(self) -> dict:
        return {o._moId: o for o, _ in self._collect(vim.Network, ["name"])}

    def create_vm(self, spec: VMSpec) -> VM:
        spec.validate()
        host = self._host_obj(spec.host_id)
        datastores = {o._moId: o for o, _ in self._collect(vim.Datastore, ["name"])}
        ds = datastores.get(spec.datastore_id)
        if ds is None:
            raise NotFound(f"no datastore with id {spec.datastore_id!r} in vCenter")
        with faults(f"prepare VM {spec.name}"):
            folder = self._ref(vim.Folder, spec.folder_id) if spec.folder_id else self._datacenter().vmFolder
            disk_devs, extra = specs.disk_changes(spec.name, spec.disks, datastores, spec.datastore_id)
            nic_devs = specs.nic_changes(spec.nics, self._networks(), [])
            extra.update({k: v for k, v in specs.nic_options(spec.nics).items() if v})
            if spec.image:
                extra[specs.IMAGE_KEY] = spec.image
                extra.update({specs.OVF_PREFIX + k: v for k, v in spec.properties.items()})
            config = vim.vm.ConfigSpec(
                name=spec.name, numCPUs=spec.cpus, memoryMB=spec.memory_mib, guestId="otherGuest64",
                files=vim.vm.FileInfo(vmPathName=f"[{ds.name}]"), deviceChange=disk_devs + nic_devs,
                extraConfig=specs.options(extra))
            task = folder.CreateVM_Task(config=config, pool=host.parent.resourcePool, host=host)
        obj = self._wait(task, f"create VM {spec.name}")
        if spec.power_on:
            self._wait(obj.PowerOnVM_Task(), f"power on VM {spec.name}")
        return self.vm(obj._moId)

    def delete_vm(self, vm_id: str, keep_disks: bool = False) -> None:
        vm = self._vm_obj(vm_id)
        if self._power_state(vm) != "poweredOff":
            self._wait(vm.PowerOffVM_Task(), f"power off VM {vm_id}")
        if keep_disks:     # "remove from inventory": every file of the VM stays
            with faults(f"unregister VM {vm_id}"):
                vm.UnregisterVM()
            return
        with faults(f"delete VM {vm_id}"):
            task = vm.Destroy_Task()
        self._wait(task, f"delete VM {vm_id}")

    def reconfigure_nics(self, vm_id: str, nics: list[NicSpec]) -> VM:
        vm = self._vm_obj(vm_id)
        with faults(f"reconfigure the NICs of VM {vm_id}"):
            cards = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)]
            config = vim.vm.ConfigSpec(deviceChange=specs.nic_changes(nics, self._networks(), cards),
                                       extraConfig=specs.options(specs.nic_options(nics, len(cards))))
            task = vm.ReconfigVM_Task(spec=config)
        self._wait(task, f"reconfigure the NICs of VM {vm_id}")
        return self.vm(vm_id)

    def appliance_properties(self, vm_id: str) -> dict:
        """The OVF properties an appliance VM was deployed with (they may hold secrets)."""
        vm = self._vm_obj(vm_id)
        with faults(f"read the settings of VM {vm_id}"):
            extra = specs.extra_config(vm.config.extraConfig)
        return {k[len(specs.OVF_PREFIX):]: v for k, v in extra.items() if k.startswith(specs.OVF_PREFIX)}

