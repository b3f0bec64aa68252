"""Launch the CUDA expert FFN kernels (templates/cuda/ffn.cu.jinja) on the current stream.

`CudaModule.run_stage` calls `launch_ffn1` / `launch_ffn2` for the "ffn1" / "ffn2" stages.
Neither synchronises nor allocates: the grid is sized by an upper bound of M tiles computed on
the host from T alone, and blocks past the group stage's ``num_tiles`` exit at once.

The persistent prefill kernels (tile kind "wgmma_ws") take a grid of at most the plan's SM
count, read the M tile count on the device and take tiles from a counter in the workspace
(``ws.sched1`` / ``ws.sched2``, left at 0 by every launch); their operands come by TMA through
tensor maps passed by value: the weights' maps made once per packed-buffer address and kept on
the module, the h map made once with the bucket's workspace (``ws.h_map``).

What they read:
    module.spec, module.plan (`CudaPlan`), module.layout, module.function(name) -> cupy.RawKernel
    (or, while `CudaModule.enqueue` records a call, a `cuda_launch.RecordingKernel`)
    ws.bucket (a `cuda_tiles.BucketConfig`), ws.tokens, ws.sorted_rows, ws.tile_expert,
    ws.tile_row0, ws.num_tiles, ws.h, ws.y_slot, ws.topk_weights (and ws.sched1, ws.sched2,
    ws.h_map for persistent tiles)
    call.x [T, H], call.packed.buffer (the packed weights), call.topk_weights (experts-only calls)
"""

from __future__ import annotations

import numpy as np

from . import cuda_tiles, cuda_tma
from .cuda_launch import Slot


def _ptr(a):
    """A kernel argument for a device array: CuPy arrays and recorded pointers
    (`cuda_launch.Slot`) pass as they are, raw pointers (ints, e.g. from torch tensors) as
    64-bit values."""
    if type(a) is Slot:
        return a
    if isinstance(a, (int, np.integer)):
        return np.uint64(a)
    return a


def _address(a) -> int:
    if isinstance(a, (int, np.integer)):
        return int(a)
    return int(a.data.ptr)


def _grid_tiles(spec, cfg, tokens: int) -> int:
    """Upper bound of M tiles for this call: every tile holds at least one real slot, so at
    most T·K_TOTAL, and at most ceil(T·K_TOTAL/bm) + E + shared."""
    slots = tokens * (spec.top_k + spec.num_shared_experts)
    return min(slots, cuda_tiles.max_tiles(spec, cfg, tokens))


def _grid(tile, m_tiles: int, n_tiles: int, splits: int) -> tuple[int, int, int]:
    """Tensor-core kernels (mma, wgmma: one CTA per output tile) take a 1-D grid of M x N tiles,
    rasterised in groups for L2 reuse; SIMT kernels take M tiles on x and N tiles on y.  K splits
    on z."""
    if tile.kind in ("mma", "wgmma"):
        return (m_tiles * n_tiles, 1, splits)
    return (m_tiles, n_tiles, splits)


# Tensor maps of packed weights kept per module: a few buffers at most (an LRU of this size).
WEIGHT_MAPS_KEPT = 8


def weight_maps(module, tile, buffer) -> tuple:
    """(w13 map, w2 map) of the packed buffer at ``buffer`` for ``tile``: encoded on the first
    call for that address and kept on the module (host-only work; no device memory)."""
    cache = module.__dict__.setdefault("_tma_weight_maps", {})
    key = (_address(buffer), tile.bn, tile.bk)
    maps = cache.get(key)
    if maps is None:
        if len(cache) >= WEIGHT_MAPS_KEPT:
            cache.pop(next(iter(cache)))
        shapes = cuda_tma.weight_maps(module.spec, module.layout, tile.bn, tile.bk)
        maps = cache[key] = tuple(cuda_tma.encode(key[0], s) for s in shapes)
    return maps


