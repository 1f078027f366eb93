"""/v1/vpgs: VPGs, their checkpoints, pause/resume/forcesync, delete, the enumerations; and the
site-to-site routes (``/v1/internal/vpgs``, role peer) the protected site's ZVM calls on the
recovery site's."""
from __future__ import annotations

from datetime import datetime, timezone

from ..errors import BadRequest, Conflict
from ..events import _iso
from ..schema import ANY, BOOL, INT, STR, nullable, obj
from ..vpgs import (ENTITY_TYPES, FAILOVER_COMMIT_POLICIES, FAILOVER_SHUTDOWN_POLICIES,
                    PRIORITY_NUM, RETENTION_POLICIES, STATUSES, SUBSTATUSES, Vpgs, camel)
from ..vpgstatus import VpgMonitor
from .. import vpgtasks  # noqa: F401  (registers the VPG operations)


def _time(value: str, name: str) -> float:
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{name} must be an ISO 8601 time such as 2026-11-26T10:00:00Z") from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def checkpoint_api(c: dict) -> dict:
    return {"checkpointIdentifier": str(c["id"]), "timeStamp": _iso(c["time"]),
            "tag": c.get("tag") or "", "type": 1 if c.get("tag") else 0}


def site_names(zvm) -> dict:
    names = {zvm.site_id: zvm.cfg.site_name}
    sites = zvm.services.get("sites")
    for p in sites.peers() if sites else []:
        names[p["siteIdentifier"]] = p.get("peerSiteName", "")
    return names


def vpg_api(zvm, vpg: dict, names: dict | None = None) -> dict:
    names = names or site_names(zvm)
    st, stats, basic = vpg["state"], vpg.get("stats") or {}, vpg["settings"]["basic"]
    prov = sum(d["capacityBytes"] for m in vpg["vms"] for d in m["disks"]) >> 20
    active = [a for a in zvm.alerts.active()
              if vpg["identifier"] in [x.get("identifier") for x in a["affectedVpgs"]]]
    alert_status = 2 if any(a["level"] == "Error" for a in active) else 1 if active else 0
    hist_cfg = int(basic.get("journalHistoryInHours") or 24) * 60
    entity = 4 if zvm.cfg.site_kind == "hyperv" else 0
    site = lambda sid: {"rel": "self", "href": "/v1/localsite" if sid == zvm.site_id
                        else f"/v1/peersites/{sid}", "type": "SiteApi", "identifier": sid}
    return {
        "vpgIdentifier": vpg["identifier"], "vpgName": vpg["name"], "vpgDescription": "",
        "vpgType": basic.get("vpgType") or "Remote",
        "link": {"rel": "self", "href": f"/v1/vpgs/{vpg['identifier']}", "type": "VpgApi",
                 "identifier": vpg["identifier"]},
        "progressPercentage": 100.0 if st.get("initialSyncDone") else 0.0,
        "zorg": None, "priority": PRIORITY_NUM.get(basic.get("priority"), 1),
        "vmsCount": len(vpg["vms"]), "provisionedStorageInMB": prov, "usedStorageInMB": prov,
        "ioPs": int(stats.get("ioPs") or 0), "throughputInMB": float(stats.get("throughputInMB") or 0),
        "actualRPO": stats.get("actualRpo") if stats.get("actualRpo") is not None else -1,
        "configuredRpoSeconds": int(basic.get("rpoInSeconds") or 300),
        "lastTest": st.get("lastTest"),
        "protectedSiteName": names.get(vpg["protectedSiteIdentifier"], ""),
        "protectedSite": site(vpg["protectedSiteIdentifier"]),
        "recoverySiteName": names.get(vpg["recoverySiteIdentifier"], ""),
        "recoverySite": site(vpg["recoverySiteIdentifier"]),
        "entities": {"protected": entity, "recovery": entity},
        "status": st["status"], "statusDescription": STATUSES[st["status"]],
        "subStatus": st["substatus"], "subStatusDescription": SUBSTATUSES[st["substatus"]]
        if st["substatus"] < len(SUBSTATUSES) else "",
        "activeProcessesApi": st.get("activeProcess"), "serviceProfile": None,
        "backupEnabled": False,
        "failSafeHistory": {"actualFailSafeHistory": 0, "configuredFailSafeHistory": 0,
                            "failSafeDescription": ""},
        "historyStatusApi": {"actualHistoryInMinutes": int(stats.get("historyS") or 0) // 60,
                             "configuredHistoryInMinutes": hist_cfg, "earliestCheckpoint": None},
        "alertStatus": alert_status,
        "journalUsedStorageInMB": int(stats.get("journalBytes") or 0) >> 20,
        "isPaused": bool(st.get("paused")),
    }


