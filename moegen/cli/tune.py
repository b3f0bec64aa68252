"""``moegen tune``: measure a backend's tunable constants for one spec and store the best."""

from __future__ import annotations

import click

from ..tuner import tune as tune_spec
from .options import int_list, one_spec, pop_spec_kwargs, require_gpu, spec_options


@click.command()
@spec_options
@click.option("--tokens", "-t", callback=int_list(1), default="1,64,1024", show_default=True,
              help="token counts to time each candidate at")
@click.option("--budget", type=click.FloatRange(min=0, min_open=True), default=0.5,
              show_default=True, help="seconds of timing per candidate and token count")
@click.option("--dry-run", is_flag=True, help="measure and print, store nothing")
def tune(tokens, budget, dry_run, **kwargs):
    """Measure the backend's tunable constants for one spec on this machine; store the best.

    Later builds of the spec (here, or wherever the cache is exported to, for the same
    target) use the stored choice.
    """
    spec = one_spec(pop_spec_kwargs(kwargs))
    if spec.backend == "cuda":
        require_gpu("moegen tune", "tuning times kernels on the device")

    def progress(i, n, cands, samples):
        click.echo(f"[tune] round {i}/{n} of {len(cands)} candidates", err=True)

    result = tune_spec(spec, tokens=tuple(tokens), budget_s=budget, save=not dry_run,
                       progress=progress)
    click.echo(result.table())
    click.echo(result.summary())
