"""Journal limits in % of the journal datastore, end to end on a lab: a VPG whose journal hard
limit is 2% of its datastore and whose warning threshold is 1% or 5 MB. The recovery VRA holds
them in bytes of that datastore's capacity (the smaller of the two for the warning), the
protected site learns them with its status, and a warning above the hard limit in the same unit
is refused. (Limits in MB and what the VRA does at them: test_history_sla.py.)"""
from __future__ import annotations

from recoverylab import protected_site, vra_get
from test_vpgs import doc

from waiting import wait_until

MIB = 1 << 20


def test_journal_limits_in_percent_of_the_journal_datastore(zvm_lab, start_zvm):
    """Journal limits given in % of the journal's datastore reach the recovery VRA in bytes of
    that datastore's capacity; where MB is given too, the smaller counts; a warning above the
    hard limit in the same unit is refused."""
    s = protected_site(zvm_lab, start_zvm, key="pct", name="vpg-pct", sections={
        "Journal": {"Limitation": {"HardLimitInPercent": 2, "WarningThresholdInPercent": 1,
                                   "WarningThresholdInMB": 5}}})
    a, b, lab, vid = s["a"], s["b"], s["lab"], s["vpg"]
    rdoc = doc(b, "vpgs", vid)
    settings = rdoc["settings"]
    ds = settings["journal"].get("datastoreIdentifier") or settings["recovery"]["defaultDatastoreIdentifier"]
    capacity = next(d["capacity_bytes"] for d in lab.api("site-b", "GET", "/api/inventory")["datastores"]
                    if d["id"] == ds)
    usage = vra_get(b, rdoc["recoveryVra"]["identifier"], f"/v1/recovery/vpgs/{vid}/usage").json()
    assert usage["hard_limit_bytes"] == capacity * 2 // 100 > 0, usage
    assert usage["warn_bytes"] == 5 * MIB, usage                # 5 MB < 1% of the datastore
    st = wait_until(lambda: doc(a, "vpgs", vid)["stats"].get("journalHardLimitBytes") and
                    doc(a, "vpgs", vid)["stats"], 30, 0.3, "the protected site to learn the limits")
    assert (st["journalHardLimitBytes"], st["journalWarningBytes"]) == (capacity * 2 // 100, 5 * MIB)
    # the same units compared in the settings: a warning above the hard limit is refused
    sid = a.ok("POST", "/v1/vpgSettings", json={"VpgIdentifier": vid})
    r = a.put(f"/v1/vpgSettings/{sid}/journal", json={
        "Limitation": {"HardLimitInPercent": 1, "WarningThresholdInPercent": 3}})
    assert r.status_code == 400 and "warningThresholdInPercent" in r.json()["detail"], r.text
    a.delete(f"/v1/vpgSettings/{sid}")
