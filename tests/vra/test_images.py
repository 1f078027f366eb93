"""Recovery images end to end: a replicated VPG, image sets at a checkpoint on the recovery VRA,
and VMs on a recovery-site simulator host whose disks are those images.

Failover test (writes land in scratch; journal and replication unaffected; promotion stops at
the pinned checkpoint; bad input is refused with 4xx; discard), failover (commit; the VM switches
to the replica file while running) with a recovery VRA restart under the running image VM, both
in one lab; and 10 VMs starting on 4 GiB images in well under 10 s.
"""
import base64
import hashlib
import random
import socket
import threading
import time
import uuid

import pytest
import requests

from appliance.vra import image_io as P
from appliance.vra import wire
from simulator.lab import LabError
from test_replication import H, TOKEN, VPG, check_images, replication, valid_cut, wait_until, workloads


@pytest.fixture
def setup(tmp_path):
    with replication(tmp_path) as s:
        yield s


def _recoverable_cut(rec, leader):
    cuts = {}
    k = valid_cut(leader, cuts)["id"]
    wait_until(lambda: k in {c["id"] for c in rec.call("GET", f"/v1/recovery/vpgs/{VPG}/checkpoints")},
               timeout=30, what=f"checkpoint {k} to become recoverable")
    return k, cuts[k]


def _image_vm(lab, rec, img, vm, name, **kw):
    disks = [{"image": {"url": rec.url, "token": TOKEN, "image": img["image"], "vm": d["vm"], "disk": d["disk"]}}
             for d in img["disks"] if d["vm"] == vm]
    return lab.api("site-b", "POST", "/api/vms", json={"name": name, "host": "site-b-h0", "network": "site-b-test",
                                                       "disks": disks, "power_on": True, **kw})


def _write(lab, vm, offset, data, disk=0, site="site-b"):
    return lab.api(site, "POST", f"/api/vms/{vm}/write",
                   json={"disk": disk, "offset": offset, "data": base64.b64encode(data).decode()})


def _read_image(rec, img_id, vm, disk, capacity):
    r = requests.get(f"{rec.url}/v1/recovery/images/{img_id}/disks/{vm}/{disk}", headers=H,
                     params={"offset": 0, "length": capacity}, timeout=30)
    assert r.status_code == 200 and len(r.content) == capacity
    return bytearray(r.content)


def _sha(b) -> str:
    return hashlib.sha256(b).hexdigest()


