"""End-to-end replication with real processes: lab hosts, protected VRAs, a recovery VRA, the WAN link.

A VPG of four VMs on two hosts writes random data; the leader VRA takes
checkpoints while the test has the hosts hash the source disks at each cut;
every recoverable checkpoint's image must equal those hashes.
"""
import contextlib
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from simulator.lab import Lab
from waiting import wait_until
from simulator.procs import spawn, stop_process, wait_for_file

TOKEN = "t0ken-for-tests"
H = {"Authorization": f"Bearer {TOKEN}"}
VPG = "vpg1"


class VRAProc:
    def __init__(self, tmp: Path, name: str, **cfg):
        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.cfg = {"name": name, "token": TOKEN, **cfg, "ready_file": str(self.dir / "ready.json"),
                    "state_dir": str(self.dir / "state")}
        (self.dir / "vra.json").write_text(json.dumps(self.cfg))
        self.proc = None
        self.start()

    def start(self):
        Path(self.cfg["ready_file"]).unlink(missing_ok=True)
        self.proc = spawn([sys.executable, "-m", "appliance.vra.service", "--config",
                           str(self.dir / "vra.json")], self.dir / "vra.log")
        info = wait_for_file(Path(self.cfg["ready_file"]), 60, self.proc)
        self.url = info["control_url"]
        self.replication = info["replication"]
        # A restarted VRA listens where it did before, as a configured appliance would.
        self.cfg["control_port"] = int(self.url.rsplit(":", 1)[1])
        if self.replication:
            self.cfg["replication_port"] = self.replication[1]
        (self.dir / "vra.json").write_text(json.dumps(self.cfg))

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc.poll() is None:
            stop_process(psutil.Process(self.proc.pid), timeout=10)
        self.proc.wait(10)

    def call(self, method, path, **kw):
        r = requests.request(method, self.url + path, headers=H, timeout=30, **kw)
        assert r.status_code < 400, r.text
        return r.json() if r.content else None


@contextlib.contextmanager
def replication(tmp_path, tls: bool = False, before=None):
    """A lab with a VPG of site-a's 4 VMs (2 hosts) replicating to a recovery VRA on site-b.

    ``before(lab, vms)`` runs once the lab is up and before any VRA exists.
    """
    certs = {}
    if tls:
        from appliance import pki
        ca, ca_key = pki.make_ca(tmp_path / "pki")
        import base64
        for name in ("vra-site-b-h0", "vra-site-a-h0", "vra-site-a-h1"):
            cert, key = pki.issue(tmp_path / "pki", name, ca, ca_key)
            certs[name] = {"tls_cert": str(cert), "tls_key": str(key), "tls_ca": str(ca)}
        # the recovery VRA gets contents (base64 of PEM, as a ZVM deploys it), the protected
        # ones paths (configured by hand): both spellings on one replication path
        certs["vra-site-b-h0"] = {f"{k}_pem": base64.b64encode(Path(v).read_bytes()).decode()
                                  for k, v in certs["vra-site-b-h0"].items()}
    lab = Lab(tmp_path / "lab")
    lab.up(sites=2, hosts=2, vms=4, disk_mib=8, workload=False, ring_mib=16)
    vras = []
    try:
        st = {s["name"]: s for s in lab.status()["sites"]}
        a = st["site-a"]
        if before is not None:
            before(lab, a["vms"])
        rec = VRAProc(tmp_path, "vra-site-b-h0", journal_path=str(tmp_path / "journal"),
                      journal_sync=True, **certs.get("vra-site-b-h0", {}))
        vras.append(rec)
        disks = [{"vm": v["instance_uuid"], "disk": d["index"], "capacity": d["capacity_bytes"]}
                 for v in a["vms"] for d in v["disks"]]
        rec.call("PUT", f"/v1/recovery/vpgs/{VPG}", json={"replica_dir": str(tmp_path / "replicas"),
                                                            "disks": disks})
        route = lab.api("site-a", "POST", "/api/links", json={
            "peer": "site-b", "target_host": rec.replication[0], "target_port": rec.replication[1]})
        prot = {}
        for h in a["hosts"]:
            host = lab.api("site-a", "GET", f"/api/hosts/{h['name']}")
            p = VRAProc(tmp_path, f"vra-{h['name']}", doorbell=host["mirror"]["doorbell"],
                        host_url=host["url"], **certs.get(f"vra-{h['name']}", {}))
            vras.append(p)
            prot[h["name"]] = p
        participants = {p.name: p.url for p in prot.values()}
        vms = [v["instance_uuid"] for v in a["vms"]]
        leader = prot["site-a-h0"]
        for p in prot.values():
            p.call("PUT", f"/v1/protected/vpgs/{VPG}", json={
                "vms": vms, "target_host": "127.0.0.1", "target_port": route["port"],
                "compress": True, "leader": p is leader, "participants": participants,
                "interval_s": 0, "recovery_url": rec.url})
        yield {"lab": lab, "rec": rec, "prot": prot, "leader": leader, "vms": a["vms"],
               "tmp": tmp_path, "port": route["port"]}
    finally:
        for v in vras:
            v.stop()
        lab.down()


