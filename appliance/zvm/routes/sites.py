"""The local site, peer sites (pairing), and the virtualization inventory of every site."""
from __future__ import annotations

import time
from urllib.parse import quote

from ..errors import Forbidden, NotFound
from ..inventory import InventoryService, proxied
from ..schema import BOOL, INT, STR, obj
from ..service import API_VERSION, VERSION
from ..sites import PAIRING_STATUSES, SitesService


def local_site(zvm) -> dict:
    kind = zvm.cfg.site_kind
    return {
        "siteIdentifier": zvm.site_id,
        "link": zvm.site_link(), "siteName": zvm.cfg.site_name, "location": zvm.cfg.site_location,
        "version": VERSION, "displayVersion": VERSION, "zvmApiVersion": API_VERSION,
        "contactEmail": "", "contactName": "", "contactPhone": "",
        "isReplicationToSelfEnabled": True,
        "utcOffsetInMinutes": int(-time.timezone / 60),
        "siteType": "VCenter" if kind == "vsphere" else "SCVMM",
        "ipAddress": zvm.cfg.public_host or zvm.cfg.listen_host,
        "bandwidthThrottlingInMBs": 0,
        "siteTypeVersion": "", "platformInformation": None,
        "isLoginBannerEnabled": False, "loginBanner": "",
    }


