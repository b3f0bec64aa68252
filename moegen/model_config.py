"""Read the MoE layer shape out of a Hugging Face ``config.json`` (re-exported by `moegen.deploy`).

Supported families (``model_type``) and the fields read (experts, k, expert ffn size; routing):

- mixtral: num_local_experts, num_experts_per_tok, intermediate_size; softmax, renormalised.
- qwen2_moe, qwen3_moe: num_experts (num_local_experts as transformers 5 writes Qwen3-MoE),
  num_experts_per_tok, moe_intermediate_size; softmax, renormalised if norm_topk_prob;
  Qwen2-MoE's shared_expert_intermediate_size (a multiple of the routed width) as that many
  shared experts under the sigmoid shared_expert_gate.
- deepseek_v2, deepseek_v3: n_routed_experts, num_experts_per_tok, moe_intermediate_size;
  scoring_func, topk_method (greedy; group_limited_greedy: softmax scores with grouped
  selection, n_group, topk_group), routed_scaling_factor, norm_topk_prob, and n_shared_experts
  shared experts.  DeepSeek keeps its router in float32, and so does the spec (router_dtype),
  on every backend.
- olmoe: num_experts (or num_local_experts), num_experts_per_tok, intermediate_size; softmax,
  norm_topk_prob.
- gpt_oss: num_local_experts, experts_per_token, intermediate_size; top-k of the logits then
  softmax over them; expert biases; the clamped SwiGLU (swiglu_alpha, swiglu_limit).

The hidden size is ``hidden_size``; the activation comes from ``hidden_act`` (all of these use
gated MLPs: silu -> swiglu, gelu -> geglu); the dtype from ``torch_dtype`` or ``dtype`` (as
transformers 5 writes it; ``"torch.bfloat16"`` is read too), bfloat16 when the config has none.
Multimodal configs are searched through ``text_config``.  When ``model_type`` is missing or
unknown, ``architectures`` (e.g. ``DeepseekV3ForCausalLM``) picks the family.

What moegen cannot express is refused with ValueError; what the generated layer leaves out on
purpose is warned about (a training-time ``router_jitter_noise``: moegen computes the
noise-free routing that transformers uses in eval mode).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

from .spec import SWIGLU_ALPHA, SWIGLU_LIMIT, MoESpec

log = logging.getLogger("moegen.deploy")

# A config.json is a few KiB; a larger file is not one (and is not read whole).
MAX_CONFIG_BYTES = 4 << 20

_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
           "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}
_GATED = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "gelu_new": "geglu",
          "gelu_pytorch_tanh": "geglu", "gelu_fast": "geglu"}
_ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe", "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3", "OlmoeForCausalLM": "olmoe",
    "GptOssForCausalLM": "gpt_oss",
}


class ModelConfigWarning(UserWarning):
    """Part of a model's MoE block is not covered by the generated kernel."""


def _warn(message: str) -> None:
    log.warning("%s", message)
    warnings.warn(message, ModelConfigWarning, stacklevel=4)