@pytest.fixture(params=["plain"])
def setup(tmp_path, request):
    with replication(tmp_path, tls=request.param == "tls") as s:
        yield s


def workloads(lab, vms, action, mbps=3.0):
    for i, v in enumerate(vms):
        body = {"action": action}
        if action == "start":
            body["spec"] = {"mbps": mbps, "block_sizes": [4096, 65536, 262144], "pattern": "random",
                            "seed": 100 + i}
        lab.workload(v["name"], body)


def take(leader, **kw):
    return leader.call("POST", f"/v1/protected/vpgs/{VPG}/checkpoints",
                       json={"hashes": True, "hold_ms": 1000, **kw})


def recoverable(rec):
    return {c["id"]: c for c in rec.call("GET", f"/v1/recovery/vpgs/{VPG}/checkpoints")}


def check_images(rec, cuts: dict, vms):
    try:
        have = wait_until(lambda: (lambda r: r if set(cuts) <= set(r) else None)(recoverable(rec)),
                          timeout=60, what="checkpoints to become recoverable")
    except AssertionError:
        got = sorted(recoverable(rec))
        raise AssertionError(f"checkpoints {sorted(set(cuts) - set(got))} of {sorted(cuts)} never became "
                             f"recoverable; recoverable: {got}") from None
    for k, hashes in cuts.items():
        assert k in have
        for v in vms:
            for d in v["disks"]:
                got = rec.call("GET", f"/v1/recovery/vpgs/{VPG}/disks/{v['instance_uuid']}/"
                                      f"{d['index']}/hash", params={"checkpoint": k})
                assert got["sha256"] == hashes[v["instance_uuid"]][d["index"]], \
                    f"{v['name']} disk {d['index']} differs at checkpoint {k}"


def cut(leader, cuts, **kw):
    out = take(leader, **kw)
    if out["valid"]:
        cuts[out["id"]] = out["hashes"]
    return out


def valid_cut(leader, cuts=None, timeout=60, what="a valid checkpoint", **kw):
    """Take checkpoints until one is valid (every barrier held, no sync running); that one."""
    cuts = {} if cuts is None else cuts
    return wait_until(lambda: (lambda o: o if o["valid"] else None)(cut(leader, cuts, **kw)),
                      timeout=timeout, step=0.5, what=what)


@pytest.mark.parametrize("setup", ["plain", "tls"], indirect=True)
def test_images_equal_sources_at_random_checkpoints(setup):
    lab, rec, leader, vms = setup["lab"], setup["rec"], setup["leader"], setup["vms"]
    assert len({v["host"] for v in vms}) == 2          # the VPG spans both hosts
    workloads(lab, vms, "start")
    cuts = {}
    rnd = random.Random(7)
    taken = 0
    # Six under load; a busy machine may hold a barrier too long and void one, so up to
    # twelve until three are valid.
    while taken < 6 or (len(cuts) < 3 and taken < 12):
        time.sleep(rnd.uniform(0.2, 0.8))
        cut(leader, cuts)
        taken += 1
    workloads(lab, vms, "stop")
    valid_cut(leader, cuts, tag="after-stop")
    assert len(cuts) >= 4, f"only {len(cuts)} valid checkpoints ({taken} taken under load)"
    check_images(rec, cuts, vms)
    tagged = [c for c in recoverable(rec).values() if c["tag"] == "after-stop"]
    assert len(tagged) == 1
    assert rec.call("POST", "/v1/recovery/maintain")["alerts"] == []   # within window and limits
    rpo = rec.call("GET", "/v1/status")["recovery"]["vpgs"][VPG]
    assert rpo["latest_checkpoint"] == max(cuts) and 0 <= rpo["rpo_s"] < 30
    usage = rec.call("GET", f"/v1/recovery/vpgs/{VPG}/usage")
    assert usage["entries"] > 0 and usage["bytes"] > 0


