"""Live Failover (and the steps Move shares): recovered VMs from the recovery VRA's images at a
checkpoint, then the commit policy. Runs as a task of the RECOVERY site's ZVM (forward.py gets
the request there); the protected site is called through ``/v1/internal/vpgs/{id}/source/...``
(``source.SourceSide``, routes in routes/failover.py).

``Failover`` (class docstring) and ``Move`` (move.py) are persisted state machines; each step is
idempotent (it checks what is done already, ids are saved as soon as something exists), so a
restart of either ZVM in the middle re-runs the step in progress and goes on, or rolls back.
"""
from __future__ import annotations

import logging
import time

from ..errors import Conflict, NotFound, Unavailable, ZVMError
from ..recovery import RecoveryOp
from ..tasks import ROLLBACK, operation
from ..vpgs import (FAILING_OVER, MEETING_SLA, MOVING, RECOVERED, SUB_FO_BEFORE_COMMIT,
                    SUB_FO_COMMITTING, SUB_FO_ROLLING_BACK, SUB_NONE)
from .reverse import ReverseSteps
from .source import RESUME_CALL_S, SOURCE_CALL_S

log = logging.getLogger("tidemark.zvm.failover")

COMMIT_WAIT_S = 600           # the VRA's image commit (promotion up to the checkpoint)


