"""The vpgSettings flow through the HTTP API (Flask's test client over the real app, a real
SQLite store and a one-site simulator lab for the VM inventory): sections, VMs, volumes, NICs
with re-IP; bad input is a 4xx and changes nothing. And the status rule of the monitor."""
from __future__ import annotations

import pytest

from appliance.zvm.app import create_app
from appliance.zvm.config import ZVMConfig
from appliance.zvm.serve import init
from appliance.zvm.vpgstatus import evaluate
from simulator.lab import Lab

TOKEN = "/auth/realms/zerto/protocol/openid-connect/token"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    base = tmp_path_factory.mktemp("vpgsettings")
    lab = Lab(base / "lab")
    lab.up(sites=1, hosts=1, vms=2, disk_mib=1, workload=False)
    try:
        url = lab.status()["sites"][0]["simulator_url"]
        cfg = ZVMConfig.load(None, data_dir=str(base / "zvm"), tls=False, site_name="site-a",
                             hypervisor={"kind": "simulator", "url": url})
        init(cfg, admin_password="admin-pass-1")
        app = create_app(cfg, start=False)
        c = app.test_client()
        tok = c.post(TOKEN, data={"grant_type": "password", "username": "admin",
                                  "password": "admin-pass-1"}).json["access_token"]
        c.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {tok}"
        yield c
        app.config["ZVM"].stop()
    finally:
        lab.down()


def vms(c):
    site = c.get("/v1/localsite").json["SiteIdentifier"]
    return [v for v in c.get(f"/v1/virtualizationsites/{site}/vms").json]


def test_settings_sections_and_vms(client):
    c = client
    v0, v1 = vms(c)[:2]
    sid = c.post("/v1/vpgSettings", json={"Basic": {"Name": "web", "RpoInSeconds": 120},
                                          "Vms": [{"VmIdentifier": v0["VmIdentifier"]}]}).json
    s = c.get(f"/v1/vpgSettings/{sid}").json
    assert s["Basic"]["Name"] == "web" and s["Basic"]["RpoInSeconds"] == 120
    assert s["Basic"]["JournalHistoryInHours"] == 24 and s["VpgIdentifier"] is None
    assert c.get(f"/v1/vpgSettings/{sid}/priority").json == "Medium"
    assert c.put(f"/v1/vpgSettings/{sid}/basic", json={"priority": "High"}).status_code == 200
    assert c.get(f"/v1/vpgSettings/{sid}/priority").json == "High"
    assert c.put(f"/v1/vpgSettings/{sid}/journal", json={"Limitation": {
        "HardLimitInMB": 1024, "WarningThresholdInMB": 800}}).status_code == 200
    assert c.put(f"/v1/vpgSettings/{sid}/bootgroup", json={"BootGroups": [
        {"BootGroupIdentifier": "db", "Name": "db", "BootDelayInSeconds": 30},
        {"BootGroupIdentifier": "00000000-0000-0000-0000-000000000000", "Name": "Default"}]}).status_code == 200
    assert c.post(f"/v1/vpgSettings/{sid}/vms", json={"VmIdentifier": v1["VmIdentifier"],
                                                      "BootGroupIdentifier": "db"}).status_code == 200
    assert len(c.get(f"/v1/vpgSettings/{sid}/vms").json) == 2
    vm = c.get(f"/v1/vpgSettings/{sid}/vms/{v1['VmIdentifier']}").json
    assert vm["BootGroupIdentifier"] == "db"
    [vol] = c.get(f"/v1/vpgSettings/{sid}/vms/{v1['VmIdentifier']}/volumes").json
    assert vol["VolumeIdentifier"] == "scsi:0:0"
    assert c.put(f"/v1/vpgSettings/{sid}/vms/{v1['VmIdentifier']}/volumes/scsi:0:0",
                 json={"Datastore": {"IsThin": False}}).status_code == 200
    nics = c.get(f"/v1/vpgSettings/{sid}/vms/{v1['VmIdentifier']}/nics").json
    nic = nics[0]["NicIdentifier"]
    path = f"/v1/vpgSettings/{sid}/vms/{v1['VmIdentifier']}/nics/{nic}"
    reip = {"Failover": {"Hypervisor": {"NetworkIdentifier": "net-x", "ShouldReplaceIpConfiguration": True,
                                        "IpConfig": {"StaticIp": "10.0.0.5", "SubnetMask": "255.255.255.0",
                                                     "Gateway": "10.0.0.1", "IsDhcp": False}}}}
    assert c.put(path, json=reip).status_code == 200
    got = c.get(path).json["Failover"]["Hypervisor"]
    assert got["IpConfig"]["StaticIp"] == "10.0.0.5" and got["NetworkIdentifier"] == "net-x"
    assert c.delete(path).status_code == 200
    assert c.get(path).json["Failover"]["Hypervisor"]["IpConfig"] is None
    assert c.delete(f"/v1/vpgSettings/{sid}/journal").status_code == 200
    assert c.get(f"/v1/vpgSettings/{sid}/journal").json["Limitation"]["HardLimitInMB"] == 0
    assert c.delete(f"/v1/vpgSettings/{sid}/vms/{v1['VmIdentifier']}").status_code == 200
    assert len(c.get(f"/v1/vpgSettings/{sid}/vms").json) == 1
    assert c.delete(f"/v1/vpgSettings/{sid}").status_code == 200
    assert c.get(f"/v1/vpgSettings/{sid}").status_code == 404