def test_control_api_needs_the_token(setup):
    rec = setup["rec"]
    assert requests.get(rec.url + "/v1/status", timeout=5).status_code == 401
    assert requests.get(rec.url + "/v1/status", headers={"Authorization": "Bearer nope"},
                        timeout=5).status_code == 401
    r = requests.put(rec.url + f"/v1/recovery/vpgs/{VPG}", headers=H, data="junk", timeout=5)
    assert r.status_code == 400 and r.json()["detail"]


def test_kill_recovery_vra_mid_stream_loses_nothing(setup):
    lab, rec, leader, vms = setup["lab"], setup["rec"], setup["leader"], setup["vms"]
    workloads(lab, vms, "start")
    early = {}
    for _ in range(3):
        time.sleep(0.4)
        cut(leader, early)
    before = recoverable(rec)
    rec.kill()                                   # kill -9 mid-stream
    time.sleep(0.5)
    rec.start()                                  # same journal: recovers, senders resume
    after = recoverable(rec)
    assert set(before) <= set(after), "a recoverable checkpoint was lost"
    late = {}
    for _ in range(3):
        time.sleep(0.4)
        cut(leader, late)
    workloads(lab, vms, "stop")
    cut(leader, late)
    # Every checkpoint taken after the restart becomes recoverable; of those taken before
    # it, the ones that were recoverable stay so (one whose COMMIT was still in flight at
    # the crash may be abandoned: it had never been recoverable) and all of them match.
    check_images(rec, late, vms)
    now = recoverable(rec)
    check_images(rec, {k: h for k, h in early.items() if k in now}, vms)
    assert set(before) & set(early) <= set(now)


def test_kill_protected_vra_mid_stream_bitmap_sync_converges(setup):
    lab, rec, leader, prot, vms = setup["lab"], setup["rec"], setup["leader"], setup["prot"], setup["vms"]
    workloads(lab, vms, "start")
    cuts = {}
    time.sleep(0.5)
    cut(leader, cuts)
    other = prot["site-a-h1"]
    other.kill()                                  # its host falls back to dirty bitmaps
    time.sleep(0.8)
    other.start()                                 # protects its VPGs again from its saved settings
    assert other.call("GET", "/v1/status")["protected"]["vpgs"][VPG]
    workloads(lab, vms, "stop")
    # The sync runs by itself; checkpoints are refused (invalid) until it converged.
    final = valid_cut(leader, cuts, timeout=60, what="a valid checkpoint after the bitmap sync")
    assert final["valid"]
    check_images(rec, {final["id"]: final["hashes"]}, vms)


def test_kill_host_process_mid_stream(setup):
    lab, rec, leader, vms = setup["lab"], setup["rec"], setup["leader"], setup["vms"]
    workloads(lab, vms, "start")
    cuts = {}
    for _ in range(2):
        time.sleep(0.4)
        cut(leader, cuts)
    wait_until(lambda: set(cuts) <= set(recoverable(rec)), what="first checkpoints")
    before = set(recoverable(rec))
    lab.fail_host("site-a-h1")                    # kill -9 of the host process, mid-stream
    out = cut(leader, cuts)                       # its VRA cannot hold a barrier: not valid
    assert not out["valid"]
    time.sleep(0.5)
    lab.restore_host("site-a-h1")                 # VMs come back, a new stream generation
    wait_until(lambda: set(before) <= set(recoverable(rec)), what="old checkpoints to stay")
    workloads(lab, vms, "stop")
    final = valid_cut(leader, cuts, timeout=60, what="a valid checkpoint after the host came back")
    assert before <= set(recoverable(rec)), "a recoverable checkpoint was lost"
    check_images(rec, {k: h for k, h in cuts.items() if k in before or k == final["id"]}, vms)


