"""The protected site comes back while a live Failover waits for its commit, end to end on a lab.

Three VPGs of one VM each. site-a fails as a whole (hosts, VRAs, VMs crash; its ZVM stops);
site-b's ZVM fails both VPGs over (commit policy None: the failovers wait for the user; shutdown
policy Shutdown, which site-a cannot take now). site-a comes back: its hosts restart its VMs
and its VRAs stream the VPGs again from their saved protection. While waiting, each failover
does at site-a what it could not do before (operations.failover.LiveRecovery.catch_up_source):
the VPG shows FailingOver / BeforeCommit there too, replication stops, the restarted source VMs
are shut down, each in a few seconds (no drain timeout: appliance/vra/protected.py unprotect).

Then one failover is committed (no reverse protection): Recovered at both sites, no history
left (GET checkpoints answers an empty list at both), its source VM stays off, the recovered
VM runs on with the checkpoint's data, report Passed. The other is rolled back: its recovered
VM is gone, its source VM runs again, replication resumes (delta sync) and meets its SLA at
both sites, and a checkpoint after new writes equals the source.

The third failover is rolled back while site-a is still down: the rollback ends at site-b
(the recovered VM gone, MeetingSLA there) and leaves site-a's part for when it answers again
(operations.source.tell_protected_site): replication resumes there with a delta sync, its
VM (restarted with its host) runs on, and a later checkpoint equals the source.
"""
from __future__ import annotations

import time

from recoverylab import FAST, b_hash, images, site_b_vms, vra_get, wait_state
from test_vpgs import (doc, install_vras, inv, recovery_hash, scribble, settings_body, site_vms,
                       tagged, vpg)
from waiting import wait_until
from zvmproc import pair

LAB = {"vms": 3}


def a_vm(lab, name) -> dict:
    return next(v for v in site_vms(lab) if v["name"] == name)


def replicates(lab, a, b, vid: str, name: str, seed: int, tag: str, when: str) -> None:
    """New writes in VM ``name`` reach site-b: at a checkpoint tagged after them, each of its
    disks there equals the source."""
    scribble(lab, [a_vm(lab, name)], seed=seed)
    k = tagged(a, vid, tag)
    v = a_vm(lab, name)
    for d in v["disks"]:
        assert recovery_hash(b, vid, v["instance_uuid"], d["index"], k) == \
            lab.disk_hash(v["name"], d["index"]), f"{v['name']} disk {d['index']} {when}"


