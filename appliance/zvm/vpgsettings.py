"""VPG settings objects: the edit-then-commit flow of the reference API (VpgSettingsApi).

A settings object is a draft: ``POST /v1/vpgSettings`` creates one (empty, or a copy of an
existing VPG's committed settings when the body names its ``vpgIdentifier``), the section
routes edit it, ``POST .../commit`` validates it against the inventories of both sites and
submits a CreateVpg or UpdateVpg task (``vpgs.py``), after which the draft is gone. Nothing a
draft says touches a VPG before the commit.

Every edit is validated before it is stored: a bad value is a 400 naming the field and the
draft stays as it was. Checks that need the recovery site (host, datastore, networks exist
there; a VRA on the host) run at commit time (``VpgSettings.check_for_commit``).

The draft is a document in ``vpg_settings``, spelled camelCase as VpgSettingsApi is, with
internal keys (``_created``, ``_user``) that never go on the wire.
"""
from __future__ import annotations

import copy
import ipaddress
import time
import uuid

from .errors import BadRequest, Conflict, NotFound

PRIORITIES = ["Low", "Medium", "High"]                  # VpgPriorityApi 0, 1, 2
DEFAULT_BOOT_GROUP = "00000000-0000-0000-0000-000000000000"
SECTIONS = {"basic": "basic", "journal": "journal", "scratch": "scratch", "recovery": "recovery",
            "networks": "networks", "bootgroup": "bootGroups", "scripting": "scripting"}


def _limitation() -> dict:
    return {"hardLimitInMB": 0, "hardLimitInPercent": None, "warningThresholdInMB": 0,
            "warningThresholdInPercent": None}


def _network() -> dict:
    return {"hypervisor": {"defaultNetworkIdentifier": None}, "vcd": None, "publicCloud": None}


def defaults(site_id: str) -> dict:
    """A new settings object's sections (what DELETE of a section goes back to)."""
    return {
        "basic": {"name": None, "vpgType": "Remote", "rpoInSeconds": 300,
                  "testIntervalInMinutes": 262080, "journalHistoryInHours": 24,
                  "priority": "Medium", "useWanCompression": True,
                  "serviceProfileIdentifier": None, "zorgIdentifier": None,
                  "protectedSiteIdentifier": site_id, "recoverySiteIdentifier": None},
        "journal": {"limitation": _limitation(), "datastoreIdentifier": None,
                    "datastoreClusterIdentifier": None},
        "scratch": {"limitation": _limitation(), "datastoreIdentifier": None,
                    "datastoreClusterIdentifier": None},
        "recovery": {"defaultHostIdentifier": None, "defaultHostClusterIdentifier": None,
                     "defaultDatastoreIdentifier": None, "defaultDatastoreClusterIdentifier": None,
                     "defaultFolderIdentifier": None, "resourcePoolIdentifier": None,
                     "vcd": None, "publicCloud": None},
        "networks": {"failover": _network(), "failoverTest": _network()},
        "bootGroups": {"bootGroups": [{"bootGroupIdentifier": DEFAULT_BOOT_GROUP,
                                       "name": "Default", "bootDelayInSeconds": 0}]},
        "scripting": {"preRecovery": None, "postRecovery": None, "postBackup": None},
        "longTermRetention": None,
        "protected": {"vcd": None},
    }


def volume_id(index: int) -> str:
    return f"scsi:0:{index}"


def nic_id(index: int) -> str:
    return f"Network adapter {index + 1}"


def _nic_network() -> dict:
    return {"hypervisor": {"networkIdentifier": None, "shouldReplaceMacAddress": False,
                           "dnsSuffix": None, "ipConfig": None,
                           "shouldReplaceIpConfiguration": False},
            "vcd": None, "publicCloud": None}


def vm_entry(vm) -> dict:
    """A VpgSettingsVmApi for a hypervisor VM, with a volume per disk and a NIC entry per NIC."""
    return {
        "vmIdentifier": vm.id,
        "recovery": {"hostIdentifier": None, "hostClusterIdentifier": None,
                     "datastoreIdentifier": None, "datastoreClusterIdentifier": None,
                     "folderIdentifier": None, "resourcePoolIdentifier": None,
                     "vcd": None, "publicCloud": None},
        "bootGroupIdentifier": DEFAULT_BOOT_GROUP,
        "journal": {"limitation": _limitation(), "datastoreIdentifier": None,
                    "datastoreClusterIdentifier": None},
        "scratch": {"limitation": _limitation(), "datastoreIdentifier": None,
                    "datastoreClusterIdentifier": None},
        "volumes": [{"volumeIdentifier": volume_id(d.index), "vcd": None, "preseed": None,
                     "rdm": None, "datastore": {"datastoreClusterIdentifier": None,
                                                "datastoreIdentifier": None, "isThin": True},
                     "volumeSyncSettings": "Continuous"} for d in vm.disks],
        "nics": [{"nicIdentifier": nic_id(n.index), "failover": _nic_network(),
                  "failoverTest": _nic_network()} for n in vm.nics],
    }