class LiveRecovery(ReverseSteps, RecoveryOp):
    """What Failover and Move share: the protected site's part, images, VMs, the commit policy,
    commit (images promoted, disks rebased), rollback. Subclasses name the steps."""
    status = FAILING_OVER
    sub_before, sub_committing, sub_rolling_back = (SUB_FO_BEFORE_COMMIT, SUB_FO_COMMITTING,
                                                    SUB_FO_ROLLING_BACK)
    process = "runningFailoverApi"
    recovery_type = "Failover"

    # -- both sites' documents
    def mark_state(self, status: int, substatus: int, stage: str | None) -> None:
        """The VPG's status on this site's document and (best effort) on the protected site's."""
        process = {self.process: {"stage": stage, "task": self.task["identifier"]}} if stage else None
        self.vpgs.set_state(self.vpg_id, status=status, substatus=substatus, activeProcess=process)
        try:
            self.source("state", {"status": status, "substatus": substatus, "activeProcess": process})
        except ZVMError as exc:
            self.note(f"the protected site did not take the status: {exc}")

    def source(self, action: str, body: dict | None = None, timeout: float = SOURCE_CALL_S):
        """Call the protected site's part of the operation."""
        vpg = self.vpg()
        if vpg["role"] != "recovery":
            raise Conflict(f"VPG {vpg['name']} is not recovered at this site any more")
        return self.vpgs.peer_call(vpg, "POST", f"/v1/internal/vpgs/{self.vpg_id}/source/{action}",
                                   json=body or {}, timeout=timeout)

    # -- forward steps
    def step_begin(self):
        p = self.params
        if p.get("checkpoint"):
            self.rec_init(p["checkpoint"], p["vms"])
        self.data.setdefault("reverse", bool(p.get("reverseProtection")))
        self.data.setdefault("keepSourceVms", bool(p.get("keepSourceVms")))
        self.mark_state(self.status, self.sub_before, "Starting")

    def shutdown_policy(self) -> int:
        return int(self.params.get("shutdownPolicy") or 0)

    def step_shutdown_sources(self):
        policy = self.shutdown_policy()
        if policy == 0:
            self.note("shutdown policy None: the source VMs keep running")
            return
        if "poweredOff" in self.data:
            return
        try:
            ans = self.source("shutdown", {"force": policy == 2, "vms": self.rec["vms"] or None})
        except Unavailable as exc:
            if self.type == "Move":
                raise
            self.data["sourceUnreachable"] = True
            self.save()
            self.note(f"the protected site does not answer ({exc}): source VMs not shut down")
            return
        self.data["poweredOff"] = ans.get("poweredOff") or []
        self.save()
        self.note(f"source VMs shut down: {', '.join(ans.get('names') or []) or 'none was running'}")

    def step_stop_replication(self):
        if self.data.get("replicationStopped"):
            return
        try:
            self.source("stop")
        except Unavailable as exc:
            if self.type == "Move":
                raise
            self.data["sourceUnreachable"] = True
            self.note(f"the protected site does not answer ({exc}): its VRAs cannot stream now")
        self.data["replicationStopped"] = True
        self.save()

    def source_reachable(self) -> bool:
        """Whether the peer monitor sees the protected site (no call made when it does not)."""
        sites = self.zvm.services.get("sites")
        try:
            return sites is None or bool(sites.peer(self.vpg()["protectedSiteIdentifier"]).get(
                "reachable", True))
        except NotFound:
            return False

    def catch_up_source(self) -> bool:
        """The protected site answers again (it was down when the failover began): do there
        what the failover could not. The VPG's status, then replication off (the source VMs'
        writes since the checkpoint do not count), then the shutdown policy's power-off of
        the source VMs (restarted with their hosts, next to the recovered ones); those it
        powers off are powered on again by a rollback. True when done or nothing is to do,
        False while the site does not answer. Runs in the task's thread: while waiting for
        the commit (``wait_for`` poll), and before finishing a commit."""
        if not self.data.get("sourceUnreachable") or self.data.get("sourceCaughtUp"):
            return True
        if not self.source_reachable():
            return False
        st = self.vpg()["state"]
        try:
            self.source("state", {"status": st["status"], "substatus": st["substatus"],
                                  "activeProcess": st.get("activeProcess")})
            self.source("stop")
            done = ["the VPG's status", "replication off"]
            policy = self.shutdown_policy()
            if policy and "poweredOff" not in self.data:
                ans = self.source("shutdown", {"force": policy == 2, "vms": self.rec["vms"] or None})
                self.data["poweredOff"] = ans.get("poweredOff") or []
                done.append("source VMs shut down: " + (", ".join(ans.get("names") or [])
                                                        or "none was running"))
        except Unavailable:
            return False
        except (Conflict, NotFound) as exc:   # not protected from there any more (changed there)
            done = [f"it took nothing: {exc}"]
        self.data["sourceCaughtUp"] = True
        self.save()
        self.note("the protected site answers again: " + "; ".join(done))
        return True

    def step_open_images(self):
        self.open_images()

    def step_create_vms(self):
        self.create_vms(test=False)

    def step_power_on(self):
        self.power_on()
        self.mark_state(self.status, self.sub_before, "BeforeCommit")
        names = ", ".join(c["name"] for c in self.rec["created"].values())
        self.note(f"recovered VMs running at checkpoint {self.rec['checkpoint']['id']}: {names}")

    def commit_policy(self) -> tuple[int, float | None]:
        return int(self.params.get("commitPolicy", 2)), self.params.get("commitTimeoutS")

    def step_wait_commit(self):
        decision = self.data.get("decision")
        if decision is None:
            policy, timeout = self.commit_policy()
            default = {0: "rollback", 1: "commit"}.get(policy)
            name, sig = self.wait_for(("commit", "rollback"), float(timeout or 0) if default else None,
                                      default, poll=self.catch_up_source)
            self.data["decision"] = decision = name
            for k in ("reverseProtection", "keepSourceVms"):
                if sig.get(k) is not None:
                    self.data["reverse" if k == "reverseProtection" else k] = bool(sig[k])
            self.data["decidedBy"] = sig.get("by") or f"commit policy ({name} after the timeout)"
            self.save()
            self.note(f"{name} ({self.data['decidedBy']})")
        if decision == "rollback":
            self.task["stoppedByUser"] = True
            self.task["completeReason"] = f"rolled back: {self.data['decidedBy']}"
            self.save()
            return ROLLBACK
        return None

    def step_commit_images(self):
        self.data["committing"] = True
        self.save()
        self.mark_state(self.status, self.sub_committing, "Committing")
        if self.data.get("paths"):
            return
        img = self.rec["image"]
        ans = self.vra_call("POST", f"/v1/recovery/images/{img['id']}/commit", timeout=COMMIT_WAIT_S)
        deadline = time.monotonic() + COMMIT_WAIT_S
        while ans.get("state") == "committing" and time.monotonic() < deadline:
            time.sleep(0.5)
            ans = self.vra_call("GET", f"/v1/recovery/images/{img['id']}")
        if ans.get("state") != "committed":
            raise Conflict(f"image set {img['id']} did not commit: {ans.get('error') or ans.get('state')}")
        self.data["paths"] = {f"{d['vm']}:{d['disk']}": d["path"] for d in ans["disks"]}
        self.save()
        self.note(f"image set {img['id']} committed: the replica files are the VMs' disks")

    def step_rebase_disks(self):
        hv = self.zvm.hypervisor
        src = {m["vmIdentifier"]: m for m in self.vpg()["vms"]}
        n = 0
        for sid, c in self.rec["created"].items():
            vm = hv.vm(c["id"])
            for d in vm.disks:
                path = self.data["paths"][f"{src[sid]['instanceUuid']}:{d.index}"]
                if d.path != path:
                    hv.rebase_disk(vm.id, d.index, path)
                    n += 1
        self.discard_images()             # a committed set is only forgotten
        self.note(f"{n} disks rebased onto their replica files")

    def step_finish(self):
        if self.data.get("reverse"):
            return None                   # the reverse protection steps follow
        vpg = self.vpg()
        try:                              # the replicas are the VMs' disks now: never drop them
            self.vpgs.vra_call(self.vpgs.recovery_vra(vpg), "DELETE",
                               f"/v1/recovery/vpgs/{self.vpg_id}?keep_replicas=1")
        except NotFound:
            pass
        delete = self.type == "Move" and not self.data.get("keepSourceVms")
        try:
            self.catch_up_source()        # back since the wait for the commit ended
            self.source("recovered", {"deleteSourceVms": delete})
        except Unavailable as exc:
            # the protected site is down (a failover without it): tell it when it is back, or
            # its VRAs go on streaming a VPG nobody receives and its VMs run next to ours
            policy = self.shutdown_policy() if self.data.get("sourceUnreachable") else 0
            with self.vpgs.update(self.vpg_id) as d:
                d["_sourcePending"] = {"task": self.task["identifier"], "deleteSourceVms": delete,
                                       "shutdown": policy, "vms": self.rec["vms"],
                                       "since": time.time()}
            self.note(f"the protected site does not answer ({exc}): it is told when it answers "
                      "again (replication off there" +
                      (", the source VMs shut down" if policy else "") + ")")
        self.vpgs.set_state(self.vpg_id, status=RECOVERED, substatus=SUB_NONE, activeProcess=None)
        return "done"

    def step_done(self):
        pass

    # -- rollback
    def _committed(self) -> bool:
        if self.data.get("committing"):
            self.note("the images were committed: nothing to roll back; finish the commit "
                      "(the recovered VMs run on the replicas)")
            return True
        return False

    def undo_rolling_back(self):
        if not self._committed():
            self.mark_state(self.status, self.sub_rolling_back, "RollingBack")

    def undo_delete_vms(self):
        if not self.data.get("committing"):
            self.power_off()
            self.delete_vms()

    def undo_discard_images(self):
        if not self.data.get("committing"):
            self.discard_images()

    def undo_restart_sources(self):
        if self.data.get("committing") or not self.data.get("poweredOff"):
            return
        try:
            self.source("poweron", {"vms": self.data["poweredOff"]})
            self.note(f"source VMs powered on again: {len(self.data['poweredOff'])}")
        except Unavailable as exc:
            self._leave_to_source(exc, powerOn=self.data["poweredOff"])
        self.data["poweredOff"] = []
        self.save()

    def undo_resume_replication(self):
        if self.data.get("committing"):
            return
        try:
            ans = self.source("resume", {}, timeout=RESUME_CALL_S)
        except Unavailable as exc:
            self._leave_to_source(exc, resume=True)
            return
        self.note(f"replication resumed: delta sync {ans.get('blocks_differing')} blocks differed")

    def _leave_to_source(self, exc: Exception, **what) -> None:
        """A rollback step the protected site cannot take now (it is down): the rollback goes
        on here, and the site is told when it answers again (``tell_protected_site``)."""
        with self.vpgs.update(self.vpg_id) as d:
            pending = d.get("_sourcePending") or {"task": self.task["identifier"], "rollback": True,
                                                  "since": time.time()}
            pending.update(what)
            d["_sourcePending"] = pending
        self.note(f"the protected site does not answer ({exc}): it is told when it answers again ("
                  + ", ".join({"powerOn": "the source VMs powered on again",
                               "resume": "replication resumed with a delta sync"}[k] for k in what) + ")")

    def undo_unmark(self):
        if not self.data.get("committing"):
            self.vpgs.set_state(self.vpg_id, status=MEETING_SLA, substatus=SUB_NONE, activeProcess=None)

    def on_done(self, ok: bool) -> None:
        t = self.task
        if ok:
            status, text = "Passed", "committed" + (" with reverse protection" if self.data.get("reverse") else "")
        elif t.get("stoppedByUser"):
            status, text = "Stopped", "rolled back"
        else:
            status, text = "Failed", f"failed: {t.get('completeReason')}"
        try:
            self.write_report(self.recovery_type, status=status, notes=text)
        except ZVMError as exc:
            log.info("report of %s: %s", t["identifier"], exc)
        vpg = self.vpgs.store.get("vpgs", self.vpg_id)
        self.zvm.events.record(self.type, f"{self.type} of VPG {vpg['name'] if vpg else self.vpg_id} {text}",
                               entity="VPG", success=ok or bool(t.get("stoppedByUser")),
                               vpg=self.vpgs.link(vpg) if vpg else t.get("vpgLink"),
                               user=t.get("initiatedBy", ""))


