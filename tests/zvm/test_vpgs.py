"""VPGs end to end on a simulator lab: two real ZVM processes paired, VRAs installed through
the ZVM API on every host of both sites, a VPG created through the vpgSettings flow.

One module-scoped lab (tests/zvm/conftest.py); the tests run in order and build on each other:
create -> MeetingSLA -> checkpoints, tagged checkpoint, image equals the source -> vMotion to a
host whose VRA was not in the VPG -> pause/resume -> delete keeping / not keeping volumes.
"""
from __future__ import annotations

import base64
import json
import random
import sqlite3

import pytest
import requests

from waiting import wait_until
from zvmproc import pair

BS = 4096


def inv(z, what):
    return z.ok("GET", f"/v1/virtualizationsites/{z.site_id()}/{what}")


def install_vras(z):
    ds = next(d for d in inv(z, "datastores") if d["DatastoreName"].endswith("ds1"))
    net = next(n for n in inv(z, "networks") if not n["VirtualizationNetworkName"].endswith("-test"))
    tids = [z.ok("POST", "/v1/vras", json={
        "HostIdentifier": h["HostIdentifier"], "DatastoreIdentifier": ds["DatastoreIdentifier"],
        "NetworkIdentifier": net["NetworkIdentifier"], "MemoryInGb": 2}) for h in inv(z, "hosts")]
    for t in tids:
        z.wait_task(t, timeout=180)


def doc(z, table, key):
    """A stored document of a ZVM (internal fields included): what the ZVM itself uses."""
    db = sqlite3.connect(z.dir / "data" / "zvm.sqlite")
    try:
        row = db.execute(f"SELECT doc FROM {table} WHERE id=?", (key,)).fetchone()
    finally:
        db.close()
    return json.loads(row[0]) if row else None


@pytest.fixture(scope="module")
def sites(zvm_lab, start_zvm):
    fast = dict(vpg_checkpoint_interval_s=1.0, monitor_interval_s=0.5)
    a, b = start_zvm("site-a", key="vpg-a", **fast), start_zvm("site-b", key="vpg-b", **fast)
    pair(a, b)
    install_vras(a)
    install_vras(b)
    # both VMs on h0: the VRA of h1 joins the VPG only when a VM moves there (vMotion test)
    for v in site_vms(zvm_lab):
        if v["host"] != "site-a-h0":
            zvm_lab.vmotion(v["name"], "site-a-h0")
    return {"a": a, "b": b, "lab": zvm_lab, "state": {}}


def site_vms(lab):
    """site-a's workload VMs as the lab sees them (not the VRA appliance VMs)."""
    return [v for v in lab.status()["sites"][0]["vms"] if not v.get("image")
            and not v["name"].startswith("Z-VRA")]


def write(lab, vm, disk, offset, data):
    lab.api("site-a", "POST", f"/api/vms/{vm}/write",
            json={"disk": disk, "offset": offset, "data": base64.b64encode(data).decode()})


