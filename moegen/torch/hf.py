"""transformers MoE blocks -> `MoEBlock`: `spec_from_config`, `from_hf`, `patch_model`.

Covered: Mixtral, Qwen2-MoE (its sigmoid-gated shared expert, of a width that is a whole
number of routed experts), Qwen3-MoE, OLMoE, DeepSeek-V2 (greedy and group_limited_greedy
selection), DeepSeek-V3 and GPT-OSS (clamped SwiGLU, interleaved gate/up columns, expert and
router biases), with a float32 router beside bf16/fp16 experts where the block keeps one, in
the transformers 5.x layout (experts as fused 3-D parameters ``experts.gate_up_proj``
[E, 2F, H] and ``experts.down_proj`` [E, H, F]) and the 4.5x one (``experts.<e>.w1/w3/w2``
for Mixtral, ``experts.<e>.gate_proj/up_proj/down_proj`` for the others; GPT-OSS has one
layout: ``experts.gate_up_proj`` [E, H, 2F] with gate in the even columns and up in the odd
ones, ``experts.down_proj`` [E, F, H], their biases, and ``router.weight``/``router.bias``),
from a live block or from one block's state dict.  Where a model needs a semantic the kernels
do not have (a Qwen2-MoE shared expert whose width is not a multiple of the routed one, an
unknown topk_method), the conversion refuses with one line naming it (`Unsupported`), and
`patch_model` leaves the block alone with that reason; nothing is approximated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from ..spec import MoESpec
from .block import MoEBlock

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
# transformers keeps DeepSeek's router in float32 whatever the model dtype
# (_keep_in_fp32_modules_strict = ["gate.weight", ...]); moegen keeps it so too.
FP32_ROUTER = ("deepseek_v2", "deepseek_v3")
TOPK_METHODS = ("greedy", "group_limited_greedy")
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
    if mt not in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
                  "gpt_oss"):
        raise Unsupported(f"model_type must be one of mixtral, qwen2_moe, qwen3_moe, olmoe, "
                          f"deepseek_v2, deepseek_v3, gpt_oss, got {mt!r}")
    if dtype is None:
        dtype = _first(config, "dtype", "torch_dtype", default="float32")
    dtype = str(dtype).replace("torch.", "")
    if mt == "gpt_oss":
        # top-k of the biased router logits, softmax over those k; clamped SwiGLU with biases
        return MoESpec(num_experts=int(_first(config, "num_local_experts", "num_experts")),
                       top_k=int(_first(config, "num_experts_per_tok", "experts_per_token")),
                       hidden_dim=int(config.hidden_size), ffn_dim=int(config.intermediate_size),
                       dtype=dtype, activation="swiglu_clamped", routing="topk_softmax", bias=True,
                       swiglu_alpha=float(_first(config, "swiglu_alpha", default=1.702)),
                       swiglu_limit=float(_first(config, "swiglu_limit", default=7.0)),
                       backend=backend)
    act = _first(config, "hidden_act", default="silu")
    if act not in _ACTIVATIONS:
        raise Unsupported(f"hidden_act must be one of {sorted(_ACTIVATIONS)} for a gated expert, "
                          f"got {act!r}")
    common = dict(num_experts=int(_first(config, "num_local_experts", "num_experts", "n_routed_experts")),
                  top_k=int(config.num_experts_per_tok), hidden_dim=int(config.hidden_size),
                  dtype=dtype, activation=_ACTIVATIONS[act], backend=backend)
    if mt == "mixtral":
        return MoESpec(ffn_dim=int(config.intermediate_size), renormalize=True, **common)
    if mt in ("qwen3_moe", "olmoe"):
        F = config.moe_intermediate_size if mt == "qwen3_moe" else config.intermediate_size
        return MoESpec(ffn_dim=int(F), renormalize=bool(config.norm_topk_prob), **common)
    if mt == "qwen2_moe":
        F = int(config.moe_intermediate_size)
        SW = int(_first(config, "shared_expert_intermediate_size", default=0) or 0)
        if SW % F:
            raise Unsupported(f"qwen2_moe shared_expert_intermediate_size must be a multiple of "
                              f"moe_intermediate_size={F} (moegen's shared experts have the routed "
                              f"width), got {SW}")
        # One gated MLP of width S·F is S experts of width F summed, all scaled by the gate.
        shared = dict(num_shared_experts=SW // F, shared_expert_gate=True) if SW else {}
        return MoESpec(ffn_dim=F, renormalize=bool(config.norm_topk_prob), **shared, **common)
    shared = int(_first(config, "n_shared_experts", default=0) or 0)
    F = int(config.moe_intermediate_size)
    scale = float(_first(config, "routed_scaling_factor", default=1.0))
    if mt in FP32_ROUTER:
        common["router_dtype"] = "float32"
    if mt == "deepseek_v2":
        method = _first(config, "topk_method", default="greedy")
        if method not in TOPK_METHODS:
            raise Unsupported(f"deepseek_v2 topk_method must be one of {list(TOPK_METHODS)}, "
                              f"got {method!r}")
        grouped = dict(n_group=int(config.n_group), topk_group=int(config.topk_group)) \
            if method == "group_limited_greedy" else {}
        return MoESpec(ffn_dim=F, renormalize=False, routed_scaling_factor=scale,
                       num_shared_experts=shared, **grouped, **common)
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
    if spec.activation == "swiglu_clamped":
        return _gpt_oss_weights(sd)
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
    router_dtype = str(kw["router"].dtype).replace("torch.", "")
    if router_dtype not in (str(expert_dtype).replace("torch.", ""), spec.router_dt.name):
        raise Unsupported(f"the block's router is {router_dtype} beside {expert_dtype} experts; "
                          f"spec.router_dtype must be 'float32' for it, got {spec.router_dtype!r}")
    S, F, H = spec.num_shared_experts, spec.ffn_dim, spec.hidden_dim
    if S:
        # One MLP of width S·F is S experts of width F summed (the activation is elementwise).
        # DeepSeek names it shared_experts, Qwen2-MoE shared_expert (gated by shared_expert_gate).
        prefix = "shared_expert." if spec.shared_expert_gate else "shared_experts."
        g, u, d = (sd[f"{prefix}{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
        kw.update(shared_w1=g.reshape(S, F, H), shared_w3=u.reshape(S, F, H),
                  shared_w2=d.reshape(H, S, F).permute(1, 0, 2).contiguous())
    if spec.shared_expert_gate:
        kw["shared_gate"] = sd["shared_expert_gate.weight"].reshape(H)
    elif "shared_expert_gate.weight" in sd:
        raise Unsupported("the block has a shared_expert_gate; spec.shared_expert_gate must be True")
    bias = sd.get("gate.e_score_correction_bias")
    return kw, bias


def _gpt_oss_weights(sd: dict) -> tuple[dict, torch.Tensor]:
    """GPT-OSS's tensors as pack keywords: gate_up_proj [E, H, 2F] holds gate in the even output
    columns and up in the odd ones (x·W + b orientation); down_proj is [E, F, H]."""
    need = ("router.weight", "router.bias", "experts.gate_up_proj", "experts.gate_up_proj_bias",
            "experts.down_proj", "experts.down_proj_bias")
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"a gpt_oss block must hold {list(need)}; missing {missing}")
    gu, gub = sd["experts.gate_up_proj"], sd["experts.gate_up_proj_bias"]
    kw = {"router": sd["router.weight"],
          "w1": gu[:, :, 0::2].transpose(1, 2).contiguous(),
          "w3": gu[:, :, 1::2].transpose(1, 2).contiguous(),
          "w2": sd["experts.down_proj"].transpose(1, 2).contiguous(),
          "b1": gub[:, 0::2].contiguous(), "b3": gub[:, 1::2].contiguous(),
          "b2": sd["experts.down_proj_bias"]}
    return kw, sd["router.bias"]


def _block_config(block, model_type: str):
    """A config-like namespace read off a live block that carries no config (5.x routers hold
    top_k/norm_topk_prob; 4.5x blocks hold them themselves)."""
    gate = getattr(block, "gate", None)
    experts = getattr(block, "experts", None)
    if model_type == "gpt_oss":
        E, H, F2 = experts.gate_up_proj.shape
        return SimpleNamespace(model_type=model_type, num_local_experts=E, hidden_size=H,
                               intermediate_size=F2 // 2, num_experts_per_tok=block.router.top_k,
                               swiglu_alpha=experts.alpha, swiglu_limit=experts.limit,
                               dtype=experts.gate_up_proj.dtype)
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
    shared = sd.get("shared_expert.gate_proj.weight")         # Qwen2-MoE's gated shared expert
    return SimpleNamespace(model_type=model_type, num_experts=E, num_experts_per_tok=top_k,
                           hidden_size=H, intermediate_size=F, moe_intermediate_size=F,
                           shared_expert_intermediate_size=0 if shared is None else shared.shape[0],
                           norm_topk_prob=norm, hidden_act=act, dtype=sd["gate.weight"].dtype)


def from_hf(block, config=None, *, dtype=None, backend: str = "auto"):
    """A `MoEBlock` computing what the transformers MoE ``block`` computes.

    ``block``: a live transformers MoE block, or one block's state dict (keys relative to the
    block) with ``config`` (the model's config).  ``backend="auto"``: the weights' device
    decides (CUDA tensors: cuda, else c), so a CPU model on a GPU machine stays on the CPU.
    Raises `Unsupported` (a ValueError) naming the semantic moegen's kernels lack, before any
    compile.
    """
    if config is None:
        if not isinstance(block, nn.Module):
            raise TypeError("config is required when block is a state dict (pass model.config)")
        mt = BLOCK_CLASSES.get(type(block).__name__)
        if mt is None:
            raise Unsupported(f"block must be one of {sorted(BLOCK_CLASSES)}, got {type(block).__name__}")
        config = getattr(block, "config", None)
        if config is None:
            config = _block_config(block, mt)
    sd = _tensors(block)
    w = sd.get("experts.gate_up_proj", sd.get("experts.0.w1.weight", sd.get("experts.0.gate_proj.weight")))
    if dtype is None:
        dtype = w.dtype if w is not None else None
    if backend == "auto" and w is not None:
        backend = "cuda" if w.is_cuda else "c"
    spec = spec_from_config(config, dtype=dtype, backend=backend)
    router = sd.get("gate.weight", sd.get("router.weight"))
    if router is not None and router.dtype == torch.float32 and spec.dtype != "float32":
        spec = spec.replace(router_dtype="float32")      # the block keeps a float32 router
    kwargs, bias = block_weights(spec, config, block)
    cls = PairMoEBlock if getattr(config, "model_type", None) == "gpt_oss" else MoEBlock
    return cls(spec, kwargs, router_bias=bias)


class PairMoEBlock(MoEBlock):
    """A `MoEBlock` that returns ``(y, None)``: GPT-OSS's decoder layer unpacks its MLP's
    output as (hidden states, router scores) and drops the scores."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return super().forward(x), None


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
