"""TMA tensor maps (CUtensorMap) of the persistent prefill kernel (tile kind "wgmma_ws").

`weight_maps` / `h_map` say what each map covers (pure: element type, dims, byte strides and
box, innermost first, from the spec, the packed layout and the plan's tile); `encode` turns
one into the 128 bytes the kernel takes by value, through the driver's cuTensorMapEncodeTiled
(libcuda by ctypes: host-only, no device memory).  `cuda_ffn` caches the weight maps per
packed-buffer address on the module and the h map on the bucket's workspace, so a call encodes
nothing after the first of its weights and bucket.

The maps travel as NumPy structured scalars through CuPy's RawKernel, which hands every
argument to cuLaunchKernel by pointer: the driver copies it to the kernel's own parameter
offset (64-byte aligned for a __grid_constant__ CUtensorMap), and a launch captured in a graph
keeps the bytes.  Checked on an H200 (CuPy 14.2): a 128-byte struct after an int arrives
intact, with or without CuPy's alignment metadata.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from ..layout import PackedLayout
from ..spec import MoESpec

# CUtensorMapDataType of each 16-bit storage dtype.
DATA_TYPES = {"bfloat16": 9, "float16": 6}
_INTERLEAVE_NONE = 0
_SWIZZLE_128B = 3
_L2_PROMOTION_256B = 3
_OOB_FILL_ZERO = 0             # CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE: out-of-bounds reads are 0
# The kernel parameter: 128 bytes (CuPy passes it by value).
TMA_DESC_DTYPE = np.dtype({"names": ["v"], "formats": [(np.uint64, 16)]}, align=True)


@dataclass(frozen=True)
class MapShape:
    """One tiled tensor map relative to its base address: dims and box innermost first,
    byte strides of the outer dims."""
    data_type: int
    offset_bytes: int           # from the buffer's address to the map's base
    dims: tuple
    strides: tuple
    box: tuple


def weight_maps(spec: MoESpec, layout: PackedLayout, bn: int, bk: int) -> tuple[MapShape, MapShape]:
    """(w13, w2) over the packed buffer: w13 {H, gate rows, experts} with box {bk, bn, 1},
    w2 {F, H, experts} with box {bk, bn, 1} (K contiguous, one expert per box)."""
    it, H, F = spec.dt.itemsize, spec.hidden_dim, spec.ffn_dim
    dt, off, es = DATA_TYPES[spec.dtype], layout.offsets, layout.expert_stride
    experts = layout.num_slots_experts
    w13 = MapShape(dt, it * off["w13"], (H, layout.gate_rows, experts), (it * H, it * es), (bk, bn, 1))
    w2 = MapShape(dt, it * off["w2"], (F, H, experts), (it * F, it * es), (bk, bn, 1))
    return w13, w2


def h_map(spec: MoESpec, rows: int, bm: int, bk: int) -> MapShape:
    """h [rows, F] of a workspace, box {bk, bm}."""
    it = spec.dt.itemsize
    return MapShape(DATA_TYPES[spec.dtype], 0, (spec.ffn_dim, rows), (it * spec.ffn_dim,), (bk, bm))


_LIB: list = []


def _driver():
    if not _LIB:
        _LIB.append(ctypes.CDLL("libcuda.so.1"))
    return _LIB[0]


def encode(address: int, shape: MapShape):
    """The CUtensorMap of ``shape`` at buffer ``address`` (a NumPy structured scalar of
    TMA_DESC_DTYPE, a kernel argument for CuPy).  Raises ValueError when the base or a stride is not 16-byte aligned (TMA's
    rule), RuntimeError naming the driver's error otherwise."""
    base = int(address) + shape.offset_bytes
    if base % 16 or any(s % 16 for s in shape.strides):
        raise ValueError(f"a TMA tensor map needs 16-byte aligned addresses and strides, got base "
                         f"{base:#x} and strides {shape.strides}")
    lib = _driver()
    rank = len(shape.dims)
    raw = np.zeros(TMA_DESC_DTYPE.itemsize + 64, np.uint8)     # a CUtensorMap is 64-byte aligned
    skip = -raw.ctypes.data % 64
    desc = raw[skip:skip + TMA_DESC_DTYPE.itemsize].view(TMA_DESC_DTYPE).reshape(())
    rc = lib.cuTensorMapEncodeTiled(
        ctypes.c_void_p(desc.ctypes.data), ctypes.c_int(shape.data_type), ctypes.c_uint32(rank),
        ctypes.c_void_p(base), (ctypes.c_uint64 * rank)(*shape.dims),
        (ctypes.c_uint64 * max(1, rank - 1))(*shape.strides), (ctypes.c_uint32 * rank)(*shape.box),
        (ctypes.c_uint32 * rank)(*([1] * rank)), ctypes.c_int(_INTERLEAVE_NONE),
        ctypes.c_int(_SWIZZLE_128B), ctypes.c_int(_L2_PROMOTION_256B), ctypes.c_int(_OOB_FILL_ZERO))
    if rc != 0:
        msg = ctypes.c_char_p()
        lib.cuGetErrorString(rc, ctypes.byref(msg))
        raise RuntimeError(f"cuTensorMapEncodeTiled {shape}: CUDA error {rc} "
                           f"{msg.value.decode() if msg.value else ''}")
    return desc[()]

