"""The ``moegen`` command line: a thin click layer over the library.

    moegen build  --experts 8 --topk 2 --hidden 512 [--ffn --dtype --activation --backend --arch]
    moegen render [spec options] [--out DIR]
    moegen verify [spec options] [--tokens 1,7,64]
    moegen bench  ...            (moegen.cli_bench)
    moegen cache  ls|info|...    (moegen.cli_cache)
    moegen env

Every command exits non-zero on failure.  Spec options take comma-separated lists where a
command builds many variants (``--experts 8,64 --dtype bf16,fp16``).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import sys
from pathlib import Path

import click

from . import __version__, settings
from .errors import MoegenError
from .spec import ACTIVATIONS, BACKENDS, CAPACITY_DROP, ROUTINGS, MoESpec

log = logging.getLogger("moegen.cli")


# -- spec options ----------------------------------------------------------------------------
def _int_list(ctx, param, value):
    if value is None:
        return None
    try:
        return [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected integers separated by commas, got {value!r}") from None


def _str_list(ctx, param, value):
    if value is None:
        return None
    return [v.strip() for v in str(value).split(",") if v.strip()]


def spec_options(fn):
    """The options that describe one spec (or, with comma lists, a grid of specs)."""
    opts = [
        click.option("--experts", "-e", callback=_int_list, help="number of experts E (list: 8,64)"),
        click.option("--topk", "-k", callback=_int_list, help="experts per token k"),
        click.option("--hidden", callback=_int_list, help="hidden size H"),
        click.option("--ffn", callback=_int_list, help="expert intermediate size F (default 4·H)"),
        click.option("--dtype", callback=_str_list, default="float32", show_default=True,
                     help="float32 | bfloat16 | float16 (aliases fp32, bf16, fp16)"),
        click.option("--activation", callback=_str_list, default="swiglu", show_default=True,
                     help="|".join(ACTIVATIONS)),
        click.option("--routing", type=click.Choice(ROUTINGS), default="softmax_topk", show_default=True),
        click.option("--renormalize/--no-renormalize", default=True, show_default=True,
                     help="rescale the k routing weights to sum to 1"),
        click.option("--bias/--no-bias", default=False, show_default=True, help="expert FFN biases"),
        click.option("--n-group", type=int, default=1, show_default=True, help="expert groups (sigmoid_topk)"),
        click.option("--topk-group", type=int, default=1, show_default=True, help="groups kept per token"),
        click.option("--routed-scaling-factor", type=float, default=1.0, show_default=True),
        click.option("--shared-experts", type=int, default=0, show_default=True,
                     help="always-on shared experts"),
        click.option("--capacity-factor", type=float, default=None,
                     help="expert capacity ceil(factor·T·k/E); default dropless"),
        click.option("--capacity-drop", type=click.Choice(CAPACITY_DROP), default="token",
                     show_default=True, help="which slots an over-full expert keeps"),
        click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True),
        click.option("--arch", callback=_str_list, help="CUDA target(s), e.g. sm_90 or sm_80,sm_90"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


_SPEC_KEYS = ("experts", "topk", "hidden", "ffn", "dtype", "activation", "routing", "renormalize",
              "bias", "n_group", "topk_group", "routed_scaling_factor", "shared_experts",
              "capacity_factor", "capacity_drop", "backend", "arch")


def _pop_spec_kwargs(kwargs: dict) -> dict:
    return {k: kwargs.pop(k) for k in _SPEC_KEYS}


def specs_from_options(o: dict, *, required: bool = True) -> list[MoESpec]:
    """The cartesian product of the spec options; SpecError on a bad value."""
    missing = [f"--{n}" for n in ("experts", "topk", "hidden") if not o.get(n)]
    if missing:
        if not required:
            return []
        raise click.UsageError(f"missing {', '.join(missing)} (e.g. moegen build --experts 8 "
                               "--topk 2 --hidden 512)")
    archs = o.get("arch") or [None]
    out = []
    for e, k, h, f, dt, act, arch in itertools.product(
            o["experts"], o["topk"], o["hidden"], o.get("ffn") or [None], o["dtype"],
            o["activation"], archs):
        backend = o["backend"]
        if arch is not None and backend == "auto":
            backend = "cuda"
        out.append(MoESpec(num_experts=e, top_k=k, hidden_dim=h, ffn_dim=f, dtype=dt,
                           activation=act, routing=o["routing"], renormalize=o["renormalize"],
                           bias=o["bias"], n_group=o["n_group"], topk_group=o["topk_group"],
                           routed_scaling_factor=o["routed_scaling_factor"],
                           num_shared_experts=o["shared_experts"],
                           capacity_factor=o.get("capacity_factor"),
                           capacity_drop=o.get("capacity_drop", "token"), backend=backend, arch=arch))
    return out


def _one_spec(o: dict) -> MoESpec:
    specs = specs_from_options(o)
    if len(specs) != 1:
        raise click.UsageError(f"this command takes one spec; the options describe {len(specs)}")
    return specs[0]


def handle_errors(fn):
    """Turn moegen's errors into a message and exit status 1 (never a traceback for user errors)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (MoegenError, ValueError, TypeError) as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            dump = getattr(exc, "dump", None)
            if callable(dump) and logging.getLogger("moegen").isEnabledFor(logging.DEBUG):
                click.echo(dump(), err=True)
            raise SystemExit(1) from None
    return wrapper


