"""VRAs of this site: one replication appliance per hypervisor host (``zvm.services["vras"]``).

A VRA is the ``tidemark-vra`` appliance VM, deployed on its host through the hypervisor
manager (``deploy_appliance``) and configured by its OVF properties (docs/vra.md, settings):

    name, token            the VRA's name and the bearer token of its control API (a random
                           secret per VRA, kept here as the internal field ``_token``)
    listen_host, control_port, replication_port
                           where it listens; the ports are chosen here once and kept, so the
                           control URL and the replication address survive host restarts and
                           upgrades
    journal_path, state_dir
                           datastore paths ``[<datastore>] Z-VRA-<host>/journal`` and
                           ``.../state``: on shared storage, kept across upgrades
    tls_cert_pem, tls_key_pem, tls_ca_pem
                           with ``vra_replication_tls``: base64 of the PEM of a certificate
                           and key issued from this site's replication CA for this deployment,
                           and of the trust bundle (own CA + paired sites' CAs). Contents, not
                           paths: the appliance runs on another machine and writes them into
                           its own state folder (appliance/vra/tls.py). The ZVM keeps no copy
                           of the key.
    doorbell, host_url     not set here: the host the appliance runs on gives them (the
                           hypervisor's IO filter is local to the host; simulator/appliances.py)

The interface other areas use::

    vras = zvm.services["vras"]
    vras.list(); vras.get(vra_id); vras.for_host(host_id)   # VRA documents: controlUrl,
                                                          # replicationHost, replicationPort
    vras.client(vra).request("GET", "/v1/status")        # the VRA control API, with its token
    vras.in_use_hooks.append(fn)   # fn(vra_doc) -> names of VPGs using it (uninstall refuses)

Background: ``monitor()`` polls each installed VRA's ``/v1/status`` (alert VRA0001 while one
does not answer). A VRA whose trust bundle is out of date after a pairing change is sent the new
bundle through its control API (``PUT /v1/tls/trust``) and restarted to use it.
"""
from __future__ import annotations

import base64
import logging
import secrets
import shutil
import threading
import time

import requests

from ..ports import free_port
from .errors import BadRequest, Conflict, NotFound, Unavailable, ZVMError
from .inventory import hv_errors
from .peer import decode, raise_problem

log = logging.getLogger("tidemark.zvm.vras")

# VraStatusApi 0..10 (the integer is what the wire carries)
VRA_STATUSES = ["Installed", "UnsupportedEsxVersion", "NotInstalled", "Installing", "Removing",
                "InstallationError", "HostPasswordChanged", "UpdatingIpSettings",
                "DuringChangeHost", "HostInMaintenanceMode", "Upgrading"]
INSTALLED, INSTALLING, REMOVING, INSTALL_ERROR, UPGRADING = 0, 3, 4, 5, 10
IP_CONFIG_TYPES = ["Dhcp", "Static"]
IMAGE = "tidemark-vra"


class VraClient:
    """The control API of one VRA (docs/vra.md), with its bearer token."""

    def __init__(self, url: str, token: str, name: str = "VRA", timeout: float = 10.0):
        self.url, self.name, self.timeout = url.rstrip("/"), name, timeout
        self._token = token
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"VraClient({self.url!r})"

    def request(self, method: str, path: str, json=None, timeout: float | None = None):
        s = getattr(self._local, "s", None)
        if s is None:
            s = self._local.s = requests.Session()
            s.trust_env = False
        try:
            r = s.request(method, self.url + path, json=json, timeout=timeout or self.timeout,
                          headers={"Authorization": f"Bearer {self._token}"})
        except requests.RequestException as exc:
            raise Unavailable(f"{self.name} at {self.url} does not answer: "
                              f"{exc.__class__.__name__}") from None
        raise_problem(r, self.name)
        return decode(r)


