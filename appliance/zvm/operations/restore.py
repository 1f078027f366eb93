"""Per-VM Restore (JournalVMRestore): one VM of a VPG restored to a point in time at the recovery
site, while the rest of the VPG keeps replicating. The restored VM starts on an image set of
just that VM; commit copies its disks into plain files on the recovery VRA (``POST
.../export``: the DSS commit would end the VPG's journal generation) and rebases the VM onto
them; rollback deletes it and discards the image."""
from __future__ import annotations

import os

from .. import forward
from ..errors import BadRequest, Conflict, ZVMError
from ..recovery import RecoveryOp, active_task, busy, placement, resolve_checkpoint, vm_spec
from ..tasks import ROLLBACK, WAITING, operation


@operation
class Restore(RecoveryOp):
    """Restore one VM of a VPG at the recovery site (the VPG keeps replicating).

        begin ─► shutdown_source (policy 1/2: the source VM at the protected site; else noted)
          ─► open_images (that VM only) ─► create_vm (restoredVmName, failover network)
          ─► power_on ─► wait_commit ── WaitingForUserInput until RestoreCommit /
             │ commit                    RestoreRollback, or the policy's default after
             ▼                           timeToWaitBeforeContinueInSeconds
          export (power the VM off, its disks copied into files on the recovery datastore)
          ─► rebase (the VM onto the files; powered on again) ─► discard_images ─► Completed (6)
             │ rollback, or a step fails before export
             ▼
          delete_vms ─► discard_images ─► restart_source ─► Stopped (5) / Failed (4)
    """
    type = "Restore"
    steps = ("begin", "shutdown_source", "open_images", "create_vm", "power_on", "wait_commit",
             "export", "rebase", "discard")
    rollback_steps = ("delete_vms", "discard_images", "restart_source")

    def step_begin(self):
        self.rec_init(self.params["checkpoint"], [self.params["vm"]])

    def _peer(self, action, body):
        return self.vpgs.peer_call(self.vpg(), "POST",
                                   f"/v1/internal/vpgs/{self.vpg_id}/source/{action}", json=body,
                                   timeout=120)

    def step_shutdown_source(self):
        policy = int(self.params.get("shutdownPolicy") or 0)
        if policy == 0 or "poweredOff" in self.data:
            return
        ans = self._peer("shutdown", {"force": policy == 2, "vms": [self.params["vm"]]})
        self.data["poweredOff"] = ans.get("poweredOff") or []
        self.save()

    def step_open_images(self):
        self.open_images()

    def step_create_vm(self):
        image = self.open_images()
        hv = self.zvm.hypervisor
        [m] = self.vms()
        if m["vmIdentifier"] in self.rec["created"]:
            return
        name = self.params["name"]
        found = next((v for v in hv.vms() if v.name == name), None)
        vm_id = found.id if found else hv.create_vm(
            vm_spec(self.vpg(), m, image, name=name, test=False,
                    datastore=self.params.get("datastore"))).id
        self.rec["created"][m["vmIdentifier"]] = {"id": vm_id, "name": name, "powered": False}
        self.save()

    def step_power_on(self):
        self.power_on()

    def step_wait_commit(self):
        if self.data.get("decision") is None:
            policy = int(self.params.get("commitPolicy", 2))
            default = {0: "rollback", 1: "commit"}.get(policy)
            name, sig = self.wait_for(("commit", "rollback"),
                                      float(self.params.get("timeoutS") or 0) if default else None,
                                      default)
            self.data["decision"] = name
            self.data["decidedBy"] = sig.get("by") or "the commit policy"
            self.save()
        if self.data["decision"] == "rollback":
            self.task.update(stoppedByUser=True,
                             completeReason=f"rolled back: {self.data['decidedBy']}")
            self.save()
            return ROLLBACK
        return None

    def step_export(self):
        self.data["exporting"] = True
        self.save()
        hv = self.zvm.hypervisor
        [(src, c)] = list(self.rec["created"].items())
        [m] = self.vms()
        vm = hv.vm(c["id"])
        if vm.power_state == "poweredOn":
            hv.power_off(vm.id, graceful=True)     # a consistent copy
            self.data["restartAfter"] = True
            self.save()
        ds = placement(self.vpg(), m, self.params.get("datastore"))["datastore"]
        root = hv.datastore_path(ds) if ds else None
        if root is None:
            raise Conflict("the recovery datastore has no folder this ZVM knows: cannot place "
                           "the restored disks")
        paths = self.data.setdefault("paths", {})
        for d in vm.disks:
            key = str(d.index)
            if key in paths and os.path.exists(paths[key]):
                continue
            path = os.path.join(root, "tidemark-restored", self.task["identifier"],
                                f"{c['name']}-disk{d.index}.img")
            self.vra_call("POST", f"/v1/recovery/images/{self.rec['image']['id']}/disks/"
                                  f"{m['instanceUuid']}/{d.index}/export", json={"path": path},
                          timeout=3600)
            paths[key] = path
            self.save()
        self.note(f"{len(paths)} disks of {c['name']} copied into plain files")

    def step_rebase(self):
        hv = self.zvm.hypervisor
        [c] = list(self.rec["created"].values())
        vm = hv.vm(c["id"])
        for d in vm.disks:
            path = self.data["paths"][str(d.index)]
            if d.path != path:
                hv.rebase_disk(vm.id, d.index, path)
        if self.data.get("restartAfter") and hv.vm(vm.id).power_state != "poweredOn":
            hv.power_on(vm.id)

    def step_discard(self):
        self.discard_images()
        self.zvm.events.record("Restore", f"VM {self.params['name']} restored at checkpoint "
                               f"{self.rec['checkpoint']['id']}", entity="VPG",
                               vpg=self.vpgs.link(self.vpg()), user=self.task.get("initiatedBy", ""))

    # rollback (nothing once the export began: the restored VM is committed then)
    def undo_delete_vms(self):
        if not self.data.get("exporting"):
            self.power_off()
            self.delete_vms()

    def undo_discard_images(self):
        if not self.data.get("exporting"):
            self.discard_images()

    def undo_restart_source(self):
        if self.data.get("exporting") or not self.data.get("poweredOff"):
            return
        self._peer("poweron", {"vms": self.data["poweredOff"]})
        self.data["poweredOff"] = []
        self.save()

    def on_done(self, ok: bool) -> None:
        status = "Passed" if ok else "Stopped" if self.task.get("stoppedByUser") else "Failed"
        try:
            self.write_report("Restore", status=status, notes=self.task.get("completeReason", ""))
        except ZVMError:
            pass


