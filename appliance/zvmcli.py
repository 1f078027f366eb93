"""`tidemark` commands that speak to a ZVM: sites and pairing, inventory, VRAs, VPGs, every
recovery operation, tasks (with progress bars), alerts, events and reports.

Where to connect: ``--zvm URL`` with ``--client-id/--client-secret`` (or ``--user/--password``)
and ``--ca-cert FILE`` or ``--fingerprint SHA256``; or ``--lab DIR --site NAME`` to use the
connection file the lab writes (``<lab>/zvm/<site>/connection.json``). Every option has a
``TIDEMARK_*`` variable. ``--json`` prints the API's JSON instead of tables. Exit codes: 0 ok,
2 bad input, 3 auth, 4 not found, 5 conflict (wrong state), 6 unreachable, 1 other.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from appliance.zvm.client import ZVMClient, create_vpg, native_id, site_id
from appliance.zvm.errors import BadRequest, NotFound, ZVMError

COMMIT_POLICIES = {"rollback": 0, "commit": 1, "none": 2}
SHUTDOWN_POLICIES = {"none": 0, "shutdown": 1, "force": 2}


class Ctx:
    def __init__(self, opts: dict):
        self.opts = opts
        self._client = None

    @property
    def json(self) -> bool:
        return self.opts["as_json"]

    @property
    def client(self) -> ZVMClient:
        if self._client is None:
            o = self.opts
            if o["zvm"]:
                self._client = ZVMClient(o["zvm"], client_id=o["client_id"],
                                         client_secret=o["client_secret"], username=o["user"],
                                         password=o["password"], ca_cert=o["ca_cert"],
                                         fingerprint=o["fingerprint"], insecure=o["insecure"])
            else:
                f = Path(o["lab"]) / "zvm" / o["site"] / "connection.json"
                if not f.exists():
                    raise click.UsageError(f"no ZVM to talk to: give --zvm URL, or start the lab "
                                           f"({f} does not exist)")
                self._client = ZVMClient.from_connection_file(f)
        return self._client


def connection_options(fn):
    opts = [
        click.option("--zvm", envvar="TIDEMARK_ZVM", help="the ZVM's URL, https://host:9669"),
        click.option("--client-id", envvar="TIDEMARK_CLIENT_ID"),
        click.option("--client-secret", envvar="TIDEMARK_CLIENT_SECRET"),
        click.option("--user", envvar="TIDEMARK_USER"),
        click.option("--password", envvar="TIDEMARK_PASSWORD"),
        click.option("--ca-cert", envvar="TIDEMARK_CA_CERT", help="the ZVM's certificate file"),
        click.option("--fingerprint", envvar="TIDEMARK_FINGERPRINT",
                     help="accept the ZVM certificate with this SHA-256 fingerprint"),
        click.option("--insecure", is_flag=True, help="do not check the certificate (lab only)"),
        click.option("--lab", default=".lab", envvar="TIDEMARK_LAB", show_default=True),
        click.option("--site", default="site-a", envvar="TIDEMARK_SITE", show_default=True,
                     help="with --lab: which site's ZVM"),
        click.option("--json", "as_json", is_flag=True, help="print JSON"),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def run(fn):
    """Map ZVM errors to messages and exit codes in one place."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except ZVMError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
    return wrapper


def out(ctx: Ctx, data, columns: list[tuple[str, str]] | None = None):
    if ctx.json or columns is None:
        click.echo(json.dumps(data, indent=1))
        return
    rows = data if isinstance(data, list) else [data]
    table = [[_cell(r, key) for _, key in columns] for r in rows]
    widths = [max([len(h)] + [len(row[i]) for row in table]) for i, (h, _) in enumerate(columns)]
    click.echo("  ".join(h.ljust(w) for (h, _), w in zip(columns, widths)))
    for row in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def _cell(doc, key: str) -> str:
    v = doc
    for k in key.split("."):
        v = v.get(k) if isinstance(v, dict) else None
    return "" if v is None else str(v)


