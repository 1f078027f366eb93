"""Pairing real ZVM processes over HTTPS: one-time tokens, pinned certificates, both sides
listing each other, the peer's inventory through this ZVM, unpairing both sides (or this one
only when the peer is down, with ZVM0002 raised meanwhile), three sites paired pairwise."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from appliance.zvm.errors import Unavailable
from appliance.zvm.peer import PeerClient
from waiting import wait_until
from zvmproc import pair, unpair

LAB = {"sites": 3, "hosts": 1}


def peers(z) -> dict[str, dict]:
    return {p["PeerSiteName"]: p for p in z.ok("GET", "/v1/peersites")}


def pair_body(z, token, **kw):
    return {"HostName": "127.0.0.1", "Port": z.port, "Token": token, **kw}


def test_pair_two_sites(zvms):
    a, b = zvms["site-a"], zvms["site-b"]
    tok = a.ok("POST", "/v1/peersites/generatetoken")
    assert tok["Token"] and tok["UtcExpirationDate"].endswith("Z")
    assert tok["Fingerprint"] == a.fingerprint

    # a wrong fingerprint is refused before the token is sent: the token stays good
    wrong = "AA:" * 31 + "AA"
    r = b.post("/v1/peersites", json=pair_body(a, tok["Token"], Fingerprint=wrong))
    assert r.status_code == 400 and "fingerprint" in r.json()["detail"]
    assert peers(a) == {} and peers(b) == {}
    b.wait_task(b.ok("POST", "/v1/peersites",
                     json=pair_body(a, tok["Token"], Fingerprint=a.fingerprint)))

    pa, pb = peers(a), peers(b)
    assert set(pa) == {"site-b"} and set(pb) == {"site-a"}
    assert pb["site-a"]["SiteIdentifier"] == a.site_id() and pb["site-a"]["PairingStatus"] == 0
    assert pb["site-a"]["Fingerprint"] == a.fingerprint            # pinned
    assert pa["site-b"]["Fingerprint"] == b.fingerprint
    assert pb["site-a"]["Port"] == a.port
    one = b.ok("GET", f"/v1/peersites/{a.site_id()}")
    assert one["PeerSiteName"] == "site-a"
    for z in (a, b):
        text = z.get("/v1/peersites").text.lower()
        assert "secret" not in text and "clientid" not in text
    assert b.ok("GET", "/v1/peersites", params={"peerName": "site-a"})
    assert b.ok("GET", "/v1/peersites", params={"peerName": "site-x"}) == []
    assert b.ok("GET", "/v1/peersites", params={"port": a.port})
    assert b.ok("GET", "/v1/peersites/pairingstatuses")[0] == "Paired"

    # the token was used up
    r = b.post("/v1/peersites", json=pair_body(a, tok["Token"]))
    assert r.status_code == 400 and "used" in r.json()["detail"]

    # the inventory of both sites, from either one
    sites = {s["VirtualizationSiteName"]: s["SiteIdentifier"]
             for s in b.ok("GET", "/v1/virtualizationsites")}
    assert sites == {"site-b": b.site_id(), "site-a": a.site_id()}
    a_vms = a.ok("GET", f"/v1/virtualizationsites/{a.site_id()}/vms")
    assert {v["VmName"] for v in a_vms} and \
        b.ok("GET", f"/v1/virtualizationsites/{a.site_id()}/vms") == a_vms
    hosts = b.ok("GET", f"/v1/virtualizationsites/{a.site_id()}/hosts")
    assert [h["VirtualizationHostName"] for h in hosts] == ["site-a-h0"]
    h = b.ok("GET", f"/v1/virtualizationsites/{a.site_id()}/hosts/{hosts[0]['HostIdentifier']}")
    assert h["VirtualizationHostName"] == "site-a-h0" and h["AssociatedDatastores"]
    for what in ("datastores", "networks", "folders", "resourcepools", "hostclusters"):
        assert b.ok("GET", f"/v1/virtualizationsites/{a.site_id()}/{what}"), what
    for what in ("datastoreclusters", "repositories", "devices"):
        assert b.ok("GET", f"/v1/virtualizationsites/{a.site_id()}/{what}") == []
    assert b.get("/v1/virtualizationsites/nope/hosts").status_code == 404
    assert b.get(f"/v1/virtualizationsites/{a.site_id()}/hosts/nope").status_code == 404
    ds = a.ok("GET", "/v1/datastores")
    assert a.ok("GET", f"/v1/datastores/{ds[0]['DatastoreIdentifier']}")["DatastoreName"] == \
        ds[0]["DatastoreName"]

    # later calls check the pinned fingerprint (the PeerClient every site-to-site call uses)
    cred = json.loads(Path(a.info["api_client_file"]).read_text())
    good = PeerClient(a.url, a.fingerprint, cred["client_id"], cred["client_secret"])
    assert good.request("GET", "/v1/localsite")["SiteName"] == "site-a"
    with pytest.raises(Unavailable, match="pinned"):
        PeerClient(a.url, wrong, cred["client_id"], cred["client_secret"]).request(
            "GET", "/v1/localsite")

    # unpairing from b removes the pairing on both sides
    unpair(b, a)
    assert peers(a) == {} and peers(b) == {}
    assert b.get(f"/v1/virtualizationsites/{a.site_id()}/hosts").status_code == 404
    names = [e["EventTypeName"] for e in a.ok("GET", "/v1/events")]
    assert "PairSites" in names and "UnpairSites" in names


def test_bad_pairing_input(zvms):
    a, b = zvms["site-a"], zvms["site-b"]
    tok = a.ok("POST", "/v1/peersites/generatetoken")["Token"]
    for body in ({"HostName": "127.0.0.1", "Port": a.port},                 # no token
                 {"HostName": "127.0.0.1", "Port": "x", "Token": tok},
                 {"HostName": "127.0.0.1", "Port": 0, "Token": tok},
                 {"HostName": "127.0.0.1", "Port": 1, "Token": tok},       # nothing listens
                 pair_body(a, tok, Fingerprint="not-hex"),
                 pair_body(a, "made-up-token"),
                 "not an object"):
        r = b.post("/v1/peersites", json=body)
        assert 400 <= r.status_code < 500, (body, r.text)
    r = a.post("/v1/peersites", json=pair_body(a, tok))                    # itself
    assert r.status_code == 400 and "itself" in r.json()["detail"]
    r = b.post("/v1/peersites/pair", auth=False, json={
        "token": "made-up", "siteIdentifier": "x", "siteName": "x", "url": "https://x:1",
        "clientId": "x", "clientSecret": "x"})
    assert r.status_code == 401
    assert b.delete("/v1/peersites/nope").status_code == 404
    assert b.delete("/v1/peersites/pair/nope").status_code == 404
    assert b.get("/v1/peersites", auth=False).status_code == 401
    assert peers(a) == {} and peers(b) == {}
    for z in (a, b):                  # no API client left behind by a refused pairing
        assert [c for c in z.ok("GET", "/v1/clients") if c["Role"] == "peer"] == []
    # the token survived all that: it still pairs
    b.wait_task(b.ok("POST", "/v1/peersites", json=pair_body(a, tok)))
    unpair(a, b)
    assert peers(a) == {} and peers(b) == {}


def test_three_sites_expiry_and_unreachable_peer(zvms, start_zvm):
    a, b = zvms["site-a"], zvms["site-b"]
    c = start_zvm("site-c", pairing_token_ttl_s=1)
    pair(a, c)                                   # c pairs with a and with b, a with b
    pair(b, c)
    pair(b, a)
    for z, others in ((a, {"site-b", "site-c"}), (b, {"site-a", "site-c"}),
                      (c, {"site-a", "site-b"})):
        assert set(peers(z)) == others, z.site_name
        assert len(z.ok("GET", "/v1/virtualizationsites")) == 3
    tok = c.ok("POST", "/v1/peersites/generatetoken")["Token"]            # lives 1 s
    time.sleep(1.5)
    r = a.post("/v1/peersites", json=pair_body(c, tok))
    assert r.status_code == 400 and "expired" in r.json()["detail"]

    # c goes down: a raises ZVM0002, and unpairs on its side only
    c_id = c.site_id()
    c.stop()
    wait_until(lambda: any("site-c" in al["Description"] for al in a.alerts("ZVM0002")),
               30, 0.3, "ZVM0002 for site-c on site-a")
    assert not peers(a)["site-c"]["IsReachable"]
    t = a.wait_task(a.ok("DELETE", f"/v1/peersites/{c_id}"))
    assert "this site only" in t["CompleteReason"]
    assert set(peers(a)) == {"site-b"} and not a.alerts("ZVM0002")

    # c is back: it still lists a (a could not tell it); it unpairs from both
    c.start()
    assert set(peers(c)) == {"site-a", "site-b"}
    t = c.wait_task(c.ok("DELETE", f"/v1/peersites/{a.site_id()}"))
    assert "only" in t["CompleteReason"]           # a had forgotten c already
    unpair(c, b)
    assert peers(c) == {} and set(peers(b)) == {"site-a"}
    unpair(a, b)
    assert peers(a) == {} and peers(b) == {}
