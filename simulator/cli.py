"""`tidemark lab ...`: start, inspect, disturb and stop the simulated lab."""
from __future__ import annotations

import json
import sys

import click

from .lab import Lab, LabError

dir_option = click.option("--dir", "directory", default=".lab", show_default=True,
                          type=click.Path(file_okay=False), help="lab folder (pid files, logs, disks)")


json_option = click.option("--json", "as_json", is_flag=True,
                           help="print the simulator's whole JSON answer instead of a summary")


def _fail(exc: Exception):
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


def _summary(st: dict):
    for s in st["sites"]:
        click.echo(f"{s['name']} ({s['kind']}, {s['state']})  simulator {s['simulator_url']}"
                   + (f"  vcenter {s['vcenter_url']}" if s["vcenter_url"] else "")
                   + (f"  zvm {s['zvm_url']}" if s.get("zvm_url") else ""))
        for h in s["hosts"]:
            vms = [v for v in s["vms"] if v["host"] == h["name"]]
            click.echo(f"  host {h['name']:<14} {h['state']:<12} pid {h['pid']}")
            for v in vms:
                disks = ", ".join(f"{d['capacity_bytes'] >> 20} MiB" for d in v["disks"])
                wl = v["workload"]
                if v["power_state"] != "poweredOn" and wl in ("running", "paused"):
                    wl += " at power-on"
                click.echo(f"    vm {v['name']:<14} {v['power_state']:<11} workload {wl:<8} "
                           f"disks {disks}")


@click.group()
def lab():
    """The simulated two-site lab (hosts, VMs with real disks, vCenter simulators)."""


@lab.command()
@dir_option
@click.option("--sites", default=2, show_default=True)
@click.option("--hosts", default=2, show_default=True, help="hosts per site")
@click.option("--vms", default=4, show_default=True, help="VMs on the first site")
@click.option("--disk-mib", default=256, show_default=True, help="size of each VM disk")
@click.option("--vcenter", type=click.Choice(["sim", "vcsim"]), default="sim", show_default=True,
              help="vcsim: serve each vSphere-style site through govmomi's vCenter simulator")
@click.option("--hyperv-site", is_flag=True, help="make the last site Hyper-V style (SCVMM)")
@click.option("--zvm/--no-zvm", default=True, show_default=True,
              help="a ZVM per site, VRAs on every host, the sites paired")
@click.option("--protect/--no-protect", default=True, show_default=True,
              help="with --zvm: a VPG protecting the first site's VMs to the second")
@click.option("--json", "as_json", is_flag=True)
def up(directory, sites, hosts, vms, disk_mib, vcenter, hyperv_site, zvm, protect, as_json):
    """Start the lab in the background and wait until it is ready."""
    try:
        st = Lab(directory).up(sites=sites, hosts=hosts, vms=vms, disk_mib=disk_mib,
                               vcenter=vcenter, hyperv_site=hyperv_site, zvm=zvm, protect=protect)
    except LabError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(st, indent=1))
        return
    click.echo(f"Tidemark lab running in {st['dir']}")
    _summary(st)
    if st.get("zvm"):
        click.echo(f"ZVM user {st['zvm']['admin_user']}, password and API client in "
                   f"{st['dir']}/zvm/credentials.json (tidemark lab status --json shows them)")
        click.echo(f"Try: tidemark vpgs list --lab {st['dir']}")
    click.echo("Next: tidemark lab status | tidemark lab vmotion VM HOST | tidemark lab down")


@lab.command()
@dir_option
@click.option("--json", "as_json", is_flag=True)
def status(directory, as_json):
    """Show sites, hosts and VMs."""
    try:
        st = Lab(directory).status()
    except LabError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(st, indent=1))
    else:
        click.echo(f"lab {st['dir']}: {'running' if st['running'] else 'stopped'}")
        _summary(st)


@lab.command()
@dir_option
def down(directory):
    """Stop every process the lab started (and nothing else)."""
    stopped = Lab(directory).down()
    click.echo(f"lab stopped ({len(set(stopped))} processes)")


def _op(fn, as_json: bool = False, summary=None):
    """Run a lab operation; print a one-line summary of its answer, or the whole JSON."""
    try:
        out = fn()
        if as_json or summary is None:
            click.echo(json.dumps(out, indent=1))
        else:
            click.echo(summary(out))
    except LabError as exc:
        _fail(exc)


def _vms_on(lab: Lab, host: str) -> str:
    names = [v["name"] for s in lab.status()["sites"] for v in s["vms"] if v["host"] == host]
    return ", ".join(names) or "none"


def _spec_text(spec: dict) -> str:
    """A workload spec in a few words: '20 MB/s random, 4/64 KiB, seed 1'."""
    rate = f"{spec['mbps']:g} MB/s" if spec.get("mbps") else "as fast as it can"
    if spec.get("iops"):
        rate += f" (at most {spec['iops']:g} IOPS)"
    sizes = "/".join(f"{b >> 10}" for b in spec.get("block_sizes", [])) + " KiB"
    return f"{rate} {spec.get('pattern', 'random')}, {sizes}, seed {spec.get('seed')}"


@lab.command()
@dir_option
@click.argument("vm")
@click.argument("host")
@json_option
def vmotion(directory, vm, host, as_json):
    """Move a VM to another host of its site, under load if it runs one."""
    _op(lambda: Lab(directory).vmotion(vm, host), as_json,
        lambda v: f"{v['name']} is on {v['host']} ({v['power_state']}"
                  f"{', workload ' + v['workload']['state'] if v.get('workload') else ''})")


