"""Live Failover while the protected site is down, end to end on a lab: site-a fails as a whole
(its hosts, VRAs and VMs crash, its ZVM stops); site-b's ZVM raises ZVM0002 for the unreachable
peer; the operator asks site-b's ZVM for the failover directly (site-a's cannot forward it). It
runs at the latest checkpoint site-b holds (the protected site's steps are noted as skipped),
the VMs run at site-b with the source disks as that checkpoint had them, and the commit (no
reverse protection) leaves the VPG Recovered at site-b.

Then site-a comes back (hosts, VRAs and VMs restart, its ZVM starts again): nothing breaks. The
alert clears; site-b tells site-a what it missed (operations.source.tell_protected_site): the
VPG is Recovered there too, replication stays off (its VRAs, restarted with their saved
protection, no longer stream the VPG), the source VMs its hosts restarted are shut down as the
failover's shutdown policy asked; the recovered VMs at site-b run on, their disks unchanged.
"""
from __future__ import annotations

import time

from recoverylab import (b_hash, images, protected_site, scribble, site_b_vms, site_vms,
                         source_hashes, tagged, vra_get, wait_state)
from test_vpgs import doc, vpg
from waiting import wait_until


def test_failover_while_the_protected_site_is_down(zvm_lab, start_zvm):
    s = protected_site(zvm_lab, start_zvm, key="fd", name="vpg-fd")
    a, b, lab, vid = s["a"], s["b"], s["lab"], s["vpg"]
    scribble(lab, site_vms(lab), seed=61)
    k = tagged(a, vid, "last-words")
    at_k = source_hashes(lab)
    protected_vras = [e["identifier"] for e in doc(a, "vpgs", vid)["protectedVras"]]

    lab.fail_site("site-a")
    a.stop()
    wait_until(lambda: b.alerts("ZVM0002"), 30, 0.3, "site-b to raise ZVM0002 for site-a")
    latest = int(b.ok("GET", f"/v1/vpgs/{vid}/checkpoints")[-1]["CheckpointIdentifier"])
    assert latest >= k
    tid = b.ok("POST", f"/v1/vpgs/{vid}/Failover", json={"CommitPolicy": 2, "ShutdownPolicy": 1})
    t = wait_state(b, tid, (2,), 120)
    notes = " ".join(n for x in t["Steps"] for n in x.get("Notes") or [])
    assert "does not answer" in notes, notes
    used = int(notes.split("recovered VMs running at checkpoint ")[1].split(":")[0])
    assert used >= latest, notes
    v = vpg(b, vid)
    assert (v["Status"], v["SubStatus"]) == (5, 15), v
    rec = site_b_vms(lab)
    assert sorted(rec) == sorted({n for n, _ in at_k})
    assert all(x["power_state"] == "poweredOn" for x in rec.values())
    for (name, disk), h in at_k.items():
        assert b_hash(lab, name, disk) == h, f"{name} disk {disk} at checkpoint {used}"

    assert b.ok("POST", f"/v1/vpgs/{vid}/FailoverCommit", json={"IsReverseProtection": False}) == tid
    wait_state(b, tid, (6,), 240)
    assert vpg(b, vid)["Status"] == 8 and images(b, vid) == []
    # the journal went into the recovered VMs' disks: no history is left, and the listing says
    # so (it asked the recovery VRA for a VPG it had dropped before)
    assert b.ok("GET", f"/v1/vpgs/{vid}/checkpoints") == []
    assert not any(b.ok("GET", f"/v1/vpgs/{vid}/checkpoints/stats").values())
    assert b.alerts("ZVM0002")                      # still down
    after_commit = {(n, d): b_hash(lab, n, d) for (n, d) in at_k}

    # site-a comes back: hosts (its VRAs and crashed VMs restart), then its ZVM
    lab.restore_site("site-a")
    a.start()
    wait_until(lambda: not b.alerts("ZVM0002"), 30, 0.3, "site-b to clear ZVM0002")
    wait_until(lambda: vpg(a, vid)["Status"] == 8, 30, 0.3, "site-a to show the VPG Recovered")
    assert a.ok("GET", f"/v1/vpgs/{vid}/checkpoints") == []
    # replication off, then the shutdown: a power-off does not wait for the VRA to drain a
    # stream it stopped (appliance/vra/protected.py unprotect), so this takes seconds
    wait_until(lambda: doc(b, "vpgs", vid).get("_sourcePending") is None, 30, 0.3,
               "site-b to have told site-a everything")
    # the source VMs restarted with their hosts: shut down as the failover's policy asked
    assert sorted(v["name"] for v in site_vms(lab)) == sorted(rec)
    assert all(v["power_state"] == "poweredOff" for v in site_vms(lab)), site_vms(lab)
    # site-a's VRAs came back with their saved protection: they no longer stream the VPG
    for vra_id in protected_vras:
        st = vra_get(a, vra_id, "/v1/status").json()
        assert vid not in (((st.get("protected") or {}).get("vpgs")) or {}), st["protected"]
    assert any("answers again after the failover" in e["Description"]
               for e in b.ok("GET", "/v1/events"))
    time.sleep(2)                                   # a few monitor passes on both sites
    assert vpg(a, vid)["Status"] == 8 and vpg(b, vid)["Status"] == 8
    assert not a.alerts("ZVM0002") and not b.alerts("ZVM0002")
    assert all(x["power_state"] == "poweredOn" for x in site_b_vms(lab).values())
    for (name, disk), h in after_commit.items():
        assert b_hash(lab, name, disk) == h, f"{name} disk {disk} changed after site-a came back"
