"""The virtualization inventory of this site: its native shapes on the wire, and change following
(``zvm.services["inventory"]``).

Change following is the house pattern: ``sync()`` is one public synchronous pass (the hypervisor
adapter's ``poll()``, then an event per change and a call to every subscriber), and the
``inventory`` job calls it every ``inventory_interval_s`` (2 s: a vMotion, a new, deleted or
renamed VM is noticed within 5 s). Subscribers get the adapter's ``Change`` values
(``kind`` vm_added / vm_removed / vm_renamed / vm_moved / vm_power / host_state, ``id``,
``name``, ``old``, ``new``)::

    zvm.services["inventory"].subscribe(lambda change: ...)

The hypervisor manager not answering raises ZVM0003 until it answers again.
"""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager

from .errors import BadRequest, Conflict, NotFound, Unavailable

log = logging.getLogger("tidemark.zvm.inventory")

EVENTS = {"vm_moved": "VmMoved", "vm_added": "VmAdded", "vm_removed": "VmRemoved",
          "vm_renamed": "VmRenamed"}


@contextmanager
def hv_errors(what: str = "the hypervisor manager"):
    """Hypervisor adapter errors as ZVM problems (404, 409, 400, 503)."""
    from .hypervisor import HypervisorError, InvalidSpec, InvalidState, Unreachable
    from .hypervisor import NotFound as HvNotFound
    try:
        yield
    except HvNotFound as exc:
        raise NotFound(str(exc)) from None
    except InvalidState as exc:
        raise Conflict(str(exc)) from None
    except InvalidSpec as exc:
        raise BadRequest(str(exc)) from None
    except Unreachable as exc:
        raise Unavailable(str(exc)) from None
    except HypervisorError as exc:
        raise Unavailable(f"{what} failed: {exc}") from None


class InventoryService:
    def __init__(self, zvm):
        self.zvm = zvm
        self._subscribers: list = []
        self._lock = threading.Lock()

    def subscribe(self, callback) -> None:
        """Call ``callback(change)`` for every change ``sync()`` notices (errors are logged)."""
        with self._lock:
            self._subscribers.append(callback)

    def unsubscribe(self, callback) -> None:
        with self._lock:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

    def sync(self) -> list:
        """One pass: the changes since the previous pass, recorded and handed to subscribers."""
        from .hypervisor import HypervisorError
        try:
            changes = self.zvm.hypervisor.poll()
        except HypervisorError as exc:
            self.zvm.alerts.raise_("hypervisor", "ZVM0003",
                                   f"the hypervisor manager cannot be reached: {exc}")
            raise
        self.zvm.alerts.clear("hypervisor")
        for ch in changes:
            etype = EVENTS.get(ch.kind)
            if etype:
                text = {"vm_moved": f"VM {ch.name} moved from host {ch.old} to {ch.new}",
                        "vm_added": f"VM {ch.name} appeared on host {ch.new}",
                        "vm_removed": f"VM {ch.name} was removed (it ran on host {ch.old})",
                        "vm_renamed": f"VM {ch.old} was renamed {ch.new}"}[ch.kind]
                self.zvm.events.record(etype, text, entity="Unknown")
            with self._lock:
                subs = list(self._subscribers)
            for cb in subs:
                try:
                    cb(ch)
                except Exception:   # noqa: BLE001 - one subscriber must not starve the others
                    log.exception("inventory subscriber failed on %s", ch)
        return changes

    def on_start(self) -> None:
        hv = self.zvm.cfg.hypervisor
        if hv.get("url") or hv.get("host"):     # nothing to follow before one is configured
            self.zvm.jobs.add("inventory", self.zvm.cfg.inventory_interval_s, self.sync)

    # -- native shapes of this site's inventory
    def site_api(self) -> dict:
        return {"siteIdentifier": self.zvm.site_id, "virtualizationSiteName": self.zvm.cfg.site_name}

    def hosts(self) -> list[dict]:
        with hv_errors():
            hv = self.zvm.hypervisor
            hosts, dss, nets, site = hv.hosts(), hv.datastores(), hv.networks(), hv.site()
        return [host_native(h, dss, nets, site.version) for h in hosts]

    def host(self, host_id: str) -> dict:
        for h in self.hosts():
            if h["hostIdentifier"] == host_id:
                return h
        raise NotFound(f"no host {host_id} at this site: GET .../hosts lists them")

    def datastores(self) -> list[dict]:
        with hv_errors():
            return [datastore_native(d) for d in self.zvm.hypervisor.datastores()]

    def networks(self) -> list[dict]:
        with hv_errors():
            return [{"virtualizationNetworkName": n.name, "networkIdentifier": n.id,
                     "isIsolated": n.isolated} for n in self.zvm.hypervisor.networks()]

    def folders(self) -> list[dict]:
        with hv_errors():
            return [{"folderName": f.name, "folderIdentifier": f.id}
                    for f in self.zvm.hypervisor.folders()]

    def resource_pools(self) -> list[dict]:
        with hv_errors():
            return [{"resourcepoolName": p.name, "resourcePoolIdentifier": p.id}
                    for p in self.zvm.hypervisor.resource_pools()]

    def clusters(self) -> list[dict]:
        with hv_errors():
            hv = self.zvm.hypervisor
            clusters, hosts, version = hv.clusters(), {h.id: h for h in hv.hosts()}, hv.site().version
        return [{"clusterIdentifier": c.id, "virtualizationClusterName": c.name,
                 "associatedHosts": [base_host(hosts[i], version) for i in c.host_ids if i in hosts]}
                for c in clusters]

    def vms(self) -> list[dict]:
        with hv_errors():
            hv = self.zvm.hypervisor
            vms, hosts, dss = hv.vms(), {h.id: h for h in hv.hosts()}, \
                {d.id: d for d in hv.datastores()}
        return [vm_native(v, hosts, dss) for v in vms]

    def datastore_api(self, ds_id: str | None = None) -> list[dict]:
        """DatastoreApi documents (``GET /v1/datastores``)."""
        with hv_errors():
            hv = self.zvm.hypervisor
            dss = hv.datastores()
        vras = self.zvm.services.get("vras")
        per_ds = {}
        for v in (vras.list() if vras else []):
            per_ds[v["datastoreIdentifier"]] = per_ds.get(v["datastoreIdentifier"], 0) + 1
        out = []
        for d in dss:
            if ds_id is not None and d.id != ds_id:
                continue
            used = d.capacity_bytes - d.free_bytes
            zero = {"usedInBytes": 0, "provisionedInBytes": 0}
            out.append({
                "datastoreIdentifier": d.id, "datastoreName": d.name,
                "config": {"devices": [], "type": "VMFS", "owningDatastoreCluster": None},
                "stats": {"numVRAs": per_ds.get(d.id, 0), "numIncomingVMs": 0,
                          "numOutgoingVMs": 0, "availabilityStatus": "Available",
                          "usage": {"datastore": {"capacityInBytes": d.capacity_bytes,
                                                  "freeInBytes": d.free_bytes,
                                                  "usedInBytes": used, "provisionedInBytes": used},
                                    "zerto": {k: dict(zero) for k in (
                                        "protected", "recovery", "journal", "scratch",
                                        "appliances", "unknown")}}},
                "health": {"status": "OK", "alerts": []}})
        if ds_id is not None and not out:
            raise NotFound(f"no datastore {ds_id} at this site: GET /v1/datastores lists them")
        return out


