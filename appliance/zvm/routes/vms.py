"""/v1/vms, /v1/volumes, /v1/statistics/vms: the protected VMs of the VPGs this site knows."""
from __future__ import annotations

import os
import time

from ..errors import BadRequest, NotFound
from ..events import _iso
from ..schema import BOOL, INT, STR
from ..vpgs import PRIORITY_NUM
from .vpgs import _time, checkpoint_api, site_names, vpg_api


def _pairs(zvm, q: dict | None = None):
    """(VPG document, its VM record) for every protected VM, optionally of one VPG."""
    q = q or {}
    for vpg in zvm.services["vpgs"].list():
        if q.get("vpgIdentifier") and vpg["identifier"] != q["vpgIdentifier"]:
            continue
        for vm in vpg["vms"]:
            yield vpg, vm


def vm_api(zvm, vpg: dict, vm: dict, names: dict) -> dict:
    v = vpg_api(zvm, vpg, names)
    n = max(1, len(vpg["vms"]))
    lim = ((vm.get("recovery") or {}).get("journal") or {}).get("limitation") or \
        vpg["settings"]["journal"].get("limitation") or {}
    prov = sum(d["capacityBytes"] for d in vm["disks"]) >> 20
    rec = vpg.get("recoveryVra") or {}
    return {
        "vmIdentifier": vm["vmIdentifier"], "vmName": vm["name"],
        "link": {"vpg_identifier": vpg["identifier"], "instance_identifier": vm["instanceUuid"],
                 "rel": "self", "href": f"/v1/vms/{vm['vmIdentifier']}", "type": "VmApi",
                 "identifier": vm["vmIdentifier"]},
        "vpgIdentifier": vpg["identifier"], "vpgName": vpg["name"], "organizationName": "",
        "priority": PRIORITY_NUM.get(vpg["settings"]["basic"].get("priority"), 1),
        "provisionedStorageInMB": prov, "usedStorageInMB": prov,
        "cpuCoresNum": vm.get("cpus"), "memorySizeInMB": vm.get("memoryMib"),
        "journalUsedStorageMb": v["journalUsedStorageInMB"] // n,
        "journalWarningThreshold": {"limitType": 1, "limitValue": lim.get("warningThresholdInMB") or 0},
        "journalHardLimit": {"limitType": 1, "limitValue": lim.get("hardLimitInMB") or 0},
        "ioPs": v["ioPs"] // n, "throughputInMB": round(v["throughputInMB"] / n, 3),
        "outgoingBandWidthInMbps": round(v["throughputInMB"] * 8 / n, 3),
        "actualRPO": v["actualRPO"], "lastTest": None,
        "volumes": [{"vmVolumeIdentifier": f"scsi:0:{d['index']}", "publicCloudVolumeIdentifier": None}
                    for d in vm["disks"]],
        "nics": [{"nicIdentifier": f"Network adapter {x['index'] + 1}", "macAddress": x["mac"],
                  "ipAddress": x.get("ip"), "networkIdentifier": x.get("networkIdentifier")}
                 for x in vm["nics"]],
        "protectedSiteName": v["protectedSiteName"], "recoverySiteName": v["recoverySiteName"],
        "protectedSite": v["protectedSite"], "recoverySite": v["recoverySite"],
        "entities": v["entities"], "status": v["status"], "subStatus": v["subStatus"],
        "enabledActions": None, "isVmExists": True,
        "recoveryHostIdentifier": (vm.get("recovery") or {}).get("recovery", {}).get("hostIdentifier")
        or vpg["settings"]["recovery"].get("defaultHostIdentifier"),
        "recoveryHostName": None, "recoveryVraName": rec.get("name"),
        "owningHostIdentifier": vm["hostIdentifier"] if vpg["role"] == "protected" else None,
        "owningHostName": None, "guestOs": None, "hardwareVersion": None,
        "isAgentInstalled": False,
    }


