"""The protected side letting go of a VPG: unprotect and a changed target must not hold the host's ring.

One host runs the four VMs of two VPGs: ``stay`` replicates to a recovery VRA through the
lab's WAN link, ``gone`` streams to a port where nothing listens, so its records sit in its
sender. The host frees ring space only up to the first record the VRA still needs, so such
records stall the whole host: ``stay`` too, and a powered-off VM waits the host's whole drain
timeout (10 s) for them.
"""
import base64
import socket
import time

import pytest

from simulator.lab import Lab
from test_replication import VRAProc
from waiting import wait_until

DRAIN_TIMEOUT = 10.0         # simulator/iopath.py remove_vm


def dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def site(tmp_path):
    lab = Lab(tmp_path / "lab")
    lab.up(sites=2, hosts=1, vms=4, disk_mib=8, workload=False, ring_mib=16)
    vras = []
    try:
        a = {s["name"]: s for s in lab.status()["sites"]}["site-a"]
        vms = sorted(a["vms"], key=lambda v: v["name"])
        assert len({v["host"] for v in vms}) == 1
        rec = VRAProc(tmp_path, "vra-site-b-h0", journal_path=str(tmp_path / "journal"),
                      journal_sync=True)
        vras.append(rec)
        groups = {"stay": vms[:2], "gone": vms[2:]}
        for vpg, members in groups.items():
            rec.call("PUT", f"/v1/recovery/vpgs/{vpg}", json={
                "replica_dir": str(tmp_path / "replicas" / vpg),
                "disks": [{"vm": v["instance_uuid"], "disk": d["index"], "capacity": d["capacity_bytes"]}
                          for v in members for d in v["disks"]]})
        route = lab.api("site-a", "POST", "/api/links", json={
            "peer": "site-b", "target_host": rec.replication[0], "target_port": rec.replication[1]})
        host = lab.api("site-a", "GET", f"/api/hosts/{a['hosts'][0]['name']}")
        prot = VRAProc(tmp_path, "vra-site-a-h0", doorbell=host["mirror"]["doorbell"],
                       host_url=host["url"])
        vras.append(prot)
        yield {"lab": lab, "rec": rec, "prot": prot, "groups": groups, "port": route["port"]}
    finally:
        for v in vras:
            v.stop()
        lab.down()


def protect(prot, vpg, members, port):
    prot.call("PUT", f"/v1/protected/vpgs/{vpg}", json={
        "vms": [v["instance_uuid"] for v in members], "target_host": "127.0.0.1",
        "target_port": port, "compress": True, "leader": True,
        "participants": {prot.name: prot.url}, "interval_s": 0})


def scribble(lab, members, n=8, seed=0):
    for v in members:
        for i in range(n):
            data = bytes([(seed + i) % 251 + 1]) * 65536
            lab.api("site-a", "POST", f"/api/vms/{v['name']}/write", json={
                "disk": 0, "offset": (seed * n + i) * 65536 % (4 << 20),
                "data": base64.b64encode(data).decode()})


def protected(prot) -> dict:
    return prot.call("GET", "/v1/status")["protected"]


def bitmap_writes(lab) -> int:
    return sum(s["bitmap_writes"] for s in lab.api("site-a", "GET", "/api/stats").values())


def images_equal_sources(prot, rec, vpg, members, timeout=60):
    """A valid checkpoint of ``vpg`` becomes recoverable and its image equals the sources at it."""
    cp = wait_until(lambda: (lambda o: o if o["valid"] else None)(prot.call(
        "POST", f"/v1/protected/vpgs/{vpg}/checkpoints", json={"hashes": True, "hold_ms": 1000})),
        timeout=timeout, step=0.5, what=f"a valid checkpoint of {vpg}")
    wait_until(lambda: any(c["id"] == cp["id"] for c in
                           rec.call("GET", f"/v1/recovery/vpgs/{vpg}/checkpoints")),
               timeout=timeout, what=f"checkpoint {cp['id']} of {vpg} to become recoverable")
    for v in members:
        for d in v["disks"]:
            got = rec.call("GET", f"/v1/recovery/vpgs/{vpg}/disks/{v['instance_uuid']}/{d['index']}/hash",
                           params={"checkpoint": cp["id"]})
            assert got["sha256"] == cp["hashes"][v["instance_uuid"]][d["index"]], \
                f"{vpg}: {v['name']} disk {d['index']} differs at checkpoint {cp['id']}"
    return cp


