"""Live Failover end to end on a lab: two real ZVMs paired, VRAs on every host, a VPG; the
failover runs at the recovery site's ZVM while the requests go to the protected one (forwarded).

Failover to an OLDER checkpoint (not the latest): the recovered VMs' disks equal the source
disks as they were at that checkpoint; FailoverRollback: the recovered VMs are gone, the source
VMs run again, the VPG meets its SLA and a later image equals the source (nothing lost). Wrong
state -> 409, bad bodies -> 400, nothing changed.
"""
from __future__ import annotations

from recoverylab import (b_hash, images, protected_site, scribble, site_b_vms, site_vms,
                         source_hashes, tagged, wait_state)
from test_vpgs import check_images, vpg
from waiting import wait_until


_S: dict = {}


def test_failover_to_an_older_checkpoint_then_rollback(zvm_lab, start_zvm):
    s = protected_site(zvm_lab, start_zvm, key="fo", name="vpg-fo")
    _S.update(s)
    a, b, lab, vid = s["a"], s["b"], s["lab"], s["vpg"]
    scribble(lab, site_vms(lab), seed=21)
    k1 = tagged(a, vid, "older")
    at_k1 = source_hashes(lab)
    scribble(lab, site_vms(lab), seed=22)
    k2 = tagged(a, vid, "newer")
    assert k2 > k1 and source_hashes(lab) != at_k1

    # bad bodies: 400, wrong state: 409, nothing changed
    for body in ({"CommitPolicy": 7}, {"ShutdownPolicy": "yes"}, {"CheckpointIdentifier": "abc"},
                 {"VmIdentifiers": ["vm-nope"]}, {"TimeToWaitBeforeShutdownInSec": -1}):
        r = a.post(f"/v1/vpgs/{vid}/Failover", json=body)
        assert r.status_code == 400, (body, r.text)
    assert a.post(f"/v1/vpgs/{vid}/Failover", json={"CheckpointIdentifier": "999999"}).status_code == 409
    assert a.post(f"/v1/vpgs/{vid}/FailoverCommit", json={}).status_code == 409
    assert b.post(f"/v1/vpgs/{vid}/FailoverRollback").status_code == 409
    assert a.post("/v1/vpgs/nope/Failover", json={}).status_code == 404
    assert vpg(a, vid)["Status"] == 1 and not images(b, vid)

    tid = a.ok("POST", f"/v1/vpgs/{vid}/Failover", json={
        "CheckpointIdentifier": str(k1), "CommitPolicy": 2, "ShutdownPolicy": 1})
    t = wait_state(a, tid, (2,), 120)                     # polled at the protected ZVM
    assert t["Type"] == "Failover" and b.ok("GET", f"/v1/tasks/{tid}")["Status"]["State"] == 2
    for z in (a, b):
        v = vpg(z, vid)
        assert (v["Status"], v["SubStatus"]) == (5, 15), v
    assert a.post(f"/v1/vpgs/{vid}/Failover", json={}).status_code == 409      # busy
    assert a.post(f"/v1/vpgs/{vid}/Move", json={}).status_code == 409
    # the source VMs were shut down; the recovered VMs run at site-b on the older checkpoint
    assert all(v["power_state"] == "poweredOff" for v in site_vms(lab))
    rec = site_b_vms(lab)
    names = sorted(v["name"] for v in site_vms(lab))
    assert sorted(rec) == names and all(rec[n]["power_state"] == "poweredOn" for n in names)
    for (name, disk), h in at_k1.items():
        assert b_hash(lab, name, disk) == h, f"{name} disk {disk} at checkpoint {k1}"
    assert len(images(b, vid)) == 1

    # rollback through the protected ZVM: the same task, Stopped
    assert a.ok("POST", f"/v1/vpgs/{vid}/FailoverRollback") == tid
    assert a.post(f"/v1/vpgs/{vid}/FailoverCommit", json={}).status_code == 409   # decided
    t = wait_state(a, tid, (5,), 300)
    assert "rolled back" in t["CompleteReason"]
    assert site_b_vms(lab) == {} and images(b, vid) == []
    assert all(v["power_state"] == "poweredOn" for v in site_vms(lab))
    wait_until(lambda: vpg(a, vid)["Status"] == 1 and vpg(b, vid)["Status"] == 1, 60, 0.3,
               "MeetingSLA again on both sites")
    scribble(lab, site_vms(lab), seed=23)
    k3 = tagged(a, vid, "after-rollback")
    check_images(s, vid, k3)
    report = a.ok("GET", f"/v1/reports/recovery/{tid}")
    assert report["General"]["RecoveryType"] == "Failover" and report["General"]["Status"] == "Stopped"


def test_failover_committed_by_its_policy_after_the_timeout():
    """Commit policy Commit with a 2 s wait: nobody decides, the failover commits by itself;
    the recovered VMs keep running on plain disks (the replicas) equal to the checkpoint, the
    VPG is Recovered at both sites, the source VMs stay shut down."""
    if not _S:
        import pytest
        pytest.skip("needs the VPG of the test before")
    s = _S
    a, b, lab, vid = s["a"], s["b"], s["lab"], s["vpg"]
    scribble(lab, site_vms(lab), seed=31)
    k = tagged(a, vid, "commit-me")
    at_k = source_hashes(lab)
    tid = a.ok("POST", f"/v1/vpgs/{vid}/Failover", json={
        "CheckpointIdentifier": str(k), "CommitPolicy": 1, "TimeToWaitBeforeShutdownInSec": 2,
        "ShutdownPolicy": 1, "IsReverseProtection": False})
    t = wait_state(a, tid, (6,), 300)
    assert any("commit" in x["Step"] for x in t["Steps"]), t["Steps"]
    rec = site_b_vms(lab)
    assert sorted(rec) == sorted(n for n, _ in at_k)
    for (name, disk), h in at_k.items():
        assert b_hash(lab, name, disk) == h, f"{name} disk {disk} at checkpoint {k}"
        v = lab.api("site-b", "GET", f"/api/vms/{name}")
        assert v["power_state"] == "poweredOn" and not v["disks"][disk].get("image"), v
    assert images(b, vid) == []
    assert all(v["power_state"] == "poweredOff" for v in site_vms(lab))
    wait_until(lambda: vpg(a, vid)["Status"] == 8 and vpg(b, vid)["Status"] == 8, 30, 0.3,
               "the VPG to show Recovered at both sites")
    # the recovered VMs are ordinary VMs now: a write lands in their plain disk
    name = sorted(rec)[0]
    lab.api("site-b", "POST", f"/api/vms/{name}/write",
            json={"disk": 0, "offset": 0, "data": "Y29tbWl0dGVk"})
    assert b_hash(lab, name, 0) != at_k[(name, 0)]
