"""Alerts, events, tasks and recovery reports."""
from __future__ import annotations

from datetime import datetime, timezone

from ..errors import BadRequest, NotFound
from ..events import ALERT_ENTITIES, ALERT_LEVELS, CATEGORIES, ENTITY_TYPES, EVENT_TYPES, HELP
from ..schema import BOOL, INT, STR
from ..tasks import OPERATIONS, task_api


def _time(value: str, name: str) -> float:
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"{name} must be an ISO 8601 time such as 2026-11-26T10:00:00Z") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _window(q: dict, start: str, end: str):
    lo = _time(q[start], start) if start in q else None
    hi = _time(q[end], end) if end in q else None
    return lambda t: t is not None and (lo is None or t >= lo) and (hi is None or t <= hi)


def register(api, zvm):
    # -- alerts
    @api.route("GET", "/v1/alerts", "Active alerts", response="[AlertApi]", query={
        "startDate": STR, "endDate": STR, "vpgIdentifier": STR, "zorgIdentifier": STR,
        "siteIdentifier": STR, "level": STR, "entity": STR, "helpIdentifier": STR,
        "isDismissed": BOOL})
    def alerts(req):
        q = req.query
        inside = _window(q, "startDate", "endDate")
        out = []
        for a in zvm.alerts.active():
            if not inside(a["_created"]):
                continue
            if "vpgIdentifier" in q and q["vpgIdentifier"] not in \
                    [v.get("identifier") for v in a["affectedVpgs"]]:
                continue
            if "zorgIdentifier" in q:
                continue            # no ZORGs (multi-tenancy) in Tidemark: nothing matches
            if "siteIdentifier" in q and q["siteIdentifier"] != zvm.site_id:
                continue
            if any(k in q and str(q[k]).lower() != str(a[k]).lower()
                   for k in ("level", "entity", "helpIdentifier")):
                continue
            if "isDismissed" in q and q["isDismissed"] != a["isDismissed"]:
                continue
            out.append(a)
        return out

    @api.route("GET", "/v1/alerts/levels", "Alert levels", response="[string]")
    def alert_levels(req):
        return ALERT_LEVELS

    @api.route("GET", "/v1/alerts/entities", "Alert entities", response="[string]")
    def alert_entities(req):
        return ALERT_ENTITIES

    @api.route("GET", "/v1/alerts/helpidentifiers", "Alert help identifiers", response="[string]")
    def alert_help(req):
        return sorted(HELP)

    @api.route("GET", "/v1/alerts/{alertIdentifier}", "One alert", response="AlertApi")
    def alert(req, alertIdentifier):
        return zvm.alerts.get(alertIdentifier)

    @api.route("POST", "/v1/alerts/{alertIdentifier}/dismiss", "Dismiss an alert")
    def dismiss(req, alertIdentifier):
        zvm.alerts.dismiss(alertIdentifier, True)

    @api.route("POST", "/v1/alerts/{alertIdentifier}/undismiss", "Undismiss an alert")
    def undismiss(req, alertIdentifier):
        zvm.alerts.dismiss(alertIdentifier, False)

    # -- events
    @api.route("GET", "/v1/events", "Events, newest first", response="[EventApi]", query={
        "startDate": STR, "endDate": STR, "vpg": STR, "vpgIdentifier": STR, "siteName": STR,
        "siteIdentifier": STR, "zorgIdentifier": STR, "eventType": STR, "entityType": STR,
        "category": STR, "eventCategory": STR, "userName": STR, "alertIdentifier": STR})
    def events(req):
        q = req.query
        inside = _window(q, "startDate", "endDate")
        out = []
        for e in zvm.events.list():
            vpgs = e["relatedEntities"]["vpgs"]
            if not inside(e["_created"]):
                continue
            if "vpgIdentifier" in q and q["vpgIdentifier"] not in [v.get("identifier") for v in vpgs]:
                continue
            if "vpg" in q and q["vpg"] not in [v.get("name") for v in vpgs]:
                continue
            if "siteIdentifier" in q and q["siteIdentifier"] != zvm.site_id:
                continue
            if "siteName" in q and q["siteName"] != zvm.cfg.site_name:
                continue
            if "zorgIdentifier" in q:
                continue
            if "eventType" in q and q["eventType"] not in (e["eventTypeName"], str(e["eventType"])):
                continue
            if "entityType" in q and q["entityType"] not in (
                    ENTITY_TYPES[e["entityType"]], str(e["entityType"])):
                continue
            cat = q.get("eventCategory", q.get("category"))
            if cat and cat.lower() != e["eventCategory"].lower():
                continue
            if "userName" in q and q["userName"] != e["userName"]:
                continue
            if "alertIdentifier" in q and q["alertIdentifier"] not in \
                    [a.get("identifier") for a in e["relatedEntities"]["alerts"]]:
                continue
            out.append(e)
        return out

    @api.route("GET", "/v1/events/types", "Event types", response="[string]")
    def event_types(req):
        return EVENT_TYPES

    @api.route("GET", "/v1/events/entities", "Event entity types", response="[string]")
    def event_entities(req):
        return ENTITY_TYPES

    @api.route("GET", "/v1/events/categories", "Event categories", response="[string]")
    def event_categories(req):
        return CATEGORIES

    @api.route("GET", "/v1/events/{eventIdentifier}", "One event", response="EventApi")
    def event(req, eventIdentifier):
        return zvm.events.get(eventIdentifier)

    # -- tasks
    @api.route("GET", "/v1/tasks", "Tasks, newest first", response="[TaskApi]", query={
        "startedBeforeDate": STR, "startedAfterDate": STR, "completedBeforeDate": STR,
        "completedAfterDate": STR, "type": STR, "status": STR})
    def tasks(req):
        q = req.query
        started = _window(q, "startedAfterDate", "startedBeforeDate")
        has_completed = "completedAfterDate" in q or "completedBeforeDate" in q
        completed = _window(q, "completedAfterDate", "completedBeforeDate")
        out = []
        for t in zvm.tasks.list():
            if not started(t["started"]):
                continue
            if has_completed and not completed(t["completed"]):
                continue
            if "type" in q and q["type"].lower() != t["type"].lower():
                continue
            if "status" in q and q["status"] not in (str(t["state"]), _state_name(t["state"])):
                continue
            out.append(task_api(t, zvm.site_link()))
        return out

    @api.route("GET", "/v1/tasks/types", "Task types", response="[string]")
    def task_types(req):
        return sorted(OPERATIONS)

    @api.route("GET", "/v1/tasks/{taskIdentifier}", "One task", response="TaskApi")
    def task(req, taskIdentifier):
        try:
            return task_api(zvm.tasks.get(taskIdentifier), zvm.site_link())
        except NotFound:
            from ..forward import peer_task       # a recovery operation runs at the peer site
            found = peer_task(zvm, taskIdentifier)
            if found is None:
                raise
            return found

    # -- recovery reports
    @api.route("GET", "/v1/reports/recovery", "Recovery operation reports",
               response="[RecoveryReportApi]", query={
                   "startTime": STR, "endTime": STR, "pageNumber": INT, "pageSize": INT,
                   "vpgName": STR, "recoveryType": STR, "state": STR})
    def reports(req):
        q = req.query
        inside = _window(q, "startTime", "endTime")
        out = [r for r in zvm.store.all("reports")
               if inside(r["_created"])
               and ("vpgName" not in q or q["vpgName"] == r["general"]["vpgName"])
               and ("recoveryType" not in q or q["recoveryType"].lower() == r["general"]["recoveryType"].lower())
               and ("state" not in q or q["state"].lower() == r["general"]["status"].lower())]
        size = q.get("pageSize", 0)
        if size < 0 or q.get("pageNumber", 1) < 1:
            raise BadRequest("pageNumber starts at 1 and pageSize is positive")
        if size:
            page = q.get("pageNumber", 1)
            out = out[(page - 1) * size: page * size]
        return out

    @api.route("GET", "/v1/reports/recovery/{recoveryOperationIdentifier}", "One recovery report",
               response="RecoveryReportApi")
    def report(req, recoveryOperationIdentifier):
        r = zvm.store.get("reports", recoveryOperationIdentifier)
        if r is None:       # written at the peer site, its copy not here (yet, or it was down)
            from ..forward import peer_report
            r = peer_report(zvm, recoveryOperationIdentifier)
        if r is None:
            raise NotFound(f"no recovery report {recoveryOperationIdentifier}")
        return r


def _state_name(state: int) -> str:
    from ..tasks import STATE_NAMES
    return STATE_NAMES.get(state, "")
