"""Per-VM recovery host placement on a lab: a VPG of two VMs whose recovery default host is
site-b-h0, the second VM with ``Vms[i].Recovery.HostIdentifier`` = site-b-h1.

By design (appliance/zvm/vpgs.py, ``recovery_host``) a VPG has one recovery VRA, on the default
host (or the first VM's host when there is no default), which keeps the replicas of all its VMs;
a VM's own host only decides where its recovered VM runs, reading its disks from that VRA's
image set over the image IO protocol. So: the recovery VRA is site-b-h0's, the test and clone
VMs run on each VM's host, and their disks equal the sources at the checkpoint.
"""
from __future__ import annotations

import pytest

from recoverylab import doc, images, protected_site, recovery_vms, scribble, site_vms, \
    source_hashes, tagged
from waiting import wait_until

LAB = {"vms": 2}


@pytest.fixture(scope="module")
def s(zvm_lab, start_zvm):
    return protected_site(zvm_lab, start_zvm, key="pl", name="vpg-place", vm_hosts={1: "site-b-h1"})


def hosts(z) -> dict:
    return {h["VirtualizationHostName"]: h["HostIdentifier"]
            for h in z.ok("GET", f"/v1/virtualizationsites/{z.site_id()}/hosts")}


def expected_hosts(s) -> dict:
    """Source VM name -> the recovery host it must be recovered on."""
    first, second = sorted(v["VmName"] for v in s["vms"])
    return {first: "site-b-h0", second: "site-b-h1"}


def test_settings_keep_the_per_vm_host_and_one_recovery_vra(s):
    a, b, vid = s["a"], s["b"], s["vpg"]
    bh = hosts(b)
    settings = doc(b, "vpgs", vid)["settings"]
    assert settings["recovery"]["defaultHostIdentifier"] == bh["site-b-h0"]
    want = {v["VmIdentifier"]: expected_hosts(s)[v["VmName"]] for v in s["vms"]}
    got = {v["vmIdentifier"]: (v.get("recovery") or {}).get("hostIdentifier") for v in settings["vms"]}
    assert got == {vm: (bh["site-b-h1"] if h == "site-b-h1" else None) for vm, h in want.items()}
    # the replicas of both VMs are kept by the default host's VRA (one recovery VRA per VPG)
    rec = doc(b, "vpgs", vid)["recoveryVra"]
    assert rec["hostIdentifier"] == bh["site-b-h0"]
    vra = doc(b, "vras", rec["identifier"])
    assert vra["hostIdentifier"] == bh["site-b-h0"]
    assert a.ok("GET", f"/v1/vpgs/{vid}")["Status"] == 1


def test_failover_test_vms_run_on_their_own_hosts(s):
    a, b, lab, vid = s["a"], s["b"], s["lab"], s["vpg"]
    suffix = " - testing recovery"
    scribble(lab, site_vms(lab), seed=41)
    k = tagged(a, vid, "placement")
    at_k = source_hashes(lab)
    tid = a.ok("POST", f"/v1/vpgs/{vid}/FailoverTest", json={"CheckpointIdentifier": str(k)})
    a.wait_task(tid, 60)
    try:
        test_vms = {v["name"]: v for v in recovery_vms(lab, suffix)}
        assert {n[:-len(suffix)]: v["host"] for n, v in test_vms.items()} == expected_hosts(s)
        assert all(v["power_state"] == "poweredOn" for v in test_vms.values())
        # both read their disks from the recovery VRA on site-b-h0, at the checkpoint
        [img] = images(b, vid)
        assert img["checkpoint"] == k
        for (name, disk), h in at_k.items():
            assert lab.disk_hash(name + suffix, disk) == h, (name, disk)
    finally:
        a.wait_task(a.ok("POST", f"/v1/vpgs/{vid}/FailoverTestStop",
                         json={"FailoverTestSuccess": True, "FailoverTestSummary": "placement"}), 60)
    assert recovery_vms(lab, suffix) == [] and images(b, vid) == []
    rep = wait_until(lambda: (lambda r: r if r["General"]["Status"] == "Passed" else None)(
        a.ok("GET", f"/v1/reports/recovery/{tid}")), 10, 0.1, "the test's report")
    assert {v["VmName"][:-len(suffix)]: v["HostName"] for v in rep["RecoverySettings"]["Vms"]} \
        == expected_hosts(s)


def test_clones_are_made_on_their_own_hosts(s):
    a, b, lab, vid = s["a"], s["b"], s["lab"], s["vpg"]
    suffix = " - clone"
    k = tagged(a, vid, "placement-clone")
    at_k = source_hashes(lab)
    tid = a.ok("POST", f"/v1/vpgs/{vid}/CloneStart", json={"CheckpointId": str(k)})
    a.wait_task(tid, 120)
    clones = {v["name"]: v for v in recovery_vms(lab, suffix)}
    try:
        assert {n[:-len(suffix)]: v["host"] for n, v in clones.items()} == expected_hosts(s)
        for (name, disk), h in at_k.items():
            assert lab.disk_hash(name + suffix, disk) == h, (name, disk)
        assert images(b, vid) == []
    finally:
        for name in clones:
            lab.api("site-b", "DELETE", f"/api/vms/{name}")
    wait_until(lambda: a.ok("GET", f"/v1/vpgs/{vid}")["Status"] == 1, 30, 0.3, "MeetingSLA")
