"""VMs created or destroyed through vCenter (vcsim), applied to the simulator's data path.

The vcsim watch (vcenter_watch.py) reports a VM someone else created with its description
(``describe``); ``apply_foreign`` adopts it into the site: a VM with the same name, instance
and BIOS UUIDs, host, vCPUs, memory, NICs (network, MAC, re-IP address) and disks, which are
the very files vcsim made (``X-flat.vmdk``, the raw extent of ``X.vmdk``) or files it was
given, or VRA recovery images (extraConfig ``tidemark.disk<N>.image``). An appliance image and
its OVF properties (``tidemark.image``, ``tidemark.ovf.<key>``) make it an appliance VM, so a
VRA deployed through vCenter runs as a real process once powered on. The mirror's
``adopting()`` makes ``VCenterMirror.create_vm`` take the existing vcsim VM.

A VM destroyed in vcsim is deleted from the site, keeping its disk files: vcsim has already
deleted the ones it owned, as vSphere does, and kept the ones detached first.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("tidemark.site")


def datastore_file(file_name: str | None, ds_paths: dict[str, Path]) -> Path | None:
    """'[ds] dir/x.vmdk' -> the file holding its data (x-flat.vmdk when vcsim made one)."""
    if not file_name or not file_name.startswith("["):
        return None
    ds, _, rel = file_name[1:].partition("]")
    if ds not in ds_paths:
        return None
    path = ds_paths[ds] / rel.strip()
    flat = path.with_name(path.stem + "-flat.vmdk")
    return flat if path.suffix == ".vmdk" and flat.exists() else path


def apply_foreign(site, event: dict) -> None:
    """Apply one added/removed event from the vcsim watch to ``site`` (a `simulator.site.Site`)."""
    from .site import NotFound, SiteError
    name = event.get("vm")
    if event.get("removed"):
        try:
            site.delete_vm(name, keep_disks=True)
            log.info("VM %s was destroyed through vCenter: deleted", name)
        except NotFound:
            pass
        return
    spec = event["added"]
    try:
        with site.lock:
            if any(v["name"] == name for v in site.inv["vms"]):
                log.warning("VM %s created through vCenter has the name of a site VM: not adopted", name)
                return
            vm = _adopt(site, name, event, spec)
        if event.get("power_state") == "poweredOn":
            site.power(vm["name"], True, from_vcenter=True)
        log.info("VM %s created through vCenter: adopted on %s", name, vm["host"])
    except (SiteError, OSError, ValueError, KeyError) as exc:   # never the spec: it may hold secrets
        log.warning("could not adopt VM %s created through vCenter: %s", name, exc)


def _adopt(site, name: str, event: dict, spec: dict) -> dict:
    inv = site.inv
    ds_paths = {d["name"]: Path(d["path"]).resolve() for d in inv["datastores"]}
    nets = {n["name"] for n in inv["networks"]}
    datastore = spec["datastore"] if spec["datastore"] in ds_paths else inv["datastores"][0]["name"]
    files = {}          # resolved before anything is created: a refusal leaves nothing behind
    for i, d in enumerate(spec["disks"]):
        if not d.get("image"):
            files[i] = datastore_file(d.get("file"), ds_paths)
            if files[i] is None:
                raise ValueError(f"disk {i} ({d.get('file')}) is not on a datastore of the site")
    body = {"name": name, "host": event["host"], "datastore": datastore,
            "vcpus": spec["vcpus"], "memory_mib": spec["memory_mib"], "disks_mib": [],
            "image": spec.get("image"), "properties": spec.get("properties") or {}}
    if any(d.get("image") for d in spec["disks"]):
        body["disks"] = [{"capacity_bytes": d["capacity_bytes"], "image": d.get("image")}
                         for d in spec["disks"]]
    # made powered off; apply_foreign then applies the reported power state, so that is the
    # state the mirror believes from now on
    with site.vcenter.adopting(name, event["moid"], event.get("power_state") or "poweredOff"):
        vm = site.create_vm(body)
    vm["instance_uuid"], vm["bios_uuid"] = spec["instance_uuid"], spec["bios_uuid"]
    disks = []
    for i, d in enumerate(spec["disks"]):
        entry = vm["disks"][i] if i < len(vm["disks"]) else {"index": i}
        if i not in files:       # a recovery image, as the site made it
            disks.append(entry)
            continue
        path = files[i]
        if entry.get("path") and Path(entry["path"]) != path:
            Path(entry["path"]).unlink(missing_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as f:   # vcsim makes an empty file: give it its capacity (sparse)
            if f.tell() < d["capacity_bytes"]:
                f.truncate(d["capacity_bytes"])
        ds = next((n for n, p in ds_paths.items() if path.is_relative_to(p)), datastore)
        disks.append({"index": i, "capacity_bytes": d["capacity_bytes"], "path": str(path),
                      "datastore": ds})
    vm["disks"] = disks
    vm["nics"] = [{"index": i, "mac": n["mac"], "ip": n.get("ip"), "network": n["network"]}
                  for i, n in enumerate(spec["nics"]) if n.get("network") in nets]
    site.save()
    return vm
