"""`CudaPlan`: every constant of one CUDA build, written once.

The templates (templates/cuda/*.jinja) render from it (`render_context`), and the loaded
module's launches (`cuda.CudaModule`, `cuda_ffn`) and workspaces (`cuda_workspace`) read it;
nothing copies a value by hand.  `plan` is pure: the multiprocessor count of the GPU is an
input (the device's when one is present, see `CudaBackend.sm_count`; else `ARCH_SMS`).

What it holds: the route, group, capacity and combine launch constants, the token-count buckets
with their GEMM tiles (BM/BN/BK, warps, stages), split-K counts and kernel names
(`cuda_tiles`), the block size of every kernel, the shared memory of the router's tensor-core
GEMM, and every kernel name of the cubin.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..spec import MoESpec
from . import cuda_tiles

# Multiprocessors of each arch's reference GPU, used when no device of the arch is present
# (a build machine without a GPU).  It sizes split-K of the decode/mid ffn2 kernels (baked into
# the cubin) and the route/select grids.  An H100 SXM and an H200 have 132; an H100 PCIe 114.
ARCH_SMS = {"sm_70": 80, "sm_75": 40, "sm_80": 108, "sm_86": 84, "sm_87": 16, "sm_89": 128,
            "sm_90": 132, "sm_90a": 132, "sm_100": 148, "sm_100a": 148, "sm_120": 84}
DEFAULT_SMS = 132
# The arch a cuda spec without one renders for outside a build (`moegen render`, generated/).
RENDER_ARCH = "sm_90"


@dataclass(frozen=True)
class RoutePlan:
    """The route stage: logits (GEMV, tiled SIMT GEMM or tensor-core GEMM), then select."""
    warps: int = 8                  # warps per block of the select kernel
    gemv_threads: int = 256         # block of the GEMV, one per router row (plan: `gemv_threads`)
    gemv_tokens: int = 4            # tokens sharing one pass of the GEMV over a router row
    gemv_max_tokens: int = 16       # the GEMV up to this many tokens, a tiled GEMM above
    tile_m: int = 64                # tokens per tile of the tiled GEMMs
    tile_n: int = 64                # experts per tile
    tile_k: int = 32                # H per shared-memory stage of the SIMT GEMM
    threads: int = 256              # block of the SIMT GEMM (16 x 16 threads, 4 x 4 outputs)
    tensor_cores: bool = False      # router GEMM on mma.sync (fp16/bf16 with 16-byte rows)
    mma_warps_m: int = 2            # the tensor-core router tile: 2 x 2 warps of 32 x 32,
    mma_warps_n: int = 2
    mma_stages: int = 3             # 3 stages of 64-wide k tiles
    mma_bk: int = cuda_tiles.MMA_BK
    max_splits: int = 8             # split-K of the router GEMM (the select sums the partials)

    @property
    def mma_threads(self) -> int:
        return 32 * self.mma_warps_m * self.mma_warps_n

    @property
    def mma_smem(self) -> int:
        """Dynamic shared memory of the tensor-core router GEMM (16-bit elements)."""
        return self.mma_stages * (self.tile_m + self.tile_n) * self.mma_bk * 2


@dataclass(frozen=True)
class GroupPlan:
    """The group stage: one block for few slots, count/scan/scatter above."""
    warps: int                      # warps of the one-block kernels (fit in 48 KB static smem)
    fused_warps: int                # warps of the fused route-select + group kernel (<= 16)
    fused_max_tokens: int = 16      # route + group in one launch up to this many tokens
    single_max_slots: int = 8192    # one block up to this many slots
    unit_slots: int = 512           # slots per unit (one warp) of the multi-block path
    block_units: int = 8            # units (warps) per block of the multi-block path
    scan_threads: int = 1024        # the one-block scan between count and scatter


# 32-bit registers of an sm_90 multiprocessor (and the most one CTA may hold).
SM90_REGISTERS = 65536


@dataclass(frozen=True)
class WsPlan:
    """Constants of the persistent warp-specialised prefill kernel (tile kind "wgmma_ws")."""
    producer_regs: int = 40         # setmaxnreg of the producer warpgroup (TMA and cp.async only)
    consumer_regs: int = 232        # of the wgmma warpgroups (128 x 256 fp32 accumulators)
    fast_epilogue: bool = True      # cvt.rn.*x2 pairs and __expf SiLU (h 1.3e-5 relative off exact)
    counters: int = 2               # int32 per GEMM in the workspace: next tile, CTAs done
    # The tile ring's index written by st.async completing the ring's mbarrier transaction
    # (else a plain shared store, then an arrive; both ordered by the mbarriers).
    async_tile_store: bool = False


@dataclass(frozen=True)
class CudaPlan:
    sms: int                        # multiprocessors the launch shapes and split-K are sized for
    vec_h: int                      # elements per vector access of an H row
    tensor_cores: bool              # ffn GEMMs on mma.sync (fp16/bf16, 16-byte rows)
    wgmma: bool                     # prefill GEMMs on wgmma (sm_90a)
    interleave: int                 # gate/up interleave of the packed w13 (0: none)
    route: RoutePlan
    group: GroupPlan
    buckets: tuple                  # cuda_tiles.BucketConfig, by max_tokens; the last unbounded
    kernels: tuple                  # every extern "C" kernel of the cubin
    ws: WsPlan = WsPlan()
    combine_threads: int = 256
    capacity_threads: int = 256
    count_threads: int = 256        # moe_count_bad_ids


# 48 KB of static shared memory, in 4-byte words: the one-block group kernels keep per-warp
# count rows [warps][E_TOTAL], three [E_TOTAL] arrays and (fused with route) E + 1 sums.
_SMEM_WORDS = 12288


def group_warps(num_experts: int, experts_total: int) -> int:
    """Warps of the one-block group kernels: a power of two <= 32 whose per-warp count rows fit
    in static shared memory beside the per-expert arrays."""
    fit = (_SMEM_WORDS - 3 * experts_total - (num_experts + 1)) // experts_total
    w = 32
    while w > 1 and w > fit:
        w //= 2
    return w


def vec_width(n: int, itemsize: int) -> int:
    """Elements per access: the widest of 16, 8, 4, 2 bytes (or one element) dividing a row of
    n elements, so a vector never straddles two rows."""
    v = 16 // itemsize
    while v > 1 and n % v:
        v //= 2
    return v


def gemv_threads(hidden_vecs: int) -> int:
    """Threads of the router GEMV's block (one router row): about two 16-byte vectors per
    thread, a whole number of warps, 32 to 256."""
    return max(32, min(256, 32 * -(-hidden_vecs // 64)))


def arch_sms(target: str) -> int:
    """The multiprocessor count of ``target``'s reference GPU (`ARCH_SMS`, else DEFAULT_SMS)."""
    return ARCH_SMS.get(target, DEFAULT_SMS)


