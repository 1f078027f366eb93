"""Failover test: the VPG's VMs at a checkpoint, started on the recovery site's failover-test
network on recovery images while replication goes on; FailoverTestStop tears them down.

Both run on the recovery site's ZVM (``forward.py``). The running test is recorded in the
recovery site's VPG document (``_failoverTest``: the FailoverTest task, the image set, the VMs)
and shown on both sites as ``activeProcessesApi.runningFailOverTestApi {stage}``.
"""
from __future__ import annotations

import time

from ..errors import BadRequest, Conflict
from ..events import _iso
from ..recovery import (RecoveryOp, active_task, busy, check_networks, resolve_checkpoint,
                        select_vms)
from ..tasks import operation
from .. import forward

SUFFIX = " - testing recovery"
PROCESS = "runningFailOverTestApi"


@operation
class FailoverTest(RecoveryOp):
    """Start a failover test.

        POST FailoverTest ── checkpoint not recoverable, VM not in the VPG, no test network: 4xx,
          │                  a test or another operation running: 409 (nothing changed)
          ▼
        mark ──► open_images ──► create_vms ──► power_on ──► testing ──► Completed (6)
        (stage    (image set at    (VMs "<vm> - testing   (boot groups,   (stage Testing;
         Starting) the checkpoint)  recovery", ids saved)  delays)         report: RTO, steps)
          │ a step fails (a restart re-runs the step in progress first)
          ▼
        power_off ──► delete_vms ──► discard_images ──► unmark ──► Failed (4), report Failed
    """
    type = "FailoverTest"
    steps = ("mark", "open_images", "create_vms", "power_on", "testing")
    rollback_steps = ("power_off", "delete_vms", "discard_images", "unmark")

    def _record(self, **kw) -> None:
        with self.vpgs.update(self.vpg_id) as doc:
            rec = doc.get("_failoverTest") or {"task": self.task["identifier"], "started": self.task["started"]}
            rec.update(kw)
            doc["_failoverTest"] = rec

    def step_mark(self):
        self.rec_init(self.params["checkpoint"], self.params["vms"])
        self._record(checkpoint=self.rec["checkpoint"])
        self.set_process({PROCESS: {"stage": "Starting"}})

    def step_open_images(self):
        img = self.open_images()
        self._record(image={"id": img["id"]})

    def step_create_vms(self):
        self.create_vms(test=True, suffix=SUFFIX)
        self._record(created=self.rec["created"])

    def step_power_on(self):
        self.power_on()

    def step_testing(self):
        self._record(rec=self.rec, poweredOnAt=self.data.get("poweredOnAt"))
        self.set_process({PROCESS: {"stage": "Testing"}})
        self.note(f"{len(self.rec['created'])} VMs running at checkpoint {self.rec['checkpoint']['id']}"
                  f" in {self.data['poweredOnAt'] - self.task['started']:.1f} s")

    def undo_power_off(self):
        self.power_off()

    def undo_delete_vms(self):
        self.delete_vms()

    def undo_discard_images(self):
        self.discard_images()

    def undo_unmark(self):
        with self.vpgs.update(self.vpg_id) as doc:
            if (doc.get("_failoverTest") or {}).get("task") == self.task["identifier"]:
                doc.pop("_failoverTest", None)
        self.set_process(None)

    def on_done(self, ok: bool) -> None:
        self.write_report("FailoverTest", status="Testing" if ok else "Failed",
                          notes="" if ok else self.task.get("completeReason", ""))
        self.zvm.events.record("FailoverTest", f"failover test of VPG {self.vpg()['name']} "
                               + ("started" if ok else f"failed: {self.task.get('completeReason')}"),
                               entity="VPG", success=ok, vpg=self.task.get("vpgLink"),
                               user=self.task.get("initiatedBy", ""))


