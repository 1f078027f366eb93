"""Reverse protection: after a Failover or Move commit the VPG protects the recovered VMs back
to the original site. The VPG keeps its identity (as the reference does) with its sites
swapped: the recovery site's document becomes ``role: "protected"`` and the original site's
becomes its ``role: "recovery"`` mirror.

The original VMs' disks ARE the replicas of the reversed VPG (preseed): the original site's
VRA registers each recovered disk's replica as a link to the original disk file
(``appliance/vra/preseed.py``), so the delta sync that follows compares hashes and moves only
the blocks that differ; after a Move that is nothing or almost nothing.

    recovery ZVM (becomes protected)                 original ZVM (becomes recovery)
    reverse_target ── POST /v1/internal/vpgs/{id}/reverse ──► power off the original VMs,
                                                              delete them keeping their disks
                                                              (or keep them, powered off),
                                                              settings pointing at this site,
                                                              document role "recovery",
                                                              prepare_recovery with preseed
                   ◄──── settings, recovery VRA, url, token ──┘
    reverse_protect: document role "protected", drop the old journal here (keeping the replica
                     files: they are the recovered VMs' disks now), protect on the VMs' VRAs
    reverse_sync:    delta sync (blocks compared / differing / sent noted in the task)
    reverse_checkpoint: a valid, recoverable checkpoint ─► MeetingSLA

Every step is idempotent: the original site answers the same after a retry (its document is
already converted, the VMs already gone, the links already there), and protect, sync and
checkpoint may run again.
"""
from __future__ import annotations

import copy
import time

from ..errors import BadRequest, Conflict, NotFound
from ..hypervisor.errors import NotFound as HvNotFound
from ..vpgs import INITIALIZING, MEETING_SLA, SUB_DELTA_SYNC, SUB_NONE
from ..vpgsettings import nic_id, volume_id

CHECKPOINT_WAIT_S = 90.0


# ------------------------------------------------------------------ at the original site
def reverse_settings(zvm, doc: dict, vms: list[dict]) -> dict:
    """The reversed VPG's settings: the same basic settings with this (original) site as the
    recovery site; each recovered VM goes back to its original VM's host, datastore and
    networks."""
    old = doc["settings"]
    orig = {m["vmIdentifier"]: m for m in doc["vms"]}
    firsts = [orig[v["sourceVmIdentifier"]] for v in vms]
    first = firsts[0]
    ds = next((d["datastoreIdentifier"] for d in first["disks"] if d.get("datastoreIdentifier")), None)
    net = next((n["networkIdentifier"] for n in first["nics"] if n.get("networkIdentifier")), None)
    nets = zvm.hypervisor.networks()
    test_net = next((n.id for n in nets if n.isolated), net)
    s = copy.deepcopy(old)
    s["basic"].update(protectedSiteIdentifier=doc["recoverySiteIdentifier"],
                      recoverySiteIdentifier=zvm.site_id)
    s["recovery"] = {**(s.get("recovery") or {}), "defaultHostIdentifier": first["hostIdentifier"],
                     "defaultHostClusterIdentifier": None, "defaultDatastoreIdentifier": ds,
                     "defaultDatastoreClusterIdentifier": None, "defaultFolderIdentifier": None,
                     "resourcePoolIdentifier": None}
    s["journal"] = {**(s.get("journal") or {}), "datastoreIdentifier": ds,
                    "datastoreClusterIdentifier": None}
    s["scratch"] = {**(s.get("scratch") or {}), "datastoreIdentifier": None}
    hv_net = lambda n: {"hypervisor": {"networkIdentifier": n, "shouldReplaceMacAddress": False,
                                       "dnsSuffix": None, "ipConfig": None,
                                       "shouldReplaceIpConfiguration": False},
                        "vcd": None, "publicCloud": None}
    s["networks"] = {"failover": {"hypervisor": {"defaultNetworkIdentifier": net}},
                     "failoverTest": {"hypervisor": {"defaultNetworkIdentifier": test_net}}}
    old_vm = {v["vmIdentifier"]: v for v in old.get("vms") or []}
    s["vms"] = []
    for v in vms:
        o = orig[v["sourceVmIdentifier"]]
        ods = next((d["datastoreIdentifier"] for d in o["disks"] if d.get("datastoreIdentifier")), ds)
        s["vms"].append({
            "vmIdentifier": v["vmIdentifier"],
            "recovery": {"hostIdentifier": o["hostIdentifier"], "hostClusterIdentifier": None,
                         "datastoreIdentifier": ods, "datastoreClusterIdentifier": None,
                         "folderIdentifier": None, "resourcePoolIdentifier": None,
                         "vcd": None, "publicCloud": None},
            "bootGroupIdentifier": (old_vm.get(o["vmIdentifier"]) or {}).get("bootGroupIdentifier"),
            "volumes": [{"volumeIdentifier": volume_id(d["index"]), "vcd": None, "preseed": None,
                         "rdm": None, "datastore": {"datastoreClusterIdentifier": None,
                                                    "datastoreIdentifier": d.get("datastoreIdentifier") or ods,
                                                    "isThin": True},
                         "volumeSyncSettings": "Continuous"} for d in o["disks"]],
            "nics": [{"nicIdentifier": nic_id(n["index"]), "failover": hv_net(n.get("networkIdentifier")),
                      "failoverTest": hv_net(test_net)} for n in o["nics"]],
        })
    return s


