"""The packed weight layout: every expert's W1/W3/W2 (and biases) in one contiguous buffer.

The seed's "memory-efficient expert parameter layout": one allocation, per-expert offsets fixed
when the kernel is built, each matrix stored in the orientation its GEMM reads.  A backend picks
the orientation with a `PackedLayout`; `pack()` is the one generic packer over it.

Per expert ``e`` (``E + num_shared_experts`` experts; shared ones follow the routed ones), at
``e * expert_stride`` elements:

    w13  gate/up rows: "nk" = [G, H] (output rows, like nn.Linear.weight), "kn" = [H, G]
         with G = 2F for gated activations (W1 and W3), F otherwise (W1 alone).  When
         ``gate_up_interleave`` = n > 0, output rows come in blocks of n gate rows then n up rows,
         so one GEMM tile of 2n columns holds matching gate and up values.
    b13  [G] (bias=True only), in the same row order as w13.
    w2   "nk" = [H, F], "kn" = [F, H].
    b2   [H] (bias=True only).
    gate [H] (shared_expert_gate=True only): the shared-expert gate g, in each shared expert's
         block (zeros in the routed ones).

Every segment starts at a multiple of ``align`` elements (16-byte vector loads need it).
The router weight is kept apart: [E, H] ("eh") or [H, E] ("he").
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np

from .arrays import to_numpy
from .spec import MoESpec


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


@dataclass(frozen=True)
class PackedLayout:
    spec: MoESpec
    w13_order: str = "nk"
    w2_order: str = "nk"
    gate_up_interleave: int = 0
    router_order: str = "eh"
    align_bytes: int = 128

    def __post_init__(self):
        for name, allowed in (("w13_order", ("nk", "kn")), ("w2_order", ("nk", "kn")),
                              ("router_order", ("eh", "he"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"PackedLayout.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        g = self.gate_up_interleave
        if g < 0 or (g and self.spec.ffn_dim % g):
            raise ValueError(f"PackedLayout.gate_up_interleave must be 0 or divide ffn_dim="
                             f"{self.spec.ffn_dim}, got {g}")

    # -- sizes, in elements -----------------------------------------------------------------
    @property
    def align(self) -> int:
        return self.align_bytes // self.spec.dt.itemsize

    @property
    def num_slots_experts(self) -> int:
        return self.spec.num_experts + self.spec.num_shared_experts

    @property
    def gate_rows(self) -> int:
        return (2 if self.spec.gated else 1) * self.spec.ffn_dim

    @property
    def w13_size(self) -> int:
        return self.gate_rows * self.spec.hidden_dim

    @property
    def w2_size(self) -> int:
        return self.spec.hidden_dim * self.spec.ffn_dim

    @property
    def offsets(self) -> dict[str, int]:
        """Element offsets of each segment inside one expert's block."""
        a, off, out = self.align, 0, {}
        for name, size, present in (("w13", self.w13_size, True),
                                    ("b13", self.gate_rows, self.spec.bias),
                                    ("w2", self.w2_size, True),
                                    ("b2", self.spec.hidden_dim, self.spec.bias),
                                    ("gate", self.spec.hidden_dim, self.spec.shared_expert_gate)):
            if present:
                out[name] = off
                off = _round_up(off + size, a)
        out["stride"] = off
        return out

    @property
    def expert_stride(self) -> int:
        return self.offsets["stride"]

    @property
    def total(self) -> int:
        return self.expert_stride * self.num_slots_experts

    def nbytes(self) -> int:
        return self.total * self.spec.dt.itemsize

    def gate_up_row_order(self) -> np.ndarray:
        """Row permutation: packed row r holds logical row perm[r] of [W1; W3]."""
        f, g = self.spec.ffn_dim, self.gate_up_interleave
        if not self.spec.gated or g == 0:
            return np.arange(self.gate_rows)
        blocks = np.arange(f // g)
        gate = (blocks[:, None] * g + np.arange(g)[None, :])
        return np.stack([gate, gate + f], axis=1).reshape(-1)


@dataclass
class PackedWeights:
    """Weights in a module's layout, on its device.

    ``buffer``: 1-D array of ``layout.total`` elements of the spec dtype.
    ``router``: the router weight in ``layout.router_order``, spec dtype.
    ``layout``: the layout it was packed for; a kernel refuses weights packed for another.
    ``expert_ids``: for an expert-parallel shard (``pack(..., expert_ids=[...])``), the global
    id of each packed expert, in packed order; None for a whole layer.  A shard has no router.
    """
    buffer: Any
    router: Any
    layout: PackedLayout
    expert_ids: tuple | None = None

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes) + (0 if self.router is None else int(self.router.nbytes))

    def local_ids(self, global_ids):
        """Map global expert ids (NumPy) of a shard's experts to packed (local) ids; an id the
        shard does not own is a ValueError naming it."""
        if self.expert_ids is None:
            return np.asarray(global_ids)
        table = {g: i for i, g in enumerate(self.expert_ids)}
        flat = np.asarray(global_ids).reshape(-1)
        missing = sorted({int(g) for g in flat} - set(table))
        if missing:
            raise ValueError(f"global_ids must be experts of this shard {list(self.expert_ids)}, "
                             f"got {missing[:8]}")
        return np.array([table[int(g)] for g in flat], np.int32).reshape(np.shape(global_ids))


