"""``moegen build`` (compile specs into the cache) and ``moegen render`` (print the sources)."""

from __future__ import annotations

from pathlib import Path

import click

from ..deploy import build_many
from ..generated import write_generated, write_sources
from ..jit import build as build_one, plan_for
from ..model_config import parse_model_config
from ..plan import plan_text
from ..render import render as render_spec
from ..spec import MoESpec
from .options import backend_for, pop_spec_kwargs, spec_options, specs_from_options


def config_specs(path: str, o: dict) -> list[MoESpec]:
    """The specs of a HF model config: its own dtype unless --dtype is given, crossed with
    every --arch."""
    out = []
    for dt in o.get("dtype") or [None]:
        for fields in parse_model_config(path, dtype=dt):
            for arch in o.get("arch") or [None]:
                out.append(MoESpec(**{**fields, "backend": backend_for(o["backend"], arch),
                                      "arch": arch}))
    return out


@click.command()
@spec_options
@click.option("--from-config", "from_config", type=click.Path(exists=True, dir_okay=False),
              help="HF config.json of a MoE model (Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, OLMoE, "
                   "gpt-oss); its dtype unless --dtype is given")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True,
              help="parallel builds")
def build(from_config, jobs, **kwargs):
    """Compile one spec (or a grid / a model's specs) into the cache."""
    o = pop_spec_kwargs(kwargs)
    specs = specs_from_options(o, required=from_config is None)
    if from_config:
        specs += config_specs(from_config, o)
    if len(specs) == 1:
        info = build_one(specs[0])
        click.echo(f"name:     {info.name}\n"
                   f"backend:  {info.backend} ({info.target})\n"
                   f"key:      {info.key}\n"
                   f"entry:    {info.entry}\n"
                   f"cache:    {info.location}\n"
                   f"{'compiled' if info.built else 'cached'}: {info.seconds:.3f} s")
        return
    results = build_many(specs, jobs=jobs, progress=True)
    if any(not r.ok for r in results):
        raise SystemExit(1)


@click.command()
@spec_options
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="write the sources here (without spec options: the reference specs of generated/)")
def render(out_dir, **kwargs):
    """Print (or write) the generated source of a spec."""
    o = pop_spec_kwargs(kwargs)
    specs = specs_from_options(o, required=out_dir is None)
    if not specs:
        for path in write_generated(Path(out_dir)):
            click.echo(str(path))
        return
    for spec in specs:
        backends = ("c", "cuda") if spec.backend == "auto" else (spec.backend,)
        for be in backends:
            src = render_spec(spec.replace(backend=be))
            if out_dir:
                for path in write_sources(Path(out_dir), spec.replace(backend=be), src):
                    click.echo(str(path))
            else:
                for name, text in src.files.items():
                    click.echo(f"// ===== {spec.name} [{be}] {name} =====")
                    click.echo(text)


@click.command()
@spec_options
def plan(**kwargs):
    """Print the kernel plan of a spec on this machine: every bucket, tile, thread count,
    shared-memory size, split-K count, kernel name and workspace size the build will use."""
    o = pop_spec_kwargs(kwargs)
    for spec in specs_from_options(o, required=True):
        click.echo(plan_text(plan_for(spec)))