def test_link_cut_longer_than_the_buffer_ends_in_a_converging_bitmap_sync(setup):
    lab, rec, leader, vms = setup["lab"], setup["rec"], setup["leader"], setup["vms"]
    workloads(lab, vms, "start", mbps=4.0)
    cuts = {}
    time.sleep(0.5)
    cut(leader, cuts)
    lab.link("site-a", "site-b", "cut")
    stats = lambda: lab.api("site-a", "GET", "/api/stats")
    # 16 MiB rings, 8 MB/s per host: the rings overflow and writes go to dirty bitmaps.
    wait_until(lambda: sum(s["bitmap_writes"] for s in stats().values()) > 0, timeout=30,
               what="the rings to overflow into bitmaps")
    time.sleep(0.5)
    lab.link("site-a", "site-b", "restore")
    workloads(lab, vms, "stop")
    # Converges: a checkpoint after the bitmap sync is valid. Every checkpoint the leader
    # reported valid becomes recoverable, the one before the cut included (a participant's
    # marker behind its backlog, or behind the cut connection, is waited for) and equals the
    # sources at its cut.
    final = valid_cut(leader, cuts, timeout=90, what="a valid checkpoint after the bitmap sync")
    assert sum(s["sync_blocks"] for s in stats().values()) > 0
    check_images(rec, cuts, vms)
    assert final["id"] in recoverable(rec)


def test_tls_refuses_a_sender_without_a_pairing_certificate(tmp_path):
    import socket
    import ssl
    from appliance import pki
    from appliance.vra import wire
    ca, ca_key = pki.make_ca(tmp_path / "pki")
    cert, key = pki.issue(tmp_path / "pki", "vra-r", ca, ca_key)
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    rogue_ca, rogue_key = pki.make_ca(tmp_path / "rogue")
    rcert, rkey = pki.issue(tmp_path / "rogue", "vra-x", rogue_ca, rogue_key)
    rec = VRAProc(tmp_path, "vra-r", journal_path=str(tmp_path / "j"), tls_cert=str(cert),
                  tls_key=str(key), tls_ca=str(ca))
    try:
        host, port = rec.replication
        for ctx in (pki.client_context(str(rcert), str(rkey), str(rogue_ca)),   # wrong CA both ways
                    None):                                                     # plain TCP
            s = socket.create_connection((host, port), timeout=5)
            with pytest.raises((ssl.SSLError, ConnectionError, OSError, wire.WireError)):
                if ctx is not None:
                    s = ctx.wrap_socket(s, server_hostname=host)
                wire.send(s, wire.encode_json(wire.HELLO, {"token": TOKEN, "source": "x/1",
                                                           "vpg": "v"}))
                wire.recv_json(s, wire.WELCOME)
            s.close()
    finally:
        rec.stop()


def test_bandwidth_limit_holds_and_replication_catches_up(setup):
    lab, rec, leader, prot, vms = setup["lab"], setup["rec"], setup["leader"], setup["prot"], setup["vms"]
    for p in prot.values():
        st = p.call("PUT", "/v1/protected/bandwidth", json={"mbps": 1.0})
        assert st["active"] and st["bandwidth_mbps"] == 1.0
    r = requests.put(leader.url + "/v1/protected/bandwidth", headers=H, json={"mbps": -1}, timeout=5)
    assert r.status_code == 400
    t0 = time.monotonic()
    workloads(lab, vms, "start", mbps=2.0)
    time.sleep(3.0)
    granted = {n: p.call("GET", "/v1/status")["protected"]["throttle"]["granted_bytes"].get(VPG, 0)
               for n, p in prot.items()}
    dt = time.monotonic() - t0
    for n, g in granted.items():
        assert g / dt <= 1.0e6 * 1.3 + 200_000, f"{n} sent {g / dt / 1e6:.2f} MB/s over a 1 MB/s limit"
    for p in prot.values():
        p.call("PUT", "/v1/protected/bandwidth", json={"mbps": None})
    workloads(lab, vms, "stop")
    cuts = {}
    final = valid_cut(leader, cuts, timeout=90, what="a valid checkpoint once the limit is lifted")
    check_images(rec, {final["id"]: final["hashes"]}, vms)


