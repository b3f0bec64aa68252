"""``moegen verify``: a compiled kernel against the float64 reference on random inputs."""

from __future__ import annotations

import click

from ..console import table
from ..verify import verify_spec
from .options import int_list, one_spec, pop_spec_kwargs, require_gpu, spec_options


@click.command()
@spec_options
@click.option("--tokens", "-t", callback=int_list(0), default="0,1,7,64,257", show_default=True,
              help="token counts to check")
@click.option("--seed", type=int, default=0, show_default=True)
def verify(tokens, seed, **kwargs):
    """Run a compiled kernel against the float64 reference on random data."""
    spec = one_spec(pop_spec_kwargs(kwargs))
    if spec.backend == "cuda":
        require_gpu("moegen verify", "`moegen build --backend cuda --arch sm_90` compiles "
                    "without one")
    rows = verify_spec(spec, tokens, seed=seed)
    click.echo(table(["T", "rel_error", "tolerance", "ids", "result"],
                     [(r["tokens"], f"{r['rel_error']:.3e}", f"{r['tolerance']:.0e}",
                       f"{r['ids_match']:.1%}", "ok" if r["ok"] else "FAIL") for r in rows],
                     right=range(4)))
    if not all(r["ok"] for r in rows):
        click.secho("verification failed", fg="red", err=True)
        raise SystemExit(1)
