"""VRAs through the ZVM API, on a simulator lab: install on every host (the ZVM deploys the
tidemark-vra appliance, the simulator runs it attached to its host's IO path), status, alerts
when a VRA's host dies, upgrade keeping the journal, uninstall removing the appliance VM."""
from __future__ import annotations

import requests

from waiting import wait_until

LAB = {"sites": 1, "hosts": 2}
ZVM_SITES = ["site-a"]


def inventory(z, what):
    return z.ok("GET", f"/v1/virtualizationsites/{z.site_id()}/{what}")


def install_body(z, host, ds_suffix="ds1"):
    ds = next(d for d in inventory(z, "datastores") if d["DatastoreName"].endswith(ds_suffix))
    net = next(n for n in inventory(z, "networks")
               if not n["VirtualizationNetworkName"].endswith("-test"))
    return {"HostIdentifier": host["HostIdentifier"], "DatastoreIdentifier":
            ds["DatastoreIdentifier"], "NetworkIdentifier": net["NetworkIdentifier"],
            "MemoryInGb": 2}


def vra_status(z, vra):
    """The VRA's own /v1/status, asked with the token the ZVM keeps (what the ZVM's client does)."""
    import json
    import sqlite3
    db = sqlite3.connect(z.dir / "data" / "zvm.sqlite")
    try:
        doc = json.loads(db.execute("SELECT doc FROM vras WHERE id=?",
                                    (vra["VraIdentifier"],)).fetchone()[0])
    finally:
        db.close()
    r = requests.get(doc["controlUrl"] + "/v1/status",
                     headers={"Authorization": f"Bearer {doc['_token']}"}, timeout=5)
    r.raise_for_status()
    return r.json()


def test_vra_lifecycle(zvm_lab, zvms):
    a = zvms["site-a"]
    hosts = inventory(a, "hosts")
    assert [h["VirtualizationHostName"] for h in hosts] == ["site-a-h0", "site-a-h1"]
    tids = [a.ok("POST", "/v1/vras", json=install_body(a, h)) for h in hosts]
    for tid in tids:
        a.wait_task(tid, timeout=180)
    vras = a.ok("GET", "/v1/vras")
    assert sorted(v["HostIdentifier"] for v in vras) == sorted(h["HostIdentifier"] for h in hosts)
    for v in vras:
        assert v["Status"] == 0 and v["VraName"].startswith("Z-VRA-"), v
        assert "Token" not in str(v) and "_token" not in str(v)
        one = a.ok("GET", f"/v1/vras/{v['VraIdentifier']}")
        assert one["DatastoreName"].endswith("ds1") and one["ProtectedCounters"]["Vpgs"] == 0
        st = vra_status(a, v)                   # the VRA answers, attached to its host's ring
        assert st["name"] == v["VraName"] and st["protected"]["attached"], st
    vms = {v["VmName"]: v for v in inventory(a, "vms")}
    assert all(v["VraName"] in vms for v in vras)
    # a second VRA on the same host is refused; bad input is a 4xx and changes nothing
    assert a.post("/v1/vras", json=install_body(a, hosts[0])).status_code == 409
    bad = install_body(a, hosts[0])
    for change in ({"HostIdentifier": "host-nope"}, {"DatastoreIdentifier": "ds-nope"},
                   {"MemoryInGb": 0}, {"MemoryInGb": "lots"}, {"NetworkIdentifier": None}):
        r = a.post("/v1/vras", json={**bad, **change})
        assert r.status_code == 400, (change, r.text)
    assert a.get("/v1/vras/vra-nope").status_code == 404
    assert len(a.ok("GET", "/v1/vras")) == 2
    assert a.ok("GET", "/v1/vras", params={"vraName": vras[0]["VraName"]})[0]["VraIdentifier"] \
        == vras[0]["VraIdentifier"]
    assert a.ok("GET", "/v1/vras/statuses")[0] == "Installed"

    # the host of the first VRA dies: VRA0001; it comes back: the VRA answers again, attached
    v0 = vras[0]
    zvm_lab.fail_host(v0["HostDisplayName"])
    wait_until(lambda: any(v0["VraName"] in al["Description"] for al in a.alerts("VRA0001")),
               30, 0.3, "VRA0001 for the VRA of the failed host")
    zvm_lab.restore_host(v0["HostDisplayName"])
    wait_until(lambda: not a.alerts("VRA0001"), 60, 0.3, "VRA0001 to clear")
    assert wait_until(lambda: vra_status(a, v0)["protected"]["attached"], 30, 0.3,
                      "the VRA to attach to the restarted host")

    # upgrade: the appliance is redeployed; journal and state stay on the datastore
    a.wait_task(a.ok("POST", f"/v1/vras/{v0['VraIdentifier']}/upgrade"), timeout=180)
    up = a.ok("GET", f"/v1/vras/{v0['VraIdentifier']}")
    assert up["Status"] == 0 and up["VmIdentifier"] != v0["VmIdentifier"]
    assert vra_status(a, v0)["protected"]["attached"]

    # uninstall: the appliance VM goes away, and so does the VRA
    a.wait_task(a.ok("DELETE", f"/v1/vras/{v0['VraIdentifier']}"), timeout=120)
    assert v0["VraName"] not in {v["VmName"] for v in inventory(a, "vms")}
    assert a.get(f"/v1/vras/{v0['VraIdentifier']}").status_code == 404
    for v in a.ok("GET", "/v1/vras"):
        a.wait_task(a.ok("DELETE", f"/v1/vras/{v['VraIdentifier']}"), timeout=120)
    assert a.ok("GET", "/v1/vras") == []


def test_inventory_changes_noticed(zvm_lab, zvms):
    """A vMotion, a new, a renamed and a deleted VM are events within 5 s."""
    a = zvms["site-a"]

    def events(kind):
        return [e["Description"] for e in a.ok("GET", "/v1/events")
                if e["EventTypeName"] == kind]

    vm = inventory(a, "vms")[0]
    dest = "site-a-h1" if vm["OwningHostName"] == "site-a-h0" else "site-a-h0"
    zvm_lab.vmotion(vm["VmName"], dest)
    wait_until(lambda: any(vm["VmName"] in d for d in events("VmMoved")), 5, 0.2, "VmMoved")
    moved = {v["VmName"]: v for v in inventory(a, "vms")}[vm["VmName"]]
    assert moved["OwningHostName"] == dest
    zvm_lab.api("site-a", "POST", "/api/vms", json={"name": "zvm-test-new", "disks_mib": [1]})
    wait_until(lambda: any("zvm-test-new" in d for d in events("VmAdded")), 5, 0.2, "VmAdded")
    zvm_lab.api("site-a", "POST", "/api/vms/zvm-test-new/rename", json={"name": "zvm-test-2"})
    wait_until(lambda: any("zvm-test-2" in d for d in events("VmRenamed")), 5, 0.2, "VmRenamed")
    zvm_lab.api("site-a", "DELETE", "/api/vms/zvm-test-2")
    wait_until(lambda: any("zvm-test-2" in d for d in events("VmRemoved")), 5, 0.2, "VmRemoved")
