"""VRA operations as persisted state machines (tasks.py): install, uninstall, upgrade, edit.

    InstallVra:   deploy ──> wait_ready ──> Completed (status Installed)
                     └── a step fails ──> remove ──> Failed (the VRA record is dropped)
    UninstallVra: remove ──> forget ──> Completed
                     └── fails ──> restore_status ──> Failed (status back to Installed)
    UpgradeVra:   remove ──> deploy ──> wait_ready ──> Completed (journal and state kept:
                     └── fails ──> mark_failed ──> Failed     they live on the datastore)
    EditVra:      apply ──> Completed (memory, CPUs, group, IP settings; applied to the
                                       appliance at its next upgrade)
"""
from __future__ import annotations

from .tasks import Operation, operation
from .vras import INSTALL_ERROR, INSTALLED


class _VraOp(Operation):
    exclusive = False

    @property
    def svc(self):
        return self.zvm.services["vras"]

    @property
    def vid(self) -> str:
        return self.params["vraIdentifier"]

    def doc(self) -> dict | None:
        return self.zvm.store.get("vras", self.vid)

    def set(self, **fields) -> None:
        with self.zvm.store.update("vras", self.vid) as d:
            d.update(fields)

    def step_deploy(self):
        doc = self.doc()
        if doc.get("vmId") and self.data.get("deployed"):
            return
        vm_id = self.svc.deploy(doc)
        from .service import VERSION
        with self.zvm.store.update("vras", self.vid) as d:
            d.update(vmId=vm_id, progress=50, vraVersion=VERSION)
            d["_trust"] = doc.get("_trust", d.get("_trust"))
        self.svc.drop_local_tls(doc)     # files older ZVMs kept for the VRA: not used any more
        self.data["deployed"] = True
        self.note(f"appliance VM {doc['vraName']} ({vm_id}) deployed on host {doc['hostName']}")

    def step_wait_ready(self):
        doc = self.doc()
        st = self.svc.wait_ready(doc, self.tasks.stopping)
        from .vras import counters
        self.set(status=INSTALLED, progress=100, reachable=True, counters=counters(st))
        self.note(f"VRA {doc['vraName']} answers at {doc['controlUrl']}")

    def on_done(self, ok: bool) -> None:
        doc = self.doc() or {}
        etype = {"InstallVra": "InstallVra", "UninstallVra": "UninstallVra"}.get(self.type,
                                                                                "UpgradeVra")
        self.zvm.events.record(etype, f"{self.type} of VRA {doc.get('vraName', self.vid)} "
                               f"{'completed' if ok else 'failed: ' + self.task['completeReason']}",
                               entity="VRA", user=self.task["initiatedBy"], success=ok)


@operation
class InstallVra(_VraOp):
    type = "InstallVra"
    steps = ("deploy", "wait_ready")
    rollback_steps = ("remove",)

    def undo_remove(self):
        doc = self.doc()
        if doc is None:
            return
        self.svc.remove_vm(doc)
        self.zvm.store.delete("vras", self.vid)


@operation
class UninstallVra(_VraOp):
    type = "UninstallVra"
    steps = ("remove", "forget")
    rollback_steps = ("restore_status",)

    def step_remove(self):
        doc = self.doc()
        if doc is not None:
            self.svc.remove_vm(doc)

    def step_forget(self):
        doc = self.doc()
        if doc is not None:
            self.svc.drop_local_tls(doc)
        self.zvm.store.delete("vras", self.vid)
        self.zvm.alerts.clear(f"vra:{self.vid}")

    def undo_restore_status(self):
        if self.doc() is not None:
            self.set(status=INSTALLED)


@operation
class UpgradeVra(_VraOp):
    type = "UpgradeVra"
    steps = ("remove", "deploy", "wait_ready")
    rollback_steps = ("mark_failed",)

    def step_remove(self):
        if self.data.get("removed"):
            return
        self.svc.remove_vm(self.doc())
        self.set(vmId=None, reachable=False, progress=25)
        self.data["removed"] = True
        self.save()

    def undo_mark_failed(self):
        self.set(status=INSTALL_ERROR)


@operation
class EditVra(_VraOp):
    type = "EditVra"
    steps = ("apply",)

    def step_apply(self):
        ch = self.params["changes"]
        with self.zvm.store.update("vras", self.vid) as d:
            for k in ("memoryInGb", "numOfCpus", "groupName"):
                if ch.get(k) is not None:
                    d[k] = ch[k]
            if ch.get("vraNetworkDataApi"):
                d["vraNetworkDataApi"].update({k: v for k, v in ch["vraNetworkDataApi"].items()
                                               if v is not None})
