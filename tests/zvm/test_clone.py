"""Clone end to end on a lab: the VPG's VMs at a checkpoint copied into independent VMs
"<vm> - clone" on plain disks of their own at the recovery site (the recovery VRA copies the
image disks into them), while replication goes on; refusals; CloneAbort.
"""
from __future__ import annotations

import pytest

from recoverylab import (images, protected_site, recovery_vms, scribble, site_vms, source_hashes,
                         tagged, wait_state)
from waiting import wait_until

SUFFIX = " - clone"
LAB = {"vms": 2}


@pytest.fixture(scope="module")
def s(zvm_lab, start_zvm):
    return protected_site(zvm_lab, start_zvm, key="cl", name="vpg-clone")


def test_clone_refusals(s):
    a, b, vid = s["a"], s["b"], s["vpg"]
    assert a.post(f"/v1/vpgs/{vid}/CloneStart", json={}).status_code == 400      # checkpointId
    r = a.post(f"/v1/vpgs/{vid}/CloneStart", json={"CheckpointId": "123456789"})
    assert r.status_code == 409 and "not recoverable" in r.json()["detail"], r.text
    k = a.ok("GET", f"/v1/vpgs/{vid}/checkpoints")[-1]["CheckpointIdentifier"]
    r = a.post(f"/v1/vpgs/{vid}/CloneStart", json={"CheckpointId": k, "DatastoreIdentifier": "ds-nope"})
    assert r.status_code == 400 and "ds-nope" in r.json()["detail"], r.text
    r = a.post(f"/v1/vpgs/{vid}/CloneAbort")
    assert r.status_code == 409, r.text
    assert recovery_vms(s["lab"], SUFFIX) == [] and images(b, vid) == []


def test_clone_is_an_independent_copy_at_the_checkpoint(s):
    a, b, lab, vid = s["a"], s["b"], s["lab"], s["vpg"]
    scribble(lab, site_vms(lab), seed=31)
    k = tagged(a, vid, "clone-me")
    at_k = source_hashes(lab)
    scribble(lab, site_vms(lab), seed=32)
    first = sorted(v["name"] for v in site_vms(lab))[0]
    vm_id = next(v["VmIdentifier"] for v in s["vms"] if v["VmName"] == first)
    tid = a.ok("POST", f"/v1/vpgs/{vid}/CloneStart", json={"CheckpointId": str(k),
                                                          "VmIdentifiers": [vm_id]})
    assert a.post(f"/v1/vpgs/{vid}/FailoverTest", json={}).status_code == 409
    t = a.wait_task(tid, 120)
    assert [x["Step"] for x in t["Steps"]] == ["forward:mark", "forward:open_images",
                                               "forward:create_vms", "forward:copy_disks",
                                               "forward:release", "forward:unmark"]
    [clone] = recovery_vms(lab, SUFFIX)
    assert clone["name"] == first + SUFFIX and clone["power_state"] == "poweredOff"
    full = lab.api("site-b", "GET", f"/api/vms/{clone['name']}")
    assert all(d.get("path") and not d.get("image") for d in full["disks"])   # plain files
    for (name, disk), h in at_k.items():
        if name == first:
            assert lab.disk_hash(clone["name"], disk) == h
    assert images(b, vid) == []                   # the image set is gone; the clone stays
    assert a.ok("GET", f"/v1/vpgs/{vid}")["ActiveProcessesApi"] is None
    # independent: powered on and written, the clone changes; the source does not
    lab.power(clone["name"], True)
    before = lab.disk_hash(first, 0)
    lab.api("site-b", "POST", f"/api/vms/{clone['name']}/write",
            json={"disk": 0, "offset": 4096, "data": "Y2xvbmU="})
    assert lab.disk_hash(clone["name"], 0) != at_k[(first, 0)]
    assert lab.disk_hash(first, 0) == before
    assert wait_until(lambda: a.ok("GET", f"/v1/vpgs/{vid}")["Status"] == 1, 30, 0.3, "MeetingSLA")
    rep = wait_until(lambda: (lambda r: r if r["General"]["Status"] == "Passed" else None)(
        a.ok("GET", f"/v1/reports/recovery/{tid}")), 10, 0.1, "the clone's report")
    assert rep["General"]["RecoveryType"] == "Clone"
    assert [v["VmName"] for v in rep["RecoverySettings"]["Vms"]] == [first + SUFFIX]
    lab.power(clone["name"], False)
    lab.api("site-b", "DELETE", f"/api/vms/{clone['name']}")


def test_clone_abort_removes_what_it_made(s):
    a, b, lab, vid = s["a"], s["b"], s["lab"], s["vpg"]
    k = a.ok("GET", f"/v1/vpgs/{vid}/checkpoints")[-1]["CheckpointIdentifier"]
    tid = a.ok("POST", f"/v1/vpgs/{vid}/CloneStart", json={"CheckpointId": k})
    assert a.ok("POST", f"/v1/vpgs/{vid}/CloneAbort") == tid
    t = wait_state(a, tid, (4, 5), 60)
    assert t["Status"]["State"] == 5, t                       # Stopped by the user
    assert recovery_vms(lab, SUFFIX) == [] and images(b, vid) == []
    assert a.ok("GET", f"/v1/vpgs/{vid}")["ActiveProcessesApi"] is None
    rep = wait_until(lambda: (lambda r: r if r["General"]["Status"] == "Aborted" else None)(
        a.ok("GET", f"/v1/reports/recovery/{tid}")), 10, 0.1, "the abort's report")
    assert "aborted" in rep["General"]["Notes"].lower()
