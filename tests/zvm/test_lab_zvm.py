"""`tidemark lab up` sets up the whole product: a ZVM per site, VRAs on every host, the sites
paired and a VPG protecting site-a's VMs to site-b; `lab status --json` shows each site's ZVM
and the lab's credentials; the `tidemark` commands reach the ZVMs through the lab; `lab down`
leaves no process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil

from appliance.zvm.client import ZVMClient
from waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]


def tm(*args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], env=env, text=True,
                          capture_output=True, timeout=timeout)


def lab_processes(d: Path) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(d) in a for a in (p.info["cmdline"] or [])[1:]):
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_lab_up_protects_site_a_and_down_leaves_nothing(tmp_path):
    d = tmp_path / "lab"
    try:
        r = tm("lab", "up", "--dir", str(d), "--disk-mib", "16", "--hosts", "2", "--vms", "2")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "zvm https://127.0.0.1:" in r.stdout
        st = json.loads(tm("lab", "status", "--dir", str(d), "--json").stdout)
        cred = st["zvm"]
        assert {"admin_user", "admin_password", "client_id", "client_secret"} <= set(cred)
        conn = d / "zvm" / "site-a" / "connection.json"
        assert oct(conn.stat().st_mode & 0o777) == "0o600"
        clients = {}
        for s in st["sites"]:
            assert s["zvm_url"].startswith("https://127.0.0.1:")
            clients[s["name"]] = ZVMClient(s["zvm_url"], client_id=cred["client_id"],
                                           client_secret=cred["client_secret"],
                                           ca_cert=s["zvm_ca_cert"])
        a, b = clients["site-a"], clients["site-b"]
        # the admin user works too
        u = ZVMClient(st["sites"][0]["zvm_url"], username=cred["admin_user"],
                      password=cred["admin_password"], ca_cert=st["sites"][0]["zvm_ca_cert"])
        assert u.get("/v1/localsite")["SiteName"] == "site-a"
        # paired both ways, a VRA on every host of both sites
        assert [p["PeerSiteName"] for p in a.get("/v1/peersites")] == ["site-b"]
        assert [p["PeerSiteName"] for p in b.get("/v1/peersites")] == ["site-a"]
        for c, s in ((a, st["sites"][0]), (b, st["sites"][1])):
            vras = c.get("/v1/vras")
            assert sorted(v["HostDisplayName"] for v in vras) == sorted(h["name"] for h in s["hosts"])
        # the VPG of site-a's VMs meets its SLA, seen from both sites
        vpg = wait_until(lambda: next((v for v in a.get("/v1/vpgs")
                                       if v["VpgName"] == "vpg-site-a" and v["Status"] == 1), None),
                         timeout=180, what="vpg-site-a to meet its SLA")
        assert vpg["VmsCount"] == 2
        assert [v["VpgIdentifier"] for v in b.get("/v1/vpgs")] == [vpg["VpgIdentifier"]]
        # the CLI reaches the ZVMs through the lab folder
        r = tm("vpgs", "list", "--lab", str(d), "--json")
        assert r.returncode == 0 and json.loads(r.stdout)[0]["VpgName"] == "vpg-site-a", r.stderr
        r = tm("vras", "list", "--lab", str(d), "--site", "site-b")
        assert r.returncode == 0 and "Z-VRA-site-b-h0" in r.stdout, r.stderr
        # `lab up` again changes nothing
        r = tm("lab", "up", "--dir", str(d))
        assert r.returncode == 0
        assert len(a.get("/v1/vpgs")) == 1 and len(a.get("/v1/vras")) == 2
    finally:
        tm("lab", "down", "--dir", str(d))
    assert wait_until(lambda: not lab_processes(d), timeout=20, what="no lab process left")
