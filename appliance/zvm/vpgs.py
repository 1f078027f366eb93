"""VPGs: the stored VPG document, the commit of settings, and the helpers every VPG operation
uses (``zvm.services["vpgs"]``). docs/zvm.md, "VPGs", specifies the document.

Both ZVMs of a VPG keep its document under the same identifier: the protected site's copy
(``role: "protected"``) drives replication; the recovery site's mirror (``role: "recovery"``)
is written by the peer through the site-to-site routes (``routes/vpgs.py``, ``/v1/internal``)
and knows the recovery VRA. Replication itself is the VRAs' (docs/vra.md):

    protected ZVM                         recovery ZVM                  VRAs
    commit ─ validate ─ PUT /v1/internal/vpgs/{id} ──► pick the recovery host's VRA,
                                                      PUT /v1/recovery/vpgs/{id} ─► journal + replicas
           ◄──────────── address, url ────────────────┘
           ─ PUT /v1/protected/vpgs/{id} on each protected host's VRA (one leader) ─► streams
           ─ POST .../sync {all} on each ─► initial (delta) sync ─► MeetingSLA
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import threading
import time
import uuid

from .errors import BadRequest, CheckpointLost, Conflict, NotFound, Unavailable, ZVMError
from .vpgsettings import journal_limits

log = logging.getLogger("tidemark.zvm.vpgs")

# VpgVisualStatusApi / VpgVisualSubStatusApi (the reference's integer enums)
STATUSES = ["Initializing", "MeetingSLA", "NotMeetingSLA", "HistoryNotMeetingSLA",
            "RpoNotMeetingSLA", "FailingOver", "Moving", "Deleting", "Recovered"]
SUBSTATUSES = ["None", "InitialSync", "Creating", "VolumeInitialSync", "Sync", "RecoveryPossible",
               "DeltaSync", "NeedsConfiguration", "Error", "EmptyProtectionGroup",
               "DisconnectedFromPeerNoRecoveryPoints", "FullSync", "VolumeDeltaSync",
               "VolumeFullSync", "FailingOverCommitting", "FailingOverBeforeCommit",
               "FailingOverRollingBack", "Promoting", "MovingCommitting", "MovingBeforeCommit",
               "MovingRollingBack", "Deleting", "PendingRemove", "BitmapSync",
               "DisconnectedFromPeer", "ReplicationPausedUserInitiated"]
INITIALIZING, MEETING_SLA, NOT_MEETING_SLA, HISTORY_NOT_MET, RPO_NOT_MET = 0, 1, 2, 3, 4
DELETING = 7
FAILING_OVER, MOVING, RECOVERED = 5, 6, 8
OPERATION_STATUSES = (FAILING_OVER, MOVING, DELETING, RECOVERED)   # a recovery operation owns them
SUB_FO_COMMITTING, SUB_FO_BEFORE_COMMIT, SUB_FO_ROLLING_BACK = 14, 15, 16
SUB_MOVE_COMMITTING, SUB_MOVE_BEFORE_COMMIT, SUB_MOVE_ROLLING_BACK = 18, 19, 20
SUB_NONE, SUB_INITIAL_SYNC, SUB_CREATING, SUB_DELTA_SYNC, SUB_ERROR = 0, 1, 2, 6, 8
SUB_DISCONNECTED, SUB_PAUSED = 24, 25
PRIORITY_NUM = {"Low": 0, "Medium": 1, "High": 2}
ENTITY_TYPES = ["VCVpg", "VCvApp", "VCDvApp", "PublicCloud", "HyperV", "KVM"]   # VpgEntityTypeApi
RETENTION_POLICIES = ["None", "Backup", "ExtendedRecovery"]
FAILOVER_SHUTDOWN_POLICIES = ["None", "Shutdown", "ForceShutdown"]
FAILOVER_COMMIT_POLICIES = ["Rollback", "Commit", "None"]


# -- the VRA documents of zvm.services["vras"] (docs/zvm.md, "VRAs")
def vra_id(v: dict) -> str:
    return str(v.get("vraIdentifier") or v.get("identifier") or v.get("id"))


def vra_name(v: dict) -> str:
    return v.get("vraName") or v.get("name")


def vra_url(v: dict) -> str:
    return v.get("controlUrl") or v.get("control_url") or v.get("url")


def vra_address(v: dict) -> list:
    rep = v.get("replication")
    if isinstance(rep, dict):
        return [rep.get("host"), int(rep.get("port"))]
    if rep:
        return [rep[0], int(rep[1])]
    return [v.get("replicationHost"), int(v.get("replicationPort") or 0)]


def vra_host(v: dict) -> str:
    return v.get("hostIdentifier") or v.get("host_id") or v.get("hostId")


def camel(doc):
    """A peer's answer (PascalCase on the wire) back in the stored spelling (camelCase)."""
    if isinstance(doc, dict):
        return {(k[:1].lower() + k[1:]): camel(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [camel(v) for v in doc]
    return doc


class Vpgs:
    def __init__(self, zvm):
        self.zvm = zvm
        self.store = zvm.store
        self._subscribed = False
        self._motion_lock = threading.Lock()

    def on_start(self) -> None:
        inv = self.zvm.services.get("inventory")
        if inv is not None and not self._subscribed:
            inv.subscribe(self.on_inventory_change)
            self._subscribed = True

    # ------------------------------------------------------------------ documents
    def get(self, vpg_id: str) -> dict:
        doc = self.store.get("vpgs", vpg_id)
        if doc is None:
            raise NotFound(f"no VPG {vpg_id} (GET /v1/vpgs lists them)")
        return doc

    def list(self) -> list[dict]:
        return self.store.all("vpgs")

    def put(self, doc: dict) -> dict:
        return self.store.put("vpgs", doc["identifier"], doc)

    @contextlib.contextmanager
    def update(self, vpg_id: str):
        try:
            with self.store.update("vpgs", vpg_id) as doc:
                yield doc
        except KeyError:
            raise NotFound(f"no VPG {vpg_id}") from None

    def delete_doc(self, vpg_id: str) -> None:
        self.store.delete("vpgs", vpg_id)

    def link(self, vpg: dict) -> dict:
        return {"rel": "self", "href": f"/v1/vpgs/{vpg['identifier']}", "type": "VpgApi",
                "identifier": vpg["identifier"], "name": vpg["name"]}

    def by_name(self, name: str) -> dict | None:
        return next((v for v in self.list() if v["name"] == name), None)

    def vpg_of_vm(self, vm_id: str) -> dict | None:
        """The VPG protecting this site's VM ``vm_id`` (protected role), if any."""
        for v in self.list():
            if v["role"] == "protected" and any(m["vmIdentifier"] == vm_id for m in v["vms"]):
                return v
        return None

    def set_state(self, vpg_id: str, **state) -> dict:
        with self.update(vpg_id) as doc:
            doc["state"].update(state)
        return doc

    def set_active_process(self, vpg_id: str, process: dict | None) -> dict:
        """What a recovery operation shows in VpgApi.activeProcessesApi (None: nothing runs),
        e.g. ``{"runningFailOverTestApi": {"stage": "Testing"}}``."""
        return self.set_state(vpg_id, activeProcess=process)

    # ------------------------------------------------------------------ peers and VRAs
    def peer(self, vpg: dict):
        """The client of the other site's ZVM of this VPG."""
        sites = self.zvm.services.get("sites")
        if sites is None:
            raise Unavailable("this ZVM has no site pairing service")
        other = vpg["recoverySiteIdentifier"] if vpg["role"] == "protected" \
            else vpg["protectedSiteIdentifier"]
        return sites.client(other)

    def peer_call(self, vpg: dict, method: str, path: str, json=None, timeout=None):
        """Call the VPG's other ZVM; its answer in camelCase."""
        return camel(self.peer(vpg).request(method, path, json=json, timeout=timeout))

    def _vras(self):
        vras = self.zvm.services.get("vras")
        if vras is None:
            raise Unavailable("this ZVM has no VRA service")
        return vras

    def vra_doc(self, vid: str) -> dict | None:
        try:
            return self._vras().get(vid)
        except NotFound:
            return None

    def vra_for_host(self, host_id: str) -> dict:
        try:
            vra = self._vras().for_host(host_id)
        except NotFound:
            vra = None
        if not vra:
            raise Conflict(f"host {host_id} has no VRA: install one (POST /v1/vras) first")
        return vra

    def vra_call(self, vra: dict, method: str, path: str, json=None, timeout=None):
        return self._vras().client(vra).request(method, path, json=json,
                                                timeout=timeout or self.zvm.cfg.peer_timeout_s)

    def recovery_vra(self, vpg: dict) -> dict:
        """The recovery VRA's document (at the recovery site: the local VRA's full document)."""
        if vpg["role"] == "recovery":
            vra = self.vra_doc(vpg["recoveryVra"]["identifier"])
            if vra:
                return vra
        return vpg["recoveryVra"]

    def protected_vras(self, vpg: dict) -> list[dict]:
        """The local VRAs protecting the VPG (protected site only)."""
        out = []
        for p in vpg.get("protectedVras", []):
            vra = self.vra_doc(p["identifier"])
            if vra:
                out.append(vra)
        return out

    # ------------------------------------------------------------------ protection
    def vm_records(self, settings: dict) -> list[dict]:
        """The VPG document's VMs: the hypervisor's view plus each VM's recovery settings."""
        out = []
        for s in settings["vms"]:
            vm = self.zvm.hypervisor.vm(s["vmIdentifier"])
            out.append({
                "vmIdentifier": vm.id, "name": vm.name, "instanceUuid": vm.instance_uuid,
                "hostIdentifier": vm.host_id,
                "disks": [{"index": d.index, "capacityBytes": d.capacity_bytes,
                           "datastoreIdentifier": d.datastore_id, "path": d.path} for d in vm.disks],
                "nics": [{"index": n.index, "identifier": n.id, "networkIdentifier": n.network_id,
                          "mac": n.mac, "ip": n.ip} for n in vm.nics],
                "cpus": vm.cpus, "memoryMib": vm.memory_mib,
                "recovery": copy.deepcopy(s)})
        return out

    def plan_protection(self, vpg: dict) -> tuple[list[dict], str]:
        """The protected VRAs (one per host running a VM of the VPG, plus those already in it
        whose host still runs one) and the leader (kept if still there)."""
        hosts = []
        for vm in vpg["vms"]:
            if vm["hostIdentifier"] and vm["hostIdentifier"] not in hosts:
                hosts.append(vm["hostIdentifier"])
        vras = [self.vra_for_host(h) for h in hosts]
        entries = [{"identifier": vra_id(v), "name": vra_name(v), "hostIdentifier": h,
                    "url": vra_url(v)} for v, h in zip(vras, hosts)]
        ids = [e["identifier"] for e in entries]
        leader = vpg.get("leader") if vpg.get("leader") in ids else (ids[0] if ids else None)
        return entries, leader

    def protect_body(self, vpg: dict, leader: bool, participants: dict) -> dict:
        s = vpg["settings"]["basic"]
        rec = vpg["recoveryVra"]
        return {"vms": [m["instanceUuid"] for m in vpg["vms"]],
                "target_host": rec["address"][0], "target_port": rec["address"][1],
                "compress": bool(s.get("useWanCompression", True)),
                "priority": s.get("priority") or "Medium", "leader": leader,
                "participants": participants,
                "interval_s": self.zvm.cfg.vpg_checkpoint_interval_s,
                "recovery_url": vpg["_recovery"]["url"],
                "target_token": vpg["_recovery"].get("token")}

    def protect(self, vpg: dict, only: set[str] | None = None) -> dict:
        """PUT /v1/protected/vpgs/{vpg} on every protected VRA (``only``: just these, plus the
        leader so that it knows the participants); stores the protected VRAs and leader."""
        entries, leader = self.plan_protection(vpg)
        participants = {}
        for e in entries:
            vra = self.vra_doc(e["identifier"]) or {}
            participants[e["name"]] = {"url": e["url"], "token": vra.get("_token")}
        old = {e["identifier"] for e in vpg.get("protectedVras", [])}
        for e in entries:
            if only is not None and e["identifier"] not in only and e["identifier"] != leader:
                continue
            vra = self.vra_doc(e["identifier"]) or e
            self.vra_call(vra, "PUT", f"/v1/protected/vpgs/{vpg['identifier']}",
                          json=self.protect_body(vpg, e["identifier"] == leader, participants))
        for gone in old - {e["identifier"] for e in entries}:
            self._unprotect_on(vpg, gone)
        with self.update(vpg["identifier"]) as doc:
            doc["protectedVras"], doc["leader"] = entries, leader
        vpg.update(protectedVras=entries, leader=leader)
        return vpg

    def _unprotect_on(self, vpg: dict, vid: str) -> None:
        vra = self.vra_doc(vid)
        if vra:
            try:
                self.vra_call(vra, "DELETE", f"/v1/protected/vpgs/{vpg['identifier']}")
            except NotFound:
                pass

    def unprotect(self, vpg: dict, *, ignore_errors: bool = False) -> None:
        """Stop replicating the VPG on every protected VRA (what pause, delete and a failover
        before its shutdown of the sources do). The recovery side keeps its journal."""
        for e in vpg.get("protectedVras", []):
            try:
                self._unprotect_on(vpg, e["identifier"])
            except ZVMError:
                if not ignore_errors:
                    raise

    def sync(self, vpg: dict, vra_ids: set[str] | None = None) -> dict:
        """Delta sync of the VPG's disks on its protected VRAs (all, or ``vra_ids``): totals."""
        total = {"blocks_differing": 0, "blocks_sent": 0, "bytes_sent": 0}
        for e in vpg["protectedVras"]:
            if vra_ids is not None and e["identifier"] not in vra_ids:
                continue
            vra = self.vra_doc(e["identifier"]) or e
            out = self.vra_call(vra, "POST", f"/v1/protected/vpgs/{vpg['identifier']}/sync",
                                json={"all": True}, timeout=self.zvm.cfg.vpg_sync_timeout_s)
            for k in total:
                total[k] += int((out or {}).get(k, 0))
        return total

    def reprotect(self, vpg_id: str, *, sync: bool = True) -> dict:
        """Protect again after ``unprotect`` (resume, a cancelled failover): the protected VRAs
        stream again and, with ``sync``, a delta sync brings over what changed meanwhile."""
        vpg = self.get(vpg_id)
        vpg = self.protect(vpg)
        if sync:
            self.set_state(vpg_id, syncing=True)
            try:
                self.sync(vpg)
            finally:
                self.set_state(vpg_id, syncing=False)
        return self.get(vpg_id)

    # ------------------------------------------------------------------ commit
    def commit(self, sid: str, user: str = "") -> str:
        """Validate a settings draft, store the VPG (new ones show as Initializing at once) and
        submit CreateVpg or UpdateVpg; the draft is gone afterwards. The task id."""
        drafts = self.zvm.services["vpgsettings"]
        draft = drafts.get(sid)
        drafts.check_for_commit(draft)
        settings = {k: copy.deepcopy(v) for k, v in draft.items()
                    if not k.startswith("_") and k != "vpgSettingsIdentifier"}
        vms = self.vm_records(settings)
        probe = {"role": "protected", "vms": vms}
        self.plan_protection(probe)                   # every host has a VRA, or 409
        rec_site = settings["basic"]["recoverySiteIdentifier"]
        self.zvm.services["sites"].client(rec_site).request(
            "POST", "/v1/internal/vpgs/validate", json={"settings": settings, "vms": vms})
        vpg_id = settings.get("vpgIdentifier")
        if vpg_id:
            vpg = self.get(vpg_id)
            task = self.zvm.tasks.submit("UpdateVpg", {"settings": settings}, vpg=self.link(vpg),
                                         user=user)
        else:
            vpg_id = str(uuid.uuid4())
            settings["vpgIdentifier"] = vpg_id
            now = time.time()
            vpg = {"identifier": vpg_id, "name": settings["basic"]["name"], "role": "protected",
                   "settings": settings, "protectedSiteIdentifier": self.zvm.site_id,
                   "recoverySiteIdentifier": rec_site, "vms": vms, "recoveryVra": None,
                   "protectedVras": [], "leader": None, "created": now,
                   "state": {"status": INITIALIZING, "substatus": SUB_CREATING, "paused": False,
                             "activeProcess": None, "initialSyncDone": None, "syncing": False,
                             "lastError": None, "progress": 0},
                   "stats": {}, "_recovery": None}
            self.put(vpg)
            try:
                task = self.zvm.tasks.submit("CreateVpg", {}, vpg=self.link(vpg), user=user)
            except ZVMError:
                self.delete_doc(vpg_id)
                raise
        self.store.delete("vpg_settings", sid)
        self.zvm.events.record("CreateVpg" if task["type"] == "CreateVpg" else "UpdateVpg",
                               f"{task['type']} of VPG {vpg['name']} submitted", entity="VPG",
                               vpg=self.link(vpg), user=user)
        return task["identifier"]

    def submit(self, op: str, vpg_id: str, params: dict | None = None, user: str = "") -> str:
        vpg = self.get(vpg_id)
        if vpg["role"] != "protected":
            raise Conflict(f"VPG {vpg['name']} is managed at its protected site "
                           f"({vpg['protectedSiteIdentifier']})")
        return self.zvm.tasks.submit(op, params or {}, vpg=self.link(vpg), user=user)["identifier"]

    # ------------------------------------------------------------------ checkpoints
    def checkpoints(self, vpg: dict) -> list[dict]:
        """Recoverable checkpoints ``{id, time, tag}``, oldest first, from the recovery VRA.

        None for a Recovered VPG (a Failover or Move committed without reverse protection):
        its journal was committed into the recovered VMs' disks and dropped, so no history is
        left to recover from, at either site (and neither asks the other or a VRA)."""
        if vpg["state"]["status"] == RECOVERED:
            return []
        if vpg["role"] == "recovery":
            return self.vra_call(self.recovery_vra(vpg), "GET",
                                 f"/v1/recovery/vpgs/{vpg['identifier']}/checkpoints") or []
        return self.peer_call(vpg, "GET", f"/v1/internal/vpgs/{vpg['identifier']}/checkpoints") or []

    def take_checkpoint(self, vpg: dict, tag: str | None = None) -> dict:
        """Ask the leader for a checkpoint now: ``{id, valid, ...}`` (docs/vra.md)."""
        leader = next((e for e in vpg["protectedVras"] if e["identifier"] == vpg["leader"]), None)
        if leader is None:
            raise Conflict(f"VPG {vpg['name']} has no leader VRA: is it paused?")
        vra = self.vra_doc(leader["identifier"]) or leader
        return self.vra_call(vra, "POST", f"/v1/protected/vpgs/{vpg['identifier']}/checkpoints",
                             json={"tag": tag} if tag else {})

    def valid_checkpoint(self, vpg: dict, tag: str | None, deadline: float, *, step_s: float = 0.5,
                         retry_errors: bool = False) -> dict:
        """Take checkpoints until one is valid (none is while a delta sync runs or a VM has
        dirty blocks): the leader's answer ``{id, valid, ...}``. ``retry_errors``: a ZVM error
        of the leader (it may still be starting its coordinator) counts as one invalid try.
        Conflict if none is valid by ``deadline`` (time.monotonic)."""
        while True:
            try:
                cp = self.take_checkpoint(vpg, tag)
            except ZVMError as exc:
                if not retry_errors:
                    raise
                cp = {"valid": False, "problems": [str(exc)]}
            if cp.get("valid"):
                return cp
            if time.monotonic() > deadline:
                raise Conflict(f"VPG {vpg['name']} took no valid checkpoint in time (the last one: "
                               f"{'; '.join(cp.get('problems') or []) or 'not valid'})")
            time.sleep(step_s)

    def wait_recoverable(self, vpg: dict, cp_id, deadline: float, *, required: bool = True) -> dict | None:
        """The recovery site's listing entry ``{id, time, tag}`` of checkpoint ``cp_id`` once it is
        recoverable (every write before it durable there). By ``deadline``: Unavailable, or
        None when not ``required``.

        A checkpoint the recovery VRA could not make recoverable (its barrier was abandoned: a
        participant's marker lost in a restart, or late beyond the barrier's limit) is never
        listed. COMMITs reach the recovery VRA in checkpoint order, so once a later checkpoint
        is listed and ``cp_id`` is not, it never will be: CheckpointLost at once (None when not
        ``required``) instead of waiting out the deadline."""
        while True:
            listing = self.checkpoints(vpg)
            got = next((c for c in listing if c["id"] == cp_id), None)
            if got is not None:
                return got
            later = next((c["id"] for c in listing if c["id"] > cp_id), None)
            if later is not None:
                if not required:
                    return None
                raise CheckpointLost(f"checkpoint {cp_id} of VPG {vpg['name']} was not made recoverable "
                                     f"at the recovery site (a later one, {later}, is)")
            if time.monotonic() > deadline:
                if not required:
                    return None
                raise Unavailable(f"checkpoint {cp_id} of VPG {vpg['name']} did not become recoverable in time")
            time.sleep(0.3)

    def recoverable_checkpoint(self, vpg: dict, tag: str | None, deadline: float, **kw) -> tuple[dict, dict]:
        """A valid checkpoint taken now and its recovery-site listing entry once recoverable:
        ``(leader's answer, entry)``. One the recovery site lost (CheckpointLost) is replaced
        by a new one, until ``deadline``. ``kw`` goes to ``valid_checkpoint``."""
        while True:
            cp = self.valid_checkpoint(vpg, tag, deadline, **kw)
            try:
                return cp, self.wait_recoverable(vpg, cp["id"], deadline)
            except CheckpointLost as exc:
                log.warning("%s; taking another", exc)
                self.zvm.events.record("CheckpointLost", f"{exc}; taking another", entity="VPG",
                                       vpg=self.link(vpg), success=False)
                if time.monotonic() > deadline:
                    raise

    # ------------------------------------------------------------------ recovery side
    def check_recovery(self, settings: dict, vms: list[dict]) -> None:
        """At the recovery site: the hosts, datastores, networks and folder the settings name
        exist here, and each recovery host has a VRA (400/409 otherwise)."""
        hv = self.zvm.hypervisor
        hosts = {h.id for h in hv.hosts()}
        dss = {d.id for d in hv.datastores()}
        nets = {n.id for n in hv.networks()}
        folders = {f.id for f in hv.folders()}
        rec = settings["recovery"]
        want = [("recovery.defaultHostIdentifier", rec.get("defaultHostIdentifier"), hosts),
                ("recovery.defaultDatastoreIdentifier", rec.get("defaultDatastoreIdentifier"), dss),
                ("recovery.defaultFolderIdentifier", rec.get("defaultFolderIdentifier"), folders),
                ("journal.datastoreIdentifier", settings["journal"].get("datastoreIdentifier"), dss)]
        for side in ("failover", "failoverTest"):
            hvnet = ((settings["networks"].get(side) or {}).get("hypervisor")) or {}
            want.append((f"networks.{side}.hypervisor.defaultNetworkIdentifier",
                         hvnet.get("defaultNetworkIdentifier"), nets))
        for v in settings["vms"]:
            r = v.get("recovery") or {}
            want += [(f"vms[{v['vmIdentifier']}].recovery.hostIdentifier", r.get("hostIdentifier"), hosts),
                     (f"vms[{v['vmIdentifier']}].recovery.datastoreIdentifier", r.get("datastoreIdentifier"), dss)]
            for n in v.get("nics") or []:
                for side in ("failover", "failoverTest"):
                    hvn = ((n.get(side) or {}).get("hypervisor")) or {}
                    want.append((f"vms[{v['vmIdentifier']}].nics[{n['nicIdentifier']}].{side}",
                                 hvn.get("networkIdentifier"), nets))
        for where, value, known in want:
            if value and value not in known:
                raise BadRequest(f"{where}: the recovery site has no {value!r}")
        self.vra_for_host(self.recovery_host(settings))

    @staticmethod
    def recovery_host(settings: dict) -> str:
        host = settings["recovery"].get("defaultHostIdentifier")
        return host or next(v["recovery"]["hostIdentifier"] for v in settings["vms"])

    def replica_dir(self, settings: dict, vpg_id: str) -> str:
        """Where the recovery VRA keeps the replica disks: a folder on the journal (or default
        recovery) datastore when the hypervisor says where that is, else under the ZVM's data."""
        ds = settings["journal"].get("datastoreIdentifier") or \
            settings["recovery"].get("defaultDatastoreIdentifier")
        hv = self.zvm.hypervisor
        root = hv.datastore_path(ds) if ds and hasattr(hv, "datastore_path") else None
        if root is None:
            root = str(self.zvm.cfg.path("replicas"))
        return os.path.join(root, "tidemark-replicas", vpg_id)

    def journal_datastore_bytes(self, settings: dict) -> int:
        """At the recovery site: the capacity of the VPG's journal datastore (the recovery
        default when the journal names none); 0 if unknown."""
        ds = (settings["journal"].get("datastoreIdentifier")
              or settings["recovery"].get("defaultDatastoreIdentifier"))
        return next((d.capacity_bytes for d in self.zvm.hypervisor.datastores() if d.id == ds), 0)

    def prepare_recovery(self, vpg_id: str, body: dict) -> dict:
        """At the recovery site (site-to-site): accept the VPG on the recovery host's VRA and
        keep a mirror of its document. Idempotent. Answers the replication address and the
        control URL the protected VRAs use for delta-sync hashes and barrier aborts."""
        settings, vms = body["settings"], body["vms"]
        self.check_recovery(settings, vms)
        vra = self.vra_for_host(self.recovery_host(settings))
        basic, lim = settings["basic"], settings["journal"].get("limitation") or {}
        preseed = body.get("preseed") or {}     # "<uuid>:<disk>" -> an existing file (reverse)
        disks = [{"vm": m["instanceUuid"], "disk": d["index"], "capacity": d["capacityBytes"],
                  **({"preseed": preseed[f"{m['instanceUuid']}:{d['index']}"]}
                     if f"{m['instanceUuid']}:{d['index']}" in preseed else {})}
                 for m in vms for d in m["disks"]]
        replica_dir = self.replica_dir(settings, vpg_id)
        hard, warn = journal_limits(lim, self.journal_datastore_bytes(settings))
        self.vra_call(vra, "PUT", f"/v1/recovery/vpgs/{vpg_id}", json={
            "replica_dir": replica_dir,
            "history_s": int(basic.get("journalHistoryInHours") or 24) * 3600,
            "hard_limit_bytes": hard, "warn_bytes": warn,
            "disks": disks})
        rec = {"identifier": vra_id(vra), "name": vra_name(vra), "hostIdentifier": vra_host(vra),
               "address": vra_address(vra)}
        with self.store.transaction():
            doc = self.store.get("vpgs", vpg_id) or {
                "identifier": vpg_id, "role": "recovery", "created": time.time(),
                "state": {"status": INITIALIZING, "substatus": SUB_CREATING, "paused": False,
                          "activeProcess": None, "initialSyncDone": None, "syncing": False,
                          "lastError": None, "progress": 0},
                "stats": {}, "protectedVras": [], "leader": None}
            if doc["role"] != "recovery":
                raise Conflict(f"VPG {vpg_id} is protected from this site")
            doc.update(name=basic["name"], settings=settings, vms=vms, recoveryVra=rec,
                       replicaDir=replica_dir,
                       protectedSiteIdentifier=body["protectedSiteIdentifier"],
                       recoverySiteIdentifier=self.zvm.site_id)
            self.put(doc)
        # the recovery VRA's token: the protected VRAs' streams and hash reads present it
        return {"recoveryVra": rec, "address": rec["address"], "url": vra_url(vra),
                "token": vra.get("_token")}

    def drop_recovery(self, vpg_id: str, keep_volumes: bool) -> None:
        """At the recovery site: delete the VPG's journal (and its replica disks unless
        ``keep_volumes``) on the recovery VRA, and the mirror document. Idempotent."""
        doc = self.store.get("vpgs", vpg_id)
        if doc is None:
            return
        if doc["role"] != "recovery":
            raise Conflict(f"VPG {vpg_id} is protected from this site")
        vra = self.recovery_vra(doc)
        self.vra_call(vra, "DELETE", f"/v1/recovery/vpgs/{vpg_id}?keep_replicas="
                                     f"{'1' if keep_volumes else '0'}")
        self.delete_doc(vpg_id)
        self.zvm.alerts.clear_prefix(f"vpg:{vpg_id}:")

    def recovery_report(self, vpg_id: str, state: dict | None = None) -> dict:
        """At the recovery site: take the protected site's view of the VPG's state (if given)
        and answer the recovery VRA's: RPO, latest checkpoint, journal usage."""
        doc = self.get(vpg_id)
        if state:
            with self.update(vpg_id) as d:
                st = dict(state.get("state") or {})
                if d["state"].get("status") in OPERATION_STATUSES:
                    # a recovery operation here owns the status; the peer's view waits
                    st.pop("status", None), st.pop("substatus", None), st.pop("activeProcess", None)
                d["state"].update(st)
                d["stats"].update(state.get("stats") or {})
        vra = self.recovery_vra(doc)
        st = self.vra_call(vra, "GET", "/v1/status")
        rpo = ((st.get("recovery") or {}).get("vpgs") or {}).get(vpg_id) or {}
        usage = self.vra_call(vra, "GET", f"/v1/recovery/vpgs/{vpg_id}/usage")
        return {"rpoS": rpo.get("rpo_s"), "latestCheckpoint": rpo.get("latest_checkpoint"),
                "journalBytes": usage.get("bytes", 0), "historyS": usage.get("history_s_actual", 0),
                "journalHardLimitBytes": usage.get("hard_limit_bytes"),
                "journalWarningBytes": usage.get("warn_bytes"),
                "journalAlerts": [a for a in (st.get("recovery") or {}).get("alerts", [])
                                  if a.get("vpg") == vpg_id]}

    # ------------------------------------------------------------------ vMotion
    def on_inventory_change(self, change) -> None:
        """A protected VM moved to another host: make that host's VRA part of the VPG (protect
        there, participants updated) and delta-sync the moved VM, so protection continues
        without a full sync."""
        if getattr(change, "kind", None) != "vm_moved" or not change.new:
            return
        vpg = self.vpg_of_vm(change.id)
        if vpg is None:
            return
        from .vpgmotion import follow_vm
        with self._motion_lock:
            follow_vm(self, vpg["identifier"], change.id, change.new)