def _merge(base: dict, patch: dict) -> dict:
    """``patch`` over ``base``: nested objects merged, everything else replaced."""
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# ---------------------------------------------------------------------------- checks
def _int_range(d: dict, name: str, lo: int, hi: int, where: str) -> None:
    v = d.get(name)
    if v is not None and not (lo <= v <= hi):
        raise BadRequest(f"{where}.{name} must be between {lo} and {hi}, not {v}")


def check_basic(b: dict) -> None:
    if b.get("name") is not None:
        if not b["name"].strip() or len(b["name"]) > 80:
            raise BadRequest("basic.name must be 1 to 80 characters")
    if b.get("vpgType") not in (None, "Remote"):
        raise BadRequest("basic.vpgType: Tidemark replicates to a paired site only: use Remote")
    _int_range(b, "rpoInSeconds", 10, 86400, "basic")
    _int_range(b, "journalHistoryInHours", 1, 720, "basic")
    _int_range(b, "testIntervalInMinutes", 0, 525600, "basic")
    if b.get("priority") is not None and b["priority"] not in PRIORITIES:
        raise BadRequest(f"basic.priority must be one of {', '.join(PRIORITIES)}")


def check_limitation(lim: dict | None, where: str) -> None:
    if not lim:
        return
    for k in ("hardLimitInMB", "warningThresholdInMB"):
        _int_range(lim, k, 0, 1 << 40, where)
    for k in ("hardLimitInPercent", "warningThresholdInPercent"):
        _int_range(lim, k, 0, 100, where)
    for unit in ("MB", "Percent"):
        hard, warn = lim.get(f"hardLimitIn{unit}") or 0, lim.get(f"warningThresholdIn{unit}") or 0
        if hard and warn > hard:
            raise BadRequest(f"{where}.warningThresholdIn{unit} ({warn}) must not exceed "
                             f"hardLimitIn{unit} ({hard})")