def test_unprotect_releases_the_ring_power_off_is_quick_and_the_other_vpg_goes_on(site):
    lab, rec, prot, groups = site["lab"], site["rec"], site["prot"], site["groups"]
    protect(prot, "stay", groups["stay"], site["port"])
    protect(prot, "gone", groups["gone"], dead_port())
    scribble(lab, groups["stay"], seed=1)
    scribble(lab, groups["gone"], seed=2)               # never leaves the host
    wait_until(lambda: protected(prot)["vpgs"]["gone"]["queued"] >= 16, timeout=10,
               what="gone's writes queued in its sender")
    scribble(lab, groups["stay"], seed=3)
    wait_until(lambda: protected(prot)["vpgs"]["stay"]["acked_seq"] >= 32, timeout=20,
               what="stay's writes durable at the recovery VRA")
    assert protected(prot)["pending_ring_records"] >= 16    # held behind gone's records

    t0 = time.monotonic()
    prot.call("DELETE", "/v1/protected/vpgs/gone")
    wait_until(lambda: protected(prot)["pending_ring_records"] == 0, timeout=DRAIN_TIMEOUT,
               what="the ring to be freed past gone's records")
    released = time.monotonic() - t0
    assert "gone" not in protected(prot)["vpgs"]

    t0 = time.monotonic()
    lab.power(groups["gone"][0]["name"], False)          # DETACH_VM: the host drains the VM's stream
    powered_off = time.monotonic() - t0
    print(f"unprotect released the ring in {released:.2f} s; power-off took {powered_off:.2f} s")
    # Neither waits out a drain timeout (the bound leaves room for a busy machine).
    assert released < DRAIN_TIMEOUT * 0.7
    assert powered_off < DRAIN_TIMEOUT * 0.7, f"power-off waited {powered_off:.1f} s for the drain"

    # stay replicates on, correctly, and never fell back to the bitmap
    for i, v in enumerate(groups["stay"]):
        lab.workload(v["name"], {"action": "start", "spec": {"mbps": 2.0, "pattern": "random",
                                                             "seed": 40 + i}})
    time.sleep(2.0)
    t0 = time.monotonic()
    lab.power(groups["stay"][1]["name"], False)          # a VM of a VPG still streaming drains fast
    assert time.monotonic() - t0 < DRAIN_TIMEOUT * 0.7
    lab.workload(groups["stay"][0]["name"], {"action": "stop"})
    images_equal_sources(prot, rec, "stay", groups["stay"][:1])
    assert bitmap_writes(lab) == 0


def test_a_changed_target_hands_the_unsent_records_to_the_new_stream(site):
    lab, rec, prot, groups = site["lab"], site["rec"], site["prot"], site["groups"]
    stay = groups["stay"]
    protect(prot, "stay", stay, dead_port())             # the recovery VRA is not reachable there
    scribble(lab, stay, seed=5)
    wait_until(lambda: protected(prot)["vpgs"]["stay"]["queued"] >= 16, timeout=10,
               what="the writes queued in the sender")
    source = protected(prot)["vpgs"]["stay"]

    protect(prot, "stay", stay, site["port"])            # the target changes: a new stream
    now = protected(prot)["vpgs"]["stay"]
    assert now["target"] != source["target"]
    wait_until(lambda: protected(prot)["pending_ring_records"] == 0, timeout=20,
               what="the handed-over writes to become durable and free the ring")
    scribble(lab, stay, seed=6)
    # No delta sync runs here: the image equals the sources only if the first writes,
    # queued for the old target, went through the new stream.
    images_equal_sources(prot, rec, "stay", stay)
    assert bitmap_writes(lab) == 0
