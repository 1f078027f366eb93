"""The ZVM core through its HTTP API (Flask's test client over the real app and a real SQLite
store): auth, roles, validation, OpenAPI coverage, alerts, tasks that survive a restart."""
from __future__ import annotations

import base64
import json
import sqlite3
import time

import pytest

from appliance.zvm.app import create_app
from appliance.zvm.config import ZVMConfig
from appliance.zvm.serve import init
from appliance.zvm.store import MIGRATIONS, Store
from appliance.zvm.tasks import Operation, operation
from waiting import wait_until

TOKEN = "/auth/realms/zerto/protocol/openid-connect/token"


@pytest.fixture
def cfg(tmp_path):
    c = ZVMConfig.load(None, data_dir=str(tmp_path / "zvm"), tls=False, site_name="site-t",
                       token_ttl_s=60)
    init(c, admin_password="admin-pass-1", client=True)
    return c


@pytest.fixture
def app(cfg):
    a = create_app(cfg)
    yield a
    a.config["ZVM"].stop()


def token(client, **form) -> str:
    r = client.post(TOKEN, data=form)
    assert r.status_code == 200, r.json
    assert r.json["token_type"] == "Bearer" and r.json["expires_in"] == 60
    return r.json["access_token"]


def bearer(t):
    return {"Authorization": f"Bearer {t}"}


def test_tokens_from_both_grants_and_session_add(app, cfg):
    c = app.test_client()
    secret = json.loads((cfg.path("api-client.json")).read_text())
    assert oct(cfg.path("api-client.json").stat().st_mode & 0o777) == "0o600"
    t1 = token(c, grant_type="client_credentials", client_id=secret["client_id"],
               client_secret=secret["client_secret"])
    t2 = token(c, grant_type="password", username="admin", password="admin-pass-1")
    basic = base64.b64encode(b"admin:admin-pass-1").decode()
    r = c.post("/v1/session/add", headers={"Authorization": f"Basic {basic}"})
    assert r.status_code == 200
    t3 = r.headers["x-zerto-session"]
    for h in (bearer(t1), bearer(t2), {"x-zerto-session": t3}):
        r = c.get("/v1/localsite", headers=h)
        assert r.status_code == 200 and r.json["SiteName"] == "site-t"
    # wrong secrets, no token, a made-up token, a bad grant
    assert c.post(TOKEN, data={"grant_type": "password", "username": "admin",
                               "password": "nope"}).status_code == 401
    assert c.post(TOKEN, data={"grant_type": "implicit"}).status_code == 400
    assert c.post(TOKEN, data={"grant_type": "client_credentials"}).status_code == 400
    assert c.get("/v1/localsite").status_code == 401
    assert c.get("/v1/localsite", headers=bearer("forged")).status_code == 401
    assert c.post("/v1/session/add").status_code == 401


def test_tokens_expire_and_are_stored_hashed(cfg):
    short = ZVMConfig.load(None, data_dir=cfg.data_dir, tls=False, token_ttl_s=1)
    a = create_app(short, start=False)
    c = a.test_client()
    r = c.post(TOKEN, data={"grant_type": "password", "username": "admin",
                            "password": "admin-pass-1"})
    t = r.json["access_token"]
    assert c.get("/v1/localsite", headers=bearer(t)).status_code == 200
    db = sqlite3.connect(short.db_path)
    stored = [row[0] for row in db.execute("SELECT token_hash FROM tokens")]
    assert t not in stored and len(stored) == 1
    assert all(t not in row[0] for row in db.execute("SELECT pw_hash FROM users"))
    time.sleep(1.2)
    r = c.get("/v1/localsite", headers=bearer(t))
    assert r.status_code == 401 and "expired" in r.json["detail"]
    a.config["ZVM"].stop()


def test_roles_401_and_403(app):
    c = app.test_client()
    admin = token(c, grant_type="password", username="admin", password="admin-pass-1")
    for name, role in (("vera", "viewer"), ("otto", "operator")):
        r = c.post("/v1/users", headers=bearer(admin),
                   json={"Name": name, "Password": f"{name}-password", "Role": role})
        assert r.status_code == 201, r.json
    viewer = token(c, grant_type="password", username="vera", password="vera-password")
    operator = token(c, grant_type="password", username="otto", password="otto-password")
    assert c.get("/v1/alerts", headers=bearer(viewer)).status_code == 200
    assert c.get("/v1/users", headers=bearer(viewer)).status_code == 403
    assert c.get("/v1/users", headers=bearer(operator)).status_code == 403
    r = c.post("/v1/clients", headers=bearer(operator), json={"role": "viewer"})
    assert r.status_code == 403 and "admin" in r.json["detail"]
    r = c.post("/v1/clients", headers=bearer(admin), json={"role": "viewer"})
    assert r.status_code == 201 and r.json["ClientSecret"]
    listed = c.get("/v1/clients", headers=bearer(admin)).json
    assert all("ClientSecret" not in x and "SecretHash" not in x for x in listed)
    # deleting a user revokes its tokens
    assert c.delete("/v1/users/otto", headers=bearer(admin)).status_code == 200
    assert c.get("/v1/alerts", headers=bearer(operator)).status_code == 401