def journal_limits(lim: dict | None, datastore_bytes: int) -> tuple[int, int]:
    """(hard limit, warning threshold) of a journal in bytes, 0 for none, from its limitation:
    MB (MiB, as everywhere in the API) or a percentage of the journal's datastore
    (``datastore_bytes``, its capacity); where both are given, the smaller counts."""
    lim = lim or {}

    def one(mb, pct, name: str) -> int:
        got = [int(mb) << 20] if mb else []
        if pct:
            if datastore_bytes <= 0:
                raise BadRequest(f"journal.limitation.{name}InPercent needs the capacity of the "
                                 f"journal's datastore, which this site does not know")
            got.append(datastore_bytes * int(pct) // 100)
        return min(got) if got else 0

    return (one(lim.get("hardLimitInMB"), lim.get("hardLimitInPercent"), "hardLimit"),
            one(lim.get("warningThresholdInMB"), lim.get("warningThresholdInPercent"),
                "warningThreshold"))


def check_boot_groups(bg: dict) -> None:
    groups = bg.get("bootGroups") or []
    if not groups:
        raise BadRequest("bootGroups.bootGroups needs at least one boot group")
    seen = set()
    for i, g in enumerate(groups):
        gid = g.get("bootGroupIdentifier")
        if not gid or gid in seen:
            raise BadRequest(f"bootGroups.bootGroups[{i}].bootGroupIdentifier must be given and unique")
        seen.add(gid)
        _int_range(g, "bootDelayInSeconds", 0, 86400, f"bootGroups.bootGroups[{i}]")


def check_ip_config(ip: dict | None, where: str) -> None:
    if not ip or ip.get("isDhcp"):
        return
    for k in ("staticIp", "gateway", "primaryDns", "secondaryDns"):
        if ip.get(k):
            try:
                ipaddress.ip_address(ip[k])
            except ValueError:
                raise BadRequest(f"{where}.{k} is not an IP address: {ip[k]!r}") from None
    if ip.get("subnetMask"):
        try:
            ipaddress.IPv4Network(f"0.0.0.0/{ip['subnetMask']}")
        except ValueError:
            raise BadRequest(f"{where}.subnetMask is not a subnet mask: {ip['subnetMask']!r}") from None
    if ip.get("staticIp") and not ip.get("subnetMask"):
        raise BadRequest(f"{where}: a static IP needs a subnetMask")


def check_nic(nic: dict, where: str) -> None:
    for side in ("failover", "failoverTest"):
        hv = ((nic.get(side) or {}).get("hypervisor")) or {}
        check_ip_config(hv.get("ipConfig"), f"{where}.{side}.hypervisor.ipConfig")


def check_section(name: str, value: dict) -> None:
    if name == "basic":
        check_basic(value)
    elif name in ("journal", "scratch"):
        check_limitation(value.get("limitation"), f"{name}.limitation")
    elif name == "bootGroups":
        check_boot_groups(value)


class VpgSettings:
    """Drafts of VPG settings, in the store's ``vpg_settings`` table."""

    def __init__(self, zvm):
        self.zvm = zvm
        self.store = zvm.store

    # -- objects
    def create(self, body: dict, user: str = "") -> str:
        vpg_id = body.get("vpgIdentifier")
        if vpg_id:
            vpgs = self.zvm.services["vpgs"]
            vpg = vpgs.get(vpg_id)
            if vpg.get("role") != "protected":
                raise Conflict(f"VPG {vpg['name']} is edited at its protected site")
            doc = copy.deepcopy(vpg["settings"])
            doc["vpgIdentifier"] = vpg_id
        else:
            doc = {"vpgIdentifier": None, **defaults(self.zvm.site_id), "vms": []}
        patch = {k: v for k, v in body.items()
                 if k not in ("vpgIdentifier", "vpgSettingsIdentifier", "vms") and v is not None}
        doc = _merge(doc, patch)
        for name in SECTIONS.values():
            check_section(name, doc[name])
        sid = str(uuid.uuid4())
        doc.update(vpgSettingsIdentifier=sid, _created=time.time(), _user=user)
        for v in body.get("vms") or []:
            self._add_vm(doc, v)
        self.store.put("vpg_settings", sid, doc)
        return sid

    def get(self, sid: str) -> dict:
        doc = self.store.get("vpg_settings", sid)
        if doc is None:
            raise NotFound(f"no VPG settings {sid}: create one with POST /v1/vpgSettings")
        return doc

    def list(self) -> list[dict]:
        return self.store.all("vpg_settings")

    def delete(self, sid: str) -> None:
        self.get(sid)
        self.store.delete("vpg_settings", sid)

    def replace(self, sid: str, body: dict) -> None:
        """PUT of the whole object: every section given replaces the draft's."""
        with self.store.transaction():
            doc = self.get(sid)
            new = copy.deepcopy(doc)
            for name in SECTIONS.values():
                if body.get(name) is not None:
                    new[name] = _merge(defaults(self.zvm.site_id)[name], body[name])
                    check_section(name, new[name])
            if body.get("vms") is not None:
                new["vms"] = []
                for v in body["vms"]:
                    self._add_vm(new, v)
            self.store.put("vpg_settings", sid, new)

    # -- sections
    def section(self, sid: str, name: str) -> dict:
        return self.get(sid)[SECTIONS[name]]

    def put_section(self, sid: str, name: str, body: dict) -> None:
        key = SECTIONS[name]
        with self.store.transaction():
            doc = self.get(sid)
            new = _merge(doc[key] or {}, body)
            if key == "bootGroups" and "bootGroups" in body:
                new["bootGroups"] = body["bootGroups"]
            check_section(key, new)
            if key == "basic" and doc.get("vpgIdentifier") and \
                    new.get("recoverySiteIdentifier") != doc["basic"].get("recoverySiteIdentifier"):
                raise BadRequest("basic.recoverySiteIdentifier of an existing VPG cannot change")
            if key == "bootGroups":
                ids = {g["bootGroupIdentifier"] for g in new["bootGroups"]}
                used = {v["bootGroupIdentifier"] for v in doc["vms"]} - ids
                if used:
                    raise BadRequest(f"boot groups {sorted(used)} are still used by VMs")
            doc[key] = new
            self.store.put("vpg_settings", sid, doc)

    def reset_section(self, sid: str, name: str) -> None:
        key = SECTIONS[name]
        with self.store.transaction():
            doc = self.get(sid)
            doc[key] = defaults(self.zvm.site_id)[key]
            if key == "bootGroups":
                for v in doc["vms"]:
                    v["bootGroupIdentifier"] = DEFAULT_BOOT_GROUP
            self.store.put("vpg_settings", sid, doc)

    def priority(self, sid: str) -> str:
        return self.get(sid)["basic"]["priority"]

    # -- VMs
    def _add_vm(self, doc: dict, body: dict) -> dict:
        vm_id = body.get("vmIdentifier")
        if not vm_id:
            raise BadRequest("vmIdentifier is required")
        if any(v["vmIdentifier"] == vm_id for v in doc["vms"]):
            raise Conflict(f"VM {vm_id} is in these settings already")
        vm = self._inventory_vm(vm_id)
        other = self.zvm.services["vpgs"].vpg_of_vm(vm_id) if "vpgs" in self.zvm.services else None
        if other and other["identifier"] != doc.get("vpgIdentifier"):
            raise Conflict(f"VM {vm.name} is protected by VPG {other['name']} already")
        entry = vm_entry(vm)
        entry = self._apply_vm(doc, entry, {k: v for k, v in body.items() if k != "vmIdentifier"})
        doc["vms"].append(entry)
        return entry

    def _inventory_vm(self, vm_id: str):
        from .hypervisor import NotFound as HvNotFound
        try:
            vm = self.zvm.hypervisor.vm(vm_id)
        except HvNotFound:
            raise BadRequest(f"vmIdentifier {vm_id}: this site has no such VM "
                             "(GET /v1/virtualizationsites/{site}/vms lists them)") from None
        if vm.image is not None:
            raise BadRequest(f"VM {vm.name} is a Tidemark appliance ({vm.image}): it cannot be protected")
        return vm

    def _apply_vm(self, doc: dict, entry: dict, body: dict) -> dict:
        vols = {v["volumeIdentifier"]: v for v in entry["volumes"]}
        nics = {n["nicIdentifier"]: n for n in entry["nics"]}
        new = _merge(entry, {k: v for k, v in body.items()
                             if k not in ("volumes", "nics") and v is not None})
        new["vmIdentifier"] = entry["vmIdentifier"]
        for v in body.get("volumes") or []:
            if v.get("volumeIdentifier") not in vols:
                raise BadRequest(f"VM {entry['vmIdentifier']} has no volume {v.get('volumeIdentifier')!r}")
            vols[v["volumeIdentifier"]] = _merge(vols[v["volumeIdentifier"]], v)
        for i, n in enumerate(body.get("nics") or []):
            if n.get("nicIdentifier") not in nics:
                raise BadRequest(f"VM {entry['vmIdentifier']} has no NIC {n.get('nicIdentifier')!r}")
            merged = _merge(nics[n["nicIdentifier"]], n)
            check_nic(merged, f"vms.nics[{i}]")
            nics[n["nicIdentifier"]] = merged
        new["volumes"], new["nics"] = list(vols.values()), list(nics.values())
        groups = {g["bootGroupIdentifier"] for g in doc["bootGroups"]["bootGroups"]}
        if new.get("bootGroupIdentifier") not in groups:
            raise BadRequest(f"bootGroupIdentifier {new.get('bootGroupIdentifier')!r} is not a "
                             "boot group of these settings (PUT .../bootgroup first)")
        check_limitation((new.get("journal") or {}).get("limitation"), "vm.journal.limitation")
        return new

    def add_vm(self, sid: str, body: dict) -> None:
        with self.store.transaction():
            doc = self.get(sid)
            self._add_vm(doc, body)
            self.store.put("vpg_settings", sid, doc)

    def vms(self, sid: str) -> list[dict]:
        return self.get(sid)["vms"]

    def vm(self, sid: str, vm_id: str) -> dict:
        for v in self.get(sid)["vms"]:
            if v["vmIdentifier"] == vm_id:
                return v
        raise NotFound(f"VM {vm_id} is not in VPG settings {sid}")

    def _update_vm(self, sid: str, vm_id: str, fn) -> None:
        with self.store.transaction():
            doc = self.get(sid)
            for i, v in enumerate(doc["vms"]):
                if v["vmIdentifier"] == vm_id:
                    doc["vms"][i] = fn(doc, v)
                    break
            else:
                raise NotFound(f"VM {vm_id} is not in VPG settings {sid}")
            self.store.put("vpg_settings", sid, doc)

    def put_vm(self, sid: str, vm_id: str, body: dict) -> None:
        if body.get("vmIdentifier") not in (None, vm_id):
            raise BadRequest("vmIdentifier in the body differs from the one in the path")
        self._update_vm(sid, vm_id, lambda doc, v: self._apply_vm(doc, v, body))

    def remove_vm(self, sid: str, vm_id: str) -> None:
        with self.store.transaction():
            doc = self.get(sid)
            keep = [v for v in doc["vms"] if v["vmIdentifier"] != vm_id]
            if len(keep) == len(doc["vms"]):
                raise NotFound(f"VM {vm_id} is not in VPG settings {sid}")
            doc["vms"] = keep
            self.store.put("vpg_settings", sid, doc)

    def volume(self, sid: str, vm_id: str, vol_id: str) -> dict:
        for v in self.vm(sid, vm_id)["volumes"]:
            if v["volumeIdentifier"] == vol_id:
                return v
        raise NotFound(f"VM {vm_id} has no volume {vol_id}")

    def put_volume(self, sid: str, vm_id: str, vol_id: str, body: dict) -> None:
        self.volume(sid, vm_id, vol_id)
        self._update_vm(sid, vm_id, lambda doc, v: self._apply_vm(
            doc, v, {"volumes": [{**body, "volumeIdentifier": vol_id}]}))

    def nic(self, sid: str, vm_id: str, nic: str) -> dict:
        for n in self.vm(sid, vm_id)["nics"]:
            if n["nicIdentifier"] == nic:
                return n
        raise NotFound(f"VM {vm_id} has no NIC {nic}")

    def put_nic(self, sid: str, vm_id: str, nic: str, body: dict) -> None:
        self.nic(sid, vm_id, nic)
        self._update_vm(sid, vm_id, lambda doc, v: self._apply_vm(
            doc, v, {"nics": [{**body, "nicIdentifier": nic}]}))

    def reset_nic(self, sid: str, vm_id: str, nic: str) -> None:
        """DELETE of a NIC's settings: back to 'same network, no re-IP'."""
        self.nic(sid, vm_id, nic)

        def reset(doc, v):
            v = copy.deepcopy(v)
            for n in v["nics"]:
                if n["nicIdentifier"] == nic:
                    n["failover"], n["failoverTest"] = _nic_network(), _nic_network()
            return v
        self._update_vm(sid, vm_id, reset)

    # -- commit
    def check_for_commit(self, doc: dict) -> None:
        """What must hold before a commit is accepted (400/409, nothing changed)."""
        b = doc["basic"]
        if not b.get("name"):
            raise BadRequest("basic.name is required: PUT .../basic {\"Name\": ...}")
        if not doc["vms"]:
            raise BadRequest("a VPG needs at least one VM: POST .../vms {\"VmIdentifier\": ...}")
        if not b.get("recoverySiteIdentifier"):
            raise BadRequest("basic.recoverySiteIdentifier is required (a paired site)")
        if b["recoverySiteIdentifier"] == self.zvm.site_id:
            raise BadRequest("basic.recoverySiteIdentifier is this site: pick the paired site")
        sites = self.zvm.services.get("sites")
        peer_ids = {p.get("siteIdentifier") or p.get("identifier") for p in sites.peers()} if sites else set()
        if b["recoverySiteIdentifier"] not in peer_ids:
            raise BadRequest(f"basic.recoverySiteIdentifier {b['recoverySiteIdentifier']} is not a "
                             "paired site (GET /v1/peersites)")
        rec = doc["recovery"]
        if not rec.get("defaultHostIdentifier") and not all(
                v["recovery"].get("hostIdentifier") for v in doc["vms"]):
            raise BadRequest("recovery.defaultHostIdentifier is required (or a host for every VM)")
        if not rec.get("defaultDatastoreIdentifier") and not all(
                v["recovery"].get("datastoreIdentifier") for v in doc["vms"]):
            raise BadRequest("recovery.defaultDatastoreIdentifier is required (or a datastore for every VM)")
        vpgs = self.zvm.services["vpgs"]
        for other in vpgs.list():
            if other["name"] == b["name"] and other["identifier"] != doc.get("vpgIdentifier"):
                raise Conflict(f"a VPG named {b['name']} exists already: names are unique")
        for v in doc["vms"]:
            self._inventory_vm(v["vmIdentifier"])
            other = vpgs.vpg_of_vm(v["vmIdentifier"])
            if other and other["identifier"] != doc.get("vpgIdentifier"):
                raise Conflict(f"VM {v['vmIdentifier']} is protected by VPG {other['name']} already")
