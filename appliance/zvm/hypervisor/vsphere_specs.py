"""vSphere config specs for the `VSphereHypervisor`: devices and the extraConfig keys Tidemark uses.

extraConfig keys (the simulator's vcsim mirror reads the same ones):

    tidemark.image                 the appliance image of an appliance VM (tidemark-vra, ...)
    tidemark.ovf.<key>             its OVF properties (what an OVA deploy puts in vApp properties)
    tidemark.disk<N>.image         JSON {url, token, image, vm, disk}: disk N is a VRA recovery image
    guestinfo.tidemark.nic<N>.ip   re-IP configuration of NIC N, read by the guest through
    guestinfo.tidemark.nic<N>.prefix / .gateway / .dns   VMware Tools (guestinfo variables)

vSphere deletes an extraConfig key set to ""; vcsim 0.24 appends instead, so readers take the
last value of a key (`extra_config`).
"""
from __future__ import annotations

import json

from pyVmomi import vim

from .base import DiskSpec, NicSpec
from .errors import InvalidSpec

IMAGE_KEY = "tidemark.image"
OVF_PREFIX = "tidemark.ovf."
Op = vim.vm.device.VirtualDeviceSpec.Operation
FileOp = vim.vm.device.VirtualDeviceSpec.FileOperation


def disk_image_key(n: int) -> str:
    return f"tidemark.disk{n}.image"


def nic_key(n: int, what: str) -> str:
    return f"guestinfo.tidemark.nic{n}.{what}"


def extra_config(values) -> dict[str, str]:
    """extraConfig as a dict; the last of repeated keys wins, "" means unset."""
    out: dict[str, str] = {}
    for opt in values or []:
        out[opt.key] = opt.value
    return {k: v for k, v in out.items() if v not in ("", None)}


def options(d: dict) -> list:
    return [vim.option.OptionValue(key=k, value="" if v is None else str(v)) for k, v in d.items()]


def nic_options(nics: list[NicSpec], old_count: int = 0) -> dict:
    out = {}
    for i, n in enumerate(nics):
        out[nic_key(i, "ip")] = n.ip or ""
        out[nic_key(i, "prefix")] = "" if n.prefix is None else str(n.prefix)
        out[nic_key(i, "gateway")] = n.gateway or ""
        out[nic_key(i, "dns")] = ",".join(n.dns)
    for i in range(len(nics), old_count):
        for what in ("ip", "prefix", "gateway", "dns"):
            out[nic_key(i, what)] = ""
    return out


def nic_device(nic: NicSpec, network, key: int, old=None):
    """A vmxnet3 card on ``network`` (a vim.Network), or ``old`` moved there."""
    if isinstance(network, vim.dvs.DistributedVirtualPortgroup):
        backing = vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
            port=vim.dvs.PortConnection(portgroupKey=network.key,
                                        switchUuid=network.config.distributedVirtualSwitch.uuid))
    else:
        backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
            deviceName=network.name, network=network)
    dev = old or vim.vm.device.VirtualVmxnet3(
        key=key, connectable=vim.vm.device.VirtualDevice.ConnectInfo(
            startConnected=True, connected=True, allowGuestControl=True))
    dev.backing = backing
    if nic.mac:
        dev.addressType, dev.macAddress = "manual", nic.mac
    elif old is None:
        dev.addressType = "generated"
    return dev


def nic_changes(nics: list[NicSpec], networks: dict, existing: list) -> list:
    """Device changes turning ``existing`` cards into ``nics`` (edit, add, remove)."""
    changes = []
    for i, nic in enumerate(nics):
        net = networks.get(nic.network_id)
        if net is None:
            raise InvalidSpec(f"NIC {i}: no network with id {nic.network_id!r}")
        old = existing[i] if i < len(existing) else None
        changes.append(vim.vm.device.VirtualDeviceSpec(
            operation=Op.edit if old else Op.add, device=nic_device(nic, net, -(2000 + i), old)))
    for old in existing[len(nics):]:
        changes.append(vim.vm.device.VirtualDeviceSpec(operation=Op.remove, device=old))
    return changes


def disk_changes(name: str, disks: list[DiskSpec], datastores: dict, default_ds: str) -> tuple[list, dict]:
    """(device changes, extraConfig) for a new VM's disks on one PVSCSI controller."""
    ctrl = vim.vm.device.ParaVirtualSCSIController(
        key=-100, busNumber=0, sharedBus=vim.vm.device.VirtualSCSIController.Sharing.noSharing)
    changes = [vim.vm.device.VirtualDeviceSpec(operation=Op.add, device=ctrl)]
    extra = {}
    units = (u for u in range(64) if u != 7)        # unit 7 is the controller itself
    for i, d in enumerate(disks):
        ds = datastores.get(d.datastore_id or default_ds)
        if ds is None:
            raise InvalidSpec(f"VM {name} disk {i}: no datastore with id {d.datastore_id!r}")
        file_op = None
        if d.path:
            if not d.path.startswith("["):
                raise InvalidSpec(f"VM {name} disk {i}: a vSphere disk path is '[datastore] dir/file.vmdk'")
            file_name = d.path
        else:
            if d.capacity_bytes <= 0:
                raise InvalidSpec(f"VM {name} disk {i}: give the capacity of the disk")
            file_op, file_name = FileOp.create, ""      # vSphere names it in the VM's folder
            if d.recovery_image:
                extra[disk_image_key(i)] = json.dumps(d.recovery_image.as_dict())
        dev = vim.vm.device.VirtualDisk(
            key=-(1000 + i), controllerKey=-100, unitNumber=next(units),
            capacityInBytes=d.capacity_bytes or None,
            capacityInKB=d.capacity_bytes // 1024 if d.capacity_bytes else None,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=file_name, datastore=ds, diskMode="persistent", thinProvisioned=True))
        changes.append(vim.vm.device.VirtualDeviceSpec(operation=Op.add, device=dev, fileOperation=file_op))
    return changes, extra
