"""Events (what happened, for the audit trail) and alerts (what needs attention now).

Alerts are raised and cleared by key by the background monitors (one public synchronous method
each): raising an active alert again changes nothing, clearing one that is not active is a no-op,
so monitors can simply say what is true on every pass. An operator can dismiss an alert (it stays
active but is hidden from the default view) and undismiss it.
"""
from __future__ import annotations

import secrets
import time

from .errors import NotFound

# event types: the position is the integer EventType on the wire
EVENT_TYPES = [
    "Unknown", "SiteLogin", "UserAdded", "ClientAdded", "PairSites", "UnpairSites",
    "InstallVra", "UninstallVra", "UpgradeVra", "CreateVpg", "UpdateVpg", "DeleteVpg",
    "InsertTaggedCheckpoint", "FailoverTest", "StopFailoverTest", "Failover", "FailoverCommit",
    "FailoverRollback", "Move", "MoveCommit", "MoveRollback", "Clone", "CloneAbort",
    "PauseVpg", "ResumeVpg", "ForceSync", "Restore", "RestoreCommit", "RestoreRollback",
    "InitialSyncDone", "VmMoved", "VmAdded", "VmRemoved", "VmRenamed", "AlertRaised",
    "AlertCleared", "ZvmStarted", "OperationResumed", "CheckpointLost",
]
ENTITY_TYPES = ["VPG", "VRA", "Site", "Unknown"]        # EventEntityTypeApi 0..3
CATEGORIES = ["Events", "Alerts"]

ALERT_LEVELS = ["Warning", "Error"]
ALERT_ENTITIES = ["Zvm", "Vra", "Vpg", "Site", "Host", "Journal"]
# help identifiers: docs/zvm.md lists what each means and what to do
HELP = {
    "VPG0009": ("Vpg", "Warning", "The VPG's actual RPO exceeds its configured RPO."),
    "VPG0010": ("Vpg", "Warning", "The journal history is shorter than configured."),
    "VPG0012": ("Journal", "Warning", "The VPG's journal is near its hard limit."),
    "VPG0013": ("Journal", "Error", "The VPG's journal hit its hard limit: the oldest history is being dropped."),
    "VPG0018": ("Vpg", "Warning", "A bitmap (delta) sync is running for the VPG."),
    "VPG0020": ("Vpg", "Error", "A journal record failed its checksum."),
    "VRA0001": ("Vra", "Error", "A VRA does not answer."),
    "ZVM0002": ("Site", "Error", "The peer site's ZVM cannot be reached."),
    "ZVM0003": ("Zvm", "Error", "The hypervisor manager cannot be reached."),
}


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class Events:
    def __init__(self, store, site_link):
        self.store = store
        self._site_link = site_link

    def record(self, etype: str, description: str, *, entity: str = "Unknown",
               vpg: dict | None = None, user: str = "", success: bool = True,
               alert: str | None = None, category: str = "Events") -> dict:
        now = time.time()
        eid = f"{int(now * 1000)}.{secrets.token_hex(4)}"
        doc = {
            "eventIdentifier": eid,
            "link": {"rel": "self", "href": f"/v1/events/{eid}", "type": "EventApi",
                     "identifier": eid},
            "description": description, "occurredOn": _iso(now),
            "eventType": EVENT_TYPES.index(etype) if etype in EVENT_TYPES else 0,
            "eventTypeName": etype,
            "helpLink": "", "eventCompletedSuccessfully": success,
            "entityType": ENTITY_TYPES.index(entity) if entity in ENTITY_TYPES else 3,
            "eventCategory": category, "userName": user,
            "relatedEntities": {"vpgs": [vpg] if vpg else [], "sites": [self._site_link()],
                                "hosts": [], "zorgs": [], "flrSessions": [], "repositories": [],
                                "alerts": [{"identifier": alert}] if alert else []},
            "_created": now,
        }
        self.store.put("events", eid, doc)
        return doc

    def list(self) -> list[dict]:
        return self.store.all("events", limit=10000)

    def get(self, eid: str) -> dict:
        doc = self.store.get("events", eid)
        if doc is None:
            raise NotFound(f"no event {eid}")
        return doc


class Alerts:
    def __init__(self, store, events: Events, site_link):
        self.store = store
        self.events = events
        self._site_link = site_link

    def raise_(self, key: str, help_id: str, description: str, *, vpg: dict | None = None) -> dict:
        """Make the alert ``key`` active (idempotent)."""
        entity, level, _ = HELP[help_id]
        aid = _alert_id(key)
        with self.store.transaction():
            doc = self.store.get("alerts", aid)
            if doc is not None and doc["_active"]:
                if doc["description"] != description:
                    doc["description"] = description
                    self.store.put("alerts", aid, doc)
                return doc
            now = time.time()
            doc = {
                "alertIdentifier": aid, "_key": key, "_active": True, "_created": now,
                "link": {"rel": "self", "href": f"/v1/alerts/{aid}", "type": "AlertApi",
                         "identifier": aid},
                "level": level, "entity": entity, "isDismissed": False, "helpIdentifier": help_id,
                "site": self._site_link(), "description": description, "turnedOn": _iso(now),
                "affectedVpgs": [vpg] if vpg else [], "affectedZorgs": [],
                "generation": (doc or {}).get("generation", 0) + 1,
            }
            self.store.put("alerts", aid, doc)
        self.events.record("AlertRaised", f"{help_id}: {description}", entity="Unknown",
                           vpg=vpg, alert=aid, category="Alerts")
        return doc

    def clear(self, key: str) -> None:
        aid = _alert_id(key)
        with self.store.transaction():
            doc = self.store.get("alerts", aid)
            if doc is None or not doc["_active"]:
                return
            doc["_active"] = False
            self.store.put("alerts", aid, doc)
        self.events.record("AlertCleared", f"{doc['helpIdentifier']} cleared: {doc['description']}",
                           alert=aid, category="Alerts")

    def clear_prefix(self, prefix: str, keep: set[str] = frozenset()) -> None:
        for doc in self.active():
            if doc["_key"].startswith(prefix) and doc["_key"] not in keep:
                self.clear(doc["_key"])

    def active(self) -> list[dict]:
        return [a for a in self.store.all("alerts") if a["_active"]]

    def get(self, aid: str) -> dict:
        doc = self.store.get("alerts", aid)
        if doc is None or not doc["_active"]:
            raise NotFound(f"no active alert {aid}")
        return doc

    def dismiss(self, aid: str, dismissed: bool) -> dict:
        self.get(aid)
        with self.store.update("alerts", aid) as doc:
            doc["isDismissed"] = dismissed
        return doc


def _alert_id(key: str) -> str:
    import hashlib
    return hashlib.sha256(key.encode()).hexdigest()[:16]
