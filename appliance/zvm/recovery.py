"""The recovery primitives every recovery operation uses (FailoverTest, Clone, Failover, Move,
Restore), at the RECOVERY site's ZVM (``forward.py`` gets the request there).

    resolve_checkpoint ─► open_images ─► create_vms ─► power_on (boot groups, delays) ─► ...
                                            │ (ids recorded in the task data before power-on)
    teardown:  power_off ─► delete_vms ─► discard_images      (each safe to run again)

``RecoveryOp`` is an ``Operation`` base class with these as methods working on the task's
persisted data (``self.data["rec"]``), so a ZVM restarted in the middle of any step runs the
step again and it finds what is done already:

    rec = {"checkpoint": {id, time, tag},
           "vms": [source VM identifiers, in boot order],
           "image": {"id", "vra", "url"} | None,      # the image set on the recovery VRA
           "imagePending": bool,                       # an open was asked but its answer not saved
           "created": {source vm id: {"id", "name", "powered"}},
           "bootedGroups": n}                          # groups powered on (and waited for)

A subclass (see ``operations/failovertest.py``) names its steps and calls:

    self.rec_init(checkpoint, vm_ids)          # in the submitting handler's params, or a step
    self.open_images()                         # POST /v1/recovery/vpgs/{vpg}/images (adopts a
                                               # set opened before a crash: same VPG, checkpoint,
                                               # created after the task started)
    self.create_vms(test=True, suffix=" - testing recovery")   # VMSpec per VM: specs()
    self.power_on()                            # by boot groups, each group's boot delay after it
    self.power_off(); self.delete_vms(); self.discard_images()
    self.set_process({"runningFailOverTestApi": {"stage": "Testing"}})   # both sites' VPG docs
    self.write_report("FailoverTest", status="Passed", notes="...")      # reports table

Module functions for handlers (before a task exists, so that bad input changes nothing):
``resolve_checkpoint(zvm, vpg, ident=None, tagged=False)`` (409 when not recoverable),
``select_vms(vpg, vm_ids)`` (400 for a VM not in the VPG), ``check_networks(zvm, vpg, test)``,
``busy(zvm, vpg)`` (409 while a recovery operation or a test runs for the VPG).
"""
from __future__ import annotations

import ipaddress
import logging
import time

from .errors import BadRequest, Conflict, NotFound, ZVMError
from .events import _iso
from .hypervisor import DiskSpec, NicSpec, RecoveryImage, VMSpec
from .hypervisor.errors import HypervisorError
from .hypervisor.errors import NotFound as HvNotFound
from .tasks import ACTIVE
from .vpgs import DELETING, FAILING_OVER, MOVING, OPERATION_STATUSES, RECOVERED, vra_url
from .vpgtasks import VpgOp
from .vpgsettings import nic_id

log = logging.getLogger("tidemark.zvm.recovery")

BOOT_DELAY_POLL_S = 0.2
# VPG document keys (recovery site's mirror, top level so that the protected site's state pushes
# never overwrite them) naming a running test or clone: {task, image, created, checkpoint, ...}
RUNNING_KEYS = ("_failoverTest", "_clone")


# ---------------------------------------------------------------- before a task: checks
def resolve_checkpoint(zvm, vpg: dict, ident=None, *, tagged: bool = False) -> dict:
    """The checkpoint to recover to: ``ident`` (an id, as string or int), else the latest
    tagged one (``tagged``), else the latest. Must be recoverable now: 409 otherwise (400 for an
    identifier that is not a number)."""
    cps = zvm.services["vpgs"].checkpoints(vpg)
    if ident not in (None, ""):
        try:
            k = int(str(ident).strip())
        except ValueError:
            raise BadRequest(f"checkpoint identifier {ident!r} is not a checkpoint id "
                             f"(GET /v1/vpgs/{vpg['identifier']}/checkpoints lists them)") from None
        cp = next((c for c in cps if int(c["id"]) == k), None)
        if cp is None:
            span = f"{cps[0]['id']}..{cps[-1]['id']}" if cps else "none yet"
            raise Conflict(f"checkpoint {k} of VPG {vpg['name']} is not recoverable "
                           f"(recoverable: {span}): pick one from GET /v1/vpgs/"
                           f"{vpg['identifier']}/checkpoints")
    else:
        pool = [c for c in cps if c.get("tag")] if tagged else cps
        if not pool:
            raise Conflict(f"VPG {vpg['name']} has no recoverable{' tagged' if tagged else ''} "
                           "checkpoint yet: wait for the initial sync (or tag one)")
        cp = pool[-1]
    return {"id": int(cp["id"]), "time": float(cp["time"]), "tag": cp.get("tag")}


