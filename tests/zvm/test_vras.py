"""VRAs through the ZVM API, on a simulator lab: install on every host (the ZVM deploys the
tidemark-vra appliance, the simulator runs it attached to its host's IO path), status, alerts
when a VRA's host dies, upgrade keeping the journal, uninstall removing the appliance VM.
Replication TLS (on by default): the appliance gets its certificate, key and trust bundle as
contents and keeps them in its own folder; the bundle follows pairing and unpairing."""
from __future__ import annotations

import base64
import json
import os
import stat

import requests

from appliance import ovf, pki
from tlsprobe import tls_probe
from waiting import wait_until
from zvmproc import pair, unpair

LAB = {"sites": 2, "hosts": 2}
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


def appliance_files(lab, vra_name: str) -> dict:
    """The VRA appliance VM's OVF environment (as the guest reads it) and its console log."""
    [env] = list(lab.dir.glob(f"site-a/**/appliances/{vra_name}/ovf-env.xml"))
    return {"props": ovf.parse(env.read_text()), "env": env,
            "console": env.parent / "console.log"}


def files_containing(root, needles) -> set:
    out = set()
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            try:
                data = open(p, "rb").read()
            except OSError:
                continue
            if any(x in data for x in needles):
                out.add(p)
    return out


def test_vra_tls_contents_and_trust_updates(zvm_lab, zvms, start_zvm, tmp_path):
    """The appliance gets its TLS material as contents (no path into the ZVM's data folder),
    writes it into its own state folder (key 0600, folder 0700); the key shows nowhere else:
    not in /v1/vras, the ZVM's data or logs, the appliance's log. Pairing site-b adds b's CA
    to the VRA's trust (sent through the VRA's control API, then a restart); unpairing drops
    it: a client with a certificate from b's CA is accepted, then refused."""
    a = zvms["site-a"]
    h0 = next(h for h in inventory(a, "hosts") if h["VirtualizationHostName"] == "site-a-h0")
    a.wait_task(a.ok("POST", "/v1/vras", json=install_body(a, h0)), timeout=180)
    [v] = a.ok("GET", "/v1/vras")
    app = appliance_files(zvm_lab, v["VraName"])
    props = app["props"]
    assert {"tls_cert_pem", "tls_key_pem", "tls_ca_pem"} <= set(props), sorted(props)
    assert not {"tls_cert", "tls_key", "tls_ca"} & set(props), sorted(props)
    zvm_data = str(a.dir / "data")
    assert not any(zvm_data in str(x) or str(a.dir) in str(x) for x in props.values()), props
    assert not (a.dir / "data" / "vras").exists()            # the ZVM keeps no VRA key files
    key_pem = base64.b64decode(props["tls_key_pem"])
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    # the VRA wrote its material into its own state folder (on its datastore)
    [key_file] = list(zvm_lab.dir.glob(f"site-a/**/{v['VraName']}/state/tls/vra.key"))
    assert key_file.read_bytes() == key_pem
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    assert (key_file.parent / "trust.pem").read_bytes() == base64.b64decode(props["tls_ca_pem"])
    # the key is in no API answer, log or ZVM file
    secret_line = key_pem.splitlines()[1]
    needles = (secret_line, props["tls_key_pem"].encode())
    listing = json.dumps(a.ok("GET", "/v1/vras")) + json.dumps(a.ok("GET", f"/v1/vras/{v['VraIdentifier']}"))
    assert "PRIVATE KEY" not in listing and props["tls_key_pem"] not in listing
    assert "TlsKey" not in listing and "tls_key" not in listing.lower()
    assert files_containing(a.dir, needles) == set()        # data (sqlite too) and zvm.log
    holders = files_containing(zvm_lab.dir, needles)
    assert not [p for p in holders if p.endswith(".log")], holders
    assert str(key_file) in holders and str(app["env"]) in holders
    # elsewhere only where the hypervisor keeps the VM's properties; all of it 0600
    assert {os.path.basename(p) for p in holders} <= {"vra.key", "ovf-env.xml", "inventory.json"}, holders
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o600 for p in holders), holders
    # the guest agent publishes the properties with the key hidden
    guest = json.loads((app["env"].parent / "guestinfo.json").read_text())
    assert guest["properties"]["tls_key_pem"] == "***"

    # pairing with site-b: the VRA's trust gets b's CA, without any shared file
    b = start_zvm("site-b")
    host, port = v["ReplicationAddress"].rsplit(":", 1)
    a_ca = a.dir / "data" / "pki" / "ca.pem"
    pair(a, b)
    bpki = b.dir / "data" / "pki"
    client_cert, client_key = pki.issue(tmp_path, "probe", bpki / "ca.pem", bpki / "ca.key")

    def probe():
        return tls_probe(int(port), client_cert, client_key, a_ca, host)

    wait_until(lambda: probe() == "accepted", 60, 0.5, "site-a's VRA to trust site-b's CA")
    wait_until(lambda: any(v["VraName"] in e["Description"] and "paired sites changed" in e["Description"]
                           for e in a.ok("GET", "/v1/events")), 30, 0.2, "the VRA's event")
    assert appliance_files(zvm_lab, v["VraName"])["props"] == props   # properties unchanged
    pushed = key_file.parent / "trust-pushed.pem"
    assert (bpki / "ca.pem").read_text().strip() in pushed.read_text()
    wait_until(lambda: a.ok("GET", f"/v1/vras/{v['VraIdentifier']}")["IsReachable"], 30, 0.3,
               "the restarted VRA to answer")

    # unpairing: b's CA is dropped again
    unpair(a, b)
    wait_until(lambda: probe() == "refused", 60, 0.5, "site-a's VRA to stop trusting site-b")
    assert (bpki / "ca.pem").read_text().strip() not in pushed.read_text()
    assert files_containing(a.dir, needles) == set()
    assert not [p for p in files_containing(zvm_lab.dir, needles) if p.endswith(".log")]

    wait_until(lambda: a.ok("GET", f"/v1/vras/{v['VraIdentifier']}")["Status"] == 0 and
               a.ok("GET", f"/v1/vras/{v['VraIdentifier']}")["IsReachable"], 30, 0.3,
               "the VRA to answer")
    a.wait_task(a.ok("DELETE", f"/v1/vras/{v['VraIdentifier']}"), timeout=120)
    assert a.ok("GET", "/v1/vras") == []
