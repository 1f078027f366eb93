"""Failover test end to end on a lab: two paired ZVM processes, VRAs on every host, one VPG of
two VMs (boot groups g1 with a 3 s delay, then g2; re-IP of g2's VM on the test network).

The tests run in order on one module lab: refusals (4xx, nothing changed) -> FailoverTest at a
tagged checkpoint, asked at the protected site and followed there (the task runs at the
recovery site) -> test VMs' disks equal the sources at that checkpoint while replication goes
on -> FailoverTestStop -> report with RTO and steps at both sites -> a recovery ZVM restarted
in the middle of a FailoverTest resumes it.
"""
from __future__ import annotations

import time

import pytest

from recoverylab import (images, protected_site, recovery_vms, scribble, site_vms, source_hashes,
                         tagged, wait_state)
from waiting import wait_until

SUFFIX = " - testing recovery"
REIP = {"StaticIp": "10.9.0.5", "SubnetMask": "255.255.255.0", "Gateway": "10.9.0.1",
        "PrimaryDns": "10.9.0.2", "IsDhcp": False}


@pytest.fixture(scope="module")
def s(zvm_lab, start_zvm):
    out = protected_site(zvm_lab, start_zvm, key="ft", boot=[("g1", 3), ("g2", 0)], reip=REIP)
    out["state"] = {}
    return out


def vpg(z, vid):
    return z.ok("GET", f"/v1/vpgs/{vid}")


def test_refusals_change_nothing(s):
    a, b, vid = s["a"], s["b"], s["vpg"]
    tasks_before = len(b.ok("GET", "/v1/tasks"))
    r = a.post(f"/v1/vpgs/{vid}/FailoverTestStop", json={"FailoverTestSuccess": True})
    assert r.status_code == 409 and "no failover test" in r.json()["detail"], r.text
    r = a.post(f"/v1/vpgs/{vid}/FailoverTest", json={"CheckpointIdentifier": "999999999"})
    assert r.status_code == 409 and "not recoverable" in r.json()["detail"], r.text
    r = a.post(f"/v1/vpgs/{vid}/FailoverTest", json={"CheckpointIdentifier": "latest-ish"})
    assert r.status_code == 400, r.text
    r = a.post(f"/v1/vpgs/{vid}/FailoverTest", json={"VmIdentifiers": ["vm-nope"]})
    assert r.status_code == 400 and "vm-nope" in r.json()["detail"], r.text
    r = a.post(f"/v1/vpgs/{vid}/FailoverTest", json={"VmIdentifiers": "vm-100"})
    assert r.status_code == 400, r.text
    assert a.post("/v1/vpgs/no-such-vpg/FailoverTest", json={}).status_code == 404
    assert len(b.ok("GET", "/v1/tasks")) == tasks_before
    assert recovery_vms(s["lab"], SUFFIX) == [] and images(b, vid) == []
    assert vpg(a, vid)["ActiveProcessesApi"] is None