def _launch_persistent(module, ws, call, stage: int, weights) -> None:
    """One launch of a persistent "wgmma_ws" kernel: grid = min(SMs, an upper bound of tiles)."""
    spec, cfg, tokens = module.spec, ws.bucket, call.tokens
    tile, name = (cfg.ffn1, cfg.ffn1_kernel) if stage == 1 else (cfg.ffn2, cfg.ffn2_kernel)
    n_cols = module.layout.gate_rows if stage == 1 else spec.hidden_dim
    tiles = _grid_tiles(spec, cfg, tokens) * -(-n_cols // tile.bn)
    grid = (max(1, min(module.plan.sms, tiles)), 1, 1)
    smem = tile.smem_bytes(spec.dt.itemsize)
    m13, m2 = weight_maps(module, tile, call.packed.buffer)
    common = (_ptr(call.x), ws.sorted_rows, ws.tile_expert, ws.tile_row0, ws.num_tiles, _ptr(weights))
    if stage == 1:
        args = (m13, m13, *common, ws.h, ws.sched1)
    else:
        args = (ws.h_map, m2, *common, ws.y_slot, ws.sched2)
    _kernel(module, name, smem)(grid, (tile.threads, 1, 1), args, shared_mem=smem)


# Functions whose dynamic shared-memory limit is already raised (held, so ids stay unique).
_RAISED: dict[int, object] = {}


def _kernel(module, name: str, smem: int):
    fn = module.function(name)
    if smem > 48 * 1024 and id(fn) not in _RAISED:
        # Above 48 KB a kernel must opt in to more dynamic shared memory, once per function
        # (one driver call; not repeated per launch).
        if fn.max_dynamic_shared_size_bytes < smem:
            fn.max_dynamic_shared_size_bytes = smem
        _RAISED[id(fn)] = fn
    return fn


def launch_ffn1(module, ws, call) -> None:
    """h[r, :] = act(x[token(r)]·W1ᵀ + b1) (· (x·W3ᵀ + b3)) for every padded row r of the grouped
    layout, in the storage dtype.  Enqueued on the current stream; no sync, no allocation."""
    spec, cfg, tokens = module.spec, ws.bucket, call.tokens
    if tokens == 0:
        return
    align = cuda_tiles.x_alignment(spec)
    if _address(call.x) % align:
        # The tensor-core path copies x rows with 16-byte cp.async; an offset view would fault.
        raise ValueError(f"x must start at a {align}-byte aligned address for {spec.name}, "
                         f"got address {_address(call.x):#x}; pass a fresh contiguous copy")
    tile = cfg.ffn1
    if tile.persistent:
        _launch_persistent(module, ws, call, 1, ws.topk_weights)
        return
    n_cols = spec.ffn_dim if tile.kind == "simt" else module.layout.gate_rows
    grid = _grid(tile, _grid_tiles(spec, cfg, tokens), -(-n_cols // tile.bn), 1)
    smem = tile.smem_bytes(spec.dt.itemsize)
    fn = _kernel(module, cfg.ffn1_kernel, smem)
    fn(grid, (tile.threads, 1, 1),
       (_ptr(call.x), _ptr(call.packed.buffer), ws.sorted_rows, ws.tile_expert, ws.tile_row0,
        ws.num_tiles, ws.h),
       shared_mem=smem)


def launch_ffn2(module, ws, call) -> None:
    """y_slot[z, slot, :] = weight(slot)·(h[r]·W2ᵀ (+ b2 when z == 0)) over the K split z of F,
    for every real row r (slot = sorted_rows[r] >= 0).  y_slot is read as
    [ffn2_splits, T·K_TOTAL, H] for this call's T (split stride T·K_TOTAL·H elements).
    Enqueued on the current stream; no sync, no allocation."""
    spec, cfg, tokens = module.spec, ws.bucket, call.tokens
    if tokens == 0:
        return
    tile = cfg.ffn2
    weights = call.topk_weights if call.topk_weights is not None else ws.topk_weights
    if tile.persistent:
        _launch_persistent(module, ws, call, 2, weights)
        return
    slot_count = tokens * (spec.top_k + spec.num_shared_experts)
    grid = _grid(tile, _grid_tiles(spec, cfg, tokens), -(-spec.hidden_dim // tile.bn), cfg.ffn2_splits)
    smem = tile.smem_bytes(spec.dt.itemsize)
    fn = _kernel(module, cfg.ffn2_kernel, smem)
    fn(grid, (tile.threads, 1, 1),
       (ws.h, _ptr(call.packed.buffer), ws.sorted_rows, ws.tile_expert, ws.tile_row0,
        ws.num_tiles, _ptr(weights), np.int32(slot_count), ws.y_slot),
       shared_mem=smem)
