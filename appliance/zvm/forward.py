"""Recovery operations run at the RECOVERY site's ZVM; this module gets them there.

The recovery ZVM owns the recovery VRA, the recovery hypervisor and the image sets, so every
recovery operation (FailoverTest, FailoverTestStop, CloneStart, CloneAbort, Failover, Move,
Restore, ...) is a task of the recovery site's ZVM. A request may reach either ZVM:

    client ──POST /v1/vpgs/{id}/FailoverTest──► protected ZVM        (VPG role "protected")
                                                   │ dispatch(): not here, forward
                                                   └─POST /v1/internal/vpgs/{id}/operations/FailoverTest
                                                        {params, user}  (peer client, role peer)
                                                        ──► recovery ZVM: dispatch(): the handler
                                                            submits the task, answers its id
    client ◄──────────── "FailoverTest.17...." (the recovery ZVM's task id) ─────────┘
    client ──GET /v1/tasks/{id}──► either ZVM: a ZVM that does not know the task asks its
                                   paired peers (GET /v1/internal/tasks/{id}), see peer_task()

How to use it (routes of an operation):

    from .. import forward

    @forward.handler("Failover")                 # runs at the recovery ZVM only
    def start_failover(zvm, vpg, params, user):  # vpg: the recovery site's VPG document
        ...check params: raise BadRequest / Conflict before anything changes...
        return zvm.tasks.submit("Failover", params, vpg=vpgs.link(vpg), user=user)["identifier"]

    @api.route("POST", "/v1/vpgs/{vpgIdentifier}/Failover", "...", body="FailoverDataApi",
               body_required=False, response="string")
    def failover(req, vpgIdentifier):
        return forward.dispatch(zvm, "Failover", vpgIdentifier, req.body or {}, req.user)

``dispatch`` runs the handler here when this ZVM holds the VPG's recovery role, forwards to the
recovery site's ZVM when it holds the protected role, and answers what the handler answered
(the task id). Problems of the handler (400/404/409) come back with the same status through
the forwarding. The internal routes are registered once by ``register_routes`` (called by
``routes/operations.py``). Steps of a task that need the protected site call it with
``zvm.services["vpgs"].peer_call(vpg, ...)`` on ``/v1/internal/...`` routes (role peer).
"""
from __future__ import annotations

import logging
from typing import Callable

from .errors import BadRequest, NotFound, ZVMError
from .schema import ANY, STR, obj
from .tasks import task_api

log = logging.getLogger("tidemark.zvm.forward")

HANDLERS: dict[str, Callable] = {}


def handler(name: str):
    """Register ``fn(zvm, vpg, params, user) -> answer`` as the recovery-site side of ``name``."""
    def deco(fn):
        HANDLERS[name] = fn
        return fn
    return deco


def dispatch(zvm, name: str, vpg_id: str, params: dict, user: str):
    """Run operation ``name`` of a VPG where it belongs (see the module docstring)."""
    fn = HANDLERS.get(name)
    if fn is None:
        raise NotFound(f"this ZVM has no operation {name}")
    vpgs = zvm.services["vpgs"]
    vpg = vpgs.get(vpg_id)
    if vpg["role"] == "recovery":
        return fn(zvm, vpg, params, user)
    return vpgs.peer(vpg).request("POST", f"/v1/internal/vpgs/{vpg_id}/operations/{name}",
                                  json={"params": params, "user": user})


def peer_task(zvm, tid: str) -> dict | None:
    """A task this ZVM does not know, as one of its paired peers answers it (TaskApi, PascalCase
    as the peer spelled it), or None when no reachable peer knows it either."""
    return ask_peers(zvm, f"/v1/internal/tasks/{tid}", f"task {tid}")


def peer_report(zvm, rid: str) -> dict | None:
    """A recovery report this ZVM holds no copy of (yet), as a paired peer answers it."""
    return ask_peers(zvm, f"/v1/internal/reports/{rid}", f"report {rid}")


def ask_peers(zvm, path: str, what: str) -> dict | None:
    """GET ``path`` from each paired peer in turn: the first answer, or None (404 or unreachable
    everywhere)."""
    sites = zvm.services.get("sites")
    for p in (sites.peers() if sites else []):
        try:
            return sites.client(p["siteIdentifier"]).request("GET", path)
        except NotFound:
            continue
        except ZVMError as exc:           # unreachable peer: ask the next one
            log.info("%s: peer %s did not answer: %s", what, p.get("peerSiteName"), exc)
    return None


def register_routes(api, zvm) -> None:
    """The site-to-site routes of the forwarding (role peer)."""
    api.schema("InternalOperation", obj(("params",), params=ANY, user=STR))

    @api.route("POST", "/v1/internal/vpgs/{vpgIdentifier}/operations/{operation}",
               "Run a recovery operation forwarded by the VPG's protected site (its task id)",
               tag="internal", body="InternalOperation", role="peer", response="string")
    def internal_operation(req, vpgIdentifier, operation):
        vpg = zvm.services["vpgs"].get(vpgIdentifier)
        if vpg["role"] != "recovery":
            raise BadRequest(f"VPG {vpg['name']} is not recovered at this site: "
                             "operations are forwarded to its recovery site only")
        fn = HANDLERS.get(operation)
        if fn is None:
            raise NotFound(f"this ZVM has no operation {operation}")
        params = req.body.get("params") or {}
        if not isinstance(params, dict):
            raise BadRequest("params must be an object")
        return fn(zvm, vpg, params, req.body.get("user") or req.user)

    @api.route("GET", "/v1/internal/tasks/{taskIdentifier}", "One task of this ZVM (no forwarding)",
               tag="internal", role="peer", response="TaskApi")
    def internal_task(req, taskIdentifier):
        return task_api(zvm.tasks.get(taskIdentifier), zvm.site_link())