def test_failover_test_vms_equal_the_checkpoint(s):
    a, b, lab, vid = s["a"], s["b"], s["lab"], s["vpg"]
    scribble(lab, site_vms(lab), seed=21)
    k = tagged(a, vid, "before-test")
    at_k = source_hashes(lab)
    scribble(lab, site_vms(lab), seed=22)           # after k: the test must not see these
    assert source_hashes(lab) != at_k
    t0 = time.monotonic()
    tid = a.ok("POST", f"/v1/vpgs/{vid}/FailoverTest", json={"CheckpointIdentifier": str(k)})
    s["state"]["test"] = tid
    # asked at the protected site, runs at the recovery site; either ZVM answers the task
    assert b.ok("GET", f"/v1/tasks/{tid}")["TaskIdentifier"] == tid
    st = wait_until(lambda: vpg(a, vid)["ActiveProcessesApi"], 20, 0.1, "the test to show")
    assert st["RunningFailOverTestApi"]["Stage"] in ("Starting", "Testing")
    # a second operation on the busy VPG: 409 at either site
    assert a.post(f"/v1/vpgs/{vid}/FailoverTest", json={}).status_code == 409
    assert b.post(f"/v1/vpgs/{vid}/FailoverTest", json={}).status_code == 409
    assert a.post(f"/v1/vpgs/{vid}/CloneStart", json={"CheckpointId": str(k)}).status_code == 409
    t = a.wait_task(tid, 60)
    elapsed = time.monotonic() - t0
    assert t["Type"] == "FailoverTest" and elapsed < 45, (elapsed, t)   # bench/rto.py times it
    steps = [x["Step"] for x in t["Steps"]]
    assert steps == ["forward:mark", "forward:open_images", "forward:create_vms",
                     "forward:power_on", "forward:testing"], steps
    assert any("waiting 3 s" in n for x in t["Steps"] for n in x.get("Notes", []))
    assert vpg(a, vid)["ActiveProcessesApi"]["RunningFailOverTestApi"]["Stage"] == "Testing"
    assert vpg(b, vid)["ActiveProcessesApi"]["RunningFailOverTestApi"]["Stage"] == "Testing"
    test_vms = {v["name"]: lab.api("site-b", "GET", f"/api/vms/{v['name']}")
                for v in recovery_vms(lab, SUFFIX)}
    assert sorted(test_vms) == sorted(v["name"] + SUFFIX for v in site_vms(lab))
    src = {v["name"]: lab.api("site-a", "GET", f"/api/vms/{v['name']}") for v in site_vms(lab)}
    first, last = sorted(src)
    for name, v in test_vms.items():
        assert v["power_state"] == "poweredOn", v
        assert v["host"] == "site-b-h0"
        assert v["nics"] and all(n["network"].endswith("-test") for n in v["nics"]), v["nics"]
        assert all(d.get("image") for d in v["disks"])           # on the recovery images
    # g2's VM: new MAC and the static IP of its re-IP settings; g1's keeps its MAC
    assert test_vms[last + SUFFIX]["nics"][0]["ip"] == "10.9.0.5"
    assert test_vms[last + SUFFIX]["nics"][0]["mac"] != src[last]["nics"][0]["mac"]
    assert test_vms[first + SUFFIX]["nics"][0]["mac"] == src[first]["nics"][0]["mac"]
    # the test VMs' disks are the sources' at k (read through the recovery site's simulator)
    for (name, disk), h in at_k.items():
        assert lab.disk_hash(name + SUFFIX, disk) == h, (name, disk)
    # replication goes on during the test: a new checkpoint becomes recoverable
    k2 = tagged(a, vid, "during-test")
    assert k2 > k
    assert [i["checkpoint"] for i in images(b, vid)] == [k]
    # a write inside a test VM stays in the test (the source is untouched)
    before = lab.disk_hash(first, 0)
    lab.api("site-b", "POST", f"/api/vms/{first + SUFFIX}/write",
            json={"disk": 0, "offset": 0, "data": "dGVzdA=="})
    assert lab.disk_hash(first + SUFFIX, 0) != at_k[(first, 0)]
    assert lab.disk_hash(first, 0) == before


def test_failover_test_stop_tears_down_and_reports(s):
    a, b, lab, vid = s["a"], s["b"], s["lab"], s["vpg"]
    r = a.post(f"/v1/vpgs/{vid}/FailoverTestStop", json={"FailoverTestSuccess": "yes"})
    assert r.status_code == 400, r.text
    stop = a.ok("POST", f"/v1/vpgs/{vid}/FailoverTestStop",
                json={"FailoverTestSuccess": True, "FailoverTestSummary": "apps answered"})
    a.wait_task(stop, 60)
    assert recovery_vms(lab, SUFFIX) == [] and images(b, vid) == []
    # the protected site learns the end of the test from the recovery site (a peer call)
    va, vb = wait_until(lambda: (lambda x, y: (x, y) if x["ActiveProcessesApi"] is None
                                 and y["ActiveProcessesApi"] is None else None)(vpg(a, vid), vpg(b, vid)),
                        15, 0.2, "the test's end shown on both sites")
    assert va["LastTest"] and va["LastTest"] == vb["LastTest"]
    assert a.post(f"/v1/vpgs/{vid}/FailoverTestStop", json={}).status_code == 409
    for z in (a, b):
        # written once the stop task ended: at the recovery site, copied to the protected site
        [rep] = wait_until(lambda: [x for x in z.ok("GET", "/v1/reports/recovery",
                                                    params={"vpgName": "vpg-rec"})
                                    if x["RecoveryOperationIdentifier"] == s["state"]["test"]
                                    and x["General"]["Status"] != "Testing"], 10, 0.1, "the report")
        g = rep["General"]
        assert g["RecoveryType"] == "FailoverTest" and g["Status"] == "Passed"
        assert g["Notes"] == "apps answered" and g["VpgIdentifier"] == vid
        assert g["ProtectedSiteName"] == "site-a" and g["RecoverySiteName"] == "site-b"
        assert 3 <= int(g["RtoInSeconds"]) <= 45, g            # includes g1's 3 s boot delay
        assert g["PointInTime"] and g["StartTime"] <= g["EndTime"]
        steps = rep["RecoverySettings"]["Steps"]
        descs = [x["Description"] for x in steps]
        assert descs[:5] == ["mark", "open images", "create vms", "power on", "testing"], descs
        assert descs[5:] == ["take", "stage", "power off", "delete vms", "discard images", "unmark"]
        assert "discard images" in descs and all(x["Result"] == "Succeeded" for x in steps)
        assert all(float(x["ExecutionTime"]) >= 0 for x in steps)
        vms = rep["RecoverySettings"]["Vms"]
        assert sorted(v["VmName"] for v in vms) == sorted(v["name"] + SUFFIX for v in site_vms(lab))
        assert all(v["HostName"] == "site-b-h0" and v["NetworkNames"][0].endswith("-test") for v in vms)
    got = a.ok("GET", f"/v1/reports/recovery/{s['state']['test']}")
    assert got["General"]["Status"] == "Passed"