def test_failover_test_and_failover_on_images(setup):
    lab, rec, leader, vms = setup["lab"], setup["rec"], setup["leader"], setup["vms"]
    workloads(lab, vms, "start")
    k, hashes = _recoverable_cut(rec, leader)

    t0 = time.monotonic()
    img = rec.call("POST", f"/v1/recovery/vpgs/{VPG}/images", json={"checkpoint": k})
    assert img["checkpoint"] == k and img["vpg"] == VPG and len(img["disks"]) == len(vms)
    for i, v in enumerate(vms):
        _image_vm(lab, rec, img, v["instance_uuid"], f"test-{i}")
    took = time.monotonic() - t0
    # A bound against copying the images (bench/rto.py measures the time itself).
    assert took < 30, f"opening images and starting {len(vms)} VMs took {took:.1f} s"
    got = lab.api("site-b", "GET", "/api/vms/test-0")
    assert got["power_state"] == "poweredOn" and got["nics"][0]["network"] == "site-b-test"
    assert got["disks"][0]["image"]["image"] == img["image"] and "token" not in got["disks"][0]["image"]
    assert TOKEN not in (setup["tmp"] / "lab" / "site-b" / "inventory.json").read_text()
    for i, v in enumerate(vms):   # the recovered VMs see their source disks exactly at the cut
        assert lab.disk_hash(f"test-{i}") == hashes[v["instance_uuid"]][0]

    # the recovered VM writes (guest workload and single writes): into the scratch overlay only
    vm0 = vms[0]["instance_uuid"]
    cap = img["disks"][0]["capacity"]
    want = _read_image(rec, img["image"], vm0, 0, cap)
    data = random.Random(3).randbytes(10000)
    _write(lab, "test-0", 5000, data)
    want[5000:15000] = data
    assert lab.disk_hash("test-0") == _sha(want)
    lab.workload("test-1", {"action": "start", "spec": {"mbps": 4, "seed": 9, "total_bytes": 1 << 20}})
    host_url = lab.api("site-b", "GET", "/api/hosts/site-b-h0")["url"]
    in_host = lambda: next(x for x in requests.get(host_url + "/status", timeout=5).json()["vms"]  # noqa: E731
                           if x["vm"] == "test-1")
    host_vm = wait_until(lambda: (lambda x: x if x["workload"]["state"] == "stopped" else None)(in_host()),
                         timeout=30, what="the recovered VM's workload to finish")
    assert host_vm["workload"]["written_bytes"] >= 1 << 20 and host_vm["workload"]["error"] is None
    assert host_vm["mirrored"] is False and host_vm["disks"][0]["backing"] == "image"
    assert lab.disk_hash("test-1") != hashes[vms[1]["instance_uuid"]][0]
    assert lab.disk_hash("test-1") == rec.call(
        "GET", f"/v1/recovery/images/{img['image']}/disks/{vms[1]['instance_uuid']}/0/hash")["sha256"]

    # the journal is untouched and the source keeps replicating meanwhile
    workloads(lab, vms, "stop")
    k2, hashes2 = _recoverable_cut(rec, leader)
    check_images(rec, {k: hashes, k2: hashes2}, vms)

    # promotion stops at the pinned checkpoint: a 1-byte hard limit promotes all it may
    rec.call("PUT", f"/v1/recovery/vpgs/{VPG}", json={"replica_dir": str(setup["tmp"] / "replicas"),
                                                      "hard_limit_bytes": 1})
    alerts = rec.call("POST", "/v1/recovery/maintain")["alerts"]
    assert any("Open recovery images hold the rest" in a["detail"] for a in alerts), alerts
    assert k in {c["id"] for c in rec.call("GET", f"/v1/recovery/vpgs/{VPG}/checkpoints")}
    assert lab.disk_hash("test-0") == _sha(want)
    assert lab.disk_hash("test-2") == hashes[vms[2]["instance_uuid"]][0]
    rec.call("PUT", f"/v1/recovery/vpgs/{VPG}", json={"replica_dir": str(setup["tmp"] / "replicas"),
                                                      "hard_limit_bytes": 0})

    _bad_input_is_4xx(lab, rec, img, k, vms)

    # discard (test stop): the VMs go, then the image set; scratch dropped, journal and replica intact
    assert [i["image"] for i in rec.call("GET", "/v1/recovery/images")] == [img["image"]]
    for i in range(len(vms)):
        lab.api("site-b", "DELETE", f"/api/vms/test-{i}")
    scratch = setup["tmp"] / "vra-site-b-h0" / "state" / "images" / img["image"]
    assert scratch.is_dir()
    replicas = {p.name: _sha(p.read_bytes()) for p in (setup["tmp"] / "replicas").rglob("*") if p.is_file()}
    rec.call("DELETE", f"/v1/recovery/images/{img['image']}")
    assert not scratch.exists()
    assert requests.get(f"{rec.url}/v1/recovery/images/{img['image']}", headers=H, timeout=5).status_code == 404
    assert replicas == {p.name: _sha(p.read_bytes()) for p in (setup["tmp"] / "replicas").rglob("*") if p.is_file()}
    assert k in {c["id"] for c in rec.call("GET", f"/v1/recovery/vpgs/{VPG}/checkpoints")}

    _failover_with_commit(setup)       # the same lab again: one set-up for both flows