# -- the group ---------------------------------------------------------------------------------
@click.group()
@click.version_option(__version__, prog_name="moegen")
@click.option("-v", "--verbose", count=True, help="more logging (-v info, -vv debug)")
def main(verbose):
    """moegen: compile Mixture-of-Experts layers for your exact shape."""
    level = settings.log_level()
    if verbose:
        level = min(level, logging.INFO if verbose == 1 else logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("moegen").setLevel(level)


@main.command()
@spec_options
@click.option("--from-config", "from_config", type=click.Path(exists=True, dir_okay=False),
              help="HF config.json of a MoE model (Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, OLMoE, gpt-oss)")
@click.option("--jobs", "-j", type=int, default=1, show_default=True, help="parallel builds")
@handle_errors
def build(from_config, jobs, **kwargs):
    """Compile one spec (or a grid / a model's specs) into the cache."""
    o = _pop_spec_kwargs(kwargs)
    specs = specs_from_options(o, required=from_config is None)
    if from_config:
        from .deploy import parse_model_config
        for fields in parse_model_config(from_config):
            for dt, arch in itertools.product(o["dtype"], o.get("arch") or [None]):
                backend = "cuda" if arch and o["backend"] == "auto" else o["backend"]
                specs.append(MoESpec(**{**fields, "dtype": dt, "backend": backend, "arch": arch}))
    if len(specs) == 1:
        from .jit import build as build_one
        info = build_one(specs[0])
        click.echo(f"name:     {info.name}\n"
                   f"backend:  {info.backend} ({info.target})\n"
                   f"key:      {info.key}\n"
                   f"entry:    {info.entry}\n"
                   f"cache:    {info.location}\n"
                   f"{'compiled' if info.built else 'cached'}: {info.seconds:.3f} s")
        return
    from .deploy import build_many
    results = build_many(specs, jobs=jobs, progress=True)
    failed = [r for r in results if not getattr(r, "ok", True)]
    if failed:
        raise SystemExit(1)


@main.command()
@spec_options
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="write the sources here (without spec options: the reference specs of generated/)")
@handle_errors
def render(out_dir, **kwargs):
    """Print (or write) the generated source of a spec."""
    from .render import render as render_spec
    o = _pop_spec_kwargs(kwargs)
    specs = specs_from_options(o, required=out_dir is None)
    if not specs:
        from .generated import write_generated
        for path in write_generated(Path(out_dir)):
            click.echo(str(path))
        return
    for spec in specs:
        backends = ("c", "cuda") if spec.backend == "auto" else (spec.backend,)
        for be in backends:
            src = render_spec(spec.replace(backend=be))
            if out_dir:
                from .generated import write_sources
                for path in write_sources(Path(out_dir), spec.replace(backend=be), src):
                    click.echo(str(path))
            else:
                for name, text in src.files.items():
                    click.echo(f"// ===== {spec.name} [{be}] {name} =====")
                    click.echo(text)


@main.command()
@spec_options
@click.option("--tokens", "-t", callback=_int_list, default="0,1,7,64,257", show_default=True,
              help="token counts to check")
@click.option("--seed", type=int, default=0, show_default=True)
@handle_errors
def verify(tokens, seed, **kwargs):
    """Run a compiled kernel against the float64 reference on random data."""
    from .verify import verify_spec
    spec = _one_spec(_pop_spec_kwargs(kwargs))
    rows = verify_spec(spec, tokens, seed=seed)
    click.echo(f"{'T':>7} {'rel_error':>11} {'tolerance':>10} {'ids':>6}  result")
    ok = True
    for r in rows:
        ok &= r["ok"]
        click.echo(f"{r['tokens']:>7} {r['rel_error']:>11.3e} {r['tolerance']:>10.0e} "
                   f"{r['ids_match']:>6.1%}  {'ok' if r['ok'] else 'FAIL'}")
    if not ok:
        click.secho("verification failed", fg="red", err=True)
        raise SystemExit(1)


@main.command()
@spec_options
@click.option("--tokens", "-t", callback=_int_list, default="1,64,1024", show_default=True,
              help="token counts to time each candidate at")
@click.option("--budget", type=float, default=0.5, show_default=True,
              help="seconds of timing per candidate and token count")
@click.option("--dry-run", is_flag=True, help="measure and print, store nothing")
@handle_errors
def tune(tokens, budget, dry_run, **kwargs):
    """Measure the backend's tunable constants for one spec on this machine; store the best.

    Later builds of the spec (here, or wherever the cache is exported to, for the same
    target) use the stored choice.
    """
    from .tuner import tune as tune_spec
    spec = _one_spec(_pop_spec_kwargs(kwargs))

    def progress(i, n, cands, samples):
        click.echo(f"[tune] round {i}/{n} of {len(cands)} candidates", err=True)

    result = tune_spec(spec, tokens=tuple(tokens), budget_s=budget, save=not dry_run,
                       progress=progress)
    click.echo(result.table())
    click.echo(result.summary())


@main.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def env(as_json):
    """Report compilers, CPU ISA tier, CUDA/NVRTC/GPU, cache and settings."""
    from .environment import describe_environment
    info = describe_environment()
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    for section, values in info.items():
        click.secho(section, bold=True)
        for k, v in values.items():
            click.echo(f"  {k:<22} {v}")


# Subcommands that live in their own modules; imported last because they reuse the spec
# options defined above.
from .cli_bench import bench  # noqa: E402
from .cli_cache import cache, keygen  # noqa: E402

main.add_command(cache)
main.add_command(keygen)
main.add_command(bench)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
