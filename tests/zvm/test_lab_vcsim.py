"""The DR scenario on the vcsim-backed lab, through the `tidemark` CLI and the REST API: the
ZVMs speak the vSphere API (pyvmomi) to each site's vcsim, VRAs are deployed through vCenter,
a failover test runs at a tagged checkpoint (test VMs created through vCenter on the test
network, disks equal to the sources at the checkpoint), a vMotion done in vCenter while the VPG
is protected, then a live failover to the older checkpoint, and its rollback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.zvm.client import ZVMClient
from appliance.zvm.hypervisor import connect
from recoverylab import scribble, site_vms
from simulator.lab import Lab
from waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.vcsim
SUFFIX = " - testing recovery"


def tm(d, *args, timeout=300) -> dict | list | str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "appliance.cli", *args, "--lab", str(d), "--json"],
                       env=env, text=True, capture_output=True, timeout=timeout)
    assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-2000:])
    return json.loads(r.stdout) if r.stdout.strip() else None


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("vcsimlab") / "lab")
    try:
        lab.up(hosts=2, vms=2, disk_mib=16, vcenter="vcsim", zvm=True)    # light workloads
        yield lab
    finally:
        lab.down()


def hashes(lab, names, suffix=""):
    return {n: lab.disk_hash(n + suffix, 0) for n in names}


def vcenter(lab, site):
    s = next(x for x in lab.status()["sites"] if x["name"] == site)
    from urllib.parse import urlparse
    u = urlparse(s["vcenter_url"])
    return connect("vsphere", host=u.hostname, port=u.port, protocol="http", user="user",
                   password="pass", insecure=True)


def test_scenario_on_the_vcsim_lab(lab):
    d = lab.dir
    a = ZVMClient.from_connection_file(d / "zvm" / "site-a" / "connection.json")
    assert a.get("/v1/localsite")["SiteType"] == "VCenter"
    vpg = wait_until(lambda: next((v for v in tm(d, "vpgs", "list") if v["Status"] == 1), None),
                     timeout=120, what="the lab's VPG to meet its SLA")
    vid = vpg["VpgIdentifier"]
    # the VRAs are VMs that vCenter knows
    vc_b = vcenter(lab, "site-b")
    assert {v.name for v in vc_b.vms()} >= {"Z-VRA-site-b-h0", "Z-VRA-site-b-h1"}
    names = sorted(v["name"] for v in site_vms(lab))
    for n in names:                        # quiet guests from here: the test writes itself
        lab.workload(n, {"action": "pause"})

    # a tagged checkpoint, then more writes the test must not see
    scribble(lab, site_vms(lab), seed=5)
    tm(d, "vpgs", "checkpoint", "vpg-site-a", "--tag", "t1")
    at_t1 = hashes(lab, names)
    scribble(lab, site_vms(lab), seed=6)

    # failover test at the tagged checkpoint: test VMs on site-b's test network, in vCenter too
    t = tm(d, "vpgs", "test", "vpg-site-a", "--checkpoint", "latest-tagged")
    assert t["Status"]["State"] == 6, t
    assert {n + SUFFIX for n in names} <= {v.name for v in vc_b.vms()}
    nets = {n.id: n for n in vc_b.networks()}
    for n in names:
        vm = next(v for v in vc_b.vms() if v.name == n + SUFFIX)
        assert vm.power_state == "poweredOn" and all(nets[x.network_id].isolated for x in vm.nics)
    assert hashes(lab, names, SUFFIX) == at_t1
    t = tm(d, "vpgs", "test-stop", "vpg-site-a", "--summary", "ok")
    assert t["Status"]["State"] == 6, t
    wait_until(lambda: not any(v.name.endswith(SUFFIX) for v in vc_b.vms()),
               what="the test VMs to leave vCenter")

    # vMotion through vCenter while protected: noticed, protection continues
    vc_a = vcenter(lab, "site-a")
    vm0 = next(v for v in vc_a.vms() if v.name == names[0])
    other = next(h for h in vc_a.hosts() if h.id != vm0.host_id)
    vc_a.relocate(vm0.id, other.id)
    wait_until(lambda: any(e["EventTypeName"] == "VmMoved" for e in tm(d, "events", "list")),
               timeout=15, what="the ZVM to notice the vMotion")
    wait_until(lambda: lab.api("site-a", "GET", f"/api/vms/{names[0]}")["host"] == other.name,
               timeout=15, what="the data path to follow")
    scribble(lab, site_vms(lab), seed=7)
    tm(d, "vpgs", "checkpoint", "vpg-site-a", "--tag", "t2")
    assert wait_until(lambda: tm(d, "vpgs", "show", vid)["Status"] == 1, timeout=60,
                      what="MeetingSLA after the vMotion")

    # live failover to the OLDER checkpoint t1, waiting for a decision; then roll back
    t1 = next(c["CheckpointIdentifier"] for c in tm(d, "vpgs", "checkpoints", vid, "--tagged")
              if c["Tag"] == "t1")
    t = tm(d, "vpgs", "failover", "vpg-site-a", "--checkpoint", t1, "--commit-policy", "none")
    assert t["Status"]["State"] == 2, t                       # waiting for commit or rollback
    assert hashes(lab, names) != at_t1                         # sources moved on since t1
    # The simulator may learn of VMs made through vCenter a watch cycle later.
    def recovered_running():
        on_b = {v["name"]: v for v in lab.status()["sites"][1]["vms"]}
        return all(n in on_b and on_b[n]["power_state"] == "poweredOn" for n in names)
    wait_until(recovered_running, what="the recovered VMs to run on site-b")
    for n in names:
        assert lab.api("site-b", "GET", f"/api/vms/{n}/disks/0/hash")["sha256"] == at_t1[n]
    t = tm(d, "vpgs", "rollback", "vpg-site-a")
    assert t["Type"] == "Failover" and t["Status"]["State"] == 5, t   # the failover, stopped
    wait_until(lambda: not any(v["name"] in names for v in lab.status()["sites"][1]["vms"]),
               what="the rolled-back VMs to leave site-b")
    assert wait_until(lambda: tm(d, "vpgs", "show", vid)["Status"] == 1, timeout=90,
                      what="MeetingSLA after the rollback")
    report_types = {r["General"]["RecoveryType"] for r in tm(d, "reports", "list")}
    assert {"FailoverTest", "Failover"} <= report_types, report_types
