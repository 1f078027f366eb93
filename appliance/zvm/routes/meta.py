"""The OpenAPI document, Prometheus metrics and the ZVM's own status."""
from __future__ import annotations

import time

from flask import Response

from ..service import API_VERSION, VERSION
from ..tasks import STATE_NAMES


def register(api, zvm):
    @api.route("GET", "/v1/openapi.json", "This API's OpenAPI 3 document", tag="meta",
               public=True, raw=True)
    def openapi(req):
        import json
        return Response(json.dumps(api.openapi(VERSION)), mimetype="application/json")

    @api.route("GET", "/metrics", "Prometheus metrics (text format)", tag="meta", raw=True)
    def metrics(req):
        lines = [
            "# HELP tidemark_zvm_up 1 while the ZVM serves.", "# TYPE tidemark_zvm_up gauge",
            "tidemark_zvm_up 1",
            "# HELP tidemark_zvm_uptime_seconds Seconds since the ZVM started.",
            "# TYPE tidemark_zvm_uptime_seconds gauge",
            f"tidemark_zvm_uptime_seconds {time.time() - zvm.started:.1f}",
            "# HELP tidemark_tasks Tasks by type and state.", "# TYPE tidemark_tasks gauge",
        ]
        counts: dict = {}
        for t in zvm.tasks.list():
            k = (t["type"], STATE_NAMES.get(t["state"], "Unknown"))
            counts[k] = counts.get(k, 0) + 1
        for (typ, state), n in sorted(counts.items()):
            lines.append(f'tidemark_tasks{{type="{typ}",state="{state}"}} {n}')
        lines += ["# HELP tidemark_alerts Active alerts by level and help identifier.",
                  "# TYPE tidemark_alerts gauge"]
        acount: dict = {}
        for a in zvm.alerts.active():
            k = (a["level"], a["helpIdentifier"])
            acount[k] = acount.get(k, 0) + 1
        for (level, hid), n in sorted(acount.items()):
            lines.append(f'tidemark_alerts{{level="{level}",help="{hid}"}} {n}')
        for fn in zvm.metrics:
            lines += fn()
        return Response("\n".join(lines) + "\n", mimetype="text/plain; version=0.0.4")

    @api.route("GET", "/v1/zvm/status", "The ZVM's own status (version, jobs, schema)",
               tag="meta")
    def status(req):
        return {"version": VERSION, "apiVersion": API_VERSION, "siteIdentifier": zvm.site_id,
                "siteName": zvm.cfg.site_name, "schemaVersion": zvm.store.schema_version(),
                "uptimeSeconds": int(time.time() - zvm.started),
                "jobErrors": dict(zvm.jobs.errors)}
