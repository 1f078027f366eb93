"""The lab's management layer: a ZVM per site, VRAs on every host, the sites paired, and a VPG
protecting the first site's VMs to the second.

Everything goes through the products' own interfaces: ``tidemark zvm init`` and ``tidemark zvm
serve`` start each ZVM (HTTPS with its generated certificate), and the ZVM REST API pairs the
sites, installs the VRAs (the ZVM deploys the VRA appliance VM, which the simulator runs) and
creates the VPG through the vpgSettings flow.

Per site, under ``<lab>/zvm/<site>/``: ``zvm.toml``, ``data/`` (store, certificate, secrets),
``zvm.log``, and ``connection.json`` (0600: URL, API client, admin user and password, CA
certificate) which `tidemark --lab DIR --site SITE ...` commands and the tests use.
"""
from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path

from appliance.ports import free_port

from .procs import read_pidfile, spawn, write_pidfile

ADMIN_USER = "admin"
CLIENT_ID = "tidemark-lab"
VPG_NAME = "vpg-site-a"


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def credentials(lab_dir: Path) -> dict:
    """The lab's admin user, password and API client (the same on every site's ZVM); created once."""
    f = lab_dir / "zvm" / "credentials.json"
    if f.exists():
        return json.loads(f.read_text())
    f.parent.mkdir(parents=True, exist_ok=True)
    cred = {"admin_user": ADMIN_USER, "admin_password": secrets.token_urlsafe(12),
            "client_id": CLIENT_ID, "client_secret": secrets.token_urlsafe(24)}
    _write_secret(f, json.dumps(cred))
    return cred


def hypervisor_settings(site_status: dict) -> dict:
    if site_status.get("vcenter_url"):
        from urllib.parse import urlparse
        u = urlparse(site_status["vcenter_url"])
        return {"kind": "vsphere", "host": u.hostname, "port": u.port, "protocol": u.scheme,
                "user": "user", "password": "pass", "insecure": True}
    return {"kind": "simulator", "url": site_status["simulator_url"]}


def start_zvm(lab_dir: Path, site: dict, timeout: float = 60) -> dict:
    """Install (idempotent) and start the ZVM of one site; its connection details."""
    d = lab_dir / "zvm" / site["name"]
    d.mkdir(parents=True, exist_ok=True)
    cred = credentials(lab_dir)
    conf = d / "zvm.toml"
    port = json.loads((d / "port.json").read_text())["port"] if (d / "port.json").exists() \
        else free_port("127.0.0.1")
    (d / "port.json").write_text(json.dumps({"port": port}))
    hv = hypervisor_settings(site)
    lines = [f'site_name = "{site["name"]}"', f'site_kind = "{site["kind"]}"', f"port = {port}",
             'data_dir = "data"', "inventory_interval_s = 1.0", "monitor_interval_s = 1.0",
             "[hypervisor]"] + [f"{k} = {json.dumps(v)}" for k, v in hv.items()]
    _write_secret(conf, "\n".join(lines) + "\n")       # holds the vCenter password
    root = str(Path(__file__).resolve().parent.parent)
    env = {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    from appliance.zvm.config import ZVMConfig
    from appliance.zvm.serve import init
    cfg = ZVMConfig.load(conf)
    info = init(cfg, cred["admin_user"], cred["admin_password"],
                {"client_id": cred["client_id"], "client_secret": cred["client_secret"]})
    pidfile = lab_dir / "pids" / f"zvm-{site['name']}.pid"
    if read_pidfile(pidfile) is None:
        proc = spawn([sys.executable, "-m", "appliance.cli", "zvm", "serve", "--config", str(conf)],
                     d / "zvm.log", detach=True, env={"PYTHONPATH": env["PYTHONPATH"]})
        write_pidfile(pidfile, proc.pid)
    conn = {"url": cfg.url, "client_id": cred["client_id"], "client_secret": cred["client_secret"],
            "ca_cert": info["certificate"], "fingerprint": info["fingerprint"],
            "admin_user": cred["admin_user"], "admin_password": cred["admin_password"]}
    _write_secret(d / "connection.json", json.dumps(conn, indent=1))
    return conn


def wait_ready(conn: dict, timeout: float = 60) -> None:
    import requests
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            r = requests.get(conn["url"] + "/v1/openapi.json", verify=conn["ca_cert"], timeout=2)
            if r.status_code == 200:
                return
        except requests.RequestException as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"the ZVM at {conn['url']} did not answer within {timeout:.0f} s: {last}")


