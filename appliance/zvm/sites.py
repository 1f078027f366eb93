"""Peer sites: pairing, unpairing, and calls to paired ZVMs (``zvm.services["sites"]``).

Pairing, with site A generating the token and the operator of site B pairing with it::

    A: POST /v1/peersites/generatetoken        -> {Token, UtcExpirationDate, Fingerprint}
    B: POST /v1/peersites {HostName, Port, Token[, Fingerprint]}
       B pins A's certificate: the fingerprint given, or the one A presents now (first use)
       B creates an API client (role peer) for A
       B -> A  POST /v1/peersites/pair (public; the one-time token is the credential)
               {token, B's siteIdentifier, name, location, url, fingerprint, version,
                clientId + clientSecret for A to call B, B's replication CA certificate}
       A uses the token up, creates an API client (role peer) for B, keeps B's record
       A -> B  {A's siteIdentifier, name, location, url, fingerprint, version,
                clientId + clientSecret for B to call A, A's replication CA certificate}
       B keeps A's record; both record a PairSites event
    B: a PairSites task checks that A lists B (GET /v1/peersites/{B} through the new client)

Credentials for calling the peer are kept in the peer's record as ``_clientId`` and
``_clientSecret`` (internal fields: never on the wire; the store is 0600). Later calls verify the
peer's certificate by the pinned fingerprint (peer.py). Unpairing (an UnpairSites task) tells the
peer (``DELETE /v1/peersites/pair/{siteIdentifier}`` as the peer client) and then forgets it
here; a peer that does not answer is forgotten here only, and the task says so.
"""
from __future__ import annotations

import hashlib
import logging
import ssl
import threading
import time

from .errors import BadRequest, Conflict, NotFound, Unauthorized, Unavailable, ZVMError
from .events import _iso
from .pairing import PairingTokens, SiteCA
from .peer import PeerClient, normalize_fingerprint, pinned_session, pretty_fingerprint, \
    raise_problem
from .tasks import Operation, operation

log = logging.getLogger("tidemark.zvm.sites")

PAIRING_STATUSES = ["Paired", "Pairing", "Unpaired"]      # PairingVisualStatusApi 0..2
PAIRED, PAIRING, UNPAIRED = 0, 1, 2
PAIR_PATH = "/v1/peersites/pair"


def server_fingerprint(host: str, port: int, timeout: float) -> str:
    """The SHA-256 fingerprint of the certificate the server at host:port presents."""
    try:
        pem = ssl.get_server_certificate((host, port), timeout=timeout)
    except (OSError, ssl.SSLError) as exc:
        raise BadRequest(f"nothing answers HTTPS at {host}:{port} ({exc.__class__.__name__}): "
                         "check the peer ZVM's address and port") from None
    der = ssl.PEM_cert_to_DER_cert(pem)
    return pretty_fingerprint(hashlib.sha256(der).hexdigest())