# --------------------------------------------------------------------------------------------
# Packing

def _library(a) -> str:
    """"torch", "cupy" or "numpy": the array library of ``a``."""
    mod = type(a).__module__
    return "torch" if mod.startswith("torch") else "cupy" if mod.startswith("cupy") else "numpy"


def on_gpu(a) -> bool:
    """True for a CUDA torch tensor or a CuPy array."""
    lib = _library(a)
    return lib == "cupy" or (lib == "torch" and a.is_cuda)


def _convert(a, name: str, device: bool):
    """``a`` as a host NumPy array, or (``device``) left where it is when it is a GPU array."""
    if device and a is not None and on_gpu(a):
        return a.detach() if _library(a) == "torch" else a
    return to_numpy(a, name)


def _stack_like(arrs: list):
    """Stack arrays of one library along a new first axis."""
    lib = _library(arrs[0])
    if lib == "torch":
        import torch
        return torch.stack(arrs)
    if lib == "cupy":
        import cupy
        return cupy.stack(arrs)
    return np.stack(arrs)


def _concat_like(arrs: list, axis: int = 0):
    lib = _library(arrs[0])
    if lib == "torch":
        import torch
        return torch.cat(arrs, dim=axis)
    if lib == "cupy":
        import cupy
        return cupy.concatenate(arrs, axis=axis)
    return np.concatenate([np.asarray(a, dtype=arrs[0].dtype) for a in arrs], axis=axis)


def _expect_shape(name: str, arr: np.ndarray, shape: tuple) -> None:
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(arr.shape)}")


