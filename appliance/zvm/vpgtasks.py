"""The VPG life-cycle operations as persisted state machines (tasks.py): CreateVpg, UpdateVpg,
DeleteVpg, PauseVpg, ResumeVpg, ForceSync, InsertTaggedCheckpoint. They run on the protected
site's ZVM; every step is idempotent (the PUTs on the peer and on the VRAs are).

    CreateVpg:  prepare_recovery ─► protect ─► initial_sync ─► first_checkpoint ─► MeetingSLA
                   └─ a step fails ─► unprotect ─► drop_recovery ─► forget   (Failed; no VPG left)
    UpdateVpg:  apply ─► prepare_recovery ─► protect ─► sync_new
                   └─ a step fails ─► restore (the previous settings, protected again)
    DeleteVpg:  mark (Deleting) ─► unprotect ─► drop_recovery (keepRecoveryVolumes) ─► forget
"""
from __future__ import annotations

import time

from .errors import Conflict, ZVMError
from .tasks import Operation, operation
from .vpgs import (DELETING, INITIALIZING, MEETING_SLA, SUB_INITIAL_SYNC, SUB_NONE)

CHECKPOINT_WAIT_S = 60.0


class VpgOp(Operation):
    """An Operation on one VPG (the task's ``vpg``), with the VPG service at hand."""

    @property
    def vpgs(self):
        return self.zvm.services["vpgs"]

    @property
    def vpg_id(self) -> str:
        return self.task["vpg"]

    def vpg(self) -> dict:
        return self.vpgs.get(self.vpg_id)

    def event(self, etype: str, text: str, ok: bool = True) -> None:
        vpg = self.vpgs.store.get("vpgs", self.vpg_id)
        self.zvm.events.record(etype, text, entity="VPG", success=ok,
                               vpg=self.vpgs.link(vpg) if vpg else self.task.get("vpgLink"),
                               user=self.task.get("initiatedBy", ""))

    # shared steps
    def step_prepare_recovery(self):
        vpg = self.vpg()
        ans = self.vpgs.peer_call(vpg, "PUT", f"/v1/internal/vpgs/{vpg['identifier']}", json={
            "settings": vpg["settings"], "vms": vpg["vms"],
            "protectedSiteIdentifier": vpg["protectedSiteIdentifier"]})
        with self.vpgs.update(vpg["identifier"]) as doc:
            doc["recoveryVra"] = ans["recoveryVra"]
            doc["_recovery"] = {"url": ans["url"], "token": ans.get("token")}
        self.note(f"recovery VRA {ans['recoveryVra']['name']} at {ans['address'][0]}:{ans['address'][1]}")

    def step_protect(self):
        vpg = self.vpgs.protect(self.vpg())
        self.note(f"protected on {', '.join(e['name'] for e in vpg['protectedVras'])}; "
                  f"leader {vpg['leader']}")

    def wait_valid_checkpoint(self, tag: str | None = None) -> dict:
        """A valid checkpoint taken now, once the recovery VRA lists it as recoverable."""
        deadline = time.monotonic() + CHECKPOINT_WAIT_S
        cp, _entry = self.vpgs.recoverable_checkpoint(self.vpg(), tag, deadline)
        return cp


@operation
class CreateVpg(VpgOp):
    type = "CreateVpg"
    steps = ("prepare_recovery", "protect", "initial_sync", "first_checkpoint")
    rollback_steps = ("unprotect", "drop_recovery", "forget")

    def step_protect(self):
        super().step_protect()
        self.vpgs.set_state(self.vpg_id, status=INITIALIZING, substatus=SUB_INITIAL_SYNC)

    def step_initial_sync(self):
        vpg = self.vpg()
        self.vpgs.set_state(self.vpg_id, syncing=True)
        try:
            out = self.vpgs.sync(vpg)
        finally:
            self.vpgs.set_state(self.vpg_id, syncing=False)
        self.note(f"initial sync: {out['blocks_differing']} blocks differed, "
                  f"{out['bytes_sent']} bytes sent")

    def step_first_checkpoint(self):
        cp = self.wait_valid_checkpoint()
        self.vpgs.set_state(self.vpg_id, status=MEETING_SLA, substatus=SUB_NONE,
                            initialSyncDone=time.time())
        self.event("InitialSyncDone", f"initial sync of VPG {self.vpg()['name']} done; "
                                      f"first checkpoint {cp['id']}")

    def undo_unprotect(self):
        vpg = self.vpgs.store.get("vpgs", self.vpg_id)
        if vpg:
            self.vpgs.unprotect(vpg, ignore_errors=True)

    def undo_drop_recovery(self):
        vpg = self.vpgs.store.get("vpgs", self.vpg_id)
        if vpg and vpg.get("recoveryVra"):
            try:
                self.vpgs.peer(vpg).request(
                    "DELETE", f"/v1/internal/vpgs/{self.vpg_id}?keepRecoveryVolumes=false")
            except ZVMError as exc:
                self.note(f"the recovery site could not drop the VPG: {exc}")

    def undo_forget(self):
        self.vpgs.delete_doc(self.vpg_id)

    def on_done(self, ok: bool) -> None:
        if not ok:
            self.event("CreateVpg", f"VPG creation failed: {self.task.get('completeReason')}", ok=False)