class SitesService:
    def __init__(self, zvm):
        self.zvm = zvm
        self.store = zvm.store
        self.tokens = PairingTokens(zvm.store, zvm.cfg.pairing_token_ttl_s)
        self.ca = SiteCA(zvm.cfg.path("pki"), zvm.cfg.site_name)
        self._clients: dict[str, PeerClient] = {}
        self._lock = threading.Lock()
        self.unpair_hooks: list = []    # fn(peer_doc, keep_target_disks) before a peer is forgotten
        self.pair_hooks: list = []      # fn(peer_doc) after a peer was paired (either side)

    # -- the interface other areas build on
    def peers(self) -> list[dict]:
        return self.store.all("peers")

    def peer(self, site_id: str) -> dict:
        doc = self.store.get("peers", site_id)
        if doc is None:
            raise NotFound(f"no paired site {site_id}: GET /v1/peersites lists the paired sites")
        return doc

    def client(self, site_id: str) -> PeerClient:
        """The API of a paired site, as this site's peer client (``request(method, path, ...)``)."""
        doc = self.peer(site_id)
        with self._lock:
            c = self._clients.get(site_id)
            if c is None or c._cid != doc["_clientId"]:
                c = PeerClient(doc["url"], doc.get("fingerprint"), doc["_clientId"],
                               doc["_clientSecret"], name=f"peer site {doc['peerSiteName']}",
                               timeout=self.zvm.cfg.peer_timeout_s)
                self._clients[site_id] = c
            return c

    def peer_cas(self) -> list[str]:
        """The replication CA certificates of the paired sites (for the VRAs' trust bundle)."""
        return [p["vraCa"] for p in self.peers() if p.get("vraCa")]

    # -- what this site tells a peer about itself
    def _me(self) -> dict:
        from .service import VERSION
        cfg = self.zvm.cfg
        out = {"siteIdentifier": self.zvm.site_id, "siteName": cfg.site_name,
               "location": cfg.site_location, "url": cfg.url, "version": VERSION,
               "siteType": "VCenter" if cfg.site_kind == "vsphere" else "SCVMM",
               "vraCa": self.ca.ensure()}
        if cfg.tls:
            from .serve import fingerprint
            out["fingerprint"] = fingerprint(cfg.path(cfg.tls_cert))
        return out

    def generate_token(self) -> dict:
        token, expires = self.tokens.generate()
        self.zvm.events.record("PairSites", "a pairing token was generated", entity="Site")
        return {"token": token, "utcExpirationDate": _iso(expires),
                "fingerprint": self._me().get("fingerprint")}

    # -- pairing, initiating side (B)
    def pair(self, host: str, port: int, token: str, fingerprint: str | None = None,
             user: str = "") -> dict:
        if not host or not (0 < port < 65536) or not token:
            raise BadRequest("pairing needs the peer ZVM's HostName, Port (1-65535) and Token")
        timeout = self.zvm.cfg.peer_timeout_s
        seen = server_fingerprint(host, port, timeout)
        if fingerprint is not None and normalize_fingerprint(fingerprint) != \
                normalize_fingerprint(seen):
            raise BadRequest(f"the ZVM at {host}:{port} presents a certificate with fingerprint "
                             f"{seen}, not the one given: not pairing (check the address, or "
                             "the fingerprint that GET /v1/peersites/generatetoken showed there)")
        me = self._me()
        if normalize_fingerprint(seen) == normalize_fingerprint(me.get("fingerprint") or "0" * 64):
            raise BadRequest("that is this ZVM: a site cannot be paired with itself")
        mine = self.zvm.auth.add_client("peer", f"peer site at {host}:{port}")
        url = f"https://{host}:{port}"
        body = {**me, "token": token, "clientId": mine["client_id"],
                "clientSecret": mine["client_secret"]}
        try:
            s = pinned_session(url, seen)
            try:
                r = s.post(url + PAIR_PATH, json=body, timeout=timeout)
            finally:
                s.close()
            raise_problem(r, f"the ZVM at {host}:{port}")
            theirs = {k[:1].lower() + k[1:]: v for k, v in r.json().items()}   # PascalCase
        except Unauthorized as exc:
            self.zvm.auth.delete_client(mine["client_id"])
            raise BadRequest(f"pairing refused: {exc.detail}") from None
        except ZVMError:
            self.zvm.auth.delete_client(mine["client_id"])
            raise
        except Exception as exc:   # requests' errors, a non-JSON answer
            self.zvm.auth.delete_client(mine["client_id"])
            raise BadRequest(f"the ZVM at {host}:{port} did not complete the pairing: "
                             f"{exc.__class__.__name__}: {exc}") from None
        doc = self._keep(theirs, host, port, seen, mine["client_id"])
        self.zvm.events.record("PairSites", f"paired with site {doc['peerSiteName']} at "
                               f"{host}:{port}", entity="Site", user=user)
        self._after_pair(doc)
        return doc

    # -- pairing, accepting side (A)
    def accept(self, body: dict) -> dict:
        self.tokens.consume(body["token"])
        if body["siteIdentifier"] == self.zvm.site_id:
            raise BadRequest("a site cannot be paired with itself")
        old = self.store.get("peers", body["siteIdentifier"])
        if old is not None:             # re-pairing (it was unpaired there while we were down)
            self._drop_client(old)
        from urllib.parse import urlsplit
        u = urlsplit(body["url"])
        if u.scheme not in ("http", "https") or not u.hostname:
            raise BadRequest("url must be the peer ZVM's http(s)://host:port")
        fp = body.get("fingerprint")
        if u.scheme == "https":
            if not fp:
                raise BadRequest("an HTTPS peer must send its certificate fingerprint")
            fp = pretty_fingerprint(fp)
        mine = self.zvm.auth.add_client("peer", f"peer site {body['siteName']}")
        doc = self._keep({**body, "clientId": body["clientId"],
                          "clientSecret": body["clientSecret"], "fingerprint": fp},
                         u.hostname, u.port or 443, fp, mine["client_id"])
        self.zvm.events.record("PairSites", f"paired with site {doc['peerSiteName']} "
                               f"({'again' if old else 'first time'}), on its request",
                               entity="Site")
        self._after_pair(doc)
        return {**self._me(), "clientId": mine["client_id"], "clientSecret": mine["client_secret"]}

    def _keep(self, theirs: dict, host: str, port: int, fingerprint: str | None,
              local_client: str) -> dict:
        for k in ("siteIdentifier", "siteName", "url", "clientId", "clientSecret"):
            if not isinstance(theirs.get(k), str) or not theirs[k]:
                self.zvm.auth.delete_client(local_client)
                raise BadRequest(f"the peer's pairing answer lacks {k}")
        doc = {"siteIdentifier": theirs["siteIdentifier"], "peerSiteName": theirs["siteName"],
               "location": theirs.get("location", ""), "hostName": host, "port": port,
               "url": theirs["url"], "fingerprint": fingerprint,
               "version": theirs.get("version", ""), "siteType": theirs.get("siteType", ""),
               "vraCa": theirs.get("vraCa", ""), "pairingStatus": PAIRED, "pairedAt": time.time(),
               "reachable": True, "lastContact": time.time(),
               "_clientId": theirs["clientId"], "_clientSecret": theirs["clientSecret"],
               "_localClientId": local_client}
        self.store.put("peers", doc["siteIdentifier"], doc)
        with self._lock:
            self._clients.pop(doc["siteIdentifier"], None)
        return doc

    def _after_pair(self, doc: dict) -> None:
        for hook in self.pair_hooks:
            try:
                hook(doc)
            except Exception as exc:   # noqa: BLE001 - a hook must not undo the pairing
                log.warning("pair hook failed for %s: %s", doc["peerSiteName"], exc)

    # -- unpairing
    def unpair(self, site_id: str, keep_target_disks: bool = False, user: str = "") -> dict:
        doc = self.peer(site_id)
        return self.zvm.tasks.submit("UnpairSites", {"siteIdentifier": site_id,
                                                     "keepTargetDisks": keep_target_disks},
                                     user=user, related_sites=[self.link(doc)])

    def forget(self, site_id: str, keep_target_disks: bool = False, reason: str = "") -> bool:
        doc = self.store.get("peers", site_id)
        if doc is None:
            return False
        for hook in self.unpair_hooks:
            hook(doc, keep_target_disks)
        self._drop_client(doc)
        self.store.delete("peers", site_id)
        with self._lock:
            self._clients.pop(site_id, None)
        self.zvm.alerts.clear(f"peer:{site_id}")
        self.zvm.events.record("UnpairSites", f"unpaired from site {doc['peerSiteName']}"
                               + (f": {reason}" if reason else ""), entity="Site")
        return True

    def _drop_client(self, doc: dict) -> None:
        try:
            self.zvm.auth.delete_client(doc["_localClientId"])
        except NotFound:
            pass

    def is_peer_client(self, identity: dict | None, site_id: str) -> bool:
        doc = self.store.get("peers", site_id)
        return bool(doc and identity and identity.get("subject") == f"client:{doc['_localClientId']}")

    # -- monitoring
    def check_peers(self) -> dict[str, bool]:
        """One pass of the peer monitor: ZVM0002 raised for each peer that does not answer."""
        out = {}
        for doc in self.peers():
            sid = doc["siteIdentifier"]
            try:
                self.client(sid).request("GET", "/v1/localsite",
                                         timeout=min(5.0, self.zvm.cfg.peer_timeout_s))
                ok, why = True, ""
            except ZVMError as exc:
                ok, why = False, exc.detail
            out[sid] = ok
            try:
                with self.store.update("peers", sid) as d:
                    d["reachable"] = ok
                    if ok:
                        d["lastContact"] = time.time()
            except KeyError:            # unpaired meanwhile
                continue
            if ok:
                self.zvm.alerts.clear(f"peer:{sid}")
            else:
                self.zvm.alerts.raise_(f"peer:{sid}", "ZVM0002",
                                       f"peer site {doc['peerSiteName']} ({doc['url']}) cannot "
                                       f"be reached: {why}")
        return out

    # -- wire shapes
    @staticmethod
    def link(doc: dict) -> dict:
        sid = doc["siteIdentifier"]
        return {"rel": "self", "href": f"/v1/peersites/{sid}", "type": "PeerSiteApi",
                "identifier": sid}

    def peer_site_api(self, doc: dict) -> dict:
        return {"siteIdentifier": doc["siteIdentifier"], "link": self.link(doc),
                "peerSiteName": doc["peerSiteName"], "pairingStatus": doc["pairingStatus"],
                "location": doc["location"], "hostName": doc["hostName"], "port": doc["port"],
                "provisionedStorage": 0, "usedStorage": 0, "incomingThroughputInMb": 0.0,
                "outgoingBandWidth": 0.0, "version": doc["version"], "siteType": doc["siteType"],
                "regionName": "", "url": doc["url"], "fingerprint": doc["fingerprint"],
                "isReachable": doc.get("reachable", True)}

    # -- start-up
    def on_start(self) -> None:
        self.ca.ensure()
        self.zvm.jobs.add("peers", self.zvm.cfg.peer_check_interval_s, self.check_peers)