def prepare_reverse(zvm, vpg_id: str, body: dict) -> dict:
    """At the original (protected) site, site-to-site: become the reversed VPG's recovery site
    with the original VMs' disks as its replicas. Idempotent."""
    vpgs = zvm.services["vpgs"]
    hv = zvm.hypervisor
    doc = vpgs.get(vpg_id)
    vms = body.get("vms") or []
    if not vms or not all(isinstance(v, dict) and v.get("sourceVmIdentifier") and v.get("instanceUuid")
                          for v in vms):
        raise BadRequest("reverse takes vms: [{vmIdentifier, instanceUuid, sourceVmIdentifier, ...}]")
    if doc["role"] == "recovery" and doc.get("_reverse"):
        orig_doc = doc["_reverse"]["original"]          # converted already: the same answer
    elif doc["role"] == "protected":
        orig_doc = {k: copy.deepcopy(doc[k]) for k in ("settings", "vms", "protectedVras",
                                                        "leader", "recoverySiteIdentifier")}
        vpgs.unprotect(doc, ignore_errors=True)
        with vpgs.update(vpg_id) as d:
            d["_reverse"] = {"original": orig_doc, "time": time.time(), "vms": vms}
    else:
        raise Conflict(f"VPG {doc['name']} is not protected from this site: nothing to reverse")
    orig = {m["vmIdentifier"]: m for m in orig_doc["vms"]}
    unknown = [v["sourceVmIdentifier"] for v in vms if v["sourceVmIdentifier"] not in orig]
    if unknown:
        raise BadRequest(f"VPG {doc['name']} did not protect {', '.join(unknown)}")
    preseed, records = {}, []
    for v in vms:
        o = orig[v["sourceVmIdentifier"]]
        for d in o["disks"]:
            preseed[f"{v['instanceUuid']}:{d['index']}"] = d["path"]
        records.append(v)
    # the original VMs: off, and gone from the inventory (their disk files stay: the replicas)
    keep = bool(body.get("keepSourceVms"))
    for o in orig.values():
        try:
            vm = hv.vm(o["vmIdentifier"])
        except HvNotFound:
            continue
        if vm.power_state == "poweredOn":
            hv.power_off(vm.id, graceful=False)
        if not keep:
            hv.delete_vm(vm.id, keep_disks=True)
    settings = reverse_settings(zvm, {**doc, **orig_doc}, vms)
    settings["vpgIdentifier"] = vpg_id
    for r, sv in zip(records, settings["vms"]):
        r["recovery"] = sv
    with vpgs.update(vpg_id) as d:
        d.update(role="recovery", protectedVras=[], leader=None, _recovery=None,
                 protectedSiteIdentifier=body["protectedSiteIdentifier"],
                 recoverySiteIdentifier=zvm.site_id)
        d["state"].update(status=INITIALIZING, substatus=SUB_DELTA_SYNC, activeProcess=None,
                          paused=False, syncing=False)
    ans = vpgs.prepare_recovery(vpg_id, {"settings": settings, "vms": records,
                                         "protectedSiteIdentifier": body["protectedSiteIdentifier"],
                                         "preseed": preseed})
    return {**ans, "settings": settings, "vms": records,
            "preseeded": len(preseed), "sourceVmsKept": keep}