def _stack(name: str, value, n: int, shape: tuple, device: bool = False,
           pick: tuple | None = None):
    """Per-expert list of arrays or one stacked array -> [n, *shape] array (host NumPy, or
    left on its GPU when ``device``).  ``pick``: the global ids of an expert-parallel shard;
    a value holding more than ``n`` experts is then indexed by them."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if pick is not None and len(value) != n and len(value) > max(pick):
            value = [value[g] for g in pick]
        if len(value) != n:
            raise ValueError(f"{name} must hold one array per expert ({n}), got {len(value)}")
        arrs = [_convert(v, f"{name}[{i}]", device) for i, v in enumerate(value)]
        for i, a in enumerate(arrs):
            _expect_shape(f"{name}[{i}]", a, shape)
        return _stack_like(arrs)
    arr = _convert(value, name, device)
    if pick is not None and len(arr.shape) == len(shape) + 1 and arr.shape[0] not in (n,) \
            and arr.shape[0] > max(pick):
        arr = arr[list(pick)]
    _expect_shape(name, arr, (n, *shape))
    return arr


def logical_weights(spec: MoESpec, *, router=None, w1=None, w3=None, w2=None, w13=None,
                    b1=None, b3=None, b2=None, b13=None, router_layout: str | None = None,
                    shared_w1=None, shared_w3=None, shared_w2=None,
                    shared_b1=None, shared_b3=None, shared_b2=None, shared_gate=None,
                    expert_ids=None, device: bool = False) -> dict[str, Any]:
    """Normalise the accepted weight layouts to arrays in nn.Linear orientation: host NumPy
    arrays, or with ``device=True`` GPU arrays (torch CUDA, CuPy) left where they are.

    Accepted:
      * HF Mixtral style: ``w1``, ``w3`` each [E, F, H] or a list of E [F, H] arrays; ``w2``
        [E, H, F] or a list of [H, F];
      * vLLM style: ``w13`` [E, 2F, H] (W1 rows then W3 rows) and ``w2`` [E, H, F];
      * ``router`` [E, H] (nn.Linear gate weight) or [H, E]; when E == H pass
        ``router_layout="eh"`` or ``"he"``.
    Biases: ``b1``/``b3`` [E, F] (or ``b13`` [E, 2F]) and ``b2`` [E, H] when ``spec.bias``.
    Shared experts (``spec.num_shared_experts`` = S): ``shared_w1`` [S, F, H] and so on;
    ``shared_gate`` [H] or [1, H] when ``spec.shared_expert_gate``.
    Expert-parallel shard: ``expert_ids`` lists the global ids of the E = ``spec.num_experts``
    experts this rank owns; each routed weight holds either exactly those E experts (in that
    order) or the whole layer's experts (then the listed ones are taken).  A shard has no
    router (route over all experts elsewhere; call ``kernel.experts`` with
    ``weights.local_ids(global_ids)``): ``router`` must be None.

    Returns a dict with router [E, H] (None for a shard), w1, w3 (or None), w2, b1, b3, b2
    over E + S experts, and expert_ids (a tuple, or None).
    Raises ValueError/TypeError naming the argument, expected and actual shape.
    """
    E, H = spec.num_experts, spec.hidden_dim
    pick = _check_expert_ids(expert_ids, E)
    if pick is not None:
        if router is not None:
            raise ValueError("router must be None for an expert-parallel shard (expert_ids given): "
                             "route over all experts with the whole layer's kernel")
        return _logical_experts(spec, None, w1, w3, w2, w13, b1, b3, b2, b13, device, pick,
                                shared=(shared_w1, shared_w3, shared_w2, shared_b1, shared_b3,
                                        shared_b2, shared_gate))
    r = _convert(router, "router", device)
    if r is None:
        raise ValueError("router weight is required: shape (E, H) = "
                         f"({E}, {H}) or (H, E) = ({H}, {E})")
    if router_layout not in (None, "eh", "he"):
        raise ValueError(f"router_layout must be 'eh' or 'he', got {router_layout!r}")
    if router_layout is None:
        if E == H and r.shape == (E, H):
            raise ValueError(f"router has shape {r.shape} with E == H == {E}: pass "
                             "router_layout='eh' ([E, H]) or 'he' ([H, E])")
        router_layout = "eh" if r.shape == (E, H) else "he"
    if router_layout == "he":
        _expect_shape("router", r, (H, E))
        r = r.T
    _expect_shape("router", r, (E, H))
    return _logical_experts(spec, r, w1, w3, w2, w13, b1, b3, b2, b13, device, None,
                            shared=(shared_w1, shared_w3, shared_w2, shared_b1, shared_b3, shared_b2,
                                    shared_gate))


def _check_expert_ids(expert_ids, n: int) -> tuple | None:
    if expert_ids is None:
        return None
    ids = tuple(expert_ids)
    if len(ids) != n or any(isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 0
                            for g in ids) or len(set(ids)) != n:
        raise ValueError(f"expert_ids must list {n} distinct non-negative expert ids (the kernel's "
                         f"num_experts), got {list(ids)[:16]}")
    return tuple(int(g) for g in ids)


def _logical_experts(spec, r, w1, w3, w2, w13, b1, b3, b2, b13, device, pick, shared):
    E, H, F, S = spec.num_experts, spec.hidden_dim, spec.ffn_dim, spec.num_shared_experts
    shared_w1, shared_w3, shared_w2, shared_b1, shared_b3, shared_b2, shared_gate = shared
    dev = dict(device=device, pick=pick)
    if w13 is not None:
        if w1 is not None or w3 is not None:
            raise ValueError("pass either w13 or w1/w3, not both")
        a = _stack("w13", w13, E, ((2 if spec.gated else 1) * F, H), **dev)
        w1, w3 = (a[:, :F], a[:, F:]) if spec.gated else (a, None)
    else:
        w1 = _stack("w1", w1, E, (F, H), **dev)
        w3 = _stack("w3", w3, E, (F, H), **dev)
    if w1 is None:
        raise ValueError(f"w1 is required: shape ({E}, {F}, {H}) or a list of {E} ({F}, {H}) arrays")
    if spec.gated and w3 is None:
        raise ValueError(f"activation {spec.activation!r} is gated: w3 ({E}, {F}, {H}) is required")
    if not spec.gated and w3 is not None:
        raise ValueError(f"activation {spec.activation!r} is not gated: w3 must be None")
    w2 = _stack("w2", w2, E, (H, F), **dev)
    if w2 is None:
        raise ValueError(f"w2 is required: shape ({E}, {H}, {F})")

    if b13 is not None:
        bb = _stack("b13", b13, E, ((2 if spec.gated else 1) * F,), **dev)
        b1, b3 = (bb[:, :F], bb[:, F:]) if spec.gated else (bb, None)
    else:
        b1, b3 = _stack("b1", b1, E, (F,), **dev), _stack("b3", b3, E, (F,), **dev)
    b2 = _stack("b2", b2, E, (H,), **dev)
    if spec.bias:
        for name, b in (("b1", b1), ("b2", b2)) + ((("b3", b3),) if spec.gated else ()):
            if b is None:
                raise ValueError(f"spec.bias is True: {name} is required")
    elif any(b is not None for b in (b1, b3, b2)):
        raise ValueError("biases were given but spec.bias is False")

    out = {"router": r, "w1": w1, "w3": w3, "w2": w2, "b1": b1, "b3": b3, "b2": b2,
           "expert_ids": pick}
    if S:
        sh = {"w1": _stack("shared_w1", shared_w1, S, (F, H), device),
              "w3": _stack("shared_w3", shared_w3, S, (F, H), device) if spec.gated else None,
              "w2": _stack("shared_w2", shared_w2, S, (H, F), device)}
        if sh["w1"] is None or sh["w2"] is None or (spec.gated and sh["w3"] is None):
            raise ValueError(f"spec.num_shared_experts={S}: shared_w1, shared_w2"
                             f"{', shared_w3' if spec.gated else ''} are required")
        if spec.bias:
            sh.update(b1=_stack("shared_b1", shared_b1, S, (F,), device),
                      b3=_stack("shared_b3", shared_b3, S, (F,), device) if spec.gated else None,
                      b2=_stack("shared_b2", shared_b2, S, (H,), device))
        for k_, v in sh.items():
            if v is not None and out[k_] is not None:
                out[k_] = _concat_like([out[k_], v])
    gate = _convert(shared_gate, "shared_gate", device)
    if spec.shared_expert_gate:
        if gate is None:
            raise ValueError(f"spec.shared_expert_gate is True: shared_gate ({H},) is required")
        if tuple(gate.shape) == (1, H):
            gate = gate.reshape(H)
        _expect_shape("shared_gate", gate, (H,))
        out["shared_gate"] = gate
    elif gate is not None:
        raise ValueError("shared_gate was given but spec.shared_expert_gate is False")
    return out


def weight_shapes(spec: MoESpec) -> dict[str, tuple]:
    """The logical weights a layer has, in order (router, w1, w3, w2, b1, b3, b2; absent ones
    left out), with their shapes over the E routed and S shared experts."""
    E, H, F = spec.num_experts, spec.hidden_dim, spec.ffn_dim
    n = E + spec.num_shared_experts
    shapes = {"router": (E, H), "w1": (n, F, H), "w3": (n, F, H), "w2": (n, H, F), "b1": (n, F),
              "b3": (n, F), "b2": (n, H)}
    present = {"w3": spec.gated, "b1": spec.bias, "b3": spec.bias and spec.gated, "b2": spec.bias}
    return {name: shape for name, shape in shapes.items() if present.get(name, True)}


# The keywords `MoEKernel.pack` accepts (those of `logical_weights`), for its messages.
PACK_KEYWORDS = tuple(p for p in inspect.signature(logical_weights).parameters
                      if p not in ("spec", "device"))


def pack_host(layout: PackedLayout, logical: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Pack logical weights (see `logical_weights`) into (buffer, router) host arrays."""
    spec = layout.spec
    dt = spec.dt.numpy
    n, H = layout.num_slots_experts, spec.hidden_dim
    buf = np.zeros((n, layout.expert_stride), dtype=dt)
    off = layout.offsets
    perm = layout.gate_up_row_order()
    w13 = logical["w1"] if not spec.gated else np.concatenate([logical["w1"], logical["w3"]], axis=1)
    w13 = w13[:, perm].astype(dt)                           # [n, G, H]
    if layout.w13_order == "kn":
        w13 = w13.transpose(0, 2, 1)
    buf[:, off["w13"]:off["w13"] + layout.w13_size] = w13.reshape(n, -1)
    w2 = logical["w2"].astype(dt)                           # [n, H, F]
    if layout.w2_order == "kn":
        w2 = w2.transpose(0, 2, 1)
    buf[:, off["w2"]:off["w2"] + layout.w2_size] = w2.reshape(n, -1)
    if spec.bias:
        b13 = logical["b1"] if not spec.gated else np.concatenate([logical["b1"], logical["b3"]], axis=1)
        buf[:, off["b13"]:off["b13"] + layout.gate_rows] = b13[:, perm].astype(dt)
        buf[:, off["b2"]:off["b2"] + H] = logical["b2"].astype(dt)
    if spec.shared_expert_gate:
        buf[spec.num_experts:, off["gate"]:off["gate"] + H] = logical["shared_gate"].astype(dt)
    if logical["router"] is None:                          # an expert-parallel shard
        return buf.reshape(-1), None
    router = logical["router"].astype(spec.router_dt.numpy)
    if layout.router_order == "he":
        router = router.T
    return buf.reshape(-1), np.ascontiguousarray(router)


