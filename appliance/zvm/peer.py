"""Calls from this ZVM to a paired peer ZVM, over HTTPS with the peer's certificate pinned.

A peer ZVM's certificate is self-signed (``tidemark zvm init`` makes it), so it is not checked
against a CA: every connection checks that the SHA-256 fingerprint of the certificate the peer
presents is the one exchanged at pairing (urllib3's ``assert_fingerprint``). The client
authenticates with the API client (role ``peer``) the peer created for this site at pairing,
fetching an access token from the peer's token endpoint and fetching a new one before it
expires (or once when the peer answers 401, e.g. after the peer restarted its token table).

    client = PeerClient(url, fingerprint, client_id, client_secret, timeout=10)
    client.request("GET", "/v1/localsite")          # the decoded JSON (None for an empty body)

Errors: ``Unavailable`` when the peer cannot be reached or its certificate is not the pinned
one; the peer's problem documents come back as the matching ``ZVMError`` (400 BadRequest,
401 Unauthorized, 403 Forbidden, 404 NotFound, 409 Conflict, 503 and other 5xx Unavailable).
"""
from __future__ import annotations

import threading
import time

import requests
from requests.adapters import HTTPAdapter

from .errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized, Unavailable, ZVMError

TOKEN_PATH = "/auth/realms/zerto/protocol/openid-connect/token"
_BY_STATUS = {400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict}


class PinnedAdapter(HTTPAdapter):
    """An HTTPS adapter that accepts exactly the certificate with this SHA-256 fingerprint."""

    def __init__(self, fingerprint: str, **kw):
        self.fingerprint = normalize_fingerprint(fingerprint)
        super().__init__(**kw)

    def init_poolmanager(self, connections, maxsize, block=False, **kw):
        kw["assert_fingerprint"] = self.fingerprint
        super().init_poolmanager(connections, maxsize, block, **kw)


def normalize_fingerprint(fp: str) -> str:
    """``AB:CD:...`` (what ``tidemark zvm init`` prints), any case, with or without colons."""
    hexdigits = fp.replace(":", "").strip().lower()
    if len(hexdigits) != 64 or any(c not in "0123456789abcdef" for c in hexdigits):
        raise BadRequest("a certificate fingerprint is the SHA-256 of the certificate: 64 hex "
                         "digits, optionally separated by colons")
    return hexdigits


def pretty_fingerprint(fp: str) -> str:
    h = normalize_fingerprint(fp).upper()
    return ":".join(h[i:i + 2] for i in range(0, 64, 2))


def pinned_session(url: str, fingerprint: str | None) -> requests.Session:
    """A session for ``url``: HTTPS pinned to ``fingerprint``; plain HTTP when the peer has TLS off."""
    s = requests.Session()
    s.trust_env = False         # no CA bundle or proxy from the environment: peers are pinned
    if url.startswith("https://"):
        if fingerprint is None:
            raise BadRequest("an HTTPS peer needs its certificate fingerprint")
        s.mount("https://", PinnedAdapter(fingerprint))
        s.verify = False        # no CA chain (self-signed): the pinned fingerprint is the check
    return s


def raise_problem(r: requests.Response, who: str) -> None:
    """Turn a problem answer of a peer into the matching ZVMError."""
    if r.status_code < 400:
        return
    try:
        body = r.json()
        detail = body.get("detail") or body.get("Message") or r.text
    except (ValueError, AttributeError):
        detail = r.text[:300]
    err = _BY_STATUS.get(r.status_code)
    if err is None:
        err = Unavailable if r.status_code >= 500 else ZVMError
    raise err(f"{who}: {detail}")


def decode(r: requests.Response):
    if not r.content:
        return None
    try:
        return r.json()
    except ValueError:
        return r.text


class PeerClient:
    """The API of one peer ZVM, as this site's ``peer`` API client."""

    def __init__(self, url: str, fingerprint: str | None, client_id: str, client_secret: str,
                 *, name: str = "peer site", timeout: float = 10.0):
        self.url = url.rstrip("/")
        self.name = name
        self.timeout = timeout
        self._fp = fingerprint
        self._cid, self._secret = client_id, client_secret
        self._token: str | None = None
        self._token_expires = 0.0
        self._lock = threading.Lock()
        self._local = threading.local()       # one session per thread (requests is not thread-safe)

    def __repr__(self) -> str:                 # never the secret or the token
        return f"PeerClient({self.url!r}, client_id={self._cid!r})"

    @property
    def http(self) -> requests.Session:
        s = getattr(self._local, "s", None)
        if s is None:
            s = self._local.s = pinned_session(self.url, self._fp)
        return s

    def _send(self, method: str, path: str, timeout: float | None, **kw) -> requests.Response:
        try:
            return self.http.request(method, self.url + path, timeout=timeout or self.timeout, **kw)
        except requests.exceptions.SSLError as exc:
            raise Unavailable(f"{self.name} at {self.url} did not present the certificate pinned "
                              f"at pairing ({exc.__class__.__name__}); if its certificate was "
                              "replaced, pair the sites again") from None
        except requests.RequestException as exc:
            raise Unavailable(f"{self.name} at {self.url} cannot be reached: "
                              f"{exc.__class__.__name__}") from None

    def token(self, force: bool = False) -> str:
        """An access token at the peer, fetched again 60 s (or half its life) before it expires."""
        with self._lock:
            if not force and self._token and time.time() < self._token_expires:
                return self._token
            r = self._send("POST", TOKEN_PATH, None, data={
                "grant_type": "client_credentials", "client_id": self._cid,
                "client_secret": self._secret})
            if r.status_code == 401:
                raise Unauthorized(f"{self.name} refused this site's credentials: the pairing was "
                                   "removed on its side; unpair and pair again")
            raise_problem(r, self.name)
            body = r.json()
            life = float(body.get("expires_in", 300))
            self._token = body["access_token"]
            self._token_expires = time.time() + max(1.0, min(life / 2, life - 60))
            return self._token

    def request(self, method: str, path: str, json=None, timeout: float | None = None):
        """Call the peer's API; the decoded JSON answer, or a ZVMError (see the module doc)."""
        for attempt in (0, 1):
            headers = {"Authorization": f"Bearer {self.token(force=attempt == 1)}"}
            r = self._send(method, path, timeout, json=json, headers=headers)
            if r.status_code == 401 and attempt == 0:
                continue                       # the token may have been revoked: once more
            raise_problem(r, self.name)
            return decode(r)
        raise AssertionError("unreachable")

    def close(self) -> None:
        s = getattr(self._local, "s", None)
        if s is not None:
            s.close()
