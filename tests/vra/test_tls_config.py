"""The VRA's TLS material given as contents (base64 of PEM in ``tls_*_pem`` settings, what a ZVM
gives an appliance it deploys on another machine): written at start-up into the VRA's own TLS
folder (dir 0700, key 0600), the old path settings still accepted, and a trust bundle sent
through the control API (``PUT /v1/tls/trust``) used from the next start, proven over real TLS
connections to a real VRA process."""
from __future__ import annotations

import base64
import json
import os
import stat

import pytest
import requests

from appliance import pki
from appliance.vra.config import VRAConfig
from appliance.vra.tls import TLSConfigError
from test_replication import H, TOKEN, VRAProc
from tlsprobe import tls_probe


def b64(path) -> str:
    return base64.b64encode(open(path, "rb").read()).decode()


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def pkis(tmp_path):
    """Two site CAs (``a`` the VRA's own, ``b`` a site paired later); a VRA certificate from a."""
    out = {}
    for site in ("a", "b"):
        d = tmp_path / f"pki-{site}"
        ca, ca_key = pki.make_ca(d, name=f"CA {site}")
        cert, key = pki.issue(d, f"vra-{site}", ca, ca_key)
        out[site] = {"ca": ca, "ca_key": ca_key, "cert": cert, "key": key}
    return out


def pem_props(p: dict, ca=None) -> dict:
    return {"tls_cert_pem": b64(p["cert"]), "tls_key_pem": b64(p["key"]),
            "tls_ca_pem": b64(ca or p["ca"])}


def test_contents_are_written_to_the_vras_own_folder(tmp_path, pkis):
    state = tmp_path / "state"
    props = {"token": "t", "state_dir": str(state), **pem_props(pkis["a"])}
    cfg = VRAConfig.load(props=props, env={})
    d = state / "tls"
    assert (cfg.tls_cert, cfg.tls_key, cfg.tls_ca) == (str(d / "vra.pem"), str(d / "vra.key"),
                                                       str(d / "trust.pem"))
    assert mode(d) == 0o700 and mode(d / "vra.key") == 0o600
    assert (d / "vra.key").read_bytes() == pkis["a"]["key"].read_bytes()
    assert (d / "trust.pem").read_bytes() == pkis["a"]["ca"].read_bytes()
    key_text = pkis["a"]["key"].read_text()
    assert cfg.tls_key_pem == "" and key_text not in repr(cfg) and props["tls_key_pem"] not in repr(cfg)
    assert "token='t'" not in repr(cfg)
    # usable as it is: contexts load from the written files
    pki.server_context(cfg.tls_cert, cfg.tls_key, cfg.tls_ca)
    # started again (host restart) with the same properties: the same files, still 0600
    cfg2 = VRAConfig.load(props=props, env={})
    assert cfg2.tls_key == cfg.tls_key and mode(d / "vra.key") == 0o600
    # PEM text itself (a JSON config written by hand) is accepted too
    cfg3 = VRAConfig.load(props={**props, "tls_ca_pem": pkis["a"]["ca"].read_text()}, env={})
    assert cfg3.tls_ca == str(d / "trust.pem")


def test_without_state_dir_the_folder_is_next_to_the_journal(tmp_path, pkis):
    cfg = VRAConfig.load(props={"token": "t", "journal_path": str(tmp_path / "j"),
                                **pem_props(pkis["a"])}, env={})
    assert cfg.tls_key == str(tmp_path / "j.tls" / "vra.key")
    assert mode(tmp_path / "j.tls" / "vra.key") == 0o600
    with pytest.raises(TLSConfigError, match="state_dir"):
        VRAConfig.load(props={"token": "t", **pem_props(pkis["a"])}, env={})


def test_path_settings_still_work(tmp_path, pkis):
    p = pkis["a"]
    cfg = VRAConfig.load(props={"token": "t", "state_dir": str(tmp_path / "s"),
                                "tls_cert": str(p["cert"]), "tls_key": str(p["key"]),
                                "tls_ca": str(p["ca"])}, env={})
    assert (cfg.tls_cert, cfg.tls_key, cfg.tls_ca) == (str(p["cert"]), str(p["key"]), str(p["ca"]))
    assert not (tmp_path / "s" / "tls").exists()
    # a *_pem setting wins over the path of the same item
    cfg = VRAConfig.load(props={"token": "t", "state_dir": str(tmp_path / "s"),
                                "tls_cert": str(p["cert"]), "tls_key": "/nowhere/key",
                                "tls_ca": str(p["ca"]), "tls_key_pem": b64(p["key"])}, env={})
    assert cfg.tls_key == str(tmp_path / "s" / "tls" / "vra.key") and cfg.tls_cert == str(p["cert"])


