"""A protected VPG on a lab, for the recovery operation tests (failover test, clone, bench).

    s = protected_site(zvm_lab, start_zvm, key="ft", boot=[("g1", 3), ("g2", 0)],
                       reip={"StaticIp": "10.9.0.5", ...})
    s["a"], s["b"]            # the protected and recovery ZVMs (paired, VRAs on every host)
    s["vpg"]                  # the VPG's id, MeetingSLA

``vm_hosts={index: recovery host name}`` gives VMs (in name order) a recovery host of their own
(``Vms[i].Recovery.HostIdentifier``) besides the VPG's default host (site-b-h0).
``sections={"Journal": {...}}`` adds settings sections to the VPG's body.
"""
from __future__ import annotations

import time

import requests

from test_vpgs import doc, install_vras, inv, scribble, settings_body, site_vms, tagged  # noqa: F401
from waiting import wait_until
from zvmproc import pair

FAST = dict(vpg_checkpoint_interval_s=1.0, monitor_interval_s=0.5)


def protected_site(lab, start_zvm, *, key: str, boot=None, reip: dict | None = None,
                   vms_on_h0: bool = True, name: str = "vpg-rec",
                   vm_hosts: dict[int, str] | None = None, sections: dict | None = None) -> dict:
    a = start_zvm("site-a", key=f"{key}-a", **FAST)
    b = start_zvm("site-b", key=f"{key}-b", **FAST)
    pair(a, b)
    install_vras(a)
    install_vras(b)
    if vms_on_h0:
        for v in site_vms(lab):
            if v["host"] != "site-a-h0":
                lab.vmotion(v["name"], "site-a-h0")
    vms = sorted((v for v in inv(a, "vms") if not v["VmName"].startswith("Z-VRA")),
                 key=lambda v: v["VmName"])
    scribble(lab, site_vms(lab), seed=11)
    body = settings_body(a, b, name, vms)
    if boot:
        body["BootGroups"] = {"BootGroups": [{"BootGroupIdentifier": g, "Name": g,
                                              "BootDelayInSeconds": d} for g, d in boot]}
        for i, v in enumerate(body["Vms"]):
            v["BootGroupIdentifier"] = boot[min(i, len(boot) - 1)][0]
    if vm_hosts:
        bhosts = {h["VirtualizationHostName"]: h["HostIdentifier"] for h in inv(b, "hosts")}
        for i, host in vm_hosts.items():
            body["Vms"][i]["Recovery"] = {"HostIdentifier": bhosts[host]}
    if reip:
        body["Vms"][-1]["Nics"] = [{"NicIdentifier": "Network adapter 1", "FailoverTest": {
            "Hypervisor": {"ShouldReplaceMacAddress": True, "IpConfig": reip}}}]
    body.update(sections or {})
    sid = a.ok("POST", "/v1/vpgSettings", json=body)
    a.wait_task(a.ok("POST", f"/v1/vpgSettings/{sid}/commit"), 180)
    [v] = [x for x in a.ok("GET", "/v1/vpgs") if x["VpgName"] == name]
    wait_until(lambda: a.ok("GET", f"/v1/vpgs/{v['VpgIdentifier']}")["Status"] == 1, 60, 0.3,
               "MeetingSLA")
    return {"a": a, "b": b, "lab": lab, "vpg": v["VpgIdentifier"], "vms": vms}


def source_hashes(lab) -> dict:
    """(VM name, disk) -> SHA-256 of the protected VMs' disks now."""
    return {(v["name"], d["index"]): lab.disk_hash(v["name"], d["index"])
            for v in site_vms(lab) for d in v["disks"]}


def recovery_vms(lab, suffix: str) -> list[dict]:
    return [v for v in lab.status()["sites"][1]["vms"] if v["name"].endswith(suffix)]


def images(b, vid) -> list[dict]:
    """The recovery VRA's image sets of the VPG."""
    import requests
    d = doc(b, "vpgs", vid)
    vra = doc(b, "vras", d["recoveryVra"]["identifier"])
    r = requests.get(f"{vra['controlUrl']}/v1/recovery/images",
                     headers={"Authorization": f"Bearer {vra['_token']}"}, timeout=30)
    r.raise_for_status()
    return [s for s in r.json() if s["vpg"] == vid]


def wait_state(z, tid, states=(6,), timeout=120):
    """Poll a task until it reaches one of ``states`` (fails fast on another end state)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        t = z.ok("GET", f"/v1/tasks/{tid}")
        st = t["Status"]["State"]
        if st in states:
            return t
        assert st in (1, 2, 7), t
        time.sleep(0.2)
    raise AssertionError(f"task {tid} not in {states} after {timeout} s")


def site_b_vms(lab) -> dict:
    """site-b's VMs by name, the VRA appliances left out."""
    return {v["name"]: v for v in lab.status()["sites"][1]["vms"] if not v["name"].startswith("Z-VRA")}


def b_hash(lab, name, disk):
    return lab.api("site-b", "GET", f"/api/vms/{name}/disks/{disk}/hash")["sha256"]


def vra_get(z, vra_id: str, path: str) -> requests.Response:
    """A GET on one of z's VRAs' control API, with its token (what the ZVM itself calls)."""
    vra = doc(z, "vras", vra_id)
    return requests.get(vra["controlUrl"] + path, timeout=30,
                        headers={"Authorization": f"Bearer {vra['_token']}"})