def register(api, zvm):
    svc: Vpgs = zvm.services.setdefault("vpgs", Vpgs(zvm))
    monitor = VpgMonitor(zvm, svc)
    zvm.services["vpgstatus"] = monitor
    zvm.jobs.add("vpg-status", zvm.cfg.monitor_interval_s, monitor.sync)
    zvm.metrics.append(monitor.metrics)
    api.schema("VpgDeleteDataApi", obj(keepRecoveryVolumes=nullable(BOOL), force=nullable(BOOL)))
    api.schema("VpgInsertTagCheckpointDataApi", obj(("checkpointName",), checkpointName=STR))
    api.schema("InternalVpgRecovery", obj(("settings", "vms"), settings=ANY, vms=ANY,
                                          protectedSiteIdentifier=nullable(STR)))
    api.schema("InternalVpgState", obj(state=ANY, stats=ANY))
    vp = "/v1/vpgs/{vpgIdentifier}"

    for name, values in (("statuses", STATUSES), ("substatuses", SUBSTATUSES),
                         ("priorities", list(PRIORITY_NUM)), ("retentionpolicies", RETENTION_POLICIES),
                         ("entitytypes", ENTITY_TYPES),
                         ("failovershutdownpolicies", FAILOVER_SHUTDOWN_POLICIES),
                         ("failovercommitpolicies", FAILOVER_COMMIT_POLICIES)):
        _enum_route(api, name, values)

    @api.route("GET", "/v1/vpgs", "VPGs of this site (protected here or recovering here)",
               response="[VpgApi]", query={
                   "name": STR, "status": INT, "subStatus": INT, "protectedSiteIdentifier": STR,
                   "recoverySiteIdentifier": STR, "priority": INT, "sourceSite": STR,
                   "targetSite": STR, "protectedSiteType": STR, "recoverySiteType": STR,
                   "zorgIdentifier": STR, "organizationName": STR, "backupEnabled": BOOL,
                   "serviceProfileIdentifier": STR, "sourceType": STR, "targetType": STR})
    def vpgs(req):
        names, q = site_names(zvm), req.query
        out = []
        for v in svc.list():
            a = vpg_api(zvm, v, names)
            checks = [("name", "vpgName"), ("status", "status"), ("subStatus", "subStatus"),
                      ("priority", "priority"), ("sourceSite", "protectedSiteName"),
                      ("targetSite", "recoverySiteName"), ("backupEnabled", "backupEnabled")]
            if any(k in q and q[k] != a[f] for k, f in checks):
                continue
            if "protectedSiteIdentifier" in q and q["protectedSiteIdentifier"] != v["protectedSiteIdentifier"]:
                continue
            if "recoverySiteIdentifier" in q and q["recoverySiteIdentifier"] != v["recoverySiteIdentifier"]:
                continue
            if "zorgIdentifier" in q or "serviceProfileIdentifier" in q:
                continue                     # no ZORGs or service profiles: nothing matches
            out.append(a)
        return out

    @api.route("GET", vp, "One VPG", response="VpgApi")
    def one(req, vpgIdentifier):
        return vpg_api(zvm, svc.get(vpgIdentifier))

    @api.route("DELETE", vp, "Delete a VPG (a task)", body="VpgDeleteDataApi",
               body_required=False, response="string")
    def delete(req, vpgIdentifier):
        b = req.body or {}
        vpg = svc.get(vpgIdentifier)
        if vpg["state"].get("activeProcess") and not b.get("force"):
            raise Conflict(f"VPG {vpg['name']} runs {vpg['state']['activeProcess']}: finish it "
                           "first, or delete with Force")
        return svc.submit("DeleteVpg", vpgIdentifier, {
            "keepRecoveryVolumes": bool(b.get("keepRecoveryVolumes")), "force": bool(b.get("force"))},
            req.user)

    for op, path in (("PauseVpg", "pause"), ("ResumeVpg", "resume"), ("ForceSync", "forcesync")):
        _op_route(api, svc, vp, op, path)

    @api.route("GET", vp + "/checkpoints", "Recoverable checkpoints", response="[CheckpointApi]",
               query={"startDate": STR, "endDate": STR})
    def checkpoints(req, vpgIdentifier):
        q = req.query
        lo = _time(q["startDate"], "startDate") if "startDate" in q else None
        hi = _time(q["endDate"], "endDate") if "endDate" in q else None
        cps = svc.checkpoints(svc.get(vpgIdentifier))
        return [checkpoint_api(c) for c in cps
                if (lo is None or c["time"] >= lo) and (hi is None or c["time"] <= hi)]

    @api.route("GET", vp + "/checkpoints/stats", "Earliest and latest checkpoint",
               response="VpgCheckpointsStatsApi")
    def checkpoint_stats(req, vpgIdentifier):
        cps = svc.checkpoints(svc.get(vpgIdentifier))
        return {"earliest": checkpoint_api(cps[0]) if cps else None,
                "latest": checkpoint_api(cps[-1]) if cps else None}

    @api.route("POST", vp + "/checkpoints", "Insert a tagged checkpoint (a task)",
               body="VpgInsertTagCheckpointDataApi", response="string")
    def tag(req, vpgIdentifier):
        name = req.body["checkpointName"].strip()
        if not name or len(name) > 200:
            raise BadRequest("checkpointName must be 1 to 200 characters")
        vpg = svc.get(vpgIdentifier)
        if vpg["state"].get("paused") or not vpg["state"].get("initialSyncDone"):
            raise Conflict(f"VPG {vpg['name']} is paused or still initializing: no checkpoint now")
        return svc.submit("InsertTaggedCheckpoint", vpgIdentifier, {"tag": name}, req.user)

    # -- site to site (the protected site's ZVM calls these on the recovery site's)
    ip = "/v1/internal/vpgs/{vpgIdentifier}"

    @api.route("POST", "/v1/internal/vpgs/validate", "Check VPG settings against this "
               "(recovery) site's inventory", tag="internal", body="InternalVpgRecovery", role="peer")
    def validate(req):
        svc.check_recovery(camel(req.body["settings"]), camel(req.body["vms"]))

    @api.route("PUT", ip, "Accept a VPG at this (recovery) site", tag="internal",
               body="InternalVpgRecovery", role="peer")
    def prepare(req, vpgIdentifier):
        b = req.body
        return svc.prepare_recovery(vpgIdentifier, {
            "settings": camel(b["settings"]), "vms": camel(b["vms"]),
            "protectedSiteIdentifier": b.get("protectedSiteIdentifier")})

    @api.route("DELETE", ip, "Drop a VPG at this (recovery) site", tag="internal", role="peer",
               query={"keepRecoveryVolumes": BOOL})
    def drop(req, vpgIdentifier):
        svc.drop_recovery(vpgIdentifier, bool(req.query.get("keepRecoveryVolumes")))

    @api.route("POST", ip + "/state", "The protected site's state of a VPG; answers the recovery "
               "VRA's RPO and journal usage", tag="internal", body="InternalVpgState", role="peer")
    def state(req, vpgIdentifier):
        return svc.recovery_report(vpgIdentifier, camel(req.body))

    @api.route("GET", ip + "/checkpoints", "Recoverable checkpoints from the recovery VRA",
               tag="internal", role="peer")
    def internal_checkpoints(req, vpgIdentifier):
        return svc.checkpoints(svc.get(vpgIdentifier))


def _enum_route(api, name, values):
    @api.route("GET", f"/v1/vpgs/{name}", f"VPG {name}", response="[string]")
    def view(req):
        return list(values)


def _op_route(api, svc, vp, op, path):
    @api.route("POST", f"{vp}/{path}", f"{op} (a task)", response="string")
    def view(req, vpgIdentifier):
        return svc.submit(op, vpgIdentifier, user=req.user)
