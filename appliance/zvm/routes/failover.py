"""Live Failover, Move and per-VM Restore (operations/failover.py, move.py, restore.py) and the
protected site's part of them (``/v1/internal/vpgs/{id}/source/...``, ``.../reverse``, role
peer). A request may reach either ZVM: ``forward.dispatch`` runs the handler at the VPG's
recovery site, which checks the request (400/409, nothing changed) and submits the task or
signals it; the answer is the task identifier."""
from __future__ import annotations

from .. import forward
from ..errors import BadRequest, Conflict
from ..recovery import active_task, busy, check_networks, resolve_checkpoint, select_vms
from ..schema import ANY, BOOL, INT, STR, arr, enum, nullable, obj
from ..tasks import WAITING
from ..vpgs import OPERATION_STATUSES, Vpgs
from ..operations import failover as _failover, move as _move, restore as _restore  # noqa: F401
from ..operations.source import SourceSide
from ..operations.reverse import prepare_reverse


def _ready(zvm, vpg: dict) -> None:
    """409 unless the VPG replicates normally and nothing else runs for it."""
    st = vpg["state"]
    if st.get("status") in OPERATION_STATUSES:
        raise Conflict(f"VPG {vpg['name']} is {['FailingOver', 'Moving', 'Deleting', 'Recovered'][OPERATION_STATUSES.index(st['status'])]}: "
                       "finish that first")
    if not st.get("initialSyncDone"):
        raise Conflict(f"VPG {vpg['name']} has no recoverable data yet (initializing)")
    busy(zvm, vpg)


def _signal(zvm, vpg: dict, op_type: str, name: str, params: dict, user: str) -> str:
    task = active_task(zvm, vpg["identifier"], op_type)
    if task is None:
        raise Conflict(f"VPG {vpg['name']} has no {op_type} running: nothing to "
                       f"{'commit' if name == 'commit' else 'roll back'}")
    if (task.get("data") or {}).get("decision") or task.get("signal"):
        raise Conflict(f"{op_type} of VPG {vpg['name']} was decided already "
                       f"({(task.get('data') or {}).get('decision') or task['signal']['name']})")
    if task["state"] != WAITING and name == "commit" and not (task.get("data") or {}).get("rec", {}).get("bootedGroups"):
        raise Conflict(f"{op_type} of VPG {vpg['name']} has not brought its VMs up yet: "
                       "commit when the task waits for it")
    zvm.tasks.signal(task["identifier"], name, {**params, "by": f"user {user}"})
    return task["identifier"]


def _policy(value, name: str, default: int) -> int:
    v = default if value is None else value
    if v not in (0, 1, 2):
        raise BadRequest(f"{name} must be 0, 1 or 2")
    return v


