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

Every segment starts at a multiple of ``align`` elements (16-byte vector loads need it).
The router weight is kept apart: [E, H] ("eh") or [H, E] ("he").
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np

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
                                    ("b2", self.spec.hidden_dim, self.spec.bias)):
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
    """
    buffer: Any
    router: Any
    layout: PackedLayout

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes) + int(self.router.nbytes)


# --------------------------------------------------------------------------------------------
# Packing

def _as_numpy(a, name: str) -> np.ndarray:
    """Any array (NumPy, CuPy, torch, list) as a host NumPy array, keeping bf16 as ml_dtypes."""
    if a is None:
        return None
    mod = type(a).__module__
    if mod.startswith("torch"):
        import torch
        t = a.detach()
        if t.dtype == torch.bfloat16:
            import ml_dtypes
            return t.cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.cpu().numpy()
    if mod.startswith("cupy"):
        return a.get()
    try:
        return np.asarray(a)
    except Exception as exc:  # pragma: no cover - defensive
        raise TypeError(f"{name} must be an array (NumPy, CuPy or torch), got {type(a).__name__}") from exc


def _expect_shape(name: str, arr: np.ndarray, shape: tuple) -> None:
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(arr.shape)}")


def _stack(name: str, value, n: int, shape: tuple) -> np.ndarray | None:
    """Per-expert list of arrays or one stacked array -> [n, *shape] host array."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} must hold one array per expert ({n}), got {len(value)}")
        arrs = [_as_numpy(v, f"{name}[{i}]") for i, v in enumerate(value)]
        for i, a in enumerate(arrs):
            _expect_shape(f"{name}[{i}]", a, shape)
        return np.stack(arrs)
    arr = _as_numpy(value, name)
    _expect_shape(name, arr, (n, *shape))
    return arr


def logical_weights(spec: MoESpec, *, router=None, w1=None, w3=None, w2=None, w13=None,
                    b1=None, b3=None, b2=None, b13=None, router_layout: str | None = None,
                    shared_w1=None, shared_w3=None, shared_w2=None,
                    shared_b1=None, shared_b3=None, shared_b2=None) -> dict[str, np.ndarray]:
    """Normalise the accepted weight layouts to host arrays in nn.Linear orientation.

    Accepted:
      * HF Mixtral style: ``w1``, ``w3`` each [E, F, H] or a list of E [F, H] arrays; ``w2``
        [E, H, F] or a list of [H, F];
      * vLLM style: ``w13`` [E, 2F, H] (W1 rows then W3 rows) and ``w2`` [E, H, F];
      * ``router`` [E, H] (nn.Linear gate weight) or [H, E]; when E == H pass
        ``router_layout="eh"`` or ``"he"``.
    Biases: ``b1``/``b3`` [E, F] (or ``b13`` [E, 2F]) and ``b2`` [E, H] when ``spec.bias``.
    Shared experts (``spec.num_shared_experts`` = S): ``shared_w1`` [S, F, H] and so on.

    Returns a dict with router [E, H], w1, w3 (or None), w2, b1, b3, b2 over E + S experts.
    Raises ValueError/TypeError naming the argument, expected and actual shape.
    """
    E, H, F, S = spec.num_experts, spec.hidden_dim, spec.ffn_dim, spec.num_shared_experts
    r = _as_numpy(router, "router")
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

    if w13 is not None:
        if w1 is not None or w3 is not None:
            raise ValueError("pass either w13 or w1/w3, not both")
        a = _stack("w13", w13, E, ((2 if spec.gated else 1) * F, H))
        w1, w3 = (a[:, :F], a[:, F:]) if spec.gated else (a, None)
    else:
        w1 = _stack("w1", w1, E, (F, H))
        w3 = _stack("w3", w3, E, (F, H))
    if w1 is None:
        raise ValueError(f"w1 is required: shape ({E}, {F}, {H}) or a list of {E} ({F}, {H}) arrays")
    if spec.gated and w3 is None:
        raise ValueError(f"activation {spec.activation!r} is gated: w3 ({E}, {F}, {H}) is required")
    if not spec.gated and w3 is not None:
        raise ValueError(f"activation {spec.activation!r} is not gated: w3 must be None")
    w2 = _stack("w2", w2, E, (H, F))
    if w2 is None:
        raise ValueError(f"w2 is required: shape ({E}, {H}, {F})")

    if b13 is not None:
        bb = _stack("b13", b13, E, ((2 if spec.gated else 1) * F,))
        b1, b3 = (bb[:, :F], bb[:, F:]) if spec.gated else (bb, None)
    else:
        b1, b3 = _stack("b1", b1, E, (F,)), _stack("b3", b3, E, (F,))
    b2 = _stack("b2", b2, E, (H,))
    if spec.bias:
        for name, b in (("b1", b1), ("b2", b2)) + ((("b3", b3),) if spec.gated else ()):
            if b is None:
                raise ValueError(f"spec.bias is True: {name} is required")
    elif any(b is not None for b in (b1, b3, b2)):
        raise ValueError("biases were given but spec.bias is False")

    out = {"router": r, "w1": w1, "w3": w3, "w2": w2, "b1": b1, "b3": b3, "b2": b2}
    if S:
        sh = {"w1": _stack("shared_w1", shared_w1, S, (F, H)),
              "w3": _stack("shared_w3", shared_w3, S, (F, H)) if spec.gated else None,
              "w2": _stack("shared_w2", shared_w2, S, (H, F))}
        if sh["w1"] is None or sh["w2"] is None or (spec.gated and sh["w3"] is None):
            raise ValueError(f"spec.num_shared_experts={S}: shared_w1, shared_w2"
                             f"{', shared_w3' if spec.gated else ''} are required")
        if spec.bias:
            sh.update(b1=_stack("shared_b1", shared_b1, S, (F,)),
                      b3=_stack("shared_b3", shared_b3, S, (F,)) if spec.gated else None,
                      b2=_stack("shared_b2", shared_b2, S, (H,)))
        for k_, v in sh.items():
            if v is not None and out[k_] is not None:
                out[k_] = np.concatenate([out[k_], v.astype(out[k_].dtype, copy=False)])
    return out