def follow(ctx: Ctx, task_id, label: str, wait: bool = True, timeout: float = 1800,
           stopped_ok: bool = False, decided: bool = False):
    """Show a task's progress bar until it ends or waits for the user. ``stopped_ok``: a rollback
    answers the operation's own task, which ends Stopped (5) when the rollback is done.
    ``decided``: a commit or rollback answers the task that was waiting for it, so its waiting
    state is not an end here (it may still show for a moment after the decision)."""
    if not wait:
        out(ctx, {"TaskIdentifier": task_id}) if ctx.json else click.echo(task_id)
        return
    if ctx.json:
        t = ctx.client.wait_task(task_id, timeout, until_waiting=not decided)
    else:
        with click.progressbar(length=100, label=label, show_percent=True) as bar:
            seen = [0]

            def progress(t):
                p = int(t["Status"]["Progress"])
                if p > seen[0]:
                    bar.update(p - seen[0])
                    seen[0] = p
            t = ctx.client.wait_task(task_id, timeout, progress, until_waiting=not decided)
    state = t["Status"]["State"]
    if ctx.json:
        out(ctx, t)
    else:
        names = {2: "waiting for your decision", 4: "failed", 5: "stopped", 6: "completed"}
        click.echo(f"{t['Type']} {names.get(state, state)}"
                   + (f": {t['CompleteReason']}" if t.get("CompleteReason") else "")
                   + f"  (task {task_id})")
    if state == 4 or (state == 5 and not stopped_ok):
        sys.exit(5)


def vpg_id(ctx: Ctx, ref: str) -> str:
    for v in ctx.client.get("/v1/vpgs"):
        if ref in (v.get("VpgIdentifier"), v.get("VpgName")):
            return v["VpgIdentifier"]
    raise NotFound(f"no VPG named or identified {ref}")


def checkpoint_id(ctx: Ctx, vpg: str, ref: str | None) -> str | None:
    if ref in (None, "latest"):
        return ctx.client.get(f"/v1/vpgs/{vpg}/checkpoints/stats")["Latest"]["CheckpointIdentifier"]
    if ref == "latest-tagged":
        tagged = [c for c in ctx.client.get(f"/v1/vpgs/{vpg}/checkpoints") if c.get("Tag")]
        if not tagged:
            raise NotFound("the VPG has no tagged checkpoint")
        return max(tagged, key=lambda c: c["TimeStamp"])["CheckpointIdentifier"]
    return ref


def _site_ref(ctx: Ctx, ref: str | None) -> str:
    return site_id(ctx.client, ref)


# ---------------------------------------------------------------- commands
CONN_KEYS = ("zvm", "client_id", "client_secret", "user", "password", "ca_cert", "fingerprint",
             "insecure", "lab", "site", "as_json")


