"""Device workspaces of the CUDA backend: allocated once per token-count bucket and capacity,
then reused, so a call after the first of its bucket allocates nothing.

A `Workspace` owns flat buffers sized for ``capacity`` tokens; `Workspace.view(tokens)` returns
(and caches) a `WorkspaceView` of contiguous prefix views shaped for exactly ``tokens`` tokens,
plus the launch plan of that token count.  Views are plain CuPy array views: no device memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..spec import MoESpec
from . import cuda_tiles, cuda_tma
from .cuda_plan import CudaPlan

def device_address(a) -> int:
    """The device address of a CuPy array's data."""
    return int(a.data.ptr)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def storage_dtype(spec: MoESpec):
    """The CuPy dtype holding the spec's storage bits (CuPy has no bfloat16: uint16 then)."""
    return np.dtype(np.uint16) if spec.dtype == "bfloat16" else np.dtype(spec.dtype)


@dataclass
class LaunchShapes:
    """Launch shapes of one token count (host-side integers only)."""
    tokens: int
    route_kernel: str          # moe_route_logits_{gemv,tiled,mma}
    route_grid: tuple
    route_block: int
    route_smem: int
    route_splits: int
    route_k_chunk: int
    select_blocks: int
    fused_route_group: bool    # select + group in one launch (moe_route_select_group)
    group_single: bool
    group_units: int
    combine_blocks: int


