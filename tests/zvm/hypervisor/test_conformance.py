"""One conformance suite for every hypervisor backend of the ZVM.

Backends: the simulator's site API on a vSphere-style and on a Hyper-V-style site, and the
vSphere adapter (pyvmomi) against the vcsim of a lab started with ``vcenter="vcsim"``. Each
backend gets one small lab (1 site, 2 hosts, 2 VMs with 16 MiB disks, no workloads) for the
module; out-of-band changes go through the simulator's own API, and the simulator's model is
the truth the adapter's view is compared with.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from appliance.zvm.hypervisor import (AuthenticationFailed, Change, DiskSpec, Hypervisor, InvalidSpec,
                                      NicSpec, NotFound, RecoveryImage, Unreachable, VMSpec, connect)
from simulator.lab import Lab
from waiting import wait_until

MiB = 1 << 20
NOTICE_S = 5.0          # the issue: a change is noticed within 5 s
GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass
class Env:
    backend: str        # sim-vsphere | sim-hyperv | vcsim
    lab: Lab
    hv: Hypervisor
    settings: dict      # what connect() was given

    def sim(self, path: str, method: str = "GET", **kw):
        return self.lab.api("site-a", method, path, **kw)

    def sim_vm(self, name: str) -> dict | None:
        return next((v for v in self.sim("/api/vms") if v["name"] == name), None)

    def host_id(self, name: str) -> str:
        return next(h.id for h in self.hv.hosts() if h.name == name)

    def net_id(self, name: str) -> str:
        return next(n.id for n in self.hv.networks() if n.name == name)

    def ds_id(self, name: str) -> str:
        return next(d.id for d in self.hv.datastores() if d.name == name)

    def vm_id(self, name: str) -> str:
        return next(v.id for v in self.hv.vms() if v.name == name)


@pytest.fixture(scope="module", params=[
    "sim-vsphere", "sim-hyperv", pytest.param("vcsim", marks=pytest.mark.vcsim)])
def env(request, tmp_path_factory):
    backend = request.param
    lab = Lab(tmp_path_factory.mktemp(backend) / "lab")
    hv = None
    try:
        lab.up(sites=1, hosts=2, vms=2, disk_mib=16, workload=False,
               vcenter="vcsim" if backend == "vcsim" else "sim", hyperv_site=backend == "sim-hyperv")
        st = lab.status()["sites"][0]
        if backend == "vcsim":
            hostport = st["vcenter_url"].split("//")[1].split("/")[0]
            settings = dict(host=hostport.split(":")[0], port=int(hostport.split(":")[1]),
                            user="user", password="pass", protocol="http")
            hv = connect("vsphere", **settings)
        else:
            settings = dict(url=st["simulator_url"])
            hv = connect("simulator", **settings)
        yield Env(backend, lab, hv, settings)
    finally:
        if hv is not None:
            hv.close()
        lab.down()


def changes_until(hv: Hypervisor, want, timeout: float = NOTICE_S) -> list[Change]:
    """Poll until ``want(changes so far)`` holds; fail if that takes more than ``timeout`` s."""
    seen: list[Change] = []
    deadline = time.monotonic() + timeout
    while True:
        seen += hv.poll()
        if want(seen):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"not noticed within {timeout} s; saw {seen}")
        time.sleep(0.2)


def test_inventory_matches_the_simulator(env):
    hv, site = env.hv, env.sim("/api/site")
    info = hv.site()
    assert info.kind == site["kind"] == ("hyperv" if env.backend == "sim-hyperv" else "vsphere")
    assert info.datacenter == "site-a-dc" and info.version
    hosts = hv.hosts()
    assert sorted(h.name for h in hosts) == sorted(h["name"] for h in site["hosts"])
    assert {h.state for h in hosts} == {"connected"}
    clusters = hv.clusters()
    assert [c.name for c in clusters] == ["site-a-cluster0"]
    assert sorted(clusters[0].host_ids) == sorted(h.id for h in hosts)
    assert {h.cluster_id for h in hosts} == {clusters[0].id}
    dss = {d.name: d for d in hv.datastores()}
    assert set(dss) >= {"site-a-ds0", "site-a-ds1"}
    assert all(0 <= d.free_bytes <= d.capacity_bytes and d.capacity_bytes > 0 for d in dss.values())
    for d in site["datastores"]:      # the lab's datastores are folders on this machine
        assert Path(hv.datastore_path(dss[d["name"]].id)).resolve() == Path(d["path"]).resolve()
    with pytest.raises(NotFound):
        hv.datastore_path("datastore-99999")
    nets = {n.name: n for n in hv.networks()}
    for n in site["networks"]:
        assert nets[n["name"]].isolated == n["isolated"], n["name"]
    assert hv.folders() and hv.resource_pools()
    host_names = {h.id: h.name for h in hosts}
    net_names = {n.id: n.name for n in nets.values()}
    ds_names = {d.id: d.name for d in dss.values()}
    vms = {v.name: v for v in hv.vms()}
    assert set(vms) == {v["name"] for v in site["vms"]}
    for want in site["vms"]:
        got = vms[want["name"]]
        assert got.instance_uuid == want["instance_uuid"]
        assert host_names[got.host_id] == want["host"]
        assert got.power_state == want["power_state"] == "poweredOn"
        assert (got.cpus, got.memory_mib) == (want["vcpus"], want["memory_mib"])
        assert [(n.mac, net_names[n.network_id], n.ip) for n in got.nics] == \
            [(n["mac"], n["network"], n["ip"]) for n in want["nics"]]
        assert [(d.capacity_bytes, ds_names[d.datastore_id]) for d in got.disks] == \
            [(16 * MiB, want["datastore"])]
        assert got.image is None and hv.vm(got.id) == got
    # ids are the platform's: the simulator's own ids, GUIDs on Hyper-V, MoRefs on vSphere
    if env.backend == "vcsim":
        assert all(re.match(r"^vm-\d+$", v.id) for v in vms.values())
        assert all(re.match(r"^host-\d+$", h.id) for h in hosts)
    else:
        assert {v.id for v in vms.values()} == {v["id"] for v in site["vms"]}
        assert {h.id for h in hosts} == {h["id"] for h in site["hosts"]}
        shape = GUID if env.backend == "sim-hyperv" else re.compile(r"^(vm|host|datastore|network)-\d+$")
        assert all(shape.match(x) for x in [*vms.values(), *hosts] for x in [x.id])


def test_unknown_objects_raise_not_found(env):
    hv = env.hv
    ghost = "00000000-0000-0000-0000-000000000000" if env.backend == "sim-hyperv" else "vm-99999"
    vm = hv.vms()[0]
    for call in (lambda: hv.vm(ghost), lambda: hv.power_on(ghost), lambda: hv.delete_vm(ghost),
                 lambda: hv.relocate(vm.id, "host-99999"),
                 lambda: hv.reconfigure_nics(ghost, [NicSpec(vm.nics[0].network_id)])):
        with pytest.raises(NotFound) as exc:
            call()
        assert str(exc.value)
    with pytest.raises(NotFound):
        hv.create_vm(VMSpec(name="nowhere", host_id="host-99999", datastore_id=vm.disks[0].datastore_id))
    with pytest.raises(InvalidSpec):
        hv.create_vm(VMSpec(name="bad", host_id=vm.host_id, datastore_id=vm.disks[0].datastore_id,
                            disks=[DiskSpec(capacity_bytes=1000)]))


def test_unreachable_manager_and_bad_login(env, caplog):
    import socket
    with socket.socket() as s:      # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kind = "vsphere" if env.backend == "vcsim" else "simulator"
    with pytest.raises(Unreachable) as exc:
        if kind == "vsphere":
            connect(kind, **{**env.settings, "port": port})
        else:
            connect(kind, url=f"http://127.0.0.1:{port}").hosts()
    assert str(port) in str(exc.value)
    if kind == "vsphere":
        with caplog.at_level("DEBUG"), pytest.raises(AuthenticationFailed) as exc:
            connect(kind, **{**env.settings, "password": "wrong-s3cret"})
        assert "wrong-s3cret" not in str(exc.value) + caplog.text
    with pytest.raises(InvalidSpec):
        connect("scvmm-direct")


def test_power_off_and_on(env):
    hv, name = env.hv, "site-a-vm1"
    vm_id = env.vm_id(name)
    hv.power_off(vm_id, graceful=True)
    assert hv.vm(vm_id).power_state == "poweredOff"
    wait_until(lambda: env.sim_vm(name)["power_state"] == "poweredOff", NOTICE_S,
               what="the data path to power the VM off")
    hv.power_on(vm_id)
    hv.power_on(vm_id)     # already on: nothing to do
    assert hv.vm(vm_id).power_state == "poweredOn"
    wait_until(lambda: env.sim_vm(name)["power_state"] == "poweredOn", NOTICE_S,
               what="the data path to power the VM on")


def test_relocate_is_done_and_noticed(env):
    hv, name = env.hv, "site-a-vm0"
    hv.poll()
    vm = hv.vm(env.vm_id(name))
    dest = next(h for h in hv.hosts() if h.id != vm.host_id)
    hv.relocate(vm.id, dest.id)
    assert hv.vm(vm.id).host_id == dest.id
    wait_until(lambda: env.sim_vm(name)["host"] == dest.name, NOTICE_S,
               what="the data path to follow the vMotion")
    seen = changes_until(hv, lambda cs: any(c.kind == "vm_moved" and c.id == vm.id for c in cs))
    moved = next(c for c in seen if c.kind == "vm_moved")
    assert (moved.name, moved.old, moved.new) == (name, vm.host_id, dest.id)


def test_out_of_band_changes_are_noticed_within_5_s(env):
    hv = env.hv
    events: list[Change] = []
    hv.poll()
    watch = hv.watch(events.append, interval=0.5)
    try:
        time.sleep(0.7)    # its first poll is the baseline
        vm0 = env.sim_vm("site-a-vm0")
        dest = next(h["name"] for h in env.sim("/api/hosts") if h["name"] != vm0["host"])
        env.sim("/api/vms/site-a-vm0/vmotion", "POST", json={"host": dest})
        env.sim("/api/vms/site-a-vm1/rename", "POST", json={"name": "site-a-renamed"})
        env.sim("/api/vms", "POST", json={"name": "site-a-oob", "disks_mib": [1]})
        t0 = time.monotonic()
        want = {"vm_moved": "site-a-vm0", "vm_renamed": "site-a-renamed", "vm_added": "site-a-oob"}
        wait_until(lambda: all(any(e.kind == k and e.name == n for e in events) for k, n in want.items()),
                   NOTICE_S, step=0.05, what=f"changes {want} (saw {events})")
        assert time.monotonic() - t0 < NOTICE_S
        moved = next(e for e in events if e.kind == "vm_moved")
        assert moved.new == env.host_id(dest) and moved.old != moved.new
        renamed = next(e for e in events if e.kind == "vm_renamed")
        assert (renamed.old, renamed.new) == ("site-a-vm1", "site-a-renamed")
        added = next(e for e in events if e.kind == "vm_added")
        env.sim("/api/vms/site-a-oob", "DELETE")
        t0 = time.monotonic()
        wait_until(lambda: any(e.kind == "vm_removed" and e.id == added.id for e in events),
                   NOTICE_S, step=0.05, what="the deleted VM to be noticed")
        assert time.monotonic() - t0 < NOTICE_S
    finally:
        watch.stop()
        env.sim("/api/vms/site-a-renamed/rename", "POST", json={"name": "site-a-vm1"})
    assert not watch.thread.is_alive()


def test_host_failure_is_noticed(env):
    if env.backend == "vcsim":
        pytest.skip("vcsim 0.24 has no DisconnectHost/ReconnectHost: the mirror cannot show a host down")
    hv = env.hv
    h1 = env.host_id("site-a-h1")
    on_h1 = [v.id for v in hv.vms() if v.host_id == h1 and v.power_state == "poweredOn"]
    hv.poll()
    env.sim("/api/hosts/site-a-h1/fail", "POST")
    try:
        seen = changes_until(hv, lambda cs: any(c.kind == "host_state" for c in cs))
        assert Change("host_state", h1, "site-a-h1", "connected", "disconnected") in seen
        assert {c.id for c in seen if c.kind == "vm_power" and c.new == "poweredOff"} == set(on_h1)
    finally:
        env.sim("/api/hosts/site-a-h1/restore", "POST")
    seen = changes_until(hv, lambda cs: any(c.kind == "host_state" for c in cs))
    assert Change("host_state", h1, "site-a-h1", "disconnected", "connected") in seen


def test_create_reconfigure_and_delete_a_vm(env):
    hv = env.hv
    h1, net0, test_net = env.host_id("site-a-h1"), env.net_id("site-a-net0"), env.net_id("site-a-test")
    spec = VMSpec(name="zvm-recovered", host_id=h1, datastore_id=env.ds_id("site-a-ds1"), cpus=2,
                  memory_mib=512, power_on=True,
                  nics=[NicSpec(net0, mac="00:50:56:aa:00:01", ip="10.0.7.7", prefix=16)],
                  disks=[DiskSpec(capacity_bytes=8 * MiB)])
    vm = hv.create_vm(spec)
    assert (vm.name, vm.host_id, vm.power_state, vm.cpus, vm.memory_mib) == \
        ("zvm-recovered", h1, "poweredOn", 2, 512)
    assert [(n.network_id, n.mac, n.ip) for n in vm.nics] == [(net0, "00:50:56:aa:00:01", "10.0.7.7")]
    assert [d.capacity_bytes for d in vm.disks] == [8 * MiB]
    assert vm in hv.vms()
    # the simulator runs it: a VM made through vCenter is adopted by the data path
    sim = wait_until(lambda: (v := env.sim_vm("zvm-recovered")) and v["power_state"] == "poweredOn" and v,
                     NOTICE_S, what="the data path to run the new VM")
    assert sim["instance_uuid"] == vm.instance_uuid and sim["host"] == "site-a-h1"
    assert [(n["mac"], n["ip"], n["network"]) for n in sim["nics"]] == \
        [("00:50:56:aa:00:01", "10.0.7.7", "site-a-net0")]
    assert [d["capacity_bytes"] for d in sim["disks"]] == [8 * MiB]
    env.sim("/api/vms/zvm-recovered/write", "POST", json={"disk": 0, "offset": 0, "data": "aGVsbG8="})
    with open(sim["disks"][0]["path"], "rb") as f:     # the guest writes into that VM's disk file
        assert f.read(5) == b"hello"
    # re-IP into the isolated test network, and a second NIC
    vm = hv.reconfigure_nics(vm.id, [NicSpec(test_net, ip="10.100.0.9"), NicSpec(net0)])
    assert [(n.network_id, n.ip) for n in vm.nics] == [(test_net, "10.100.0.9"), (net0, None)]
    assert vm.nics[0].mac == "00:50:56:aa:00:01" and vm.nics[1].mac
    if env.backend != "vcsim":
        assert [(n["network"], n["ip"]) for n in env.sim_vm("zvm-recovered")["nics"]] == \
            [("site-a-test", "10.100.0.9"), ("site-a-net0", None)]
    hv.power_off(vm.id, graceful=False)
    wait_until(lambda: env.sim_vm("zvm-recovered")["power_state"] == "poweredOff", NOTICE_S,
               what="the data path to power the new VM off")
    hv.delete_vm(vm.id)
    assert "zvm-recovered" not in [v.name for v in hv.vms()]
    wait_until(lambda: env.sim_vm("zvm-recovered") is None, NOTICE_S,
               what="the data path to delete the VM")
    with pytest.raises(NotFound):
        hv.vm(vm.id)
    assert not os.path.exists(sim["disks"][0]["path"])


def test_delete_keeping_the_disks(env):
    hv = env.hv
    vm = hv.create_vm(VMSpec(name="zvm-kept", host_id=env.host_id("site-a-h0"),
                             datastore_id=env.ds_id("site-a-ds1"), disks=[DiskSpec(capacity_bytes=4 * MiB)]))
    path = wait_until(lambda: env.sim_vm("zvm-kept"), NOTICE_S, what="the VM in the data path")["disks"][0]["path"]
    hv.delete_vm(vm.id, keep_disks=True)
    wait_until(lambda: env.sim_vm("zvm-kept") is None, NOTICE_S, what="the data path to delete the VM")
    assert os.path.getsize(path) == 4 * MiB
    assert "zvm-kept" not in [v.name for v in hv.vms()]


def test_deploy_appliance_starts_a_vra(env, tmp_path):
    hv = env.hv
    ready = tmp_path / "vra-ready.json"
    props = {"name": "vra-site-a-h0", "token": "s3cret", "ready_file": str(ready),
             "journal_path": str(tmp_path / "journal")}
    vm_id = hv.deploy_appliance("tidemark-vra", "site-a-vra0", env.host_id("site-a-h0"),
                                env.ds_id("site-a-ds1"), env.net_id("site-a-net0"), props)
    vm = hv.vm(vm_id)
    assert (vm.name, vm.image, vm.power_state) == ("site-a-vra0", "tidemark-vra", "poweredOn")
    assert "s3cret" not in repr(vm)
    url = json.loads(wait_until(lambda: ready.exists() and ready.read_text(), 30,
                                what="the VRA to serve"))["control_url"]
    st = requests.get(url + "/v1/status", headers={"Authorization": "Bearer s3cret"}, timeout=5).json()
    assert st["name"] == "vra-site-a-h0"
    with pytest.raises(InvalidSpec):
        hv.remove_appliance(env.vm_id("site-a-vm0"))
    hv.remove_appliance(vm_id)
    wait_until(lambda: env.sim_vm("site-a-vra0") is None, NOTICE_S, what="the appliance VM to go")

    def down():
        try:
            requests.get(url + "/v1/status", timeout=1)
        except requests.ConnectionError:
            return True
        return False
    wait_until(down, 15, what="the VRA process to stop")


def test_vm_on_a_vra_recovery_image(env, tmp_path):
    """A recovered VM whose disk is a recovery VRA's image of site-a-vm0 at a checkpoint."""
    from vra.test_replication import TOKEN, VPG, VRAProc, valid_cut
    hv, src = env.hv, env.sim_vm("site-a-vm0")
    host = env.sim(f"/api/hosts/{src['host']}")
    rec = VRAProc(tmp_path, "vra-rec", journal_path=str(tmp_path / "journal"))
    prot = None
    try:
        rec.call("PUT", f"/v1/recovery/vpgs/{VPG}", json={"replica_dir": str(tmp_path / "replicas"), "disks": [
            {"vm": src["instance_uuid"], "disk": 0, "capacity": src["disks"][0]["capacity_bytes"]}]})
        prot = VRAProc(tmp_path, "vra-prot", doorbell=host["mirror"]["doorbell"], host_url=host["url"])
        prot.call("PUT", f"/v1/protected/vpgs/{VPG}", json={
            "vms": [src["instance_uuid"]], "target_host": rec.replication[0],
            "target_port": rec.replication[1], "leader": True, "participants": {prot.name: prot.url},
            "interval_s": 0, "recovery_url": rec.url})
        env.sim("/api/vms/site-a-vm0/write", "POST", json={"disk": 0, "offset": 8192, "data": "cmVjb3Zlcg=="})
        k = valid_cut(prot, timeout=30)["id"]
        wait_until(lambda: k in {c["id"] for c in rec.call("GET", f"/v1/recovery/vpgs/{VPG}/checkpoints")},
                   30, what=f"checkpoint {k} to become recoverable")
        img = rec.call("POST", f"/v1/recovery/vpgs/{VPG}/images", json={"checkpoint": k})
        image = RecoveryImage(url=rec.url, token=TOKEN, image=img["image"], vm=src["instance_uuid"], disk=0)
        vm = hv.create_vm(VMSpec(name="zvm-on-image", host_id=env.host_id("site-a-h1"),
                                 datastore_id=env.ds_id("site-a-ds1"), power_on=True,
                                 nics=[NicSpec(env.net_id("site-a-test"))],
                                 disks=[DiskSpec(capacity_bytes=src["disks"][0]["capacity_bytes"],
                                                 recovery_image=image)]))
        assert TOKEN not in repr(vm) and vm.power_state == "poweredOn"
        sim = wait_until(lambda: (v := env.sim_vm("zvm-on-image")) and v["power_state"] == "poweredOn" and v,
                         NOTICE_S, what="the data path to run the VM on the image")
        assert sim["disks"][0]["image"]["image"] == img["image"]
        want = env.sim("/api/vms/site-a-vm0/disks/0/hash")["sha256"]
        assert env.sim("/api/vms/zvm-on-image/disks/0/hash")["sha256"] == want   # the source at the cut
        hv.delete_vm(vm.id)
        wait_until(lambda: env.sim_vm("zvm-on-image") is None, NOTICE_S, what="the VM to go")
    finally:
        if prot is not None:
            prot.stop()
        rec.stop()
