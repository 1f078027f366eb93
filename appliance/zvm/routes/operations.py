"""Recovery operation routes: FailoverTest, FailoverTestStop, CloneStart, CloneAbort (answered by
the recovery site's ZVM, forwarded there from the protected site's: ``forward.py``), the
forwarding's site-to-site routes, and the routes the recovery site's ZVM calls on the protected
site's during an operation (``/v1/internal``, role peer)."""
from __future__ import annotations

from .. import forward
from ..errors import BadRequest, NotFound
from ..schema import BOOL, NUM, STR, arr, nullable, obj
from ..vpgs import Vpgs
from ..operations import clone, failovertest  # noqa: F401  (register the operations and handlers)


def register(api, zvm):
    svc: Vpgs = zvm.services.setdefault("vpgs", Vpgs(zvm))
    forward.register_routes(api, zvm)
    api.schema("FailOverTestStartDataApi", obj(checkpointIdentifier=nullable(STR),
                                               vmIdentifiers=nullable(arr(STR))))
    api.schema("StopFailoverTestDataApi", obj(failoverTestSuccess=nullable(BOOL),
                                              failoverTestSummary=nullable(STR)))
    api.schema("CloneStartDataApi", obj(("checkpointId",), checkpointId=STR,
                                        datastoreIdentifier=nullable(STR),
                                        vmIdentifiers=nullable(arr(STR))))
    api.schema("InternalActiveProcess", obj(activeProcess=nullable(obj()), state=nullable(obj())))
    api.schema("InternalReport", obj(("recoveryOperationIdentifier",),
                                     recoveryOperationIdentifier=STR, general=obj(),
                                     recoverySettings=obj(), created=nullable(NUM)))
    vp = "/v1/vpgs/{vpgIdentifier}"

    def op_route(name: str, summary: str, body: str | None):
        kw = {"body": body, "body_required": False} if body else {}

        @api.route("POST", f"{vp}/{name}", summary, response="string", **kw)
        def view(req, vpgIdentifier):
            return forward.dispatch(zvm, name, vpgIdentifier, req.body or {}, req.user)
        view.__name__ = f"op_{name}"

    op_route("FailoverTest", "Start a failover test (a task of the recovery site's ZVM)",
             "FailOverTestStartDataApi")
    op_route("FailoverTestStop", "Stop the running failover test (a task)", "StopFailoverTestDataApi")
    op_route("CloneStart", "Clone the VPG's VMs at a checkpoint on the recovery site (a task)",
             "CloneStartDataApi")
    op_route("CloneAbort", "Abort the running clone (answers the clone's task)", None)

    # -- the recovery site's ZVM calls these on the protected site's during an operation
    ip = "/v1/internal/vpgs/{vpgIdentifier}"

    @api.route("PUT", ip + "/activeprocess", "Set the VPG's active recovery process (and "
               "state fields such as lastTest) as the recovery site runs it", tag="internal",
               body="InternalActiveProcess", role="peer")
    def active_process(req, vpgIdentifier):
        state = req.body.get("state") or {}
        if set(state) - {"lastTest", "lastTestResult", "lastTestSummary"}:
            raise BadRequest("state may set lastTest, lastTestResult and lastTestSummary only")
        svc.get(vpgIdentifier)
        svc.set_state(vpgIdentifier, activeProcess=req.body.get("activeProcess"), **state)

    @api.route("GET", "/v1/internal/reports/{recoveryOperationIdentifier}", "One recovery report "
               "of this ZVM (no asking its peers)", tag="internal", role="peer",
               response="RecoveryReportApi")
    def get_report(req, recoveryOperationIdentifier):
        r = zvm.store.get("reports", recoveryOperationIdentifier)
        if r is None:
            raise NotFound(f"no recovery report {recoveryOperationIdentifier}")
        return r

    @api.route("PUT", "/v1/internal/reports/{recoveryOperationIdentifier}", "Keep a copy of a "
               "recovery report written by the peer site", tag="internal", body="InternalReport",
               role="peer")
    def put_report(req, recoveryOperationIdentifier):
        b = req.body
        if b["recoveryOperationIdentifier"] != recoveryOperationIdentifier:
            raise BadRequest("recoveryOperationIdentifier differs from the path")
        created = b.get("created")
        doc = {"recoveryOperationIdentifier": recoveryOperationIdentifier,
               "general": b.get("general") or {}, "recoverySettings": b.get("recoverySettings") or {},
               "_created": float(created) if isinstance(created, (int, float)) else None}
        old = zvm.store.get("reports", recoveryOperationIdentifier)
        doc["_created"] = doc["_created"] or (old or {}).get("_created")
        if doc["_created"] is None:
            import time
            doc["_created"] = time.time()
        zvm.store.put("reports", recoveryOperationIdentifier, doc)
