"""The lab with real processes: site controllers, host processes, mirror consumers, vcsim."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from simulator.iopath import sha256_file
from simulator.lab import Lab
from waiting import wait_until
from simulator.mirror import MirrorClient, Replayer

ROOT = Path(__file__).resolve().parents[2]
FAST = {"mbps": 8, "block_sizes": [4096, 65536, 262144], "pattern": "random"}


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path / "lab")
    lab.up(sites=2, hosts=2, vms=2, disk_mib=16, workload=False)
    yield lab
    lab.down()


def site(lab, name="site-a"):
    return next(s for s in lab.status()["sites"] if s["name"] == name)


class Consumers:
    """A mirror consumer on every host of a site, all feeding one replayer (a VRA stand-in)."""

    def __init__(self, lab, vms, tmp_path):
        st = site(lab)
        self.lab = lab
        self.hosts = [h["name"] for h in st["hosts"]]
        self.replicas = {v["instance_uuid"]: [str(tmp_path / f"replica-{v['name']}-{d['index']}")
                                              for d in v["disks"]] for v in vms}
        self.rep = Replayer(self.replicas)
        self.lock = threading.Lock()
        self.finish = threading.Event()     # stop once the stream is idle (drained)
        self.abandon = threading.Event()    # stop after the record in hand
        self.clients = [MirrorClient(h["doorbell"], vra=f"test-{h['name']}") for h in st["hosts"]]
        self.errors = []
        self.threads = [threading.Thread(target=self._run, args=(c,)) for c in self.clients]
        for t in self.threads:
            t.start()

    def _run(self, client):
        try:
            while True:
                for rec in client.records(idle_timeout=0.2):
                    with self.lock:
                        self.rep.apply(rec, client.ring.ring_id)
                    client.ack()
                    if self.abandon.is_set():   # under load the stream is never idle
                        return
                if self.finish.is_set() or self.abandon.is_set():
                    return
        except Exception as exc:  # reported by close()
            self.errors.append(exc)

    def close(self, drain=True):
        """Detach every consumer: after applying all that is in the rings (``drain``), or at
        once, as a VRA that goes away. Returns once every host has seen its VRA go."""
        (self.finish if drain else self.abandon).set()
        for t in self.threads:
            t.join(60)
        assert not any(t.is_alive() for t in self.threads), "a consumer did not stop"
        for c in self.clients:
            c.close()
        self.rep.close()
        assert not self.errors, self.errors
        for h in self.hosts:
            url = self.lab.api("site-a", "GET", f"/api/hosts/{h}")["url"] + "/status"
            wait_until(lambda: not requests.get(url, timeout=10).json()["mirror"]["attached"],
                       what=f"{h} to see its VRA detach")


def test_replay_across_vmotion_under_load(lab, tmp_path):
    vms = site(lab)["vms"]
    cons = Consumers(lab, vms, tmp_path)
    try:
        for i, v in enumerate(vms):
            lab.workload(v["name"], {"action": "start", "spec": {**FAST, "seed": 10 + i}})
        vm0 = vms[0]
        hosts = [h["name"] for h in site(lab)["hosts"]]
        for dest in (hosts[1], hosts[0], hosts[1]):
            time.sleep(0.7)
            moved = lab.vmotion(vm0["name"], dest)
            assert moved["host"] == dest
        time.sleep(0.5)
        for v in vms:
            lab.workload(v["name"], {"action": "stop"})
        time.sleep(1.0)
    finally:
        cons.close()
    assert cons.rep.gaps == [], "writes fell back to the bitmap during a healthy run"
    assert cons.rep.applied > 100
    for v in site(lab)["vms"]:
        for d, replica in zip(v["disks"], cons.replicas[v["instance_uuid"]]):
            assert sha256_file(replica, d["capacity_bytes"]) == lab.disk_hash(v["name"], d["index"])
    stats = lab.api("site-a", "GET", "/api/stats")
    assert sum(s["bitmap_writes"] for s in stats.values()) == 0


def test_host_failure_stops_vms_and_restore_brings_them_back(lab):
    st = site(lab)
    host = st["hosts"][0]["name"]
    on_host = [v["name"] for v in st["vms"] if v["host"] == host]
    assert on_host
    pid = st["hosts"][0]["pid"]
    lab.fail_host(host)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    st = site(lab)
    assert all(v["power_state"] == "poweredOff" for v in st["vms"] if v["name"] in on_host)
    with pytest.raises(Exception):
        lab.power(on_host[0], True)           # its host is down
    lab.restore_host(host)
    st = site(lab)
    assert next(h for h in st["hosts"] if h["name"] == host)["state"] == "connected"
    for v in st["vms"]:
        if v["name"] in on_host:
            assert v["power_state"] == "poweredOn"
    vm = lab.api("site-a", "GET", f"/api/vms/{on_host[0]}")
    assert vm["generation"] == 2               # the crash started a new stream generation


def test_vra_gone_and_back_bitmap_sync_converges(lab, tmp_path):
    vms = site(lab)["vms"]
    v = vms[0]
    cons = Consumers(lab, [v], tmp_path)
    lab.workload(v["name"], {"action": "start", "spec": {**FAST, "seed": 3}})
    time.sleep(0.5)
    cons.close(drain=False)                       # the VRA goes away under load
    wait_until(lambda: lab.api("site-a", "GET", f"/api/vms/{v['name']}/disks/0/bitmap")
               ["dirty_blocks"] > 0, what="writes to go to the bitmap")
    cons2 = Consumers(lab, [v], tmp_path)
    try:
        sent = lab.api("site-a", "POST", f"/api/vms/{v['name']}/sync")["blocks"]
        assert sent > 0
        lab.workload(v["name"], {"action": "stop"})
        time.sleep(1.0)
    finally:
        cons2.close()
    bm = lab.api("site-a", "GET", f"/api/vms/{v['name']}/disks/0/bitmap")
    # Anything still dirty (writes between the sync and the stop) gets one more round.
    if bm["dirty_blocks"]:
        cons3 = Consumers(lab, [v], tmp_path)
        try:
            lab.api("site-a", "POST", f"/api/vms/{v['name']}/sync")
            time.sleep(0.5)
        finally:
            cons3.close()
    replica = cons2.replicas[v["instance_uuid"]][0]
    assert sha256_file(replica, v["disks"][0]["capacity_bytes"]) == lab.disk_hash(v["name"], 0)


def test_appliance_vm_runs_its_service_process(lab, tmp_path):
    ready = tmp_path / "vra-ready.json"
    vm = lab.api("site-b", "POST", "/api/vms", json={
        "name": "site-b-vra0", "host": "site-b-h0", "image": "tidemark-vra", "disks_mib": [],
        "properties": {"name": "vra-site-b-h0", "token": "s3cret", "ready_file": str(ready),
                       "journal_path": str(tmp_path / "journal")},
        "power_on": True})
    assert vm["power_state"] == "poweredOn"
    host = lab.api("site-b", "GET", "/api/hosts/site-b-h0")
    app = wait_until(lambda: next((a for a in requests.get(host["url"] + "/status", timeout=5)
                                   .json()["appliances"] if a["guest"]), None), what="guest info")
    assert app["running"] and app["guest"]["role"] == "vra"
    assert app["guest"]["properties"]["name"] == "vra-site-b-h0"
    assert app["guest"]["properties"]["token"] == "***"           # secrets never shown
    info = requests.get(app["guest"]["guestinfo_url"], timeout=5).json()
    assert info["role"] == "vra" and info["service"] == "running"
    # The VRA service runs in the appliance, configured from its OVF properties.
    url = json.loads(wait_until(lambda: ready.exists() and ready.read_text(),
                                what="the VRA to serve"))["control_url"]
    st = requests.get(url + "/v1/status", headers={"Authorization": "Bearer s3cret"}, timeout=5).json()
    assert st["name"] == "vra-site-b-h0" and st["recovery"] is not None
    pid = app["pid"]
    lab.power("site-b-vra0", False)
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
               what="appliance process to stop")


def test_appliance_with_bad_settings_reports_the_failure(lab):
    lab.api("site-b", "POST", "/api/vms", json={
        "name": "site-b-vra1", "host": "site-b-h1", "image": "tidemark-vra", "disks_mib": [],
        "properties": {"bogus": "1"}, "power_on": True})
    host = lab.api("site-b", "GET", "/api/hosts/site-b-h1")
    app = wait_until(lambda: next((a for a in requests.get(host["url"] + "/status", timeout=5)
                                   .json()["appliances"]
                                   if a["guest"].get("service", "").startswith("failed")), None),
                     what="the appliance to report its failed service")
    assert "bogus" in app["guest"]["service"] and app["running"]


def test_api_rejects_bad_input_with_problem(lab):
    url = lab.controller_url("site-a")
    r = requests.post(url + "/api/vms/site-a-vm0/vmotion", data="nope", timeout=5)
    assert r.status_code == 400 and r.json()["title"]
    r = requests.post(url + "/api/vms/site-a-vm0/vmotion", json={"host": "no-such"}, timeout=5)
    assert r.status_code == 404
    r = requests.post(url + "/api/vms/site-a-vm0/workload",
                      json={"action": "start", "spec": {"pattern": "zigzag"}}, timeout=5)
    assert r.status_code == 400 and "pattern" in r.json()["detail"]
    r = requests.get(url + "/api/vms/nobody", timeout=5)
    assert r.status_code == 404
    assert site(lab)["vms"][0]["host"] == "site-a-h0"     # nothing changed


def test_lab_cli_up_status_down_leaves_no_process(tmp_path):
    d = tmp_path / "clilab"
    cli = [sys.executable, "-m", "appliance.cli", "lab"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:  # whatever fails, the lab goes down: no process may outlive the test
        subprocess.run(cli + ["up", "--dir", str(d), "--disk-mib", "8", "--hosts", "2",
                              "--vms", "1", "--no-zvm"],
                       check=True, env=env, timeout=120, capture_output=True)
        st = json.loads(subprocess.run(cli + ["status", "--dir", str(d), "--json"], check=True,
                                       env=env, timeout=60, capture_output=True).stdout)
        assert [s["name"] for s in st["sites"]] == ["site-a", "site-b"]
        a = st["sites"][0]
        assert a["kind"] == "vsphere" and a["simulator_url"].startswith("http://127.0.0.1:")
        assert a["zvm_url"] is None and a["vms"][0]["disks"][0]["capacity_bytes"] == 8 << 20
        pids = [json.loads(p.read_text())["pid"] for p in (d / "pids").glob("*.pid")]
        assert len(pids) == 6                          # 2 controllers, 4 hosts

        def run(*args, rc=0):
            r = subprocess.run(cli + [*args, "--dir", str(d)], env=env, timeout=120,
                               capture_output=True, text=True)
            assert r.returncode == rc, r.stderr
            return (r.stdout if rc == 0 else r.stderr).strip()

        # Operations print one line each; settings not given keep the workload's current ones.
        light = run("workload", "site-a-vm0", "--mbps", "3")   # the lab's light workload, faster
        assert light.startswith("site-a-vm0 workload running: 3 MB/s (at most 50 IOPS) hotspot, ")
        assert run("workload", "site-a-vm0", "--defaults", "--mbps", "3", "--seed", "7") == \
            "site-a-vm0 workload running: 3 MB/s random, 4/64 KiB, seed 7"
        assert run("workload", "site-a-vm0", "--pattern", "hotspot", "--block-sizes", "64") == \
            "site-a-vm0 workload running: 3 MB/s hotspot, 64 KiB, seed 7"
        assert run("workload", "site-a-vm0", "--stop") == "site-a-vm0 workload stopped"
        assert run("workload", "site-a-vm0", "--iops", "20") == \
            "site-a-vm0 workload running: 3 MB/s (at most 20 IOPS) hotspot, 64 KiB, seed 7"
        assert run("workload", "site-a-vm0", "--defaults", "--mbps", "2") == \
            "site-a-vm0 workload running: 2 MB/s random, 4/64 KiB, seed 1"
        assert "give sizes in KiB" in run("workload", "site-a-vm0", "--block-sizes", "4,x", rc=2)
        assert run("vmotion", "site-a-vm0", "site-a-h1") == \
            "site-a-vm0 is on site-a-h1 (poweredOn, workload running)"
        moved = json.loads(run("vmotion", "site-a-vm0", "site-a-h0", "--json"))
        assert moved["host"] == "site-a-h0"
        assert run("fail-host", "site-a-h0") == "host site-a-h0 failed; its VMs are off: site-a-vm0"
        assert "vm site-a-vm0     poweredOff  workload running at power-on" in run("status")
        assert run("restore-host", "site-a-h0").startswith("host site-a-h0 connected (pid ")
        assert run("link", "site-a", "site-b", "--bandwidth-mbps", "5", "--latency-ms", "2") == \
            "link site-a <-> site-b: up, 5 MB/s each way, 2 ms latency each way"
        assert run("link", "site-a", "site-b") == "link site-a <-> site-b: up, not shaped"
        assert run("workload", "nobody", "--mbps", "1", rc=2) == "error: no VM 'nobody' in the lab"
        # again: the restored host has a new pid
        pids = [json.loads(p.read_text())["pid"] for p in (d / "pids").glob("*.pid")]
    finally:
        subprocess.run(cli + ["down", "--dir", str(d)], check=True, env=env, timeout=120,
                       capture_output=True)
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not any(str(d) in " ".join(p.info["cmdline"] or [])
                   for p in psutil.process_iter(["cmdline"]))


@pytest.mark.vcsim
def test_vcsim_lab_matches_simulator_and_follows_relocate(tmp_path):
    from pyVim.connect import Disconnect, SmartConnect
    from pyVmomi import vim
    lab = Lab(tmp_path / "vlab")
    lab.up(sites=2, hosts=2, vms=3, disk_mib=8, vcenter="vcsim", hyperv_site=True,
           workload={"mbps": 0.2, "seed": 1})
    try:
        st = site(lab)
        assert next(s for s in lab.status()["sites"] if s["name"] == "site-b")["kind"] == "hyperv"
        hostport = st["vcenter_url"].split("//")[1].split("/")[0]
        si = SmartConnect(host=hostport.split(":")[0], port=int(hostport.split(":")[1]),
                          user="user", pwd="pass", protocol="http")
        try:
            content = si.RetrieveContent()
            view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
            vc_vms = {vm.name: vm for vm in view.view}
            hview = content.viewManager.CreateContainerView(content.rootFolder, [vim.HostSystem], True)
            vc_hosts = {h.name: h for h in hview.view}
            assert sorted(vc_hosts) == sorted(h["name"] for h in st["hosts"])
            assert sorted(vc_vms) == sorted(v["name"] for v in st["vms"])
            for v in st["vms"]:
                vm = vc_vms[v["name"]]
                assert vm.config.instanceUuid == v["instance_uuid"]
                assert vm.runtime.host.name == v["host"]
                assert vm.runtime.powerState == v["power_state"]
            target = st["vms"][0]
            dest = next(h for h in vc_hosts if h != target["host"])
            task = vc_vms[target["name"]].RelocateVM_Task(
                vim.vm.RelocateSpec(host=vc_hosts[dest], pool=vc_hosts[dest].parent.resourcePool))
            wait_until(lambda: task.info.state in ("success", "error"), what="relocate task")
            assert task.info.state == "success"
            wait_until(lambda: next(v for v in site(lab)["vms"]
                                    if v["name"] == target["name"])["host"] == dest,
                       timeout=10, what="the data path to follow the RelocateVM")
            host = lab.api("site-a", "GET", f"/api/hosts/{dest}")
            running = requests.get(host["url"] + "/status", timeout=5).json()["vms"]
            assert target["name"] in [r["vm"] for r in running]   # its IO path moved
            # and the other way round: a vMotion in the simulator shows in vCenter
            back = target["host"]
            lab.vmotion(target["name"], back)
            wait_until(lambda: vc_vms[target["name"]].runtime.host.name == back, timeout=10,
                       what="vcsim to show the vMotion")
        finally:
            Disconnect(si)
    finally:
        lab.down()


def test_site_failure_and_restore(lab):
    before = site(lab)
    running = [v["name"] for v in before["vms"] if v["power_state"] == "poweredOn"]
    pids = [h["pid"] for h in before["hosts"]]
    lab.fail_site("site-a")
    st = site(lab)
    assert st["state"] == "failed"
    assert all(h["state"] == "failed" for h in st["hosts"])
    assert all(v["power_state"] == "poweredOff" for v in st["vms"])
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    lab.restore_site("site-a")
    st = site(lab)
    assert st["state"] == "running"
    assert all(h["state"] == "connected" for h in st["hosts"])
    assert sorted(v["name"] for v in st["vms"] if v["power_state"] == "poweredOn") == sorted(running)


def test_workload_pause_resume_and_quiesced_hash(lab):
    vm = site(lab)["vms"][0]["name"]
    lab.workload(vm, {"action": "start", "spec": {"mbps": 20, "block_sizes": [65536], "seed": 4}})
    time.sleep(0.3)
    lab.workload(vm, {"action": "pause"})
    h1 = lab.disk_hash(vm)
    time.sleep(0.3)
    assert lab.disk_hash(vm) == h1                     # paused: nothing is written
    lab.workload(vm, {"action": "resume"})
    wait_until(lambda: lab.disk_hash(vm) != h1, timeout=10, what="writes after resume")
    stats = lab.api("site-a", "GET", "/api/stats")
    assert sum(s["writes"] for s in stats.values()) > 0
    lab.workload(vm, {"action": "stop"})


def test_link_cut_restore_and_shape_through_the_api(lab):
    import socket
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(5)
    try:
        route = lab.api("site-a", "POST", "/api/links",
                        json={"peer": "site-b", "target_host": "127.0.0.1",
                              "target_port": srv.getsockname()[1]})
        c = socket.create_connection(("127.0.0.1", route["port"]), timeout=5)
        peer, _ = srv.accept()
        c.sendall(b"ping")
        assert peer.recv(4) == b"ping"
        lab.link("site-a", "site-b", "cut")
        c.settimeout(2)
        with pytest.raises((ConnectionError, OSError)):
            c.sendall(b"x" * 100000)
            assert c.recv(1) != b""                    # reset or closed
            raise ConnectionError("closed")
        lab.link("site-a", "site-b", "restore")
        out = lab.link("site-a", "site-b", "shape", bandwidth_mbps=5, latency_ms=20)
        assert out[0]["bandwidth_mbps"] == 5 and out[0]["latency_ms"] == 20
        c2 = socket.create_connection(("127.0.0.1", route["port"]), timeout=5)
        p2, _ = srv.accept()
        c2.sendall(b"pong")
        assert p2.recv(4) == b"pong"
        for s in (c, c2, peer, p2):
            s.close()
    finally:
        srv.close()


@pytest.mark.slow
def test_soak_vmotions_under_heavy_load(lab, tmp_path):
    vms = site(lab)["vms"]
    cons = Consumers(lab, vms, tmp_path)
    hosts = [h["name"] for h in site(lab)["hosts"]]
    try:
        for i, v in enumerate(vms):
            lab.workload(v["name"], {"action": "start", "spec": {**FAST, "mbps": 30, "seed": 20 + i}})
        for n in range(20):
            v = vms[n % len(vms)]
            lab.vmotion(v["name"], hosts[(n // len(vms) + 1 + n) % len(hosts)])
            time.sleep(0.3)
        for v in vms:
            lab.workload(v["name"], {"action": "stop"})
        time.sleep(1.0)
    finally:
        cons.close()
    assert cons.rep.gaps == []
    for v in site(lab)["vms"]:
        for d, replica in zip(v["disks"], cons.replicas[v["instance_uuid"]]):
            assert sha256_file(replica, d["capacity_bytes"]) == lab.disk_hash(v["name"], d["index"])
