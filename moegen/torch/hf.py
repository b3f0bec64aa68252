"""transformers MoE blocks -> `MoEBlock`: `spec_from_config`, `from_hf`, `patch_model`.

Covered: Mixtral, Qwen3-MoE, OLMoE, DeepSeek-V2 (greedy selection) and DeepSeek-V3, in the
transformers 5.x layout (experts as fused 3-D parameters ``experts.gate_up_proj`` [E, 2F, H]
and ``experts.down_proj`` [E, H, F]) and the 4.5x one (``experts.<e>.w1/w3/w2`` for Mixtral,
``experts.<e>.gate_proj/up_proj/down_proj`` for the others), from a live block or from one
block's state dict.  Where a model needs a semantic the kernels do not have yet, the conversion
refuses with one line naming it (`Unsupported`), and `patch_model` leaves the block alone with
that reason; nothing is approximated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from ..spec import MoESpec

# The MoE block class of each covered model, as transformers names it (4.5x and 5.x).
BLOCK_CLASSES = {
    "MixtralSparseMoeBlock": "mixtral",
    "Qwen2MoeSparseMoeBlock": "qwen2_moe",
    "Qwen3MoeSparseMoeBlock": "qwen3_moe",
    "OlmoeSparseMoeBlock": "olmoe",
    "DeepseekV2Moe": "deepseek_v2",
    "DeepseekV2MoE": "deepseek_v2",
    "DeepseekV3MoE": "deepseek_v3",
    "GptOssMLP": "gpt_oss",
}
# Semantics a model needs that the kernels do not have yet (a later wave adds them).
MISSING = {
    "qwen2_moe": "Qwen2-MoE's sigmoid-gated shared expert (shared_expert_gate)",
    "gpt_oss": "GPT-OSS's clamped SwiGLU (alpha 1.702, limit 7, (up + 1)·glu) with interleaved "
               "gate/up rows and expert biases",
    "group_limited_greedy": "DeepSeek-V2's group_limited_greedy softmax selection",
    "fp32_router": "a float32 router with {dtype} experts (transformers keeps the router in "
                   "float32)",
}
_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}


class Unsupported(ValueError):
    """A transformers block moegen cannot run exactly (yet); the message names the feature."""


def _first(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def spec_from_config(config, dtype=None, backend: str = "auto") -> MoESpec:
    """The MoESpec of a transformers config's MoE layers.  ``dtype`` defaults to the config's
    ``dtype``/``torch_dtype`` (float32 when it names none).  Raises `Unsupported`."""
    mt = getattr(config, "model_type", None)
    if mt in ("qwen2_moe", "gpt_oss"):
        raise Unsupported(f"moegen cannot run this {mt} block yet: it needs {MISSING[mt]}")
    if mt not in ("mixtral", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"):
        raise Unsupported(f"model_type must be one of mixtral, qwen3_moe, olmoe, deepseek_v2, "
                          f"deepseek_v3, got {mt!r}")
    act = _first(config, "hidden_act", default="silu")
    if act not in _ACTIVATIONS:
        raise Unsupported(f"hidden_act must be one of {sorted(_ACTIVATIONS)} for a gated expert, "
                          f"got {act!r}")
    if dtype is None:
        dtype = _first(config, "dtype", "torch_dtype", default="float32")
    dtype = str(dtype).replace("torch.", "")
    common = dict(num_experts=int(_first(config, "num_local_experts", "num_experts", "n_routed_experts")),
                  top_k=int(config.num_experts_per_tok), hidden_dim=int(config.hidden_size),
                  dtype=dtype, activation=_ACTIVATIONS[act], backend=backend)
    if mt == "mixtral":
        return MoESpec(ffn_dim=int(config.intermediate_size), renormalize=True, **common)
    if mt in ("qwen3_moe", "olmoe"):
        F = config.moe_intermediate_size if mt == "qwen3_moe" else config.intermediate_size
        return MoESpec(ffn_dim=int(F), renormalize=bool(config.norm_topk_prob), **common)
    shared = int(_first(config, "n_shared_experts", default=0) or 0)
    F = int(config.moe_intermediate_size)
    scale = float(_first(config, "routed_scaling_factor", default=1.0))
    if mt == "deepseek_v2":
        method = _first(config, "topk_method", default="greedy")
        if method != "greedy":
            raise Unsupported(f"moegen cannot run this deepseek_v2 block yet: it needs "
                              f"{MISSING.get(method, f'topk_method {method!r}')}")
        return MoESpec(ffn_dim=F, renormalize=False, routed_scaling_factor=scale,
                       num_shared_experts=shared, **common)
    return MoESpec(ffn_dim=F, routing="sigmoid_topk", renormalize=bool(config.norm_topk_prob),
                   n_group=int(_first(config, "n_group", default=1)),
                   topk_group=int(_first(config, "topk_group", default=1)),
                   routed_scaling_factor=scale, num_shared_experts=shared, **common)


def _tensors(block) -> dict:
    """One block's tensors by their names relative to the block."""
    if isinstance(block, nn.Module):
        return dict(block.state_dict(keep_vars=False))
    return dict(block)