def select_vms(vpg: dict, vm_ids: list | None) -> list[str]:
    """The VPG's VMs to recover (source VM identifiers, in the VPG's order): all, or ``vm_ids``
    (400 for one that is not in the VPG, or an empty list)."""
    have = [m["vmIdentifier"] for m in vpg["vms"]]
    if vm_ids is None:
        return have
    if not isinstance(vm_ids, list) or not vm_ids or not all(isinstance(v, str) for v in vm_ids):
        raise BadRequest("vmIdentifiers must be a non-empty list of VM identifiers of the VPG")
    unknown = [v for v in vm_ids if v not in have]
    if unknown:
        raise BadRequest(f"VPG {vpg['name']} does not protect {', '.join(unknown)}")
    return [v for v in have if v in vm_ids]


def busy(zvm, vpg: dict) -> None:
    """409 while the VPG has a running test or clone, or an active exclusive task here, or a
    recovery operation owns its status (failing over, moving, deleting, recovered: a recovered
    VPG has no journal left to recover from)."""
    doc = zvm.services["vpgs"].get(vpg["identifier"])
    st = doc["state"].get("status")
    if st in OPERATION_STATUSES:
        what = {FAILING_OVER: "failing over", MOVING: "moving", DELETING: "being deleted",
                RECOVERED: "recovered already (its VMs run at the recovery site; replication is "
                           "off)"}[st]
        raise Conflict(f"VPG {doc['name']} is {what}: no recovery operation now")
    for key in RUNNING_KEYS:
        if doc.get(key):
            what = "a failover test" if key == "_failoverTest" else "a clone"
            raise Conflict(f"VPG {doc['name']} runs {what} (task {doc[key].get('task')}): "
                           "stop it first")
    active = zvm.tasks.active_for(vpg["identifier"])
    if active:
        raise Conflict(f"VPG {doc['name']} is busy with {active[0]['type']} "
                       f"(task {active[0]['identifier']}); wait for it first")


def nic_network(vpg: dict, vm: dict, index: int, test: bool) -> dict:
    """The recovery network settings of NIC ``index`` of a VM record: ``{network, replaceMac,
    ipConfig}``; the VM's NIC settings override the VPG's default network."""
    side = "failoverTest" if test else "failover"
    nic = next((n for n in (vm.get("recovery") or {}).get("nics") or []
                if n.get("nicIdentifier") == nic_id(index)), {})
    hv = ((nic.get(side) or {}).get("hypervisor")) or {}
    default = (((vpg["settings"].get("networks") or {}).get(side) or {}).get("hypervisor") or {})
    return {"network": hv.get("networkIdentifier") or default.get("defaultNetworkIdentifier"),
            "replaceMac": bool(hv.get("shouldReplaceMacAddress")),
            "ipConfig": hv.get("ipConfig")}


def check_networks(zvm, vpg: dict, vm_ids: list[str], test: bool) -> None:
    """409 when a NIC of a VM to recover has no network to go to (no default network)."""
    side = "failover test" if test else "failover"
    for m in vpg["vms"]:
        if m["vmIdentifier"] not in vm_ids:
            continue
        for n in m["nics"]:
            if not nic_network(vpg, m, n["index"], test)["network"]:
                raise Conflict(f"VPG {vpg['name']} has no {side} network for NIC "
                               f"{nic_id(n['index'])} of VM {m['name']}: set the VPG's "
                               f"{side} network first")