def launch_shapes(spec: MoESpec, plan: CudaPlan, tokens: int) -> LaunchShapes:
    """Launch shapes for ``tokens`` tokens, from the plan's constants and SM count."""
    E, H = spec.num_experts, spec.hidden_dim
    r, g, sms = plan.route, plan.group, plan.sms
    kt = spec.top_k + spec.num_shared_experts
    if tokens <= r.gemv_max_tokens:
        kernel, block, smem = "moe_route_logits_gemv", r.gemv_threads, 0
        grid, splits, chunk = (E, max(1, _cdiv(tokens, r.gemv_tokens)), 1), 1, H
    else:
        # split-K over H when the token x expert tiles cannot fill the GPU
        step = r.mma_bk if r.tensor_cores else r.tile_k
        tiles = _cdiv(tokens, r.tile_m) * _cdiv(E, r.tile_n)
        want = min(r.max_splits, max(1, _cdiv(2 * sms, tiles)), max(1, H // 256))
        chunk = _cdiv(_cdiv(H, want), step) * step
        splits = _cdiv(H, chunk)
        if r.tensor_cores:
            kernel, block, smem = "moe_route_logits_mma", r.mma_threads, r.mma_smem
        else:
            kernel, block, smem = "moe_route_logits_tiled", r.threads, 0
        grid = (_cdiv(tokens, r.tile_m), _cdiv(E, r.tile_n), splits)
    slots = tokens * kt
    return LaunchShapes(
        tokens=tokens, route_kernel=kernel, route_grid=grid, route_block=block, route_smem=smem,
        route_splits=splits, route_k_chunk=chunk,
        select_blocks=max(1, min(_cdiv(tokens, r.warps), 4 * sms)),
        fused_route_group=0 < tokens <= g.fused_max_tokens and slots <= g.single_max_slots,
        group_single=slots <= g.single_max_slots,
        group_units=_cdiv(slots, g.unit_slots),
        combine_blocks=max(1, _cdiv(tokens * (H // plan.vec_h), plan.combine_threads)))


class WorkspaceView:
    """The workspace as one call of ``tokens`` tokens sees it (see `moegen.backends.base.Module`).

    Arrays (CuPy, contiguous): topk_ids [T, K] int32, topk_weights [T, K] float32, counts [E]
    int32, offsets [E+1] int32, router_sums [E+1] float32, sorted_rows [max_tiles·bm] int32,
    tile_expert / tile_row0 [max_tiles] int32, num_tiles [1] int32, h [max_tiles·bm, F] storage,
    y_slot [ffn2_splits, T·K_TOTAL, H] storage (split stride T·K_TOTAL·H), logits (route scratch),
    group_hist / pad_off (group scratch).  Also ``bucket`` (`cuda_tiles.BucketConfig`),
    ``max_tiles`` and ``shapes`` (`LaunchShapes`).
    Capacity specs only (else None): kept [T·K] uint8 (1 = the slot survived capacity),
    dropped [E] int32 (slots each expert dropped; `LayerStats` sums it), and with renormalize
    cap_weights [T, K] float32 (the kept weights rescaled, read by ffn2).
    Persistent prefill tiles only (else None): sched1 / sched2 (the tile counters of ffn1 and
    ffn2, int32, 0 between launches) and h_map (the TMA tensor map of h, made once).
    ``weight_maps``: True when a persistent tile's launch takes the weights' TMA maps.
    """

    def __init__(self, ws: "Workspace", tokens: int, shapes: LaunchShapes):
        spec, cfg = ws.spec, ws.bucket
        K, E, H, F = spec.top_k, spec.num_experts, spec.hidden_dim, spec.ffn_dim
        kt = K + spec.num_shared_experts
        tiles = cuda_tiles.max_tiles(spec, cfg, tokens)
        self.tokens = tokens
        self.bucket = cfg
        self.shapes = shapes
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
        self.kept = ws.kept[:tokens * K] if ws.kept is not None else None
        self.dropped = ws.dropped
        self.cap_weights = (ws.cap_weights[:tokens * K].reshape(tokens, K)
                            if ws.cap_weights is not None else None)
        self.sched1, self.sched2, self.h_map = ws.sched1, ws.sched2, ws.h_map
        # A persistent tile's launch takes TMA maps encoded from the weights' address, so the
        # recorded launches of this view depend on that address (`CudaModule.enqueue`).
        self.weight_maps = cfg.ffn1.persistent or cfg.ffn2.persistent


class Workspace:
    """Flat device buffers for up to ``capacity`` tokens of one bucket (allocated here, once)."""

    def __init__(self, spec: MoESpec, plan: CudaPlan, bucket, capacity: int):
        import cupy  # optional heavy package: only a cuda module on a GPU allocates
        self.spec, self.plan, self.bucket, self.capacity = spec, plan, bucket, capacity
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
        self.logits = cupy.empty(plan.route.max_splits * capacity * E, f32)
        self.group_hist = cupy.empty(max(1, _cdiv(capacity * kt, plan.group.unit_slots)) * et, i32)
        self.pad_off = cupy.empty(et, i32)
        cap = spec.capacity_factor is not None
        self.kept = cupy.empty(capacity * K, cupy.uint8) if cap else None
        self.dropped = cupy.zeros(E, i32) if cap else None
        self.cap_weights = cupy.empty(capacity * K, f32) if cap and spec.renormalize else None
        # Persistent prefill kernels: their tile counters (zeroed here, reset by every launch)
        # and h's tensor map (h never moves, so it is made once, here).
        self.sched = self.sched1 = self.sched2 = self.h_map = None
        if bucket.ffn1.persistent or bucket.ffn2.persistent:
            c = plan.ws.counters
            self.sched = cupy.zeros(2 * c, i32)
            self.sched1, self.sched2 = self.sched[:c], self.sched[c:]
        if bucket.ffn2.persistent:
            t = bucket.ffn2
            shape = cuda_tma.h_map(spec, sizes["max_tiles"] * bucket.bm, t.bm, t.bk)
            self.h_map = cuda_tma.encode(device_address(self.h), shape)
        self._views: dict[int, WorkspaceView] = {}

    @property
    def nbytes(self) -> int:
        return sum(int(getattr(self, n).nbytes) for n in (
            "topk_ids", "topk_weights", "counts", "offsets", "router_sums", "num_tiles",
            "sorted_rows", "tile_expert", "tile_row0", "h", "y_slot", "logits", "group_hist",
            "pad_off", "kept", "dropped", "cap_weights", "sched")
            if getattr(self, n) is not None)

    def view(self, tokens: int) -> WorkspaceView:
        """The per-call view for ``tokens`` (<= capacity) tokens, cached per token count."""
        v = self._views.get(tokens)
        if v is None:
            if len(self._views) >= 256:      # bound the cache of Python view objects
                self._views.clear()
            v = self._views[tokens] = WorkspaceView(self, tokens, launch_shapes(self.spec, self.plan, tokens))
        return v


def capacity_for(bucket, tokens: int) -> int:
    """Tokens a bucket's workspace is sized for: a bounded bucket's whole range at once (one
    allocation per bucket), the unbounded one the next power of two of ``tokens``."""
    if bucket.max_tokens is not None:
        return next_pow2(max(1, bucket.max_tokens))
    return next_pow2(max(1, tokens))