@pytest.mark.parametrize("method,suffix,body,status", [
    ("PUT", "/basic", {"RpoInSeconds": 0}, 400),
    ("PUT", "/basic", {"RpoInSeconds": "fast"}, 400),
    ("PUT", "/basic", {"Priority": "Urgent"}, 400),
    ("PUT", "/basic", {"JournalHistoryInHours": 10000}, 400),
    ("PUT", "/basic", {"VpgType": "Local"}, 400),
    ("PUT", "/basic", {"Name": " "}, 400),
    ("PUT", "/journal", {"Limitation": {"HardLimitInMB": 10, "WarningThresholdInMB": 20}}, 400),
    ("PUT", "/journal", {"Limitation": {"HardLimitInPercent": 101}}, 400),
    ("PUT", "/bootgroup", {"BootGroups": []}, 400),
    ("PUT", "/bootgroup", {"BootGroups": [{"BootGroupIdentifier": "x"}, {"BootGroupIdentifier": "x"}]}, 400),
    ("PUT", "/bootgroup", {"BootGroups": [{"BootGroupIdentifier": "other"}]}, 400),   # VM uses Default
    ("POST", "/vms", {"VmIdentifier": "vm-nope"}, 400),
    ("POST", "/vms", {}, 400),
    ("POST", "/vms", "VM0", 409),                       # in the settings already
    ("PUT", "/vms/VM0", {"BootGroupIdentifier": "nope"}, 400),
    ("PUT", "/vms/VM0/nics/Network adapter 1", {"Failover": {"Hypervisor": {
        "IpConfig": {"StaticIp": "10.0.0.300", "SubnetMask": "255.255.255.0"}}}}, 400),
    ("PUT", "/vms/VM0/nics/Network adapter 1", {"Failover": {"Hypervisor": {
        "IpConfig": {"StaticIp": "10.0.0.3", "SubnetMask": "255.0.255.0"}}}}, 400),
    ("PUT", "/vms/VM0/nics/Network adapter 9", {}, 404),
    ("PUT", "/vms/VM0/volumes/scsi:0:7", {}, 404),
    ("PUT", "/vms/vm-nope", {}, 404),
    ("POST", "/commit", None, 400),                     # no recovery site
    ("PUT", "/basic", "junk", 400),
])
def test_bad_input_is_4xx_and_changes_nothing(client, method, suffix, body, status):
    c = client
    v0 = vms(c)[0]
    sid = c.post("/v1/vpgSettings", json={"Basic": {"Name": "bad"},
                                          "Vms": [{"VmIdentifier": v0["VmIdentifier"]}]}).json
    before = c.get(f"/v1/vpgSettings/{sid}").json
    suffix = suffix.replace("VM0", v0["VmIdentifier"])
    if body == "VM0":
        body = {"VmIdentifier": v0["VmIdentifier"]}
    kw = {"data": body, "content_type": "application/json"} if isinstance(body, str) else {"json": body}
    r = c.open(f"/v1/vpgSettings/{sid}{suffix}", method=method, **kw)
    assert r.status_code == status, r.json
    assert r.json["detail"]
    assert c.get(f"/v1/vpgSettings/{sid}").json == before
    assert c.get("/v1/vpgs").json == []
    c.delete(f"/v1/vpgSettings/{sid}")


def test_unknown_settings_and_vpgs_are_404(client):
    assert client.get("/v1/vpgSettings/nope/basic").status_code == 404
    assert client.get("/v1/vpgs/nope").status_code == 404
    assert client.post("/v1/vpgs/nope/pause").status_code == 404
    assert client.get("/v1/vpgs/priorities").json == ["Low", "Medium", "High"]
    assert client.get("/v1/vpgs/substatuses").json[6] == "DeltaSync"


def test_status_rule():
    base = dict(initial_sync_done=True, paused=False, syncing=False, reachable=True, rpo_s=5,
                rpo_configured_s=30, history_s=3600, history_configured_s=3600, since_sync_s=7200)
    assert evaluate(**{**base, "initial_sync_done": False}) == (0, 1)
    assert evaluate(**base) == (1, 0)
    assert evaluate(**{**base, "rpo_s": 31}) == (4, 0)
    assert evaluate(**{**base, "rpo_s": None}) == (4, 0)
    assert evaluate(**{**base, "history_s": 600}) == (3, 0)
    assert evaluate(**{**base, "history_s": 600, "since_sync_s": 60}) == (1, 0)   # still building up
    # the journal dropped history inside the configured window (hard limit): not met, however young
    young = {**base, "history_s": 600, "since_sync_s": 60}
    assert evaluate(**{**young, "dropped_s_ago": 5}) == (3, 0)
    assert evaluate(**{**young, "dropped_s_ago": 4000}) == (1, 0)     # before the window
    assert evaluate(**{**young, "history_s": 3500, "dropped_s_ago": 5}) == (1, 0)   # 95 % is there
    assert evaluate(**{**young, "dropped_s_ago": 5, "rpo_s": 31}) == (4, 0)   # RPO first
    assert evaluate(**{**base, "syncing": True}) == (1, 6)
    assert evaluate(**{**base, "paused": True, "rpo_s": 100}) == (4, 25)
    assert evaluate(**{**base, "reachable": False}, current=(1, 0)) == (1, 24)
