"""The site controller's HTTP JSON API (documented in docs/simulator.md) and its process.

    python -m simulator.site_api --lab DIR --site NAME [--vcenter sim|vcsim]

Errors answer as problem documents: {"title", "detail", "status"}.
"""
from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server

from .procs import write_pidfile
from .site import Site, SiteError
from .workload import WorkloadError


def create_app(site: Site) -> Flask:
    app = Flask(f"site-{site.name}")
    app.json.sort_keys = False

    def problem(status: int, title: str, detail: str):
        return jsonify({"title": title, "detail": detail, "status": status}), status

    @app.errorhandler(SiteError)
    def _site_error(exc):
        return problem(exc.status, type(exc).__name__, str(exc))

    @app.errorhandler(WorkloadError)
    def _wl_error(exc):
        return problem(400, "BadWorkload", str(exc))

    @app.errorhandler(HTTPException)
    def _http(exc):
        return problem(exc.code, exc.name, exc.description)

    def body() -> dict:
        data = request.get_json(silent=True)
        if data is None and not request.data:
            return {}
        if not isinstance(data, dict):
            raise SiteError("the request body must be a JSON object")
        return data

    def field(b: dict, name: str, kind=str):
        if name not in b:
            raise SiteError(f"missing field {name!r}")
        try:
            return kind(b[name])
        except (TypeError, ValueError) as exc:
            raise SiteError(f"field {name!r}: {exc}") from exc

    @app.get("/api/site")
    def site_status():
        return jsonify(site.status())

    @app.get("/api/inventory")
    def inventory():
        return jsonify(site.inventory())

    @app.get("/api/hosts")
    def hosts():
        return jsonify(site.status()["hosts"])

    @app.get("/api/hosts/<name>")
    def host(name):
        return jsonify(site.host_status(name))

    @app.post("/api/hosts/<name>/fail")
    def fail_host(name):
        return jsonify(site.fail_host(name))

    @app.post("/api/hosts/<name>/restore")
    def restore_host(name):
        return jsonify(site.restore_host(name))

    @app.post("/api/site/fail")
    def fail_site():
        return jsonify(site.fail_site())

    @app.post("/api/site/restore")
    def restore_site():
        return jsonify(site.restore_site())

    @app.get("/api/vms")
    def vms():
        return jsonify(site.status()["vms"])

    @app.post("/api/vms")
    def create_vm():
        from .model import public_vm
        return jsonify(public_vm(site.create_vm(body()))), 201

    @app.get("/api/vms/<ref>")
    def vm(ref):
        from .model import public_vm
        return jsonify(public_vm(site.vm(ref)))

    @app.delete("/api/vms/<ref>")
    def delete_vm(ref):
        site.delete_vm(ref, keep_disks=request.args.get("keep_disks") in ("1", "true"))
        return "", 204

    @app.post("/api/vms/<ref>/nics")
    def set_nics(ref):
        from .model import public_vm
        nics = field(body(), "nics", list)
        return jsonify(public_vm(site.set_nics(ref, nics)))

    @app.post("/api/vms/<ref>/rename")
    def rename_vm(ref):
        from .model import public_vm
        return jsonify(public_vm(site.rename_vm(ref, field(body(), "name"))))

    @app.post("/api/vms/<ref>/power")
    def power(ref):
        from .model import public_vm
        state = field(body(), "state")
        if state not in ("on", "off"):
            raise SiteError("state must be 'on' or 'off'")
        return jsonify(public_vm(site.power(ref, state == "on")))

    @app.post("/api/vms/<ref>/vmotion")
    def vmotion(ref):
        from .model import public_vm
        return jsonify(public_vm(site.vmotion(ref, field(body(), "host"))))

    @app.post("/api/vms/<ref>/workload")
    def workload(ref):
        return jsonify(site.workload(ref, body()))

    @app.post("/api/vms/<ref>/write")
    def write(ref):
        b = body()
        field(b, "offset", int)
        try:
            base64.b64decode(field(b, "data"), validate=True)
        except ValueError as exc:
            raise SiteError(f"data must be base64: {exc}") from exc
        return jsonify(site.host_call(ref, "POST", "/write", json=b))

    @app.get("/api/vms/<ref>/disks/<int:disk>/hash")
    def disk_hash(ref, disk):
        return jsonify(site.disk_hash(ref, disk, request.args.get("quiesce") in ("1", "true")))

    @app.post("/api/vms/<ref>/disks/<int:disk>/rebase")
    def rebase(ref, disk):
        from .model import public_vm
        return jsonify(public_vm(site.rebase_disk(ref, disk, field(body(), "path"))))

    @app.get("/api/vms/<ref>/disks/<int:disk>/bitmap")
    def bitmap(ref, disk):
        return jsonify(site.host_call(ref, "GET", f"/disks/{disk}/bitmap"))

    @app.post("/api/vms/<ref>/disks/<int:disk>/bitmap/clear")
    def bitmap_clear(ref, disk):
        return jsonify(site.host_call(ref, "POST", f"/disks/{disk}/bitmap/clear"))

    @app.post("/api/vms/<ref>/sync")
    def sync(ref):
        return jsonify(site.host_call(ref, "POST", "/sync", timeout=3600))

    @app.get("/api/stats")
    def stats():
        return jsonify(site.stats())

    @app.post("/api/links")
    def add_link():
        b = body()
        link = site.link(field(b, "peer"))
        port = link.add_route(field(b, "target_host"), field(b, "target_port", int))
        return jsonify({"peer": b["peer"], "host": "127.0.0.1", "port": port}), 201

    @app.get("/api/links")
    def links():
        return jsonify({p: l.stats() for p, l in site.links.items()})

    @app.post("/api/links/<peer>/<action>")
    def link_action(peer, action):
        link = site.link(peer)
        if action == "cut":
            link.cut()
        elif action == "restore":
            link.restore()
        elif action == "shape":
            b = body()
            try:
                link.shape(b.get("bandwidth_mbps"), b.get("latency_ms"))
            except (ValueError, TypeError) as exc:
                raise SiteError(str(exc)) from exc
        else:
            raise SiteError("link actions are cut, restore and shape")
        return jsonify(link.stats())

    return app


def main(argv=None):
    ap = argparse.ArgumentParser(description="Tidemark simulator site controller")
    ap.add_argument("--lab", required=True)
    ap.add_argument("--site", required=True)
    ap.add_argument("--vcenter", choices=("sim", "vcsim"), default="sim")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s site {args.site} %(name)s %(levelname)s %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    lab = Path(args.lab).resolve()
    write_pidfile(lab / "pids" / f"site-{args.site}.pid")
    site = Site(lab, args.site, args.vcenter)
    stopping = threading.Event()
    server = make_server("127.0.0.1", 0, create_app(site), threaded=True)

    def _term(*_):
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    try:
        site.start()
        port_file = lab / args.site / "controller.json"
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"url": f"http://127.0.0.1:{server.port}", "pid": os.getpid(),
                                   "vcenter_url": site.vcenter_url}))
        tmp.rename(port_file)
        if not stopping.is_set():
            server.serve_forever(poll_interval=0.1)
    finally:
        site.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