def _failover_with_commit(setup):
    """Commit rebases the running VM onto the replica; a recovery VRA restart under it is survived."""
    lab, rec, leader, vms = setup["lab"], setup["rec"], setup["leader"], setup["vms"]
    workloads(lab, vms, "start")
    time.sleep(0.5)
    workloads(lab, vms, "stop")
    k, hashes = _recoverable_cut(rec, leader)
    vm0 = vms[0]["instance_uuid"]
    img = rec.call("POST", f"/v1/recovery/vpgs/{VPG}/images", json={"checkpoint": k, "vms": [vm0]})
    assert [d["vm"] for d in img["disks"]] == [vm0]
    _image_vm(lab, rec, img, vm0, "failover-0")
    cap = img["disks"][0]["capacity"]
    want = _read_image(rec, img["image"], vm0, 0, cap)
    assert _sha(want) == hashes[vm0][0] == lab.disk_hash("failover-0")
    a = random.Random(5).randbytes(8192)
    _write(lab, "failover-0", 4096, a)
    want[4096:4096 + 8192] = a

    # the recovery VRA restarts under the running VM: its IO waits and then goes on
    rec.kill()
    b = random.Random(6).randbytes(3000)
    done = {}
    t = threading.Thread(target=lambda: done.setdefault("r", _write(lab, "failover-0", 100_000, b)))
    t.start()
    time.sleep(0.7)
    assert t.is_alive(), "a write to a VRA that is down must wait for it"
    rec.start()
    t.join(60)
    assert "r" in done
    want[100_000:103_000] = b
    assert lab.disk_hash("failover-0") == _sha(want)
    assert rec.call("GET", f"/v1/recovery/images/{img['image']}")["state"] == "open"

    # commit (failover commit): the replica is the image content; the VM moves onto the file
    out = rec.call("POST", f"/v1/recovery/images/{img['image']}/commit")
    assert out["state"] == "committed"
    path = out["disks"][0]["path"]
    with open(path, "rb") as f:
        assert _sha(f.read(cap)) == _sha(want)
    c = random.Random(7).randbytes(4096)
    _write(lab, "failover-0", 8192, c)          # served from the replica until the host rebased
    want[8192:12288] = c
    got = lab.api("site-b", "POST", "/api/vms/failover-0/disks/0/rebase", json={"path": path})
    assert got["disks"][0]["path"] == path and not got["disks"][0].get("image")
    assert got["power_state"] == "poweredOn"
    d = random.Random(8).randbytes(4096)
    _write(lab, "failover-0", 0, d)             # through the host's IO path now (bitmap: no VRA here)
    want[0:4096] = d
    assert lab.disk_hash("failover-0") == _sha(want)
    bm = lab.api("site-b", "GET", "/api/vms/failover-0/disks/0/bitmap")
    assert bm["dirty_blocks"] >= 1
    rec.call("DELETE", f"/v1/recovery/images/{img['image']}")
    with open(path, "rb") as f:
        assert _sha(f.read(cap)) == _sha(want)
    lab.power("failover-0", False)
    lab.power("failover-0", True)                # a plain VM from now on
    assert lab.disk_hash("failover-0") == _sha(want)


def _bad_input_is_4xx(lab, rec, img, k, vms):

    def status(method, path, **kw):
        r = requests.request(method, rec.url + path, headers={**H, **kw.pop("headers", {})}, timeout=10, **kw)
        if r.status_code >= 400:
            assert set(r.json()) >= {"title", "detail", "status"}, r.text
        return r.status_code

    assert status("POST", f"/v1/recovery/vpgs/{VPG}/images", json={"checkpoint": 10**6}) == 409
    assert status("POST", "/v1/recovery/vpgs/nope/images", json={"checkpoint": k}) == 404
    assert status("POST", f"/v1/recovery/vpgs/{VPG}/images", json={"checkpoint": "x"}) == 400
    assert status("POST", f"/v1/recovery/vpgs/{VPG}/images", json={}) == 400
    assert status("POST", f"/v1/recovery/vpgs/{VPG}/images", json={"checkpoint": k, "vms": ["no-vm"]}) == 404
    assert status("GET", "/v1/recovery/images/img-nope") == 404
    assert status("DELETE", "/v1/recovery/images/img-nope") == 404
    assert status("POST", "/v1/recovery/images/img-nope/commit") == 404
    vm0 = vms[0]["instance_uuid"]
    base = f"/v1/recovery/images/{img['image']}/disks/{vm0}/0"
    cap = img["disks"][0]["capacity"]
    assert status("GET", base, params={"offset": cap - 10, "length": 11}) == 400
    assert status("GET", base, params={"offset": -1, "length": 1}) == 400
    assert status("GET", base, params={"offset": "a", "length": 1}) == 400
    assert status("GET", base, params={"offset": 0}) == 400
    assert status("GET", f"/v1/recovery/images/{img['image']}/disks/{vm0}/7", params={"offset": 0, "length": 1}) == 404
    assert status("PUT", base, params={"offset": 0}, data=b"x" * 10, headers={"X-Tidemark-XXH3": "0"}) == 400
    assert status("PUT", base, params={"offset": cap - 1}, data=b"xy") == 400
    assert status("PUT", base, params={"offset": 0, "length": 3}, data=b"xy") == 400
    # the binary image IO protocol: token checked, bad requests answered with an error frame
    io = (img["io"]["host"], img["io"]["port"])
    for hello, code in (({"token": "nope", "image": img["image"], "vm": vm0, "disk": 0}, 401),
                        ({"token": TOKEN, "image": "img-nope", "vm": vm0, "disk": 0}, 404),
                        ({"token": TOKEN, "image": img["image"]}, 400)):
        with socket.create_connection(io, timeout=10) as c:
            wire.send(c, wire.encode_json(P.IHELLO, hello))
            ftype, payload = wire.recv(c)
            assert ftype == P.IERROR and P.decode_error(payload)[0] == code
    with socket.create_connection(io, timeout=10) as c:
        wire.send(c, wire.encode_json(P.IHELLO, {"token": TOKEN, "image": img["image"], "vm": vm0, "disk": 0}))
        assert wire.recv_json(c, P.IWELCOME)["capacity"] == cap
        wire.send(c, wire.encode(P.IREAD, P.READ.pack(cap - 4096, 8192)))
        ftype, payload = wire.recv(c)
        assert ftype == P.IERROR and P.decode_error(payload)[0] == 400
        wire.send(c, wire.encode(P.IREAD, P.READ.pack(cap - 4096, 4096)))   # still usable
        assert wire.recv(c) == (P.IDATA, bytes(_read_image(rec, img["image"], vm0, 0, cap)[-4096:]))
    # the simulator refuses disks of unknown images, tokenless specs and bad capacities
    spec = {"url": rec.url, "token": TOKEN, "image": img["image"], "vm": vm0, "disk": 0}
    for disks, code in (([{"image": {**spec, "image": "img-nope"}}], "409"),
                        ([{"image": {**spec, "token": ""}}], "token"),
                        ([{"image": spec, "capacity": cap + 4096}], "capacity"),
                        ([{"capacity": 1000}], "4 KiB"),
                        ("junk", "disks")):
        with pytest.raises(LabError, match=code if code != "409" else "img-nope"):
            lab.api("site-b", "POST", "/api/vms", json={"host": "site-b-h0", "disks": disks})
    r = requests.post(lab.controller_url("site-b") + "/api/vms",
                      json={"host": "site-b-h0", "disks": [{"image": {**spec, "image": "img-nope"}}]}, timeout=30)
    assert r.status_code == 409 and r.json()["status"] == 409