def test_malformed_requests_answer_problems_and_change_nothing(app):
    c = app.test_client()
    admin = token(c, grant_type="password", username="admin", password="admin-pass-1")
    h = bearer(admin)
    before = c.get("/v1/users", headers=h).json
    for body in ("not json", "[1,2]", json.dumps({"name": "x", "password": 5, "role": "admin"}),
                 json.dumps({"name": "x", "password": "long-enough", "role": "god"}),
                 json.dumps({"name": "x"}), json.dumps({"name": "x", "NAME": "y",
                                                        "password": "long-enough", "role": "admin"})):
        r = c.post("/v1/users", headers={**h, "Content-Type": "application/json"}, data=body)
        assert r.status_code == 400, (body, r.json)
        assert r.mimetype == "application/problem+json" and r.json["detail"] and r.json["title"]
    assert c.get("/v1/users", headers=h).json == before
    assert c.get("/v1/tasks?startedAfterDate=yesterday", headers=h).status_code == 400
    assert c.get("/v1/reports/recovery?pageSize=x", headers=h).status_code == 400
    assert c.get("/v1/alerts/nope", headers=h).status_code == 404
    assert c.get("/v1/no-such-route", headers=h).status_code == 404
    assert c.delete("/v1/localsite", headers=h).status_code == 405


def test_openapi_covers_every_route(app):
    doc = app.test_client().get("/v1/openapi.json").json
    assert doc["openapi"].startswith("3.")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<", "{").replace(">", "}")
        for m in rule.methods - {"HEAD", "OPTIONS"}:
            served.add((m, path))
    assert served == documented
    for p, ops in doc["paths"].items():
        for op in ops.values():
            ref = op.get("requestBody", {}).get("content", {}).get("application/json", {}) \
                .get("schema", {}).get("$ref")
            if ref:
                assert ref.split("/")[-1] in doc["components"]["schemas"], ref


def test_alerts_raise_dismiss_clear_and_metrics(app):
    zvm = app.config["ZVM"]
    c = app.test_client()
    h = bearer(token(c, grant_type="password", username="admin", password="admin-pass-1"))
    link = {"identifier": "vpg-1", "name": "web"}
    a = zvm.alerts.raise_("rpo:vpg-1", "VPG0009", "RPO 12 s > 10 s", vpg=link)
    assert zvm.alerts.raise_("rpo:vpg-1", "VPG0009", "RPO 12 s > 10 s", vpg=link) == a
    listed = c.get("/v1/alerts?vpgIdentifier=vpg-1", headers=h).json
    assert [x["HelpIdentifier"] for x in listed] == ["VPG0009"]
    aid = listed[0]["AlertIdentifier"]
    assert c.post(f"/v1/alerts/{aid}/dismiss", headers=h).status_code == 200
    assert c.get("/v1/alerts?isDismissed=false", headers=h).json == []
    assert c.get(f"/v1/alerts/{aid}", headers=h).json["IsDismissed"] is True
    c.post(f"/v1/alerts/{aid}/undismiss", headers=h)
    assert c.get("/v1/alerts?isDismissed=false", headers=h).json[0]["AlertIdentifier"] == aid
    text = c.get("/metrics", headers=h).data.decode()
    assert 'tidemark_alerts{level="Warning",help="VPG0009"} 1' in text
    zvm.alerts.clear("rpo:vpg-1")
    assert c.get("/v1/alerts", headers=h).json == []
    assert c.get(f"/v1/alerts/{aid}", headers=h).status_code == 404
    kinds = [e["EventTypeName"] for e in c.get("/v1/events?category=Alerts", headers=h).json]
    assert kinds == ["AlertCleared", "AlertRaised"]
    assert c.get("/metrics").status_code == 401


@operation
class _Probe(Operation):
    """Test operation: a, b (waits for 'go' with a deadline), c; undo_a on failure."""
    type = "TestProbe"
    steps = ("a", "b", "c")
    rollback_steps = ("a",)

    def step_a(self):
        self.data["a"] = self.data.get("a", 0) + 1

    def step_b(self):
        sig, params = self.wait_for(("go", "fail"), timeout_s=30, default="go")
        if sig == "fail":
            raise RuntimeError("told to fail")
        self.data["b"] = params.get("value")

    def step_c(self):
        self.data["c"] = True

    def undo_a(self):
        self.data["undone"] = True