def parse_model_config(path_or_dict: str | Path | dict, *, dtype: str | None = None,
                       backend: str = "auto") -> list[dict]:
    """MoESpec keyword arguments for the MoE layers of a Hugging Face model config.

    Args:
        path_or_dict: a ``config.json`` path, a directory holding one, or the parsed dict.
        dtype: storage dtype to use instead of the config's ``torch_dtype``.
        backend: the ``backend`` field of the result ("auto", "c" or "cuda").

    Returns one dict per distinct MoE layer shape (one for every supported family), each
    accepted by ``MoESpec(**kwargs)``.

    Raises ValueError naming the missing field, the unsupported combination, or the unknown
    architecture (with the supported list); OSError when the file cannot be read.
    """
    config = _load(path_or_dict)
    family, cfg = _family(config)
    fields = _PARSERS[family](cfg)
    dt = dtype or cfg.get("torch_dtype") or cfg.get("dtype") or config.get("torch_dtype") \
        or config.get("dtype") or "bfloat16"
    dt = str(dt).removeprefix("torch.")
    if dt not in _DTYPES:
        raise ValueError(f"model config: torch_dtype {dt!r} is not a moegen dtype "
                         f"(one of {sorted(set(_DTYPES.values()))})")
    fields.update(dtype=_DTYPES[dt], backend=backend)
    if family in _FP32_ROUTER and fields["dtype"] != "float32":
        fields["router_dtype"] = "float32"
    jitter = cfg.get("router_jitter_noise") or 0
    if isinstance(jitter, (int, float)) and jitter > 0:
        _warn(f"model config ({family}): router_jitter_noise={jitter} perturbs the router only "
              f"while training; the generated layer computes the noise-free routing (eval mode)")
    try:
        MoESpec(**fields)
    except ValueError as exc:
        raise ValueError(f"model config ({family}) gives a spec moegen rejects: {exc}") from None
    return [fields]


def _load(path_or_dict) -> dict:
    if isinstance(path_or_dict, dict):
        return path_or_dict
    path = Path(path_or_dict)
    if path.is_dir():
        path = path / "config.json"
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"model config {path} must be at most {MAX_CONFIG_BYTES} bytes, "
                         f"got {size}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"model config {path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"model config {path} nests JSON too deeply to be a model "
                         f"config") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"model config {path} is not UTF-8 text: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"model config {path} must hold a JSON object, got {type(data).__name__}")
    return data


def _family(config: dict) -> tuple[str, dict]:
    for cfg in (config, config.get("text_config")):
        if not isinstance(cfg, dict):
            continue
        mt = cfg.get("model_type")
        if mt in _PARSERS:
            return mt, cfg
        for arch in cfg.get("architectures") or ():
            if arch in _ARCHITECTURES:
                return _ARCHITECTURES[arch], cfg
    mt = config.get("model_type") or "?"
    archs = config.get("architectures") or []
    raise ValueError(f"model config: unsupported architecture (model_type={mt!r}, "
                     f"architectures={archs}); moegen reads MoE configs of "
                     f"{', '.join(sorted(_PARSERS))}. Describe the layer with spec options "
                     f"instead (moegen build --experts E --topk K --hidden H --ffn F).")


def _req(cfg: dict, *names: str) -> Any:
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    raise ValueError(f"model config ({cfg.get('model_type', '?')}): missing field "
                     f"{' or '.join(map(repr, names))}")


def _int(cfg: dict, *names: str) -> int:
    v = _req(cfg, *names)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"model config: {names[0]} must be an integer, got {v!r}")
    return v


def _activation(cfg: dict) -> str:
    act = cfg.get("hidden_act") or cfg.get("activation") or "silu"
    if act not in _GATED:
        raise ValueError(f"model config: hidden_act {act!r} has no moegen equivalent "
                         f"(supported: {sorted(_GATED)})")
    return _GATED[act]


def _base(cfg: dict, experts: tuple, topk: tuple, ffn: tuple) -> dict:
    return dict(num_experts=_int(cfg, *experts), top_k=_int(cfg, *topk),
                hidden_dim=_int(cfg, "hidden_size"), ffn_dim=_int(cfg, *ffn),
                activation=_activation(cfg))


def _mixtral(cfg: dict) -> dict:
    # Mixtral: softmax over all experts, top-k, then the k weights renormalised.
    f = _base(cfg, ("num_local_experts", "num_experts"), ("num_experts_per_tok",),
              ("intermediate_size",))
    return dict(f, routing="softmax_topk", renormalize=True)