def register(api, zvm):
    @api.route("GET", "/v1/vms", "Protected VMs", response="[VmApi]", query={
        "vpgName": STR, "vmName": STR, "status": INT, "subStatus": INT, "vmIdentifier": STR,
        "protectedSiteIdentifier": STR, "recoverySiteIdentifier": STR, "priority": INT,
        "sourceSite": STR, "targetSite": STR, "protectedSiteType": STR, "recoverySiteType": STR,
        "sourceType": STR, "targetType": STR, "organizationName": STR,
        "includeBackupedVms": BOOL, "includeMountedVms": BOOL})
    def vms(req):
        q, names, out = req.query, site_names(zvm), []
        for vpg, vm in _pairs(zvm):
            a = vm_api(zvm, vpg, vm, names)
            checks = [("vpgName", "vpgName"), ("vmName", "vmName"), ("status", "status"),
                      ("subStatus", "subStatus"), ("vmIdentifier", "vmIdentifier"),
                      ("priority", "priority"), ("sourceSite", "protectedSiteName"),
                      ("targetSite", "recoverySiteName")]
            if any(k in q and q[k] != a[f] for k, f in checks):
                continue
            if "protectedSiteIdentifier" in q and q["protectedSiteIdentifier"] != vpg["protectedSiteIdentifier"]:
                continue
            if "recoverySiteIdentifier" in q and q["recoverySiteIdentifier"] != vpg["recoverySiteIdentifier"]:
                continue
            out.append(a)
        return out

    def find(vm_id: str, vpg_id: str | None):
        hits = [(p, v) for p, v in _pairs(zvm, {"vpgIdentifier": vpg_id}) if v["vmIdentifier"] == vm_id]
        if not hits:
            raise NotFound(f"VM {vm_id} is not protected by a VPG this site knows")
        return hits[0]

    @api.route("GET", "/v1/vms/{vmIdentifier}", "One protected VM", response="VmApi",
               query={"vpgIdentifier": STR, "includeBackupedVms": BOOL, "includeMountedVms": BOOL})
    def vm(req, vmIdentifier):
        vpg, v = find(vmIdentifier, req.query.get("vpgIdentifier"))
        return vm_api(zvm, vpg, v, site_names(zvm))

    @api.route("GET", "/v1/vms/{vmIdentifier}/pointsInTime", "A VM's recoverable points in time",
               response="[PointInTimeApi]", query={"vpgIdentifier": STR, "startDate": STR,
                                                   "endDate": STR})
    def pits(req, vmIdentifier):
        q = req.query
        vpg, _ = find(vmIdentifier, q.get("vpgIdentifier"))
        lo = _time(q["startDate"], "startDate") if "startDate" in q else None
        hi = _time(q["endDate"], "endDate") if "endDate" in q else None
        return [_pit(c) for c in zvm.services["vpgs"].checkpoints(vpg)
                if (lo is None or c["time"] >= lo) and (hi is None or c["time"] <= hi)]

    @api.route("GET", "/v1/vms/{vmIdentifier}/pointsInTime/stats", "Earliest and latest point in time",
               response="PointInTimeStatsApi", query={"vpgIdentifier": STR})
    def pit_stats(req, vmIdentifier):
        vpg, _ = find(vmIdentifier, req.query.get("vpgIdentifier"))
        cps = zvm.services["vpgs"].checkpoints(vpg)
        return {"earliest": _pit(cps[0]) if cps else None, "latest": _pit(cps[-1]) if cps else None}

    @api.route("GET", "/v1/volumes", "Protected and recovery volumes of the VPGs",
               response="[VolumeApi]", query={
                   "volumeType": STR, "vpgIdentifier": STR, "datastoreIdentifier": STR,
                   "protectedVmIdentifier": STR, "owningVmIdentifier": STR})
    def volumes(req):
        q, out = req.query, []
        if q.get("volumeType") not in (None, "Protected", "Recovery"):
            raise BadRequest("volumeType is Protected or Recovery (journal and scratch volumes "
                             "live inside the recovery VRA's journal)")
        for vpg, vm in _pairs(zvm, q):
            if q.get("protectedVmIdentifier") not in (None, vm["vmIdentifier"]):
                continue
            for d in vm["disks"]:
                out += [v for v in _volumes(vpg, vm, d)
                        if q.get("volumeType") in (None, v["volumeType"])
                        and q.get("datastoreIdentifier") in (None, v["datastore"]["identifier"])
                        and q.get("owningVmIdentifier") in (None, v["owningVm"]["identifier"])]
        return out

    @api.route("GET", "/v1/statistics/vms", "IO statistics of the protected VMs",
               response="[VmStatisticsApi]")
    def stats(req):
        out = []
        for vpg, vm in _pairs(zvm):
            s, n = vpg.get("stats") or {}, max(1, len(vpg["vms"]))
            out.append({"vmIdentifier": vm["vmIdentifier"], "vpgIdentifier": vpg["identifier"],
                        "ioOperationsCounter": int(s.get("ioPs") or 0) // n,
                        "writeCounterInMBs": int(float(s.get("throughputInMB") or 0) / n),
                        "syncCounterInMBs": 0,
                        "networkTrafficCounterInMBs": int(float(s.get("throughputInMB") or 0) / n),
                        "sampleTime": _iso(s.get("sampleTime") or time.time())})
        return out


def _pit(c: dict) -> dict:
    return {"checkpoint": checkpoint_api(c), "retentionSet": None,
            "canMount": {"isAllowed": True, "reason": ""}}


def _volumes(vpg: dict, vm: dict, d: dict) -> list[dict]:
    size = {"usedInBytes": d["capacityBytes"], "provisionedInBytes": d["capacityBytes"]}
    vmref = {"identifier": vm["vmIdentifier"], "name": vm["name"]}
    ref = {"identifier": vpg["identifier"], "name": vpg["name"]}
    out = []
    if vpg["role"] == "protected":
        path = d.get("path") or ""
        out.append({"volumeType": "Protected", "isThinProvisioned": True,
                    "volumeIdentifier": f"scsi:0:{d['index']}",
                    "path": {"full": path, "relative": os.path.basename(os.path.dirname(path)),
                             "fileName": os.path.basename(path)}, "size": size,
                    "datastore": {"identifier": d.get("datastoreIdentifier"), "name": None},
                    "owningVm": vmref, "protectedVm": vmref, "vpg": ref, "storagePolicy": None})
    elif vpg.get("replicaDir"):
        path = os.path.join(vpg["replicaDir"], vm["instanceUuid"], f"disk{d['index']}.img")
        ds = vpg["settings"]["journal"].get("datastoreIdentifier") or \
            vpg["settings"]["recovery"].get("defaultDatastoreIdentifier")
        out.append({"volumeType": "Recovery", "isThinProvisioned": True,
                    "volumeIdentifier": f"scsi:0:{d['index']}",
                    "path": {"full": path, "relative": vm["instanceUuid"],
                             "fileName": os.path.basename(path)}, "size": size,
                    "datastore": {"identifier": ds, "name": None},
                    "owningVm": {"identifier": vpg["recoveryVra"]["identifier"],
                                 "name": vpg["recoveryVra"]["name"]},
                    "protectedVm": vmref, "vpg": ref, "storagePolicy": None})
    return out
