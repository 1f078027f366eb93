"""vcsim-backed vCenter mirror: build, sync, read back, watch, stop.

Builds simulator/vcsim/main.go into $TIDEMARK_BUILD_DIR (default <repo>/.build;
~30 s cold, cached by sha256 afterwards) and runs one vcsim for the module.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pyVim.connect import Disconnect, SmartConnect  # noqa: E402
from pyVmomi import vim  # noqa: E402

from simulator import vcsim_process  # noqa: E402
from simulator.vcenter import VCenterMirror, Vcsim, VcsimBuildError, build_vcsim  # noqa: E402

pytestmark = pytest.mark.vcsim

BUILD_DIR = Path(os.environ.get("TIDEMARK_BUILD_DIR", REPO / ".build"))
MiB = 1 << 20


def make_inventory(root: Path) -> dict:
    """Two hosts in one cluster, two datastores, two networks, three VMs."""
    inv = {"name": "site-a", "kind": "vsphere", "datacenter": "site-a-dc",
           "clusters": [{"name": "site-a-cluster0", "hosts": ["site-a-h0", "site-a-h1"]}],
           "hosts": [{"name": f"site-a-h{i}", "id": f"host-{i}", "cluster": "site-a-cluster0",
                      "cpu_cores": 8, "memory_mib": 65536, "state": "connected"} for i in range(2)],
           "datastores": [{"name": f"site-a-ds{i}", "id": f"datastore-{i}",
                           "path": str(root / "datastores" / f"site-a-ds{i}"),
                           "capacity_bytes": 1 << 40} for i in range(2)],
           "networks": [{"name": "site-a-net0", "id": "network-0", "isolated": False},
                        {"name": "site-a-test", "id": "network-1", "isolated": True}],
           "vms": []}
    for i, power in enumerate(["poweredOn", "poweredOff", "poweredOn"]):
        ds = f"site-a-ds{i % 2}"
        vm_dir = root / "datastores" / ds / f"site-a-vm{i}"
        disks = [{"index": d, "capacity_bytes": (256 << d) * MiB,
                  "path": str(vm_dir / f"disk{d}.img"), "datastore": ds} for d in range(i % 2 + 1)]
        inv["vms"].append({
            "name": f"site-a-vm{i}", "id": f"vm-{i}", "instance_uuid": f"5012000{i}-aaaa-bbbb-cccc-00000000000{i}",
            "bios_uuid": f"4212000{i}-aaaa-bbbb-cccc-00000000000{i}", "host": f"site-a-h{i % 2}",
            "datastore": ds, "power_state": power, "vcpus": 1 + i, "memory_mib": 512,
            "nics": [{"mac": f"00:50:56:00:00:0{i + 1}", "ip": f"10.0.0.{11 + i}",
                      "network": "site-a-net0"}], "disks": disks, "image": None})
    # The site has written the disks of vm0 and vm1; vm2's disk file does not exist yet.
    for vm in inv["vms"][:2]:
        for disk in vm["disks"]:
            Path(disk["path"]).parent.mkdir(parents=True, exist_ok=True)
            with open(disk["path"], "wb") as f:
                f.truncate(disk["capacity_bytes"])
    return inv


def expected_snapshot(inv: dict) -> dict:
    return {"hosts": sorted(h["name"] for h in inv["hosts"]),
            "vms": sorted(({"name": v["name"], "instance_uuid": v["instance_uuid"], "host": v["host"],
                            "power_state": v["power_state"],
                            "disks": [d["capacity_bytes"] for d in v["disks"]]} for v in inv["vms"]),
                          key=lambda v: v["name"])}


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@pytest.fixture(scope="module")
def vcsim_binary() -> Path:
    return build_vcsim(BUILD_DIR)


@pytest.fixture(scope="module")
def vcsim(vcsim_binary, tmp_path_factory):
    proc = Vcsim()
    proc.start(vcsim_binary, tmp_path_factory.mktemp("vcsim") / "vcsim.log", timeout=30)
    yield proc
    pid = proc.pid
    assert proc.stop(timeout=10) is not None
    assert not psutil.pid_exists(pid)


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lab")


@pytest.fixture(scope="module")
def inventory(lab) -> dict:
    return make_inventory(lab)


@pytest.fixture(scope="module")
def mirror(vcsim, inventory):
    m = VCenterMirror(vcsim.url)
    m.sync(inventory)
    yield m
    m.close()


@pytest.fixture(scope="module")
def raw(vcsim):
    """A separate pyvmomi session, acting like a vSphere admin behind the mirror's back."""
    u = urlparse(vcsim.url)
    si = SmartConnect(host=u.hostname, port=u.port, user="user", pwd="pass", protocol="http")
    yield si.RetrieveContent()
    Disconnect(si)


