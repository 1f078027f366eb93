"""HistoryNotMeetingSLA end to end on a lab: a VPG with one hour of journal history and a 1 MB
journal hard limit. Young, its short history is still building up: MeetingSLA. Then its VMs
write more than the journal may hold; the recovery VRA's journal maintenance drops the oldest
history to stay under the limit (VPG0013), so the configured hour cannot be there any more:
Status 3 HistoryNotMeetingSLA (SubStatus None) at both sites, the alert VPG0010 raised, the
history VpgApi reports shorter than configured."""
from __future__ import annotations

import random

from recoverylab import protected_site, site_vms
from test_vpgs import vpg, write

from waiting import wait_until

MIB = 1 << 20


def test_history_not_meeting_sla_when_the_hard_limit_drops_history(zvm_lab, start_zvm):
    s = protected_site(zvm_lab, start_zvm, key="hist", name="vpg-hist", sections={
        "Journal": {"Limitation": {"HardLimitInMB": 1, "WarningThresholdInMB": 1}}})
    a, b, lab, vid = s["a"], s["b"], s["lab"], s["vpg"]
    v = vpg(a, vid)
    assert (v["Status"], v["SubStatus"]) == (1, 0), v      # a young VPG: history building up
    assert v["HistoryStatusApi"]["ConfiguredHistoryInMinutes"] == 60
    assert not a.alerts("VPG0010")

    rnd = random.Random(71)                                 # ~3 MiB into a 1 MiB journal
    for vm in site_vms(lab):
        for i in range(3):
            write(lab, vm["name"], 0, (1 + 2 * i) * MIB, rnd.randbytes(MIB // 2))
    v = wait_until(lambda: (lambda x: x if x["Status"] == 3 else None)(vpg(a, vid)), 60, 0.3,
                   "HistoryNotMeetingSLA")
    assert v["SubStatus"] == 0, v
    hist = v["HistoryStatusApi"]
    assert hist["ActualHistoryInMinutes"] < hist["ConfiguredHistoryInMinutes"] == 60, hist
    [alert] = wait_until(lambda: a.alerts("VPG0010"), 10, 0.3, "the alert VPG0010")
    assert alert["Level"] == "Warning" and "hard limit" in alert["Description"], alert
    assert [x["Identifier"] for x in alert["AffectedVpgs"]] == [vid]
    assert any(e["Description"].startswith("VPG0013") for e in a.ok("GET", "/v1/events")), \
        "the journal's hard limit alert was raised"
    wait_until(lambda: vpg(b, vid)["Status"] == 3, 10, 0.3, "the recovery site's mirror to agree")
    # it stays: the dropped history was inside the configured hour
    for _ in range(4):
        assert vpg(a, vid)["Status"] == 3 and a.alerts("VPG0010")
        wait_until(lambda: True, 0.5)
