"""What the commands share: the list parsers, the spec options, the spec grid, the GPU check.

Imports nothing from the command modules, so every command module can import it.
"""

from __future__ import annotations

import importlib.util
import itertools
import re

import click

from ..backends import cuda_usable
from ..environment import CUDA_EXTRA_HINT
from ..spec import (ACTIVATIONS, BACKENDS, CAPACITY_DROP, ROUTINGS, SWIGLU_ALPHA, SWIGLU_LIMIT,
                    MoESpec)

_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)


def parse_ints(text, name: str, *, minimum: int | None = None) -> list[int] | None:
    """``"1,7,64"`` -> [1, 7, 64] (None stays None).  click.BadParameter naming the option, the
    expected value and the bad item, for a non-integer (ASCII digits only), an empty list or a
    value below ``minimum``."""
    if text is None:
        return None
    items = [v.strip() for v in str(text).split(",") if v.strip()]
    if not items:
        raise click.BadParameter(f"{name} must list at least one integer, got {text!r}")
    for v in items:
        if not _INT.fullmatch(v):
            raise click.BadParameter(f"{name} must be integers separated by commas, got {v!r} "
                                     f"in {text!r}")
    out = [int(v) for v in items]
    for v in out:
        if minimum is not None and v < minimum:
            raise click.BadParameter(f"{name} must be >= {minimum}, got {v}")
    return out


def parse_strs(text) -> list[str] | None:
    """``"bf16, fp16"`` -> ["bf16", "fp16"] (None stays None)."""
    if text is None:
        return None
    return [v.strip() for v in str(text).split(",") if v.strip()]


def int_list(minimum: int | None = 1):
    """A click callback parsing a comma list of integers >= ``minimum``."""
    def callback(ctx, param, value):
        return parse_ints(value, f"--{param.name.replace('_', '-')}", minimum=minimum)
    return callback


def _str_list(ctx, param, value):
    return parse_strs(value)


def spec_options(fn):
    """The options that describe one spec (or, with comma lists, a grid of specs)."""
    opts = [
        click.option("--experts", "-e", callback=int_list(None), help="number of experts E (list: 8,64)"),
        click.option("--topk", "-k", callback=int_list(None), help="experts per token k"),
        click.option("--hidden", callback=int_list(None), help="hidden size H"),
        click.option("--ffn", callback=int_list(None), help="expert intermediate size F (default 4·H)"),
        click.option("--dtype", callback=_str_list, default=None,
                     help="float32 | bfloat16 | float16 (aliases fp32, bf16, fp16); default "
                          "float32, or the model's dtype with --from-config"),
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
        click.option("--router-dtype", type=click.Choice(["float32"]), default=None,
                     help="keep the router in float32 beside bf16/fp16 experts"),
        click.option("--swiglu-alpha", type=float, default=SWIGLU_ALPHA, show_default=True,
                     help="alpha of --activation swiglu_clamped"),
        click.option("--swiglu-limit", type=float, default=SWIGLU_LIMIT, show_default=True,
                     help="limit of --activation swiglu_clamped"),
        click.option("--shared-expert-gate/--no-shared-expert-gate", default=False, show_default=True,
                     help="scale the shared experts by sigmoid(x·g) (Qwen2-MoE)"),
        click.option("--batch-invariant/--no-batch-invariant", default=False, show_default=True,
                     help="each token's output bitwise the same whatever the batch around it"),
        click.option("--save-activations/--no-save-activations", default=False,
                     show_default=True,
                     help="training: keep the gate/up pre-activations for the backward"),
        click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True),
        click.option("--arch", callback=_str_list,
                     help="CUDA target(s), e.g. sm_90 or sm_80,sm_90 (cuda backend only)"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


SPEC_KEYS = ("experts", "topk", "hidden", "ffn", "dtype", "activation", "routing", "renormalize",
             "bias", "n_group", "topk_group", "routed_scaling_factor", "shared_experts",
             "capacity_factor", "capacity_drop", "router_dtype", "swiglu_alpha", "swiglu_limit",
             "shared_expert_gate", "batch_invariant", "save_activations", "backend", "arch")
DEFAULT_DTYPE = "float32"


def pop_spec_kwargs(kwargs: dict) -> dict:
    return {k: kwargs.pop(k) for k in SPEC_KEYS}


def backend_for(backend: str, arch: str | None) -> str:
    """The backend a spec gets from --backend and --arch: an arch means cuda; with an
    explicit ``--backend c`` an arch is refused (it would change nothing but the key)."""
    if arch is None:
        return backend
    if backend == "c":
        raise click.UsageError(f"--arch {arch} names a CUDA target; the c backend takes none "
                               "(drop --arch, or use --backend cuda)")
    return "cuda"


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
            o["experts"], o["topk"], o["hidden"], o.get("ffn") or [None],
            o.get("dtype") or [DEFAULT_DTYPE], o["activation"], archs):
        out.append(MoESpec(num_experts=e, top_k=k, hidden_dim=h, ffn_dim=f, dtype=dt,
                           activation=act, routing=o["routing"], renormalize=o["renormalize"],
                           bias=o["bias"], n_group=o["n_group"], topk_group=o["topk_group"],
                           routed_scaling_factor=o["routed_scaling_factor"],
                           num_shared_experts=o["shared_experts"],
                           capacity_factor=o.get("capacity_factor"),
                           capacity_drop=o.get("capacity_drop", "token"),
                           router_dtype=o.get("router_dtype"),
                           swiglu_alpha=o.get("swiglu_alpha", SWIGLU_ALPHA),
                           swiglu_limit=o.get("swiglu_limit", SWIGLU_LIMIT),
                           shared_expert_gate=o.get("shared_expert_gate", False),
                           batch_invariant=o.get("batch_invariant", False),
                           save_activations=o.get("save_activations", False),
                           backend=backend_for(o["backend"], arch), arch=arch))
    return out


def one_spec(o: dict) -> MoESpec:
    specs = specs_from_options(o)
    if len(specs) != 1:
        raise click.UsageError(f"this command takes one spec; the options describe {len(specs)}")
    return specs[0]


def parse_spec_args(args, prog_name: str) -> MoESpec | None:
    """One MoESpec from spec options given as raw arguments (``--experts 8 --topk 2 ...``);
    None when they asked for --help (already printed)."""
    holder = {}

    @click.command()
    @spec_options
    def collect(**kwargs):
        holder["spec"] = one_spec(pop_spec_kwargs(kwargs))

    collect.main(args=list(args), prog_name=prog_name, standalone_mode=False)
    return holder.get("spec")


def require_gpu(command: str, instead: str) -> None:
    """One ``Error:`` line (exit status 1) when a command that runs kernels on the GPU cannot: CuPy missing
    (names the extra to install) or no usable GPU."""
    if importlib.util.find_spec("cupy") is None:
        raise click.ClickException(f"{command} --backend cuda needs CuPy, which is not installed: "
                               f"{CUDA_EXTRA_HINT}")
    if not cuda_usable():
        raise click.ClickException(f"{command} --backend cuda: no usable GPU is present ({command} "
                               f"runs kernels on the device; {instead})")