def nic_spec(vpg: dict, vm: dict, nic: dict, test: bool) -> NicSpec:
    """A recovered VM's NIC: the mapped network, the source MAC unless it is to be replaced,
    and the re-IP settings (static IP, prefix from the mask, gateway, DNS) when given."""
    net = nic_network(vpg, vm, nic["index"], test)
    spec = NicSpec(network_id=net["network"], mac=None if net["replaceMac"] else nic.get("mac"))
    ip = net["ipConfig"] or {}
    if ip.get("staticIp") and not ip.get("isDhcp"):
        spec.ip = ip["staticIp"]
        if ip.get("subnetMask"):
            spec.prefix = ipaddress.IPv4Network(f"0.0.0.0/{ip['subnetMask']}").prefixlen
        spec.gateway = ip.get("gateway")
        spec.dns = tuple(d for d in (ip.get("primaryDns"), ip.get("secondaryDns")) if d)
    return spec


def placement(vpg: dict, vm: dict, datastore: str | None = None) -> dict:
    """Host, datastore and folder of a recovered VM: the VM's recovery settings override the
    VPG's defaults; ``datastore`` (a clone's) overrides both."""
    d = vpg["settings"].get("recovery") or {}
    r = ((vm.get("recovery") or {}).get("recovery")) or {}
    return {"host": r.get("hostIdentifier") or d.get("defaultHostIdentifier"),
            "datastore": datastore or r.get("datastoreIdentifier") or d.get("defaultDatastoreIdentifier"),
            "folder": r.get("folderIdentifier") or d.get("defaultFolderIdentifier")}


def boot_groups(vpg: dict, vms: list[dict]) -> list[tuple[dict, list[dict]]]:
    """The VMs by boot group, in the groups' order: ``[(group, [vm records])]`` (a VM naming an
    unknown group boots with the first)."""
    groups = ((vpg["settings"].get("bootGroups") or {}).get("bootGroups")) or \
        [{"bootGroupIdentifier": None, "name": "Default", "bootDelayInSeconds": 0}]
    ids = [g.get("bootGroupIdentifier") for g in groups]
    out = [(g, []) for g in groups]
    for m in vms:
        gid = (m.get("recovery") or {}).get("bootGroupIdentifier")
        out[ids.index(gid) if gid in ids else 0][1].append(m)
    return [(g, ms) for g, ms in out if ms]


def vm_spec(vpg: dict, vm: dict, image: dict, *, name: str, test: bool,
            datastore: str | None = None, power_on: bool = False, plain: bool = False) -> VMSpec:
    """The VMSpec of a recovered VM whose disks are the image set's disks of this VM (``plain``:
    new empty disks of the same capacities instead, for a clone to copy the images into)."""
    where = placement(vpg, vm, datastore)
    if not where["host"] or not where["datastore"]:
        raise Conflict(f"VPG {vpg['name']} names no recovery host or datastore for VM {vm['name']}")
    disks = sorted((d for d in image["disks"] if d["vm"] == vm["instanceUuid"]),
                   key=lambda d: d["disk"])
    if not disks:
        raise Conflict(f"image set {image['id']} has no disk of VM {vm['name']}")
    return VMSpec(name=name, host_id=where["host"], datastore_id=where["datastore"],
                  folder_id=where["folder"], cpus=int(vm.get("cpus") or 1),
                  memory_mib=int(vm.get("memoryMib") or 1024),
                  nics=[nic_spec(vpg, vm, n, test) for n in sorted(vm["nics"], key=lambda n: n["index"])],
                  disks=[DiskSpec(capacity_bytes=int(d["capacity"])) if plain else
                         DiskSpec(capacity_bytes=int(d["capacity"]), recovery_image=RecoveryImage(
                             url=image["url"], token=image["token"], image=image["id"], vm=d["vm"],
                             disk=int(d["disk"]))) for d in disks],
                  power_on=power_on)