def pack_device(layout: PackedLayout, logical: dict, zeros, router_zeros=None) -> tuple[Any, Any]:
    """Pack logical weights that live on a GPU (torch CUDA tensors or CuPy arrays, from
    ``logical_weights(..., device=True)``) on that GPU: nothing goes through host memory.

    ``zeros(shape)`` allocates a zeroed array of the storage dtype on the device (torch, or CuPy
    with bf16 as uint16 bits); assignment casts to it (a CuPy source for a bf16 layout must
    already be bf16 bits, see `cupy_bf16_bits`).  ``router_zeros(shape)`` allocates the router
    in ``spec.router_dt`` (float32 beside 16-bit experts with ``router_dtype``); None: ``zeros``.
    Stacked weights ([n, F, H] arrays, as `logical_weights` gives) are written by a few strided
    copies over all experts at once (one per weight part, each a view of the buffer: no
    temporaries); per-expert lists one expert at a time.  Either way the bytes are
    `pack_host`'s.  Returns (buffer [layout.total], router in ``layout.router_order``, or None
    for a shard).
    """
    spec = layout.spec
    n, H = layout.num_slots_experts, spec.hidden_dim
    buf = zeros((n, layout.expert_stride))
    if isinstance(logical["w1"], (list, tuple)):
        for e in range(n):
            _pack_experts(layout, buf[e:e + 1], _one_expert(logical, e), e)
    else:
        _pack_experts(layout, buf, logical, 0)
    r = logical["router"]
    if r is None:
        return buf.reshape(-1), None
    router = (router_zeros or zeros)(tuple(r.shape) if layout.router_order == "eh" else (H, r.shape[0]))
    _assign(router, r if layout.router_order == "eh" else _permute(r, (1, 0)))
    return buf.reshape(-1), router


