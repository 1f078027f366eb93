"""A small client of the ZVM REST API, for the CLI, the lab and tests.

It gets a token from the OpenID-Connect endpoint (API client credentials, or a user name and
password), refreshes it before it expires, verifies the ZVM's self-signed certificate against
the certificate file (or accepts it by SHA-256 fingerprint), and turns problem responses into
``ZVMError`` subclasses carrying the status and the server's detail.
"""
from __future__ import annotations

import hashlib
import json
import ssl
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import requests

from .errors import (BadRequest, Conflict, Forbidden, NotFound, Unauthorized, Unavailable,
                     ZVMError)

TOKEN_PATH = "/auth/realms/zerto/protocol/openid-connect/token"
_BY_STATUS = {400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
              503: Unavailable}


class ZVMClient:
    def __init__(self, url: str, *, client_id: str | None = None, client_secret: str | None = None,
                 username: str | None = None, password: str | None = None,
                 ca_cert: str | None = None, fingerprint: str | None = None,
                 insecure: bool = False, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self._cred = ({"grant_type": "client_credentials", "client_id": client_id,
                       "client_secret": client_secret} if client_id else
                      {"grant_type": "password", "username": username, "password": password})
        if not (client_id or username):
            raise Unauthorized("give API client credentials or a user name and password")
        self.timeout = timeout
        self.session = requests.Session()
        # passed on every call: a session-level verify loses to REQUESTS_CA_BUNDLE in requests
        self.verify: str | bool = True
        if fingerprint:
            self._pin(fingerprint)
        elif ca_cert:
            self.verify = ca_cert
        elif insecure:
            self.verify = False
        self._token = None
        self._expires = 0.0
        self._lock = threading.Lock()

    @classmethod
    def from_connection_file(cls, path: str | Path, **kw) -> "ZVMClient":
        """``connection.json`` as the lab writes it: url, client_id, client_secret, ca_cert."""
        c = json.loads(Path(path).read_text())
        return cls(c["url"], client_id=c.get("client_id"), client_secret=c.get("client_secret"),
                   username=c.get("username"), password=c.get("password"),
                   ca_cert=c.get("ca_cert"), **kw)

    def _pin(self, fingerprint: str) -> None:
        """Accept exactly the certificate with this SHA-256 fingerprint (self-signed ZVMs)."""
        want = fingerprint.replace(":", "").lower()
        host = urlparse(self.url)
        pem = ssl.get_server_certificate((host.hostname, host.port or 443), timeout=self.timeout)
        got = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()
        if got != want:
            raise Unauthorized(f"the ZVM at {self.url} presents a certificate with fingerprint "
                               f"{got}, not the expected {want}: refusing to talk to it")
        import tempfile
        f = tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False)
        f.write(pem)
        f.close()
        self.verify = f.name

    def token(self) -> str:
        with self._lock:
            if self._token is None or time.time() > self._expires - 30:
                try:
                    r = self.session.post(self.url + TOKEN_PATH, data=self._cred,
                                          timeout=self.timeout, verify=self.verify)
                except requests.RequestException as exc:
                    raise Unavailable(f"cannot reach the ZVM at {self.url}: {exc}") from exc
                _raise_for(r)
                body = r.json()
                self._token = body["access_token"]
                self._expires = time.time() + float(body.get("expires_in", 300))
            return self._token

    def request(self, method: str, path: str, json_body=None, params: dict | None = None,
                timeout: float | None = None):
        for attempt in (1, 2):
            try:
                r = self.session.request(method, self.url + path, json=json_body, params=params,
                                         headers={"Authorization": f"Bearer {self.token()}"},
                                         timeout=timeout or self.timeout, verify=self.verify)
            except requests.ConnectionError as exc:
                # a pooled connection the server closed meanwhile: reads are retried once
                if attempt == 1 and method == "GET":
                    continue
                raise Unavailable(f"cannot reach the ZVM at {self.url}: {exc}") from exc
            except requests.RequestException as exc:
                raise Unavailable(f"cannot reach the ZVM at {self.url}: {exc}") from exc
            if r.status_code == 401 and attempt == 1:
                self._token = None          # revoked or expired early: one fresh token
                continue
            _raise_for(r)
            if not r.content:
                return None
            if r.headers.get("Content-Type", "").startswith("application/json"):
                return r.json()
            return r.text

    def get(self, path, **params):
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path, body=None):
        return self.request("POST", path, body)

    def put(self, path, body=None):
        return self.request("PUT", path, body)

    def delete(self, path, body=None):
        return self.request("DELETE", path, body)

    def wait_task(self, task_id: str, timeout: float = 600.0, on_progress=None,
                  until_waiting: bool = True) -> dict:
        """Poll a task until it ends (or waits for the user, when ``until_waiting``)."""
        end = time.monotonic() + timeout
        while True:
            t = self.get(f"/v1/tasks/{task_id}")
            if on_progress:
                on_progress(t)
            state = t["Status"]["State"]
            if state in (4, 5, 6) or (until_waiting and state == 2):
                return t
            if time.monotonic() > end:
                raise ZVMError(f"task {task_id} still running after {timeout:.0f} s")
            time.sleep(0.5)