@pytest.fixture
def watcher(mirror):
    events, stop, ready = [], threading.Event(), threading.Event()
    thread = threading.Thread(target=mirror.watch, args=(events.append, stop, ready), daemon=True)
    thread.start()
    assert ready.wait(30), "the watcher took no baseline"
    yield events
    t0 = time.monotonic()
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert time.monotonic() - t0 < 3


def raw_find(content, vimtype, name):
    view = content.viewManager.CreateContainerView(content.rootFolder, [vimtype], True)
    try:
        return next(o for o in view.view if o.name == name)
    finally:
        view.DestroyView()


def raw_wait(task, timeout: float = 10.0):
    assert wait_for(lambda: task.info.state in ("success", "error"), timeout)
    assert task.info.state == "success", task.info.error


def test_snapshot_matches_inventory(mirror, inventory):
    assert mirror.snapshot() == expected_snapshot(inventory)


def test_inventory_details_in_vcsim(mirror, inventory, raw):
    dc = raw_find(raw, vim.Datacenter, "site-a-dc")
    assert {n.name for n in dc.network} >= {"site-a-net0", "site-a-test"}
    cluster = raw_find(raw, vim.ClusterComputeResource, "site-a-cluster0")
    assert sorted(h.name for h in cluster.host) == ["site-a-h0", "site-a-h1"]
    for host in cluster.host:
        assert sorted(d.name for d in host.datastore) == ["site-a-ds0", "site-a-ds1"]
    ds0 = raw_find(raw, vim.Datastore, "site-a-ds0")
    assert ds0.info.url == str(Path(inventory["datastores"][0]["path"]).resolve())
    for spec in inventory["vms"]:
        vm = raw_find(raw, vim.VirtualMachine, spec["name"])
        assert vm.config.uuid == spec["bios_uuid"]
        assert vm.config.hardware.numCPU == spec["vcpus"]
        assert vm.config.hardware.memoryMB == spec["memory_mib"]
        nics = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)]
        assert [(n.macAddress, n.backing.deviceName) for n in nics] == \
            [(n["mac"], n["network"]) for n in spec["nics"]]
        assert [n.name for n in vm.network] == ["site-a-net0"]
    # Disks the site wrote are referenced in place; a missing one gets a vcsim stub.
    vm0 = raw_find(raw, vim.VirtualMachine, "site-a-vm0")
    files = [d.backing.fileName for d in vm0.config.hardware.device
             if isinstance(d, vim.vm.device.VirtualDisk)]
    assert files == ["[site-a-ds0] site-a-vm0/disk0.img"]
    vm2 = raw_find(raw, vim.VirtualMachine, "site-a-vm2")
    files = [d.backing.fileName for d in vm2.config.hardware.device
             if isinstance(d, vim.vm.device.VirtualDisk)]
    assert files == [f"[site-a-ds0] .vcsim/{inventory['vms'][2]['instance_uuid']}/disk0.vmdk"]
    assert not Path(inventory["vms"][2]["disks"][0]["path"]).exists()


def test_sync_twice_is_idempotent(mirror, inventory, raw):
    before = mirror.snapshot()
    mirror.sync(inventory)
    assert mirror.snapshot() == before == expected_snapshot(inventory)
    for vimtype, count in [(vim.Datacenter, 1), (vim.ClusterComputeResource, 1),
                           (vim.HostSystem, 2), (vim.VirtualMachine, 3), (vim.Network, 3)]:
        view = raw.viewManager.CreateContainerView(raw.rootFolder, [vimtype], True)
        assert len(view.view) == count, vimtype  # 3 networks: the default "VM Network" + 2
        view.DestroyView()


