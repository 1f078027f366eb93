"""The `tidemark` command."""
from __future__ import annotations

import click

from simulator.cli import lab


@click.group()
@click.version_option(package_name="tidemark")
def main():
    """Tidemark: continuous data protection and disaster recovery."""


main.add_command(lab)

if __name__ == "__main__":
    main()
