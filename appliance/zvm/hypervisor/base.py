"""The ZVM's one small interface to a hypervisor manager, and the plain values it speaks.

Every backend (vCenter through pyvmomi, the simulator's site API for vSphere-style and
Hyper-V-style sites, later SCVMM itself) is a `Hypervisor`. Ids are the platform's own:
vSphere managed-object ids (``vm-100``, ``host-10``), GUIDs on Hyper-V. Values are frozen
dataclasses; specs (what the ZVM asks for) are plain dataclasses.

Change following is one public synchronous method, ``poll()``, which compares the
inventory with the previous call's snapshot and returns `Change` events, plus a thin
thread, ``watch(callback, interval)``, that calls it. The default ``poll()`` reads the
state with ``_state()`` (one round trip in each backend); a backend may override either.
"""
from __future__ import annotations

import abc
import logging
import threading
from dataclasses import dataclass, field

from .errors import InvalidSpec, NotFound

log = logging.getLogger("tidemark.zvm.hypervisor")

APPLIANCE_IMAGES = ("tidemark-vra", "tidemark-zvm", "tidemark-zca", "tidemark-vba")
POWER_STATES = ("poweredOn", "poweredOff", "suspended")
CHANGE_KINDS = ("vm_added", "vm_removed", "vm_renamed", "vm_moved", "vm_power", "host_state")


# -------------------------------------------------------------------- inventory
@dataclass(frozen=True)
class SiteInfo:
    name: str
    kind: str            # "vsphere" | "hyperv"
    datacenter: str
    version: str         # the manager's product and version, e.g. "VMware vCenter Server 6.5.0"


@dataclass(frozen=True)
class Host:
    id: str
    name: str
    cluster_id: str | None
    state: str           # "connected" | "disconnected"


@dataclass(frozen=True)
class Cluster:
    id: str
    name: str
    host_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Datastore:
    id: str
    name: str
    capacity_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class Network:
    id: str
    name: str
    isolated: bool       # no uplink: for failover tests


@dataclass(frozen=True)
class Folder:
    id: str
    name: str
    parent_id: str | None = None


@dataclass(frozen=True)
class ResourcePool:
    id: str
    name: str
    cluster_id: str | None = None


@dataclass(frozen=True)
class Nic:
    index: int           # order on the VM, 0-based
    id: str              # the platform's device id (vSphere device key)
    network_id: str | None
    mac: str
    ip: str | None = None


@dataclass(frozen=True)
class Disk:
    index: int
    capacity_bytes: int
    datastore_id: str | None
    path: str            # backing: "[ds] dir/file.vmdk" on vSphere, a file path in the simulator


@dataclass(frozen=True)
class VM:
    id: str
    name: str
    instance_uuid: str
    host_id: str | None
    power_state: str     # one of POWER_STATES
    cpus: int
    memory_mib: int
    nics: tuple[Nic, ...] = ()
    disks: tuple[Disk, ...] = ()
    image: str | None = None   # appliance image (tidemark-vra, ...) or None


# ------------------------------------------------------------------------- specs
@dataclass
class NicSpec:
    network_id: str
    mac: str | None = None      # None: keep the NIC's MAC, or let the platform choose one
    ip: str | None = None       # re-IP: the address the guest gets (None: DHCP / unchanged)
    prefix: int | None = None   # and its prefix length, gateway, DNS servers
    gateway: str | None = None
    dns: tuple[str, ...] = ()


@dataclass
class RecoveryImage:
    """A disk served by a recovery VRA at a checkpoint (its image API)."""
    url: str
    token: str = field(repr=False)
    image: str
    vm: str
    disk: int

    def as_dict(self) -> dict:
        return {"url": self.url, "token": self.token, "image": self.image, "vm": self.vm,
                "disk": self.disk}


@dataclass
class DiskSpec:
    """Exactly one backing: a new empty disk (capacity only), an existing file, or an image."""
    capacity_bytes: int = 0
    datastore_id: str | None = None     # None: the VM's datastore
    path: str | None = None             # an existing disk file to attach
    recovery_image: RecoveryImage | None = None

    @property
    def backing(self) -> str:
        return "image" if self.recovery_image else "file" if self.path else "new"


