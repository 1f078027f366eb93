"""Malformed requests to every route of the ZVM API never produce a 5xx and change nothing.

Requests are generated with hypothesis from the OpenAPI document the ZVM serves (the same route
declarations that validate requests): bodies that break their schema (a field of the wrong type,
a missing required field, a body of the wrong JSON type, bytes that are not JSON), unknown path
identifiers, query parameters of the wrong type. The ZVM runs over the real app and store, with
the hypervisor adapter speaking to a real simulator site. After every request that was refused,
the store (users, clients, peers, VRAs, VPG settings, VPGs, reports) and the site's inventory are
exactly as before.
"""
from __future__ import annotations

import json
import sqlite3
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.zvm.app import create_app
from appliance.zvm.config import ZVMConfig
from appliance.zvm.serve import init
from simulator.lab import Lab

TABLES = ("users", "clients", "peers", "vras", "vpg_settings", "vpgs", "reports")
IDS = st.text(alphabet=string.ascii_letters + string.digits + "-_.", min_size=1, max_size=24)
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) |
                    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                    max_leaves=6)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    lab = Lab(base / "lab")
    app = None
    try:
        lab.up(sites=1, hosts=1, vms=1, disk_mib=8, workload=False)
        url = lab.status()["sites"][0]["simulator_url"]
        cfg = ZVMConfig.load(None, data_dir=str(base / "zvm"), tls=False, site_name="site-a",
                             hypervisor={"kind": "simulator", "url": url})
        init(cfg, admin_password="fuzz-admin-pw")
        app = create_app(cfg)
        client = app.test_client()
        tok = client.post("/auth/realms/zerto/protocol/openid-connect/token", data={
            "grant_type": "password", "username": "admin", "password": "fuzz-admin-pw"}
        ).json["access_token"]
        yield {"lab": lab, "app": app, "client": client, "cfg": cfg,
               "headers": {"Authorization": f"Bearer {tok}"},
               "doc": client.get("/v1/openapi.json").json}
    finally:
        if app is not None:
            app.config["ZVM"].stop()
        lab.down()


def snapshot(env) -> tuple:
    db = sqlite3.connect(env["cfg"].db_path)
    try:
        rows = tuple(tuple(db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()) for t in TABLES)
    finally:
        db.close()
    vms = sorted((v["name"], v["host"], v["power_state"])
                 for v in env["lab"].status()["sites"][0]["vms"])
    return rows, tuple(vms)


def _resolve(schema: dict, doc: dict) -> dict:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].split("/")[-1]]
    return schema


def valid(schema: dict, depth: int = 0):
    """Values that satisfy a schema (used around the one broken field)."""
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    t = schema.get("type")
    if t == "string":
        return st.text(max_size=10)
    if t == "integer":
        return st.integers(0, 1000)
    if t == "number":
        return st.floats(0, 1000)
    if t == "boolean":
        return st.booleans()
    if t == "array":
        return st.lists(valid(schema.get("items", {}), depth + 1), max_size=2) if depth < 3 \
            else st.just([])
    if t == "object":
        props = schema.get("properties", {})
        if depth >= 3 or not props:
            return st.just({})
        return st.fixed_dictionaries({}, optional={k: valid(v, depth + 1) for k, v in props.items()})
    return JSON


def wrong(schema: dict):
    """JSON values that do not have the schema's type."""
    t = schema.get("type")
    kinds = {"string": st.text(max_size=5), "integer": st.integers(), "boolean": st.booleans(),
             "array": st.lists(st.integers(), max_size=2),
             "object": st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
             "number": st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != int(f))}
    if not schema.get("nullable"):
        kinds["null"] = st.none()
    bad = [s for k, s in kinds.items() if k != t and not (t == "number" and k == "integer")]
    if "enum" in schema and t in kinds:
        bad.append(kinds[t].filter(lambda v: v not in schema["enum"]))
    return st.one_of(bad)