def register(api, zvm, svc) -> None:
    """Restore, RestoreCommit, RestoreRollback (``/v1/vms/{vmIdentifier}/...``)."""

    @forward.handler("Restore")
    def start(zvm_, vpg, p, user):
        vm_id = p["vmIdentifier"]
        m = next((x for x in vpg["vms"] if x["vmIdentifier"] == vm_id), None)
        if m is None:
            raise BadRequest(f"VPG {vpg['name']} does not protect VM {vm_id}")
        commit = p.get("commitPolicy")
        shutdown = p.get("shutdownPolicy")
        wait = p.get("timeToWaitBeforeContinueInSeconds")
        if wait is not None and not 0 <= wait <= 7 * 86400:
            raise BadRequest("timeToWaitBeforeContinueInSeconds must be 0 to 604800")
        name = (p.get("restoredVmName") or f"{m['name']} - restored").strip()
        if not name or len(name) > 80:
            raise BadRequest("restoredVmName must be 1 to 80 characters")
        if any(v.name == name for v in zvm_.hypervisor.vms()):
            raise Conflict(f"a VM named {name!r} exists at the recovery site: pick another name")
        ds = ((p.get("journalVMRestoreSettings") or {}).get("datastoreIdentifier")) or None
        if ds and ds not in {d.id for d in zvm_.hypervisor.datastores()}:
            raise BadRequest(f"journalVMRestoreSettings.datastoreIdentifier: no datastore {ds!r}")
        if not vpg["state"].get("initialSyncDone") and vpg["state"].get("status") != 1:
            raise Conflict(f"VPG {vpg['name']} has no recoverable data yet")
        busy(zvm_, vpg)
        cp = resolve_checkpoint(zvm_, vpg, p.get("checkpointIdentifier"))
        return zvm_.tasks.submit("Restore", {
            "checkpoint": cp, "vm": vm_id, "name": name, "datastore": ds,
            "commitPolicy": 2 if commit is None else commit,
            "shutdownPolicy": shutdown or 0, "timeoutS": 3600 if wait is None else wait},
            vpg=svc.link(vpg), user=user)["identifier"]

    def signal(name):
        def fn(zvm_, vpg, p, user):
            task = active_task(zvm_, vpg["identifier"], "Restore")
            if task is None or task.get("params", {}).get("vm") != p["vmIdentifier"]:
                raise Conflict(f"no restore of VM {p['vmIdentifier']} runs in VPG {vpg['name']}")
            if (task.get("data") or {}).get("decision") or task.get("signal"):
                raise Conflict("the restore was decided already")
            if task["state"] != WAITING and name == "commit":
                raise Conflict("the restored VM is not up yet: commit when the task waits for it")
            zvm_.tasks.signal(task["identifier"], name, {"by": f"user {user}"})
            return task["identifier"]
        return fn

    forward.handler("RestoreCommit")(signal("commit"))
    forward.handler("RestoreRollback")(signal("rollback"))

    @api.route("POST", "/v1/vms/{vmIdentifier}/Restore", "Restore one VM of a VPG to a "
               "checkpoint at the recovery site (a task)", body="JournalVMRestoreDataApi",
               response="string")
    def restore(req, vmIdentifier):
        b = req.body
        return forward.dispatch(zvm, "Restore", b["vpgIdentifier"], {**b, "vmIdentifier": vmIdentifier},
                                req.user)

    api.schema("VpgIdentifierString", {"type": "string"})
    for path, name in (("RestoreCommit", "RestoreCommit"), ("RestoreRollback", "RestoreRollback")):
        _decision_route(api, zvm, path, name)


def _decision_route(api, zvm, path, name):
    @api.route("POST", f"/v1/vms/{{vmIdentifier}}/{path}", f"{name} (the restore's task id); "
               "the body is the VPG identifier (a JSON string)", body="VpgIdentifierString",
               response="string")
    def view(req, vmIdentifier):
        vpg_id = req.body
        if not isinstance(vpg_id, str) or not vpg_id:
            raise BadRequest("the body must be the VPG identifier as a JSON string")
        return forward.dispatch(zvm, name, vpg_id, {"vmIdentifier": vmIdentifier}, req.user)