def tunables(spec: MoESpec, target: str) -> dict[str, tuple]:
    """The GEMM tile of each tensor-core bucket, by tag (the cost model's choice first)."""
    return cuda_tiles.tile_choices(spec, target)


def plan(spec: MoESpec, target: str, tuning: dict, sms: int | None = None) -> CudaPlan:
    """The CudaPlan of ``spec`` for ``target`` on a GPU of ``sms`` multiprocessors (None: the
    arch's reference count).  ``tuning`` picks bucket tiles by tag (`tunables`); anything else
    is a ValueError."""
    sms = int(sms) if sms else arch_sms(target)
    allowed = tunables(spec, target)
    for name, value in tuning.items():
        if name not in allowed or value not in allowed[name]:
            raise ValueError(f"cuda backend tuning {name}={value!r} is not allowed for "
                             f"{spec.name} on {target}; choices: "
                             f"{ {n: list(v) for n, v in allowed.items()} }")
    buckets = tuple(cuda_tiles.bucket_configs(spec, target, sms, tuning))
    et = spec.num_experts + spec.num_shared_experts
    warps = group_warps(spec.num_experts, et)
    mma = cuda_tiles.use_mma(spec)
    # The router GEMM runs on tensor cores only with a 16-bit router (a float32 router beside
    # bf16/fp16 experts, `router_dtype`, goes through the fp32 SIMT kernels).
    route_mma = mma and spec.router_dtype is None
    vec_h = vec_width(spec.hidden_dim, spec.dt.itemsize)
    route = RoutePlan(tensor_cores=route_mma, gemv_threads=gemv_threads(spec.hidden_dim // vec_h))
    if spec.batch_invariant:
        # the router's GEMM (no GEMV below gemv_max_tokens) without split-K for every token
        # count, so a token's logits are summed in one order whatever T is
        route = dataclasses.replace(route, gemv_max_tokens=0, max_splits=1)
    group = GroupPlan(warps=warps, fused_warps=min(16, warps))
    return CudaPlan(sms=sms, vec_h=vec_h,
                    tensor_cores=mma, wgmma=cuda_tiles.use_wgmma(spec, target),
                    interleave=cuda_tiles.interleave(spec), route=route, group=group,
                    buckets=buckets, kernels=_kernel_names(spec, route.tensor_cores, buckets))


def _kernel_names(spec: MoESpec, route_mma: bool, buckets) -> tuple:
    names = ["moe_route_logits_gemv", "moe_route_logits_tiled", "moe_route_select",
             "moe_group_single", "moe_route_select_group", "moe_group_count", "moe_group_scan",
             "moe_group_scatter", "moe_count_bad_ids", "moe_combine"]
    if route_mma:
        names.append("moe_route_logits_mma")
    if spec.capacity_factor is not None:
        names += ["moe_capacity_select", "moe_group_single_masked", "moe_group_count_masked",
                  "moe_group_scatter_masked"]
        if spec.renormalize:
            names.append("moe_capacity_renorm")
    for cfg in buckets:
        names += [cfg.ffn1_kernel, cfg.ffn2_kernel]
    return tuple(dict.fromkeys(names))


def render_context(spec: MoESpec, p: CudaPlan) -> dict:
    """Template variables of templates/cuda/*.jinja, from the spec and the plan only."""
    dt, rdt = spec.dt, spec.router_dt
    return {
        "spec_name": spec.name,
        "num_experts": spec.num_experts,
        "top_k": spec.top_k,
        "num_shared": spec.num_shared_experts,
        "hidden_dim": spec.hidden_dim,
        "ffn_dim": spec.ffn_dim,
        "dtype": dt.name,
        "t_store": dt.cuda_raw,
        "ld_fn": dt.cuda_load,
        "st_fn": dt.cuda_store,
        "routing": spec.routing,
        "renormalize": spec.renormalize,
        "scaling": spec.routed_scaling_factor,
        "n_group": spec.n_group,
        "topk_group": spec.topk_group,
        "capacity": spec.capacity_factor is not None,
        "capacity_drop": spec.capacity_drop,
        "router_t": rdt.cuda_raw,
        "router_ld_fn": rdt.cuda_load,
        "router_dtype": rdt.name,
        "swiglu_alpha": spec.swiglu_alpha,
        "swiglu_limit": spec.swiglu_limit,
        "shared_gate": spec.shared_expert_gate,
        "shared_gate_offset": cuda_tiles.packed_layout(spec).offsets.get("gate", 0),
        "vec_h": p.vec_h,
        "route": p.route,
        "group": p.group,
        "combine_threads": p.combine_threads,
        "combine_splits": sorted({b.ffn2_splits for b in p.buckets}),
        "capacity_threads": p.capacity_threads,
        **_ffn_context(spec, p),
    }


def launch_registers(threads: int) -> int:
    """Registers a thread of a one-CTA-per-SM kernel of ``threads`` threads holds at launch
    (what ptxas gives a kernel with setmaxnreg under __launch_bounds__(threads, 1))."""
    return min(255, SM90_REGISTERS // threads) // 8 * 8


def check_ws_registers(p: CudaPlan) -> None:
    """Refuse a register split of the persistent kernels that their CTA cannot satisfy.

    The CTA holds what its launch gave it (the most per thread for its block: a multiple of 8
    under SM90_REGISTERS / threads); setmaxnreg.inc of the consumers can only take what the
    producers' setmaxnreg.dec gave back, and waits for it forever otherwise (a hang: seen with
    48 / 232 at 384 threads, where the launch gives 168)."""
    for cfg in p.buckets:
        for t in (cfg.ffn1, cfg.ffn2):
            if not t.persistent:
                continue
            producers = cuda_tiles.WS_PRODUCER_THREADS
            consumers = t.threads - producers
            launch = launch_registers(t.threads)
            freed = (launch - p.ws.producer_regs) * producers
            wanted = (p.ws.consumer_regs - launch) * consumers
            if p.ws.producer_regs % 8 or p.ws.consumer_regs % 8 or freed < wanted:
                raise ValueError(
                    f"ws.producer_regs / consumer_regs must be multiples of 8 whose consumers take "
                    f"no more registers than the producers free ({launch} a thread at launch, "
                    f"{t.threads} threads), got {p.ws.producer_regs} / {p.ws.consumer_regs}: "
                    f"{wanted} wanted, {freed} freed")


def _ffn_context(spec: MoESpec, p: CudaPlan) -> dict:
    check_ws_registers(p)
    ctx = cuda_tiles.render_context(spec, p.buckets, p.tensor_cores, p.interleave)
    ctx["ffn"]["ws_plan"] = p.ws
    return ctx