def register(api, zvm):
    svc: Vpgs = zvm.services.setdefault("vpgs", Vpgs(zvm))
    source = SourceSide(zvm)
    zvm.services["failover-source"] = source
    policy = nullable(enum(0, 1, 2))
    api.schema("FailoverDataApi", obj(
        checkpointIdentifier=nullable(STR), commitPolicy=policy,
        timeToWaitBeforeShutdownInSec=nullable(INT), shutdownPolicy=policy,
        isReverseProtection=nullable(BOOL), vmIdentifiers=nullable(arr(STR))))
    api.schema("FailoverCommitDataApi", obj(isReverseProtection=nullable(BOOL)))
    api.schema("MoveVpgDataApi", obj(
        commitPolicy=policy, commitPolicyTimeout=nullable(INT), forceShutdown=nullable(BOOL),
        reverseProtection=nullable(BOOL), keepSourceVms=nullable(BOOL),
        continueOnPreScriptFailure=nullable(BOOL)))
    api.schema("MoveCommitVpgDataApi", obj(reverseProtection=nullable(BOOL),
                                           keepSourceVms=nullable(BOOL)))
    api.schema("JournalVMRestoreDataApi", obj(
        ("vpgIdentifier",), vpgIdentifier=STR, restoredVmName=nullable(STR),
        checkpointIdentifier=nullable(STR), commitPolicy=policy, shutdownPolicy=policy,
        timeToWaitBeforeContinueInSeconds=nullable(INT), journalVMRestoreSettings=nullable(obj())))
    api.schema("InternalSourceAction", obj(force=nullable(BOOL), vms=nullable(arr(STR)),
                                           tag=nullable(STR), status=nullable(INT),
                                           substatus=nullable(INT), activeProcess=ANY,
                                           deleteSourceVms=nullable(BOOL)))
    api.schema("InternalReverse", obj(("vms", "protectedSiteIdentifier"), vms=arr(obj()),
                                      keepSourceVms=nullable(BOOL), protectedSiteIdentifier=STR))
    vp = "/v1/vpgs/{vpgIdentifier}"

    def seconds(value, name: str, default: int) -> int:
        v = default if value is None else value
        if v < 0 or v > 7 * 86400:
            raise BadRequest(f"{name} must be 0 to {7 * 86400} seconds")
        return v

    # -- handlers: run at the recovery site (forward.dispatch gets them there) ---------------
    @forward.handler("Failover")
    def start_failover(zvm_, vpg, p, user):
        commit = _policy(p.get("commitPolicy"), "commitPolicy", 2)
        shutdown = _policy(p.get("shutdownPolicy"), "shutdownPolicy", 0)
        wait = seconds(p.get("timeToWaitBeforeShutdownInSec"), "timeToWaitBeforeShutdownInSec", 3600)
        vms = select_vms(vpg, p.get("vmIdentifiers"))
        _ready(zvm_, vpg)
        cp = resolve_checkpoint(zvm_, vpg, p.get("checkpointIdentifier"))
        check_networks(zvm_, vpg, vms, False)
        return zvm_.tasks.submit("Failover", {
            "checkpoint": cp, "vms": vms, "commitPolicy": commit, "commitTimeoutS": wait,
            "shutdownPolicy": shutdown, "reverseProtection": bool(p.get("isReverseProtection"))},
            vpg=svc.link(vpg), user=user)["identifier"]

    @forward.handler("FailoverCommit")
    def commit_failover(zvm_, vpg, p, user):
        return _signal(zvm_, vpg, "Failover", "commit",
                       {"reverseProtection": p.get("isReverseProtection")}, user)

    @forward.handler("FailoverRollback")
    def rollback_failover(zvm_, vpg, p, user):
        return _signal(zvm_, vpg, "Failover", "rollback", {}, user)

    @forward.handler("Move")
    def start_move(zvm_, vpg, p, user):
        commit = _policy(p.get("commitPolicy"), "commitPolicy", 1)
        wait = seconds(p.get("commitPolicyTimeout"), "commitPolicyTimeout", 3600)
        vms = select_vms(vpg, None)
        _ready(zvm_, vpg)
        check_networks(zvm_, vpg, vms, False)
        return zvm_.tasks.submit("Move", {
            "checkpoint": None, "vms": vms, "commitPolicy": commit, "commitTimeoutS": wait,
            "forceShutdown": bool(p.get("forceShutdown")),
            "reverseProtection": bool(p.get("reverseProtection")),
            "keepSourceVms": bool(p.get("keepSourceVms"))}, vpg=svc.link(vpg), user=user)["identifier"]

    @forward.handler("MoveCommit")
    def commit_move(zvm_, vpg, p, user):
        return _signal(zvm_, vpg, "Move", "commit", {"reverseProtection": p.get("reverseProtection"),
                                                    "keepSourceVms": p.get("keepSourceVms")}, user)

    @forward.handler("MoveRollback")
    def rollback_move(zvm_, vpg, p, user):
        return _signal(zvm_, vpg, "Move", "rollback", {}, user)

    # -- the public routes (either ZVM) ------------------------------------------------------
    def op_route(path, name, summary, body=None):
        kw = {"body": body, "body_required": False} if body else {}

        @api.route("POST", f"{vp}/{path}", summary, response="string", **kw)
        def view(req, vpgIdentifier):
            return forward.dispatch(zvm, name, vpgIdentifier, req.body or {}, req.user)
        view.__name__ = f"op_{name}"

    op_route("Failover", "Failover", "Live failover to a checkpoint (a task of the recovery site)",
             "FailoverDataApi")
    op_route("FailoverCommit", "FailoverCommit", "Commit a failover (its task id)",
             "FailoverCommitDataApi")
    op_route("FailoverRollback", "FailoverRollback", "Roll a failover back (its task id)")
    op_route("Move", "Move", "Move the VPG to its recovery site (a task of the recovery site)",
             "MoveVpgDataApi")
    op_route("MoveCommit", "MoveCommit", "Commit a move (its task id)", "MoveCommitVpgDataApi")
    op_route("moveRollback", "MoveRollback", "Roll a move back (its task id)")

    _restore.register(api, zvm, svc)

    # -- the protected site's part (site to site) ---------------------------------------------
    ip = "/v1/internal/vpgs/{vpgIdentifier}"

    def src_route(action, summary, fn):
        @api.route("POST", f"{ip}/source/{action}", summary, tag="internal",
                   body="InternalSourceAction", body_required=False, role="peer")
        def view(req, vpgIdentifier):
            return fn(vpgIdentifier, req.body or {})
        view.__name__ = f"source_{action}"

    src_route("state", "Show a recovery operation's status on the protected copy",
              lambda v, b: source.state(v, b))
    src_route("shutdown", "Power off the VPG's source VMs (graceful, or forced)",
              lambda v, b: source.shutdown(v, bool(b.get("force")), b.get("vms")))
    src_route("poweron", "Power source VMs on again (a rolled-back failover or move)",
              lambda v, b: source.power_on(v, b.get("vms") or []))
    src_route("checkpoint", "A valid checkpoint now, once recoverable (the move's final sync)",
              lambda v, b: source.checkpoint(v, b.get("tag")))
    src_route("stop", "Stop replicating the VPG (the journal holds still)",
              lambda v, b: source.stop(v))
    src_route("resume", "Replicate again with a delta sync (rollback)",
              lambda v, b: source.resume(v))
    src_route("recovered", "Mark the VPG recovered (commit without reverse protection)",
              lambda v, b: source.recovered(v, bool(b.get("deleteSourceVms"))))

    @api.route("POST", ip + "/reverse", "Become the recovery site of the reversed VPG, the "
               "original VMs' disks preseeding its replicas", tag="internal",
               body="InternalReverse", role="peer")
    def reverse(req, vpgIdentifier):
        return prepare_reverse(zvm, vpgIdentifier, req.body)
