"""`tidemark zvm init` and `tidemark zvm serve`: a real gunicorn process over HTTPS with the
generated self-signed certificate, its fingerprint, and files that hold secrets at 0600."""
from __future__ import annotations

import hashlib
import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import requests

from appliance.ports import free_port
from waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]


def test_init_and_serve_over_https(tmp_path):
    port = free_port("127.0.0.1")
    conf = tmp_path / "zvm.toml"
    conf.write_text(f'site_name = "site-x"\nport = {port}\ndata_dir = "data"\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TIDEMARK_ZVM_ADMIN_PASSWORD": "first-admin-pw"}
    cli = [sys.executable, "-m", "appliance.cli", "zvm"]
    out = json.loads(subprocess.run(cli + ["init", "--config", str(conf), "--api-client", "--json"],
                                    env=env, check=True, capture_output=True, timeout=60).stdout)
    data = tmp_path / "data"
    assert oct(data.stat().st_mode & 0o777) == "0o700"
    for secret in ("tls/zvm.key", "admin-password", "api-client.json", "zvm.sqlite"):
        assert oct((data / secret).stat().st_mode & 0o777) == "0o600", secret
    again = json.loads(subprocess.run(cli + ["init", "--config", str(conf), "--json"], env=env,
                                      check=True, capture_output=True, timeout=60).stdout)
    assert again["fingerprint"] == out["fingerprint"]          # idempotent: same certificate
    log = open(tmp_path / "zvm.log", "wb")
    proc = subprocess.Popen(cli + ["serve", "--config", str(conf)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"https://127.0.0.1:{port}"
        cert = str(data / "tls/zvm.crt")
        wait_until(lambda: _answers(url, cert), timeout=30, what="the ZVM to serve HTTPS")
        # the certificate the server presents is the one whose fingerprint init printed
        pem = ssl.get_server_certificate(("127.0.0.1", port))
        der = ssl.PEM_cert_to_DER_cert(pem)
        fp = ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
        assert fp == out["fingerprint"]
        # no certificate checking: refused by default (self-signed)
        try:
            requests.get(url + "/v1/localsite", timeout=5)
            raise AssertionError("an unverified self-signed certificate was accepted")
        except requests.exceptions.SSLError:
            pass
        client = json.loads((data / "api-client.json").read_text())
        r = requests.post(url + "/auth/realms/zerto/protocol/openid-connect/token", verify=cert,
                          data={"grant_type": "client_credentials", **client}, timeout=10)
        assert r.status_code == 200
        h = {"Authorization": f"Bearer {r.json()['access_token']}"}
        site = requests.get(url + "/v1/localsite", headers=h, verify=cert, timeout=10).json()
        assert site["SiteName"] == "site-x"
        assert requests.get(url + "/v1/localsite", verify=cert, timeout=10).status_code == 401
        # the CLI speaks to it, with the certificate file or by fingerprint
        tm = [sys.executable, "-m", "appliance.cli"]
        conn = ["--zvm", url, "--client-id", client["client_id"], "--client-secret",
                client["client_secret"]]
        r = subprocess.run(tm + ["site", "show", *conn, "--ca-cert", cert, "--json"], env=env,
                           capture_output=True, timeout=60, text=True)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["SiteName"] == "site-x"
        r = subprocess.run(tm + ["api", "call", "GET", "/v1/zvm/status", *conn, "--fingerprint",
                                 out["fingerprint"]], env=env, capture_output=True, timeout=60,
                           text=True)
        assert r.returncode == 0 and json.loads(r.stdout)["SiteName"] == "site-x", r.stderr
        r = subprocess.run(tm + ["site", "show", *conn, "--fingerprint", "AA:BB"], env=env,
                           capture_output=True, timeout=60, text=True)
        assert r.returncode == 3 and "fingerprint" in r.stderr
        r = subprocess.run(tm + ["tasks", "list", *conn, "--ca-cert", cert], env=env,
                           capture_output=True, timeout=60, text=True)
        assert r.returncode == 0 and r.stdout.split()[:2] == ["task", "type"], r.stdout
        r = subprocess.run(tm + ["vpgs", "show", "nope", *conn, "--ca-cert", cert], env=env,
                           capture_output=True, timeout=60, text=True)
        assert r.returncode in (4, 2), r.stderr       # no such VPG (or no VPG routes yet)
        text = log.name and Path(log.name).read_text(errors="replace")
        assert client["client_secret"] not in text and "first-admin-pw" not in text
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(5)
        log.close()
    assert proc.returncode is not None


def _answers(url, cert) -> bool:
    try:
        return requests.get(url + "/v1/openapi.json", verify=cert, timeout=2).status_code == 200
    except requests.RequestException:
        return False
