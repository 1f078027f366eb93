"""``create_app(config)``: the ZVM's Flask application (REST API ``/v1``, token endpoints,
OpenAPI document, Prometheus metrics). Views live in ``routes/`` (one module per area) and stay
thin: they call the domain services on the ``ZVM`` object."""
from __future__ import annotations

import json
import logging

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from .api import Api, Route
from .auth import require
from .config import ZVMConfig
from .errors import Unauthorized, ZVMError, problem
from .service import ZVM

log = logging.getLogger("tidemark.zvm")

ROUTE_MODULES = ["auth", "monitoring", "meta"]
OPTIONAL_ROUTE_MODULES = ["sites", "vras", "vpgsettings", "vpgs", "vms", "operations", "failover"]


def build_api(zvm: ZVM) -> Api:
    import importlib
    api = Api()
    for name in ROUTE_MODULES:
        importlib.import_module(f".routes.{name}", __package__).register(api, zvm)
    for name in OPTIONAL_ROUTE_MODULES:
        try:
            mod = importlib.import_module(f".routes.{name}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.routes.{name}":
                raise
            continue
        mod.register(api, zvm)
    return api


def create_app(config: ZVMConfig | dict | None = None, *, zvm: ZVM | None = None,
               start: bool = True) -> Flask:
    if zvm is None:
        cfg = config if isinstance(config, ZVMConfig) else ZVMConfig.load(None, **(config or {}))
        zvm = ZVM(cfg)
    app = Flask("tidemark-zvm")
    app.config["ZVM"] = zvm
    app.json.sort_keys = False
    api = build_api(zvm)
    app.config["API"] = api

    def authenticate(r: Route):
        if r.public:
            return None
        h = request.headers.get("Authorization", "")
        token = h[7:].strip() if h[:7].lower() == "bearer " else \
            request.headers.get("x-zerto-session", "").strip()
        if not token:
            raise Unauthorized()
        identity = zvm.auth.check(token)
        require(identity, r.needed_role)
        return identity

    api.install(app, authenticate)

    @app.errorhandler(ZVMError)
    def _zvm_error(exc: ZVMError):
        if exc.status >= 500:
            log.warning("%s: %s", request.path, exc)
        return _problem(exc.status, exc.title, exc.detail)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        return _problem(exc.code, exc.name, exc.description)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.path)
        return _problem(500, "Internal error", f"{type(exc).__name__}: the ZVM log has details")

    if start:
        zvm.start()
    return app


def _problem(status: int, title: str, detail: str) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    return Response(json.dumps(problem(status, title, detail)), status=status,
                    mimetype="application/problem+json", headers=headers)
