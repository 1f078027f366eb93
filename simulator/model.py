"""The count-driven inventory model of a simulated site, as vcsim builds its own.

``build_site(...)`` turns counts (hosts, VMs, disks) into a full inventory with
deterministic names and ids, so that two labs built with the same counts have
the same objects. The inventory is plain JSON (the format the site controller
persists, serves and mirrors into vcsim):

    site-a-dc / site-a-cluster0 / site-a-h0, site-a-h1
    datastores site-a-ds0 (VM disks), site-a-ds1 (journals, recovered VMs)
    networks   site-a-net0 (production), site-a-test (isolated, for failover tests)
    VMs        site-a-vm0 ... placed round-robin on the hosts

vSphere-style sites use managed-object-style ids (``host-10``, ``vm-100``);
Hyper-V-style sites use GUIDs, as SCVMM does.
"""
from __future__ import annotations

import uuid
from pathlib import Path

MiB = 1 << 20
KINDS = ("vsphere", "hyperv")
_NS = uuid.UUID("6f1d3c7e-2b1a-4c55-9d0e-7a3b2c1d0e9f")


def object_id(kind: str, site: str, prefix: str, n: int) -> str:
    if kind == "hyperv":
        return str(uuid.uuid5(_NS, f"{site}/{prefix}/{n}"))
    return f"{prefix}-{n}"


def vm_uuids(site: str, name: str) -> tuple[str, str]:
    """(instance uuid, BIOS uuid) of a VM: stable for a site and name, as vCenter keeps them."""
    return (str(uuid.uuid5(_NS, f"{site}/vm/{name}/instance")),
            str(uuid.uuid5(_NS, f"{site}/vm/{name}/bios")))


def build_site(name: str, kind: str, lab_dir: Path, *, index: int = 0, hosts: int = 2,
               vms: int = 4, disk_mib: int = 256, disks_per_vm: int = 1) -> dict:
    if kind not in KINDS:
        raise ValueError(f"site kind must be one of {', '.join(KINDS)}")
    if hosts < 1:
        raise ValueError("a site needs at least one host")
    site_dir = Path(lab_dir).resolve() / name
    cluster = f"{name}-cluster0"
    host_names = [f"{name}-h{i}" for i in range(hosts)]
    inv = {
        "name": name, "kind": kind, "index": index,
        "datacenter": f"{name}-dc",
        "clusters": [{"name": cluster, "hosts": host_names}],
        "hosts": [{"name": h, "id": object_id(kind, name, "host", 10 + i), "cluster": cluster,
                   "cpu_cores": 16, "memory_mib": 131072, "state": "connected"}
                  for i, h in enumerate(host_names)],
        "datastores": [{"name": f"{name}-ds{i}", "id": object_id(kind, name, "datastore", i),
                        "path": str(site_dir / "datastores" / f"{name}-ds{i}"),
                        "capacity_bytes": 4 << 40} for i in range(2)],
        "networks": [{"name": f"{name}-net0", "id": object_id(kind, name, "network", 0),
                      "isolated": False, "subnet": f"10.{index}.0.0/16"},
                     {"name": f"{name}-test", "id": object_id(kind, name, "network", 1),
                      "isolated": True, "subnet": f"10.{100 + index}.0.0/16"}],
        "vms": [],
        "next_vm": 0,
    }
    for _ in range(vms):
        add_vm(inv, disks_mib=[disk_mib] * disks_per_vm, power_on=True)
    return inv


def add_vm(inv: dict, *, name: str | None = None, host: str | None = None,
           datastore: str | None = None, network: str | None = None, vcpus: int = 1,
           memory_mib: int = 1024, disks_mib: list[int] | None = None, image: str | None = None,
           properties: dict | None = None, power_on: bool = False) -> dict:
    """Add a VM to an inventory (names, ids, MACs and IPs from the site's VM counter)."""
    n = inv["next_vm"]
    inv["next_vm"] = n + 1
    site = inv["name"]
    name = name or f"{site}-vm{n}"
    if any(v["name"] == name for v in inv["vms"]):
        raise ValueError(f"a VM named {name} already exists on {site}")
    hosts = [h["name"] for h in inv["hosts"]]
    host = host or hosts[n % len(hosts)]
    if host not in hosts:
        raise ValueError(f"{site} has no host {host}")
    ds = next((d for d in inv["datastores"] if d["name"] == (datastore or inv["datastores"][0]["name"])),
              None)
    if ds is None:
        raise ValueError(f"{site} has no datastore {datastore}")
    net = network or inv["networks"][0]["name"]
    if net not in [x["name"] for x in inv["networks"]]:
        raise ValueError(f"{site} has no network {net}")
    instance_uuid, bios_uuid = vm_uuids(site, name)
    vm_dir = Path(ds["path"]) / name
    disks_mib = [256] if disks_mib is None else disks_mib
    vm = {
        "name": name, "id": object_id(inv["kind"], site, "vm", 100 + n),
        "instance_uuid": instance_uuid, "bios_uuid": bios_uuid,
        "host": host, "datastore": ds["name"], "power_state": "poweredOff",
        "vcpus": vcpus, "memory_mib": memory_mib,
        "nics": [{"index": 0, "mac": f"00:50:56:{inv['index']:02x}:{n >> 8 & 0xff:02x}:{n & 0xff:02x}",
                  "ip": f"10.{inv['index']}.{n >> 8 & 0xff}.{10 + (n & 0xff) % 240}",
                  "network": net}],
        "disks": [{"index": i, "capacity_bytes": mib * MiB, "path": str(vm_dir / f"disk{i}.img"),
                   "datastore": ds["name"]} for i, mib in enumerate(disks_mib)],
        "image": image, "properties": dict(properties or {}),
        "generation": 1, "vm_seq": 0, "workload": None,
        "want_power_state": "poweredOn" if power_on else "poweredOff",
    }
    for d in vm["disks"]:
        if d["capacity_bytes"] <= 0 or d["capacity_bytes"] % 4096:
            raise ValueError("disk capacity must be a positive multiple of 4 KiB")
    inv["vms"].append(vm)
    return vm


def public_vm(vm: dict) -> dict:
    """A VM as the API shows it."""
    return {k: vm[k] for k in ("name", "id", "instance_uuid", "bios_uuid", "host", "datastore",
                               "power_state", "vcpus", "memory_mib", "nics", "disks", "image",
                               "generation", "workload")}
