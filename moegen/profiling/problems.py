"""Benchmark inputs: random weights and tokens made on the kernel's device, packed there.

`moegen.reference.random_problem` builds everything in float64 on the host, which is right for
tests and far too slow for DeepSeek-V3 (11 G weights).  Here the weights are drawn on the device
(torch when installed, else CuPy; NumPy for the c backend) with the same scales
(x ~ N(0,1), W ~ N(0, 1/fan_in), router ~ 2·N(0, 1/√H)), never zeros, and packed on the device
by `device_pack`, which writes the same bytes as `moegen.layout.pack_host` (a test checks that).

The float64 reference of a whole large call is out of reach too, so `subset_error` checks the
first few tokens of a call: it fetches only the experts those tokens use and runs
`moegen.reference.experts` on them, with the routing the kernel chose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import reference
from ..arrays import host
from ..layout import PackedLayout, PackedWeights, weight_shapes
from ..spec import MoESpec

LOGICAL_KEYS = ("router", "w1", "w3", "w2", "b1", "b3", "b2")


@dataclass
class Weights:
    """Logical weights (nn.Linear orientation, over E + shared experts) and the packed ones.

    ``kind``: "numpy" or "torch" or "cupy", the library of ``logical``'s arrays.
    """
    logical: dict[str, Any]
    packed: PackedWeights
    kind: str
    keep: list = field(default_factory=list)     # owners of memory the packed views borrow

    def drop_logical(self) -> None:
        """Free the logical copies (the baselines need them; the kernel does not)."""
        self.logical = {k: None for k in self.logical}


# -- packing ----------------------------------------------------------------------------------
def device_pack(layout: PackedLayout, logical: dict, zeros) -> tuple[Any, Any]:
    """Pack logical weights into ``layout`` with array-library-neutral operations.

    ``logical``: router [E, H], w1/w3 [n, F, H], w2 [n, H, F], b1/b3 [n, F], b2 [n, H] (NumPy,
    CuPy or torch, already in the storage dtype); ``zeros(shape)`` allocates a zeroed array of
    that library and dtype.  Returns (buffer [layout.total], router in layout.router_order),
    equal element for element to `moegen.layout.pack_host`.  Works one expert at a time so
    the temporaries stay one expert large.
    """
    spec = layout.spec
    n, H, F = layout.num_slots_experts, spec.hidden_dim, spec.ffn_dim
    g = layout.gate_up_interleave or F
    off = layout.offsets
    buf = zeros((n, layout.expert_stride))
    for e in range(n):
        row = buf[e]
        seg = row[off["w13"]:off["w13"] + layout.w13_size]
        if layout.w13_order == "nk":          # [G, H]; G in blocks of g gate rows then g up rows
            blocks = seg.reshape(F // g, 2 if spec.gated else 1, g, H)
            blocks[:, 0] = logical["w1"][e].reshape(F // g, g, H)
            if spec.gated:
                blocks[:, 1] = logical["w3"][e].reshape(F // g, g, H)
        else:                                 # [H, G]
            blocks = seg.reshape(H, F // g, 2 if spec.gated else 1, g)
            blocks[:, :, 0] = logical["w1"][e].T.reshape(H, F // g, g)
            if spec.gated:
                blocks[:, :, 1] = logical["w3"][e].T.reshape(H, F // g, g)
        w2seg = row[off["w2"]:off["w2"] + layout.w2_size]
        w2 = logical["w2"][e]
        w2seg.reshape(w2.shape if layout.w2_order == "nk" else (F, H))[...] = (
            w2 if layout.w2_order == "nk" else w2.T)
        if spec.bias:
            b = row[off["b13"]:off["b13"] + layout.gate_rows].reshape(F // g, 2 if spec.gated else 1, g)
            b[:, 0] = logical["b1"][e].reshape(F // g, g)
            if spec.gated:
                b[:, 1] = logical["b3"][e].reshape(F // g, g)
            row[off["b2"]:off["b2"] + H] = logical["b2"][e]
    r = logical["router"]
    router = zeros(tuple(r.shape) if layout.router_order == "eh" else (r.shape[1], r.shape[0]))
    router[...] = r if layout.router_order == "eh" else r.T
    return buf.reshape(-1), router


# -- libraries --------------------------------------------------------------------------------
def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _torch_dtype(torch, dtype: str):
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def _as_module_array(module, arr, like):
    """``arr`` (torch CUDA tensor) as the array kind ``like`` (what ``module.to_device`` makes),
    sharing memory; the caller keeps ``arr`` alive."""
    if type(like).__module__.startswith("torch"):
        return arr
    import cupy
    mem = cupy.cuda.UnownedMemory(arr.data_ptr(), arr.numel() * arr.element_size(), arr)
    return cupy.ndarray(tuple(arr.shape), dtype=like.dtype, memptr=cupy.cuda.MemoryPointer(mem, 0))


def make_weights(kernel, seed: int = 0, keep_logical: bool = True) -> Weights:
    """Random weights for ``kernel.spec`` on the kernel's device, packed in its layout.

    c backend: NumPy via `moegen.reference.random_problem` and ``kernel.pack``.
    cuda backend: drawn on the GPU with torch (when it has CUDA) or CuPy, packed there.
    Raises MemoryError-like device errors when they do not fit (callers check first).
    """
    spec, module = kernel.spec, kernel.module
    if module.device_kind == "cpu":
        _, w = reference.random_problem(spec, 0, seed)
        return Weights(w, kernel.pack(**reference.weight_kwargs(spec, w)), "numpy")
    probe = module.to_device(np.ones(1, dtype=spec.dt.numpy))
    torch = _torch_cuda()
    if torch is not None:
        logical = torch_logical(spec, seed, torch)
        tdt = _torch_dtype(torch, spec.dtype)
        buf, router = device_pack(kernel.layout, logical,
                                  lambda shape: torch.zeros(shape, dtype=tdt, device="cuda"))
        packed = PackedWeights(_as_module_array(module, buf, probe),
                               _as_module_array(module, router, probe), kernel.layout)
        w = Weights(logical, packed, "torch", keep=[buf, router])
    else:
        import cupy
        logical = _cupy_logical(spec, seed, probe.dtype)
        buf, router = device_pack(kernel.layout, logical,
                                  lambda shape: cupy.zeros(shape, dtype=probe.dtype))
        w = Weights(logical, PackedWeights(buf, router, kernel.layout), "cupy")
    if not keep_logical:
        w.drop_logical()
    return w


def _scales(spec: MoESpec) -> dict:
    H, F = spec.hidden_dim, spec.ffn_dim
    return {"router": 2.0 / math.sqrt(H), "w1": 1 / math.sqrt(H), "w3": 1 / math.sqrt(H),
            "w2": 1 / math.sqrt(F), "b1": 0.1, "b3": 0.1, "b2": 0.1}


def torch_logical(spec: MoESpec, seed: int, torch, device: str = "cuda") -> dict:
    """Logical weights as torch tensors on ``device``.  Gated W1/W3 are views of one stacked
    ``w13`` [n, 2F, H] (vLLM's layout), so the grouped_mm and Triton baselines need no copy."""
    gen = torch.Generator(device=device).manual_seed(seed)
    tdt = _torch_dtype(torch, spec.dtype)
    out = dict.fromkeys(LOGICAL_KEYS)
    scales = _scales(spec)
    shapes = weight_shapes(spec)
    F = spec.ffn_dim
    if spec.gated:
        n, _, H = shapes.pop("w1")
        shapes.pop("w3")
        shapes["w13"] = (n, 2 * F, H)
    for name, shape in shapes.items():
        t = torch.empty(shape, dtype=tdt, device=device)
        scale = scales.get(name, scales["w1"])
        for e in range(shape[0]):          # one expert at a time: no fp32 copy of everything
            t[e] = (torch.randn(shape[1:], generator=gen, device=device) * scale).to(tdt)
        out[name] = t
    if spec.gated:
        out["w1"], out["w3"] = out["w13"][:, :F], out["w13"][:, F:]
    return out


def _bf16_bits(cupy, a):
    """float32 CuPy array -> uint16 bfloat16 bits, round to nearest even (finite inputs)."""
    bits = a.view(cupy.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(cupy.uint16)


def _cupy_logical(spec: MoESpec, seed: int, dtype) -> dict:
    import cupy
    rs = cupy.random.RandomState(seed)
    out = dict.fromkeys(LOGICAL_KEYS)
    scales = _scales(spec)
    for name, shape in weight_shapes(spec).items():
        t = cupy.empty(shape, dtype=dtype)
        for e in range(shape[0]):
            v = rs.standard_normal(shape[1:], dtype=cupy.float32) * scales[name]
            t[e] = (_bf16_bits(cupy, v).view(dtype) if spec.dtype == "bfloat16" else v.astype(dtype))
        out[name] = t
    return out


def make_inputs(kernel, tokens: int, count: int = 1, seed: int = 1, like_kind: str | None = None) -> list:
    """``count`` distinct random x [T, H] buffers (N(0, 1), never zeros) on the kernel's
    device: NumPy for c; torch CUDA tensors for cuda when torch is installed, else CuPy."""
    spec, module = kernel.spec, kernel.module
    H = spec.hidden_dim
    if module.device_kind == "cpu":
        rng = np.random.default_rng(seed)
        return [rng.standard_normal((tokens, H), dtype=np.float32).astype(spec.dt.numpy)
                for _ in range(count)]
    torch = _torch_cuda() if like_kind != "cupy" else None
    if torch is not None:
        gen = torch.Generator(device="cuda").manual_seed(seed)
        tdt = _torch_dtype(torch, spec.dtype)
        return [torch.randn((tokens, H), generator=gen, device="cuda").to(tdt) for _ in range(count)]
    import cupy
    probe = module.to_device(np.ones(1, dtype=spec.dt.numpy))
    rs = cupy.random.RandomState(seed)
    xs = []
    for _ in range(count):
        v = rs.standard_normal((tokens, H), dtype=cupy.float32)
        xs.append(_bf16_bits(cupy, v).view(probe.dtype) if spec.dtype == "bfloat16" else v.astype(probe.dtype))
    return xs


# -- error against the float64 reference -------------------------------------------------------
def _values(a, spec: MoESpec) -> np.ndarray:
    """Host copy of a device array; bf16 kept as uint16 bits (the cuda backend's storage) is
    viewed as bfloat16 again."""
    h = np.asarray(host(a))
    if spec.dtype == "bfloat16" and h.dtype == np.uint16:
        h = h.view(spec.dt.numpy)
    return h


def subset_reference(spec: MoESpec, x, logical: dict, topk_ids, topk_weights, rows: int) -> np.ndarray:
    """The float64 reference output of the first ``rows`` tokens ([n, H], n = min(rows, T)):
    `moegen.reference.experts` with the given routing (the kernel's), fed only the experts
    those tokens use, so a huge layer costs a few experts' weights, not all of them."""
    n = min(rows, int(x.shape[0]))
    if n == 0:
        return np.zeros((0, spec.hidden_dim))
    ids = np.asarray(host(topk_ids[:n])).astype(np.int64)
    wts = np.asarray(host(topk_weights[:n]), dtype=np.float64)
    used = np.unique(ids)
    S = spec.num_shared_experts
    # A row with a repeated id (a kernel bug) leaves fewer than k experts: pad so the sub-spec
    # stays valid and the error shows.
    pad = [int(used[0])] * max(0, spec.top_k - len(used))
    pick = list(used) + pad + [spec.num_experts + j for j in range(S)]
    sub = {}
    for key in ("w1", "w3", "w2", "b1", "b3", "b2"):
        a = logical.get(key)
        sub[key] = None if a is None else np.stack([_values(a[int(e)], spec) for e in pick])
    remap = np.searchsorted(used, ids).astype(np.int32)
    sub_spec = MoESpec(num_experts=len(used) + len(pad), top_k=spec.top_k,
                       hidden_dim=spec.hidden_dim, ffn_dim=spec.ffn_dim, dtype=spec.dtype,
                       activation=spec.activation, bias=spec.bias, num_shared_experts=S,
                       backend="c")
    return reference.experts(sub_spec, _values(x[:n], spec), sub, remap, wts)


def subset_rel_error(spec: MoESpec, out, ref: np.ndarray) -> float:
    """‖out[:n] − ref‖/‖ref‖ for ``ref`` from `subset_reference`; inf on NaN/inf in out."""
    n = ref.shape[0]
    if n == 0:
        return 0.0
    return reference.rel_error(_values(out[:n], spec), ref)


def subset_error(spec: MoESpec, out, x, logical: dict, topk_ids, topk_weights, rows: int) -> float:
    """`subset_rel_error` of ``out`` against `subset_reference` of the first ``rows`` tokens.
    Any array kinds (NumPy, CuPy, torch)."""
    ref = subset_reference(spec, x, logical, topk_ids, topk_weights, rows)
    return subset_rel_error(spec, out, ref)