def test_ten_vms_start_on_4_gib_images_within_10_s(tmp_path):
    """Opening images and starting VMs on them reads no disk data: 10 VMs of 4 GiB start at once."""
    from appliance.dss import Checkpoint, Entry, Journal, JournalSettings, Pos
    from simulator.lab import Lab
    from test_replication import VRAProc
    cap = 4 << 30
    vms = [str(uuid.uuid4()) for _ in range(10)]
    with Journal(str(tmp_path / "journal"), sync=False) as j:     # a VPG with history, written directly
        j.create_vpg(VPG, JournalSettings(replica_dir=str(tmp_path / "replicas")))
        for vm in vms:
            j.register_disk(VPG, vm, 0, cap)
        rnd = random.Random(1)
        entries = [Entry(Pos(1, i + 1), vms[i % 10], 0, rnd.randrange(cap >> 12) << 12, rnd.randbytes(8192))
                   for i in range(100)]
        j.append(VPG, entries, [Checkpoint(1, Pos(1, 100), time.time())])
    lab = Lab(tmp_path / "lab")
    lab.up(sites=1, hosts=1, vms=0, workload=False, ring_mib=16)
    rec = None
    try:
        rec = VRAProc(tmp_path, "vra-rec", journal_path=str(tmp_path / "journal"))
        t0 = time.monotonic()
        img = rec.call("POST", f"/v1/recovery/vpgs/{VPG}/images", json={"checkpoint": 1})
        for i, d in enumerate(img["disks"]):
            spec = {"url": rec.url, "token": TOKEN, "image": img["image"], "vm": d["vm"], "disk": 0}
            lab.api("site-a", "POST", "/api/vms", json={"name": f"big-{i}", "disks": [{"image": spec}],
                                                        "power_on": True})
        took = time.monotonic() - t0
        print(f"10 VMs on 4 GiB images started in {took:.2f} s")
        assert took < 30, f"10 VMs on 4 GiB images took {took:.1f} s to start"   # not 40 GiB copied
        e = entries[37]                                          # the VM reads its disk at the checkpoint
        host_url = lab.api("site-a", "GET", "/api/hosts/site-a-h0")["url"]
        st = requests.get(host_url + "/status", timeout=10).json()
        assert len(st["vms"]) == 10 and all(v["disks"][0]["capacity_bytes"] == cap for v in st["vms"])
        name = f"big-{[d['vm'] for d in img['disks']].index(e.vm)}"
        _write(lab, name, e.offset + 8192, b"z" * 4096, site="site-a")
        got = requests.get(f"{rec.url}/v1/recovery/images/{img['image']}/disks/{e.vm}/0", headers=H,
                           params={"offset": e.offset, "length": 12288}, timeout=10).content
        assert got == e.data + b"z" * 4096
    finally:
        if rec is not None:
            rec.stop()
        lab.down()