def _experts_45(sd: dict, names: tuple[str, str, str]) -> tuple | None:
    """(w1 list, w3 list, w2 list) from 4.5x ModuleList keys ``experts.<e>.<name>.weight``."""
    ids = sorted({int(m.group(1)) for k in sd for m in [re.match(r"experts\.(\d+)\.", k)] if m})
    if not ids or f"experts.{ids[0]}.{names[0]}.weight" not in sd:
        return None
    return tuple([sd[f"experts.{e}.{n}.weight"] for e in ids] for n in names)


def block_weights(spec: MoESpec, config, block) -> tuple[dict, torch.Tensor | None]:
    """(`MoEKernel.pack` keywords, router bias or None) from a live block or its state dict.
    Raises `Unsupported` for tensors that name a missing semantic, ValueError for a layout
    it does not know."""
    sd = _tensors(block)
    if "shared_expert_gate.weight" in sd:
        raise Unsupported(f"moegen cannot run this block yet: it needs {MISSING['qwen2_moe']}")
    if "router.bias" in sd or "experts.gate_up_proj_bias" in sd:
        raise Unsupported(f"moegen cannot run this block yet: it needs {MISSING['gpt_oss']}")
    if "gate.weight" not in sd:
        raise ValueError(f"block must hold a router 'gate.weight', got keys {sorted(sd)[:8]}")
    kw = {"router": sd["gate.weight"]}
    if "experts.gate_up_proj" in sd:                                   # transformers 5.x
        kw.update(w13=sd["experts.gate_up_proj"], w2=sd["experts.down_proj"])
        expert_dtype = sd["experts.gate_up_proj"].dtype
    else:                                                             # transformers 4.5x
        found = _experts_45(sd, ("w1", "w3", "w2")) or _experts_45(sd, ("gate_proj", "up_proj", "down_proj"))
        if found is None:
            raise ValueError("block must hold experts as 'experts.gate_up_proj'/'experts.down_proj' "
                             "(transformers 5.x) or 'experts.<e>.w1.weight'/'experts.<e>.gate_proj."
                             f"weight' (4.5x), got keys {sorted(sd)[:8]}")
        kw.update(w1=found[0], w3=found[1], w2=found[2])
        expert_dtype = found[0][0].dtype
    if kw["router"].dtype != expert_dtype:
        raise Unsupported("moegen cannot run this block yet: it needs "
                          + MISSING["fp32_router"].format(dtype=str(expert_dtype).replace("torch.", "")))
    S, F, H = spec.num_shared_experts, spec.ffn_dim, spec.hidden_dim
    if S:
        # One MLP of width S·F is S experts of width F summed (the activation is elementwise).
        g, u, d = (sd[f"shared_experts.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
        kw.update(shared_w1=g.reshape(S, F, H), shared_w3=u.reshape(S, F, H),
                  shared_w2=d.reshape(H, S, F).permute(1, 0, 2).contiguous())
    bias = sd.get("gate.e_score_correction_bias")
    return kw, bias


def _block_config(block, model_type: str):
    """A config-like namespace read off a live block that carries no config (5.x routers hold
    top_k/norm_topk_prob; 4.5x blocks hold them themselves)."""
    gate = getattr(block, "gate", None)
    experts = getattr(block, "experts", None)
    act_fn = getattr(experts, "act_fn", None)
    if act_fn is None and isinstance(experts, nn.ModuleList) and len(experts):
        act_fn = getattr(experts[0], "act_fn", None)
    act = {"SiLU": "silu", "SiLUActivation": "silu", "GELUActivation": "gelu"}.get(
        type(act_fn).__name__, type(act_fn).__name__)
    sd = _tensors(block)
    E, H = sd["gate.weight"].shape
    if "experts.gate_up_proj" in sd:
        F = sd["experts.gate_up_proj"].shape[1] // 2
    else:
        F = next(v.shape[0] for k, v in sd.items() if re.match(r"experts\.0\.(w1|gate_proj)\.weight", k))
    top_k = _first(gate, "top_k") or _first(block, "top_k", "num_experts_per_tok")
    norm = _first(gate, "norm_topk_prob")
    if norm is None:
        norm = _first(block, "norm_topk_prob", default=model_type == "mixtral")
    return SimpleNamespace(model_type=model_type, num_experts=E, num_experts_per_tok=top_k,
                           hidden_size=H, intermediate_size=F, moe_intermediate_size=F,
                           norm_topk_prob=norm, hidden_act=act, dtype=sd["gate.weight"].dtype)


def from_hf(block, config=None, *, dtype=None, backend: str = "auto"):
    """A `MoEBlock` computing what the transformers MoE ``block`` computes.

    ``block``: a live transformers MoE block, or one block's state dict (keys relative to the
    block) with ``config`` (the model's config).  Raises `Unsupported` (a ValueError) naming
    the semantic moegen's kernels lack, before any compile.
    """
    from .block import MoEBlock
    if config is None:
        if not isinstance(block, nn.Module):
            raise TypeError("config is required when block is a state dict (pass model.config)")
        mt = BLOCK_CLASSES.get(type(block).__name__)
        if mt is None:
            raise Unsupported(f"block must be one of {sorted(BLOCK_CLASSES)}, got {type(block).__name__}")
        config = getattr(block, "config", None)
        if config is None and mt in MISSING:
            raise Unsupported(f"moegen cannot run this {mt} block yet: it needs {MISSING[mt]}")
        if config is None:
            config = _block_config(block, mt)
    if dtype is None:
        sd = _tensors(block)
        w = sd.get("experts.gate_up_proj", sd.get("experts.0.w1.weight", sd.get("experts.0.gate_proj.weight")))
        dtype = w.dtype if w is not None else None
    spec = spec_from_config(config, dtype=dtype, backend=backend)
    kwargs, bias = block_weights(spec, config, block)
    return MoEBlock(spec, kwargs, router_bias=bias)


@dataclass
class PatchReport:
    """What `patch_model` did: ``swapped`` and ``left`` are lists of (module path, class name,
    reason or spec name)."""
    swapped: list = field(default_factory=list)
    left: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"swapped {len(self.swapped)} block(s), left {len(self.left)} alone"]
        lines += [f"  swapped {p} ({c}) -> {s}" for p, c, s in self.swapped]
        lines += [f"  left    {p} ({c}): {r}" for p, c, r in self.left]
        return "\n".join(lines)


def patch_model(model: nn.Module, *, backend: str = "auto") -> PatchReport:
    """Swap every supported transformers MoE block of ``model`` for a `MoEBlock`, in place.

    Returns a `PatchReport` naming each block swapped and each MoE block left alone with the
    reason (a semantic the kernels lack).  Dense MLPs are not MoE blocks and are not listed.
    """
    config = getattr(model, "config", None)
    report = PatchReport()
    for path, module in list(model.named_modules()):
        cls = type(module).__name__
        if cls not in BLOCK_CLASSES:
            continue
        try:
            new = from_hf(module, config, backend=backend)
        except Unsupported as exc:
            report.left.append((path, cls, str(exc)))
            continue
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, new)
        report.swapped.append((path, cls, new.spec.name))
    return report