def test_protected_site_back_while_the_failover_waits_for_its_commit(zvm_lab, start_zvm):
    lab = zvm_lab
    a = start_zvm("site-a", key="sb-a", **FAST)
    b = start_zvm("site-b", key="sb-b", **FAST)
    pair(a, b)
    install_vras(a)
    install_vras(b)
    vms = sorted((v for v in inv(a, "vms") if not v["VmName"].startswith("Z-VRA")),
                 key=lambda v: v["VmName"])
    assert len(vms) == 3
    scribble(lab, site_vms(lab), seed=71)
    tasks = {}
    for role, vm in zip(("commit", "rollback", "down"), vms):
        sid = a.ok("POST", "/v1/vpgSettings", json=settings_body(a, b, f"vpg-back-{role}", [vm]))
        tasks[role] = (a.ok("POST", f"/v1/vpgSettings/{sid}/commit"), vm["VmName"])
    vids, names = {}, {}
    for role, (tid, name) in tasks.items():
        a.wait_task(tid, 180)
        [v] = [x for x in a.ok("GET", "/v1/vpgs") if x["VpgName"] == f"vpg-back-{role}"]
        vids[role], names[role] = v["VpgIdentifier"], name
    for vid in vids.values():
        wait_until(lambda: vpg(a, vid)["Status"] == 1, 60, 0.3, "MeetingSLA")
    scribble(lab, site_vms(lab), seed=72)
    at_k = {}
    for role, vid in vids.items():
        tagged(a, vid, "last-words")
        v = a_vm(lab, names[role])
        at_k[role] = {d["index"]: lab.disk_hash(v["name"], d["index"]) for d in v["disks"]}
    protected_vras = {role: [e["identifier"] for e in doc(a, "vpgs", vid)["protectedVras"]]
                      for role, vid in vids.items()}

    lab.fail_site("site-a")
    a.stop()
    wait_until(lambda: b.alerts("ZVM0002"), 30, 0.3, "site-b to raise ZVM0002 for site-a")
    fo = {role: b.ok("POST", f"/v1/vpgs/{vid}/Failover", json={"CommitPolicy": 2, "ShutdownPolicy": 1})
          for role, vid in vids.items()}
    for role, tid in fo.items():
        t = wait_state(b, tid, (2,), 120)
        notes = " ".join(n for x in t["Steps"] for n in x.get("Notes") or [])
        assert "does not answer" in notes, notes
        assert (vpg(b, vids[role])["Status"], vpg(b, vids[role])["SubStatus"]) == (5, 15)
    rec = site_b_vms(lab)
    assert sorted(rec) == sorted(names.values())
    assert all(x["power_state"] == "poweredOn" for x in rec.values())
    for role, hashes in at_k.items():
        for disk, h in hashes.items():
            assert b_hash(lab, names[role], disk) == h, f"{names[role]} disk {disk} at the checkpoint"

    # one is rolled back while site-a is still down: done here, site-a's part left for later
    down = vids["down"]
    assert b.ok("POST", f"/v1/vpgs/{down}/FailoverRollback") == fo["down"]
    t = wait_state(b, fo["down"], (5,), 300)
    notes = " ".join(n for x in t["Steps"] for n in x.get("Notes") or [])
    assert "it is told when it answers again" in notes, notes
    assert names["down"] not in site_b_vms(lab) and images(b, down) == []
    assert vpg(b, down)["Status"] == 1
    assert doc(b, "vpgs", down)["_sourcePending"]["resume"]
    assert b.ok("GET", f"/v1/reports/recovery/{fo['down']}")["General"]["Status"] == "Stopped"
    del fo["down"]

    # site-a comes back before anyone decides: hosts (VMs restart), VRAs, then its ZVM
    lab.restore_site("site-a")
    t0 = time.monotonic()
    a.start()
    wait_until(lambda: not b.alerts("ZVM0002"), 30, 0.3, "site-b to clear ZVM0002")
    for role, tid in fo.items():
        vid = vids[role]
        wait_until(lambda: (vpg(a, vid)["Status"], vpg(a, vid)["SubStatus"]) == (5, 15), 60, 0.3,
                   f"site-a to show {role}'s VPG failing over, before commit")
        wait_until(lambda: "answers again" in " ".join(
            n for x in b.ok("GET", f"/v1/tasks/{fo[role]}")["Steps"] for n in x.get("Notes") or []),
            60, 0.3, f"the {role} failover to catch up with site-a")
    caught_up = time.monotonic() - t0
    print(f"site-a caught up {caught_up:.1f} s after its ZVM started")
    # two graceful power-offs right after replication stopped: no 10 s drain wait each
    assert caught_up < 60, caught_up
    assert all(v["power_state"] == "poweredOff" for v in site_vms(lab)
               if v["name"] != names["down"]), site_vms(lab)
    for role, ids in protected_vras.items():
        if role == "down":
            continue
        for vra_id in ids:
            st = vra_get(a, vra_id, "/v1/status").json()
            assert vids[role] not in (((st.get("protected") or {}).get("vpgs")) or {}), st["protected"]
    for role, tid in fo.items():
        assert b.ok("GET", f"/v1/tasks/{tid}")["Status"]["State"] == 2   # still waiting
    # the one rolled back while site-a was down: replication resumed there (delta sync)
    wait_until(lambda: doc(b, "vpgs", down).get("_sourcePending") is None, 60, 0.3,
               "site-b to tell site-a the failover was rolled back")
    assert any("after the failover was rolled back: replication resumed" in e["Description"]
               for e in b.ok("GET", "/v1/events"))
    assert a_vm(lab, names["down"])["power_state"] == "poweredOn"
    wait_until(lambda: vpg(a, down)["Status"] == 1 and vpg(b, down)["Status"] == 1, 90, 0.3,
               "the VPG rolled back while site-a was down to meet its SLA at both sites")

    # commit the one: Recovered at both sites, no history left, its source VM stays off
    vid = vids["commit"]
    assert b.ok("POST", f"/v1/vpgs/{vid}/FailoverCommit", json={"IsReverseProtection": False}) == fo["commit"]
    wait_state(b, fo["commit"], (6,), 240)
    for z in (b, a):
        wait_until(lambda: vpg(z, vid)["Status"] == 8, 30, 0.3, f"Recovered at {z.site_name}")
        assert z.ok("GET", f"/v1/vpgs/{vid}/checkpoints") == []
        assert not any(z.ok("GET", f"/v1/vpgs/{vid}/checkpoints/stats").values())
    assert doc(b, "vpgs", vid).get("_sourcePending") is None        # told at once, nothing left
    assert images(b, vid) == []
    report = b.ok("GET", f"/v1/reports/recovery/{fo['commit']}")
    assert report["General"]["RecoveryType"] == "Failover" and report["General"]["Status"] == "Passed"

    # roll the other back: its source VM runs again, replication resumes at both sites
    vid = vids["rollback"]
    assert b.ok("POST", f"/v1/vpgs/{vid}/FailoverRollback") == fo["rollback"]
    t = wait_state(b, fo["rollback"], (5,), 300)
    assert "rolled back" in t["CompleteReason"]
    assert sorted(site_b_vms(lab)) == [names["commit"]] and images(b, vid) == []
    assert a_vm(lab, names["rollback"])["power_state"] == "poweredOn"
    assert a_vm(lab, names["commit"])["power_state"] == "poweredOff"
    wait_until(lambda: vpg(a, vid)["Status"] == 1 and vpg(b, vid)["Status"] == 1, 90, 0.3,
               "the rolled-back VPG to meet its SLA at both sites")
    report = b.ok("GET", f"/v1/reports/recovery/{fo['rollback']}")
    assert report["General"]["Status"] == "Stopped"
    replicates(lab, a, b, vid, names["rollback"], 73, "after-rollback", "after the rollback")
    replicates(lab, a, b, down, names["down"], 74, "after-return", "after site-a's return")

    time.sleep(2)                                   # a few monitor passes on both sites
    assert vpg(a, vids["commit"])["Status"] == 8 and vpg(b, vids["commit"])["Status"] == 8
    for x in (vid, down):
        assert vpg(a, x)["Status"] == 1 and vpg(b, x)["Status"] == 1
    assert a_vm(lab, names["commit"])["power_state"] == "poweredOff"
    for disk, h in at_k["commit"].items():
        assert b_hash(lab, names["commit"], disk) == h, "the recovered VM's disk changed"
