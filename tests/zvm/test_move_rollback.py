"""Move end to end on a lab, the two ways it can end besides a commit with reverse protection
(test_move.py): one VPG, moved twice.

1. Move, then moveRollback (asked at the recovery site's ZVM): the recovered VMs are gone, the
   source VMs run again with their disks unchanged, the VPG is protected from site-a again,
   meets its SLA and replicates (a later image equals the source).
2. Move committed WITHOUT reverse protection while a workload writes until the shutdown: the
   recovered VMs run at site-b on plain disks equal to the source disks at the shutdown (nothing
   lost), the VPG is Recovered at both sites with replication off (the recovery VRA keeps no
   journal, the protected VRAs stream nothing), the source VMs are removed from site-a's
   inventory with their disk files kept, and the VPG takes no other recovery operation.
"""
from __future__ import annotations

import time
from pathlib import Path

from recoverylab import (b_hash, images, protected_site, scribble, site_b_vms, site_vms,
                         source_hashes, tagged, vra_get, wait_state)
from test_vpgs import check_images, doc, vpg
from waiting import wait_until


_S: dict = {}


def test_move_then_rollback(zvm_lab, start_zvm):
    s = protected_site(zvm_lab, start_zvm, key="mvr", name="vpg-mvr")
    _S.update(s)
    a, b, lab, vid = s["a"], s["b"], s["lab"], s["vpg"]
    scribble(lab, site_vms(lab), seed=41)
    tagged(a, vid, "before-move")
    before = source_hashes(lab)
    assert b.post(f"/v1/vpgs/{vid}/moveRollback").status_code == 409          # no move runs

    tid = b.ok("POST", f"/v1/vpgs/{vid}/Move", json={"CommitPolicy": 2, "ReverseProtection": True})
    t = wait_state(a, tid, (2,), 120)
    assert t["Type"] == "Move"
    for z in (a, b):
        v = vpg(z, vid)
        assert (v["Status"], v["SubStatus"]) == (6, 19), v                   # Moving, BeforeCommit
    assert all(v["power_state"] == "poweredOff" for v in site_vms(lab))
    rec = site_b_vms(lab)
    assert sorted(rec) == sorted(n for n, _ in before)
    assert all(v["power_state"] == "poweredOn" for v in rec.values())
    for (name, disk), h in before.items():
        assert b_hash(lab, name, disk) == h, f"{name} disk {disk}"
    # a write in a recovered VM before the rollback lands in the image's scratch only
    name = sorted(rec)[0]
    lab.api("site-b", "POST", f"/api/vms/{name}/write",
            json={"disk": 0, "offset": 4096, "data": "dGhyb3duIGF3YXk="})
    assert len(images(b, vid)) == 1

    assert b.ok("POST", f"/v1/vpgs/{vid}/moveRollback") == tid
    assert a.post(f"/v1/vpgs/{vid}/MoveCommit", json={}).status_code == 409   # decided
    t = wait_state(a, tid, (5,), 240)
    assert "rolled back" in t["CompleteReason"], t
    assert site_b_vms(lab) == {} and images(b, vid) == []
    assert all(v["power_state"] == "poweredOn" for v in site_vms(lab))
    assert source_hashes(lab) == before                                      # unchanged
    # protected from site-a again, as before the move
    assert doc(a, "vpgs", vid)["role"] == "protected" and doc(b, "vpgs", vid)["role"] == "recovery"
    v = vpg(a, vid)
    assert v["ProtectedSiteName"] == "site-a" and v["RecoverySiteName"] == "site-b"
    wait_until(lambda: vpg(a, vid)["Status"] == 1 and vpg(b, vid)["Status"] == 1, 60, 0.3,
               "MeetingSLA again on both sites")
    v = vpg(a, vid)
    assert v["SubStatus"] == 0 and not v["ActiveProcessesApi"], v
    scribble(lab, site_vms(lab), seed=42)
    k = tagged(a, vid, "after-rollback")
    check_images(s, vid, k)
    report = a.ok("GET", f"/v1/reports/recovery/{tid}")
    assert report["General"]["RecoveryType"] == "Move" and report["General"]["Status"] == "Stopped"


