"""Clone: independent copies of the VPG's VMs at a checkpoint on the recovery site, named
"<vm> - clone", on plain disks of their own (the recovery VRA copies each image disk into the
clone's new disk: ``POST /v1/recovery/images/{id}/disks/{vm}/{disk}/copy``, docs/vra.md).
Replication of the VPG goes on; the clones are left powered off. CloneAbort stops a running
clone and removes what it made.
"""
from __future__ import annotations

import time

from ..errors import BadRequest, Conflict, NotFound, Unavailable
from ..recovery import RecoveryOp, active_task, busy, check_networks, resolve_checkpoint, select_vms
from ..tasks import operation
from .. import forward

SUFFIX = " - clone"
PROCESS = "runningCloneApi"          # a Tidemark extension of VpgActiveProcessesApi
COPY_POLL_S = 0.3
COPY_TIMEOUT_S = 6 * 3600


@operation
class CloneStart(RecoveryOp):
    """Clone the VPG's VMs at a checkpoint.

        POST CloneStart ── checkpoint not recoverable, unknown VM or datastore: 4xx; busy: 409
          ▼
        mark ──► open_images ──► create_vms ──► copy_disks ──► release ──► unmark ──► Completed (6)
        (stage    (image set at    (VMs "<vm> - clone",  (the VRA writes      (image set
         Cloning)  the checkpoint)  new empty disks,      each image disk      discarded)
                                    powered off, ids      into the clone's
                                    saved)                disk file)
          │ a step fails, or CloneAbort (seen by copy_disks) ─► the rollback:
          ▼
        delete_vms ──► discard_images ──► unmark ──► Failed (4), or Stopped (5) after CloneAbort
    """
    type = "CloneStart"
    steps = ("mark", "open_images", "create_vms", "copy_disks", "release", "unmark")
    rollback_steps = ("delete_vms", "discard_images", "unmark")

    def _record(self, **kw) -> dict:
        with self.vpgs.update(self.vpg_id) as doc:
            rec = doc.get("_clone") or {"task": self.task["identifier"], "started": self.task["started"]}
            rec.update(kw)
            doc["_clone"] = rec
        return rec

    def _aborted(self) -> bool:
        return bool((self.vpg().get("_clone") or {}).get("abort"))

    def step_mark(self):
        self.rec_init(self.params["checkpoint"], self.params["vms"])
        self._record(checkpoint=self.rec["checkpoint"])
        self.set_process({PROCESS: {"stage": "Cloning"}})

    def step_open_images(self):
        self._record(image={"id": self.open_images()["id"]})

    def step_create_vms(self):
        self.create_vms(test=False, suffix=SUFFIX, datastore=self.params.get("datastoreIdentifier"),
                        plain=True)

    def step_copy_disks(self):
        """Ask the VRA to copy every disk (again after a restart: the same bytes) and wait."""
        hv = self.zvm.hypervisor
        img = self.rec["image"]["id"]
        jobs = []
        for m in self.vms():
            c = self.rec["created"][m["vmIdentifier"]]
            for d in hv.vm(c["id"]).disks:
                path = f"/v1/recovery/images/{img}/disks/{m['instanceUuid']}/{d.index}/copy"
                self.vra_call("POST", path, json={"path": d.path})
                jobs.append((path, d.path))
        deadline = time.monotonic() + COPY_TIMEOUT_S
        total = 0
        while jobs:
            if self._aborted():
                self.task["stoppedByUser"] = True
                raise Conflict("CloneAbort: the clone was aborted by the user")
            left = []
            for path, target in jobs:
                try:
                    st = self.vra_call("GET", path)
                except NotFound:           # the VRA restarted: ask again
                    st = self.vra_call("POST", path, json={"path": target})
                if st["state"] == "failed":
                    raise Unavailable(f"the recovery VRA could not copy into {target}: {st['error']}")
                if st["state"] == "done":
                    total += st["bytes_total"]
                else:
                    left.append((path, target))
            jobs = left
            if jobs:
                if time.monotonic() > deadline:
                    raise Unavailable("the disk copies did not finish in time")
                if self.tasks.stopping.wait(COPY_POLL_S):
                    from ..tasks import _Shutdown
                    raise _Shutdown()
        self.note(f"{total >> 20} MiB copied into the clones' disks")

    def step_release(self):
        self.discard_images()

    def step_unmark(self):
        self._unmark()

    def undo_delete_vms(self):
        self.delete_vms()

    def undo_discard_images(self):
        self.discard_images()

    def undo_unmark(self):
        self._unmark()

    def _unmark(self):
        with self.vpgs.update(self.vpg_id) as doc:
            if (doc.get("_clone") or {}).get("task") == self.task["identifier"]:
                doc.pop("_clone", None)
        self.set_process(None)

    def on_done(self, ok: bool) -> None:
        stopped = bool(self.task.get("stoppedByUser"))
        self.write_report("Clone", status="Passed" if ok else "Aborted" if stopped else "Failed",
                          notes="" if ok else self.task.get("completeReason", ""))
        self.zvm.events.record("CloneStart", f"clone of VPG {self.vpg()['name']} "
                               + ("done" if ok else "aborted" if stopped else
                                  f"failed: {self.task.get('completeReason')}"),
                               entity="VPG", success=ok, vpg=self.task.get("vpgLink"),
                               user=self.task.get("initiatedBy", ""))


@forward.handler("CloneStart")
def start_clone(zvm, vpg: dict, params: dict, user: str) -> str:
    busy(zvm, vpg)
    vms = select_vms(vpg, params.get("vmIdentifiers"))
    ds = params.get("datastoreIdentifier")
    if ds is not None and ds not in {d.id for d in zvm.hypervisor.datastores()}:
        raise BadRequest(f"datastoreIdentifier: the recovery site has no datastore {ds!r}")
    check_networks(zvm, vpg, vms, test=False)
    if params.get("checkpointId") in (None, ""):
        raise BadRequest("checkpointId is required (GET /v1/vpgs/{id}/checkpoints lists them)")
    cp = resolve_checkpoint(zvm, vpg, params.get("checkpointId"))
    return zvm.tasks.submit("CloneStart", {"checkpoint": cp, "vms": vms, "datastoreIdentifier": ds},
                            vpg=zvm.services["vpgs"].link(vpg), user=user)["identifier"]


@forward.handler("CloneAbort")
def abort_clone(zvm, vpg: dict, params: dict, user: str) -> str:
    task = active_task(zvm, vpg["identifier"], "CloneStart")
    if task is None:
        raise Conflict(f"VPG {vpg['name']} has no clone running")
    with zvm.services["vpgs"].update(vpg["identifier"]) as doc:     # seen by copy_disks
        doc.setdefault("_clone", {"task": task["identifier"], "started": task["started"]})["abort"] = True
    return task["identifier"]