def site_id(client: ZVMClient, ref: str | None) -> str:
    """A virtualization site's identifier by name or identifier (None: the local site)."""
    if ref is None:
        return client.get("/v1/localsite")["SiteIdentifier"]
    for s in client.get("/v1/virtualizationsites"):
        if ref in (s["SiteIdentifier"], s.get("VirtualizationSiteName")):
            return s["SiteIdentifier"]
    raise NotFound(f"no site {ref}")


_NATIVE = {"hosts": ("HostIdentifier", "VirtualizationHostName"),
           "vms": ("VmIdentifier", "VmName"),
           "datastores": ("DatastoreIdentifier", "DatastoreName"),
           "networks": ("NetworkIdentifier", "VirtualizationNetworkName"),
           "folders": ("FolderIdentifier", "FolderName"),
           "resourcepools": ("ResourcePoolIdentifier", "ResourcepoolName")}


def native_id(client: ZVMClient, site: str, kind: str, ref: str) -> str:
    """An inventory object's identifier at a site, by name or identifier."""
    id_key, name_key = _NATIVE[kind]
    for x in client.get(f"/v1/virtualizationsites/{site}/{kind}"):
        if ref in (x.get(id_key), x.get(name_key)):
            return x[id_key]
    raise NotFound(f"no {kind[:-1]} {ref} at site {site}")


def create_vpg(client: ZVMClient, name: str, vms: list[str], recovery_site: str, host: str,
               datastore: str, network: str, test_network: str, *, rpo_s: int = 300,
               history_hours: int = 4, priority: str = "Medium", compression: bool = True) -> str:
    """Create a VPG through the vpgSettings flow; names or identifiers; answers the commit task."""
    local = site_id(client, None)
    rsite = site_id(client, recovery_site)
    settings = {
        "Basic": {"Name": name, "VpgType": "Remote", "RpoInSeconds": rpo_s,
                  "JournalHistoryInHours": history_hours, "Priority": priority,
                  "UseWanCompression": compression, "ProtectedSiteIdentifier": local,
                  "RecoverySiteIdentifier": rsite},
        "Recovery": {"DefaultHostIdentifier": native_id(client, rsite, "hosts", host),
                     "DefaultDatastoreIdentifier": native_id(client, rsite, "datastores", datastore)},
        "Networks": {
            "Failover": {"Hypervisor": {
                "DefaultNetworkIdentifier": native_id(client, rsite, "networks", network)}},
            "FailoverTest": {"Hypervisor": {
                "DefaultNetworkIdentifier": native_id(client, rsite, "networks", test_network)}}},
        "Vms": [{"VmIdentifier": native_id(client, local, "vms", v)} for v in vms],
    }
    sid = client.post("/v1/vpgSettings", settings)
    return client.post(f"/v1/vpgSettings/{sid}/commit")


def _raise_for(r: requests.Response) -> None:
    if r.status_code < 400:
        return
    try:
        body = r.json()
        detail = body.get("detail") or body.get("Message") or body.get("error_description") or r.text
    except ValueError:
        detail = r.text[:500]
    cls = _BY_STATUS.get(r.status_code, ZVMError)
    exc = cls(f"{r.status_code}: {detail}")
    exc.status = r.status_code
    raise exc