@lab.command("fail-host")
@dir_option
@click.argument("host")
@json_option
def fail_host(directory, host, as_json):
    """Kill a host's process: its VMs stop."""
    lab_ = Lab(directory)
    _op(lambda: lab_.fail_host(host), as_json,
        lambda h: f"host {h['name']} {h['state']}; its VMs are off: {_vms_on(lab_, h['name'])}")


@lab.command("restore-host")
@dir_option
@click.argument("host")
@json_option
def restore_host(directory, host, as_json):
    """Restart a failed host and the VMs that ran on it."""
    lab_ = Lab(directory)
    _op(lambda: lab_.restore_host(host), as_json,
        lambda h: f"host {h['name']} {h['state']} (pid {h['pid']}); VMs on it: "
                  f"{_vms_on(lab_, h['name'])}")


def _site_text(st: dict) -> str:
    hosts = ", ".join(f"{h['name']} {h['state']}" for h in st["hosts"])
    links = ", ".join(f"to {p} {'cut' if link['cut'] else 'up'}" for p, link in st["links"].items())
    return f"site {st['name']} {st['state']}: hosts {hosts}; links {links or 'none'}"


@lab.command("fail-site")
@dir_option
@click.argument("site")
@json_option
def fail_site(directory, site, as_json):
    """Fail every host of a site, its vCenter and its links."""
    _op(lambda: Lab(directory).fail_site(site), as_json, _site_text)


@lab.command("restore-site")
@dir_option
@click.argument("site")
@json_option
def restore_site(directory, site, as_json):
    """Bring a failed site back."""
    _op(lambda: Lab(directory).restore_site(site), as_json, _site_text)


@lab.command()
@dir_option
@click.argument("vm")
@click.option("--mbps", type=float, help="MB/s to write (0: as fast as possible)")
@click.option("--iops", type=float, help="writes per second cap")
@click.option("--pattern", type=click.Choice(["random", "sequential", "hotspot"]))
@click.option("--block-sizes", help="comma-separated sizes in KiB, e.g. 4,64,1024")
@click.option("--seed", type=int)
@click.option("--defaults", is_flag=True,
              help="start from the default settings, not from the VM's current ones")
@click.option("--pause", "action", flag_value="pause", help="pause the workload")
@click.option("--resume", "action", flag_value="resume", help="resume a paused workload")
@click.option("--stop", "action", flag_value="stop", help="stop the workload")
@json_option
def workload(directory, vm, mbps, iops, pattern, block_sizes, seed, defaults, action, as_json):
    """Start or change (with settings), pause, resume or stop a VM's guest workload.

    Settings not given keep the VM's current ones (or its last workload's), unless
    --defaults: so `--mbps 20` changes only the rate, and the seed stays.
    """
    lab_ = Lab(directory)

    def summary(w):
        text = f"{vm} workload {w['state']}"
        if w.get("spec") and w["state"] != "stopped":
            text += ": " + _spec_text(w["spec"])
        if w.get("error"):
            text += f" (error: {w['error']})"
        return text

    if action:
        _op(lambda: lab_.workload(vm, {"action": action}), as_json, summary)
        return
    try:
        given = {"mbps": mbps, "iops": iops, "pattern": pattern, "seed": seed,
                 "block_sizes": [int(x) * 1024 for x in block_sizes.split(",")] if block_sizes
                 else None}
    except ValueError:
        _fail(click.BadParameter(f"--block-sizes {block_sizes!r}: give sizes in KiB, e.g. 4,64"))

    def start():
        current = {} if defaults else (lab_.vm(vm).get("workload") or {}).get("spec") or {}
        spec = {**current, **{k: v for k, v in given.items() if v is not None}}
        return lab_.workload(vm, {"action": "start", "spec": spec})
    _op(start, as_json, summary)


@lab.command()
@dir_option
@click.argument("site_a")
@click.argument("site_b")
@click.option("--cut", "action", flag_value="cut")
@click.option("--restore", "action", flag_value="restore")
@click.option("--bandwidth-mbps", type=float,
              help="limit each direction to this many MB/s (0 or left out: no limit)")
@click.option("--latency-ms", type=float, help="add this one-way latency (0 or left out: none)")
@json_option
def link(directory, site_a, site_b, action, bandwidth_mbps, latency_ms, as_json):
    """Cut, restore or shape the WAN link between two sites.

    Shaping sets both settings at once: `lab link A B` alone clears them.
    """
    def summary(links):
        st = links[0]
        shaping = []
        if st["bandwidth_mbps"]:
            shaping.append(f"{st['bandwidth_mbps']:g} MB/s each way")
        if st["latency_ms"]:
            shaping.append(f"{st['latency_ms']:g} ms latency each way")
        state = "cut" if st["cut"] else "up, " + (", ".join(shaping) or "not shaped")
        return f"link {site_a} <-> {site_b}: {state}"

    lab_ = Lab(directory)
    if action:
        _op(lambda: lab_.link(site_a, site_b, action), as_json, summary)
    else:
        _op(lambda: lab_.link(site_a, site_b, "shape", bandwidth_mbps=bandwidth_mbps or None,
                              latency_ms=latency_ms or None), as_json, summary)