def test_move_committed_without_reverse_protection():
    if not _S:
        import pytest
        pytest.skip("needs the VPG of the test before")
    s = _S
    a, b, lab, vid = s["a"], s["b"], s["lab"], s["vpg"]
    vms = site_vms(lab)
    src_docs = {m["name"]: m for m in doc(a, "vpgs", vid)["vms"]}
    protected_vras = [e["identifier"] for e in doc(a, "vpgs", vid)["protectedVras"]]
    recovery_vra = doc(b, "vpgs", vid)["recoveryVra"]["identifier"]
    for v in vms:
        lab.workload(v["name"], {"action": "start", "spec": {"seed": 6, "iops": 200, "mbps": 2}})
    time.sleep(1.5)
    tid = a.ok("POST", f"/v1/vpgs/{vid}/Move", json={"CommitPolicy": 2, "ReverseProtection": False})
    wait_state(a, tid, (2,), 120)
    assert all(v["power_state"] == "poweredOff" for v in site_vms(lab))
    at_shutdown = {(v["name"], d["index"]): lab.disk_hash(v["name"], d["index"])
                   for v in vms for d in v["disks"]}
    for (name, disk), h in at_shutdown.items():
        assert b_hash(lab, name, disk) == h, f"{name} disk {disk}: a write was lost"

    assert b.ok("POST", f"/v1/vpgs/{vid}/MoveCommit", json={"ReverseProtection": False}) == tid
    t = wait_state(a, tid, (6,), 240)
    steps = [x["Step"] for x in t["Steps"]]
    assert not any("reverse_protect" in x for x in steps), steps
    # the VPG: Recovered at both sites, sites not swapped, replication off
    for z in (a, b):
        v = wait_until(lambda: (lambda x: x if x["Status"] == 8 else None)(vpg(z, vid)), 30, 0.3,
                       f"Recovered at {z.site_name}")
        assert v["SubStatus"] == 0 and v["ProtectedSiteName"] == "site-a", v
        assert not v["ActiveProcessesApi"], v
    assert doc(a, "vpgs", vid)["role"] == "protected" and doc(b, "vpgs", vid)["role"] == "recovery"
    assert vra_get(b, recovery_vra, f"/v1/recovery/vpgs/{vid}/usage").status_code == 404   # no journal
    for vra in protected_vras:
        st = vra_get(a, vra, "/v1/status").json()
        assert vid not in (((st.get("protected") or {}).get("vpgs")) or {}), st["protected"]
    # the recovered VMs: running at site-b on plain disks (no image set) equal to the shutdown
    rec = site_b_vms(lab)
    assert sorted(rec) == sorted(src_docs)
    assert images(b, vid) == []
    for (name, disk), h in at_shutdown.items():
        v = lab.api("site-b", "GET", f"/api/vms/{name}")
        assert v["power_state"] == "poweredOn" and not v["disks"][disk].get("image"), v
        assert b_hash(lab, name, disk) == h, f"{name} disk {disk} after the commit"
    # the source VMs: removed from site-a (commit policy of a move), their disk files kept
    assert site_vms(lab) == []
    for m in src_docs.values():
        for d in m["disks"]:
            assert Path(d["path"]).is_file(), d
    # still Recovered after a few monitor passes; no other recovery operation takes it
    time.sleep(1.5)
    assert vpg(a, vid)["Status"] == 8 and vpg(b, vid)["Status"] == 8
    for op, body in (("Move", {}), ("Failover", {}), ("FailoverTest", {}),
                     ("CloneStart", {"CheckpointId": "1"})):
        r = a.post(f"/v1/vpgs/{vid}/{op}", json=body)
        assert r.status_code == 409 and "recovered" in r.json()["detail"].lower(), (op, r.text)
    report = b.ok("GET", f"/v1/reports/recovery/{tid}")
    assert report["General"]["RecoveryType"] == "Move" and report["General"]["Status"] == "Passed"
    # deleting the recovered VPG forgets it at both sites; the moved VMs keep running on their disks
    a.wait_task(a.ok("DELETE", f"/v1/vpgs/{vid}"), 60)
    assert a.get(f"/v1/vpgs/{vid}").status_code == 404 and b.get(f"/v1/vpgs/{vid}").status_code == 404
    for (name, disk), h in at_shutdown.items():
        assert b_hash(lab, name, disk) == h, f"{name} disk {disk} after the VPG was deleted"
