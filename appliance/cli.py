"""The `tidemark` command."""
from __future__ import annotations

import click

from simulator.cli import lab


@click.group()
@click.version_option(package_name="tidemark")
def main():
    """Tidemark: continuous data protection and disaster recovery."""


main.add_command(lab)


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

if __name__ == "__main__":
    main()