def _qwen_moe(cfg: dict) -> dict:
    f = _base(cfg, ("num_experts", "num_local_experts"), ("num_experts_per_tok",),
              ("moe_intermediate_size",))
    f.update(routing="softmax_topk", renormalize=bool(cfg.get("norm_topk_prob", False)))
    shared = cfg.get("shared_expert_intermediate_size") or 0
    if shared:
        # Qwen2-MoE scales its shared expert by sigmoid(x · w_gate): a gated MLP of width S·F is
        # S shared experts of the routed width F, all under that gate.
        if shared % f["ffn_dim"]:
            raise ValueError(f"model config ({cfg.get('model_type')}): shared_expert_intermediate_size "
                             f"must be a multiple of moe_intermediate_size={f['ffn_dim']} (moegen's "
                             f"shared experts have the routed width), got {shared}")
        f.update(num_shared_experts=shared // f["ffn_dim"], shared_expert_gate=True)
    return f


def _deepseek(cfg: dict) -> dict:
    v3 = cfg.get("model_type") == "deepseek_v3" or "DeepseekV3ForCausalLM" in \
        (cfg.get("architectures") or ())
    f = _base(cfg, ("n_routed_experts",), ("num_experts_per_tok",), ("moe_intermediate_size",))
    scoring = cfg.get("scoring_func") or ("sigmoid" if v3 else "softmax")
    method = cfg.get("topk_method") or ("noaux_tc" if v3 else "greedy")
    n_group = int(cfg.get("n_group") or 1)
    topk_group = int(cfg.get("topk_group") or 1)
    if scoring == "sigmoid":
        f.update(routing="sigmoid_topk", n_group=n_group, topk_group=min(topk_group, n_group))
        if method != "noaux_tc":
            log.info("DeepSeek topk_method %r with sigmoid scores is built as grouped "
                     "sigmoid_topk (noaux_tc)", method)
    elif scoring == "softmax":
        f.update(routing="softmax_topk")
        if method == "group_limited_greedy" and n_group > 1:
            # DeepSeek-V2: a group scores its best softmax score
            f.update(n_group=n_group, topk_group=min(topk_group, n_group))
    else:
        raise ValueError(f"model config (deepseek): scoring_func {scoring!r} is not supported "
                         f"(softmax or sigmoid)")
    f.update(renormalize=bool(cfg.get("norm_topk_prob", v3)),
             routed_scaling_factor=float(cfg.get("routed_scaling_factor") or (2.5 if v3 else 1.0)),
             # DeepSeek's shared MLP has intermediate size n_shared·F: exactly n_shared experts
             # of width F added with weight 1.
             num_shared_experts=int(cfg.get("n_shared_experts") or 0))
    return f


def _olmoe(cfg: dict) -> dict:
    f = _base(cfg, ("num_experts", "num_local_experts"), ("num_experts_per_tok",),
              ("intermediate_size",))
    return dict(f, routing="softmax_topk", renormalize=bool(cfg.get("norm_topk_prob", False)))


def _gpt_oss(cfg: dict) -> dict:
    f = _base(cfg, ("num_local_experts",), ("experts_per_token", "num_experts_per_tok"),
              ("intermediate_size",))
    # gpt-oss: top-k of the router logits (router has a bias), softmax over those k; experts
    # carry biases; SwiGLU with the gate clamped above, up clamped both ways, (up + 1)·glu.
    f.update(activation="swiglu_clamped", routing="topk_softmax", renormalize=True, bias=True,
             swiglu_alpha=float(cfg.get("swiglu_alpha") or SWIGLU_ALPHA),
             swiglu_limit=float(cfg.get("swiglu_limit") or SWIGLU_LIMIT))
    return f


_FP32_ROUTER = ("deepseek_v2", "deepseek_v3")   # transformers keeps their gate.weight float32
_PARSERS = {"mixtral": _mixtral, "qwen2_moe": _qwen_moe, "qwen3_moe": _qwen_moe,
            "deepseek_v2": _deepseek, "deepseek_v3": _deepseek, "olmoe": _olmoe,
            "gpt_oss": _gpt_oss}
