"""`MoESpec`: the frozen, validated description of one MoE layer.

Everything that is baked into generated code is a field here (the token count is not: it is a
runtime argument).  Construction validates every field and raises `SpecError` (a ``ValueError``)
naming the field, the allowed range and the value given.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from . import dtypes
from .arch import is_arch as _is_arch
from .errors import SpecError


@dataclass(frozen=True)
class Activation:
    name: str
    gated: bool      # True: act(x·W1) * (x·W3); False: act(x·W1) alone (no W3)
    fn: str          # the scalar function applied to the gate: silu | gelu | relu


ACTIVATIONS: dict[str, Activation] = {
    a.name: a for a in (
        Activation("swiglu", True, "silu"),
        Activation("geglu", True, "gelu"),
        Activation("relu", False, "relu"),
        Activation("gelu", False, "gelu"),
        Activation("silu", False, "silu"),
        # GPT-OSS: gate = min(gate, limit), up = clamp(up, -limit, limit),
        # h = gate·sigmoid(alpha·gate) · (up + 1); alpha and limit are spec fields.
        Activation("swiglu_clamped", True, "silu_clamped"),
    )
}

# softmax_topk: softmax over all E, then top-k (Mixtral, Qwen).
# topk_softmax: top-k of the logits, softmax over those k.
# sigmoid_topk: sigmoid scores, selection biased per expert, grouped selection (DeepSeek-V3).
# Grouped selection (n_group > 1) scores a group by the sum of its two best choices for
# sigmoid_topk (DeepSeek-V3) and by its best softmax score for softmax_topk (DeepSeek-V2's
# group_limited_greedy).
ROUTINGS = ("softmax_topk", "topk_softmax", "sigmoid_topk")
BACKENDS = ("auto", "c", "cuda")
CAPACITY_DROP = ("token", "weight")       # which slots an over-full expert keeps
ROUTER_DTYPES = (None, "float32")         # None: the router is stored in the spec's dtype
SWIGLU_ALPHA = 1.702                      # GPT-OSS's clamped SwiGLU constants (its config's)
SWIGLU_LIMIT = 7.0

_LIMITS = {
    "num_experts": (1, 1024),
    "hidden_dim": (1, 65536),
    "ffn_dim": (1, 131072),
}


@dataclass(frozen=True)
class MoESpec:
    """One MoE layer shape.

    Fields:
        num_experts: E, routed experts (1..1024).
        top_k: k, experts per token (1..min(E, 16)).
        hidden_dim: H, the model width (1..65536).
        ffn_dim: F, each expert's intermediate width (1..131072).
        dtype: storage dtype of activations and weights: float32, bfloat16 or float16.
        activation: swiglu (default), geglu, relu, gelu or silu.
        routing: softmax_topk (default), topk_softmax or sigmoid_topk.
        renormalize: rescale the k routing weights to sum to 1.
        bias: the expert FFNs carry biases b1 (b3) and b2.
        backend: "c", "cuda" or "auto" (cuda when a GPU and CuPy are present, else c).
        arch: CUDA target such as "sm_90"; None detects the current device.
        n_group, topk_group: grouped selection (sigmoid_topk or softmax_topk): keep the best
            ``topk_group`` of ``n_group`` expert groups, then pick top-k inside them.  A group
            scores the sum of its two best choices (sigmoid_topk, DeepSeek-V3) or its best
            softmax score (softmax_topk, DeepSeek-V2's group_limited_greedy).
        routed_scaling_factor: multiplies the final routing weights (DeepSeek-V3: 2.5).
        num_shared_experts: always-on experts added to every token (weight 1).
        capacity_factor: None = dropless; else each expert keeps at most
            ceil(capacity_factor * T * k / E) slots.
        capacity_drop: "token" keeps the lowest token indices, "weight" the largest weights.
        save_activations: training (the c backend's backward, `moegen.backward`): keep the
            gate/up pre-activations from forward time for the backward instead of recomputing
            them there (memory for backward time; docs/PERF.md says what the forward does).
        router_dtype: None stores the router in ``dtype``; "float32" keeps it in float32 while
            the experts are bf16/fp16, as transformers does (router logits from fp32 weights).
        swiglu_alpha, swiglu_limit: the constants of activation="swiglu_clamped" (GPT-OSS:
            1.702 and 7); other activations take only the defaults.
        shared_expert_gate: the shared experts' sum is scaled per token by sigmoid(x·g), g [H]
            (Qwen2-MoE's shared_expert_gate); needs num_shared_experts >= 1 and bias=False.
        batch_invariant: each token's output is bitwise identical whatever the batch around
            it (the token count and the other tokens).  cuda: one GEMM configuration for
            every token count, no split-K.  c: one k-accumulation order for every row count.

    The combine always sums a token's slots in a fixed order (no atomics), so a call is
    deterministic (the same inputs give the same bits); there is no option to trade that away
    (see docs/ARCHITECTURE.md, "Why the combine has no atomic mode").  Without
    ``batch_invariant`` a token's output may change in the last bits with the batch around it:
    the cuda backend picks its GEMM tiles, split-K and router kernel by token count; the c
    backend sums k in one go for an expert with few rows and per k chunk (512) for one with
    more, which differs once H or F exceeds the chunk.
    """

    num_experts: int
    top_k: int
    hidden_dim: int
    ffn_dim: int | None = None
    dtype: str = "float32"
    activation: str = "swiglu"
    routing: str = "softmax_topk"
    renormalize: bool = True
    bias: bool = False
    backend: str = "auto"
    arch: str | None = None
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    num_shared_experts: int = 0
    capacity_factor: float | None = None
    capacity_drop: str = "token"
    save_activations: bool = False
    router_dtype: str | None = None
    swiglu_alpha: float = SWIGLU_ALPHA
    swiglu_limit: float = SWIGLU_LIMIT
    shared_expert_gate: bool = False
    batch_invariant: bool = False

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        for name, (lo, hi) in _LIMITS.items():
            if name == "ffn_dim" and self.ffn_dim is None:
                continue
            _check_int(name, getattr(self, name), lo, hi)
        if self.ffn_dim is None:
            set_("ffn_dim", 4 * self.hidden_dim)
            _check_int("ffn_dim", self.ffn_dim, *_LIMITS["ffn_dim"])
        _check_int("top_k", self.top_k, 1, min(self.num_experts, 16))
        try:
            set_("dtype", dtypes.lookup(self.dtype).name)
        except ValueError as exc:
            raise SpecError(f"MoESpec.dtype: {exc}") from None
        _check_choice("activation", self.activation, tuple(ACTIVATIONS))
        _check_choice("routing", self.routing, ROUTINGS)
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("capacity_drop", self.capacity_drop, CAPACITY_DROP)
        for name in ("renormalize", "bias", "save_activations", "shared_expert_gate",
                     "batch_invariant"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"MoESpec.{name} must be True or False, got {getattr(self, name)!r}")
        if self.arch is not None:
            if not isinstance(self.arch, str) or not _is_arch(self.arch):
                raise SpecError(f"MoESpec.arch must look like 'sm_90' or 'sm_90a' (sm_70 or newer), "
                                f"got {self.arch!r}")
        _check_int("n_group", self.n_group, 1, self.num_experts)
        _check_int("topk_group", self.topk_group, 1, self.n_group)
        if self.num_experts % self.n_group:
            raise SpecError(f"MoESpec.n_group must divide num_experts={self.num_experts}, "
                            f"got {self.n_group}")
        if self.n_group > 1 and self.routing == "topk_softmax":
            raise SpecError(f"MoESpec.n_group > 1 needs routing 'sigmoid_topk' or 'softmax_topk', "
                            f"got routing={self.routing!r}")
        if self.n_group > 1 and self.top_k > self.topk_group * (self.num_experts // self.n_group):
            raise SpecError(f"MoESpec.top_k={self.top_k} exceeds the experts left by topk_group="
                            f"{self.topk_group} groups of {self.num_experts // self.n_group}")
        _check_float("routed_scaling_factor", self.routed_scaling_factor, 0.0, 1e6)
        _check_int("num_shared_experts", self.num_shared_experts, 0, 16)
        if self.capacity_factor is not None:
            _check_float("capacity_factor", self.capacity_factor, 0.0, 1e6)
            set_("capacity_factor", float(self.capacity_factor))
        set_("routed_scaling_factor", float(self.routed_scaling_factor))
        if self.router_dtype not in ROUTER_DTYPES:
            raise SpecError(f"MoESpec.router_dtype must be None (the spec's dtype) or 'float32', "
                            f"got {self.router_dtype!r}")
        if self.router_dtype == self.dtype:
            set_("router_dtype", None)        # one spelling per layer: the storage dtype is None
        if self.shared_expert_gate and (self.num_shared_experts < 1 or self.bias):
            raise SpecError(f"MoESpec.shared_expert_gate=True needs num_shared_experts >= 1 and "
                            f"bias=False, got num_shared_experts={self.num_shared_experts}, "
                            f"bias={self.bias}")
        for name, default in (("swiglu_alpha", SWIGLU_ALPHA), ("swiglu_limit", SWIGLU_LIMIT)):
            _check_float(name, getattr(self, name), 0.0, 1e6)
            set_(name, float(getattr(self, name)))
            if self.activation != "swiglu_clamped" and getattr(self, name) != default:
                raise SpecError(f"MoESpec.{name} applies to activation='swiglu_clamped' only; "
                                f"expected {default} with activation={self.activation!r}, "
                                f"got {getattr(self, name)}")

    # -- derived -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return spec_name(self)

    @property
    def dt(self) -> dtypes.DType:
        return dtypes.DTYPES[self.dtype]

    @property
    def act(self) -> Activation:
        return ACTIVATIONS[self.activation]

    @property
    def router_dt(self) -> dtypes.DType:
        """The router weight's storage dtype."""
        return dtypes.DTYPES[self.router_dtype or self.dtype]

    @property
    def gated(self) -> bool:
        return self.act.gated

    def replace(self, **changes) -> "MoESpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MoESpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"MoESpec got unknown fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def flops(self, tokens: int) -> int:
        """Multiply-add FLOPs of the expert FFNs (2·T·k·(2 or 3)·H·F), router excluded."""
        mats = 3 if self.gated else 2
        slots = self.top_k + self.num_shared_experts
        return 2 * tokens * slots * mats * self.hidden_dim * self.ffn_dim


# Fields listed in the name after the base part, only when they differ from the default, in a
# fixed order; each maps its value to the name fragment.
_NAME_SUFFIXES = (
    ("routing", lambda v: {"topk_softmax": "topksm", "sigmoid_topk": "sigmoid"}.get(v, v)),
    ("renormalize", lambda v: "raw"),
    ("bias", lambda v: "bias"),
    ("n_group", lambda v: f"g{v}"),
    ("topk_group", lambda v: f"tg{v}"),
    ("routed_scaling_factor", lambda v: f"rs{_num(v)}"),
    ("num_shared_experts", lambda v: f"sh{v}"),
    ("capacity_factor", lambda v: f"cap{_num(v)}"),
    ("capacity_drop", lambda v: f"drop{v}"),
    ("save_activations", lambda v: "saveact"),
    ("router_dtype", lambda v: "r32"),
    ("swiglu_alpha", lambda v: f"a{_num(v)}"),
    ("swiglu_limit", lambda v: f"lim{_num(v)}"),
    ("shared_expert_gate", lambda v: "sg"),
    ("batch_invariant", lambda v: "binv"),
)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MoESpec)}


def spec_name(spec: MoESpec) -> str:
    """The readable name of a spec, e.g. ``moe_e8_k2_h512_f2048_bf16_swiglu``.

    Built from the fields in a fixed order; backend and arch are not in the name (they are in
    the cache key and the entry's metadata).
    """
    parts = [f"moe_e{spec.num_experts}_k{spec.top_k}_h{spec.hidden_dim}_f{spec.ffn_dim}",
             spec.dt.short, spec.activation]
    for fname, frag in _NAME_SUFFIXES:
        value = getattr(spec, fname)
        if value != _DEFAULTS[fname]:
            parts.append(frag(value))
    return "_".join(parts)


def _num(v: float) -> str:
    return (f"{v:g}").replace(".", "p").replace("-", "m").replace("+", "")


def _check_int(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"MoESpec.{name} must be an int in [{lo}, {hi}], got {value!r} "
                        f"({type(value).__name__})")
    if not lo <= value <= hi:
        raise SpecError(f"MoESpec.{name} must be in [{lo}, {hi}], got {value}")


def _check_float(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(f"MoESpec.{name} must be a finite number in ({lo}, {hi}], got {value!r}")
    if not lo < value <= hi:
        raise SpecError(f"MoESpec.{name} must be in ({lo}, {hi}], got {value}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise SpecError(f"MoESpec.{name} must be one of {list(choices)}, got {value!r}")