def test_watch_reports_only_foreign_changes(mirror, watcher, raw):
    where = {v["name"]: v["host"] for v in mirror.snapshot()["vms"]}
    other = {"site-a-h0": "site-a-h1", "site-a-h1": "site-a-h0"}
    # Through the mirror: the site already knows, so no callback.
    mirror.relocate("site-a-vm0", other[where["site-a-vm0"]])
    mirror.power("site-a-vm1", True)
    mirror.power("site-a-vm1", False)
    # Behind the mirror's back: reported.
    target = other[where["site-a-vm2"]]
    vm2 = raw_find(raw, vim.VirtualMachine, "site-a-vm2")
    raw_wait(vm2.RelocateVM_Task(vim.vm.RelocateSpec(host=raw_find(raw, vim.HostSystem, target))))
    assert wait_for(lambda: len(watcher) >= 1)
    raw_wait(vm2.PowerOffVM_Task())
    assert wait_for(lambda: len(watcher) >= 2)
    time.sleep(1.5)  # nothing else may trickle in
    assert watcher == [{"vm": "site-a-vm2", "host": target, "power_state": "poweredOn"},
                       {"vm": "site-a-vm2", "host": target, "power_state": "poweredOff"}]
    snap = {v["name"]: v for v in mirror.snapshot()["vms"]}
    assert snap["site-a-vm0"]["host"] == other[where["site-a-vm0"]]
    assert snap["site-a-vm2"]["power_state"] == "poweredOff"


def test_vms_created_later_are_watched(mirror, inventory, watcher, raw):
    spec = dict(inventory["vms"][0], name="site-a-vm9", id="vm-9",
                instance_uuid="50120009-aaaa-bbbb-cccc-000000000009",
                bios_uuid="42120009-aaaa-bbbb-cccc-000000000009", power_state="poweredOn",
                disks=[], nics=[{"mac": "00:50:56:00:00:09", "network": "site-a-test"}])
    mirror.create_vm(inventory, spec)
    mirror.rename_vm("site-a-vm9", "site-a-vm10")
    vm = raw_find(raw, vim.VirtualMachine, "site-a-vm10")
    assert vm.config.instanceUuid == spec["instance_uuid"]
    raw_wait(vm.PowerOffVM_Task())
    assert wait_for(lambda: len(watcher) >= 1)
    time.sleep(1.5)
    host = spec["host"]
    assert watcher == [{"vm": "site-a-vm10", "host": host, "power_state": "poweredOff"}]
    mirror.delete_vm("site-a-vm10")
    time.sleep(1.5)
    assert len(watcher) == 1
    assert "site-a-vm10" not in {v["name"] for v in mirror.snapshot()["vms"]}


def test_a_new_vm_is_judged_once_its_name_and_host_are_known():
    """vcsim may announce a VM created through it without its name or host: the watcher
    judges it only once both are known, rather than adopt a VM named None."""
    from simulator.vcenter_watch import VCenterWatch
    w = VCenterWatch()
    w._init_watch()
    asked = time.monotonic()
    assert w._judge("vm-9", (None, "h0", "poweredOff"), asked, False) == "wait"
    assert w._judge("vm-9", ("Z-VRA-b-h0", None, "poweredOff"), asked, False) == "wait"
    assert w._judge("vm-9", ("Z-VRA-b-h0", "h0", "poweredOff"), asked, False) == "added"
    assert w._judge("vm-9", ("Z-VRA-b-h0", "h0", "poweredOff"), asked, False) == "same"
    assert w._judge("vm-9", ("Z-VRA-b-h0", "h0", "poweredOn"), asked, False) == "report"
    assert w._judge("vm-9", (None, "h0", "poweredOn"), asked, False) == "wait"