# -- the recovery side's barrier merge, in process (docs/FORMAT.md, "Checkpoint coordination") --

class _FakeJournal:
    """Enough of the DSS journal for a VPGTarget: appends are recorded, nothing is stored."""

    def __init__(self):
        self.checkpoints = []

    def durable_pos(self, vpg):
        return None

    def progress(self, vpg):
        return {}

    def append(self, vpg, entries, checkpoints=(), *, progress=None):
        self.checkpoints.extend(c.id for c in checkpoints)


class _Stream:
    """One source of a VPGTarget: numbered records, each batch handled in its own thread."""

    def __init__(self, target, name):
        from appliance.vra import wire
        self.wire, self.target, self.source, self.seq = wire, target, f"{name}/1", 0
        target.attach(self.source, lambda seq: None, lambda: None)

    def rec(self, kind, data=b""):
        self.seq += 1
        return self.wire.Rec(kind, self.seq, b"\1" * 16, 0, 4096 * self.seq, data)

    def write(self):
        return self.rec(self.wire.R_WRITE, b"x" * 4096)

    def marker(self, k, participants=("a", "b")):
        return self.rec(self.wire.R_MARKER, json.dumps({"vpg": VPG, "checkpoint": k,
                                                         "participants": list(participants)}).encode())

    def commit(self, k, valid=True):
        return self.rec(self.wire.R_COMMIT, json.dumps({"checkpoint": k, "valid": valid,
                                                         "time": time.time()}).encode())

    def send(self, *recs):
        """Handle the batch in a thread; the thread (join it to know the batch is in)."""
        import threading
        self.errors = []

        def run():
            try:
                self.target.handle(self.source, list(recs))
            except ConnectionError as exc:      # the VPG is no longer received here
                self.errors.append(exc)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t


# The barrier timeout in these tests: short, yet long enough that a busy machine's scheduling
# delays (a few hundred ms) cannot make a participant look stalled.
TIMEOUT = 1.5


@pytest.fixture
def merge(monkeypatch):
    from appliance.vra import recovery
    monkeypatch.setattr(recovery, "BARRIER_TIMEOUT", TIMEOUT)
    monkeypatch.setattr(recovery, "BARRIER_MAX_WAIT", 30.0)
    j = _FakeJournal()
    t = recovery.VPGTarget(j, VPG)
    yield t, j, _Stream(t, "a"), _Stream(t, "b")
    t.close()


def _recoverable(j, k, timeout=5.0):
    deadline = time.monotonic() + timeout
    while k not in j.checkpoints and time.monotonic() < deadline:
        time.sleep(0.02)
    return k in j.checkpoints


def test_barrier_waiter_that_wakes_after_the_commit_still_sees_the_cut(merge):
    # The leader (a) is last at marker k and sends COMMIT k right behind it: b, waiting at k,
    # may wake only after the COMMIT consumed the cut. It must not wait on (it used to wait
    # BARRIER_TIMEOUT, stalling its stream, and the next barrier was abandoned behind it).
    t, j, a, b = merge
    for k in range(1, 30):
        tb = b.send(b.write(), b.marker(k), b.write())
        while "b" not in getattr(t.barriers.get(k), "arrived", ()):
            time.sleep(0.001)
        ta = a.send(a.write(), a.marker(k), a.commit(k), a.write())
        ta.join(5)
        tb.join(TIMEOUT / 2)
        assert not tb.is_alive(), f"b still waits at barrier {k} after its cut and COMMIT"
        assert _recoverable(j, k)


def test_barrier_waits_for_a_participant_that_is_catching_up(merge):
    # b's marker is behind a backlog that takes longer than BARRIER_TIMEOUT to arrive: as long
    # as b makes progress, a waits, and the valid checkpoint becomes recoverable.
    t, j, a, b = merge
    ta = a.send(a.write(), a.marker(7), a.commit(7))
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3 * TIMEOUT:
        b.send(b.write()).join(5)
        time.sleep(0.1)
    assert ta.is_alive() and 7 in t.barriers
    b.send(b.write(), b.marker(7)).join(5)
    ta.join(5)
    assert _recoverable(j, 7) and not t.lost