def pass_ctx(fn):
    """Give a command the connection options and a Ctx built from them."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        opts = {k: kw.pop(k) for k in CONN_KEYS}
        return fn(Ctx(opts), *a, **kw)
    return connection_options(wrapper)


def register(main: click.Group) -> None:
    def group(name, help_):
        @main.group(name, help=help_)
        def g():
            pass
        return g

    # -- sites and pairing
    site = group("site", "This site and its peers: show, pair, unpair.")

    @site.command("show")
    @pass_ctx
    @run
    def site_show(ctx):
        """The local site."""
        out(ctx, ctx.client.get("/v1/localsite"), [("site", "SiteName"), ("id", "SiteIdentifier"),
                                                   ("type", "SiteType"), ("version", "Version")])

    @site.command("peers")
    @pass_ctx
    @run
    def site_peers(ctx):
        """Paired sites."""
        out(ctx, ctx.client.get("/v1/peersites"),
            [("peer", "PeerSiteName"), ("id", "SiteIdentifier"), ("status", "PairingStatus"),
             ("host", "HostName"), ("port", "Port")])

    @site.command("token")
    @pass_ctx
    @run
    def site_token(ctx):
        """Generate a one-time pairing token (give it to the other site's `site pair`)."""
        out(ctx, ctx.client.post("/v1/peersites/generatetoken"),
            [("token", "Token"), ("expires", "UtcExpirationDate")])

    @site.command("pair")
    @click.argument("host")
    @click.argument("port", type=int)
    @click.argument("token")
    @click.option("--wait/--no-wait", default=True)
    @pass_ctx
    @run
    def site_pair(ctx, host, port, token, wait):
        """Pair with the ZVM at HOST:PORT using the TOKEN it generated."""
        tid = ctx.client.post("/v1/peersites", {"HostName": host, "Port": port, "Token": token})
        follow(ctx, tid, "pairing", wait) if isinstance(tid, str) and tid else out(ctx, tid)

    @site.command("unpair")
    @click.argument("peer")
    @click.option("--keep-target-disks", is_flag=True)
    @pass_ctx
    @run
    def site_unpair(ctx, peer, keep_target_disks):
        """Unpair from PEER (site identifier or name)."""
        pid = next((p["SiteIdentifier"] for p in ctx.client.get("/v1/peersites")
                    if peer in (p["SiteIdentifier"], p["PeerSiteName"])), None)
        if pid is None:
            raise NotFound(f"no peer site {peer}")
        r = ctx.client.delete(f"/v1/peersites/{pid}", {"IsKeepTargetDisks": keep_target_disks})
        if isinstance(r, str) and r:
            follow(ctx, r, "unpairing")

    # -- inventory
    inv = group("inventory", "The hypervisor inventory of this site or a peer site.")
    kinds = {"hosts": [("host", "VirtualizationHostName"), ("id", "HostIdentifier"),
                       ("status", "ConnectionStatus")],
             "vms": [("vm", "VmName"), ("id", "VmIdentifier"), ("host", "OwningHostName")],
             "datastores": [("datastore", "DatastoreName"), ("id", "DatastoreIdentifier")],
             "networks": [("network", "VirtualizationNetworkName"), ("id", "NetworkIdentifier")],
             "folders": [("folder", "FolderName"), ("id", "FolderIdentifier")],
             "resourcepools": [("pool", "ResourcepoolName"), ("id", "ResourcePoolIdentifier")]}
    for kind, cols in kinds.items():
        def make(kind=kind, cols=cols):
            @inv.command(kind, help=f"List {kind}.")
            @click.option("--of", "of_site", help="site name or identifier (default: this site)")
            @pass_ctx
            @run
            def cmd(ctx, of_site):
                out(ctx, ctx.client.get(f"/v1/virtualizationsites/{_site_ref(ctx, of_site)}/{kind}"),
                    cols)
        make()

    # -- VRAs
    vras = group("vras", "Replication appliances: list, install, upgrade, uninstall.")

    @vras.command("list")
    @pass_ctx
    @run
    def vras_list(ctx):
        out(ctx, ctx.client.get("/v1/vras"), [("vra", "VraName"), ("id", "VraIdentifier"),
                                              ("host", "HostDisplayName"), ("status", "Status"),
                                              ("version", "VraVersion")])

    @vras.command("install")
    @click.argument("host")
    @click.option("--datastore", required=True)
    @click.option("--network", required=True)
    @click.option("--memory-gb", default=4, show_default=True)
    @click.option("--wait/--no-wait", default=True)
    @pass_ctx
    @run
    def vras_install(ctx, host, datastore, network, memory_gb, wait):
        """Install a VRA on HOST (name or identifier)."""
        site = _site_ref(ctx, None)
        body = {"HostIdentifier": native_id(ctx.client, site, "hosts", host),
                "DatastoreIdentifier": native_id(ctx.client, site, "datastores", datastore),
                "NetworkIdentifier": native_id(ctx.client, site, "networks", network),
                "MemoryInGb": memory_gb}
        follow(ctx, ctx.client.post("/v1/vras", body), f"installing VRA on {host}", wait)

    for verb, method, suffix in (("upgrade", "POST", "/upgrade"), ("uninstall", "DELETE", "")):
        def make(verb=verb, method=method, suffix=suffix):
            @vras.command(verb, help=f"{verb.capitalize()} a VRA (name or identifier).")
            @click.argument("vra")
            @click.option("--wait/--no-wait", default=True)
            @pass_ctx
            @run
            def cmd(ctx, vra, wait):
                vid = next((str(v["VraIdentifier"]) for v in ctx.client.get("/v1/vras")
                            if vra in (str(v["VraIdentifier"]), v["VraName"])), None)
                if vid is None:
                    raise NotFound(f"no VRA {vra}")
                follow(ctx, ctx.client.request(method, f"/v1/vras/{vid}{suffix}"), verb, wait)
        make()

    # -- VPGs
    vpgs = group("vpgs", "Virtual Protection Groups and every recovery operation.")

    @vpgs.command("list")
    @pass_ctx
    @run
    def vpgs_list(ctx):
        out(ctx, ctx.client.get("/v1/vpgs"),
            [("vpg", "VpgName"), ("id", "VpgIdentifier"), ("status", "Status"),
             ("substatus", "SubStatus"), ("rpo s", "ActualRPO"), ("vms", "VmsCount"),
             ("MB/s", "ThroughputInMB"), ("iops", "IoPs")])

    @vpgs.command("show")
    @click.argument("vpg")
    @pass_ctx
    @run
    def vpgs_show(ctx, vpg):
        out(ctx, ctx.client.get(f"/v1/vpgs/{vpg_id(ctx, vpg)}"))

    @vpgs.command("create")
    @click.argument("name")
    @click.option("--vm", "vms", multiple=True, required=True, help="protected VM (repeat)")
    @click.option("--recovery-site", required=True)
    @click.option("--host", required=True, help="recovery host")
    @click.option("--datastore", required=True, help="recovery datastore")
    @click.option("--network", required=True, help="failover network")
    @click.option("--test-network", required=True, help="failover test network")
    @click.option("--rpo", default=300, show_default=True, help="configured RPO, seconds")
    @click.option("--history-hours", default=4, show_default=True)
    @click.option("--priority", type=click.Choice(["Low", "Medium", "High"]), default="Medium")
    @click.option("--compression/--no-compression", default=True)
    @click.option("--wait/--no-wait", default=True)
    @pass_ctx
    @run
    def vpgs_create(ctx, name, vms, recovery_site, host, datastore, network, test_network, rpo,
                    history_hours, priority, compression, wait):
        """Create VPG NAME protecting the given VMs to the recovery site."""
        tid = create_vpg(ctx.client, name, list(vms), recovery_site, host, datastore, network,
                         test_network, rpo_s=rpo, history_hours=history_hours, priority=priority,
                         compression=compression)
        follow(ctx, tid, f"creating {name}", wait)

    @vpgs.command("delete")
    @click.argument("vpg")
    @click.option("--keep-recovery-volumes", is_flag=True)
    @click.option("--force", is_flag=True)
    @click.option("--wait/--no-wait", default=True)
    @pass_ctx
    @run
    def vpgs_delete(ctx, vpg, keep_recovery_volumes, force, wait):
        vid = vpg_id(ctx, vpg)
        follow(ctx, ctx.client.delete(f"/v1/vpgs/{vid}", {"KeepRecoveryVolumes": keep_recovery_volumes,
                                                          "Force": force}), "deleting", wait)

    for verb in ("pause", "resume", "forcesync"):
        def make(verb=verb):
            @vpgs.command(verb, help=f"{verb.capitalize()} a VPG's replication.")
            @click.argument("vpg")
            @click.option("--wait/--no-wait", default=True)
            @pass_ctx
            @run
            def cmd(ctx, vpg, wait):
                follow(ctx, ctx.client.post(f"/v1/vpgs/{vpg_id(ctx, vpg)}/{verb}"), verb, wait)
        make()

    @vpgs.command("checkpoints")
    @click.argument("vpg")
    @click.option("--since", help="ISO time")
    @click.option("--tagged", is_flag=True, help="only tagged checkpoints")
    @pass_ctx
    @run
    def vpgs_checkpoints(ctx, vpg, since, tagged):
        cps = ctx.client.get(f"/v1/vpgs/{vpg_id(ctx, vpg)}/checkpoints", startDate=since)
        if tagged:
            cps = [c for c in cps if c.get("Tag")]
        out(ctx, cps, [("checkpoint", "CheckpointIdentifier"), ("time", "TimeStamp"), ("tag", "Tag")])

    @vpgs.command("checkpoint")
    @click.argument("vpg")
    @click.option("--tag", required=True)
    @pass_ctx
    @run
    def vpgs_checkpoint(ctx, vpg, tag):
        """Insert a tagged checkpoint."""
        follow(ctx, ctx.client.post(f"/v1/vpgs/{vpg_id(ctx, vpg)}/checkpoints",
                                    {"CheckpointName": tag}), f"checkpoint {tag}")

    checkpoint_opt = click.option("--checkpoint", default="latest", show_default=True,
                                  help="latest, latest-tagged or a checkpoint identifier")

    @vpgs.command("test")
    @click.argument("vpg")
    @checkpoint_opt
    @click.option("--vm", "vms", multiple=True, help="only these VMs (identifiers)")
    @click.option("--wait/--no-wait", default=True)
    @pass_ctx
    @run
    def vpgs_test(ctx, vpg, checkpoint, vms, wait):
        """Start a failover test into the test network (replication continues)."""
        vid = vpg_id(ctx, vpg)
        body = {"CheckpointIdentifier": checkpoint_id(ctx, vid, checkpoint)}
        if vms:
            body["VmIdentifiers"] = list(vms)
        follow(ctx, ctx.client.post(f"/v1/vpgs/{vid}/FailoverTest", body), "failover test", wait)

    @vpgs.command("test-stop")
    @click.argument("vpg")
    @click.option("--failed", is_flag=True, help="record the test as failed")
    @click.option("--summary", default="")
    @click.option("--wait/--no-wait", default=True)
    @pass_ctx
    @run
    def vpgs_test_stop(ctx, vpg, failed, summary, wait):
        """Stop the failover test and clean up the test VMs."""
        follow(ctx, ctx.client.post(f"/v1/vpgs/{vpg_id(ctx, vpg)}/FailoverTestStop",
                                    {"FailoverTestSuccess": not failed,
                                     "FailoverTestSummary": summary}), "stopping test", wait)

    @vpgs.command("failover")
    @click.argument("vpg")
    @checkpoint_opt
    @click.option("--commit-policy", type=click.Choice(list(COMMIT_POLICIES)), default="none",
                  show_default=True)
    @click.option("--commit-timeout", default=3600, show_default=True, help="seconds")
    @click.option("--shutdown", type=click.Choice(list(SHUTDOWN_POLICIES)), default="none",
                  show_default=True, help="what to do with the source VMs")
    @click.option("--reverse-protection", is_flag=True)
    @click.option("--wait/--no-wait", default=True)
    @pass_ctx
    @run
    def vpgs_failover(ctx, vpg, checkpoint, commit_policy, commit_timeout, shutdown,
                      reverse_protection, wait):
        """Fail over to the recovery site at a checkpoint; then `commit` or `rollback`."""
        vid = vpg_id(ctx, vpg)
        follow(ctx, ctx.client.post(f"/v1/vpgs/{vid}/Failover", {
            "CheckpointIdentifier": checkpoint_id(ctx, vid, checkpoint),
            "CommitPolicy": COMMIT_POLICIES[commit_policy],
            "TimeToWaitBeforeShutdownInSec": commit_timeout,
            "ShutdownPolicy": SHUTDOWN_POLICIES[shutdown],
            "IsReverseProtection": reverse_protection}), "failover", wait)

    @vpgs.command("move")
    @click.argument("vpg")
    @click.option("--commit-policy", type=click.Choice(list(COMMIT_POLICIES)), default="none",
                  show_default=True)
    @click.option("--commit-timeout", default=3600, show_default=True)
    @click.option("--force-shutdown", is_flag=True)
    @click.option("--reverse-protection/--no-reverse-protection", default=True)
    @click.option("--keep-source-vms", is_flag=True)
    @click.option("--wait/--no-wait", default=True)
    @pass_ctx
    @run
    def vpgs_move(ctx, vpg, commit_policy, commit_timeout, force_shutdown, reverse_protection,
                  keep_source_vms, wait):
        """Move the VPG to the recovery site with no data loss."""
        follow(ctx, ctx.client.post(f"/v1/vpgs/{vpg_id(ctx, vpg)}/Move", {
            "CommitPolicy": COMMIT_POLICIES[commit_policy], "CommitPolicyTimeout": commit_timeout,
            "ForceShutdown": force_shutdown, "ReverseProtection": reverse_protection,
            "KeepSourceVms": keep_source_vms}), "move", wait)

    @vpgs.command("commit")
    @click.argument("vpg")
    @click.option("--reverse-protection/--no-reverse-protection", default=None)
    @click.option("--move", "is_move", is_flag=True, help="commit a Move (default: a Failover)")
    @click.option("--wait/--no-wait", default=True)
    @pass_ctx
    @run
    def vpgs_commit(ctx, vpg, reverse_protection, is_move, wait):
        """Commit a failover or move that waits for a decision."""
        vid = vpg_id(ctx, vpg)
        if is_move:
            body = {} if reverse_protection is None else {"ReverseProtection": reverse_protection}
            tid = ctx.client.post(f"/v1/vpgs/{vid}/MoveCommit", body)
        else:
            body = {} if reverse_protection is None else {"IsReverseProtection": reverse_protection}
            tid = ctx.client.post(f"/v1/vpgs/{vid}/FailoverCommit", body)
        follow(ctx, tid, "commit", wait, decided=True)

    @vpgs.command("rollback")
    @click.argument("vpg")
    @click.option("--move", "is_move", is_flag=True, help="roll back a Move (default: a Failover)")
    @click.option("--wait/--no-wait", default=True)
    @pass_ctx
    @run
    def vpgs_rollback(ctx, vpg, is_move, wait):
        """Roll back a failover or move that waits for a decision."""
        vid = vpg_id(ctx, vpg)
        tid = ctx.client.post(f"/v1/vpgs/{vid}/{'moveRollback' if is_move else 'FailoverRollback'}")
        follow(ctx, tid, "rollback", wait, stopped_ok=True, decided=True)

    @vpgs.command("clone")
    @click.argument("vpg")
    @checkpoint_opt
    @click.option("--datastore", help="datastore identifier for the clones")
    @click.option("--abort", is_flag=True, help="abort a running clone")
    @click.option("--wait/--no-wait", default=True)
    @pass_ctx
    @run
    def vpgs_clone(ctx, vpg, checkpoint, datastore, abort, wait):
        """Clone the VPG's VMs at a checkpoint on the recovery site."""
        vid = vpg_id(ctx, vpg)
        if abort:
            r = ctx.client.post(f"/v1/vpgs/{vid}/CloneAbort")
            if isinstance(r, str) and r:
                follow(ctx, r, "abort", wait, stopped_ok=True)
            return
        body = {"CheckpointId": checkpoint_id(ctx, vid, checkpoint)}
        if datastore:
            body["DatastoreIdentifier"] = datastore
        follow(ctx, ctx.client.post(f"/v1/vpgs/{vid}/CloneStart", body), "clone", wait)

    # -- per-VM restore
    vms = group("vms", "Protected VMs: list, points in time, restore.")

    @vms.command("list")
    @pass_ctx
    @run
    def vms_list(ctx):
        out(ctx, ctx.client.get("/v1/vms"), [("vm", "VmName"), ("id", "VmIdentifier"),
                                             ("vpg", "VpgName"), ("status", "Status"),
                                             ("rpo s", "ActualRPO")])

    @vms.command("restore")
    @click.argument("vm")
    @click.option("--vpg", required=True)
    @checkpoint_opt
    @click.option("--commit-policy", type=click.Choice(list(COMMIT_POLICIES)), default="none")
    @click.option("--shutdown", type=click.Choice(list(SHUTDOWN_POLICIES)), default="shutdown")
    @click.option("--name", "restored_name", help="name of the restored VM")
    @click.option("--wait/--no-wait", default=True)
    @pass_ctx
    @run
    def vms_restore(ctx, vm, vpg, checkpoint, commit_policy, shutdown, restored_name, wait):
        """Restore one VM in place at a checkpoint; then `restore-commit` or `restore-rollback`."""
        vid = vpg_id(ctx, vpg)
        body = {"VpgIdentifier": vid, "CheckpointIdentifier": checkpoint_id(ctx, vid, checkpoint),
                "CommitPolicy": COMMIT_POLICIES[commit_policy],
                "ShutdownPolicy": SHUTDOWN_POLICIES[shutdown]}
        if restored_name:
            body["RestoredVmName"] = restored_name
        follow(ctx, ctx.client.post(f"/v1/vms/{vm}/Restore", body), "restore", wait)

    for verb in ("RestoreCommit", "RestoreRollback"):
        def make(verb=verb):
            @vms.command(verb.replace("Restore", "restore-").lower(), help=f"{verb} of a VM.")
            @click.argument("vm")
            @click.option("--vpg", required=True)
            @click.option("--wait/--no-wait", default=True)
            @pass_ctx
            @run
            def cmd(ctx, vm, vpg, wait):
                follow(ctx, ctx.client.post(f"/v1/vms/{vm}/{verb}", vpg_id(ctx, vpg)), verb, wait,
                       stopped_ok=verb == "RestoreRollback", decided=True)
        make()

    # -- tasks, alerts, events, reports
    tasks = group("tasks", "Tasks (operations) and their progress.")

    @tasks.command("list")
    @click.option("--type", "typ")
    @pass_ctx
    @run
    def tasks_list(ctx, typ):
        out(ctx, ctx.client.get("/v1/tasks", type=typ),
            [("task", "TaskIdentifier"), ("type", "Type"), ("state", "Status.State"),
             ("progress", "Status.Progress"), ("started", "Started"), ("reason", "CompleteReason")])

    @tasks.command("wait")
    @click.argument("task")
    @click.option("--timeout", default=1800.0)
    @pass_ctx
    @run
    def tasks_wait(ctx, task, timeout):
        """Follow a task with a progress bar until it ends or waits for a decision."""
        follow(ctx, task, task.split(".")[0], True, timeout)

    alerts = group("alerts", "Alerts: list, dismiss, undismiss.")

    @alerts.command("list")
    @click.option("--all", "show_all", is_flag=True, help="include dismissed alerts")
    @pass_ctx
    @run
    def alerts_list(ctx, show_all):
        out(ctx, ctx.client.get("/v1/alerts", isDismissed=None if show_all else "false"),
            [("alert", "AlertIdentifier"), ("level", "Level"), ("help", "HelpIdentifier"),
             ("since", "TurnedOn"), ("description", "Description")])

    for verb in ("dismiss", "undismiss"):
        def make(verb=verb):
            @alerts.command(verb)
            @click.argument("alert")
            @pass_ctx
            @run
            def cmd(ctx, alert):
                ctx.client.post(f"/v1/alerts/{alert}/{verb}")
        make()

    events = group("events", "Events, newest first.")

    @events.command("list")
    @click.option("--vpg")
    @click.option("--limit", default=50, show_default=True)
    @pass_ctx
    @run
    def events_list(ctx, vpg, limit):
        out(ctx, ctx.client.get("/v1/events", vpg=vpg)[:limit],
            [("time", "OccurredOn"), ("type", "EventTypeName"), ("user", "UserName"),
             ("description", "Description")])

    reports = group("reports", "Recovery reports (RTO and the steps taken).")

    @reports.command("list")
    @pass_ctx
    @run
    def reports_list(ctx):
        out(ctx, ctx.client.get("/v1/reports/recovery"),
            [("report", "RecoveryOperationIdentifier"), ("vpg", "General.VpgName"),
             ("type", "General.RecoveryType"), ("status", "General.Status"),
             ("rto s", "General.RtoInSeconds"), ("started", "General.StartTime")])

    @reports.command("show")
    @click.argument("report")
    @pass_ctx
    @run
    def reports_show(ctx, report):
        out(ctx, ctx.client.get(f"/v1/reports/recovery/{report}"))

    api = group("api", "Call any route of the ZVM API: tidemark api call GET /v1/vpgs.")

    @api.command("call")
    @click.argument("method", type=click.Choice(["GET", "POST", "PUT", "DELETE"],
                                                 case_sensitive=False))
    @click.argument("path")
    @click.argument("body", required=False)
    @pass_ctx
    @run
    def api_call(ctx, method, path, body):
        try:
            data = json.loads(body) if body else None
        except ValueError as exc:
            raise BadRequest(f"BODY is not JSON: {exc}") from exc
        ctx.opts["as_json"] = True
        out(ctx, ctx.client.request(method.upper(), path, data))