# Bytes of the word a same-dtype torch copy moves per element when rows allow (see `_assign`).
COPY_WORD_BYTES = 8


def _assign(dst, src) -> None:
    """``dst[...] = src``.  Torch tensors of one dtype whose last dimension is contiguous in
    both (and whose other strides and offsets are whole words) are copied as int64 words:
    torch's strided copy moves one element per thread step, so 2-byte elements would copy at
    a fraction of the memory bandwidth.  The bytes are the same either way."""
    if type(dst).__module__.startswith("torch") and type(src) is type(dst) and src.dtype == dst.dtype:
        import torch  # torch tensors: their word view
        w = COPY_WORD_BYTES // dst.element_size()
        src = src.expand(dst.shape)
        if w > 1 and all(t.stride(-1) == 1 and t.shape[-1] % w == 0 and t.storage_offset() % w == 0
                         and all(st % w == 0 for st in t.stride()[:-1]) for t in (dst, src)):
            dst.view(torch.int64).copy_(src.view(torch.int64))
            return
    dst[...] = src


def _one_expert(logical: dict, e: int) -> dict:
    """Expert e's weights of per-expert lists, each as a stack of one ([1, ...]); the router,
    expert ids and shared gate as they are."""
    whole = ("expert_ids", "router", "shared_gate")
    return {k: v if v is None or k in whole else v[e][None] for k, v in logical.items()}


def _permute(a, axes: tuple):
    """A view of ``a`` with its axes in the order ``axes`` (torch, NumPy or CuPy)."""
    return a.permute(*axes) if hasattr(a, "permute") else a.transpose(axes)


