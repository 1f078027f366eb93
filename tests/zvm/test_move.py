"""Move with reverse protection end to end on a lab, with the recovery site's ZVM restarted in
the middle: a workload writes until the shutdown; the recovered VMs' disks equal the source
disks at the shutdown (nothing lost); after MoveCommit the VPG protects the recovered VMs back
to the original site (sites swapped, same VPG id), the delta sync moves (almost) nothing, it
reaches MeetingSLA and its image at a checkpoint equals the recovered VMs' disks."""
from __future__ import annotations

import re
import time

from recoverylab import images, protected_site, site_vms, wait_state
from test_vpgs import doc, recovery_hash, vpg
from waiting import wait_until


def a_hash(lab, name, disk):
    return lab.api("site-a", "GET", f"/api/vms/{name}/disks/{disk}/hash")["sha256"]


def b_hash(lab, name, disk):
    return lab.api("site-b", "GET", f"/api/vms/{name}/disks/{disk}/hash")["sha256"]


def test_move_with_reverse_protection_and_a_restart(zvm_lab, start_zvm):
    s = protected_site(zvm_lab, start_zvm, key="mv", name="vpg-mv")
    a, b, lab, vid = s["a"], s["b"], s["lab"], s["vpg"]
    vms = site_vms(lab)
    for v in vms:
        lab.workload(v["name"], {"action": "start", "spec": {"seed": 5, "iops": 200, "mbps": 2}})
    time.sleep(2)
    assert a.post(f"/v1/vpgs/{vid}/Move", json={"CommitPolicy": 9}).status_code == 400
    assert a.post(f"/v1/vpgs/{vid}/MoveCommit", json={}).status_code == 409
    tid = a.ok("POST", f"/v1/vpgs/{vid}/Move", json={"CommitPolicy": 2, "ReverseProtection": True})
    time.sleep(1.0)
    b.stop()                                     # the recovery site's ZVM, in the middle
    b.start()
    t = wait_state(a, tid, (2,), 240)
    assert any(x["Step"].startswith("forward:") for x in t["Steps"])
    assert all(v["power_state"] == "poweredOff" for v in site_vms(lab))
    at_shutdown = {(v["name"], d["index"]): a_hash(lab, v["name"], d["index"])
                   for v in vms for d in v["disks"]}
    for (name, disk), h in at_shutdown.items():
        assert b_hash(lab, name, disk) == h, f"{name} disk {disk}: a write was lost"
    assert (vpg(b, vid)["Status"], vpg(b, vid)["SubStatus"]) == (6, 19)

    assert a.ok("POST", f"/v1/vpgs/{vid}/MoveCommit", json={"ReverseProtection": True}) == tid
    t = wait_state(a, tid, (6,), 300)
    notes = " ".join(n for x in t["Steps"] for n in x.get("Notes") or [])
    m = re.search(r"reverse delta sync: (\d+) blocks differed, (\d+) sent", notes)
    assert m, notes
    print("reverse delta sync:", m.group(0))
    assert int(m.group(2)) <= 16                # the original disks already hold the data
    # the VPG keeps its identity, sites swapped
    v = vpg(b, vid)
    assert v["ProtectedSiteName"] == "site-b" and v["RecoverySiteName"] == "site-a"
    assert doc(a, "vpgs", vid)["role"] == "recovery" and doc(b, "vpgs", vid)["role"] == "protected"
    assert images(a, vid) == [] and site_vms(lab) == []      # originals gone (their disks kept)
    # writes on the recovered VMs flow back; the image at a checkpoint equals their disks
    rec = [x for x in lab.status()["sites"][1]["vms"] if not x["name"].startswith("Z-VRA")]
    for x in rec:
        lab.api("site-b", "POST", f"/api/vms/{x['name']}/write",
                json={"disk": 0, "offset": 8192, "data": "cmV2ZXJzZQ=="})
    b.wait_task(b.ok("POST", f"/v1/vpgs/{vid}/checkpoints", json={"CheckpointName": "back"}), 90)
    k = int(next(c for c in b.ok("GET", f"/v1/vpgs/{vid}/checkpoints") if c["Tag"] == "back")
            ["CheckpointIdentifier"])
    for x in rec:
        for d in x["disks"]:
            assert recovery_hash(a, vid, x["instance_uuid"], d["index"], k) == \
                b_hash(lab, x["name"], d["index"])
    wait_until(lambda: vpg(b, vid)["Status"] == 1, 60, 0.5, "the reversed VPG to meet its SLA")
