"""The c backend's plan: every constant of one build, made by one pure function.

    plan(spec, target, tuning) -> CPlan --render--> templates/c/moe.c.jinja -> moe.c
                                        --CModule-> exported functions, workspace buffers

A `CPlan` fixes the ISA tier and everything that follows from it (SIMD width, register tile,
conversion path, compiler flags), the blocking of the GEMMs, the routing's work items, the
thread policy, the names of the exported functions and the workspace buffers of a bucket.
Each constant is written once, here or in `moegen.backends.isa`; the template and the loaded
module read it from the plan, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SpecError
from ..layout import PackedLayout
from ..spec import MoESpec
from . import isa

# What `moegen tune` may change, each a tuple of allowed values (the first is the default).
# kc: k per GEMM chunk (a multiple of 32, the pair-dot step); at 512, 3 x 512 activations +
# 4 x 512 weights = 14 KB of fp32, well inside a 32 KB L1.  par_min_work: multiply-adds below
# which a stage stays on the calling thread (waking the team costs more than it saves); it
# depends on the machine's thread start-up cost.
TUNABLES = {"kc": (512, 256, 1024), "par_min_work": (1 << 18, 1 << 16, 1 << 20)}

CACHE_LINE = 64       # bytes: buffers and packed rows start on one, prefetches fetch whole ones
ROUTE_CHUNK = 64      # tokens per route work item: the rows of the stats partial sums
ROUTE_ROWS = 4        # tokens whose router logits are accumulated together
ROW_BLOCK = 96        # token rows whose k chunks stay in L2 (~192 KB): a multiple of every BM
ITEM_COLS = 128       # output columns of one ffn work item, rounded up to whole tiles
WHOLE_K_TILES = 4     # a row block of at most this many row tiles streams k in one go

_ROUTING_NAMES = ("softmax_topk", "topk_softmax", "sigmoid_topk")

# role -> exported C function.  Capacity builds add the two capacity entry points.
_FUNCTIONS = (("route", "moe_route"), ("group", "moe_group"), ("ffn1", "moe_ffn1"),
              ("ffn2", "moe_ffn2"), ("combine", "moe_combine"))
_CAPACITY_FUNCTIONS = (("group_capacity", "moe_group_capacity"),
                       ("combine_kept", "moe_combine_kept"))


@dataclass(frozen=True)
class Buffer:
    """One workspace array of a bucket: its name, shape, NumPy dtype name, and whether it
    starts zeroed (arrays the C code only partly writes) or uninitialised."""
    name: str
    shape: tuple[int, ...]
    dtype: str
    zeroed: bool = True


@dataclass(frozen=True)
class CPlan:
    """Everything the C render and the loaded C module need for one (spec, tier, tuning)."""
    spec: MoESpec
    target: str                  # the ISA tier, a key of `isa.TIERS`
    options: tuple[str, ...]     # the full compiler flag list
    layout: PackedLayout         # where the packed weights live
    lanes: int                   # fp32 lanes of one SIMD register
    bm: int                      # token rows of a register tile
    bn: int                      # weight rows (output columns) of a register tile
    bn1: int                     # h columns of an ffn1 tile (half of bn when gated)
    bk: int                      # k per GEMM chunk
    vreg: str                    # asm constraint that pins a vector to a SIMD register
    widen: str                   # weights to fp32 vectors: "copy", "shift", "f16c", "scalar"
    pair_dot: bool               # bf16 pairs multiplied by vdpbf16ps (avx512-bf16)
    row_block: int
    item_cols1: int              # h columns of one ffn1 work item (whole bn1 tiles)
    item_cols2: int              # y columns of one ffn2 work item (whole bn tiles)
    whole_rows: int              # a row block of at most this many rows is not cut along k
    chunk_sums: bool             # such a block still sums k per BK chunk, as the cut path does
    cache_line: int              # bytes
    route_rows: int
    route_chunk: int
    par_min_work: int
    functions: tuple[tuple[str, str], ...]   # (role, exported name)
    tuning: tuple[tuple[str, object], ...]   # the applied tuning, sorted (name, value) pairs

    @property
    def fn(self) -> dict[str, str]:
        """role -> exported function name."""
        return dict(self.functions)

    @property
    def machine_flags(self) -> str:
        """The options that pick the instruction set (``-march=...``, ``-m...``)."""
        return " ".join(o for o in self.options if o.startswith("-m"))

    @property
    def routing_code(self) -> int:
        return _ROUTING_NAMES.index(self.spec.routing)

    @property
    def router_fp32(self) -> bool:
        """The router is stored in float32 while the experts are bf16/fp16."""
        return self.spec.router_dtype == "float32"

    @property
    def topk_max(self) -> int:
        """The longest top-k list the routing keeps: max(top_k, topk_group)."""
        return max(self.spec.top_k, self.spec.topk_group)

    def chunks(self, kdim: int) -> int:
        """k chunks of a GEMM over ``kdim``."""
        return -(-kdim // self.bk)

    def last_chunk(self, kdim: int) -> int:
        """k of the last (possibly shorter) chunk."""
        return kdim - (self.chunks(kdim) - 1) * self.bk

    def buffers(self, bucket: int) -> tuple[Buffer, ...]:
        """The workspace arrays of a token-count bucket, in the order the stages use them."""
        s = self.spec
        E, K, S, H, F = s.num_experts, s.top_k, s.num_shared_experts, s.hidden_dim, s.ffn_dim
        B = bucket
        out = [Buffer("ids", (B, K), "int32"), Buffer("weights", (B, K), "float32"),
               Buffer("counts", (E,), "int32"), Buffer("offsets", (E + 1,), "int32"),
               Buffer("order", (B * K,), "int32"), Buffer("router_sums", (E + 1,), "float32"),
               Buffer("partials", (-(-B // self.route_chunk), E + 1), "float64"),
               Buffer("xf", (B, H), "float32", False),            # tokens in fp32
               Buffer("h", (B * (K + S), F), "float32", False),   # one row per sorted slot
               Buffer("y", (B * (K + S), H), "float32", False)]   # one row per slot
        if s.capacity_factor is not None:
            out += [Buffer("kept", (B * K,), "uint8"),             # 1 = the slot survived
                    Buffer("dropped", (E,), "int32")]              # per routed expert
            if s.renormalize:
                out.append(Buffer("cap_weights", (B * K,), "float32"))
            if s.capacity_drop == "weight":
                out.append(Buffer("scratch", (B * K * 2,), "int32"))   # (weight, slot) keys
        return tuple(out)

    def describe(self) -> dict:
        """The plan as plain values (for printing); the spec by name."""
        out = {"spec": self.spec.name, "target": self.target, "options": list(self.options),
               "tile": f"{self.bm}x{self.bn} (BM x BN), BK {self.bk}", "lanes": self.lanes,
               "widen": self.widen, "pair_dot": self.pair_dot}
        for name in ("cache_line", "row_block", "item_cols1", "item_cols2", "whole_rows", "chunk_sums", "route_rows",
                     "route_chunk", "par_min_work"):
            out[name] = getattr(self, name)
        out["functions"] = self.fn
        out["tuning"] = dict(self.tuning)
        return out


def layout_for(spec: MoESpec) -> PackedLayout:
    """The packed layout the C GEMMs read: W13 as [G, H] and W2 as [H, F] ("nk"), so a register
    tile streams whole weight rows front to back; gate rows then up rows (no interleave).  The
    router is [H, E]: its per-token GEMM accumulates whole rows of E logits per k instead."""
    return PackedLayout(spec, w13_order="nk", w2_order="nk", gate_up_interleave=0,
                        router_order="he", align_bytes=CACHE_LINE)


def check_tuning(tuning: dict | None) -> dict:
    """The TUNABLES defaults with ``tuning`` applied.  Raises ValueError for a name or value
    that is not allowed."""
    tuned = {name: values[0] for name, values in TUNABLES.items()}
    for name, value in (tuning or {}).items():
        if name not in TUNABLES or value not in TUNABLES[name]:
            raise ValueError(f"c backend tuning {name}={value!r} is not allowed; choices: "
                             f"{ {n: list(v) for n, v in TUNABLES.items()} }")
        tuned[name] = value
    return tuned


def tier_of(target: str) -> isa.Tier:
    """The ISA tier named ``target``; SpecError naming the known tiers otherwise."""
    try:
        return isa.TIERS[target]
    except (KeyError, TypeError):
        raise SpecError(f"c backend target must be one of {sorted(isa.TIERS)}, "
                        f"got {target!r}") from None


def options(tier: isa.Tier) -> tuple[str, ...]:
    """The full flag list.  -ffp-contract=fast only fuses a*b+c into one FMA (ISO C mode turns
    that off); it reorders nothing and keeps NaN semantics, unlike -ffast-math, which would
    delete the NaN checks of the routing."""
    return ("-O3", "-fPIC", "-shared", "-std=c11", "-fopenmp", *tier.flags,
            "-ffp-contract=fast", "-fno-math-errno", "-fvisibility=hidden",
            "-Wall", "-Wno-unused-function")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def make(spec: MoESpec, target: str, tuning: dict | None = None) -> CPlan:
    """The plan of ``spec`` for ISA tier ``target`` with ``tuning`` applied.  Pure: reads no
    environment, file or CPU flag.  Raises SpecError for an unknown tier, ValueError for a
    tuning that is not allowed."""
    tier = tier_of(target)
    tuned = check_tuning(tuning)
    bn1 = tier.ncol // 2 if spec.gated else tier.ncol
    dt = spec.dt.name
    widen = {"float32": "copy", "bfloat16": "shift",
             "float16": "f16c" if "f16c" in tier.needs else "scalar"}[dt]
    functions = _FUNCTIONS + (_CAPACITY_FUNCTIONS if spec.capacity_factor is not None else ())
    return CPlan(
        spec=spec, target=tier.name, options=options(tier), layout=layout_for(spec),
        lanes=tier.vec_floats, bm=tier.mr, bn=tier.ncol, bn1=bn1, bk=tuned["kc"],
        vreg=tier.vreg, widen=widen,
        pair_dot=dt == "bfloat16" and "avx512_bf16" in tier.needs and tier.vec_floats == 16,
        row_block=ROW_BLOCK, item_cols1=_round_up(ITEM_COLS, bn1),
        item_cols2=_round_up(ITEM_COLS, tier.ncol), whole_rows=WHOLE_K_TILES * tier.mr,
        chunk_sums=spec.batch_invariant,
        cache_line=CACHE_LINE, route_rows=ROUTE_ROWS, route_chunk=ROUTE_CHUNK, par_min_work=tuned["par_min_work"],
        functions=functions, tuning=tuple(sorted((tuning or {}).items())))