def test_tasks_persist_and_resume_after_a_restart(cfg):
    a1 = create_app(cfg)
    zvm = a1.config["ZVM"]
    t = zvm.tasks.submit("TestProbe", {"x": 1}, vpg={"identifier": "v1"}, user="admin")
    wait_until(lambda: zvm.tasks.get(t["identifier"])["state"] == 2, what="the task to wait")
    with pytest.raises(Exception, match="busy"):
        zvm.tasks.submit("TestProbe", {}, vpg={"identifier": "v1"})
    zvm.stop()                                 # the ZVM goes away while the task waits
    a2 = create_app(cfg)                      # ... and comes back: the task resumes
    zvm2 = a2.config["ZVM"]
    try:
        wait_until(lambda: zvm2.tasks.get(t["identifier"])["state"] == 2, what="resumed wait")
        zvm2.tasks.signal(t["identifier"], "go", {"value": 7})
        done = wait_until(lambda: (d := zvm2.tasks.get(t["identifier"]))["state"] == 6 and d,
                          what="the task to complete")
        assert done["data"] == {"a": 1, "b": 7, "c": True} and done["progress"] == 100
        c = a2.test_client()
        h = bearer(token(c, grant_type="password", username="admin", password="admin-pass-1"))
        api = c.get(f"/v1/tasks/{t['identifier']}", headers=h).json
        assert api["Status"] == {"State": 6, "Progress": 100} and api["Type"] == "TestProbe"
        assert [s["Step"] for s in api["Steps"]] == ["forward:a", "forward:b", "forward:c"]
        assert c.get("/v1/tasks?type=TestProbe&status=6", headers=h).json[0]["TaskIdentifier"] \
            == t["identifier"]
        assert any(e["EventTypeName"] == "OperationResumed" for e in
                   c.get("/v1/events", headers=h).json)
        # a failing step rolls back and the task ends Failed with the reason
        t2 = zvm2.tasks.submit("TestProbe", {}, vpg={"identifier": "v1"})
        wait_until(lambda: zvm2.tasks.get(t2["identifier"])["state"] == 2, what="wait")
        zvm2.tasks.signal(t2["identifier"], "fail")
        end = wait_until(lambda: (d := zvm2.tasks.get(t2["identifier"]))["state"] == 4 and d,
                         what="the task to fail")
        assert end["data"]["undone"] and "told to fail" in end["completeReason"]
    finally:
        zvm2.stop()


@operation
class _PollProbe(Operation):
    """Test operation: waits for 'go' while a poll runs (and saves) every 50 ms."""
    type = "TestPollProbe"
    steps = ("wait",)

    def step_wait(self):
        def poll():
            self.data["polls"] = self.data.get("polls", 0) + 1
            if self.data["polls"] == 2:          # a signal stored while the poll runs ...
                self.tasks.signal(self.task["identifier"], "go", {"value": 5})
            self.note(f"poll {self.data['polls']}")   # ... survives the poll's own save
            return self.data["polls"] >= 3
        sig, params = self.wait_for(("go",), timeout_s=None, poll=poll, poll_s=0.05)
        self.data["got"] = [sig, params.get("value")]


def test_wait_for_polls_while_waiting_and_keeps_a_signal_stored_meanwhile(cfg):
    a = create_app(cfg)
    zvm = a.config["ZVM"]
    try:
        t = zvm.tasks.submit("TestPollProbe", {}, vpg={"identifier": "v2"})
        done = wait_until(lambda: (d := zvm.tasks.get(t["identifier"]))["state"] == 6 and d,
                          timeout=10, what="the task to take the signal and complete")
        assert done["data"] == {"polls": 2, "got": ["go", 5]}
        assert done["history"][0]["notes"] == ["poll 1", "poll 2"]
    finally:
        zvm.stop()


def test_store_migrations_run_once_and_refuse_newer_schemas(tmp_path):
    s = Store(tmp_path / "z.sqlite")
    assert s.schema_version() == len(MIGRATIONS)
    s.put("vpgs", "v1", {"name": "web"})
    s.close()
    s2 = Store(tmp_path / "z.sqlite")
    assert s2.get("vpgs", "v1") == {"name": "web"}
    s2.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    s2.close()
    with pytest.raises(RuntimeError, match="newer"):
        Store(tmp_path / "z.sqlite")
    assert oct((tmp_path / "z.sqlite").stat().st_mode & 0o777) == "0o600"


def test_config_file_env_and_bad_settings(tmp_path, monkeypatch):
    f = tmp_path / "zvm.toml"
    f.write_text('site_name = "paris"\nport = 9443\ndata_dir = "data"\n'
                 '[hypervisor]\nkind = "simulator"\nurl = "http://127.0.0.1:1"\n')
    monkeypatch.setenv("TIDEMARK_ZVM_PORT", "9555")
    c = ZVMConfig.load(f)
    assert (c.site_name, c.port, c.data_dir) == ("paris", 9555, str(tmp_path / "data"))
    assert c.hypervisor["kind"] == "simulator"
    f.write_text("port = 'many'\n")
    monkeypatch.delenv("TIDEMARK_ZVM_PORT")
    with pytest.raises(Exception, match="port"):
        ZVMConfig.load(f)
    f.write_text("colour = 'blue'\n")
    with pytest.raises(Exception, match="colour"):
        ZVMConfig.load(f)
