"""Move: a planned migration of a VPG to its recovery site with no data loss. The source VMs are
shut down first, a checkpoint is taken after that (recoverable only once every write before it
is durable at the recovery site: the final sync), and the failover runs at that checkpoint."""
from __future__ import annotations

from ..tasks import operation
from ..vpgs import MOVING, SUB_MOVE_BEFORE_COMMIT, SUB_MOVE_COMMITTING, SUB_MOVE_ROLLING_BACK
from .failover import LiveRecovery


@operation
class Move(LiveRecovery):
    """Move a VPG to its recovery site (runs at the recovery site's ZVM).

        begin (Moving / MovingBeforeCommit, both sites)
          ─► shutdown_sources (graceful, or forced with forceShutdown; the protected site must
             answer: a Move never runs without it)
          ─► final_checkpoint (taken after the shutdown; waits until it is recoverable here, so
             everything the VMs wrote is durable in the journal)
          ─► stop_replication ─► open_images ─► create_vms ─► power_on
          ─► wait_commit ── WaitingForUserInput until MoveCommit / moveRollback, or the commit
             │ commit          policy's default after commitPolicyTimeout
             ▼                                     │ rollback (user or policy)
          commit_images (MovingCommitting)         ▼
          ─► rebase_disks                          rolling_back (MovingRollingBack) ─► delete_vms
          ─► finish: no reverse ─► Recovered (8),  ─► discard_images ─► restart_sources (powered
             source VMs removed (disks kept)          on again) ─► resume_replication (delta
             unless keepSourceVms ─► done             sync) ─► unmark (MeetingSLA) ─► Stopped (5)
             │ reverse
             ▼
          reverse_target ─► reverse_protect ─► reverse_sync (moves nothing or almost nothing:
          the original disks hold what the VMs held at the shutdown) ─► reverse_checkpoint ─► done

        a step fails before commit_images ─► the rollback steps ─► Failed (4)
        a step fails after commit_images began ─► Failed (4), nothing undone
    """
    type = "Move"
    status = MOVING
    sub_before, sub_committing, sub_rolling_back = (SUB_MOVE_BEFORE_COMMIT, SUB_MOVE_COMMITTING,
                                                    SUB_MOVE_ROLLING_BACK)
    process = "runningMoveApi"
    recovery_type = "Move"
    steps = ("begin", "shutdown_sources", "final_checkpoint", "stop_replication", "open_images",
             "create_vms", "power_on", "wait_commit", "commit_images", "rebase_disks", "finish",
             "reverse_target", "reverse_protect", "reverse_sync", "reverse_checkpoint", "done")
    rollback_steps = ("rolling_back", "delete_vms", "discard_images", "restart_sources",
                      "resume_replication", "unmark")

    def shutdown_policy(self) -> int:
        return 2 if self.params.get("forceShutdown") else 1

    def step_final_checkpoint(self):
        if self.rec.get("checkpoint"):
            return
        cp = self.source("checkpoint", {"tag": f"Move {self.task['identifier']}"})
        self.rec_init({"id": int(cp["id"]), "time": float(cp["time"]), "tag": cp.get("tag")},
                      self.params["vms"])
        self.note(f"checkpoint {cp['id']} after the shutdown is recoverable: nothing the VMs "
                  "wrote is left behind")