def _pack_experts(layout: PackedLayout, buf, w: dict, e0: int) -> None:
    """Write experts e0 .. e0 + m - 1 into ``buf`` [m, expert_stride] (rows of the packed
    buffer) from ``w``'s stacked weights [m, ...]; shared_gate [H] goes to the shared experts'
    rows.  Every write is a copy into a view of ``buf``."""
    spec = layout.spec
    m, H, F = buf.shape[0], spec.hidden_dim, spec.ffn_dim
    g = layout.gate_up_interleave or F        # gate/up row block: blocks of g gate rows then g up
    parts = 2 if spec.gated else 1
    off = layout.offsets

    def seg(name: str, size: int, shape: tuple):
        return buf[:, off[name]:off[name] + size].reshape(m, *shape)

    halves = [w["w1"]] + ([w["w3"]] if spec.gated else [])
    for j, h in enumerate(halves):                            # h [m, F, H]
        blocks = h.reshape(m, F // g, g, H)
        if layout.w13_order == "nk":                          # [m, G, H]
            _assign(seg("w13", layout.w13_size, (F // g, parts, g, H))[:, :, j], blocks)
        else:                                                 # [m, H, G]
            _assign(seg("w13", layout.w13_size, (H, F // g, parts, g))[:, :, :, j],
                    _permute(blocks, (0, 3, 1, 2)))
    if layout.w2_order == "nk":                               # [m, H, F]
        _assign(seg("w2", layout.w2_size, (H, F)), w["w2"])
    else:                                                     # [m, F, H]
        _assign(seg("w2", layout.w2_size, (F, H)), _permute(w["w2"], (0, 2, 1)))
    if spec.bias:
        b13 = seg("b13", layout.gate_rows, (F // g, parts, g))
        _assign(b13[:, :, 0], w["b1"].reshape(m, F // g, g))
        if spec.gated:
            _assign(b13[:, :, 1], w["b3"].reshape(m, F // g, g))
        _assign(seg("b2", H, (H,)), w["b2"])
    first_shared = max(spec.num_experts - e0, 0)
    if spec.shared_expert_gate and first_shared < m:
        _assign(buf[first_shared:, off["gate"]:off["gate"] + H], w["shared_gate"])


def cupy_bf16_bits(a):
    """A CuPy float array rounded to bfloat16 (nearest even, NaN kept), as uint16 bits; a
    uint16 array is taken to be bf16 bits already."""
    import cupy  # only CuPy inputs come here
    if a.dtype == cupy.uint16:
        return a
    f = cupy.ascontiguousarray(a, dtype=cupy.float32)
    b = f.view(cupy.uint32)
    rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(cupy.uint16)
    return cupy.where(cupy.isnan(f), cupy.uint16(0x7FC0), rounded)


def bf16_bits_as_float32(a):
    """A CuPy array as float32: uint16 is taken to be bf16 bits (widened exactly), any other
    dtype is cast."""
    import cupy  # only CuPy inputs come here
    if a.dtype == cupy.uint16:
        return (a.astype(cupy.uint32) << 16).view(cupy.float32)
    return a.astype(cupy.float32)


def unpack_host(packed: PackedWeights) -> dict[str, np.ndarray]:
    """Inverse of `pack_host` (for tests and the reference): logical arrays from a packed buffer."""
    layout = packed.layout
    spec = layout.spec
    n, H, F, G = layout.num_slots_experts, spec.hidden_dim, spec.ffn_dim, layout.gate_rows
    buf = to_numpy(packed.buffer, "buffer").reshape(n, layout.expert_stride)
    off = layout.offsets
    inv = np.argsort(layout.gate_up_row_order())
    w13 = buf[:, off["w13"]:off["w13"] + layout.w13_size]
    w13 = w13.reshape(n, H, G).transpose(0, 2, 1) if layout.w13_order == "kn" else w13.reshape(n, G, H)
    w13 = w13[:, inv]
    w2 = buf[:, off["w2"]:off["w2"] + layout.w2_size]
    w2 = w2.reshape(n, F, H).transpose(0, 2, 1) if layout.w2_order == "kn" else w2.reshape(n, H, F)
    router = to_numpy(packed.router, "router")
    out = {"router": router.T if layout.router_order == "he" and router is not None else router,
           "w1": w13[:, :F], "w3": w13[:, F:] if spec.gated else None, "w2": w2,
           "b1": None, "b3": None, "b2": None, "expert_ids": packed.expert_ids}
    if spec.bias:
        b13 = buf[:, off["b13"]:off["b13"] + G][:, inv]
        out.update(b1=b13[:, :F], b3=b13[:, F:] if spec.gated else None,
                   b2=buf[:, off["b2"]:off["b2"] + H])
    if spec.shared_expert_gate:
        out["shared_gate"] = buf[spec.num_experts, off["gate"]:off["gate"] + H]
    return out