@operation
class FailoverTestStop(RecoveryOp):
    """Stop a failover test: tear the test VMs down and record the result.

        POST FailoverTestStop ── no test running, or it is still starting: 409
          ▼
        take ──► stage ──► power_off ──► delete_vms ──► discard_images ──► unmark ──► Completed (6)
        (the test's  (stage                                             (no active process;
         record)      Stopping)                                          lastTest) then the report:
                                                                         result, summary, all steps
          │ a step fails: Failed (4), the report says so; the test stays recorded and
          │ FailoverTestStop can be asked again
          │ (every step is idempotent; a restarted ZVM re-runs the step in progress)
    """
    type = "FailoverTestStop"
    steps = ("take", "stage", "power_off", "delete_vms", "discard_images", "unmark")

    def step_take(self):
        if self.data.get("test"):
            return
        test = self.vpg().get("_failoverTest")
        if not test:
            raise Conflict("no failover test is recorded for this VPG any more")
        self.data["test"] = {k: v for k, v in test.items() if k != "rec"}
        self.data["rec"] = test.get("rec") or {"checkpoint": test.get("checkpoint"), "vms": [],
                                                "image": test.get("image"), "imagePending": False,
                                                "created": test.get("created") or {},
                                                "bootedGroups": 0}
        self.save()

    def step_stage(self):
        self.set_process({PROCESS: {"stage": "Stopping"}})

    def step_power_off(self):
        self.power_off()

    def step_delete_vms(self):
        self.delete_vms()

    def step_discard_images(self):
        self.discard_images()

    def step_unmark(self):
        ok = bool(self.params.get("failoverTestSuccess", True))
        self.data.setdefault("stoppedAt", time.time())
        self.save()
        with self.vpgs.update(self.vpg_id) as doc:
            doc.pop("_failoverTest", None)
        self.set_process(None, lastTest=_iso(self.data["stoppedAt"]),
                         lastTestResult="Passed" if ok else "Failed",
                         lastTestSummary=self.params.get("failoverTestSummary") or "")
        self.zvm.events.record("FailoverTestStop", f"failover test of VPG {self.vpg()['name']} "
                               f"stopped: {'passed' if ok else 'failed'}", entity="VPG",
                               vpg=self.task.get("vpgLink"), user=self.task.get("initiatedBy", ""))

    def on_done(self, ok: bool) -> None:
        test = self.data.get("test")
        if not test:
            return
        passed = bool(self.params.get("failoverTestSuccess", True))
        self.write_report("FailoverTest", report_id=test["task"],
                          status=("Passed" if passed else "Failed") if ok else "StopFailed",
                          notes=(self.params.get("failoverTestSummary") or "") if ok else
                          f"stopping the test failed: {self.task.get('completeReason')}",
                          rto_s=test["poweredOnAt"] - test["started"] if test.get("poweredOnAt") else None)

@forward.handler("FailoverTest")
def start_test(zvm, vpg: dict, params: dict, user: str) -> str:
    busy(zvm, vpg)
    vms = select_vms(vpg, params.get("vmIdentifiers"))
    check_networks(zvm, vpg, vms, test=True)
    cp = resolve_checkpoint(zvm, vpg, params.get("checkpointIdentifier"))
    return zvm.tasks.submit("FailoverTest", {"checkpoint": cp, "vms": vms},
                            vpg=zvm.services["vpgs"].link(vpg), user=user)["identifier"]


@forward.handler("FailoverTestStop")
def stop_test(zvm, vpg: dict, params: dict, user: str) -> str:
    success = params.get("failoverTestSuccess", True)
    summary = params.get("failoverTestSummary") or ""
    if not isinstance(success, bool) or not isinstance(summary, str) or len(summary) > 4000:
        raise BadRequest("failoverTestSuccess is a boolean and failoverTestSummary a string "
                         "of at most 4000 characters")
    doc = zvm.services["vpgs"].get(vpg["identifier"])
    if not doc.get("_failoverTest"):
        raise Conflict(f"VPG {doc['name']} has no failover test running")
    starting = active_task(zvm, vpg["identifier"], "FailoverTest")
    if starting:
        raise Conflict(f"the failover test of VPG {doc['name']} is still starting (task "
                       f"{starting['identifier']}): wait for it, then stop it")
    if active_task(zvm, vpg["identifier"], "FailoverTestStop"):
        raise Conflict(f"the failover test of VPG {doc['name']} is being stopped already")
    return zvm.tasks.submit("FailoverTestStop", {"failoverTestSuccess": success,
                                                 "failoverTestSummary": summary},
                            vpg=zvm.services["vpgs"].link(vpg), user=user)["identifier"]
