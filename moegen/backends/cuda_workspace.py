"""Device workspaces of the CUDA backend: allocated once per token-count bucket and capacity,
then reused, so a call after the first of its bucket allocates nothing.

A `Workspace` owns flat buffers sized for ``capacity`` tokens; `Workspace.view(tokens)` returns
(and caches) a `WorkspaceView` of contiguous prefix views shaped for exactly ``tokens`` tokens,
plus the launch plan of that token count.  Views are plain CuPy array views: no device memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..spec import MoESpec
from . import cuda_tiles

# Route: GEMV for up to this many tokens, the tiled GEMM (with split-K over H) above.
GEMV_MAX_TOKENS = 16
GEMV_TOKENS = 4            # = GEMV_TOKENS in route.cu.jinja
ROUTE_WARPS = 8            # = ROUTE_WARPS
RT_TM = RT_TN = 64         # = RT_TM, RT_TN
RT_TK = 32                 # = RT_TK
RT_THREADS_DEFAULT = 256   # = RT_THREADS
ROUTE_MMA_THREADS = 128    # = RouteTile::kThreads (route_mma.cu.jinja)
ROUTE_MMA_SMEM = 3 * (RT_TM + RT_TN) * 128    # = RouteTile::kSmem: 3 stages of 64-wide k tiles
ROUTE_MMA_BK = 64          # = RouteTile::kBK
ROUTE_MAX_SPLITS = 8       # split-K of the router GEMM (partials summed by the select kernel)
ROUTER_TENSOR_CORES = True # router GEMM on mma.sync when the cubin has the main loop (fp16/bf16)
# Route + group in one single-block launch up to this many tokens (0 disables the fusion).
FUSED_MAX_TOKENS = 16       # ~1 token per warp of the fused block
# Group: one block up to this many slots, the three-launch path above.
GROUP_SINGLE_MAX_SLOTS = 8192
GROUP_UNIT_SLOTS = 512     # = GROUP_UNIT_SLOTS
GROUP_BLOCK_UNITS = 8      # = GROUP_BLOCK_UNITS
COMBINE_THREADS = 256      # = COMBINE_THREADS
CAP_THREADS = 256          # = CAP_THREADS (capacity.cu.jinja)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def storage_dtype(spec: MoESpec):
    """The CuPy dtype holding the spec's storage bits (CuPy has no bfloat16: uint16 then)."""
    import numpy as np
    return np.dtype(np.uint16) if spec.dtype == "bfloat16" else np.dtype(spec.dtype)


def vec_width(n: int, itemsize: int) -> int:
    """Elements per access: the widest of 16, 8, 4, 2 bytes (or one element) dividing a row of
    n elements, so a vector never straddles two rows."""
    v = 16 // itemsize
    while v > 1 and n % v:
        v //= 2
    return v


@dataclass
class Plan:
    """Launch shapes of one token count (host-side integers only)."""
    tokens: int
    route_kernel: str          # moe_route_logits_{gemv,tiled,mma}
    route_grid: tuple
    route_splits: int
    route_k_chunk: int
    select_blocks: int
    fused_route_group: bool    # select + group in one launch (moe_route_select_group)
    group_single: bool
    group_units: int
    combine_blocks: int


