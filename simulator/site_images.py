"""The site controller's side of image-backed disks (``imagedisk.py``): inventory entries and tokens.

A disk entry of such a VM in the inventory is ``{index, capacity_bytes, path: null, datastore,
image: {url, image, vm, disk}}``: the VRA's token is kept out of the inventory (which the API
serves) in ``<site>/image-tokens.json`` (0600), one token per VRA URL, and joined back only
into the configuration sent to the host that runs the VM.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .imagedisk import ImageClient, ImageDiskError, ImageSpec, sha256_image

PROBE_RETRY_S = 5.0      # creating a VM on an image waits this long for its VRA to answer


class ImageTokens:
    """VRA URL -> bearer token, in a 0600 file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._tokens: dict[str, str] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, url: str) -> str:
        return self._tokens.get(url, "")

    def set(self, url: str, token: str) -> None:
        if self._tokens.get(url) == token:
            return
        self._tokens[url] = token
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self._tokens, f)
        tmp.rename(self.path)


def disk_entries(disks, datastore: dict, tokens: ImageTokens) -> list[dict]:
    """Inventory disk entries from ``[{capacity?, image?: {url, token, image, vm, disk}}]``.

    Image disks are checked with their VRA (the image and disk exist; the capacity, if given,
    matches); plain disks need a capacity and get their path when the VM has a name.
    Raises ValueError (bad input) or LookupError (the VRA does not know the image).
    """
    if not isinstance(disks, list) or not disks:
        raise ValueError("disks must be a non-empty list of {capacity?, image?}")
    out = []
    for i, d in enumerate(disks):
        if not isinstance(d, dict):
            raise ValueError(f"disk {i} must be an object {{capacity?, image?}}")
        cap = d.get("capacity", d.get("capacity_bytes"))
        cap = None if cap is None else int(cap)
        entry = {"index": i, "path": None, "datastore": datastore["name"]}
        if d.get("image") is not None:
            spec = ImageSpec.from_dict(d["image"])
            client = ImageClient(spec, retry_s=PROBE_RETRY_S)
            try:
                have = client.info()["capacity"]
            except ImageDiskError as exc:
                raise LookupError(f"disk {i}: {exc}") from exc
            finally:
                client.close()
            if cap is not None and cap != have:
                raise ValueError(f"disk {i}: capacity {cap} but the image's disk has {have} bytes")
            cap = have
            entry["image"] = spec.public()
            tokens.set(spec.url, spec.token)
        elif cap is None:
            raise ValueError(f"disk {i} needs a capacity (bytes) or an image")
        if cap <= 0 or cap % 4096:
            raise ValueError(f"disk {i}: capacity must be a positive multiple of 4 KiB")
        entry["capacity_bytes"] = cap
        out.append(entry)
    return out


def with_tokens(disks: list[dict], tokens: ImageTokens) -> list[dict]:
    """The disk entries as the host needs them: image specs with their token."""
    return [{**d, "image": {**d["image"], "token": tokens.get(d["image"]["url"])}} if d.get("image") else d
            for d in disks]


def sha256(disk: dict, tokens: ImageTokens) -> str:
    """SHA-256 of a powered-off VM's image disk, read from its VRA."""
    spec = ImageSpec.from_dict({**disk["image"], "token": tokens.get(disk["image"]["url"])})
    return sha256_image(spec, disk["capacity_bytes"])
