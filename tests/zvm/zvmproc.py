"""A real ZVM process for tests: ``tidemark zvm init`` then ``tidemark zvm serve`` on loopback,
HTTPS with the certificate the init made, and an admin API client to call it with.

    z = ZVMProcess(tmp_path / "zvm-a", "site-a", hypervisor={"kind": "simulator", "url": url})
    z.start()
    z.get("/v1/localsite").json()
    tid = z.post("/v1/vras", json={...}).json(); z.wait_task(tid)
    z.stop()
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import requests

from appliance.ports import free_port
from waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
TIDEMARK = [sys.executable, "-m", "appliance.cli"]
TOKEN_PATH = "/auth/realms/zerto/protocol/openid-connect/token"


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value))


class ZVMProcess:
    def __init__(self, directory: Path, site_name: str, *, hypervisor: dict | None = None,
                 **settings):
        self.dir = Path(directory)
        self.site_name = site_name
        self.port = settings.pop("port", None) or free_port("127.0.0.1")
        self.settings = {"site_name": site_name, "data_dir": str(self.dir / "data"),
                         "listen_host": "127.0.0.1", "port": self.port, "threads": 16,
                         **settings}
        self.hypervisor = hypervisor or {"kind": "simulator", "url": ""}
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}
        self._token: str | None = None
        self.http = requests.Session()
        self.http.trust_env = False

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def fingerprint(self) -> str:
        return self.info["fingerprint"]

    @property
    def config_path(self) -> Path:
        return self.dir / "zvm.toml"

    def write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        lines = [f"{k} = {_toml(v)}" for k, v in self.settings.items()]
        lines.append(f"hypervisor = {_toml(self.hypervisor)}")
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 60) -> "ZVMProcess":
        self.write_config()
        out = subprocess.run([*TIDEMARK, "zvm", "init", "--config", str(self.config_path),
                              "--api-client", "--json"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        self.info = json.loads(out.stdout)
        self.http = requests.Session()
        self.http.trust_env = False
        self._token = None
        self.http.verify = self.info["certificate"]
        self.log = open(self.dir / "zvm.log", "ab")
        self.proc = subprocess.Popen([*TIDEMARK, "zvm", "serve", "--config", str(self.config_path)],
                                     cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_until(self._up, timeout, 0.2, f"ZVM {self.site_name} to answer")
        return self

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"ZVM {self.site_name} exited {self.proc.returncode}: "
                                 f"{(self.dir / 'zvm.log').read_text()[-3000:]}")
        try:
            return self.http.get(self.url + "/v1/localsite", timeout=2).status_code == 401
        except requests.RequestException:
            return False

    def stop(self, timeout: float = 15) -> None:
        self.http.close()               # no idle keep-alive connection for gunicorn to wait for
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()

    # -- API calls as the admin API client
    def token(self) -> str:
        if self._token is None:
            c = json.loads(Path(self.info["api_client_file"]).read_text())
            r = self.http.post(self.url + TOKEN_PATH, data={
                "grant_type": "client_credentials", "client_id": c["client_id"],
                "client_secret": c["client_secret"]}, timeout=30)
            r.raise_for_status()
            self._token = r.json()["access_token"]
        return self._token

    def call(self, method: str, path: str, *, auth: bool = True, **kw) -> requests.Response:
        headers = kw.pop("headers", {})
        if auth:
            headers["Authorization"] = f"Bearer {self.token()}"
        kw.setdefault("timeout", 60)
        return self.http.request(method, self.url + path, headers=headers, **kw)

    def get(self, path: str, **kw) -> requests.Response:
        return self.call("GET", path, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return self.call("POST", path, **kw)

    def delete(self, path: str, **kw) -> requests.Response:
        return self.call("DELETE", path, **kw)

    def put(self, path: str, **kw) -> requests.Response:
        return self.call("PUT", path, **kw)

    def ok(self, method: str, path: str, **kw):
        """The decoded answer of a call that must succeed."""
        r = self.call(method, path, **kw)
        assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text}"
        return r.json() if r.content else None

    def wait_task(self, tid: str, timeout: float = 120, state: int | None = 6) -> dict:
        """Wait until the task ended; assert it ended in ``state`` (6 Completed) unless None."""
        def done():
            t = self.ok("GET", f"/v1/tasks/{tid}")
            return t if t["Status"]["State"] not in (1, 7) else None
        t = wait_until(done, timeout, 0.2, f"task {tid}")
        if state is not None:
            assert t["Status"]["State"] == state, t
        return t

    def site_id(self) -> str:
        return self.ok("GET", "/v1/localsite")["SiteIdentifier"]

    def alerts(self, help_id: str | None = None) -> list[dict]:
        return [a for a in self.ok("GET", "/v1/alerts")
                if help_id is None or a["HelpIdentifier"] == help_id]


def pair(a: ZVMProcess, b: ZVMProcess) -> str:
    """Pair b with a (a generates the token, b pairs) and wait for the task; a's site id."""
    tok = a.ok("POST", "/v1/peersites/generatetoken")
    tid = b.ok("POST", "/v1/peersites", json={"HostName": "127.0.0.1", "Port": a.port,
                                               "Token": tok["Token"],
                                               "Fingerprint": a.fingerprint})
    b.wait_task(tid)
    return a.site_id()


def unpair(a: ZVMProcess, b: ZVMProcess) -> None:
    """Unpair a from b (from a's side) and wait for the task."""
    a.wait_task(a.ok("DELETE", f"/v1/peersites/{b.site_id()}"))
