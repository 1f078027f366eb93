"""The simulator's site API as a hypervisor manager, for vSphere-style and Hyper-V-style sites.

The site controller (simulator/site_api.py, docs/simulator.md) addresses objects by name or
id; this adapter speaks ids only, as the other backends do. One ``GET /api/site`` returns the
whole inventory, so every read and every ``poll()`` is one round trip. The simulator has no
ids for clusters, folders and resource pools: they are derived here the way the simulator
derives the others (``cluster-0`` on a vSphere-style site, a name-based GUID on Hyper-V).
"""
from __future__ import annotations

import uuid

import requests

from .base import (Cluster, Datastore, Disk, Folder, Host, Hypervisor, Network, Nic, NicSpec,
                   ResourcePool, SiteInfo, Snapshot, VM, VMSpec)
from .errors import HypervisorError, InvalidSpec, InvalidState, NotFound, Unreachable

_NS = uuid.UUID("6f1d3c7e-2b1a-4c55-9d0e-7a3b2c1d0e9f")   # simulator/model.py's namespace


class SimulatorHypervisor(Hypervisor):
    kind = "simulator"

    def __init__(self, url: str, timeout: float = 60.0):
        super().__init__()
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.http = requests.Session()

    # ----------------------------------------------------------------- plumbing
    def _call(self, method: str, path: str, **kw):
        try:
            r = self.http.request(method, self.url + path, timeout=kw.pop("timeout", self.timeout), **kw)
        except requests.RequestException as exc:
            raise Unreachable(f"simulator site API at {self.url} does not answer ({exc}); "
                              "is the lab up? (tidemark lab status)") from exc
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail") or r.text
            except ValueError:
                detail = r.text
            err = {400: InvalidSpec, 404: NotFound, 409: InvalidState}.get(r.status_code, HypervisorError)
            raise err(f"simulator: {detail}")
        return r.json() if r.content else None

    def _site(self) -> dict:
        return self._call("GET", "/api/site")

    def _derived(self, st: dict, prefix: str, n: int) -> str:
        if st["kind"] == "hyperv":
            return str(uuid.uuid5(_NS, f"{st['name']}/{prefix}/{n}"))
        return f"{prefix}-{n}"

    @staticmethod
    def _ids(items: list[dict]) -> dict[str, str]:
        return {x["name"]: x["id"] for x in items}

    def _name(self, items: list[dict], obj_id: str, what: str) -> str:
        for x in items:
            if x["id"] == obj_id:
                return x["name"]
        raise NotFound(f"the site has no {what} with id {obj_id!r}")

    def _vm_ref(self, vm_id: str) -> str:
        for v in self._site()["vms"]:
            if v["id"] == vm_id:
                return v["id"]
        raise NotFound(f"no VM with id {vm_id!r}: it may have been deleted; list the VMs again")

    def _vm(self, st: dict, v: dict) -> VM:
        hosts, dss, nets = self._ids(st["hosts"]), self._ids(st["datastores"]), self._ids(st["networks"])
        return VM(id=v["id"], name=v["name"], instance_uuid=v["instance_uuid"],
                  host_id=hosts.get(v["host"]), power_state=v["power_state"], cpus=v["vcpus"],
                  memory_mib=v["memory_mib"],
                  nics=tuple(Nic(index=i, id=str(n.get("index", i)), network_id=nets.get(n["network"]),
                                 mac=n["mac"], ip=n.get("ip")) for i, n in enumerate(v["nics"])),
                  disks=tuple(Disk(index=d["index"], capacity_bytes=d["capacity_bytes"],
                                   datastore_id=dss.get(d.get("datastore", v["datastore"])),
                                   path=d.get("path") or "") for d in v["disks"]),
                  image=v.get("image"))

    # ---------------------------------------------------------------- inventory
    def site(self) -> SiteInfo:
        st = self._site()
        return SiteInfo(name=st["name"], kind=st["kind"], datacenter=st["datacenter"],
                        version=f"Tidemark simulator ({'SCVMM' if st['kind'] == 'hyperv' else 'vCenter'}-style)")

    def hosts(self) -> list[Host]:
        st = self._site()
        clusters = {c["name"]: self._derived(st, "cluster", i) for i, c in enumerate(st["clusters"])}
        return [Host(id=h["id"], name=h["name"], cluster_id=clusters.get(h.get("cluster")),
                     state="connected" if h["state"] == "connected" else "disconnected")
                for h in st["hosts"]]

    def clusters(self) -> list[Cluster]:
        st = self._site()
        hosts = self._ids(st["hosts"])
        return [Cluster(id=self._derived(st, "cluster", i), name=c["name"],
                        host_ids=tuple(hosts[h] for h in c["hosts"] if h in hosts))
                for i, c in enumerate(st["clusters"])]

    def datastores(self) -> list[Datastore]:
        st = self._site()
        out = []
        for d in st["datastores"]:   # free: capacity less what the site's disks provision on it
            used = sum(k["capacity_bytes"] for v in st["vms"] for k in v["disks"]
                       if k.get("datastore", v["datastore"]) == d["name"])
            out.append(Datastore(id=d["id"], name=d["name"], capacity_bytes=d["capacity_bytes"],
                                 free_bytes=max(0, d["capacity_bytes"] - used)))
        return out

    def datastore_path(self, datastore_id: str) -> str | None:
        st = self._site()
        self._name(st["datastores"], datastore_id, "datastore")
        return next(d["path"] for d in st["datastores"] if d["id"] == datastore_id)

    def networks(self) -> list[Network]:
        return [Network(id=n["id"], name=n["name"], isolated=bool(n.get("isolated")))
                for n in self._site()["networks"]]

    def folders(self) -> list[Folder]:
        st = self._site()
        return [Folder(id=self._derived(st, "folder", 0), name="vm" if st["kind"] == "vsphere"
                       else "All Hosts")]

    def resource_pools(self) -> list[ResourcePool]:
        st = self._site()
        return [ResourcePool(id=self._derived(st, "resgroup", i), name="Resources",
                             cluster_id=self._derived(st, "cluster", i))
                for i, _ in enumerate(st["clusters"])]

    def vms(self) -> list[VM]:
        st = self._site()
        return [self._vm(st, v) for v in st["vms"]]

    def vm(self, vm_id: str) -> VM:
        st = self._site()
        for v in st["vms"]:
            if v["id"] == vm_id:
                return self._vm(st, v)
        raise NotFound(f"no VM with id {vm_id!r}: it may have been deleted; list the VMs again")

    def _state(self) -> Snapshot:
        st = self._site()
        hosts = self._ids(st["hosts"])
        return Snapshot(vms={v["id"]: (v["name"], hosts.get(v["host"]), v["power_state"])
                             for v in st["vms"]},
                        hosts={h["id"]: (h["name"], "connected" if h["state"] == "connected"
                                         else "disconnected") for h in st["hosts"]})

    # --------------------------------------------------------------- operations
    def _power(self, vm_id: str, on: bool) -> None:
        self._call("POST", f"/api/vms/{self._vm_ref(vm_id)}/power", json={"state": "on" if on else "off"})

    def power_on(self, vm_id: str) -> None:
        self._power(vm_id, True)

    def power_off(self, vm_id: str, graceful: bool = True) -> None:
        # The simulator's guests stop at once: graceful and hard power-off are the same here.
        self._power(vm_id, False)

    def relocate(self, vm_id: str, host_id: str) -> None:
        st = self._site()
        host = self._name(st["hosts"], host_id, "host")
        self._call("POST", f"/api/vms/{self._vm_ref(vm_id)}/vmotion", json={"host": host})

    def create_vm(self, spec: VMSpec) -> VM:
        spec.validate()
        st = self._site()
        body = {"name": spec.name, "host": self._name(st["hosts"], spec.host_id, "host"),
                "datastore": self._name(st["datastores"], spec.datastore_id, "datastore"),
                "vcpus": spec.cpus, "memory_mib": spec.memory_mib, "power_on": False,
                "disks_mib": [], "image": spec.image, "properties": spec.properties}
        if spec.nics:
            body["network"] = self._name(st["networks"], spec.nics[0].network_id, "network")
        for i, d in enumerate(spec.disks):
            if d.path or d.datastore_id not in (None, spec.datastore_id):
                raise InvalidSpec(f"VM {spec.name} disk {i}: the simulator makes a VM's disks on "
                                  "its own datastore; it cannot attach an existing file")
        if any(d.recovery_image or d.capacity_bytes % (1 << 20) for d in spec.disks):
            body["disks"] = [{"capacity_bytes": d.capacity_bytes or None,
                              "image": d.recovery_image.as_dict() if d.recovery_image else None}
                             for d in spec.disks]
        else:
            body["disks_mib"] = [d.capacity_bytes >> 20 for d in spec.disks]
        created = self._call("POST", "/api/vms", json=body)
        try:
            if len(created["disks"]) != len(spec.disks):
                raise InvalidSpec(f"the simulator made {len(created['disks'])} disks for VM "
                                  f"{spec.name}, not {len(spec.disks)}: it does not support "
                                  "these disk backings (recovery images) yet")
            if spec.nics and (len(spec.nics) > 1 or spec.nics[0].mac or spec.nics[0].ip):
                self._set_nics(st, created["id"], spec.nics)
            elif not spec.nics:
                self._call("POST", f"/api/vms/{created['id']}/nics", json={"nics": []})
            if spec.power_on:
                self._power(created["id"], True)
        except HypervisorError:
            self._call("DELETE", f"/api/vms/{created['id']}")
            raise
        return self.vm(created["id"])

    def delete_vm(self, vm_id: str, keep_disks: bool = False) -> None:
        self._call("DELETE", f"/api/vms/{self._vm_ref(vm_id)}",
                   params={"keep_disks": "1" if keep_disks else "0"})

    def rebase_disk(self, vm_id: str, disk_index: int, path: str) -> VM:
        self._call("POST", f"/api/vms/{self._vm_ref(vm_id)}/disks/{int(disk_index)}/rebase",
                   json={"path": path})
        return self.vm(vm_id)

    def _set_nics(self, st: dict, vm_id: str, nics: list[NicSpec]) -> None:
        self._call("POST", f"/api/vms/{vm_id}/nics", json={"nics": [
            {"network": self._name(st["networks"], n.network_id, "network"), "mac": n.mac, "ip": n.ip}
            for n in nics]})

    def reconfigure_nics(self, vm_id: str, nics: list[NicSpec]) -> VM:
        self._set_nics(self._site(), self._vm_ref(vm_id), nics)
        return self.vm(vm_id)

    def close(self) -> None:
        self.http.close()