def client(lab_dir: Path, site: str):
    from appliance.zvm.client import ZVMClient
    return ZVMClient.from_connection_file(lab_dir / "zvm" / site / "connection.json")


def _task(c, answer, timeout=300.0) -> dict | None:
    """Wait for an operation's task when the answer names one."""
    if not isinstance(answer, str) or not answer:
        return None
    t = c.wait_task(answer, timeout)
    if t["Status"]["State"] != 6:
        raise RuntimeError(f"{t['Type']} ended in state {t['Status']['State']}: "
                           f"{t.get('CompleteReason')}")
    return t


def pair(lab_dir: Path, a: str, b: str, conn_b: dict) -> None:
    ca, cb = client(lab_dir, a), client(lab_dir, b)
    if any(p.get("PeerSiteName") == b for p in ca.get("/v1/peersites")):
        return
    token = cb.post("/v1/peersites/generatetoken")["Token"]
    from urllib.parse import urlparse
    u = urlparse(conn_b["url"])
    _task(ca, ca.post("/v1/peersites", {"HostName": u.hostname, "Port": u.port, "Token": token}))


def install_vras(lab_dir: Path, site: str, kind_of_datastore: str = "ds1") -> None:
    c = client(lab_dir, site)
    sid = c.get("/v1/localsite")["SiteIdentifier"]
    have = {v.get("HostIdentifier") for v in c.get("/v1/vras")}
    dss = c.get(f"/v1/virtualizationsites/{sid}/datastores")
    nets = c.get(f"/v1/virtualizationsites/{sid}/networks")
    ds = next((d for d in dss if d["DatastoreName"].endswith(kind_of_datastore)), dss[0])
    net = next(n for n in nets if not n["VirtualizationNetworkName"].endswith("-test"))
    tasks = []
    for h in c.get(f"/v1/virtualizationsites/{sid}/hosts"):
        if h["HostIdentifier"] in have:
            continue
        tasks.append(c.post("/v1/vras", {"HostIdentifier": h["HostIdentifier"],
                                         "DatastoreIdentifier": ds["DatastoreIdentifier"],
                                         "NetworkIdentifier": net["NetworkIdentifier"],
                                         "MemoryInGb": 4}))
    for t in tasks:
        _task(c, t)


def protect(lab_dir: Path, protected: str, recovery: str, vms: list[str]) -> None:
    from appliance.zvm.client import create_vpg
    c = client(lab_dir, protected)
    if any(v.get("VpgName") == VPG_NAME for v in c.get("/v1/vpgs")):
        return
    _task(c, create_vpg(c, VPG_NAME, vms, recovery, f"{recovery}-h0", f"{recovery}-ds1",
                        f"{recovery}-net0", f"{recovery}-test", rpo_s=60))


def up(lab, status: dict, *, protect_vms: bool = True, timeout: float = 300) -> dict:
    """Start the ZVMs of a running lab and set up protection; the connection per site."""
    sites = [s for s in status["sites"] if s["simulator_url"]]
    conns = {s["name"]: start_zvm(lab.dir, s) for s in sites}
    for conn in conns.values():
        wait_ready(conn)
    first, *others = [s["name"] for s in sites]
    for other in others:
        pair(lab.dir, first, other, conns[other])
    for s in sites:
        install_vras(lab.dir, s["name"])
    if protect_vms and others and sites[0]["vms"]:
        protect(lab.dir, first, others[0], [v["name"] for v in sites[0]["vms"]])
    return conns


def status_fields(lab_dir: Path, site: str) -> dict:
    f = lab_dir / "zvm" / site / "connection.json"
    if not f.exists():
        return {}
    c = json.loads(f.read_text())
    return {"zvm_url": c["url"], "zvm_fingerprint": c["fingerprint"], "zvm_ca_cert": c["ca_cert"]}