# The keywords `MoEKernel.pack` accepts (those of `logical_weights`), for its messages.
PACK_KEYWORDS = tuple(p for p in inspect.signature(logical_weights).parameters if p != "spec")


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
    router = logical["router"].astype(dt)
    if layout.router_order == "he":
        router = router.T
    return buf.reshape(-1), np.ascontiguousarray(router)


def unpack_host(packed: PackedWeights) -> dict[str, np.ndarray]:
    """Inverse of `pack_host` (for tests and the reference): logical arrays from a packed buffer."""
    layout = packed.layout
    spec = layout.spec
    n, H, F, G = layout.num_slots_experts, spec.hidden_dim, spec.ffn_dim, layout.gate_rows
    buf = _as_numpy(packed.buffer, "buffer").reshape(n, layout.expert_stride)
    off = layout.offsets
    inv = np.argsort(layout.gate_up_row_order())
    w13 = buf[:, off["w13"]:off["w13"] + layout.w13_size]
    w13 = w13.reshape(n, H, G).transpose(0, 2, 1) if layout.w13_order == "kn" else w13.reshape(n, G, H)
    w13 = w13[:, inv]
    w2 = buf[:, off["w2"]:off["w2"] + layout.w2_size]
    w2 = w2.reshape(n, F, H).transpose(0, 2, 1) if layout.w2_order == "kn" else w2.reshape(n, H, F)
    router = _as_numpy(packed.router, "router")
    out = {"router": router.T if layout.router_order == "he" else router,
           "w1": w13[:, :F], "w3": w13[:, F:] if spec.gated else None, "w2": w2,
           "b1": None, "b3": None, "b2": None}
    if spec.bias:
        b13 = buf[:, off["b13"]:off["b13"] + G][:, inv]
        out.update(b1=b13[:, :F], b3=b13[:, F:] if spec.gated else None,
                   b2=buf[:, off["b2"]:off["b2"] + H])
    return out
