"""``moegen env``: compilers, CPU ISA tier, CUDA/NVRTC/GPU, cache and settings."""

from __future__ import annotations

import json

import click

from ..environment import describe_environment


@click.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def env(as_json):
    """Report compilers, CPU ISA tier, CUDA/NVRTC/GPU, cache and settings."""
    info = describe_environment()
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    for section, values in info.items():
        click.secho(section, bold=True)
        for k, v in values.items():
            click.echo(f"  {k:<22} {v}")