class VrasService:
    def __init__(self, zvm):
        self.zvm = zvm
        self.store = zvm.store
        self.in_use_hooks: list = []      # fn(vra_doc) -> [VPG names using this VRA]
        self._clients: dict[str, VraClient] = {}

    # -- the interface other areas build on
    def list(self) -> list[dict]:
        return self.store.all("vras")

    def get(self, vra_id: str) -> dict:
        doc = self.store.get("vras", vra_id)
        if doc is None:
            raise NotFound(f"no VRA {vra_id}: GET /v1/vras lists them")
        return doc

    def for_host(self, host_id: str) -> dict | None:
        return next((v for v in self.list() if v["hostIdentifier"] == host_id), None)

    def client(self, vra: dict | str) -> VraClient:
        doc = self.get(vra) if isinstance(vra, str) else vra
        c = self._clients.get(doc["vraIdentifier"])
        if c is None or c.url != doc["controlUrl"]:
            c = VraClient(doc["controlUrl"], doc["_token"], f"VRA {doc['vraName']}",
                          self.zvm.cfg.peer_timeout_s)
            self._clients[doc["vraIdentifier"]] = c
        return c

    def in_use(self, doc: dict) -> list[str]:
        names: list[str] = []
        for hook in self.in_use_hooks:
            names += list(hook(doc) or [])
        return names

    # -- requests
    def install(self, b: dict, user: str = "") -> dict:
        hv = self.zvm.hypervisor
        with hv_errors():
            hosts = {h.id: h for h in hv.hosts()}
            dss = {d.id: d for d in hv.datastores()}
            nets = {n.id: n for n in hv.networks()}
        host, ds, net = (hosts.get(b["hostIdentifier"]), dss.get(b["datastoreIdentifier"]),
                         nets.get(b["networkIdentifier"]))
        for what, found, given in (("host", host, b["hostIdentifier"]),
                                   ("datastore", ds, b["datastoreIdentifier"]),
                                   ("network", net, b["networkIdentifier"])):
            if found is None:
                raise BadRequest(f"this site has no {what} {given!r}: GET "
                                 f"/v1/virtualizationsites/{self.zvm.site_id}/{what}s lists them")
        mem = 3 if b.get("memoryInGb") is None else b["memoryInGb"]
        cpus = 1 if b.get("numOfCpus") is None else b["numOfCpus"]
        if not (1 <= mem <= 64) or not (1 <= cpus <= 8):
            raise BadRequest("memoryInGb must be 1..64 and numOfCpus 1..8")
        netdata = b.get("vraNetworkDataApi") or {}
        iptype = netdata.get("vraIPConfigurationTypeApi") or "Dhcp"
        if iptype not in IP_CONFIG_TYPES:
            raise BadRequest(f"vraNetworkDataApi.vraIPConfigurationTypeApi must be one of "
                             f"{IP_CONFIG_TYPES}")
        if iptype == "Static" and not netdata.get("vraIPAddress"):
            raise BadRequest("a Static IP configuration needs vraNetworkDataApi.vraIPAddress")
        listen = "127.0.0.1"          # the lab's VRAs listen on loopback (docs/zvm.md, VRAs)
        name = f"Z-VRA-{host.name}"
        vid = f"vra-{secrets.token_hex(6)}"
        tls = self.zvm.cfg.vra_replication_tls
        taken = {d.get(k) for d in self.list() for k in ("controlPort", "replicationPort")}
        control = free_port(listen, taken)
        doc = {"vraIdentifier": vid, "vraName": name, "hostIdentifier": host.id,
               "hostName": host.name, "datastoreIdentifier": ds.id, "datastoreName": ds.name,
               "networkIdentifier": net.id, "networkName": net.name, "memoryInGb": mem,
               "numOfCpus": cpus, "groupName": b.get("groupName") or "",
               "vraNetworkDataApi": {"vraIPConfigurationTypeApi": iptype,
                                     "vraIPAddress": netdata.get("vraIPAddress") or "",
                                     "vraIPAddressRangeEnd": netdata.get("vraIPAddressRangeEnd") or "",
                                     "subnetMask": netdata.get("subnetMask") or "",
                                     "defaultGateway": netdata.get("defaultGateway") or ""},
               "status": INSTALLING, "progress": 0, "vraVersion": "", "vmId": None,
               "listenHost": listen, "controlPort": control,
               "replicationPort": free_port(listen, taken | {control}), "replicationHost": listen,
               "journalPath": f"[{ds.name}] {name}/journal", "stateDir": f"[{ds.name}] {name}/state",
               "tls": tls, "reachable": False, "counters": {}, "_token": secrets.token_urlsafe(32)}
        doc["controlUrl"] = f"http://{listen}:{doc['controlPort']}"
        with self.store.transaction():
            if self.for_host(host.id) is not None:
                raise Conflict(f"host {host.name} has a VRA already")
            self.store.put("vras", vid, doc)
        return self.zvm.tasks.submit("InstallVra", {"vraIdentifier": vid}, user=user)

    def edit(self, vra_id: str, b: dict, user: str = "") -> dict:
        doc = self.get(vra_id)
        for k in ("memoryInGb", "numOfCpus"):
            if b.get(k) is not None and not (1 <= b[k] <= (64 if k == "memoryInGb" else 8)):
                raise BadRequest("memoryInGb must be 1..64 and numOfCpus 1..8")
        if doc["status"] not in (INSTALLED, INSTALL_ERROR):
            raise Conflict(f"VRA {doc['vraName']} is {VRA_STATUSES[doc['status']]}: wait for it")
        return self.zvm.tasks.submit("EditVra", {"vraIdentifier": vra_id, "changes": b}, user=user)

    def uninstall(self, vra_id: str, user: str = "") -> dict:
        with self.store.transaction():
            doc = self.get(vra_id)
            if doc["status"] in (INSTALLING, REMOVING, UPGRADING):
                raise Conflict(f"VRA {doc['vraName']} is {VRA_STATUSES[doc['status']]}: wait")
            used = self.in_use(doc)
            if used:
                raise Conflict(f"VRA {doc['vraName']} is used by VPG(s) {', '.join(used)}: "
                               "delete them or change their recovery host first")
            doc["status"] = REMOVING
            self.store.put("vras", vra_id, doc)
        return self.zvm.tasks.submit("UninstallVra", {"vraIdentifier": vra_id}, user=user)

    def upgrade(self, vra_id: str, user: str = "") -> dict:
        with self.store.transaction():
            doc = self.get(vra_id)
            if doc["status"] not in (INSTALLED, INSTALL_ERROR):
                raise Conflict(f"VRA {doc['vraName']} is {VRA_STATUSES[doc['status']]}: wait")
            doc["status"] = UPGRADING
            self.store.put("vras", vra_id, doc)
        return self.zvm.tasks.submit("UpgradeVra", {"vraIdentifier": vra_id}, user=user)

    # -- deploying (the operations' steps use these)
    def trust_bundle(self) -> tuple[str, str]:
        """This site's trust bundle for VRAs (own CA + paired sites' CAs): PEM text, hash."""
        sites = self.zvm.services.get("sites")
        return sites.ca.bundle(sites.peer_cas())

    def tls_properties(self, doc: dict) -> dict:
        """The VRA's TLS material as OVF properties (base64 of PEM): a certificate and key issued
        now from this site's replication CA, only for this deployment (the ZVM keeps no copy of
        the key: it lives in the appliance's properties and the VRA's own TLS folder), and the
        trust bundle; ``_trust`` is the bundle's hash (the caller keeps it, not a property)."""
        sites = self.zvm.services.get("sites")
        cert, key = sites.ca.issue_pem(hosts=(doc["listenHost"], "127.0.0.1", "localhost"))
        text, digest = self.trust_bundle()
        return {"tls_cert_pem": b64(cert), "tls_key_pem": b64(key), "tls_ca_pem": b64(text),
                "_trust": digest}

    def properties(self, doc: dict) -> dict:
        props = {"name": doc["vraName"], "token": doc["_token"], "listen_host": doc["listenHost"],
                 "control_port": str(doc["controlPort"]),
                 "replication_port": str(doc["replicationPort"]),
                 "journal_path": doc["journalPath"], "state_dir": doc["stateDir"]}
        if doc.get("tls"):
            tls = self.tls_properties(doc)
            doc["_trust"] = tls.pop("_trust")
            props.update(tls)
        return props

    def drop_local_tls(self, doc: dict) -> None:
        """Remove ``<data_dir>/vras/<id>/`` (certificate, key and bundle files that ZVMs before
        content-carrying properties wrote for the VRA): a VRA deployed since does not use them."""
        d = self.zvm.cfg.path("vras") / doc["vraIdentifier"]
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)

    def deploy(self, doc: dict) -> str:
        """Deploy the appliance VM (or adopt the one a crashed earlier attempt left); its id."""
        hv = self.zvm.hypervisor
        with hv_errors():
            for vm in hv.vms():
                if vm.name == doc["vraName"] and vm.image == IMAGE:
                    return vm.id
            return hv.deploy_appliance(IMAGE, doc["vraName"], doc["hostIdentifier"],
                                       doc["datastoreIdentifier"], doc["networkIdentifier"],
                                       self.properties(doc), power_on=True)

    def remove_vm(self, doc: dict) -> None:
        from .hypervisor import NotFound as HvNotFound
        hv = self.zvm.hypervisor
        with hv_errors():
            ids = {doc.get("vmId")} | {v.id for v in hv.vms()
                                       if v.name == doc["vraName"] and v.image == IMAGE}
            for vm_id in ids - {None}:
                try:
                    hv.remove_appliance(vm_id)
                except HvNotFound:
                    pass

    def wait_ready(self, doc: dict, stopping: threading.Event) -> dict:
        deadline = time.monotonic() + self.zvm.cfg.vra_install_timeout_s
        last = None
        while time.monotonic() < deadline:
            try:
                return self.client(doc).request("GET", "/v1/status", timeout=3)
            except ZVMError as exc:
                last = exc
            if stopping.wait(0.3):
                raise Unavailable("the ZVM is stopping")
        raise Unavailable(f"VRA {doc['vraName']} did not answer at {doc['controlUrl']} within "
                          f"{self.zvm.cfg.vra_install_timeout_s:.0f} s ({last}); its appliance "
                          "console log says why")

    # -- monitoring
    def monitor(self) -> dict[str, bool]:
        """One pass: poll every installed VRA (VRA0001 while it does not answer), and restart
        those whose trust bundle lacks a site paired since (or has one unpaired since)."""
        out = {}
        sites = self.zvm.services.get("sites")
        trust = sites.ca.bundle(sites.peer_cas())[1] if sites else None
        for doc in self.list():
            if doc["status"] != INSTALLED:
                continue
            vid = doc["vraIdentifier"]
            try:
                st = self.client(doc).request("GET", "/v1/status", timeout=3)
                ok, why = True, ""
            except ZVMError as exc:
                st, ok, why = None, False, exc.detail
            out[vid] = ok
            try:
                with self.store.update("vras", vid) as d:
                    d["reachable"] = ok
                    if st:
                        d["counters"] = counters(st)
                        d["lastSeen"] = time.time()
            except KeyError:
                continue
            if ok:
                self.zvm.alerts.clear(f"vra:{vid}")
                if doc.get("tls") and trust and doc.get("_trust") != trust:
                    try:
                        self.update_trust(doc, "the paired sites changed")
                    except ZVMError as exc:          # tried again at the next pass
                        log.warning("VRA %s: trust bundle update failed: %s", doc["vraName"],
                                    exc.detail)
            else:
                gone = " (its appliance VM was removed outside Tidemark)" if doc.get("vmMissing") else ""
                self.zvm.alerts.raise_(f"vra:{vid}", "VRA0001",
                                       f"VRA {doc['vraName']} on host {doc['hostName']} does not "
                                       f"answer{gone}: {why}")
        return out

    def update_trust(self, doc: dict, why: str) -> None:
        """Send a VRA the current trust bundle (``PUT /v1/tls/trust``, authenticated with its
        token; the VRA keeps it in its own TLS folder) and power-cycle its appliance so that it
        uses it (a VRA loses nothing by a restart). The bundle's hash is recorded once both are
        done, so a failure is tried again by the next monitor pass."""
        text, digest = self.trust_bundle()
        got = self.client(doc).request("PUT", "/v1/tls/trust", json={"pem": b64(text)}) or {}
        if not str(got.get("sha256", "")).startswith(digest):
            raise Unavailable(f"VRA {doc['vraName']} kept another trust bundle than the one sent")
        self.restart(doc, why)
        with self.store.update("vras", doc["vraIdentifier"]) as d:
            d["_trust"] = digest

    def restart(self, doc: dict, why: str) -> None:
        """Power-cycle a VRA's appliance (same properties; a VRA loses nothing by it)."""
        hv = self.zvm.hypervisor
        with hv_errors():
            hv.power_off(doc["vmId"])
            hv.power_on(doc["vmId"])
        self.zvm.events.record("UpgradeVra", f"VRA {doc['vraName']} restarted: {why}",
                               entity="VRA")

    def on_change(self, change) -> None:
        """Inventory subscriber: follow VRA appliance VMs that moved or vanished."""
        for doc in self.list():
            if doc.get("vmId") != change.id:
                continue
            with self.store.update("vras", doc["vraIdentifier"]) as d:
                if change.kind == "vm_removed" and d["status"] == INSTALLED:
                    d["vmMissing"] = True
                elif change.kind == "vm_moved":
                    d["applianceHostIdentifier"] = change.new
                elif change.kind == "vm_added":
                    d.pop("vmMissing", None)

    def on_start(self) -> None:
        self.zvm.jobs.add("vras", self.zvm.cfg.vra_check_interval_s, self.monitor)
        inv = self.zvm.services.get("inventory")
        if inv is not None:
            inv.subscribe(self.on_change)

    # -- wire shape
    def vra_api(self, doc: dict) -> dict:
        from .service import VERSION
        c = doc.get("counters") or {}
        vid = doc["vraIdentifier"]
        up = doc["status"] == INSTALLED and doc.get("reachable")
        return {
            "vraIdentifier": vid,
            "link": {"rel": "self", "href": f"/v1/vras/{vid}", "type": "VraApi", "identifier": vid},
            "vraName": doc["vraName"], "status": doc["status"],
            "upgradeStatus": 0 if doc.get("vraVersion") == VERSION else 1,
            "progress": doc.get("progress", 0), "vraVersion": doc.get("vraVersion", ""),
            "vraDisplayVersion": doc.get("vraVersion", ""), "hostVersion": "",
            "vraNetworkDataApi": doc["vraNetworkDataApi"], "vraGroup": doc["groupName"],
            "memoryInGB": doc["memoryInGb"], "datastoreName": doc["datastoreName"],
            "datastoreIdentifier": doc["datastoreIdentifier"], "vmInstanceType": "",
            "datastoreClusterName": None, "datastoreClusterIdentifier": None,
            "networkName": doc["networkName"], "networkIdentifier": doc["networkIdentifier"],
            "hostIdentifier": doc["hostIdentifier"], "hostDisplayName": doc["hostName"],
            "protectedCounters": c.get("protected", {"vpgs": 0, "vms": 0, "volumes": 0}),
            "recoveryCounters": c.get("recovery", {"vpgs": 0, "vms": 0, "volumes": 0}),
            "selfProtectedVpgs": 0,
            "vraAlerts": {"vraAlertsStatus": 0 if up or doc["status"] != INSTALLED else 2},
            "numOfCpus": doc["numOfCpus"], "isGhost": False, "isVaio": True,
            "platformInformation": None,
            "isReachable": bool(up), "controlUrl": doc["controlUrl"],
            "replicationAddress": f"{doc['replicationHost']}:{doc['replicationPort']}",
            "vmIdentifier": doc.get("vmId"),
        }


def b64(pem: bytes | str) -> str:
    """An OVF property value holding PEM: base64 on one line (appliance/vra/tls.py decodes it)."""
    return base64.b64encode(pem.encode() if isinstance(pem, str) else pem).decode()


def counters(status: dict) -> dict:
    """VraProtectionCountersApi values from a VRA's /v1/status."""
    prot = (status.get("protected") or {}).get("vpgs") or {}
    rec = (status.get("recovery") or {}).get("vpgs") or {}
    return {"protected": {"vpgs": len(prot), "vms": 0, "volumes": 0},
            "recovery": {"vpgs": len(rec), "vms": 0, "volumes": 0}}