@dataclass
class VMSpec:
    name: str
    host_id: str
    datastore_id: str
    folder_id: str | None = None
    cpus: int = 1
    memory_mib: int = 1024
    nics: list[NicSpec] = field(default_factory=list)
    disks: list[DiskSpec] = field(default_factory=list)
    power_on: bool = False
    image: str | None = None                                # appliance image
    properties: dict = field(default_factory=dict, repr=False)  # its OVF properties (secrets)

    def validate(self) -> None:
        if not self.name:
            raise InvalidSpec("a VM needs a name")
        if self.cpus < 1 or self.memory_mib < 4:
            raise InvalidSpec(f"VM {self.name}: cpus must be >= 1 and memory_mib >= 4")
        for i, d in enumerate(self.disks):
            if sum(x is not None for x in (d.path, d.recovery_image)) > 1:
                raise InvalidSpec(f"VM {self.name} disk {i}: give a path or a recovery image, not both")
            if d.backing == "new" and (d.capacity_bytes <= 0 or d.capacity_bytes % 4096):
                raise InvalidSpec(f"VM {self.name} disk {i}: a new disk needs a capacity that is "
                                  "a positive multiple of 4 KiB")
        if self.image is not None and self.image not in APPLIANCE_IMAGES:
            raise InvalidSpec(f"unknown appliance image {self.image!r}; known: "
                              f"{', '.join(APPLIANCE_IMAGES)}")


# ------------------------------------------------------------------------ change
@dataclass(frozen=True)
class Change:
    """One change noticed by ``poll()``.

    kind      id         name       old / new
    vm_added  vm id      VM name    None / host id
    vm_removed vm id     VM name    host id / None
    vm_renamed vm id     new name   old name / new name
    vm_moved  vm id      VM name    old host id / new host id
    vm_power  vm id      VM name    old / new power state
    host_state host id   host name  old / new state
    """
    kind: str
    id: str
    name: str
    old: str | None = None
    new: str | None = None


@dataclass
class Snapshot:
    """What change following compares: per VM (name, host id, power), per host (name, state)."""
    vms: dict[str, tuple[str, str | None, str]]
    hosts: dict[str, tuple[str, str]]


def diff(before: Snapshot, after: Snapshot) -> list[Change]:
    """The changes from one snapshot to the next, hosts first, then VMs by id."""
    out = []
    for hid, (name, state) in sorted(after.hosts.items()):
        old = before.hosts.get(hid)
        if old is not None and old[1] != state:
            out.append(Change("host_state", hid, name, old[1], state))
    for vid in sorted(before.vms.keys() - after.vms.keys()):
        name, host, _ = before.vms[vid]
        out.append(Change("vm_removed", vid, name, host, None))
    for vid, (name, host, power) in sorted(after.vms.items()):
        old = before.vms.get(vid)
        if old is None:
            out.append(Change("vm_added", vid, name, None, host))
            continue
        if old[0] != name:
            out.append(Change("vm_renamed", vid, name, old[0], name))
        if old[1] != host:
            out.append(Change("vm_moved", vid, name, old[1], host))
        if old[2] != power:
            out.append(Change("vm_power", vid, name, old[2], power))
    return out


class Watch:
    """A thread calling ``hypervisor.poll()`` every ``interval`` s and ``callback(change)`` for
    each change; errors are logged and the loop goes on. ``stop()`` ends it."""

    def __init__(self, hypervisor: "Hypervisor", callback, interval: float = 1.0):
        self.hypervisor, self.callback, self.interval = hypervisor, callback, interval
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="hypervisor-watch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                changes = self.hypervisor.poll()
            except Exception as exc:   # a manager that is down for a while: try again
                log.warning("hypervisor poll failed: %s", exc)
                changes = []
            for change in changes:
                try:
                    self.callback(change)
                except Exception:
                    log.exception("hypervisor watch callback failed for %s", change)
            self._stop.wait(self.interval)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)