@operation
class UpdateVpg(VpgOp):
    type = "UpdateVpg"
    steps = ("apply", "prepare_recovery", "protect", "sync_new")
    rollback_steps = ("restore",)

    def step_apply(self):
        vpg = self.vpg()
        if "old" not in self.data:
            self.data["old"] = {"settings": vpg["settings"], "vms": vpg["vms"]}
            self.save()
        settings = self.params["settings"]
        vms = self.vpgs.vm_records(settings)
        with self.vpgs.update(self.vpg_id) as doc:
            doc.update(settings=settings, vms=vms, name=settings["basic"]["name"])

    def step_sync_new(self):
        vpg = self.vpg()
        old = {m["instanceUuid"] for m in self.data["old"]["vms"]}
        hosts = {m["hostIdentifier"] for m in vpg["vms"] if m["instanceUuid"] not in old}
        ids = {e["identifier"] for e in vpg["protectedVras"] if e["hostIdentifier"] in hosts}
        if ids:
            self.vpgs.set_state(self.vpg_id, syncing=True)
            try:
                out = self.vpgs.sync(vpg, ids)
            finally:
                self.vpgs.set_state(self.vpg_id, syncing=False)
            self.note(f"initial sync of the added VMs: {out['bytes_sent']} bytes sent")
        self.event("UpdateVpg", f"VPG {vpg['name']} updated")

    def undo_restore(self):
        old = self.data.get("old")
        if not old:
            return
        with self.vpgs.update(self.vpg_id) as doc:
            doc.update(settings=old["settings"], vms=old["vms"], name=old["settings"]["basic"]["name"])
        try:
            self.vpgs.protect(self.vpg())
        except ZVMError as exc:
            self.note(f"protecting with the previous settings failed: {exc}")


@operation
class DeleteVpg(VpgOp):
    type = "DeleteVpg"
    steps = ("mark", "unprotect", "drop_recovery", "forget")

    def step_mark(self):
        self.vpgs.set_state(self.vpg_id, status=DELETING, substatus=21)

    def step_unprotect(self):
        self.vpgs.unprotect(self.vpg(), ignore_errors=bool(self.params.get("force")))

    def step_drop_recovery(self):
        vpg = self.vpg()
        keep = "true" if self.params.get("keepRecoveryVolumes") else "false"
        try:
            self.vpgs.peer(vpg).request(
                "DELETE", f"/v1/internal/vpgs/{vpg['identifier']}?keepRecoveryVolumes={keep}")
        except ZVMError as exc:
            if not self.params.get("force"):
                raise
            self.note(f"force: the recovery site could not drop the VPG ({exc}); clean it up there")

    def step_forget(self):
        vpg = self.vpg()
        self.vpgs.delete_doc(vpg["identifier"])
        self.zvm.alerts.clear_prefix(f"vpg:{vpg['identifier']}:")
        self.zvm.events.record("DeleteVpg", f"VPG {vpg['name']} deleted"
                               + (" (recovery volumes kept)" if self.params.get("keepRecoveryVolumes") else ""),
                               entity="VPG", vpg=self.vpgs.link(vpg), user=self.task.get("initiatedBy", ""))


@operation
class PauseVpg(VpgOp):
    type = "PauseVpg"
    steps = ("pause",)

    def step_pause(self):
        self.vpgs.unprotect(self.vpg())
        self.vpgs.set_state(self.vpg_id, paused=True)
        self.event("PauseVpg", f"replication of VPG {self.vpg()['name']} paused")


@operation
class ResumeVpg(VpgOp):
    type = "ResumeVpg"
    steps = ("resume",)

    def step_resume(self):
        self.vpgs.set_state(self.vpg_id, paused=False)
        vpg = self.vpgs.reprotect(self.vpg_id, sync=True)
        self.event("ResumeVpg", f"replication of VPG {vpg['name']} resumed (delta sync done)")


@operation
class ForceSync(VpgOp):
    type = "ForceSync"
    steps = ("sync",)

    def step_sync(self):
        vpg = self.vpg()
        if vpg["state"].get("paused"):
            raise Conflict(f"VPG {vpg['name']} is paused: resume it first")
        self.vpgs.set_state(self.vpg_id, syncing=True)
        try:
            out = self.vpgs.sync(vpg)
        finally:
            self.vpgs.set_state(self.vpg_id, syncing=False)
        self.note(f"{out['blocks_differing']} blocks differed, {out['bytes_sent']} bytes sent")
        self.event("ForceSync", f"VPG {vpg['name']} synchronized: {out['blocks_differing']} blocks differed")


@operation
class InsertTaggedCheckpoint(VpgOp):
    type = "InsertTaggedCheckpoint"
    steps = ("take",)
    exclusive = False

    def step_take(self):
        cp = self.wait_valid_checkpoint(self.params["tag"])
        self.data["checkpoint"] = cp["id"]
        self.note(f"checkpoint {cp['id']} tagged {self.params['tag']!r}")
        self.event("InsertTaggedCheckpoint",
                   f"checkpoint {cp['id']} of VPG {self.vpg()['name']} tagged {self.params['tag']!r}")