def datastore_native(d) -> dict:
    return {"datastoreName": d.name, "datastoreIdentifier": d.id, "owningDatastoreCluster": None}


def base_host(h, version: str) -> dict:
    return {"hostIdentifier": h.id, "hostVersion": version, "virtualizationHostName": h.name,
            "connectionStatus": "Connected" if h.state == "connected" else "Disconnected"}


def host_native(h, dss, nets, version: str) -> dict:
    # every datastore and network of a site is shared by all its hosts (simulator and lab vCenter)
    return {**base_host(h, version), "associatedDatastores": [datastore_native(d) for d in dss],
            "associatedNetworks": [{"virtualizationNetworkName": n.name, "networkIdentifier": n.id}
                                   for n in nets]}


def vm_native(v, hosts: dict, dss: dict) -> dict:
    ds = dss.get(v.disks[0].datastore_id) if v.disks else None
    host = hosts.get(v.host_id)
    return {
        "vmName": v.name, "vmIdentifier": v.id, "vmInstanceIdentifier": v.instance_uuid,
        "owningHostIdentifier": v.host_id, "owningHostName": host.name if host else None,
        "owningDatastoreIdentifier": ds.id if ds else None,
        "owningDatastoreName": ds.name if ds else None,
        "guestOs": "Tidemark appliance" if v.image else "Other Linux (64-bit)",
        "vmNetworkInformation": {"ipAddresses": [n.ip for n in v.nics if n.ip]},
        "vmPerfMetricInfo": None,
        "nics": [{"nicIdentifier": n.id, "networkIdentifier": n.network_id, "macAddress": n.mac}
                 for n in v.nics],
        "volumes": [{"volumeIdentifier": str(d.index), "capacityInBytes": d.capacity_bytes,
                     "datastoreIdentifier": d.datastore_id, "path": d.path} for d in v.disks],
        "isAgentInstalled": False, "platformInformation": None,
        "powerState": v.power_state, "cpus": v.cpus, "memoryInMB": v.memory_mib,
        "applianceImage": v.image,
    }


def proxied(zvm, site_id: str, path: str):
    """A peer site's inventory call, answered by the peer's ZVM (the caller checked the pairing)."""
    return zvm.services["sites"].client(site_id).request("GET", path)