@operation
class Failover(LiveRecovery):
    """Live failover of a VPG to a checkpoint (any recoverable one, e.g. an older one).

        begin (FailingOver / BeforeCommit, both sites)
          ─► shutdown_sources (policy None / Shutdown / ForceShutdown; protected site down: noted)
          ─► stop_replication (the protected VRAs stop streaming: the journal holds still)
          ─► open_images (image set at the checkpoint) ─► create_vms (failover network, re-IP)
          ─► power_on (boot groups) ─► wait_commit ── WaitingForUserInput until FailoverCommit /
             FailoverRollback, or the commit policy's default after timeToWaitBeforeShutdownInSec
             │ commit                                         │ rollback (user or policy)
             ▼                                                ▼
          commit_images (FailingOverCommitting; the replicas  rolling_back (FailingOverRollingBack)
             become the image content)                        ─► delete_vms ─► discard_images
          ─► rebase_disks (VMs onto the replica files)        ─► restart_sources (those it shut
          ─► finish: no reverse ─► Recovered (8) ─► done         down) ─► resume_replication
             │ reverse                                           (delta sync) ─► unmark
             ▼                                                ─► Stopped (5)
          reverse_target ─► reverse_protect ─► reverse_sync ─► reverse_checkpoint ─► done (MeetingSLA)

        a step fails before commit_images ─► the rollback steps ─► Failed (4)
        a step fails after commit_images began ─► Failed (4), nothing undone (the VMs run on the
            committed replicas); the task's reason says which step

        protected site down: its steps are noted and skipped (sourceUnreachable); once it
            answers, wait_commit (its poll) or finish catch up with it (catch_up_source: status,
            replication off, shutdown policy); what a commit or rollback cannot tell it is left
            in _sourcePending for source.tell_protected_site
    """
    type = "Failover"
    steps = ("begin", "shutdown_sources", "stop_replication", "open_images", "create_vms",
             "power_on", "wait_commit", "commit_images", "rebase_disks", "finish",
             "reverse_target", "reverse_protect", "reverse_sync", "reverse_checkpoint", "done")
    rollback_steps = ("rolling_back", "delete_vms", "discard_images", "restart_sources",
                      "resume_replication", "unmark")


def reason_moving(vpg: dict) -> str:
    st = vpg["state"]["status"]
    return {FAILING_OVER: "fails over", MOVING: "moves", RECOVERED: "is recovered already"}.get(
        st, "is busy")