def scribble(lab, vms, seed, n=12):
    rnd = random.Random(seed)
    for v in vms:
        for d in v["disks"]:
            for _ in range(n):
                write(lab, v["name"], d["index"], rnd.randrange(d["capacity_bytes"] // BS - 8) * BS,
                      rnd.randbytes(BS * rnd.choice((1, 2, 8))))


def settings_body(a, b, name, vms):
    bh = next(h for h in inv(b, "hosts") if h["VirtualizationHostName"].endswith("h0"))
    ds = next(d for d in inv(b, "datastores") if d["DatastoreName"].endswith("ds1"))
    nets = inv(b, "networks")
    net = next(n for n in nets if not n["VirtualizationNetworkName"].endswith("-test"))
    test = next(n for n in nets if n["VirtualizationNetworkName"].endswith("-test"))
    return {"Basic": {"Name": name, "RpoInSeconds": 30, "JournalHistoryInHours": 1,
                      "Priority": "High", "RecoverySiteIdentifier": b.site_id()},
            "Recovery": {"DefaultHostIdentifier": bh["HostIdentifier"],
                         "DefaultDatastoreIdentifier": ds["DatastoreIdentifier"]},
            "Networks": {"Failover": {"Hypervisor": {"DefaultNetworkIdentifier": net["NetworkIdentifier"]}},
                         "FailoverTest": {"Hypervisor": {"DefaultNetworkIdentifier": test["NetworkIdentifier"]}}},
            "Vms": [{"VmIdentifier": v["VmIdentifier"]} for v in vms]}


def vpg(z, vid):
    return z.ok("GET", f"/v1/vpgs/{vid}")


def recovery_hash(b, vid, vm_uuid, disk, k):
    d = doc(b, "vpgs", vid)
    vra = doc(b, "vras", d["recoveryVra"]["identifier"])
    r = requests.get(f"{vra['controlUrl']}/v1/recovery/vpgs/{vid}/disks/{vm_uuid}/{disk}/hash",
                     params={"checkpoint": k}, headers={"Authorization": f"Bearer {vra['_token']}"},
                     timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["sha256"]


def tagged(a, vid, tag):
    """Insert a tagged checkpoint through the API (workloads idle); its id as listed."""
    a.wait_task(a.ok("POST", f"/v1/vpgs/{vid}/checkpoints", json={"CheckpointName": tag}), 90)
    cps = [c for c in a.ok("GET", f"/v1/vpgs/{vid}/checkpoints") if c["Tag"] == tag]
    assert len(cps) == 1, cps
    return int(cps[0]["CheckpointIdentifier"])


def check_images(s, vid, k):
    lab, b = s["lab"], s["b"]
    for v in site_vms(lab):
        for d in v["disks"]:
            assert recovery_hash(b, vid, v["instance_uuid"], d["index"], k) == \
                lab.disk_hash(v["name"], d["index"]), f"{v['name']} disk {d['index']} at {k}"


def test_create_vpg_initializes_then_meets_sla(sites):
    a, b, lab = sites["a"], sites["b"], sites["lab"]
    vms = inv(a, "vms")
    vms = [v for v in vms if not v["VmName"].startswith("Z-VRA")]
    assert len(vms) == 2
    scribble(lab, site_vms(lab), seed=1)   # data before protection
    sid = a.ok("POST", "/v1/vpgSettings", json=settings_body(a, b, "vpg-e2e", vms))
    # a recovery host the peer does not have: 400 at commit, nothing created
    bad = a.ok("GET", f"/v1/vpgSettings/{sid}/recovery")
    assert a.put(f"/v1/vpgSettings/{sid}/recovery",
                 json={**bad, "DefaultHostIdentifier": "host-nope"}).status_code == 200
    r = a.post(f"/v1/vpgSettings/{sid}/commit")
    assert r.status_code == 400 and "host-nope" in r.json()["detail"], r.text
    assert a.ok("GET", "/v1/vpgs") == [] and b.ok("GET", "/v1/vpgs") == []
    assert a.put(f"/v1/vpgSettings/{sid}/recovery", json=bad).status_code == 200
    tid = a.ok("POST", f"/v1/vpgSettings/{sid}/commit")
    assert a.get(f"/v1/vpgSettings/{sid}").status_code == 404        # the draft is gone
    [v] = a.ok("GET", "/v1/vpgs")
    vid = v["VpgIdentifier"]
    sites["state"]["vpg"] = vid
    assert v["Status"] == 0 and v["SubStatus"] in (1, 2) and v["VmsCount"] == 2
    assert v["Priority"] == 2 and v["ConfiguredRpoSeconds"] == 30
    a.wait_task(tid, 120)
    st = wait_until(lambda: (lambda x: x if x["Status"] == 1 and x["ActualRPO"] >= 0 else None)(
        vpg(a, vid)), 30, 0.3, "MeetingSLA with a measured RPO")
    assert 0 <= st["ActualRPO"] <= 30 and st["SubStatus"] == 0
    mirror = wait_until(lambda: (lambda x: x if x["Status"] == 1 else None)(vpg(b, vid)), 30, 0.3,
                        "the recovery site's mirror to show MeetingSLA")
    assert mirror["VpgName"] == "vpg-e2e" and mirror["ProtectedSiteName"] == "site-a"
    # a VM protected already is refused (409), and the refusal leaves no settings behind
    r = a.post("/v1/vpgSettings", json=settings_body(a, b, "vpg-other", vms[:1]))
    assert r.status_code == 409 and "protected by VPG vpg-e2e" in r.json()["detail"], r.text
    assert a.ok("GET", "/v1/vpgSettings") == []
    # VMs, volumes, statistics, metrics
    assert sorted(x["VmName"] for x in a.ok("GET", "/v1/vms")) == sorted(x["VmName"] for x in vms)
    assert len(a.ok("GET", "/v1/volumes", params={"vpgIdentifier": vid})) == 2
    assert len(b.ok("GET", "/v1/volumes", params={"volumeType": "Recovery"})) == 2
    assert {s_["VpgIdentifier"] for s_ in a.ok("GET", "/v1/statistics/vms")} == {vid}
    text = a.get("/metrics").text
    assert f'tidemark_vpg_actual_rpo_seconds{{vpg="vpg-e2e",id="{vid}"}}' in text


def test_checkpoints_tagged_and_image_equals_source(sites):
    a, vid = sites["a"], sites["state"]["vpg"]
    scribble(sites["lab"], site_vms(sites["lab"]), seed=2)
    k = tagged(a, vid, "before-upgrade")
    cps = a.ok("GET", f"/v1/vpgs/{vid}/checkpoints")
    assert len(cps) >= 2 and all(c["TimeStamp"] for c in cps)
    stats = a.ok("GET", f"/v1/vpgs/{vid}/checkpoints/stats")
    assert stats["Latest"]["CheckpointIdentifier"] >= stats["Earliest"]["CheckpointIdentifier"]
    assert a.ok("GET", f"/v1/vpgs/{vid}/checkpoints", params={"endDate": "2000-01-01T00:00:00Z"}) == []
    assert a.get(f"/v1/vpgs/{vid}/checkpoints", params={"startDate": "yesterday"}).status_code == 400
    assert a.post(f"/v1/vpgs/{vid}/checkpoints", json={}).status_code == 400
    vm0 = a.ok("GET", "/v1/vms")[0]
    pits = a.ok("GET", f"/v1/vms/{vm0['VmIdentifier']}/pointsInTime")
    assert str(k) in [p["Checkpoint"]["CheckpointIdentifier"] for p in pits]
    check_images(sites, vid, k)


def test_vmotion_to_a_new_host_keeps_protection(sites):
    a, b, lab, vid = sites["a"], sites["b"], sites["lab"], sites["state"]["vpg"]
    before = doc(a, "vpgs", vid)
    assert len(before["protectedVras"]) == 1               # both VMs on h0
    vm = site_vms(lab)[0]
    lab.vmotion(vm["name"], "site-a-h1")
    after = wait_until(lambda: (lambda d: d if len(d["protectedVras"]) == 2 and not d["state"]["syncing"]
                                else None)(doc(a, "vpgs", vid)), 60, 0.3, "h1's VRA to join the VPG")
    assert after["leader"] == before["leader"]
    scribble(lab, site_vms(lab), seed=3)
    k = tagged(a, vid, "after-vmotion")
    check_images(sites, vid, k)
    assert wait_until(lambda: vpg(a, vid)["Status"] == 1, 30, 0.3, "MeetingSLA after the vMotion")
    assert any("joined the VPG" in e["Description"] for e in a.ok("GET", "/v1/events"))


def test_pause_and_resume(sites):
    a, lab, vid = sites["a"], sites["lab"], sites["state"]["vpg"]
    a.wait_task(a.ok("POST", f"/v1/vpgs/{vid}/pause"), 60)
    v = wait_until(lambda: (lambda x: x if x["SubStatus"] == 25 else None)(vpg(a, vid)), 20, 0.3,
                   "ReplicationPausedUserInitiated")
    assert v["IsPaused"]
    assert a.post(f"/v1/vpgs/{vid}/checkpoints", json={"CheckpointName": "x"}).status_code == 409
    scribble(lab, site_vms(lab), seed=4)     # written while paused
    a.wait_task(a.ok("POST", f"/v1/vpgs/{vid}/resume"), 120)
    assert not vpg(a, vid)["IsPaused"]
    k = tagged(a, vid, "after-resume")
    check_images(sites, vid, k)
    a.wait_task(a.ok("POST", f"/v1/vpgs/{vid}/forcesync"), 120)
    assert wait_until(lambda: vpg(a, vid)["Status"] == 1, 30, 0.3, "MeetingSLA after resume")


def _replicas(lab, vid):
    return [p for p in lab.dir.rglob(f"tidemark-replicas/{vid}/*/disk*.img")]


def test_delete_keeping_and_not_keeping_recovery_volumes(sites):
    a, b, lab, vid = sites["a"], sites["b"], sites["lab"], sites["state"]["vpg"]
    assert a.delete(f"/v1/vpgs/{vid}", json={"KeepRecoveryVolumes": "yes"}).status_code == 400
    assert len(_replicas(lab, vid)) == 2
    a.wait_task(a.ok("DELETE", f"/v1/vpgs/{vid}", json={"KeepRecoveryVolumes": True}), 60)
    assert a.ok("GET", "/v1/vpgs") == [] and b.ok("GET", "/v1/vpgs") == []
    assert len(_replicas(lab, vid)) == 2                  # kept
    assert a.get(f"/v1/vpgs/{vid}").status_code == 404
    vms = [v for v in inv(a, "vms") if not v["VmName"].startswith("Z-VRA")]
    a.wait_task(a.ok("POST", f"/v1/vpgSettings/{a.ok('POST', '/v1/vpgSettings', json=settings_body(a, b, 'vpg-2', vms))}/commit"), 120)
    [v] = a.ok("GET", "/v1/vpgs")
    assert len(_replicas(lab, v["VpgIdentifier"])) == 2
    a.wait_task(a.ok("DELETE", f"/v1/vpgs/{v['VpgIdentifier']}"), 60)
    assert _replicas(lab, v["VpgIdentifier"]) == []       # not kept
    assert a.ok("GET", "/v1/vpgs") == [] and b.ok("GET", "/v1/vpgs") == []