def register(api, zvm):
    sites = zvm.services.setdefault("sites", SitesService(zvm))
    inventory = zvm.services.setdefault("inventory", InventoryService(zvm))

    api.schema("PairDataApi", obj(("hostName", "port", "token"), hostName=STR, port=INT,
                                  token=STR, fingerprint=STR))
    api.schema("UnPairDataApi", obj(isKeepTargetDisks=BOOL))
    api.schema("SitePairRequest", obj(
        ("token", "siteIdentifier", "siteName", "url", "clientId", "clientSecret"),
        token=STR, siteIdentifier=STR, siteName=STR, location=STR, url=STR, fingerprint=STR,
        version=STR, siteType=STR, clientId=STR, clientSecret=STR, vraCa=STR))

    # -- the local site
    @api.route("GET", "/v1/localsite", "This site", response="LocalSiteApi")
    def localsite(req):
        return local_site(zvm)

    @api.route("GET", "/v1/localsite/pairingstatuses", "Pairing status names",
               response="[string]")
    def local_pairing_statuses(req):
        return PAIRING_STATUSES

    # -- peer sites
    @api.route("GET", "/v1/peersites", "Paired sites", response="[PeerSiteApi]", query={
        "peerName": STR, "pairingStatus": STR, "location": STR, "hostName": STR, "port": INT})
    def peersites(req):
        q = req.query
        out = []
        for doc in sites.peers():
            p = sites.peer_site_api(doc)
            if "peerName" in q and q["peerName"].lower() != p["peerSiteName"].lower():
                continue
            if "pairingStatus" in q and q["pairingStatus"].lower() not in (
                    str(p["pairingStatus"]), PAIRING_STATUSES[p["pairingStatus"]].lower()):
                continue
            if "location" in q and q["location"].lower() != p["location"].lower():
                continue
            if "hostName" in q and q["hostName"].lower() != p["hostName"].lower():
                continue
            if "port" in q and q["port"] != p["port"]:
                continue
            out.append(p)
        return out

    @api.route("GET", "/v1/peersites/pairingstatuses", "Pairing status names",
               response="[string]")
    def pairing_statuses(req):
        return PAIRING_STATUSES

    @api.route("POST", "/v1/peersites/generatetoken", "A one-time pairing token for a peer "
               "site to pair with this one (and this ZVM's certificate fingerprint)",
               response="PairingTokenResult")
    def generatetoken(req):
        return sites.generate_token()

    @api.route("POST", "/v1/peersites", "Pair with the site whose ZVM generated the token "
               "(Fingerprint: pin its certificate; without it, the one it presents now)",
               body="PairDataApi", response="string")
    def pair(req):
        b = req.body
        doc = sites.pair(b["hostName"], b["port"], b["token"], b.get("fingerprint"),
                         user=req.user)
        task = zvm.tasks.submit("PairSites", {"siteIdentifier": doc["siteIdentifier"],
                                              "name": doc["peerSiteName"]},
                                user=req.user, related_sites=[sites.link(doc)])
        return task["identifier"]

    @api.route("GET", "/v1/peersites/{siteIdentifier}", "A paired site", response="PeerSiteApi")
    def peersite(req, siteIdentifier):
        return sites.peer_site_api(sites.peer(siteIdentifier))

    @api.route("DELETE", "/v1/peersites/{siteIdentifier}", "Unpair (both sites; this one only "
               "if the peer does not answer)", body="UnPairDataApi", body_required=False,
               response="string")
    def unpair(req, siteIdentifier):
        keep = bool((req.body or {}).get("isKeepTargetDisks", False))
        return sites.unpair(siteIdentifier, keep, user=req.user)["identifier"]

    # -- site to site
    @api.route("POST", "/v1/peersites/pair", "Site to site: accept a pairing (authenticated by "
               "the one-time pairing token only)", tag="peersites", public=True,
               body="SitePairRequest")
    def accept(req):
        return sites.accept(req.body)

    @api.route("DELETE", "/v1/peersites/pair/{siteIdentifier}", "Site to site: the peer "
               "unpairs from this site", tag="peersites", role="peer", body="UnPairDataApi",
               body_required=False)
    def peer_unpairs(req, siteIdentifier):
        if not sites.is_peer_client(req.identity, siteIdentifier):
            if zvm.store.get("peers", siteIdentifier) is None:
                raise NotFound(f"no paired site {siteIdentifier}")
            raise Forbidden("only the paired site itself may unpair this way; operators use "
                            "DELETE /v1/peersites/{siteIdentifier}")
        sites.forget(siteIdentifier, bool((req.body or {}).get("isKeepTargetDisks", False)),
                     reason="on the peer site's request")

    # -- virtualization sites: this one, and each paired one through its ZVM
    def local_or_peer(site_id: str, path: str, local):
        if site_id == zvm.site_id:
            return local()
        sites.peer(site_id)                     # 404 unless paired
        return proxied(zvm, site_id, path)

    @api.route("GET", "/v1/virtualizationsites", "This site and the paired sites",
               response="[VirtualizationSiteApi]")
    def vsites(req):
        return [inventory.site_api()] + [
            {"siteIdentifier": p["siteIdentifier"], "virtualizationSiteName": p["peerSiteName"]}
            for p in sites.peers()]

    @api.route("GET", "/v1/virtualizationsites/{siteIdentifier}", "One virtualization site",
               response="VirtualizationSiteApi")
    def vsite(req, siteIdentifier):
        if siteIdentifier == zvm.site_id:
            return inventory.site_api()
        p = sites.peer(siteIdentifier)
        return {"siteIdentifier": p["siteIdentifier"], "virtualizationSiteName": p["peerSiteName"]}

    def inventory_route(suffix: str, schema: str, local):
        path = "/v1/virtualizationsites/{siteIdentifier}/" + suffix

        def view(req, siteIdentifier):
            return local_or_peer(siteIdentifier, f"/v1/virtualizationsites/{siteIdentifier}/"
                                 f"{suffix}", local)
        view.__name__ = f"vsite_{suffix}"
        api.route("GET", path, f"The site's {suffix}", response=f"[{schema}]")(view)

    inventory_route("hosts", "HostNativeApi", inventory.hosts)
    inventory_route("datastores", "DatastoreNativeApi", inventory.datastores)
    inventory_route("networks", "NetworkNativeApi", inventory.networks)
    inventory_route("folders", "FolderNativeApi", inventory.folders)
    inventory_route("resourcepools", "ResourcePoolNativeApi", inventory.resource_pools)
    inventory_route("hostclusters", "HostClusterNativeApi", inventory.clusters)
    inventory_route("vms", "VmNativeApi", inventory.vms)
    inventory_route("datastoreclusters", "DatastoreClusterNativeApi", lambda: [])
    inventory_route("repositories", "BackupTargetInfoRepositoriesApi", lambda: [])

    @api.route("GET", "/v1/virtualizationsites/{siteIdentifier}/devices", "Raw devices "
               "(none: Tidemark protects virtual disks only)", response="[DeviceDataApi]",
               query={"hostIdentifier": STR, "deviceName": STR})
    def devices(req, siteIdentifier):
        return local_or_peer(siteIdentifier, f"/v1/virtualizationsites/{siteIdentifier}/devices",
                             lambda: [])

    @api.route("GET", "/v1/virtualizationsites/{siteIdentifier}/hosts/{hostIdentifier}",
               "One host", response="HostNativeApi")
    def vsite_host(req, siteIdentifier, hostIdentifier):
        return local_or_peer(siteIdentifier, f"/v1/virtualizationsites/{siteIdentifier}/hosts/"
                             f"{quote(hostIdentifier, safe='')}", lambda: inventory.host(hostIdentifier))

    # -- datastores of this site
    @api.route("GET", "/v1/datastores", "This site's datastores", response="[DatastoreApi]")
    def datastores(req):
        return inventory.datastore_api()

    @api.route("GET", "/v1/datastores/{datastoreIdentifier}", "One datastore",
               response="DatastoreApi")
    def datastore(req, datastoreIdentifier):
        return inventory.datastore_api(datastoreIdentifier)[0]