# --------------------------------------------------------------------- interface
class Hypervisor(abc.ABC):
    """A site's hypervisor manager (vCenter, SCVMM, the simulator).

    Reads return fresh values; operations wait until they are done and raise a
    `HypervisorError` (NotFound, Unreachable, InvalidState, InvalidSpec, ...) otherwise.
    """

    kind = "abstract"        # backend name, as `connect()` takes it

    def __init__(self) -> None:
        self._last: Snapshot | None = None
        self._poll_lock = threading.Lock()

    # inventory
    @abc.abstractmethod
    def site(self) -> SiteInfo: ...

    @abc.abstractmethod
    def hosts(self) -> list[Host]: ...

    @abc.abstractmethod
    def clusters(self) -> list[Cluster]: ...

    @abc.abstractmethod
    def datastores(self) -> list[Datastore]: ...

    @abc.abstractmethod
    def networks(self) -> list[Network]: ...

    @abc.abstractmethod
    def folders(self) -> list[Folder]: ...

    @abc.abstractmethod
    def resource_pools(self) -> list[ResourcePool]: ...

    def datastore_path(self, datastore_id: str) -> str | None:
        """The datastore's folder on this machine's file system, when it has one (the
        simulator's datastores, vcsim's local datastores); None otherwise (VMFS, vSAN, NFS seen
        through ESXi). NotFound for an unknown id."""
        if all(d.id != datastore_id for d in self.datastores()):
            raise NotFound(f"no datastore with id {datastore_id!r}")
        return None

    @abc.abstractmethod
    def vms(self) -> list[VM]: ...

    def vm(self, vm_id: str) -> VM:
        """One VM by id; NotFound if there is none."""
        for v in self.vms():
            if v.id == vm_id:
                return v
        raise NotFound(f"no VM with id {vm_id!r}: it may have been deleted; list the VMs again")

    # operations
    @abc.abstractmethod
    def power_on(self, vm_id: str) -> None: ...

    @abc.abstractmethod
    def power_off(self, vm_id: str, graceful: bool = True) -> None:
        """Graceful: ask the guest to shut down, and power off if it has not within a while."""

    @abc.abstractmethod
    def relocate(self, vm_id: str, host_id: str) -> None:
        """Live-migrate (vMotion) the VM to another host; storage stays where it is."""

    @abc.abstractmethod
    def create_vm(self, spec: VMSpec) -> VM: ...

    @abc.abstractmethod
    def delete_vm(self, vm_id: str, keep_disks: bool = False) -> None: ...

    @abc.abstractmethod
    def reconfigure_nics(self, vm_id: str, nics: list[NicSpec]) -> VM:
        """Set the VM's NICs to ``nics`` (in order: networks, MACs, IP configuration)."""

    def rebase_disk(self, vm_id: str, disk_index: int, path: str) -> VM:
        """A disk backed by a recovery image becomes the plain file ``path`` (the replica, after
        the image set's commit); the VM keeps running. Backends without image-backed disks
        refuse it."""
        raise InvalidSpec(f"the {self.kind} backend has no disks on recovery images to rebase")

    def deploy_appliance(self, image: str, name: str, host_id: str, datastore_id: str,
                         network_id: str, properties: dict, power_on: bool = True) -> str:
        """Deploy an appliance VM (``image`` 'tidemark-vra', ...) configured by its OVF
        ``properties``, power it on, and return its VM id."""
        spec = VMSpec(name=name, host_id=host_id, datastore_id=datastore_id,
                      nics=[NicSpec(network_id)], image=image, properties=dict(properties),
                      power_on=power_on)
        return self.create_vm(spec).id

    def remove_appliance(self, vm_id: str) -> None:
        """Power off and delete an appliance VM deployed by ``deploy_appliance``."""
        vm = self.vm(vm_id)
        if vm.image is None:
            raise InvalidSpec(f"VM {vm.name} ({vm_id}) is not an appliance; use delete_vm")
        self.delete_vm(vm_id)

    # change following
    def _state(self) -> Snapshot:
        return Snapshot(vms={v.id: (v.name, v.host_id, v.power_state) for v in self.vms()},
                        hosts={h.id: (h.name, h.state) for h in self.hosts()})

    def poll(self) -> list[Change]:
        """The changes since the previous call (the first call takes the baseline: [])."""
        with self._poll_lock:
            now = self._state()
            before, self._last = self._last, now
            return [] if before is None else diff(before, now)

    def watch(self, callback, interval: float = 1.0) -> Watch:
        """Call ``callback(change)`` for each change, polling every ``interval`` s."""
        return Watch(self, callback, interval)

    def close(self) -> None:
        """Release the session."""