def test_recovery_zvm_restarted_mid_test_resumes(s):
    a, b, lab, vid = s["a"], s["b"], s["lab"], s["vpg"]
    k = tagged(a, vid, "restart")
    at_k = source_hashes(lab)
    tid = a.ok("POST", f"/v1/vpgs/{vid}/FailoverTest", json={"CheckpointIdentifier": str(k)})
    # stop the recovery ZVM while the first boot group's 3 s delay runs
    wait_until(lambda: any("boot group g1: waiting" in n for x in b.ok("GET", f"/v1/tasks/{tid}")["Steps"]
                           for n in x.get("Notes", [])), 30, 0.05, "g1's boot delay")
    b.stop()
    b.start()
    t = wait_state(b, tid, (6,), 60)
    # the step in progress (power_on, in g1's boot delay) ran again after the restart
    assert any("FailoverTest resumed after a ZVM restart at step forward:power_on" in e["Description"]
               for e in b.ok("GET", "/v1/events")), b.ok("GET", "/v1/events")[:5]
    assert [x["Step"] for x in t["Steps"]][-2:] == ["forward:power_on", "forward:testing"]
    test_vms = recovery_vms(lab, SUFFIX)
    assert len(test_vms) == 2 and all(v["power_state"] == "poweredOn" for v in test_vms)
    for (name, disk), h in at_k.items():
        assert lab.disk_hash(name + SUFFIX, disk) == h
    assert len(images(b, vid)) == 1
    a.wait_task(a.ok("POST", f"/v1/vpgs/{vid}/FailoverTestStop",
                     json={"FailoverTestSuccess": False, "FailoverTestSummary": "restart drill"}), 60)
    assert recovery_vms(lab, SUFFIX) == [] and images(b, vid) == []
    rep = wait_until(lambda: (lambda r: r if r["General"]["Status"] != "Testing" else None)(
        a.ok("GET", f"/v1/reports/recovery/{tid}")), 10, 0.1, "the report")
    assert rep["General"]["Status"] == "Failed" and rep["General"]["Notes"] == "restart drill"
    assert vpg(a, vid)["ActiveProcessesApi"] is None


def test_protected_zvm_restarted_mid_test(s):
    """The protected site's ZVM goes away while the test runs at the recovery site (it only
    mirrors the VPG's state there): the test goes on, and the protected ZVM shows it once back."""
    a, b, lab, vid = s["a"], s["b"], s["lab"], s["vpg"]
    k = tagged(a, vid, "protected-restart")
    at_k = source_hashes(lab)
    tid = a.ok("POST", f"/v1/vpgs/{vid}/FailoverTest", json={"CheckpointIdentifier": str(k)})
    wait_until(lambda: any(x["Step"] == "forward:power_on" for x in b.ok("GET", f"/v1/tasks/{tid}")["Steps"]),
               30, 0.05, "the power-on step")
    a.stop()
    a.start()
    t = wait_state(b, tid, (6,), 90)
    assert t["Type"] == "FailoverTest"
    for (name, disk), h in at_k.items():
        assert lab.disk_hash(name + SUFFIX, disk) == h
    # the restarted protected ZVM answers the task (asking its peer) and shows the test
    assert a.ok("GET", f"/v1/tasks/{tid}")["Status"]["State"] == 6
    wait_until(lambda: (vpg(a, vid)["ActiveProcessesApi"] or {}).get("RunningFailOverTestApi"),
               30, 0.2, "the protected ZVM to show the running test")
    a.wait_task(a.ok("POST", f"/v1/vpgs/{vid}/FailoverTestStop",
                     json={"FailoverTestSuccess": True, "FailoverTestSummary": "ok"}), 60)
    assert recovery_vms(lab, SUFFIX) == [] and images(b, vid) == []
    wait_until(lambda: vpg(a, vid)["ActiveProcessesApi"] is None and vpg(a, vid)["Status"] == 1,
               30, 0.2, "the VPG to meet its SLA with no test running")
