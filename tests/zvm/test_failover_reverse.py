"""Live Failover committed WITH reverse protection, end to end on a lab: the failover runs at the
latest tagged checkpoint, FailoverCommit {IsReverseProtection: true} at the recovery site's ZVM;
afterwards the VPG (same id, sites swapped) protects the recovered VMs from site-b back to
site-a, the reverse delta sync moves (almost) nothing, the VPG meets its SLA at both sites, and
a write made in a recovered VM after the failover is in site-a's replica at a later checkpoint."""
from __future__ import annotations

import base64
import re

from recoverylab import (b_hash, images, protected_site, scribble, site_b_vms, site_vms,
                         source_hashes, tagged, wait_state)
from test_vpgs import doc, recovery_hash, vpg
from waiting import wait_until


def test_failover_committed_with_reverse_protection(zvm_lab, start_zvm):
    s = protected_site(zvm_lab, start_zvm, key="fr", name="vpg-fr")
    a, b, lab, vid = s["a"], s["b"], s["lab"], s["vpg"]
    scribble(lab, site_vms(lab), seed=51)
    k = tagged(a, vid, "failover-here")
    at_k = source_hashes(lab)
    tid = a.ok("POST", f"/v1/vpgs/{vid}/Failover", json={
        "CheckpointIdentifier": str(k), "CommitPolicy": 2, "ShutdownPolicy": 1})
    wait_state(a, tid, (2,), 120)
    assert all(v["power_state"] == "poweredOff" for v in site_vms(lab))
    for (name, disk), h in at_k.items():
        assert b_hash(lab, name, disk) == h, f"{name} disk {disk} at checkpoint {k}"

    assert b.ok("POST", f"/v1/vpgs/{vid}/FailoverCommit", json={"IsReverseProtection": True}) == tid
    t = wait_state(b, tid, (6,), 300)
    notes = " ".join(n for x in t["Steps"] for n in x.get("Notes") or [])
    m = re.search(r"reverse delta sync: (\d+) blocks differed, (\d+) sent", notes)
    assert m, notes
    assert int(m.group(2)) <= 16               # the original disks hold the checkpoint already
    # the same VPG, sites swapped: protected at site-b, its recovery site site-a
    for z in (a, b):
        v = vpg(z, vid)
        assert (v["ProtectedSiteName"], v["RecoverySiteName"]) == ("site-b", "site-a"), v
    assert doc(b, "vpgs", vid)["role"] == "protected" and doc(a, "vpgs", vid)["role"] == "recovery"
    assert images(a, vid) == [] and site_vms(lab) == []     # the originals' disks are the replicas
    rec = site_b_vms(lab)
    assert sorted(rec) == sorted({n for n, _ in at_k})
    assert all(v["power_state"] == "poweredOn" for v in rec.values())
    for z in (b, a):
        wait_until(lambda: vpg(z, vid)["Status"] == 1, 60, 0.3,
                   f"the reversed VPG to meet its SLA at {z.site_name}")
    report = a.ok("GET", f"/v1/reports/recovery/{tid}")
    assert report["General"]["RecoveryType"] == "Failover" and report["General"]["Status"] == "Passed"
    assert "reverse protection" in report["General"]["Notes"]

    # writes made in the recovered VMs after the failover reach site-a's replicas
    for i, x in enumerate(sorted(rec.values(), key=lambda x: x["name"])):
        lab.api("site-b", "POST", f"/api/vms/{x['name']}/write", json={
            "disk": 0, "offset": 12288 * (i + 1),
            "data": base64.b64encode(f"after the failover {i}".encode() * 100).decode()})
    assert any(b_hash(lab, n, d) != h for (n, d), h in at_k.items())
    k2 = tagged(b, vid, "back-home")
    assert [c for c in a.ok("GET", f"/v1/vpgs/{vid}/checkpoints") if c["Tag"] == "back-home"]
    for x in rec.values():
        for d in x["disks"]:
            assert recovery_hash(a, vid, x["instance_uuid"], d["index"], k2) == \
                b_hash(lab, x["name"], d["index"]), f"{x['name']} disk {d['index']} at site-a"
    assert not b.alerts("VPG0009") and not b.alerts("VPG0010")
