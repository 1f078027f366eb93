"""The VRA's control API (docs/vra.md): thin Flask views over the ``VRA`` service object."""
from __future__ import annotations

import hashlib
import os
import queue
import struct
import time

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from appliance.dss.errors import DSSError as _DSSError

from .service import DELTA_BLOCK, MAX_HASH_SPAN, VRA, SyncError

class APIError(Exception):
    status = 400


def create_app(vra: VRA) -> Flask:
    import requests
    app = Flask(f"vra-{vra.cfg.name}")

    def problem(status, title, detail):
        return jsonify({"title": title, "detail": detail, "status": status}), status

    @app.before_request
    def _auth():
        if request.headers.get("Authorization", "") != f"Bearer {vra.cfg.token}":
            return problem(401, "Unauthorized", "send Authorization: Bearer <the VRA's token>")

    @app.errorhandler(APIError)
    def _api(exc):
        return problem(exc.status, "BadRequest" if exc.status == 400 else "Conflict", str(exc))

    @app.errorhandler(_DSSError)
    def _dss(exc):
        from appliance.dss.errors import JournalCorrupt, UnknownDisk, UnknownVPG
        if isinstance(exc, JournalCorrupt):   # reported loudly, never served as data
            return problem(500, "Journal corrupt", str(exc))
        if isinstance(exc, (UnknownVPG, UnknownDisk)):
            return problem(404, "Not found", str(exc))
        return problem(409, "Conflict", str(exc))

    @app.errorhandler(HTTPException)
    def _http(exc):
        return problem(exc.code, exc.name, exc.description)

    def body() -> dict:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise APIError("the request body must be a JSON object")
        return data

    def need(side, what):
        if side is None:
            e = APIError(f"this VRA has no {what} side configured")
            e.status = 409
            raise e
        return side

    def host(method, path, **kw):
        r = requests.request(method, vra.cfg.host_url + path, timeout=10, **kw)
        if r.status_code >= 400:
            e = APIError(f"host: {r.text}")
            e.status = 409
            raise e
        return r.json()

    host_sessions: queue.SimpleQueue = queue.SimpleQueue()   # keep-alive sessions to the host

    def barrier_host(path, json_body):
        """A barrier step on the host over a pooled keep-alive connection (no TCP set-up
        while guests are held); like ``host`` otherwise."""
        try:
            s = host_sessions.get_nowait()
        except queue.Empty:
            s = requests.Session()
        try:
            r = s.post(vra.cfg.host_url + path, json=json_body, timeout=10)
        except BaseException:
            s.close()
            raise
        host_sessions.put(s)
        if r.status_code >= 400:
            e = APIError(f"host: {r.text}")
            e.status = 409
            raise e
        return r.json()

    @app.get("/v1/status")
    def status():
        return jsonify(vra.status())

    @app.put("/v1/protected/vpgs/<vpg>")
    def protect(vpg):
        side = need(vra.protected, "protected")
        b = body()
        try:
            vra.protect(vpg, b)
        except (KeyError, ValueError, TypeError) as exc:
            raise APIError(f"protect takes vms, target_host, target_port: {exc}") from exc
        return jsonify(side.status())

    @app.put("/v1/protected/bandwidth")
    def bandwidth():
        side = need(vra.protected, "protected")
        b = body()
        try:
            mbps = None if b.get("mbps") is None else float(b["mbps"])
            side.throttle.set(mbps, b.get("window"))
        except (ValueError, TypeError) as exc:
            raise APIError(str(exc)) from exc
        vra.save_vpg("_bandwidth", {"mbps": mbps, "window": b.get("window")})
        return jsonify(side.throttle.status())

    @app.delete("/v1/protected/vpgs/<vpg>")
    def unprotect(vpg):
        need(vra.protected, "protected").unprotect(vpg)
        vra.save_vpg(vpg, None)
        c = vra.coordinators.pop(vpg, None)
        if c:
            c.stop()
        return "", 204

    @app.post("/v1/protected/vpgs/<vpg>/barrier")
    def barrier(vpg):
        side = need(vra.protected, "protected")
        b = body()
        cfg = side.vpgs.get(vpg)
        if cfg is None:
            raise APIError(f"VPG {vpg} is not protected here")
        k = int(b["checkpoint"])
        before = vra.sync_state(vpg)
        t0 = time.perf_counter()
        out = barrier_host("/barrier", {
            "id": f"{vpg}:{k}", "vms": cfg["vms"], "hold_ms": int(b.get("hold_ms", 50)),
            "hashes": bool(b.get("hashes")),
            "info": {"vpg": vpg, "checkpoint": k, "participants": b.get("participants", [])}})
        out["host_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        after = vra.sync_state(vpg)
        if before[0] or after[0] or before[1] != after[1]:
            # a delta sync ran at some point around the marker: the cut is not consistent
            out.setdefault("dirty", {})["delta-sync"] = max(1, before[0], after[0])
        return jsonify(out)

    @app.post("/v1/protected/vpgs/<vpg>/sync")
    def delta_sync(vpg):
        need(vra.protected, "protected")
        b = body()
        try:
            if b.get("all"):
                return jsonify(vra.delta_sync_all(vpg))
            return jsonify(vra.delta_sync(vpg, str(b["vm"]), int(b.get("disk", 0))))
        except KeyError as exc:
            e = APIError(f"delta sync: {exc}")
            e.status = 404
            raise e from exc
        except (ValueError, TypeError) as exc:
            raise APIError(f"delta sync takes vm and disk, or all: {exc}") from exc
        except (SyncError, requests.RequestException) as exc:
            e = APIError(str(exc))
            e.status = 409
            raise e from exc

    @app.post("/v1/protected/vpgs/<vpg>/barrier/<int:k>/release")
    def release(vpg, k):
        need(vra.protected, "protected")
        t0 = time.perf_counter()
        out = barrier_host(f"/barrier/{vpg}:{k}/release", {})
        out["host_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        return jsonify(out)

    @app.post("/v1/protected/vpgs/<vpg>/checkpoints")
    def take_checkpoint(vpg):
        c = vra.coordinators.get(vpg)
        if c is None:
            raise APIError(f"this VRA does not lead VPG {vpg}'s checkpoints")
        b = request.get_json(silent=True) or {}
        return jsonify(c.checkpoint(b.get("tag"), bool(b.get("hashes")), b.get("hold_ms")))

    @app.put("/v1/recovery/vpgs/<vpg>")
    def recover_vpg(vpg):
        from appliance.dss import JournalSettings
        j = need(vra.journal, "recovery")
        b = body()
        try:
            settings = JournalSettings(replica_dir=str(b["replica_dir"]),
                                       history_s=float(b.get("history_s", 4 * 3600)),
                                       hard_limit_bytes=int(b.get("hard_limit_bytes", 0)),
                                       warn_bytes=int(b.get("warn_bytes", 0)))
            j.create_vpg(vpg, settings)
            for d in b.get("disks", []):
                if d.get("preseed"):        # the replica IS an existing file (reverse protection)
                    from .preseed import link_replica
                    link_replica(settings.replica_dir, str(d["vm"]), int(d["disk"]),
                                 int(d["capacity"]), str(d["preseed"]))
                j.register_disk(vpg, str(d["vm"]), int(d["disk"]), int(d["capacity"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise APIError(f"recovery VPG settings: {exc}") from exc
        return jsonify({"vpg": vpg, "address": list(vra.receiver.address)})

    @app.delete("/v1/recovery/vpgs/<vpg>")
    def drop_vpg(vpg):
        """Delete a VPG's journal; its replica disks too unless ``?keep_replicas=1``. Idempotent."""
        j = need(vra.journal, "recovery")
        keep = request.args.get("keep_replicas", "0").lower() in ("1", "true")
        if vpg in j.vpgs():
            busy = [i["image"] for i in (vra.images.list() if vra.images else [])
                    if i["vpg"] == vpg and i["state"] in ("open", "committing")]
            if busy:
                e = APIError(f"VPG {vpg} has open recovery images {', '.join(busy)}: "
                             "discard or commit them first")
                e.status = 409
                raise e
            vra.receiver.targets.pop(vpg, None)
            j.delete_vpg(vpg, keep)
        return "", 204

    @app.get("/v1/recovery/vpgs/<vpg>/checkpoints")
    def checkpoints(vpg):
        j = need(vra.journal, "recovery")
        return jsonify([{"id": c.id, "pos": str(c.pos), "time": c.time, "tag": c.tag}
                        for c in j.checkpoints(vpg)])

    @app.post("/v1/recovery/vpgs/<vpg>/barriers/<int:k>/abort")
    def abort_barrier(vpg, k):
        need(vra.journal, "recovery")
        try:
            vra.receiver.target(vpg).abort(k)
        except KeyError as exc:
            raise APIError(str(exc)) from exc
        return jsonify({"aborted": k})

    @app.post("/v1/recovery/maintain")
    def maintain():
        need(vra.journal, "recovery")
        return jsonify({"alerts": vra.maintain()})

    @app.get("/v1/recovery/vpgs/<vpg>/usage")
    def usage(vpg):
        return jsonify(need(vra.journal, "recovery").usage(vpg))

    @app.get("/v1/recovery/vpgs/<vpg>/disks/<vm>/<int:disk>/hashes")
    def block_hashes(vpg, vm, disk):
        """Per-block hashes (XXH64, kernels.block_hashes) of a replica disk range at the durable
        position: what a protected VRA's delta sync compares its source against.

        With ``zero_runs=1`` (hashes format 2) blocks known to be zero without reading them --
        replica holes where no journal entry touches the span -- are answered as runs
        ``[[first, count], ...]`` (block numbers from ``offset``) and left out of ``hashes``.
        Without it, format 1: a hash for every block (holes hashed as zero blocks). With
        ``format=3`` and 4 KiB blocks, a binary answer streamed as it is computed, one frame per
        16 MiB step (``_hashes_frame``; docs/FORMAT.md, "Delta sync")."""
        import numpy as np

        from appliance import kernels
        from appliance.dss import DSSError, NotRecoverable, Pos
        from appliance.extents import block_runs, mask_runs
        j = need(vra.journal, "recovery")
        try:
            offset = int(request.args.get("offset", 0))
            length = int(request.args["length"])
            bs = int(request.args.get("block_size", DELTA_BLOCK))
            runs_ok = request.args.get("zero_runs", "0") not in ("", "0", "false")
            binary = request.args.get("format", "") == "3"
            if bs <= 0 or bs % 8 or offset < 0 or offset % bs or length < 0:
                raise ValueError("block_size must be a positive multiple of 8, offset a multiple of it")
            if length > MAX_HASH_SPAN:
                raise ValueError(f"at most {MAX_HASH_SPAN} bytes per request")
            cap = next((c for v, d, c in j.disks(vpg) if v == vm and d == disk), None)
        except (KeyError, ValueError, TypeError, DSSError) as exc:
            raise APIError(f"hashes take offset, length and block_size: {exc}") from exc
        if cap is None:
            e = APIError(f"VM {vm} disk {disk} is not registered in VPG {vpg}")
            e.status = 404
            raise e
        length = max(0, min(length, cap - offset))
        step = max(bs, (16 << 20) // bs * bs)
        zero_hash = np.uint64(kernels.zero_block_hash(bs))
        if bs == 4096 and binary:
            # streamed: each 16 MiB step goes out as soon as it is hashed (the caller compares
            # while the rest is computed), each at the durable position of its own step
            def step_hashes(o):
                try:
                    return j.image_hashes(vpg, vm, disk, o, min(step, offset + length - o))
                except (ValueError, DSSError) as exc:
                    raise APIError(f"hashes of VM {vm} disk {disk}: {exc}") from exc
            first = step_hashes(offset) if length else (j.durable_pos(vpg) or Pos(0, 0), None, None)

            def frames():
                o, got = offset, first
                while o < offset + length:
                    if got is None:
                        try:
                            got = step_hashes(o)
                        except APIError as exc:        # the status is sent: an error frame
                            yield _hashes_error_frame(str(exc))
                            return
                    yield _hashes_frame(got[1], got[2])
                    o, got = o + step, None
            headers = {"X-Tidemark-Hash-Format": "3", "X-Tidemark-Hash-Version": str(kernels.HASH_VERSION),
                       "X-Tidemark-Pos": str(first[0]), "X-Tidemark-Offset": str(offset),
                       "X-Tidemark-Length": str(length), "X-Tidemark-Block-Size": str(bs)}
            return app.response_class(frames(), mimetype="application/x-tidemark-hashes", headers=headers)
        if bs == 4096:
            # the journal's own block size: whole blocks hashed at append answer from the index
            # (appliance/dss/hashes.py), the rest from replica pages or the reader
            pos, parts, holes = None, [], []
            try:
                for o in range(offset, offset + length, step):
                    p_, h, hole = j.image_hashes(vpg, vm, disk, o, min(step, offset + length - o))
                    pos = pos or p_
                    parts.append(h)
                    holes.append(hole)
            except (ValueError, DSSError) as exc:
                raise APIError(f"hashes of VM {vm} disk {disk}: {exc}") from exc
            pos = pos or j.durable_pos(vpg) or Pos(0, 0)
            hashes = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
            hole = np.concatenate(holes) if holes else np.zeros(0, dtype=bool)
            zero_runs = None
            if runs_ok:
                zero_runs = [[s_, c_] for s_, c_ in mask_runs(hole)]
                hashes = hashes[~hole]
            return jsonify(_hashes_answer(pos, offset, length, bs, hashes, zero_runs))
        for _ in range(5):
            pos = j.durable_pos(vpg) or Pos(0, 0)
            parts, zero_runs = [], []
            try:
                for o in range(offset, offset + length, step):
                    n = min(step, offset + length - o)
                    # where no journal entry touches the span the replica is the image: hash
                    # the file's pages in place (per block, that is the image at a durable
                    # position, which is all delta sync needs; docs/FORMAT.md "Delta sync"),
                    # and only its data extents: a hole is zeros without a read
                    with j.replica_range(vpg, vm, disk, o, n) as (_p, view):
                        if view is not None:
                            ext = j.replica_extents(vpg, vm, disk, o, n)
                            if ext is None:
                                parts.append(kernels.block_hashes(view, bs))
                                continue
                            nb = -(-n // bs)
                            first = (o - offset) // bs
                            done = 0                      # blocks of this span answered so far
                            for s, c in block_runs(ext, o, n, bs):
                                if s > done:
                                    if runs_ok:
                                        zero_runs.append([first + done, s - done])
                                    else:
                                        parts.append(np.full(s - done, zero_hash, dtype=np.uint64))
                                parts.append(kernels.block_hashes(view[s * bs:min(n, (s + c) * bs)], bs))
                                done = s + c
                            if nb > done:
                                if runs_ok:
                                    zero_runs.append([first + done, nb - done])
                                else:
                                    parts.append(np.full(nb - done, zero_hash, dtype=np.uint64))
                            continue
                    parts.append(kernels.block_hashes(j.read(vpg, vm, disk, o, n, pos), bs))
            except NotRecoverable:      # promoted past it meanwhile: again at the new position
                continue
            break
        else:
            raise APIError("the journal kept moving past the hashed position")
        hashes = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
        merged = None
        if runs_ok:
            merged = []
            for s, c in zero_runs:                 # spans meet at 16 MiB: join their runs
                if merged and merged[-1][0] + merged[-1][1] == s:
                    merged[-1][1] += c
                else:
                    merged.append([s, c])
        return jsonify(_hashes_answer(pos, offset, length, bs, hashes, merged))

    @app.get("/v1/recovery/vpgs/<vpg>/disks/<vm>/<int:disk>/hash")
    def image_hash(vpg, vm, disk):
        j = need(vra.journal, "recovery")
        k = int(request.args["checkpoint"])
        cp = next((c for c in j.checkpoints(vpg) if c.id == k), None)
        if cp is None:
            raise APIError(f"checkpoint {k} is not recoverable")
        cap = next(c for v, d, c in j.disks(vpg) if v == vm and d == disk)
        h = hashlib.sha256()
        step = 4 << 20
        for off in range(0, cap, step):
            h.update(j.read(vpg, vm, disk, off, min(step, cap - off), cp))
        return jsonify({"sha256": h.hexdigest(), "checkpoint": k})

    # -- recovery images (appliance/vra/images.py) ------------------------------------------
    from appliance.dss import DSSError

    from .images import ImageError

    @app.errorhandler(ImageError)
    def _image_error(exc):
        title = {404: "NotFound", 409: "Conflict"}.get(exc.status, "BadRequest")
        return problem(exc.status, title, str(exc))

    def images():
        need(vra.journal, "recovery")
        return vra.images

    def dss(fn, *args, **kw):
        """A DSS refusal (unknown VPG or disk, busy, no longer recoverable) as a 4xx problem."""
        try:
            return fn(*args, **kw)
        except DSSError as exc:
            e = ImageError(str(exc))
            e.status = exc.http_status if exc.http_status < 500 else 409
            raise e from exc

    def io_range() -> tuple[int, int | None]:
        try:
            offset = int(request.args["offset"])
            length = int(request.args["length"]) if "length" in request.args else None
        except (KeyError, ValueError) as exc:
            raise APIError(f"image IO takes offset (and length for reads) as integers: {exc}") from exc
        return offset, length

    @app.post("/v1/recovery/vpgs/<vpg>/images")
    def open_images(vpg):
        b = body()
        try:
            k = int(b["checkpoint"])
            vms = None if b.get("vms") is None else [str(v) for v in b["vms"]]
            scratch = None if b.get("scratch_dir") is None else str(b["scratch_dir"])
        except (KeyError, ValueError, TypeError) as exc:
            raise APIError(f"images take checkpoint (an id), scratch_dir? and vms?: {exc}") from exc
        return jsonify(dss(images().open, vpg, k, scratch, vms)), 201

    @app.get("/v1/recovery/images")
    def list_images():
        return jsonify(images().list())

    @app.get("/v1/recovery/images/<sid>")
    def get_image(sid):
        return jsonify(images().get(sid))

    @app.delete("/v1/recovery/images/<sid>")
    def discard_image(sid):
        dss(images().discard, sid)
        return "", 204

    @app.post("/v1/recovery/images/<sid>/commit")
    def commit_image(sid):
        return jsonify(dss(images().commit, sid))

    @app.get("/v1/recovery/images/<sid>/disks/<vm>/<int:disk>")
    def read_image(sid, vm, disk):
        import xxhash
        offset, length = io_range()
        if length is None:
            raise APIError("reads take offset and length")
        data = dss(images().read, sid, vm, disk, offset, length)
        return data, 200, {"Content-Type": "application/octet-stream",
                           "X-Tidemark-XXH3": xxhash.xxh3_64_hexdigest(data)}

    @app.put("/v1/recovery/images/<sid>/disks/<vm>/<int:disk>")
    def write_image(sid, vm, disk):
        import xxhash
        from .images import MAX_IO
        offset, length = io_range()
        if (request.content_length or 0) > MAX_IO:
            raise APIError(f"at most {MAX_IO} bytes per write")
        data = request.get_data(cache=False)
        if length is not None and length != len(data):
            raise APIError(f"length {length} but {len(data)} bytes sent")
        want = request.headers.get("X-Tidemark-XXH3")
        if want is not None and want != xxhash.xxh3_64_hexdigest(data):
            raise APIError("the body does not match its X-Tidemark-XXH3 checksum: send it again")
        dss(images().write, sid, vm, disk, offset, data)
        return "", 204

    @app.post("/v1/recovery/images/<sid>/disks/<vm>/<int:disk>/copy")
    def copy_image_disk(sid, vm, disk):
        """Copy the disk (checkpoint content + writes) into an existing file, in the background."""
        path = body().get("path")
        if not isinstance(path, str) or not path:
            raise APIError("copy takes path: the existing file to write the disk into")
        return jsonify(dss(images().copy_to, sid, vm, disk, path)), 202

    @app.get("/v1/recovery/images/<sid>/disks/<vm>/<int:disk>/copy")
    def copy_image_disk_status(sid, vm, disk):
        return jsonify(images().copy_status(sid, vm, disk))

    @app.post("/v1/recovery/images/<sid>/disks/<vm>/<int:disk>/export")
    def export_image_disk(sid, vm, disk):
        from .export import export_disk
        path = body().get("path")
        if not isinstance(path, str) or not os.path.isabs(path):
            raise APIError("export takes path: an absolute file path")
        try:
            return jsonify(dss(export_disk, images(), sid, vm, disk, path))
        except KeyError as exc:
            e = ImageError(str(exc))
            e.status = 404
            raise e from exc

    @app.get("/v1/recovery/images/<sid>/disks/<vm>/<int:disk>/hash")
    def image_disk_hash(sid, vm, disk):
        return jsonify({"sha256": dss(images().sha256, sid, vm, disk)})

    @app.put("/v1/tls/trust")
    def put_tls_trust():
        """A new trust bundle (base64 of PEM) from the ZVM: kept in the TLS folder, used from
        the next start (appliance/vra/tls.py)."""
        from .tls import TLSConfigError, store_trust
        pem = body().get("pem")
        if not isinstance(pem, str) or not pem:
            raise APIError("the body is {pem: base64 of the PEM trust bundle}")
        try:
            return jsonify(store_trust(vra.cfg, pem))
        except TLSConfigError as exc:
            e = APIError(str(exc))
            e.status = exc.status
            raise e from None

    return app


def _hashes_answer(pos, offset: int, length: int, bs: int, hashes, zero_runs) -> dict:
    """The body of a hashes answer: format 1 (a hash per block), or with ``zero_runs`` (a list)
    format 2 (blocks known zero left out of ``hashes``, as ``[[first, count], ...]``)."""
    import base64

    from appliance import kernels
    out = {"pos": str(pos), "offset": offset, "length": length, "block_size": bs,
           "hash_version": kernels.HASH_VERSION,
           "hashes": base64.b64encode(hashes.astype("<u8").tobytes()).decode()}
    if zero_runs is not None:
        out.update(format=2, zero_runs=zero_runs)
    return out


_FRAME = struct.Struct("<II")
FRAME_ERROR = 0xFFFFFFFF


def _hashes_frame(hashes, hole) -> bytes:
    """One frame of a binary (format 3) hashes answer: ``<u32 blocks><u32 runs>``, ``runs`` zero
    runs ``<u32 first><u32 count>`` (block numbers from the frame's first block: blocks known
    zero without a read), then a little-endian u64 hash per block outside them, ascending."""
    import numpy as np

    from appliance.extents import mask_runs
    runs = mask_runs(hole)
    out = [_FRAME.pack(len(hashes), len(runs))]
    if runs:
        out.append(np.asarray(runs, dtype="<u4").tobytes())
        hashes = hashes[~hole]
    out.append(hashes.astype("<u8", copy=False).tobytes())
    return b"".join(out)


def _hashes_error_frame(message: str) -> bytes:
    """The frame that ends a binary hashes answer which failed after its status was sent:
    ``<u32 0xFFFFFFFF><u32 length>`` and the message in UTF-8."""
    raw = message.encode()
    return _FRAME.pack(FRAME_ERROR, len(raw)) + raw