@operation
class UnpairSites(Operation):
    """Unpair from a peer site.

        tell_peer ──(peer unreachable: noted, unpaired here only)──> forget ──> Completed
    """
    type = "UnpairSites"
    steps = ("tell_peer", "forget")
    exclusive = False

    def step_tell_peer(self):
        svc = self.zvm.services["sites"]
        sid = self.params["siteIdentifier"]
        if self.data.get("told") is not None or self.zvm.store.get("peers", sid) is None:
            return
        try:
            svc.client(sid).request("DELETE", f"{PAIR_PATH}/{self.zvm.site_id}", json={
                "isKeepTargetDisks": self.params["keepTargetDisks"]})
            self.data["told"] = True
        except (Unavailable, Unauthorized, NotFound) as exc:
            self.data["told"] = False
            self.note(f"the peer site was not told ({exc.detail}); unpaired on this site only: "
                      "unpair it there too when it is back")
        self.save()

    def step_forget(self):
        told = self.data.get("told")
        self.zvm.services["sites"].forget(
            self.params["siteIdentifier"], self.params["keepTargetDisks"],
            reason="" if told else "the peer site could not be told; unpaired here only")
        if told is False:
            self.task["completeReason"] = "unpaired on this site only: the peer site did not answer"
            self.save()


@operation
class PairSites(Operation):
    """After pairing: check the peer lists this site (through the new peer client).

        verify ──> Completed      (the peer does not list this site: Failed)
    """
    type = "PairSites"
    steps = ("verify",)
    exclusive = False

    def step_verify(self):
        sid = self.params["siteIdentifier"]
        me = self.zvm.services["sites"].client(sid).request(
            "GET", f"/v1/peersites/{self.zvm.site_id}")
        if (me or {}).get("SiteIdentifier") != self.zvm.site_id:
            raise Conflict("the peer site does not list this site as paired")
        self.note(f"site {self.params.get('name', sid)} lists this site as paired")
