"""Token endpoints (OpenID-Connect path of the reference API, and the older session call), and
the administration of users and API clients (admin role)."""
from __future__ import annotations

import base64
import json

from flask import Response, request

from ..errors import BadRequest, Unauthorized
from ..schema import STR, enum, obj

TOKEN_PATH = "/auth/realms/zerto/protocol/openid-connect/token"


def register(api, zvm):
    api.schema("TokenRequest", obj(
        grant_type=enum("client_credentials", "password"), client_id=STR, client_secret=STR,
        username=STR, password=STR))
    api.schema("UserCreate", obj(("name", "password", "role"), name=STR, password=STR,
                                 role=enum("viewer", "operator", "admin")))
    api.schema("PasswordChange", obj(("password",), password=STR))
    api.schema("ClientCreate", obj(("role",), role=enum("viewer", "operator", "admin"),
                                   description=STR, clientId=STR))

    @api.route("POST", TOKEN_PATH, "Get an access token (client_credentials or password grant)",
               tag="auth", public=True, response="SuccessTokenResult", raw=True)
    def token(req):
        if request.mimetype == "application/json":
            data = request.get_json(silent=True)
            if not isinstance(data, dict):
                raise BadRequest("send the token request as a form or a JSON object")
        else:
            data = request.form.to_dict()
        grant = data.get("grant_type")
        if grant == "client_credentials":
            cid, secret = data.get("client_id"), data.get("client_secret")
            if not isinstance(cid, str) or not isinstance(secret, str):
                raise BadRequest("client_credentials needs client_id and client_secret")
            issued = zvm.auth.login_client(cid, secret)
        elif grant == "password":
            user, pw = data.get("username"), data.get("password")
            if not isinstance(user, str) or not isinstance(pw, str):
                raise BadRequest("the password grant needs username and password")
            issued = zvm.auth.login_user(user, pw)
        else:
            raise BadRequest("grant_type must be client_credentials or password")
        return Response(json.dumps({
            "access_token": issued["token"], "expires_in": issued["expires_in"],
            "refresh_expires_in": 0, "refresh_token": "", "token_type": "Bearer",
            "not-before-policy": 0, "session_state": "", "scope": "profile email"}),
            mimetype="application/json", headers={"Cache-Control": "no-store"})

    @api.route("POST", "/v1/session/add", "Get a session token with HTTP basic auth "
               "(answered in the x-zerto-session header)", tag="auth", public=True, raw=True)
    def session_add(req):
        h = request.headers.get("Authorization", "")
        if h[:6].lower() != "basic ":
            raise Unauthorized("send HTTP basic auth (user name and password)")
        try:
            user, _, pw = base64.b64decode(h[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise Unauthorized("the basic auth header is malformed") from None
        issued = zvm.auth.login_user(user, pw)
        return Response(json.dumps({"SessionId": issued["token"]}), mimetype="application/json",
                        headers={"x-zerto-session": issued["token"], "Cache-Control": "no-store"})

    @api.route("GET", "/v1/users", "Local users", role="admin", response="[User]")
    def users(req):
        return zvm.auth.users()

    @api.route("POST", "/v1/users", "Add a local user", role="admin", body="UserCreate", status=201)
    def add_user(req):
        b = req.body
        out = zvm.auth.add_user(b["name"], b["password"], b["role"])
        zvm.events.record("UserAdded", f"user {b['name']} ({b['role']}) added", user=req.user)
        return out

    @api.route("PUT", "/v1/users/{userName}/password", "Change a user's password", role="admin",
               body="PasswordChange")
    def set_password(req, userName):
        zvm.auth.set_password(userName, req.body["password"])

    @api.route("DELETE", "/v1/users/{userName}", "Delete a local user", role="admin")
    def delete_user(req, userName):
        zvm.auth.delete_user(userName)

    def client_doc(c: dict) -> dict:
        out = {"clientId": c["client_id"], "role": c["role"], "description": c["description"]}
        if "client_secret" in c:
            out["clientSecret"] = c["client_secret"]
        return out

    @api.route("GET", "/v1/clients", "API clients", role="admin", response="[Client]")
    def clients(req):
        return [client_doc(c) for c in zvm.auth.clients()]

    @api.route("POST", "/v1/clients", "Create an API client (the secret is shown once)",
               role="admin", body="ClientCreate", status=201)
    def add_client(req):
        b = req.body
        out = zvm.auth.add_client(b["role"], b.get("description") or "", b.get("clientId"))
        zvm.events.record("ClientAdded", f"API client {out['client_id']} ({b['role']}) created",
                          user=req.user)
        return client_doc(out)

    @api.route("DELETE", "/v1/clients/{clientId}", "Delete an API client", role="admin")
    def delete_client(req, clientId):
        zvm.auth.delete_client(clientId)