# ---------------------------------------------------------------- the operation base class
class RecoveryOp(VpgOp):
    """An Operation of the recovery site with the primitives as idempotent methods."""

    @property
    def rec(self) -> dict:
        return self.data.setdefault("rec", {"checkpoint": None, "vms": [], "image": None,
                                            "imagePending": False, "created": {},
                                            "bootedGroups": 0})

    def rec_init(self, checkpoint: dict, vm_ids: list[str]) -> None:
        if not self.rec.get("checkpoint"):
            self.rec.update(checkpoint=checkpoint, vms=list(vm_ids))
            self.save()

    def vms(self) -> list[dict]:
        """The source VM records being recovered, in the VPG's order."""
        return [m for m in self.vpg()["vms"] if m["vmIdentifier"] in self.rec["vms"]]

    def vra(self) -> dict:
        return self.vpgs.recovery_vra(self.vpg())

    def vra_call(self, method: str, path: str, json=None, timeout=None):
        return self.vpgs.vra_call(self.vra(), method, path, json=json, timeout=timeout)

    # -- image set
    def open_images(self) -> dict:
        """Open (or find again) the image set of the VMs at the checkpoint; its public document
        plus ``url`` and ``token`` for the hosts."""
        rec, vra = self.rec, self.vra()
        if rec.get("image"):
            try:
                doc = self.vra_call("GET", f"/v1/recovery/images/{rec['image']['id']}")
                return self._image(doc, vra)
            except NotFound:
                raise Conflict(f"the recovery VRA lost image set {rec['image']['id']} "
                               "(discarded outside this task?)") from None
        uuids = [m["instanceUuid"] for m in self.vms()]
        if rec.get("imagePending"):        # asked before a restart: adopt that set if it is there
            for s in self.vra_call("GET", "/v1/recovery/images") or []:
                if s["vpg"] == self.vpg_id and s["checkpoint"] == rec["checkpoint"]["id"] and \
                        s["created"] >= self.task["started"] - 1 and not self._owned(s["image"]) and \
                        sorted({d["vm"] for d in s["disks"]}) == sorted(uuids):
                    rec["image"] = {"id": s["image"], "vra": vra.get("identifier")}
                    self.save()
                    self.note(f"image set {s['image']} found again after a restart")
                    return self._image(s, vra)
        rec["imagePending"] = True
        self.save()
        doc = self.vra_call("POST", f"/v1/recovery/vpgs/{self.vpg_id}/images",
                            json={"checkpoint": rec["checkpoint"]["id"], "vms": uuids})
        rec["image"] = {"id": doc["image"], "vra": vra.get("identifier")}
        rec["imagePending"] = False
        self.save()
        self.note(f"image set {doc['image']} at checkpoint {doc['checkpoint']} on "
                  f"{vra.get('name') or vra.get('vraName')} ({len(doc['disks'])} disks)")
        return self._image(doc, vra)

    def _owned(self, image_id: str) -> bool:
        """Whether another task's data or a running test/clone record names this image set."""
        doc = self.vpgs.store.get("vpgs", self.vpg_id) or {}
        if any((doc.get(k) or {}).get("image", {}).get("id") == image_id for k in RUNNING_KEYS):
            return True
        return any(((t.get("data") or {}).get("rec") or {}).get("image", {}) and
                   t["data"]["rec"]["image"].get("id") == image_id
                   for t in self.tasks.list() if t["identifier"] != self.task["identifier"])

    @staticmethod
    def _image(doc: dict, vra: dict) -> dict:
        return {**doc, "id": doc["image"], "url": vra_url(vra), "token": vra.get("_token")}

    def discard_images(self) -> None:
        """Discard the image set (scratch dropped); gone already is fine."""
        rec = self.rec
        img = rec.get("image")
        if img is None and rec.get("imagePending"):
            for s in self.vra_call("GET", "/v1/recovery/images") or []:
                if s["vpg"] == self.vpg_id and s["checkpoint"] == (rec.get("checkpoint") or {}).get("id") \
                        and s["created"] >= self.task["started"] - 1 and not self._owned(s["image"]):
                    img = {"id": s["image"]}
        if img is None:
            return
        try:
            self.vra_call("DELETE", f"/v1/recovery/images/{img['id']}")
        except NotFound:
            pass
        rec.update(image=None, imagePending=False)
        self.save()

    # -- VMs
    def create_vms(self, *, test: bool, suffix: str = "", datastore: str | None = None,
                   plain: bool = False) -> None:
        """Create the recovered VMs (powered off) on the image set (``plain``: on new empty disks);
        each VM's id is saved as soon as it exists. A VM of the same name found on the recovery
        site (created before a restart, its id not saved) is taken over."""
        image = self.open_images()
        hv = self.zvm.hypervisor
        existing = None
        for m in self.vms():
            if m["vmIdentifier"] in self.rec["created"]:
                continue
            name = f"{m['name']}{suffix}"
            if existing is None:
                existing = {v.name: v for v in hv.vms()}
            if name in existing:
                vm_id = existing[name].id
                self.note(f"VM {name} ({vm_id}) found again after a restart")
            else:
                vm_id = hv.create_vm(vm_spec(self.vpg(), m, image, name=name, test=test,
                                             datastore=datastore, plain=plain)).id
            self.rec["created"][m["vmIdentifier"]] = {"id": vm_id, "name": name, "powered": False}
            self.save()

    def power_on(self) -> None:
        """Power the recovered VMs on by boot group, in order, waiting each group's boot delay
        after it before the next group (a restart resumes with the first group not done)."""
        groups = boot_groups(self.vpg(), self.vms())
        hv = self.zvm.hypervisor
        for i, (g, ms) in enumerate(groups):
            if i < self.rec.get("bootedGroups", 0):
                continue
            for m in ms:
                c = self.rec["created"][m["vmIdentifier"]]
                if hv.vm(c["id"]).power_state != "poweredOn":
                    hv.power_on(c["id"])
                c["powered"] = True
                self.save()
            delay = float(g.get("bootDelayInSeconds") or 0)
            if delay and i + 1 < len(groups):
                self.note(f"boot group {g.get('name')}: waiting {delay:g} s before the next group")
                if self.tasks.stopping.wait(delay):
                    from .tasks import _Shutdown
                    raise _Shutdown()
            self.rec["bootedGroups"] = i + 1
            self.save()
        self.data.setdefault("poweredOnAt", time.time())
        self.save()

    def power_off(self) -> None:
        hv = self.zvm.hypervisor
        for c in self.rec["created"].values():
            try:
                if hv.vm(c["id"]).power_state == "poweredOn":
                    hv.power_off(c["id"], graceful=False)
            except HvNotFound:
                pass
            c["powered"] = False
        self.save()

    def delete_vms(self, keep_disks: bool = False) -> None:
        hv = self.zvm.hypervisor
        for src, c in list(self.rec["created"].items()):
            try:
                hv.delete_vm(c["id"], keep_disks=keep_disks)
            except HvNotFound:
                pass
            del self.rec["created"][src]
            self.save()

    # -- both sites' VPG documents
    def set_process(self, process: dict | None, **state) -> None:
        """VpgApi.activeProcessesApi (and other ``state`` fields, e.g. lastTest) on the protected
        site's document (best effort: it may be down) and on this site's mirror."""
        vpg = self.vpg()
        try:
            self.vpgs.peer_call(vpg, "PUT", f"/v1/internal/vpgs/{self.vpg_id}/activeprocess",
                                json={"activeProcess": process, "state": state})
        except ZVMError as exc:
            self.note(f"the protected site did not take the state: {exc}")
        self.vpgs.set_state(self.vpg_id, activeProcess=process, **state)

    # -- reports
    def write_report(self, recovery_type: str, *, status: str, notes: str = "",
                     report_id: str | None = None, end: float | None = None,
                     rto_s: float | None = None, extra_steps: list[dict] = ()) -> dict:
        """Store this operation's recovery report (RecoveryReportApi) here and at the protected
        site (best effort). Steps: this task's history; RTO: from the request to all VMs
        powered on (``rto_s``, else ``poweredOnAt`` - start), when they were."""
        vpg = self.vpg()
        from .routes.vpgs import site_names
        names = site_names(self.zvm)
        t = self.task
        end = end if end is not None else time.time()
        if rto_s is None and self.data.get("poweredOnAt"):
            rto_s = self.data["poweredOnAt"] - t["started"]
        rid = report_id or t["identifier"]
        old = self.vpgs.store.get("reports", rid) or {}
        steps = [step_api(h) for h in t.get("history", [])]
        steps = (old.get("recoverySettings") or {}).get("steps", []) + list(extra_steps) + steps \
            if report_id and old else steps + list(extra_steps)
        cp = (self.rec.get("checkpoint") or {})
        report = {
            "recoveryOperationIdentifier": rid,
            "general": {"vpgIdentifier": vpg["identifier"], "vpgName": vpg["name"],
                        "recoveryType": recovery_type,
                        "protectedSiteName": names.get(vpg["protectedSiteIdentifier"], ""),
                        "recoverySiteName": names.get(vpg["recoverySiteIdentifier"], ""),
                        "startTime": (old.get("general") or {}).get("startTime") or _iso(t["started"]),
                        "endTime": _iso(end),
                        "pointInTime": _iso(cp["time"]) if cp.get("time") else "",
                        "rtoInSeconds": (old.get("general") or {}).get("rtoInSeconds") or
                        (str(round(rto_s)) if rto_s is not None else ""),
                        "status": status, "initiatedBy": t.get("initiatedBy", ""), "notes": notes},
            "recoverySettings": {"vpg": self._report_vpg(vpg),
                                 "vms": (old.get("recoverySettings") or {}).get("vms") or self._report_vms(vpg),
                                 "steps": steps},
            "_created": old.get("_created") or t["started"],
            "_rtoSeconds": (old or {}).get("_rtoSeconds", rto_s),
        }
        store_report(self.zvm, vpg, report)
        return report

    def _names(self):
        hv = self.zvm.hypervisor
        try:
            return ({h.id: h.name for h in hv.hosts()}, {d.id: d.name for d in hv.datastores()},
                    {n.id: n.name for n in hv.networks()}, {f.id: f.name for f in hv.folders()})
        except HypervisorError:
            return {}, {}, {}, {}

    def _report_vpg(self, vpg: dict) -> dict:
        hosts, dss, nets, _ = self._names()
        r = vpg["settings"].get("recovery") or {}
        side = "failoverTest" if self.type.startswith("FailoverTest") else "failover"
        net = ((vpg["settings"].get("networks") or {}).get(side) or {}).get("hypervisor") or {}
        return {"defaultHostName": hosts.get(r.get("defaultHostIdentifier"), ""),
                "defaultDatastoreName": dss.get(r.get("defaultDatastoreIdentifier"), ""),
                "defaultNetworkName": nets.get(net.get("defaultNetworkIdentifier"), "")}

    def _report_vms(self, vpg: dict) -> list[dict]:
        hosts, dss, nets, folders = self._names()
        test = self.type.startswith("FailoverTest")
        out = []
        for m in self.vms():
            where = placement(vpg, m, self.params.get("datastoreIdentifier"))
            c = self.rec["created"].get(m["vmIdentifier"]) or {}
            out.append({"vmName": c.get("name") or m["name"],
                        "hostName": hosts.get(where["host"], where["host"] or ""),
                        "datastoreName": dss.get(where["datastore"], where["datastore"] or ""),
                        "folderName": folders.get(where["folder"], ""),
                        "networkNames": [nets.get(nic_network(vpg, m, n["index"], test)["network"], "")
                                         for n in m["nics"]],
                        "volumes": [{"volumeName": f"scsi:0:{d['index']}",
                                     "datastoreName": dss.get(where["datastore"], "")}
                                    for d in m["disks"]]})
        return out


