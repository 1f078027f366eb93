"""Users, API clients, access tokens and roles.

- Local users (name, password, role) and API clients (client id and secret, role) created by an
  admin. Passwords and secrets are stored as scrypt hashes (stdlib ``hashlib.scrypt``; per-entry
  salt), never in clear.
- Access tokens: 32 random bytes, handed out by the OpenID-Connect token endpoint
  (``client_credentials`` and ``password`` grants) or by ``POST /v1/session/add`` (basic auth),
  stored as SHA-256 hashes with their expiry, so a copy of the store leaks no usable token.
- Roles, each including the one below it: ``viewer`` (reads), ``operator`` (everything that is
  not user or client administration), ``admin``. A paired peer ZVM gets an API client of role
  ``peer`` (site-to-site calls, which operators may also make).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

from .errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized

ROLES = ("viewer", "operator", "admin")
PEER = "peer"
RANK = {"viewer": 0, "peer": 1, "operator": 1, "admin": 2}
_N, _R, _P = 2 ** 14, 8, 1


def hash_secret(secret: str) -> str:
    salt = secrets.token_bytes(16)
    h = hashlib.scrypt(secret.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return f"scrypt${_N}${_R}${_P}${base64.b64encode(salt).decode()}${base64.b64encode(h).decode()}"


def verify_secret(secret: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, h = stored.split("$")
        assert kind == "scrypt"
        got = hashlib.scrypt(secret.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r),
                             p=int(p), dklen=32)
    except (ValueError, AssertionError):
        return False
    return hmac.compare_digest(got, base64.b64decode(h))


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Auth:
    def __init__(self, store, token_ttl_s: int = 3600):
        self.store = store
        self.ttl = token_ttl_s

    # -- users
    def add_user(self, name: str, password: str, role: str) -> dict:
        _role(role)
        if not name or len(password) < 8:
            raise BadRequest("a user needs a name and a password of at least 8 characters")
        with self.store.transaction() as c:
            if c.execute("SELECT 1 FROM users WHERE name=?", (name,)).fetchone():
                raise Conflict(f"user {name} exists")
            c.execute("INSERT INTO users VALUES (?, ?, ?, ?)",
                      (name, hash_secret(password), role, time.time()))
        return {"name": name, "role": role}

    def set_password(self, name: str, password: str) -> None:
        if len(password) < 8:
            raise BadRequest("passwords have at least 8 characters")
        if not self.store.execute("UPDATE users SET pw_hash=? WHERE name=?",
                                  (hash_secret(password), name)).rowcount:
            raise NotFound(f"no user {name}")

    def delete_user(self, name: str) -> None:
        if not self.store.execute("DELETE FROM users WHERE name=?", (name,)).rowcount:
            raise NotFound(f"no user {name}")
        self.store.execute("DELETE FROM tokens WHERE subject=?", (f"user:{name}",))

    def users(self) -> list[dict]:
        return [{"name": r["name"], "role": r["role"], "created": r["created"]}
                for r in self.store.query("SELECT * FROM users ORDER BY name")]

    # -- API clients
    def add_client(self, role: str, description: str = "", client_id: str | None = None,
                   secret: str | None = None) -> dict:
        if role != PEER:
            _role(role)
        client_id = client_id or f"tdm-{secrets.token_hex(6)}"
        secret = secret or secrets.token_urlsafe(32)
        with self.store.transaction() as c:
            if c.execute("SELECT 1 FROM clients WHERE client_id=?", (client_id,)).fetchone():
                raise Conflict(f"API client {client_id} exists")
            c.execute("INSERT INTO clients VALUES (?, ?, ?, ?, ?)",
                      (client_id, hash_secret(secret), role, description, time.time()))
        return {"client_id": client_id, "client_secret": secret, "role": role,
                "description": description}

    def delete_client(self, client_id: str) -> None:
        if not self.store.execute("DELETE FROM clients WHERE client_id=?", (client_id,)).rowcount:
            raise NotFound(f"no API client {client_id}")
        self.store.execute("DELETE FROM tokens WHERE subject=?", (f"client:{client_id}",))

    def clients(self) -> list[dict]:
        return [{"client_id": r["client_id"], "role": r["role"], "description": r["description"],
                 "created": r["created"]}
                for r in self.store.query("SELECT * FROM clients ORDER BY client_id")]

    # -- tokens
    def login_user(self, name: str, password: str) -> dict:
        row = self.store.query("SELECT * FROM users WHERE name=?", (name,))
        if not row or not verify_secret(password, row[0]["pw_hash"]):
            raise Unauthorized("wrong user name or password")
        return self._issue(f"user:{name}", row[0]["role"])

    def login_client(self, client_id: str, secret: str) -> dict:
        row = self.store.query("SELECT * FROM clients WHERE client_id=?", (client_id,))
        if not row or not verify_secret(secret, row[0]["secret_hash"]):
            raise Unauthorized("wrong client id or secret")
        return self._issue(f"client:{client_id}", row[0]["role"])

    def _issue(self, subject: str, role: str) -> dict:
        token = secrets.token_urlsafe(32)
        now = time.time()
        with self.store.transaction() as c:
            c.execute("DELETE FROM tokens WHERE expires < ?", (now,))
            c.execute("INSERT INTO tokens VALUES (?, ?, ?, ?)",
                      (_token_hash(token), subject, role, now + self.ttl))
        return {"token": token, "subject": subject, "role": role, "expires_in": self.ttl}

    def check(self, token: str) -> dict:
        """The identity behind a token, or Unauthorized."""
        row = self.store.query("SELECT * FROM tokens WHERE token_hash=?", (_token_hash(token),))
        if not row:
            raise Unauthorized("the token is unknown or was revoked: get a new one")
        if row[0]["expires"] < time.time():
            raise Unauthorized("the token has expired: get a new one")
        return {"subject": row[0]["subject"], "role": row[0]["role"]}

    def revoke(self, token: str) -> None:
        self.store.execute("DELETE FROM tokens WHERE token_hash=?", (_token_hash(token),))


def require(identity: dict, role: str) -> None:
    if RANK.get(identity["role"], -1) < RANK[role]:
        raise Forbidden(f"this needs the {role} role; {identity['subject']} is {identity['role']}")


def _role(role: str) -> None:
    if role not in ROLES:
        raise BadRequest(f"role must be one of {', '.join(ROLES)}")
