"""Shared fixtures of the ZVM tests: a small simulator lab and real ZVM processes for its sites.

    def test_x(zvms):                    # site name -> a started ZVMProcess (module scope)
        a, b = zvms["site-a"], zvms["site-b"]

``zvm_lab`` is the lab (module scope; by default 2 sites of 2 hosts, site-a with 2 VMs of 16 MiB,
no workload; a test module may set ``LAB = {"sites": 3, "hosts": 1}`` to change that), and
``zvms`` a started ZVM for each of its sites (or those a module names in ``ZVM_SITES``).
``start_zvm(name, **settings)`` starts one more ZVM for a lab site (stopped at the end of the
module). Tests leave the ZVMs unpaired and without VRAs when they end.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from simulator.lab import Lab  # noqa: E402
from zvmproc import ZVMProcess  # noqa: E402


def lab_site(lab: Lab, name: str) -> dict:
    return next(s for s in lab.status()["sites"] if s["name"] == name)


@pytest.fixture(scope="module")
def zvm_lab(request, tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("zvm") / "lab")
    shape = {"sites": 2, "hosts": 2, "vms": 2, **getattr(request.module, "LAB", {})}
    try:
        lab.up(disk_mib=16, workload=False, **shape)
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def start_zvm(zvm_lab, tmp_path_factory):
    started: list[ZVMProcess] = []
    base = tmp_path_factory.mktemp("zvms")

    def start(site: str, key: str | None = None, **settings) -> ZVMProcess:
        url = lab_site(zvm_lab, site)["simulator_url"]
        settings.setdefault("inventory_interval_s", 1.0)
        settings.setdefault("peer_check_interval_s", 1.0)
        settings.setdefault("vra_check_interval_s", 1.0)
        z = ZVMProcess(base / (key or site), site,
                       hypervisor={"kind": "simulator", "url": url}, **settings)
        started.append(z)
        return z.start()

    yield start
    for z in started:
        z.stop()


@pytest.fixture(scope="module")
def zvms(request, zvm_lab, start_zvm):
    names = getattr(request.module, "ZVM_SITES", None) or \
        [s["name"] for s in zvm_lab.status()["sites"]][:2]
    return {name: start_zvm(name) for name in names}