def make_plan(spec: MoESpec, tokens: int, sms: int) -> Plan:
    """Launch shapes for ``tokens`` tokens on a GPU of ``sms`` multiprocessors."""
    E, H = spec.num_experts, spec.hidden_dim
    kt = spec.top_k + spec.num_shared_experts
    vec = vec_width(H, spec.dt.itemsize)
    if tokens <= GEMV_MAX_TOKENS:
        kernel, grid, splits, chunk = "moe_route_logits_gemv", (_cdiv(E, ROUTE_WARPS), max(1, _cdiv(tokens, GEMV_TOKENS)), 1), 1, H
    else:
        # tensor cores when the expert GEMMs have their main loop in the cubin (fp16/bf16,
        # 16-byte rows); split-K over H when the token x expert tiles cannot fill the GPU
        mma = ROUTER_TENSOR_CORES and cuda_tiles.use_mma(spec)
        step = ROUTE_MMA_BK if mma else RT_TK
        tiles = _cdiv(tokens, RT_TM) * _cdiv(E, RT_TN)
        want = min(ROUTE_MAX_SPLITS, max(1, _cdiv(2 * sms, tiles)), max(1, H // 256))
        chunk = _cdiv(_cdiv(H, want), step) * step
        splits = _cdiv(H, chunk)
        kernel = "moe_route_logits_mma" if mma else "moe_route_logits_tiled"
        grid = (_cdiv(tokens, RT_TM), _cdiv(E, RT_TN), splits)
    slots = tokens * kt
    return Plan(tokens=tokens, route_kernel=kernel, route_grid=grid, route_splits=splits,
                route_k_chunk=chunk,
                select_blocks=max(1, min(_cdiv(tokens, ROUTE_WARPS), 4 * sms)),
                fused_route_group=0 < tokens <= FUSED_MAX_TOKENS and slots <= GROUP_SINGLE_MAX_SLOTS,
                group_single=slots <= GROUP_SINGLE_MAX_SLOTS,
                group_units=_cdiv(slots, GROUP_UNIT_SLOTS),
                combine_blocks=max(1, _cdiv(tokens * (H // vec), COMBINE_THREADS)))


class WorkspaceView:
    """The workspace as one call of ``tokens`` tokens sees it (see `moegen.backends.base.Module`).

    Arrays (CuPy, contiguous): topk_ids [T, K] int32, topk_weights [T, K] float32, counts [E]
    int32, offsets [E+1] int32, router_sums [E+1] float32, sorted_rows [max_tiles·bm] int32,
    tile_expert / tile_row0 [max_tiles] int32, num_tiles [1] int32, h [max_tiles·bm, F] storage,
    y_slot [ffn2_splits, T·K_TOTAL, H] storage (split stride T·K_TOTAL·H), logits (route scratch),
    group_hist / pad_off (group scratch).  Also ``bucket`` (`cuda_tiles.BucketConfig`),
    ``max_tiles`` and ``plan``.
    Capacity specs only (else None): kept [T·K] uint8 (1 = the slot survived capacity),
    dropped [E] int32 (slots each expert dropped; `LayerStats` sums it), and with renormalize
    cap_weights [T, K] float32 (the kept weights rescaled, read by ffn2).
    """

    def __init__(self, ws: "Workspace", tokens: int, plan: Plan):
        spec, cfg = ws.spec, ws.bucket
        K, E, H, F = spec.top_k, spec.num_experts, spec.hidden_dim, spec.ffn_dim
        kt = K + spec.num_shared_experts
        tiles = cuda_tiles.max_tiles(spec, cfg, tokens)
        self.tokens = tokens
        self.bucket = cfg
        self.plan = plan
        self.max_tiles = tiles
        self.topk_ids = ws.topk_ids[:tokens * K].reshape(tokens, K)
        self.topk_weights = ws.topk_weights[:tokens * K].reshape(tokens, K)
        self.counts = ws.counts
        self.offsets = ws.offsets
        self.router_sums = ws.router_sums
        self.num_tiles = ws.num_tiles
        self.sorted_rows = ws.sorted_rows[:tiles * cfg.bm]
        self.tile_expert = ws.tile_expert[:tiles]
        self.tile_row0 = ws.tile_row0[:tiles]
        self.h = ws.h[:tiles * cfg.bm * F].reshape(tiles * cfg.bm, F)
        self.y_slot = ws.y_slot[:cfg.ffn2_splits * tokens * kt * H].reshape(cfg.ffn2_splits, tokens * kt, H)
        self.logits = ws.logits
        self.group_hist = ws.group_hist
        self.pad_off = ws.pad_off
        self.bad_ids = ws.bad_ids
        self.kept = ws.kept[:tokens * K] if ws.kept is not None else None
        self.dropped = ws.dropped
        self.cap_weights = (ws.cap_weights[:tokens * K].reshape(tokens, K)
                            if ws.cap_weights is not None else None)


class Workspace:
    """Flat device buffers for up to ``capacity`` tokens of one bucket (allocated here, once)."""

    def __init__(self, spec: MoESpec, bucket, capacity: int, sms: int):
        import cupy
        self.spec, self.bucket, self.capacity, self.sms = spec, bucket, capacity, sms
        K, E = spec.top_k, spec.num_experts
        kt = K + spec.num_shared_experts
        et = E + spec.num_shared_experts
        sizes = cuda_tiles.workspace_sizes(spec, bucket, capacity)
        i32, f32 = cupy.int32, cupy.float32
        store = storage_dtype(spec)
        self.topk_ids = cupy.empty(capacity * K, i32)
        self.topk_weights = cupy.empty(capacity * K, f32)
        self.counts = cupy.zeros(E, i32)
        self.offsets = cupy.zeros(E + 1, i32)
        self.router_sums = cupy.zeros(E + 1, f32)
        self.num_tiles = cupy.zeros(1, i32)
        self.sorted_rows = cupy.empty(sizes["max_tiles"] * bucket.bm, i32)
        self.tile_expert = cupy.empty(sizes["max_tiles"], i32)
        self.tile_row0 = cupy.empty(sizes["max_tiles"], i32)
        self.h = cupy.empty(sizes["h"], store)
        self.y_slot = cupy.empty(sizes["y_slot"], f32 if spec.dtype == "float32" else store)
        self.logits = cupy.empty(ROUTE_MAX_SPLITS * capacity * E, f32)
        self.group_hist = cupy.empty(max(1, _cdiv(capacity * kt, GROUP_UNIT_SLOTS)) * et, i32)
        self.pad_off = cupy.empty(et, i32)
        self.bad_ids = cupy.zeros(1, i32)
        cap = spec.capacity_factor is not None
        self.kept = cupy.empty(capacity * K, cupy.uint8) if cap else None
        self.dropped = cupy.zeros(E, i32) if cap else None
        self.cap_weights = cupy.empty(capacity * K, f32) if cap and spec.renormalize else None
        self._views: dict[int, WorkspaceView] = {}

    @property
    def nbytes(self) -> int:
        return sum(int(getattr(self, n).nbytes) for n in (
            "topk_ids", "topk_weights", "counts", "offsets", "router_sums", "num_tiles",
            "sorted_rows", "tile_expert", "tile_row0", "h", "y_slot", "logits", "group_hist",
            "pad_off", "bad_ids", "kept", "dropped", "cap_weights")
            if getattr(self, n) is not None)

    def view(self, tokens: int) -> WorkspaceView:
        """The per-call view for ``tokens`` (<= capacity) tokens, cached per token count."""
        v = self._views.get(tokens)
        if v is None:
            if len(self._views) >= 256:      # bound the cache of Python view objects
                self._views.clear()
            v = self._views[tokens] = WorkspaceView(self, tokens, make_plan(self.spec, tokens, self.sms))
        return v


def capacity_for(bucket, tokens: int) -> int:
    """Tokens a bucket's workspace is sized for: a bounded bucket's whole range at once (one
    allocation per bucket), the unbounded one the next power of two of ``tokens``."""
    if bucket.max_tokens is not None:
        return next_pow2(max(1, bucket.max_tokens))
    return next_pow2(max(1, tokens))


