"""The route registry: every ``/v1`` route is declared once, with its query parameters, body
schema, response and role; from that declaration come the Flask URL rule, the request
validation, the authentication check and the OpenAPI 3 document (``/v1/openapi.json``), so the
document covers every route by construction (and a test checks it against Flask's URL map).

A view is ``view(req, **path_params)`` and returns a document (spelled PascalCase on the wire),
a string (a task identifier, as the reference API answers), ``None`` (an empty 200), or
``(doc, status)``. It raises ``ZVMError`` subclasses for problems.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Callable

from flask import Response, g, request

from .errors import BadRequest
from .schema import pascal, validate

_PARAM = re.compile(r"{(\w+)}")


@dataclass
class Route:
    method: str
    path: str                  # OpenAPI form: /v1/alerts/{alertIdentifier}
    view: Callable
    summary: str
    tag: str
    query: dict = field(default_factory=dict)     # name -> schema
    body: str | None = None                       # schema name in Api.schemas
    body_required: bool = True
    response: str | None = None                   # schema name, "[Name]" for a list, "string"
    role: str | None = None                       # None: viewer for GET, operator otherwise
    public: bool = False                          # no token needed (token endpoints)
    raw: bool = False                             # the view returns a Flask response itself
    status: int = 200

    @property
    def flask_path(self) -> str:
        return _PARAM.sub(r"<\1>", self.path)

    @property
    def needed_role(self) -> str:
        return self.role or ("viewer" if self.method == "GET" else "operator")


class Req:
    """What a view gets: the validated body and query, and who is asking."""
    def __init__(self, body, query: dict, identity: dict | None):
        self.body = body
        self.query = query
        self.identity = identity

    @property
    def user(self) -> str:
        return (self.identity or {}).get("subject", "anonymous").split(":", 1)[-1]


class Api:
    def __init__(self):
        self.routes: list[Route] = []
        self.schemas: dict[str, dict] = {}

    def schema(self, name: str, s: dict) -> str:
        self.schemas[name] = s
        return name

    def route(self, method: str, path: str, summary: str, *, tag: str | None = None, **kw):
        def deco(fn):
            self.routes.append(Route(method.upper(), path, fn, summary,
                                     tag or path.split("/")[2], **kw))
            return fn
        return deco

    # -- Flask wiring
    def install(self, app, authenticate: Callable[[Route], dict | None]) -> None:
        for r in self.routes:
            app.add_url_rule(r.flask_path, endpoint=f"{r.method} {r.path}",
                             view_func=self._wrap(r, authenticate), methods=[r.method])

    def _wrap(self, r: Route, authenticate):
        def view(**params):
            identity = authenticate(r)
            g.identity = identity
            query = _query(r)
            body = None
            if r.body:
                body = _body(r, self.schemas[r.body])
            out = r.view(Req(body, query, identity), **params)
            if r.raw:
                return out
            status = r.status
            if isinstance(out, tuple):
                out, status = out
            return Response(json.dumps(pascal(out)), status=status, mimetype="application/json")
        view.__name__ = f"{r.method}_{r.path}"
        return view

    # -- OpenAPI
    def openapi(self, version: str) -> dict:
        paths: dict = {}
        for r in self.routes:
            op = {"operationId": f"{r.method.lower()}{_camel(r.path)}", "summary": r.summary,
                  "tags": [r.tag], "parameters": [], "responses": {}}
            for p in _PARAM.findall(r.path):
                op["parameters"].append({"name": p, "in": "path", "required": True,
                                         "schema": {"type": "string"}})
            for name, s in r.query.items():
                op["parameters"].append({"name": name, "in": "query", "required": False,
                                         "schema": s})
            if r.body:
                op["requestBody"] = {"required": r.body_required, "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{r.body}"}}}}
            ok = {"description": "OK"}
            if r.response and not r.raw:
                ok["content"] = {"application/json": {"schema": _resp_schema(r.response)}}
            op["responses"][str(r.status)] = ok
            for code, what in ((400, "malformed request"), (401, "no or bad token"),
                               (403, "role too low"), (404, "no such object"),
                               (409, "wrong state")):
                if r.public and code in (401, 403):
                    continue
                op["responses"][str(code)] = {"description": what, "content": {
                    "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
            if r.public:
                op["security"] = []
            paths.setdefault(r.path, {})[r.method.lower()] = op
        schemas = dict(self.schemas)
        schemas["Problem"] = {"type": "object", "properties": {
            "title": {"type": "string"}, "detail": {"type": "string"},
            "status": {"type": "integer"}, "Message": {"type": "string"}}}
        return {
            "openapi": "3.0.3",
            "info": {"title": "Tidemark ZVM REST API", "version": version,
                     "description": "Compatible with the ZVM REST API v1 (docs/zvm-api.md). "
                                    "Responses spell fields in PascalCase; request bodies are "
                                    "read case-insensitively."},
            "paths": paths,
            "components": {"schemas": schemas, "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"}}},
            "security": [{"bearer": []}],
        }


def _camel(path: str) -> str:
    parts = [p.strip("{}") for p in path.split("/") if p and p != "v1"]
    return "".join(p[:1].upper() + p[1:] for p in parts)


def _resp_schema(name: str) -> dict:
    if name == "string":
        return {"type": "string"}
    if name.startswith("["):
        return {"type": "array", "items": {"type": "object", "x-schema": name[1:-1]}}
    return {"type": "object", "x-schema": name}


def _query(r: Route) -> dict:
    out = {}
    lower = {k.lower(): k for k in r.query}
    for k, v in request.args.items():
        name = lower.get(k.lower())
        if name is None:
            continue
        t = r.query[name].get("type", "string")
        try:
            if t == "integer":
                out[name] = int(v)
            elif t == "boolean":
                if v.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(v)
                out[name] = v.lower() in ("true", "1")
            elif t == "number":
                out[name] = float(v)
            else:
                out[name] = v
        except ValueError:
            raise BadRequest(f"query parameter {name} must be a{'n' if t[0] == 'i' else ''} {t}") from None
        if "enum" in r.query[name] and out[name] not in r.query[name]["enum"]:
            raise BadRequest(f"query parameter {name} must be one of {r.query[name]['enum']}")
    return out


def _body(r: Route, schema: dict):
    raw = request.get_data(cache=True)
    if not raw.strip():
        if r.body_required:
            raise BadRequest("this call needs a JSON body")
        data = {}
    else:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the body is not JSON: {exc}") from None
    return validate(data, schema)