# ------------------------------------------------------------------ at the recovery site
class ReverseSteps:
    """Mixed into Failover and Move: the reverse protection steps, run at the (former) recovery
    site after the commit; ``self.data["reverseTarget"]`` keeps the original site's answer."""

    def reverse_vms(self) -> list[dict]:
        """The recovered VMs as VPG VM records of this site, with their source VM."""
        hv = self.zvm.hypervisor
        out = []
        src = {m["vmIdentifier"]: m for m in self.vpg()["vms"]}
        for sid, c in self.rec["created"].items():
            vm = hv.vm(c["id"])
            out.append({
                "vmIdentifier": vm.id, "name": vm.name, "instanceUuid": vm.instance_uuid,
                "hostIdentifier": vm.host_id, "cpus": vm.cpus, "memoryMib": vm.memory_mib,
                "disks": [{"index": d.index, "capacityBytes": d.capacity_bytes,
                           "datastoreIdentifier": d.datastore_id, "path": d.path} for d in vm.disks],
                "nics": [{"index": n.index, "identifier": n.id, "networkIdentifier": n.network_id,
                          "mac": n.mac, "ip": n.ip} for n in vm.nics],
                "sourceVmIdentifier": sid, "sourceInstanceUuid": src[sid]["instanceUuid"]})
        return out

    def step_reverse_target(self):
        if not self.data.get("reverse"):
            return "done"
        vpg = self.vpg()
        if self.data.get("reverseTarget"):
            return None
        self.mark_state(INITIALIZING, SUB_DELTA_SYNC, None)
        vms = self.reverse_vms()
        ans = self.vpgs.peer_call(vpg, "POST", f"/v1/internal/vpgs/{self.vpg_id}/reverse", json={
            "vms": vms, "keepSourceVms": bool(self.data.get("keepSourceVms")),
            "protectedSiteIdentifier": self.zvm.site_id}, timeout=120)
        self.data["reverseTarget"] = {"recoveryVra": ans["recoveryVra"], "url": ans["url"],
                                      "token": ans.get("token"), "settings": ans["settings"],
                                      "vms": ans["vms"], "preseeded": ans.get("preseeded")}
        self.save()
        self.note(f"original site: recovery VRA {ans['recoveryVra']['name']}, "
                  f"{ans.get('preseeded')} replica disks are the original VMs' disks, source VMs "
                  f"{'kept powered off' if ans.get('sourceVmsKept') else 'removed (disks kept)'}")

    def step_reverse_protect(self):
        tgt = self.data["reverseTarget"]
        vpg = self.vpg()
        if vpg["role"] == "recovery":
            # the old journal here: its replicas are the recovered VMs' disks now, keep them
            try:
                self.vpgs.vra_call(self.vpgs.recovery_vra(vpg), "DELETE",
                                   f"/v1/recovery/vpgs/{self.vpg_id}?keep_replicas=1")
            except NotFound:
                pass
            vms = []
            for r in tgt["vms"]:
                r = {k: v for k, v in r.items() if k not in ("sourceVmIdentifier", "sourceInstanceUuid")}
                vms.append(r)
            with self.vpgs.update(self.vpg_id) as d:
                d["_reversedFrom"] = {"settings": d["settings"], "vms": d["vms"],
                                      "recoveryVra": d.get("recoveryVra"), "time": time.time()}
                d.update(role="protected", settings=tgt["settings"], vms=vms,
                         name=tgt["settings"]["basic"]["name"],
                         protectedSiteIdentifier=self.zvm.site_id,
                         recoverySiteIdentifier=vpg["protectedSiteIdentifier"],
                         recoveryVra=tgt["recoveryVra"],
                         _recovery={"url": tgt["url"], "token": tgt.get("token")},
                         protectedVras=[], leader=None)
                d.pop("replicaDir", None)
                d["state"].update(status=INITIALIZING, substatus=SUB_DELTA_SYNC, initialSyncDone=None,
                                  activeProcess=None, syncing=True)
        vpg = self.vpgs.protect(self.vpg())
        self.note(f"reverse protection on {', '.join(e['name'] for e in vpg['protectedVras'])}")

    def step_reverse_sync(self):
        if self.data.get("reverseSync") is None:
            vpg = self.vpg()
            try:
                out = self.vpgs.sync(vpg)
            finally:
                self.vpgs.set_state(self.vpg_id, syncing=False)
            self.data["reverseSync"] = out
            self.save()
            self.note(f"reverse delta sync: {out['blocks_differing']} blocks differed, "
                      f"{out['blocks_sent']} sent ({out['bytes_sent']} bytes)")

    def step_reverse_checkpoint(self):
        """A valid checkpoint (every VM's writes clean at the barrier). It becomes recoverable
        once the journal holds a write: a cut at an empty journal makes no checkpoint
        (appliance/vra/recovery.py), and a delta sync that sent nothing leaves it empty; the
        replicas equal the VMs' disks already then, and the first write brings the first
        recoverable checkpoint."""
        vpg = self.vpg()
        deadline = time.monotonic() + CHECKPOINT_WAIT_S
        cp = self.vpgs.valid_checkpoint(vpg, None, deadline, retry_errors=True)
        recoverable = self.vpgs.wait_recoverable(vpg, cp["id"], min(deadline, time.monotonic() + 10),
                                                 required=False) is not None
        self.note(f"checkpoint {cp['id']} valid" + ("" if recoverable else
                  "; not recoverable yet: nothing was journaled since the sync (the replicas "
                  "equal the disks), the first write makes the first recoverable checkpoint"))
        self.vpgs.set_state(self.vpg_id, status=MEETING_SLA, substatus=SUB_NONE,
                            initialSyncDone=time.time(), activeProcess=None, lastError=None)
        self.data["reverseCheckpoint"] = cp["id"]
        self.save()
        sent = (self.data.get("reverseSync") or {}).get("blocks_sent")
        self.zvm.events.record("ReverseProtection",
                               f"VPG {vpg['name']} protects its recovered VMs back to the original "
                               f"site (delta sync sent {sent} blocks)",
                               entity="VPG", vpg=self.vpgs.link(vpg), user=self.task.get("initiatedBy", ""))

