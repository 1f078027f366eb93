"""The VRA service: protected side, recovery side (with the DSS journal) and the control API.

Started by the appliance guest agent of a ``tidemark-vra`` VM (``main(props, stop)``,
settings from OVF properties) or directly::

    tidemark vra serve --config FILE       # JSON; TIDEMARK_VRA_* variables override

Settings (``VRAConfig``) are named the same in the file, the environment
(upper-cased with the prefix) and the OVF properties.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import struct
import sys
import threading
from pathlib import Path

from werkzeug.serving import make_server

log = logging.getLogger("tidemark.vra")
DELTA_BLOCK = 4096              # delta sync block: the journal's index granularity
DELTA_CHUNK = 64 << 20          # source bytes hashed and compared per step
MAX_HASH_SPAN = 256 << 20       # most disk bytes one hashes request covers
AHEAD_CHUNKS = 8                # recovery-side hashes of chunks held before this side compares them
HASH_THREADS = 2                # source chunks hashed at once (the kernels release the GIL)
_FRAME = struct.Struct("<II")   # a frame of a binary hashes answer: blocks, zero runs
_FRAME_ERROR = 0xFFFFFFFF       # ... or an error frame: the marker, the message's length


class SyncError(Exception):
    """A delta sync could not run or finish."""


from .config import VRAConfig  # noqa: F401  (re-exported: settings live there)


class VRA:
    def __init__(self, cfg: VRAConfig):
        from .protected import ProtectedSide
        from .recovery import Receiver
        self.cfg = cfg
        client_tls = server_tls = None
        if cfg.tls_cert:
            from appliance import pki
            client_tls = pki.client_context(cfg.tls_cert, cfg.tls_key, cfg.tls_ca)
            server_tls = pki.server_context(cfg.tls_cert, cfg.tls_key, cfg.tls_ca)
        self.protected = ProtectedSide(cfg.name, cfg.doorbell, cfg.token,
                                       tls=client_tls) if cfg.doorbell else None
        self.journal = None
        self.receiver = None
        self.images = None
        self.image_io = None
        if cfg.journal_path:
            from appliance.dss import Journal
            self.journal = Journal(cfg.journal_path, sync=cfg.journal_sync)
            self.receiver = Receiver(self.journal, cfg.token, cfg.listen_host, cfg.replication_port,
                                     tls=server_tls)
            # recovery images: opened again (pinning their checkpoints) before anything is journaled
            from .images import ImageRegistry
            self.images = ImageRegistry(self.journal, str(Path(cfg.state_dir) / "images" if cfg.state_dir
                                                          else Path(cfg.journal_path + ".images")))
            self.images.resume()
            from .image_io import ImageIOServer
            self.image_io = ImageIOServer(self.images, cfg.token, cfg.listen_host)
            self.images.io_address = self.image_io.address
        self.coordinators = {}
        self._stop = threading.Event()
        self.syncs = 0
        self.control_url = ""
        self.alerts: list[dict] = []
        self.vpg_settings: dict[str, dict] = {}       # VPG -> its protect settings
        self._sync_lock = threading.Lock()
        self._syncs_running: dict[str, int] = {}      # VPG -> delta syncs in progress
        self._syncs_started: dict[str, int] = {}      # VPG -> delta syncs ever started

    # -- persisted settings: a restarted VRA protects what it protected before it attaches
    def _state_file(self) -> Path | None:
        return Path(self.cfg.state_dir) / "protected.json" if self.cfg.state_dir else None

    def saved_vpgs(self) -> dict:
        f = self._state_file()
        if f is None or not f.exists():
            return {}
        return json.loads(f.read_text())

    def save_vpg(self, vpg: str, settings: dict | None):
        f = self._state_file()
        if f is None:
            return
        data = self.saved_vpgs()
        if settings is None:
            data.pop(vpg, None)
        else:
            data[vpg] = settings
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.chmod(0o600)
        tmp.rename(f)

    def protect(self, vpg: str, b: dict):
        """Protect a VPG on this host (and lead its checkpoints if asked); persisted."""
        from .checkpoint import Coordinator
        side = self.protected
        side.protect(vpg, [str(u) for u in b["vms"]], (str(b["target_host"]), int(b["target_port"])),
                     bool(b.get("compress", True)), str(b.get("priority", "Medium")),
                     b.get("target_token"))
        old = self.coordinators.pop(vpg, None)
        if old:
            old.stop()
        if b.get("leader"):
            c = Coordinator(vpg, b.get("participants") or {self.cfg.name: self.control_url},
                            self.cfg.token, side.commit, float(b.get("interval_s", 5.0)),
                            int(b.get("hold_ms", 50)), b.get("recovery_url"), b.get("target_token"))
            self.coordinators[vpg] = c
            c.start()
        self.vpg_settings[vpg] = dict(b)
        self.save_vpg(vpg, b)

    # -- delta sync ------------------------------------------------------------------------
    def sync_state(self, vpg: str) -> tuple[int, int]:
        """(delta syncs of the VPG running, delta syncs of it started so far)."""
        with self._sync_lock:
            return self._syncs_running.get(vpg, 0), self._syncs_started.get(vpg, 0)

    def _sync_begin(self, vpg: str):
        with self._sync_lock:
            self._syncs_running[vpg] = self._syncs_running.get(vpg, 0) + 1
            self._syncs_started[vpg] = self._syncs_started.get(vpg, 0) + 1

    def _sync_end(self, vpg: str):
        with self._sync_lock:
            self._syncs_running[vpg] -= 1

    def _host_vms(self) -> list[dict]:
        import requests
        r = requests.get(self.cfg.host_url + "/status", timeout=10)
        r.raise_for_status()
        return r.json()["vms"]

    def delta_sync_all(self, vpg: str) -> dict:
        """Delta sync of every disk of every VM of the VPG that runs on this VRA's host."""
        side = self.protected
        if side is None or vpg not in side.vpgs:
            raise KeyError(f"VPG {vpg} is not protected here")
        members = set(side.vpgs[vpg]["vms"])
        out = {"disks": [], "blocks_compared": 0, "blocks_differing": 0, "blocks_sent": 0,
               "zero_blocks": 0, "bytes_sent": 0, "bytes_read": 0, "blocks_in_holes": 0,
               "seconds": 0.0}
        for vm in self._host_vms():
            if vm["instance_uuid"] not in members:
                continue
            for d in vm["disks"]:
                r = self.delta_sync(vpg, vm["instance_uuid"], d["index"])
                out["disks"].append({"vm": vm["instance_uuid"], "disk": d["index"], **r})
                for k in ("blocks_compared", "blocks_differing", "blocks_sent", "zero_blocks",
                          "bytes_sent", "bytes_read", "blocks_in_holes", "seconds"):
                    out[k] += r[k]
        return out

    def delta_sync(self, vpg: str, vm_uuid: str, disk: int, connect_timeout: float = 30.0) -> dict:
        """Make one protected disk's replica equal to its source, moving only differing blocks.

        Reads the source disk file in ``DELTA_CHUNK`` steps, hashes each 4 KiB block
        (``kernels.block_hashes``), fetches the recovery VRA's hashes of the same range
        at its durable position, and has the host stream the differing blocks through
        the ring (``sync-blocks``: zero blocks as ZERO records without data), in order
        with the guest's writes. Hole-aware on both sides: the source's holes
        (``appliance.extents``) are not read, their blocks hash as the zero block, and the
        recovery VRA answers its replica's holes as zero runs without reading them, so blocks
        that are holes on both sides are neither read nor hashed. The recovery side's hashes
        arrive as binary streams (hashes format 3; JSON formats 1 and 2 from older VRAs) while
        this side hashes, so both VRAs work at once. While it runs, barriers of the VPG report
        it as dirty, so no checkpoint taken mid-sync is valid. See docs/FORMAT.md, "Delta sync".
        """
        import base64
        import time

        import numpy as np
        import requests

        from appliance import kernels
        from appliance.extents import file_hashes, index_runs
        side = self.protected
        if side is None or not self.cfg.host_url:
            raise SyncError("this VRA has no protected side (doorbell and host_url) configured")
        cfg = side.vpgs.get(vpg)
        if cfg is None:
            raise KeyError(f"VPG {vpg} is not protected here")
        if vm_uuid not in cfg["vms"]:
            raise KeyError(f"VM {vm_uuid} is not in VPG {vpg}")
        recovery_url = (self.vpg_settings.get(vpg) or {}).get("recovery_url")
        if not recovery_url:
            raise SyncError(f"VPG {vpg} was protected without a recovery_url: cannot compare")
        vm = next((v for v in self._host_vms() if v["instance_uuid"] == vm_uuid), None)
        if vm is None:
            raise KeyError(f"VM {vm_uuid} does not run on this VRA's host")
        d = next((x for x in vm["disks"] if x["index"] == disk), None)
        if d is None:
            raise KeyError(f"VM {vm_uuid} has no disk {disk}")
        path, cap = d["path"], int(d["capacity_bytes"])
        deadline = time.monotonic() + connect_timeout
        while not (side.client is not None and vpg in side.senders and side.senders[vpg].connected):
            if time.monotonic() > deadline:
                raise SyncError(f"VPG {vpg}: the stream to the recovery VRA is not connected")
            time.sleep(0.05)
        auth = {"Authorization": f"Bearer {self.vpg_settings[vpg].get('target_token') or self.cfg.token}"}
        bs = DELTA_BLOCK
        out = {"vm": vm_uuid, "disk": disk, "blocks_compared": 0, "blocks_differing": 0,
               "blocks_sent": 0, "zero_blocks": 0, "bytes_sent": 0, "bytes_read": 0,
               "blocks_in_holes": 0, "seconds": 0.0, "seconds_streaming": 0.0,
               "seconds_hashing": 0.0, "seconds_waiting_recovery": 0.0}
        zero_hash = np.uint64(kernels.zero_block_hash(bs))
        t0 = time.monotonic()
        self._sync_begin(vpg)
        http = requests.Session()
        url = f"{recovery_url}/v1/recovery/vpgs/{vpg}/disks/{vm_uuid}/{disk}/hashes"

        def parse_json(h, off: int, n: int):
            """(hashes, hole) of a JSON answer (format 1 or 2: older recovery VRAs)."""
            if int(h.get("hash_version", kernels.HASH_VERSION)) != kernels.HASH_VERSION:
                raise SyncError(f"recovery VRA hashes are version {h['hash_version']}, "
                                f"this VRA's {kernels.HASH_VERSION}")
            hashes = np.frombuffer(base64.b64decode(h["hashes"]), dtype="<u8")
            if int(h.get("format", 1)) < 2:            # an older recovery VRA: every block hashed
                return hashes, np.zeros(len(hashes), dtype=bool)
            nb = -(-int(h["length"]) // bs)
            hole = np.zeros(nb, dtype=bool)
            for s, c in h["zero_runs"]:
                hole[int(s):int(s) + int(c)] = True
            if int(nb - hole.sum()) != len(hashes):
                raise SyncError(f"recovery VRA hashes at offset {off}: {len(hashes)} hashes for "
                                f"{int(nb - hole.sum())} blocks outside its zero runs")
            full = np.full(nb, zero_hash, dtype=np.uint64)
            full[~hole] = hashes
            return full, hole

        def frames(r, off: int, n: int):
            """(hashes, hole) per frame of a binary answer (format 3), as they arrive."""
            if r.headers.get("X-Tidemark-Hash-Version") != str(kernels.HASH_VERSION):
                raise SyncError(f"recovery VRA hashes are version {r.headers.get('X-Tidemark-Hash-Version')}, "
                                f"this VRA's {kernels.HASH_VERSION}")
            raw = r.raw

            def take(k: int) -> bytes:
                got = raw.read(k)
                while len(got) < k:
                    more = raw.read(k - len(got))
                    if not more:
                        raise SyncError(f"recovery VRA hashes at offset {off}: the answer ended early")
                    got += more
                return got
            left = -(-n // bs)
            while left:
                count, nruns = _FRAME.unpack(take(_FRAME.size))
                if count == _FRAME_ERROR:
                    raise SyncError(f"recovery VRA hashes: {take(nruns).decode(errors='replace')}")
                if not 0 < count <= left:
                    raise SyncError(f"recovery VRA hashes at offset {off}: a frame of {count} blocks, {left} left")
                hole = np.zeros(count, dtype=bool)
                if nruns:
                    runs = np.frombuffer(take(8 * nruns), dtype="<u4").reshape(nruns, 2).astype(np.int64)
                    if (runs[:, 0] + runs[:, 1] > count).any():
                        raise SyncError(f"recovery VRA hashes at offset {off}: a zero run past its frame")
                    for s, c in runs.tolist():
                        hole[s:s + c] = True
                full = np.full(count, zero_hash, dtype=np.uint64)
                full[~hole] = np.frombuffer(take(8 * int(count - hole.sum())), dtype="<u8")
                yield full, hole
                left -= count

        def remote(off: int, n: int):
            """(hashes, hole) pieces of the recovery side's answer for [off, off + n), in order:
            per frame as they arrive (binary, format 3), or the whole range (JSON, older VRAs)."""
            with http.get(url, params={"offset": off, "length": n, "block_size": bs, "zero_runs": 1,
                                       "format": 3}, headers=auth, timeout=600, stream=True) as r:
                if r.status_code >= 400:
                    raise SyncError(f"recovery VRA hashes: {r.text}")
                if r.headers.get("X-Tidemark-Hash-Format") == "3":
                    yield from frames(r, off, n)
                else:
                    yield parse_json(r.json(), off, n)

        def fetch():
            """The recovery side's hashes of the whole disk, cut into chunks, into ``fetched``:
            one streamed request per MAX_HASH_SPAN, so that the recovery VRA hashes its index
            while this side hashes the source (both processes busy at once)."""
            try:
                for span in range(0, cap, MAX_HASH_SPAN):
                    n = min(MAX_HASH_SPAN, cap - span)
                    ends = [min(o + DELTA_CHUNK, span + n) for o in range(span, span + n, DELTA_CHUNK)]
                    o, pend_h, pend_z, have = span, [], [], 0
                    for h, z in remote(span, n):
                        pend_h.append(h)
                        pend_z.append(z)
                        have += len(h)
                        while ends and (have >= -(-(ends[0] - o) // bs)):
                            k = -(-(ends[0] - o) // bs)
                            allh, allz = np.concatenate(pend_h), np.concatenate(pend_z)
                            if not hand((o, allh[:k], allz[:k])):
                                return
                            pend_h, pend_z, have = [allh[k:]], [allz[k:]], have - k
                            o = ends.pop(0)
                    if ends or have:
                        raise SyncError(f"recovery VRA hashes at offset {span}: "
                                        f"{'too few' if ends else 'too many'} blocks answered")
            except BaseException as exc:                  # noqa: B036 -- handed to the sync
                hand(exc)

        def hand(item) -> bool:
            """Put ``item`` into ``fetched`` unless the sync stopped meanwhile (False then)."""
            while not stop.is_set():
                try:
                    fetched.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        def next_fetched():
            while True:
                try:
                    return fetched.get(timeout=1.0)
                except queue.Empty:
                    if not fetcher.is_alive():
                        try:
                            return fetched.get_nowait()
                        except queue.Empty:
                            raise SyncError("the recovery side's hashes ended early") from None

        def stream_loop():
            """Send the differing runs to the host, one call with whatever is pending at a time."""
            nonlocal stream_error
            hs = requests.Session()
            try:
                while True:
                    item = todo.get()
                    runs = [] if item is None else list(item)
                    done = item is None
                    while not done:
                        try:
                            more = todo.get_nowait()
                        except queue.Empty:
                            break
                        if more is None:
                            done = True
                        else:
                            runs.extend(more)
                    if runs and stream_error is None and not failed.is_set():
                        t_stream = time.monotonic()
                        r = hs.post(f"{self.cfg.host_url}/vms/{vm_uuid}/disks/{disk}/sync-blocks",
                                    json={"block_size": bs, "runs": runs}, timeout=3600)
                        out["seconds_streaming"] += time.monotonic() - t_stream
                        if r.status_code >= 400:
                            raise SyncError(f"host sync-blocks: {r.text}")
                        sent = r.json()
                        out["blocks_sent"] += sent["blocks"]
                        out["zero_blocks"] += sent["zero_blocks"]
                        out["bytes_sent"] += sent["bytes"]
                        if sent.get("unsent"):
                            raise SyncError(f"the host could not stream {sent['unsent']} blocks "
                                            "(the VRA detached?); they are in its dirty bitmap")
                    if done:
                        return
            except BaseException as exc:                  # noqa: B036 -- handed to the sync
                stream_error = exc
                while True:                               # let the sync finish its puts
                    if todo.get() is None:
                        return
            finally:
                hs.close()

        # Both sides hash at once: the recovery side's hashes stream in (fetch) while this side
        # reads and hashes, and differing runs are streamed by the host (one call at a time, in
        # order) while the comparison goes on. Any timing of the three is correct
        # (docs/FORMAT.md, "Delta sync": the host re-reads each block under its lock).
        import queue
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor
        offs = list(range(0, cap, DELTA_CHUNK))
        stop = threading.Event()
        failed = threading.Event()                        # the sync gave up: send nothing more
        fetched: queue.Queue = queue.Queue(maxsize=AHEAD_CHUNKS)
        todo: queue.Queue = queue.Queue()
        stream_error = None
        fetcher = threading.Thread(target=fetch, name="delta-hashes", daemon=True)
        streamer = threading.Thread(target=stream_loop, name="delta-stream", daemon=True)
        fetcher.start()
        streamer.start()
        try:
            try:
                fd = os.open(path, os.O_RDONLY)
                # the source's chunks are hashed by HASH_THREADS threads, in order of offset,
                # up to HASH_THREADS chunks ahead of the comparison
                pool = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="delta-hash")
                hashing: deque = deque()
                ahead = iter(offs)

                def hash_next():
                    o = next(ahead, None)
                    if o is not None:               # mapped (read only if it cannot be)
                        hashing.append(pool.submit(file_hashes, fd, o, min(DELTA_CHUNK, cap - o), bs))
                try:
                    for _ in range(HASH_THREADS):
                        hash_next()
                    for off in offs:
                        t_hash = time.monotonic()
                        src, src_hole, nread = hashing.popleft().result()
                        hash_next()
                        t_wait = time.monotonic()
                        out["bytes_read"] += nread
                        got = next_fetched()
                        out["seconds_hashing"] += t_wait - t_hash
                        out["seconds_waiting_recovery"] += time.monotonic() - t_wait
                        if isinstance(got, BaseException):
                            raise got
                        if got[0] != off:
                            raise SyncError(f"recovery VRA hashes: chunk {got[0]} where {off} was due")
                        dst, dst_hole = got[1], got[2]
                        if len(dst) != len(src):
                            raise SyncError(f"the recovery side has {len(dst)} blocks at offset {off}, "
                                            f"the source {len(src)}: do the disk capacities match?")
                        diff = kernels.compare_hashes(src, dst)
                        out["blocks_compared"] += len(src)
                        out["blocks_differing"] += len(diff)
                        out["blocks_in_holes"] += int((src_hole & dst_hole).sum())
                        if stream_error is not None:
                            raise stream_error
                        if len(diff):
                            first = off // bs
                            todo.put([[first + s, c] for s, c in index_runs(diff)])
                finally:
                    pool.shutdown(wait=True, cancel_futures=True)
                    os.close(fd)
            except BaseException:
                failed.set()
                raise
            finally:
                todo.put(None)
                stop.set()
            streamer.join()
            if stream_error is not None:
                raise stream_error
        finally:
            stop.set()
            failed.set()
            todo.put(None)
            streamer.join(timeout=600)
            fetcher.join(timeout=60 if fetcher.is_alive() and not fetched.full() else 5)
            http.close()
            self._sync_end(vpg)
            out["seconds"] = round(time.monotonic() - t0, 3)
            for k in ("seconds_streaming", "seconds_hashing", "seconds_waiting_recovery"):
                out[k] = round(out[k], 3)
        log.info("delta sync of VPG %s VM %s disk %d: %s", vpg, vm_uuid, disk, out)
        return out

    def rpo(self, vpg: str) -> dict:
        """RPO = now minus the time of the newest recoverable checkpoint (None if there is none)."""
        import time
        cp = self.journal.latest_checkpoint(vpg)
        return {"rpo_s": None if cp is None else max(0.0, time.time() - cp.time),
                "latest_checkpoint": None if cp is None else cp.id}

    def maintain(self) -> list[dict]:
        """Promote history older than each VPG's window and enforce journal limits; new alerts."""
        alerts = []
        for vpg in self.journal.vpgs() if self.journal else []:
            self.journal.promote(vpg)
            alerts.extend(self.journal.enforce_limits(vpg))
        self.alerts = alerts
        return alerts

    def _maintain_loop(self):
        while not self._stop.wait(self.cfg.maintain_interval_s):
            try:
                self.maintain()
            except Exception as exc:   # reported in status; the next round tries again
                log.error("journal maintenance failed: %s", exc)
                self.alerts = [{"kind": "journal_maintenance_failed", "detail": str(exc)}]

    def start(self):
        if self.journal and self.cfg.maintain_interval_s > 0:
            threading.Thread(target=self._maintain_loop, name="journal-maintenance", daemon=True).start()
        if self.protected:
            saved = self.saved_vpgs()
            bw = saved.pop("_bandwidth", None)
            if bw:
                self.protected.throttle.set(bw.get("mbps"), bw.get("window"))
            for vpg, b in saved.items():
                self.protect(vpg, b)
            self.protected.start()
            if self.cfg.host_url:
                threading.Thread(target=self._sync_loop, name="bitmap-sync", daemon=True).start()
        if self.receiver:
            self.receiver.start()
        if self.image_io:
            self.image_io.start()

    def sync_dirty(self) -> int:
        """Bitmap sync of every protected VM on the host that has dirty blocks, through the ring.

        Only while the VM's stream is connected: a sync into a stream that cannot
        deliver would just fill the ring and fall back to the bitmap again.
        """
        import requests
        side = self.protected
        if side is None or side.client is None:
            return 0
        st = requests.get(self.cfg.host_url + "/status", timeout=10).json()
        sent = 0
        for vm in st["vms"]:
            vpg = next((v for v, cfg in side.vpgs.items() if vm["instance_uuid"] in cfg["vms"]), None)
            sender = side.senders.get(vpg) if vpg else None
            if sender is None or not sender.connected:
                continue
            if any(d["dirty_blocks"] for d in vm["disks"]):
                r = requests.post(f"{self.cfg.host_url}/vms/{vm['instance_uuid']}/sync", timeout=3600)
                if r.ok:
                    sent += r.json()["blocks"]
        self.syncs += 1 if sent else 0
        return sent

    def _sync_loop(self):
        while not self._stop.wait(1.0):
            try:
                self.sync_dirty()
            except Exception as exc:   # the host may be restarting; try again next round
                log.info("bitmap sync round failed: %s", exc)

    def stop(self):
        self._stop.set()
        for c in self.coordinators.values():
            c.stop()
        if self.protected:
            self.protected.stop()
        if self.receiver:
            self.receiver.stop()
        if self.image_io:
            self.image_io.stop()
        if self.images:
            self.images.close()
        if self.journal:
            self.journal.close()

    def status(self) -> dict:
        return {"name": self.cfg.name,
                "protected": self.protected.status() if self.protected else None,
                "recovery": {"address": list(self.receiver.address),
                             "vpgs": {v: self.rpo(v) for v in self.journal.vpgs()},
                             "journal_appends": self.journal.timings.snapshot(),
                             "alerts": self.alerts} if self.receiver else None,
                "coordinators": {v: {"taken": c.taken, "invalid": c.invalid, "last": c.last}
                                 for v, c in self.coordinators.items()},
                "delta_syncs": {v: {"running": r, "started": self._syncs_started.get(v, 0)}
                                for v, r in list(self._syncs_running.items())}}


def serve(cfg: VRAConfig, stop: threading.Event) -> int:
    from .api import create_app
    vra = VRA(cfg)
    server = make_server(cfg.listen_host, cfg.control_port, create_app(vra), threaded=True)
    vra.control_url = f"http://{cfg.listen_host}:{server.port}"
    vra.start()
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    if cfg.ready_file:
        tmp = Path(cfg.ready_file + ".tmp")
        tmp.write_text(json.dumps({"control_url": f"http://{cfg.listen_host}:{server.port}",
                                   "replication": list(vra.receiver.address) if vra.receiver else None,
                                   "pid": os.getpid()}))
        tmp.rename(cfg.ready_file)
    log.info("VRA %s serving control on port %d", cfg.name, server.port)
    stop.wait()
    server.shutdown()
    vra.stop()
    return 0


def main(props: dict, stop: threading.Event) -> int:
    """Entry point of the appliance guest agent: settings from OVF properties."""
    return serve(VRAConfig.load(props=props), stop)


def cli(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Tidemark VRA")
    ap.add_argument("--config", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s vra %(levelname)s %(name)s %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    cfg = VRAConfig.load(args.config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return serve(cfg, stop)


if __name__ == "__main__":
    # Run the package's module, not this file as __main__: the API module imports it by name.
    from appliance.vra.service import cli as _cli
    sys.exit(_cli())