def test_bad_settings_are_refused_without_echoing_them(tmp_path, pkis):
    base = {"token": "t", "state_dir": str(tmp_path / "s")}
    secret = "bm90LWEta2V5LXNlY3JldC12YWx1ZQ=="            # base64, but not PEM
    for bad, what in (({"tls_key_pem": "%%% not base64 %%%"}, "tls_key_pem"),
                      ({"tls_key_pem": secret}, "tls_key_pem"),
                      ({"tls_cert_pem": b64(pkis["a"]["key"])}, "tls_cert_pem")):
        with pytest.raises(TLSConfigError, match=what) as exc:
            VRAConfig.load(props={**base, **pem_props(pkis["a"]), **bad}, env={})
        assert secret not in str(exc.value) and "not base64" not in str(exc.value)
    with pytest.raises(TLSConfigError, match="all of"):            # a key without a certificate
        VRAConfig.load(props={**base, "tls_key_pem": b64(pkis["a"]["key"])}, env={})


def probe(port: int, client: dict, server_ca) -> str:
    return tls_probe(port, client["cert"], client["key"], server_ca)


def test_trust_bundle_pushed_through_the_control_api(tmp_path, pkis):
    """A VRA started from contents trusts its own CA only; the bundle with site b's CA is sent
    through the control API and used after a restart (same properties); a redeploy with a
    bundle of its own drops the pushed one."""
    a, b = pkis["a"], pkis["b"]
    vra = VRAProc(tmp_path, "vra-pem", journal_path=str(tmp_path / "journal"), **pem_props(a))
    try:
        cfg = json.loads((vra.dir / "vra.json").read_text())
        assert not any(k in cfg for k in ("tls_cert", "tls_key", "tls_ca"))
        d = vra.dir / "state" / "tls"
        assert mode(d) == 0o700 and mode(d / "vra.key") == 0o600
        port = vra.replication[1]
        assert probe(port, a, a["ca"]) == "accepted"
        assert probe(port, b, a["ca"]) == "refused"         # b is not paired yet

        bundle = a["ca"].read_text() + b["ca"].read_text()
        url = vra.url + "/v1/tls/trust"
        body = {"pem": base64.b64encode(bundle.encode()).decode()}
        assert requests.put(url, json=body, timeout=5).status_code == 401
        r = requests.put(url, json={"pem": "bm90IHBlbQ=="}, headers=H, timeout=5)
        assert r.status_code == 400 and "PEM" in r.json()["detail"], r.text
        r = requests.put(url, json=body, headers=H, timeout=5)
        assert r.status_code == 200, r.text
        assert r.json()["applies"] == "restart" and len(r.json()["sha256"]) == 64
        assert probe(port, b, a["ca"]) == "refused"         # from the next start on
        vra.stop()
        vra.start()                                             # same properties (a host restart)
        port = vra.replication[1]
        assert probe(port, b, a["ca"]) == "accepted"
        assert probe(port, a, a["ca"]) == "accepted"
        assert "using the trust bundle sent through the control API" in (vra.dir / "vra.log").read_text()

        # a redeploy (upgrade) brings a certificate of its own: the pushed bundle is dropped,
        # even though the new properties carry the same bundle as the first ones
        vra.stop()
        cert2, key2 = pki.issue(tmp_path / "pki-a", "vra-a2", a["ca"], a["ca_key"])
        vra.cfg.update(tls_cert_pem=b64(cert2), tls_key_pem=b64(key2))
        (vra.dir / "vra.json").write_text(json.dumps(vra.cfg))
        vra.start()
        assert probe(vra.replication[1], b, a["ca"]) == "refused"
        assert not (d / "trust-pushed.pem").exists()
        log = (vra.dir / "vra.log").read_text()
        assert a["key"].read_text().strip().splitlines()[1] not in log
        assert cfg["tls_key_pem"] not in log
    finally:
        vra.stop()


def test_trust_push_needs_tls(tmp_path):
    vra = VRAProc(tmp_path, "vra-plain", journal_path=str(tmp_path / "journal"))
    try:
        r = requests.put(vra.url + "/v1/tls/trust", json={"pem": "eA=="}, headers=H, timeout=5)
        assert r.status_code == 409, r.text
        assert requests.get(vra.url + "/v1/status", headers={"Authorization": f"Bearer {TOKEN}"},
                            timeout=5).status_code == 200
    finally:
        vra.stop()