def step_api(h: dict) -> dict:
    """A task history entry as a RecoverySettingsStepApi."""
    start, end = h.get("start"), h.get("end")
    return {"description": h["step"].split(":", 1)[-1].replace("_", " ")
            + ("" if h["step"].startswith("forward:") else " (rollback)"),
            "result": h.get("result") or "Running", "startTime": _iso(start), "endTime": _iso(end),
            "executionTime": f"{(end - start):.3f}" if start and end else ""}


def store_report(zvm, vpg: dict, report: dict) -> None:
    """Keep a recovery report here and, best effort, at the VPG's other site."""
    zvm.store.put("reports", report["recoveryOperationIdentifier"], report)
    try:
        zvm.services["vpgs"].peer(vpg).request(
            "PUT", f"/v1/internal/reports/{report['recoveryOperationIdentifier']}",
            json={k: v for k, v in report.items() if not k.startswith("_")} |
            {"created": report.get("_created")})
    except ZVMError as exc:
        log.info("report %s not copied to the peer: %s", report["recoveryOperationIdentifier"], exc)


def active_task(zvm, vpg_id: str, op_type: str) -> dict | None:
    return next((t for t in zvm.tasks.active_for(vpg_id) if t["type"] == op_type
                 and t["state"] in ACTIVE), None)
