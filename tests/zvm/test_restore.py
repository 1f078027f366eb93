"""Per-VM Restore end to end on a lab: one VM of a VPG restored at the recovery site to an older
checkpoint while the VPG keeps replicating; rollback removes it; a second restore is committed
(its disks copied into plain files by the recovery VRA, the VM rebased onto them)."""
from __future__ import annotations

from recoverylab import images, protected_site, scribble, site_vms, source_hashes, tagged, wait_state
from test_vpgs import check_images, vpg


def b_vm(lab, name):
    return next((v for v in lab.status()["sites"][1]["vms"] if v["name"] == name), None)


def b_hash(lab, name, disk):
    return lab.api("site-b", "GET", f"/api/vms/{name}/disks/{disk}/hash")["sha256"]


def test_restore_one_vm_rollback_then_commit(zvm_lab, start_zvm):
    s = protected_site(zvm_lab, start_zvm, key="rs", name="vpg-rs")
    a, b, lab, vid = s["a"], s["b"], s["lab"], s["vpg"]
    k1 = tagged(a, vid, "before")
    at_k1 = source_hashes(lab)
    scribble(lab, site_vms(lab), seed=31)
    src = s["vms"][0]
    name0 = src["VmName"]
    path = f"/v1/vms/{src['VmIdentifier']}"
    assert a.post(path + "/Restore", json={}).status_code == 400                  # no vpgIdentifier
    assert a.post(path + "/Restore", json={"VpgIdentifier": vid, "CommitPolicy": 5}).status_code == 400
    assert a.post(path + "/RestoreCommit", json=vid).status_code == 409            # none runs
    assert a.post(path + "/RestoreCommit", json={"x": 1}).status_code == 400

    tid = a.ok("POST", path + "/Restore", json={"VpgIdentifier": vid, "RestoredVmName": "r1",
                                                "CheckpointIdentifier": str(k1)})
    wait_state(a, tid, (2,), 120)
    assert b_vm(lab, "r1")["power_state"] == "poweredOn"
    assert b_hash(lab, "r1", 0) == at_k1[(name0, 0)]
    assert vpg(a, vid)["Status"] in (1, 3, 4)                # the VPG keeps replicating
    assert a.ok("POST", path + "/RestoreRollback", json=vid) == tid
    wait_state(a, tid, (5,), 120)
    assert b_vm(lab, "r1") is None and images(b, vid) == []

    tid = a.ok("POST", path + "/Restore", json={"VpgIdentifier": vid, "RestoredVmName": "r2",
                                                "CheckpointIdentifier": str(k1)})
    wait_state(a, tid, (2,), 120)
    assert a.ok("POST", path + "/RestoreCommit", json=vid) == tid
    wait_state(a, tid, (6,), 300)
    r2 = b_vm(lab, "r2")
    assert r2["power_state"] == "poweredOn" and not r2["disks"][0].get("image")
    assert b_hash(lab, "r2", 0) == at_k1[(name0, 0)] and images(b, vid) == []
    scribble(lab, site_vms(lab), seed=32)                   # replication went on all along
    check_images(s, vid, tagged(a, vid, "after-restore"))