def test_refresh_reads_what_the_update_stream_left_out(mirror, raw):
    """What the watcher does when a VM's update lacks its name or host: read them from vcsim."""
    from simulator.vcenter_watch import VCenterWatch
    vm = raw_find(raw, vim.VirtualMachine, "site-a-vm1")
    si = SmartConnect(**mirror._connect)
    try:
        cur, hosts = {"power_state": "stale"}, {}
        VCenterWatch._refresh(si, vm._moId, cur, hosts)
        assert cur == {"vm": "site-a-vm1", "host": vm.runtime.host.name,
                       "power_state": str(vm.runtime.powerState)}
        assert list(hosts.values()) == [vm.runtime.host.name]
        gone = {"vm": None}
        VCenterWatch._refresh(si, "vm-does-not-exist", gone, hosts)
        assert gone == {"vm": None}           # unchanged: its leave follows
    finally:
        Disconnect(si)


def test_delete_vm_keeps_site_disks(mirror, inventory, lab):
    spec = dict(inventory["vms"][1], name="site-a-vm8", instance_uuid="50120008-aaaa-bbbb-cccc-000000000008",
                bios_uuid="42120008-aaaa-bbbb-cccc-000000000008")
    disk = Path(spec["disks"][0]["path"])
    vcsim_dir = Path(inventory["datastores"][1]["path"]) / ".vcsim" / spec["instance_uuid"]
    mirror.create_vm(inventory, spec)
    assert (vcsim_dir / "site-a-vm8.vmx").is_file()
    mirror.delete_vm("site-a-vm8")
    assert disk.is_file() and disk.stat().st_size == spec["disks"][0]["capacity_bytes"]
    assert not vcsim_dir.exists()


def test_fresh_vcsim_resyncs_same_lab(vcsim_binary, inventory, tmp_path):
    """A restarted vcsim over the same datastores (stale .vcsim files) syncs cleanly."""
    with Vcsim() as other:
        other.start(vcsim_binary, tmp_path / "vcsim.log")
        m = VCenterMirror(other.url)
        m.sync(inventory)
        snap = m.snapshot()
        m.close()
    assert [v["name"] for v in snap["vms"]] == [v["name"] for v in inventory["vms"]]
    assert not psutil.pid_exists(other.pid)


def test_stop_leaves_no_process(vcsim_binary, tmp_path):
    proc = Vcsim()
    url = proc.start(vcsim_binary, tmp_path / "vcsim.log")
    assert url.startswith("http://127.0.0.1:") and url.endswith("/sdk")
    pid = proc.pid
    assert psutil.Process(pid).children(recursive=True) == []
    assert proc.stop(timeout=10) == 0  # SIGTERM handled: clean exit
    assert not psutil.pid_exists(pid)
    assert proc.stop() is None


def test_wrong_password_rejected(vcsim):
    with pytest.raises(vim.fault.InvalidLogin):
        VCenterMirror(vcsim.url, password="wrong")


def test_build_is_cached(vcsim_binary):
    mtime = vcsim_binary.stat().st_mtime_ns
    t0 = time.monotonic()
    assert build_vcsim(BUILD_DIR) == vcsim_binary
    assert time.monotonic() - t0 < 1 and vcsim_binary.stat().st_mtime_ns == mtime


def test_build_error_names_apt_command(tmp_path, monkeypatch):
    monkeypatch.setattr(vcsim_process, "_go_binary", lambda: None)
    with pytest.raises(VcsimBuildError, match="apt-get install -y golang-go golang-github-vmware-govmomi-dev"):
        build_vcsim(tmp_path)
    monkeypatch.setattr(vcsim_process, "_go_binary", lambda: "/usr/bin/go")
    monkeypatch.setattr(vcsim_process, "GOVMOMI_SRC", tmp_path / "missing")
    with pytest.raises(VcsimBuildError, match="apt-get install"):
        build_vcsim(tmp_path)


def test_tls_and_empty_inventory(vcsim_binary, tmp_path):
    with Vcsim() as proc:
        url = proc.start(vcsim_binary, tmp_path / "vcsim.log", tls=True)
        assert url.startswith("https://")
        m = VCenterMirror(url)
        assert m.snapshot() == {"hosts": [], "vms": []}
        assert m.content.rootFolder.childEntity == []
        m.close()