def test_barrier_waits_for_a_participant_that_is_disconnected(merge):
    # b's connection broke (a link cut) with its marker not yet sent: it resends it once it is
    # connected again, so a keeps waiting (up to BARRIER_MAX_WAIT).
    t, j, a, b = merge
    t.detach(b.source, t.links[b.source][0])
    ta = a.send(a.marker(7), a.commit(7))
    time.sleep(3 * TIMEOUT)
    assert ta.is_alive() and 7 in t.barriers
    t.attach(b.source, lambda seq: None, lambda: None)
    time.sleep(0.3)                          # connected again: it has BARRIER_TIMEOUT to send
    b.send(b.write(), b.marker(7)).join(5)
    ta.join(5)
    assert _recoverable(j, 7) and not t.lost


def test_barrier_abandoned_when_a_participant_makes_no_progress(merge):
    # b is connected and sends nothing: it has nothing more to send, its marker is not coming.
    t, j, a, b = merge
    t0 = time.monotonic()
    a.send(a.marker(7), a.commit(7)).join(5)
    assert 0.8 * TIMEOUT < time.monotonic() - t0 < 5 * TIMEOUT
    assert t.settled[7] is None and 7 not in j.checkpoints
    assert t.lost == [7]                     # a valid COMMIT without a cut is logged as lost
    b.send(b.marker(7)).join(1)              # b's marker comes late: no wait at all
    assert not t.barriers


def test_barrier_abandoned_at_once_when_a_participant_passed_it(merge):
    # b reaches marker 8 without a marker 7 (its stream lost it): 7 cannot complete.
    t, j, a, b = merge
    ta = a.send(a.marker(7))
    while 7 not in t.barriers:
        time.sleep(0.001)
    tb = b.send(b.marker(8))
    ta.join(1)
    assert not ta.is_alive() and t.settled[7] is None
    a.send(a.marker(8), a.commit(8)).join(5)
    tb.join(5)
    assert _recoverable(j, 8)
    # a marker of a barrier that every other participant already passed does not wait either
    t1 = time.monotonic()
    b.send(b.marker(5)).join(5)
    assert time.monotonic() - t1 < TIMEOUT / 2


def test_barrier_the_leader_aborted_is_not_waited_for(merge):
    t, j, a, b = merge
    t.abort(9)                               # before any marker of it came
    t0 = time.monotonic()
    a.send(a.marker(9), a.commit(9, valid=False)).join(5)
    assert time.monotonic() - t0 < 0.3
    ta = a.send(a.marker(10))
    while 10 not in t.barriers:
        time.sleep(0.001)
    t.abort(10)                              # while a waits at it
    ta.join(1)
    assert not ta.is_alive() and not j.checkpoints


def test_barrier_wait_ends_when_the_vpg_is_no_longer_received(merge):
    t, j, a, b = merge
    t.detach(b.source, t.links[b.source][0])  # b disconnected: a would wait BARRIER_MAX_WAIT
    ta = a.send(a.marker(11))
    while 11 not in t.barriers:
        time.sleep(0.001)
    t.close()                                # the VPG was dropped, or the VRA stops
    ta.join(2)
    assert not ta.is_alive() and a.errors


def test_barrier_whose_commit_came_first_is_not_waited_for(merge):
    # After a recovery VRA restart: the leader's marker k was durable before it (not resent),
    # its COMMIT k was not. b resends its marker k and must not wait for a's, which never comes.
    t, j, a, b = merge
    a.seq = 1                                # a's marker 7 (seq 1) was durable before
    t.accepted[a.source] = t.progress[a.source] = 1
    tb = b.send(b.marker(7))
    while 7 not in t.barriers:
        time.sleep(0.001)
    a.send(a.commit(7), a.write()).join(5)
    tb.join(1)
    assert not tb.is_alive() and t.settled[7] is None and t.lost == [7]
