"""The appliance guest agent: what boots inside every Tidemark appliance VM.

It reads the OVF environment, publishes guest information (role, properties
with secrets hidden, service state, its address) the way VMware Tools publishes
guestinfo, and runs the service of the appliance's role in this process. Roles
map to service modules (``ROLES``); a role whose service module is not part of
this build is reported as ``not-installed`` instead of pretending to run.

    python -m appliance.guest --ovf-env FILE --info FILE
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from . import ovf

ROLES = {"vra": "appliance.vra.service", "zvm": "appliance.zvm.service",
         "zca": "appliance.zca.service", "vba": "appliance.vba.service"}
log = logging.getLogger("tidemark.guest")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Tidemark appliance guest agent")
    ap.add_argument("--ovf-env", required=True)
    ap.add_argument("--info", required=True, help="where to publish guest information (JSON)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s guest %(levelname)s %(message)s")
    from simulator.procs import exit_with_parent  # the simulator's host is this VM's hardware
    exit_with_parent()
    props = ovf.parse(Path(args.ovf_env).read_text())
    role = props.get("role", "")
    state = {"role": role, "properties": ovf.redacted(props), "pid": os.getpid(),
             "booted": time.time(), "service": "starting"}
    stop = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(state).encode()
            self.send_response(200 if self.path == "/guestinfo" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state["guestinfo_url"] = f"http://127.0.0.1:{server.server_port}/guestinfo"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def publish():
        tmp = Path(args.info + ".tmp")
        tmp.write_text(json.dumps(state))
        tmp.rename(args.info)

    service = None
    module = ROLES.get(role)
    if module is None:
        state["service"] = "unknown-role"
        log.error("role %r is not a Tidemark appliance role (%s)", role, ", ".join(ROLES))
    else:
        try:
            service = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (module == exc.name or module.startswith(exc.name + ".")):
                raise
            state["service"] = "not-installed"
            log.warning("the %s service is not part of this build", role)
    if service is not None:
        state["service"] = "running"
        publish()
        try:
            rc = service.main(props, stop)
            state["service"] = f"exited {rc}"
        except Exception as exc:   # the appliance stays up and says why its service failed
            log.exception("the %s service failed", role)
            state["service"] = f"failed: {type(exc).__name__}: {exc}"
            rc = None
        publish()
        if rc is not None:
            server.shutdown()
            return int(rc or 0)
    publish()
    stop.wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
