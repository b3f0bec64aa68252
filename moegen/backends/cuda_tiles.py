"""Token-count buckets and GEMM tile configurations of the CUDA expert FFNs.

The group stage pads every expert's segment of the sorted slot list to a multiple of the GEMM
tile height ``bm`` (in index space only), so ``bm`` is fixed per token-count bucket and every
GEMM of that bucket uses it.  Each bucket names one ffn1 and one ffn2 kernel; all of them are
instantiated in the spec's one cubin, so one compile covers every T.

Why these tiles (H100 and H200, 132 SMs):

* ``bm16`` (decode: at most ~8 rows per expert on average).  The GEMMs are weight-bandwidth
  bound: every touched expert's weights must stream once at copy bandwidth.  A 16-row tile wastes
  no weight traffic, 64-column N tiles and (for ffn2, where N = H is small) split-K give several
  CTAs per SM, and 128-wide k tiles (two swizzled panels) make each weight row's reads 256
  contiguous bytes per stage: 3 stages, 3 CTAs per SM (H200: Mixtral T=8 GEMMs 0.700 -> 0.651 ms,
  DeepSeek-V3 T=64 4.54 -> 4.34 ms against 64-wide k tiles; docs/PERF.md).
* ``bm32`` (8 to 24 rows per expert on average: Mixtral T=64, DeepSeek-V3 T=512).  A 64-row
  tile there does 2-4x padded MMA work for the same weight bytes; 32x128 tiles, 4 warps,
  128-wide k, 2 stages (H200: Mixtral T=64 GEMMs 0.700 -> 0.680 ms, DeepSeek-V3 T=512
  5.51 -> 5.34 ms against the bm64 tile below).
* ``bm64`` (mid: up to ~48 rows per expert).  Weights are still read about once per expert
  (one or two M tiles), now with 64x128 tiles, 8 warps and 128-wide k tiles in 2 stages, 2 CTAs
  per SM (H200: Mixtral T=64 0.747 -> 0.700 ms, DeepSeek-V3 T=512 5.71 -> 5.51 ms, when those
  points were still in this bucket).
* ``bm128`` (prefill): tensor-core bound.  On sm_90a: wgmma m64n256k16 (524 TFLOP/s on H100 at
  Mixtral T=16384), two warpgroups of
  64x256, 4 stages of 48 KB.  On plain sm_90 (no wgmma): mma.sync 128x256 tiles, 8 warps of
  64x64, 4 stages (measured 388 TFLOP/s on H100 at Mixtral T=16384, vs 330 for 128x128).
  On sm_90a where it applies (`use_ws`) the default is the persistent warp-specialised kernel
  (`WS_TILES`: one CTA per SM, TMA producer warpgroup, dynamic tile scheduler), 4-18% faster in
  ffn1 + ffn2 alone on an H200 (benchmarks/results/prefill_gemm_notes.md); the wgmma tile stays
  a tuning choice.
* Every tensor-core grid is rasterised in groups of 8 M tiles so a wave of CTAs reuses A and B
  tiles in L2 (M-fastest order re-streamed every gathered x tile once per N tile).

fp32 specs, and fp16/bf16 specs whose H or F is not a multiple of 8 (16-byte rows), use the
SIMT kernel (FFMA, no TF32) with scalar loads: correct for every shape, not tuned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..layout import PackedLayout
from ..spec import MoESpec

# CUDA device-function names of the activations (defined in templates/cuda/ffn.cu.jinja).
ACT_FUNCTIONS = {"silu": "act_silu", "gelu": "act_gelu", "relu": "act_relu",
                 "silu_clamped": "act_silu_clamped"}
# The fast epilogue's variants (__expf, __fdividef), where one exists; the others use the exact
# function.  The persistent prefill kernel uses them (h within 1.3e-5 relative of the exact).
ACT_FAST_FUNCTIONS = {"silu": "act_silu_fast"}

# Gate/up interleave of the packed w13 for the tensor-core path: one mma n8 fragment of gate
# columns followed by the n8 fragment of the matching up columns, so each thread holds a gate
# value and its up value in registers and the SwiGLU epilogue needs no shuffle.
MMA_INTERLEAVE = 8
MMA_BK = 64          # one 128-byte swizzled smem row of 16-bit elements
SIMT_BK = 16
SIMT_THREADS = 256
# The persistent warp-specialised kernel ("wgmma_ws"): one producer warpgroup (TMA for B and
# the contiguous A, cp.async for the gathered A) beside the consumer warpgroups of the tile.
WS_PRODUCER_THREADS = 128
# Bytes after the stages in its shared memory: a full and an empty mbarrier per stage (16 *
# stages), then the tile ring's 2 full + 2 empty mbarriers and 2 int slots (48).
WS_RING_BYTES = 48


@dataclass(frozen=True)
class GemmTile:
    """One GEMM kernel shape.  ``kind`` is "mma" (mma.sync), "wgmma" (one CTA per tile,
    sm_90a), "wgmma_ws" (persistent, warp-specialised: one CTA per SM walks the tiles, a TMA
    producer warpgroup feeds the wgmma warpgroups, sm_90a) or "simt" (FFMA).  ``group_m``: M
    tiles per raster group (L2 reuse)."""
    kind: str
    bm: int
    bn: int
    bk: int
    warps_m: int
    warps_n: int
    stages: int
    min_blocks: int = 1      # __launch_bounds__ residency hint (also caps registers)
    group_m: int = 8

    @property
    def threads(self) -> int:
        if self.kind == "simt":
            return SIMT_THREADS
        consumers = 32 * self.warps_m * self.warps_n
        return consumers + WS_PRODUCER_THREADS if self.kind == "wgmma_ws" else consumers

    @property
    def persistent(self) -> bool:
        """One CTA per SM walking the tiles (grid = the plan's SM count)."""
        return self.kind == "wgmma_ws"

    def smem_bytes(self, itemsize: int) -> int:
        """Dynamic shared memory of the kernel (mma: the pipeline stages; wgmma: the stages plus
        1 KB to align them to the 1024-byte swizzle atom; simt: static only)."""
        if self.kind == "mma":
            return self.stages * (self.bm + self.bn) * self.bk * itemsize
        if self.kind == "wgmma":
            return self.stages * (self.bm + self.bn) * self.bk * itemsize + 1024
        if self.kind == "wgmma_ws":
            return (1024 + self.stages * (self.bm + self.bn) * self.bk * itemsize
                    + 16 * self.stages + WS_RING_BYTES)
        return 0

    @property
    def tag(self) -> str:
        tag = f"{self.kind}_bm{self.bm}_bn{self.bn}_bk{self.bk}_w{self.warps_m}x{self.warps_n}_s{self.stages}"
        return tag + (f"_g{self.group_m}" if self.group_m != 8 else "")


@dataclass(frozen=True)
class BucketConfig:
    """The kernels and tiles used for token counts up to ``max_tokens`` (None: unbounded).

    ``bm`` is the GEMM tile height and the group stage's segment padding.  ``ffn1``/``ffn2``
    are the tile shapes; ``ffn1_kernel``/``ffn2_kernel`` the extern "C" names in the cubin.
    ``ffn2_splits``: split-K count of ffn2 (the combine stage sums the splits in order).
    """
    name: str
    max_tokens: int | None
    bm: int
    ffn1: GemmTile
    ffn2: GemmTile
    ffn2_splits: int
    ffn1_kernel: str
    ffn2_kernel: str

    def accepts(self, tokens: int) -> bool:
        return self.max_tokens is None or tokens <= self.max_tokens


def use_mma(spec: MoESpec) -> bool:
    """Tensor cores for fp16/bf16 when every row is a whole number of 16-byte chunks."""
    return bool(spec.dt.cuda_mma) and spec.hidden_dim % 8 == 0 and spec.ffn_dim % 8 == 0


def use_wgmma(spec: MoESpec, target: str | None = None) -> bool:
    """Hopper warpgroup MMA for the prefill bucket: needs the sm_90a target (``target``, else
    ``spec.arch``; wgmma is not in plain sm_90) and the tensor-core path."""
    return use_mma(spec) and (target or spec.arch) == "sm_90a"


def use_ws(spec: MoESpec, target: str | None = None) -> bool:
    """The persistent warp-specialised kernel may run the prefill bucket: wgmma, no biases
    (its epilogue reads none), H and F whole 64-element k tiles (TMA boxes of 64), and the
    8-row gate/up interleave when gated."""
    return (use_wgmma(spec, target) and not spec.bias and spec.hidden_dim % MMA_BK == 0
            and spec.ffn_dim % MMA_BK == 0 and (not spec.gated or interleave(spec) == MMA_INTERLEAVE))


def preferred_arch(compute_capability: str) -> str:
    """The target to build for a device of ``compute_capability`` ("90" -> "sm_90a": the
    arch-specific Hopper target, so the prefill GEMMs can use wgmma; others "sm_XY")."""
    return f"sm_{compute_capability}a" if compute_capability == "90" else f"sm_{compute_capability}"


def x_alignment(spec: MoESpec) -> int:
    """Byte alignment the FFN kernels need of x's data pointer (cp.async copies 16 bytes)."""
    return 16 if use_mma(spec) else spec.dt.itemsize


def interleave(spec: MoESpec) -> int:
    """Gate/up interleave of the packed w13: MMA_INTERLEAVE rows for gated specs whose F is a
    multiple of it, else 0 (W1 rows then W3 rows)."""
    return MMA_INTERLEAVE if (spec.gated and spec.ffn_dim % MMA_INTERLEAVE == 0) else 0


def packed_layout(spec: MoESpec) -> PackedLayout:
    """The packed weight layout the CUDA GEMMs read: w13 [G, H] and w2 [H, F] (K contiguous, the
    B operand of mma.sync "row.col"), gate/up interleaved by 8 rows on the tensor-core path."""
    return PackedLayout(spec, w13_order="nk", w2_order="nk", gate_up_interleave=interleave(spec),
                        router_order="eh", align_bytes=128)


def _experts_touched(spec: MoESpec, tokens: int) -> float:
    """Expected routed experts touched by ``tokens`` tokens under uniform routing, plus shared."""
    E, k = spec.num_experts, spec.top_k
    return E * (1.0 - (1.0 - k / E) ** tokens) + spec.num_shared_experts


def _splits(spec: MoESpec, tile: GemmTile, tokens: int, sms: int) -> int:
    """Split-K of ffn2 so that ~2 CTAs per SM stream weights at ``tokens`` tokens (the smallest
    count of the bucket), each split still covering at least 4 K tiles (fewer would be all
    prologue)."""
    n_tiles = math.ceil(spec.hidden_dim / tile.bn)
    slots = tokens * (spec.top_k + spec.num_shared_experts)
    m_tiles = max(1.0, _experts_touched(spec, tokens), slots / tile.bm)
    ctas = n_tiles * m_tiles
    want = math.ceil(2 * sms / ctas)
    most = max(1, spec.ffn_dim // (4 * tile.bk))
    return int(max(1, min(want, most, 16)))


def _bucket_limits(spec: MoESpec) -> list[tuple[str, int, float]]:
    """(name, bm, max average rows per expert) of each bucket, smallest first.  A
    batch-invariant spec has the unbounded bucket alone: one tile per stage and no split-K for
    every token count, so a row's arithmetic does not depend on T."""
    if use_mma(spec):
        limits = [("bm16", 16, 8.0), ("bm32", 32, 24.0), ("bm64", 64, 48.0), ("bm128", 128, math.inf)]
    else:
        limits = [("bm16", 16, 8.0), ("bm64", 64, math.inf)]
    return limits[-1:] if spec.batch_invariant else limits


# Tensor-core tiles (ffn1, ffn2) of each bucket height.  Tuning candidates are swapped in here
# by benchmarks/cuda_ffn_bench.py --tile.
_DECODE = GemmTile("mma", 16, 64, 2 * MMA_BK, 1, 4, 3, min_blocks=3)
_SMALL = GemmTile("mma", 32, 128, 2 * MMA_BK, 1, 4, 2, min_blocks=2)
_MID = GemmTile("mma", 64, 128, 2 * MMA_BK, 2, 4, 2, min_blocks=2)
_PREFILL_MMA = GemmTile("mma", 128, 256, MMA_BK, 2, 4, 4)   # 0.56 of floor vs 0.48 for 128x128 (H100)
MMA_TILES: dict[int, tuple[GemmTile, GemmTile]] = {
    16: (_DECODE, _DECODE),
    32: (_SMALL, _SMALL),
    64: (_MID, _MID),
    128: (_PREFILL_MMA, _PREFILL_MMA),
}

# Prefill tiles on sm_90a: two warpgroups of 64 x 256 (wgmma m64n256k16), 4 stages of 48 KB,
# one CTA per tile (a launch of one CTA per SM walking the tiles, next tile's loads in flight
# during the epilogue, measured 3-13% slower on H100: Mixtral T=16384, 23.4 vs 21.7 ms).
_PREFILL_WGMMA = GemmTile("wgmma", 128, 256, MMA_BK, 2, 4, 4)
WGMMA_TILES: dict[int, tuple[GemmTile, GemmTile]] = {
    128: (_PREFILL_WGMMA, _PREFILL_WGMMA),
}
# The persistent warp-specialised prefill tile (sm_90a, `use_ws`): 128 x 256, 4 stages, 384
# threads.  H200, 2026-12-01, whole layer (benchmarks/prefill_gemm.py): 6-27% faster than
# _PREFILL_WGMMA at T = 4096 and 16384 (mixtral T=16384 19.27 vs 22.05 ms, qwen3 2.47 vs 3.38),
# bitwise repeatable, racecheck clean; tests/test_cuda_gpu.py passes with it as the default
# (docs/PERF.md, 2026-12-01).
WS_TILES: dict[int, GemmTile] = {
    128: GemmTile("wgmma_ws", 128, 256, MMA_BK, 2, 4, 4),
}
# The persistent kernel is the prefill default where it applies; the wgmma tile is then the
# tuning alternative (and the default where it does not apply).
WS_DEFAULT = True
# Further tensor-core tiles `moegen tune` may try per bucket height (after the default).
ALT_TILES: dict[int, tuple[GemmTile, ...]] = {
    16: (GemmTile("mma", 16, 64, MMA_BK, 1, 4, 4, min_blocks=4), GemmTile("mma", 16, 128, MMA_BK, 1, 4, 4, min_blocks=2)),
    64: (GemmTile("mma", 64, 128, MMA_BK, 2, 4, 4, min_blocks=2), GemmTile("mma", 64, 64, MMA_BK, 2, 2, 4, min_blocks=2)),
    128: (_PREFILL_MMA, GemmTile("mma", 128, 128, MMA_BK, 2, 4, 4)),
}


def _default_tiles(spec: MoESpec, target: str | None, bm: int) -> tuple[GemmTile, GemmTile]:
    if not use_mma(spec):
        t = GemmTile("simt", bm, 64, SIMT_BK, 1, 1, 1)
        return t, t
    if WS_DEFAULT and use_ws(spec, target) and bm in WS_TILES:
        return WS_TILES[bm], WS_TILES[bm]
    if use_wgmma(spec, target) and bm in WGMMA_TILES:
        return WGMMA_TILES[bm]
    return MMA_TILES[bm]


def _alt_tiles(spec: MoESpec, target: str | None, bm: int) -> tuple[GemmTile, ...]:
    """The tiles a tensor-core bucket may use besides the default: where the persistent tile
    applies (`use_ws`) it or, when it is the default, the wgmma tile; then ALT_TILES."""
    alts = ALT_TILES.get(bm, ())
    if use_ws(spec, target) and bm in WS_TILES:
        alts = ((WGMMA_TILES[bm][0] if WS_DEFAULT else WS_TILES[bm]), *alts)
    return alts


def tile_choices(spec: MoESpec, target: str | None) -> dict[str, tuple[str, ...]]:
    """``tile_bm<BM>`` -> the tags of the tiles a tensor-core bucket may use (ffn1 and ffn2
    alike), the cost model's choice first.  Empty for SIMT specs (one tile shape only)."""
    if not use_mma(spec):
        return {}
    out = {}
    for _, bm, _ in _bucket_limits(spec):
        default = _default_tiles(spec, target, bm)[0]
        tags = [default.tag] + [t.tag for t in _alt_tiles(spec, target, bm) if t.tag != default.tag]
        out[f"tile_bm{bm}"] = tuple(tags)
    return out


def _tiles(spec: MoESpec, target: str | None, bm: int, tuning: dict) -> tuple[GemmTile, GemmTile]:
    chosen = tuning.get(f"tile_bm{bm}")
    if chosen is not None:
        for t in (*_default_tiles(spec, target, bm), *_alt_tiles(spec, target, bm)):
            if t.tag == chosen:
                return t, t
        raise ValueError(f"tile_bm{bm} must be one of {list(tile_choices(spec, target).get(f'tile_bm{bm}', ()))}, "
                         f"got {chosen!r}")
    return _default_tiles(spec, target, bm)


def bucket_configs(spec: MoESpec, target: str | None, sms: int,
                   tuning: dict | None = None) -> list[BucketConfig]:
    """The token-count buckets of ``spec`` for ``target`` (None: ``spec.arch``) on a GPU of
    ``sms`` multiprocessors, sorted by ``max_tokens``; the last is unbounded.  ``tuning`` may
    pick a bucket's tile by tag (`tile_choices`).

    A bucket's bound is the token count at which the average rows per expert
    (T·(k + shared)/E) reaches its limit; buckets that would hold no token count are dropped.
    """
    tuning = tuning or {}
    slots = spec.top_k + spec.num_shared_experts
    out: list[BucketConfig] = []
    prev = 0
    limits = _bucket_limits(spec)
    for i, (name, bm, rows) in enumerate(limits):
        last = i == len(limits) - 1
        max_tokens = None if last else int(rows * spec.num_experts // slots)
        if max_tokens is not None and max_tokens <= prev:
            continue
        f1, f2 = _tiles(spec, target, bm, tuning)
        # The unbounded (prefill) bucket has M tiles enough to fill the GPU: no split-K, whose
        # partial sums would cost splits x T·k·H extra bytes.
        splits = 1 if last else _splits(spec, f2, prev + 1, sms)
        if f2.persistent and splits != 1:
            raise ValueError(f"tile_bm{bm} {f2.tag} has no split-K; only the unbounded bucket may use it")
        out.append(BucketConfig(
            name=name, max_tokens=max_tokens, bm=bm, ffn1=f1, ffn2=f2, ffn2_splits=splits,
            ffn1_kernel=f"moe_ffn1_{f1.tag}", ffn2_kernel=f"moe_ffn2_{f2.tag}_k{splits}"))
        prev = max_tokens or prev
    return out


def bucket_for(configs: list[BucketConfig], tokens: int) -> BucketConfig:
    """The first bucket that accepts ``tokens`` (the last one accepts every count)."""
    for cfg in configs:
        if cfg.accepts(tokens):
            return cfg
    return configs[-1]


def max_tiles(spec: MoESpec, cfg: BucketConfig, tokens: int) -> int:
    """Upper bound of M tiles for ``tokens`` tokens: ceil(T·K_TOTAL/bm) + E + shared."""
    slots = tokens * (spec.top_k + spec.num_shared_experts)
    return -(-slots // cfg.bm) + spec.num_experts + spec.num_shared_experts


def workspace_sizes(spec: MoESpec, cfg: BucketConfig, max_tokens: int) -> dict:
    """Element counts of the FFN workspaces for up to ``max_tokens`` tokens.

    ``h``: [max_tiles·bm, F] in the storage dtype; ``y_slot``: [ffn2_splits, T·K_TOTAL, H] in
    the storage dtype (fp32 for fp32 specs); also ``max_tiles``.
    """
    tiles = max_tiles(spec, cfg, max_tokens)
    slots = max_tokens * (spec.top_k + spec.num_shared_experts)
    return {"max_tiles": tiles,
            "h": tiles * cfg.bm * spec.ffn_dim,
            "y_slot": cfg.ffn2_splits * slots * spec.hidden_dim}


def render_context(spec: MoESpec, buckets, mma: bool, inter: int) -> dict:
    """Template variables of templates/cuda/ffn.cu.jinja, under the one key ``ffn``, from the
    plan's buckets.  Validated ints and table strings only.
    """
    layout = PackedLayout(spec, w13_order="nk", w2_order="nk", gate_up_interleave=inter,
                          router_order="eh", align_bytes=128)
    off = layout.offsets
    dt = spec.dt
    kernels, seen = [], set()
    for cfg in buckets:
        for stage, tile, name, splits in ((1, cfg.ffn1, cfg.ffn1_kernel, 1),
                                          (2, cfg.ffn2, cfg.ffn2_kernel, cfg.ffn2_splits)):
            if name in seen:
                continue
            seen.add(name)
            kernels.append({"stage": stage, "name": name, "kind": tile.kind, "bm": tile.bm,
                            "bn": tile.bn, "bk": tile.bk, "wm": tile.warps_m,
                            "wn": tile.warps_n, "stages": tile.stages, "splits": splits,
                            "threads": tile.threads, "min_blocks": tile.min_blocks,
                            "group_m": tile.group_m})
    return {"ffn": {
        "mma_type": dt.cuda_mma if mma else "",
        "simt_threads": SIMT_THREADS,
        "wgmma_ns": sorted({k["bn"] for k in kernels if k["kind"] in ("wgmma", "wgmma_ws")}),
        "ws": any(k["kind"] == "wgmma_ws" for k in kernels),
        "ws_producer_threads": WS_PRODUCER_THREADS,
        "ws_ring_bytes": WS_RING_BYTES,
        "act_fast": ACT_FAST_FUNCTIONS.get(spec.act.fn, ACT_FUNCTIONS[spec.act.fn]),
        "gate_rows": layout.gate_rows,
        "gated": spec.gated,
        "bias": spec.bias,
        "interleave": layout.gate_up_interleave,
        "act": ACT_FUNCTIONS[spec.act.fn],
        "expert_stride": layout.expert_stride,
        "off_w13": off["w13"],
        "off_b13": off.get("b13", 0),
        "off_w2": off["w2"],
        "off_b2": off.get("b2", 0),
        "kernels": kernels,
    }}


def grouped_layout_host(spec: MoESpec, topk_ids: np.ndarray, bm: int, tiles: int):
    """The padded grouped layout the GEMMs read, built on the host (the reference of the group
    stage, for tests and benchmarks).

    ``topk_ids`` [T, k] int; shared experts E..E+S-1 are appended as slots k..K_TOTAL-1.
    Returns int32 arrays (sorted_rows [tiles·bm], tile_expert [tiles], tile_row0 [tiles],
    num_tiles [1]); unused tiles hold 0x7fffffff (the kernels must never read them).
    Raises ValueError when ``tiles`` is too small.
    """
    ids = np.asarray(topk_ids, dtype=np.int32)
    T, E, S = ids.shape[0], spec.num_experts, spec.num_shared_experts
    full = np.concatenate([ids, np.broadcast_to(E + np.arange(S, dtype=np.int32), (T, S))], axis=1)
    flat = full.reshape(-1)
    counts = np.bincount(flat, minlength=E + S)
    order = np.argsort(flat, kind="stable").astype(np.int32)
    sorted_rows = np.full(tiles * bm, -1, np.int32)
    tile_expert = np.full(tiles, 0x7fffffff, np.int32)
    tile_row0 = np.full(tiles, 0x7fffffff, np.int32)
    row = tile = pos = 0
    for e in range(E + S):
        n = int(counts[e])
        need = -(-n // bm)
        if tile + need > tiles:
            raise ValueError(f"tiles must be at least the tiles the routing needs, got {tiles}")
        sorted_rows[row:row + n] = order[pos:pos + n]
        tile_expert[tile:tile + need] = e
        tile_row0[tile:tile + need] = row + bm * np.arange(need)
        tile, row, pos = tile + need, row + need * bm, pos + n
    return sorted_rows, tile_expert, tile_row0, np.array([tile], np.int32)