@st.composite
def broken(draw, schema: dict, doc: dict, depth: int = 0):
    """An object that breaks ``schema`` in exactly one place."""
    schema = _resolve(schema, doc)
    props = {k: _resolve(v, doc) for k, v in schema.get("properties", {}).items()}
    typed = [k for k, v in props.items() if v.get("type")]
    required = schema.get("required", [])
    base = draw(valid({**schema, "properties": props}, depth))
    for r in required:                           # the rest of the body is valid
        base.setdefault(r, draw(valid(props[r], depth + 1)))
    choices = (["drop"] if required else []) + (["field"] if typed else [])
    if not choices or depth >= 2:
        return draw(wrong(schema))
    how = draw(st.sampled_from(choices))
    if how == "drop":
        base.pop(draw(st.sampled_from(required)), None)
        return base
    k = draw(st.sampled_from(typed))
    if props[k].get("type") == "object" and props[k].get("properties") and draw(st.booleans()):
        base[k] = draw(broken(props[k], doc, depth + 1))
    else:
        base[k] = draw(wrong(props[k]))
    return base


def operations(doc: dict):
    for path, ops in sorted(doc["paths"].items()):
        for method, op in sorted(ops.items()):
            yield pytest.param((method.upper(), path, op), id=f"{method.upper()} {path}")


def _url(path: str, params: dict) -> str:
    for k, v in params.items():
        path = path.replace("{" + k + "}", v)
    return path


def pytest_generate_tests(metafunc):
    if "operation" in metafunc.fixturenames:
        from appliance.zvm.app import build_api
        from appliance.zvm.service import ZVM

        import tempfile
        with tempfile.TemporaryDirectory() as d:
            z = ZVM(ZVMConfig.load(None, data_dir=d, tls=False), background=False)
            doc = build_api(z).openapi("fuzz")
            z.stop()
        metafunc.parametrize("operation", list(operations(doc)))


def test_every_route_refuses_malformed_requests_without_a_5xx_or_a_change(env, operation):
    method, path, op = operation
    doc = env["doc"]
    client, headers = env["client"], env["headers"]
    if op.get("security") == [] and path != "/auth/realms/zerto/protocol/openid-connect/token":
        headers = {}
    params = [p for p in op.get("parameters", []) if p["in"] == "path"]
    query = [p for p in op.get("parameters", []) if p["in"] == "query"]
    body_ref = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    before = snapshot(env)

    @settings(max_examples=12, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data):
        pvals = {p["name"]: data.draw(IDS, label=p["name"]) for p in params}
        qvals = {q["name"]: data.draw(st.text(max_size=8) | st.sampled_from(["-1", "x", "1e99"]),
                                      label=q["name"])
                 for q in query if data.draw(st.booleans())}
        kind = data.draw(st.sampled_from(["schema", "type", "bytes"] if body_ref else ["none", "bytes"]))
        kw: dict = {"headers": {**headers}, "query_string": qvals}
        if kind == "schema":
            kw["data"] = json.dumps(data.draw(broken(body_ref, doc)))
            kw["headers"]["Content-Type"] = "application/json"
        elif kind == "type":
            kw["data"] = json.dumps(data.draw(st.one_of(st.integers(), st.text(max_size=5),
                                                        st.lists(JSON, max_size=2), st.none())))
            kw["headers"]["Content-Type"] = "application/json"
        elif kind == "bytes":
            kw["data"] = data.draw(st.binary(min_size=1, max_size=30).filter(_not_json))
            kw["headers"]["Content-Type"] = "application/json"
        r = client.open(_url(path, pvals), method=method, **kw)
        assert r.status_code < 500, (method, path, pvals, kw, r.get_data(as_text=True)[:300])
        if body_ref and kind != "none":
            assert r.status_code == 400, (method, path, kw, r.get_data(as_text=True)[:300])
        if r.status_code >= 400:
            problem = r.get_json(silent=True) or {}
            assert problem.get("detail") or problem.get("error"), r.get_data(as_text=True)[:300]
            assert snapshot(env) == before, (method, path, pvals, kw)

    run()


def _not_json(b: bytes) -> bool:
    try:
        json.loads(b)
        return False
    except (ValueError, UnicodeDecodeError):
        return True
