"""The `tidemark` command."""
from __future__ import annotations

import click

from simulator.cli import lab


@click.group()
@click.version_option(package_name="tidemark")
def main():
    """Tidemark: continuous data protection and disaster recovery."""


def _zvm_commands():
    from appliance.zvmcli import register
    register(main)


main.add_command(lab)
_zvm_commands()


@main.group()
def vra():
    """The replication appliance (normally started by its appliance VM)."""


@vra.command()
@click.option("--config", "config", required=True, type=click.Path(exists=True, dir_okay=False),
              help="JSON settings; TIDEMARK_VRA_* variables override them")
def serve(config):
    """Run a VRA in the foreground."""
    from appliance.vra.service import cli
    raise SystemExit(cli(["--config", config]))

@main.group()
def zvm():
    """The management server of a site (normally started by its appliance VM or the lab)."""


@zvm.command("init")
@click.option("--config", "config", required=True, type=click.Path(dir_okay=False),
              help="the ZVM's TOML settings (docs/zvm.md); TIDEMARK_ZVM_* variables override")
@click.option("--admin-user", default="admin", show_default=True)
@click.option("--admin-password", envvar="TIDEMARK_ZVM_ADMIN_PASSWORD", default=None,
              help="default: a random one, written to <data_dir>/admin-password (0600)")
@click.option("--api-client", is_flag=True, help="also create an admin API client "
              "(<data_dir>/api-client.json, 0600)")
@click.option("--json", "as_json", is_flag=True)
def zvm_init(config, admin_user, admin_password, api_client, as_json):
    """Create the data folder, store, TLS certificate and first admin user (idempotent)."""
    import json as _json
    from pathlib import Path
    from appliance.zvm.config import ZVMConfig
    from appliance.zvm.serve import init
    cfg = ZVMConfig.load(config if Path(config).exists() else None)
    out = init(cfg, admin_user, admin_password, api_client)
    if as_json:
        click.echo(_json.dumps(out, indent=2))
        return
    click.echo(f"ZVM data in {out['data_dir']}, serving at {out['url']}")
    if "fingerprint" in out:
        click.echo(f"TLS certificate SHA-256 fingerprint: {out['fingerprint']}")
    click.echo(f"admin user {out['admin_user']}, password in {out['admin_password_file']}")


@zvm.command("serve")
@click.option("--config", "config", required=True, type=click.Path(exists=True, dir_okay=False))
def zvm_serve(config):
    """Run the ZVM (gunicorn) in the foreground."""
    from appliance.zvm.config import ZVMConfig
    from appliance.zvm.serve import serve
    serve(ZVMConfig.load(config))


if __name__ == "__main__":
    main()
