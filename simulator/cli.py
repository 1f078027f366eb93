"""`tidemark lab ...`: start, inspect, disturb and stop the simulated lab."""
from __future__ import annotations

import json
import sys

import click

from .lab import Lab, LabError

dir_option = click.option("--dir", "directory", default=".lab", show_default=True,
                          type=click.Path(file_okay=False), help="lab folder (pid files, logs, disks)")


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
                click.echo(f"    vm {v['name']:<14} {v['power_state']:<11} workload {v['workload']:<8} "
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


def _op(fn):
    try:
        out = fn()
    except LabError as exc:
        _fail(exc)
    click.echo(json.dumps(out, indent=1))


@lab.command()
@dir_option
@click.argument("vm")
@click.argument("host")
def vmotion(directory, vm, host):
    """Move a VM to another host of its site, under load if it runs one."""
    _op(lambda: Lab(directory).vmotion(vm, host))


@lab.command("fail-host")
@dir_option
@click.argument("host")
def fail_host(directory, host):
    """Kill a host's process: its VMs stop."""
    _op(lambda: Lab(directory).fail_host(host))


@lab.command("restore-host")
@dir_option
@click.argument("host")
def restore_host(directory, host):
    """Restart a failed host and the VMs that ran on it."""
    _op(lambda: Lab(directory).restore_host(host))


@lab.command("fail-site")
@dir_option
@click.argument("site")
def fail_site(directory, site):
    """Fail every host of a site, its vCenter and its links."""
    _op(lambda: Lab(directory).fail_site(site))


@lab.command("restore-site")
@dir_option
@click.argument("site")
def restore_site(directory, site):
    """Bring a failed site back."""
    _op(lambda: Lab(directory).restore_site(site))


@lab.command()
@dir_option
@click.argument("vm")
@click.option("--mbps", type=float, help="MB/s to write (0: as fast as possible)")
@click.option("--iops", type=float, help="writes per second cap")
@click.option("--pattern", type=click.Choice(["random", "sequential", "hotspot"]))
@click.option("--block-sizes", help="comma-separated sizes in KiB, e.g. 4,64,1024")
@click.option("--seed", type=int)
@click.option("--pause", "action", flag_value="pause", help="pause the workload")
@click.option("--resume", "action", flag_value="resume", help="resume a paused workload")
@click.option("--stop", "action", flag_value="stop", help="stop the workload")
def workload(directory, vm, mbps, iops, pattern, block_sizes, seed, action):
    """Start (with settings), pause, resume or stop a VM's guest workload."""
    if action:
        _op(lambda: Lab(directory).workload(vm, {"action": action}))
        return
    spec = {"mbps": mbps, "iops": iops, "pattern": pattern, "seed": seed,
            "block_sizes": [int(x) * 1024 for x in block_sizes.split(",")] if block_sizes else None}
    _op(lambda: Lab(directory).workload(vm, {"action": "start",
                                             "spec": {k: v for k, v in spec.items() if v is not None}}))


@lab.command()
@dir_option
@click.argument("site_a")
@click.argument("site_b")
@click.option("--cut", "action", flag_value="cut")
@click.option("--restore", "action", flag_value="restore")
@click.option("--bandwidth-mbps", type=float, help="limit each direction to this many MB/s")
@click.option("--latency-ms", type=float, help="add this one-way latency")
def link(directory, site_a, site_b, action, bandwidth_mbps, latency_ms):
    """Cut, restore or shape the WAN link between two sites."""
    if action:
        _op(lambda: Lab(directory).link(site_a, site_b, action))
    else:
        _op(lambda: Lab(directory).link(site_a, site_b, "shape", bandwidth_mbps=bandwidth_mbps,
                                        latency_ms=latency_ms))
