"""The layer's backward pass on the c backend: generated kernels driven stage by stage.

    bwd = MoEBackward(spec)                        # the backward binary, from the kernel cache
    bw = bwd.prepare(w)                            # logical weights -> the backward's copies
    g = bwd.backward(x, bw, dy, router_bias, daux=1.0, balance_coeff=0.01, z_coeff=1e-3)
    g["x"], g["w1"], g["w2"], g["router"], ...     # fp32, logical (nn.Linear) orientation

The loss differentiated is the one of `moegen.reference_backward`: ``<dy, y> + daux · aux``
with aux = coeff · E · Σ f_e·P_e + z_coeff · mean(logsumexp²) and, when ``adaptive``,
coeff = balance_coeff · (1 + var(f)), the seed's adaptive coefficient.

The routing is recomputed by the same generated route and group code as the forward kernel
(bitwise the same top-k and capacity decisions); the gate/up pre-activations are recomputed
(``spec.save_activations`` False) or kept from `MoEBackward.save` (True: memory for speed).
Gradients are fp32 whatever the storage dtype.  No atomics anywhere: every output element is
summed by one thread in a fixed order, so two backward passes are bitwise equal, whatever the
thread count; there is no atomic mode.
Scratch buffers are kept per calling thread and reused while the batch shape stays the same.
"""

from __future__ import annotations

import ctypes
import dataclasses
import threading
from dataclasses import dataclass

import numpy as np

from . import settings
from .backward_build import load_backward
from .layout import weight_shapes
from .reference import capacity as expert_capacity
from .reference_backward import ACT_GRAD, balance_coefficient
from .spec import MoESpec

_P, _L, _I, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float

_SIGNATURES = {
    "moe_route": (_P, _P, _P, _L, _P, _P, _P, _P, _I),
    "moe_group": (_P, _L, _P, _P, _P),
    "moe_group_capacity": (_P, _P, _L, _L, _P, _P, _P, _P, _P, _P, _P),
    "bwd_gather": (_P, _P, _P, _P, _L, _P, _P, _I),
    "bwd_gateup": (_P, _P, _P, _P, _L, _P, _I),
    "bwd_hidden": (_P, _P, _P, _P, _P, _P, _P, _L, _P, _P, _P, _P, _I),
    "bwd_dx_rows": (_P, _P, _P, _L, _P, _I),
    "bwd_logits": (_P, _P, _P, _L, _P, _I),
    "bwd_route": (_P, _P, _P, _P, _P, _P, _F, _F, _P, _L, _P, _P, _I),
    "bwd_combine": (_P, _P, _P, _P, _L, _P, _P, _I),
    "bwd_weights": (_P,) * 7 + (_L,) + (_P,) * 6 + (_I,),
}


# The MoESpec fields whose every value the backward (kernels and float64 reference) handles.
# A field added later is refused at any value but its default until its gradient is written
# and tested (a semantic the backward ignored would give silently wrong gradients).
BACKWARD_FIELDS = frozenset({
    "num_experts", "top_k", "hidden_dim", "ffn_dim", "dtype", "activation", "routing",
    "renormalize", "bias", "backend", "arch", "n_group", "topk_group", "routed_scaling_factor",
    "num_shared_experts", "capacity_factor", "capacity_drop", "save_activations"})


def check_trainable(spec: MoESpec) -> None:
    """ValueError in one line when the backward has no gradient for a semantic of ``spec``: a
    field outside `BACKWARD_FIELDS` set away from its default, or an activation whose
    derivative is not built."""
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if f.name not in BACKWARD_FIELDS and value != f.default:
            raise ValueError(f"MoEBackward has no gradient for MoESpec.{f.name}={value!r} yet "
                             f"(training needs its default {f.default!r}; the forward layer "
                             f"runs it)")
    if spec.act.fn not in ACT_GRAD:
        raise ValueError(f"MoEBackward has no gradient for activation={spec.activation!r} yet "
                         f"(it has the derivatives of {sorted(ACT_GRAD)}; the forward layer "
                         f"runs it)")


def _ptr(a):
    return None if a is None else a.ctypes.data


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


@dataclass
class BackwardWeights:
    """The weights as the backward GEMMs read them (fp32, logical orientation), plus the router
    in the forward route stage's layout and dtype.  From `MoEBackward.prepare`."""
    w13: np.ndarray        # [E+S, G, H]   gate rows then up rows
    w2: np.ndarray         # [E+S, H, F]
    b13: np.ndarray | None  # [E+S, G]
    b2: np.ndarray | None   # [E+S, H]
    router: np.ndarray     # [E, H] fp32
    router_route: np.ndarray  # [H, E] in the spec dtype, for moe_route


@dataclass
class Routing:
    """The forward's routing rebuilt for a backward pass (and, with save_activations, the
    gate/up pre-activations): from `MoEBackward.save`."""
    tokens: int
    ids: np.ndarray        # [T, k] int32
    raw_w: np.ndarray      # [T, k] fp32: the route stage's weights
    final_w: np.ndarray    # [T, k] fp32: after capacity (= raw_w when dropless)
    kept: np.ndarray | None  # [T*k] uint8 (capacity only)
    counts: np.ndarray     # [E] int32: kept slots per expert
    offsets: np.ndarray    # [E+1] int32
    order: np.ndarray      # [T*k] int32
    xf: np.ndarray         # [T, H] fp32
    xs: np.ndarray         # [R, H] fp32: x in sorted row order
    gu: np.ndarray | None  # [R, G] fp32 (kept activations)


class MoEBackward:
    """Backward kernels of one spec on the c backend (see the module docstring).

    ``spec.save_activations``: keep the gate/up pre-activations from `save` for the backward
    instead of recomputing them (one [rows, G] fp32 buffer per step against one GEMM).
    """

    def __init__(self, spec: MoESpec):
        if not isinstance(spec, MoESpec):
            raise TypeError(f"spec must be a MoESpec, got {type(spec).__name__}")
        if spec.backend not in ("c", "auto"):
            raise ValueError(f"MoEBackward runs on the c backend; spec.backend must be 'c', "
                             f"got {spec.backend!r} (the CUDA backward is moegen.backends.cuda_backward."
                             f"CudaBackward)")
        check_trainable(spec)
        self.spec = spec.replace(backend="c")
        self.save_activations = self.spec.save_activations
        self._buffers: dict[tuple, np.ndarray] = {}
        lib = ctypes.CDLL(str(load_backward(self.spec)))
        self._fn = {}
        for name, argtypes in _SIGNATURES.items():
            if name == "moe_group_capacity" and self.spec.capacity_factor is None:
                continue
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
            self._fn[name] = fn

    def _scratch(self, name: str, shape: tuple, dtype=np.float32) -> np.ndarray:
        """A scratch buffer of the calling thread, reused while its shape stays the same (a
        training loop with a fixed batch allocates none after the first step)."""
        key = (threading.get_ident(), name)
        a = self._buffers.get(key)
        if a is None or a.shape != shape:
            a = self._buffers[key] = np.empty(shape, dtype)
        return a

    def _call(self, name, *args):
        rc = self._fn[name](*args)
        if rc != 0:
            raise RuntimeError(f"{self.spec.name}: C backward stage {name} returned {rc}")

    # -- weights -----------------------------------------------------------------------------
    def prepare(self, w: dict) -> BackwardWeights:
        """fp32 copies of logical weights (`moegen.reference.random_problem`'s dict: router
        [E, H], w1/w3 [E+S, F, H], w2 [E+S, H, F], biases); W1 and W3 side by side."""
        spec = self.spec
        for name, shape in weight_shapes(spec).items():
            a = w.get(name)
            if a is None or tuple(np.shape(a)) != shape:
                raise ValueError(f"weights[{name!r}] must have shape {shape}, got "
                                 f"{None if a is None else tuple(np.shape(a))}")
        w13 = _f32(np.concatenate([w["w1"], w["w3"]], axis=1) if spec.gated else w["w1"])
        b13 = None
        if spec.bias:
            b13 = _f32(np.concatenate([w["b1"], w["b3"]], axis=1) if spec.gated else w["b1"])
        router = _f32(w["router"])
        return BackwardWeights(
            w13=w13, w2=_f32(w["w2"]),
            b13=b13, b2=_f32(w["b2"]) if spec.bias else None, router=router,
            router_route=np.ascontiguousarray(np.asarray(w["router"]).astype(spec.router_dt.numpy).T))

    # -- checks ------------------------------------------------------------------------------
    def _check_x(self, x) -> np.ndarray:
        spec = self.spec
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != spec.hidden_dim:
            raise ValueError(f"x must have shape [T, {spec.hidden_dim}], got {x.shape}")
        if x.dtype != spec.dt.numpy:
            raise TypeError(f"x must have dtype {spec.dtype}, got {x.dtype}")
        return np.ascontiguousarray(x)

    def _check_weights(self, bw) -> None:
        """``bw`` must come from this spec's `prepare` (the kernels trust its shapes)."""
        if not isinstance(bw, BackwardWeights):
            raise TypeError(f"weights must be the BackwardWeights of MoEBackward.prepare(...), got "
                            f"{type(bw).__name__}")
        s = weight_shapes(self.spec)
        n, F, H = s["w1"]
        G = F * (2 if self.spec.gated else 1)
        got = (bw.w13.shape, bw.w2.shape, bw.router.shape)
        if got != ((n, G, H), s["w2"], s["router"]):
            raise ValueError(f"weights were prepared for another layer: w13/w2/router shapes {got}, "
                             f"this layer needs {((n, G, H), s['w2'], s['router'])}")

    def _check_bias(self, router_bias):
        if router_bias is None:
            return None
        b = np.asarray(router_bias)
        if b.shape != (self.spec.num_experts,):
            raise ValueError(f"router_bias must have shape ({self.spec.num_experts},), got {b.shape}")
        return _f32(b)

    # -- forward state -----------------------------------------------------------------------
    def save(self, x, bw: BackwardWeights, router_bias=None, gu=None) -> Routing:
        """The routing of a forward pass (and the gate/up pre-activations when
        ``save_activations``), for `backward`.  Call at forward time with the same inputs.
        ``gu``: pre-activations an earlier `save` of the same inputs returned (``Routing.gu``,
        or a float32 array whose first rows are it), reused instead of computed (the routing
        is rebuilt, bitwise the same)."""
        spec = self.spec
        x = self._check_x(x)
        self._check_weights(bw)
        bias = self._check_bias(router_bias)
        T, K, E, S = x.shape[0], spec.top_k, spec.num_experts, spec.num_shared_experts
        nth = settings.num_threads()
        ids = np.zeros((T, K), np.int32)
        raw_w = np.zeros((T, K), np.float32)
        partials = np.zeros(1, np.float64)
        counts = np.zeros(E, np.int32)
        offsets = np.zeros(E + 1, np.int32)
        order = np.zeros(max(T * K, 1), np.int32)
        kept = None
        final_w = raw_w
        if T:
            self._call("moe_route", _ptr(x), _ptr(bw.router_route), _ptr(bias), T, _ptr(ids),
                       _ptr(raw_w), _ptr(partials), None, nth)
        if spec.capacity_factor is None:
            self._call("moe_group", _ptr(ids), T, _ptr(counts), _ptr(offsets), _ptr(order))
        else:
            kept = np.ones(max(T * K, 1), np.uint8)
            dropped = np.zeros(E, np.int32)
            scratch = np.zeros(max(2 * T * K, 1), np.int32)
            cap_w = np.zeros((T, K), np.float32) if spec.renormalize else None
            cap = min(expert_capacity(spec, T), T * K)
            self._call("moe_group_capacity", _ptr(ids), _ptr(raw_w), T, cap, _ptr(counts),
                       _ptr(offsets), _ptr(order), _ptr(kept), _ptr(cap_w), _ptr(dropped),
                       _ptr(scratch))
            if cap_w is not None:
                final_w = cap_w
        xf = _f32(x)
        R = int(offsets[E]) + S * T
        xs = np.empty((R, spec.hidden_dim), np.float32)
        st = Routing(T, ids, raw_w, final_w, kept, counts, offsets, order, xf, xs, None)
        self._call("bwd_gather", _ptr(xf), None, _ptr(offsets), _ptr(order), T, _ptr(xs), None,
                   nth)
        if gu is not None:
            gu = np.asarray(gu)
            G = bw.w13.shape[1]
            if gu.ndim != 2 or gu.shape[0] < R or gu.shape[1] != G or gu.dtype != np.float32:
                raise ValueError(f"gu must be float32 of shape [>= {R}, {G}] (Routing.gu of the "
                                 f"same inputs), got {gu.dtype} of shape {gu.shape}")
            st.gu = np.ascontiguousarray(gu[:R])
        elif self.save_activations:
            st.gu = self._gateup(st, bw, nth)
        return st

    def _gateup(self, st: Routing, bw: BackwardWeights, nth: int) -> np.ndarray:
        gu = np.empty((len(st.xs), bw.w13.shape[1]), np.float32)
        self._call("bwd_gateup", _ptr(st.xs), _ptr(bw.w13), _ptr(bw.b13), _ptr(st.offsets),
                   st.tokens, _ptr(gu), nth)
        return gu

    # -- backward ----------------------------------------------------------------------------
    def backward(self, x, bw: BackwardWeights, dy, router_bias=None, *, daux: float = 0.0,
                 balance_coeff: float = 0.0, z_coeff: float = 0.0, adaptive: bool = True,
                 state: Routing | None = None) -> dict:
        """Gradients of ``<dy, y> + daux · aux`` (module docstring), fp32, logical orientation:
        x [T, H], router [E, H], router_bias [E] (None for sigmoid_topk or no bias), w1, w3, w2,
        b1, b3, b2 over E+S experts (None where absent), topk_weights [T, k] (the final routing
        weights' gradient; 0 for dropped slots), balance_coeff (the coefficient applied).

        ``state`` is `save`'s result for the same x/weights/bias (required with
        save_activations; else rebuilt here)."""
        spec = self.spec
        x = self._check_x(x)
        dy = np.asarray(dy)
        if dy.shape != x.shape:
            raise ValueError(f"dy must have the shape of x {x.shape}, got {dy.shape}")
        self._check_weights(bw)
        dy = _f32(dy)
        if state is None:
            if self.save_activations:
                raise ValueError("save_activations=True: pass state=MoEBackward.save(...) from "
                                 "the forward pass")
            state = self.save(x, bw, router_bias)
        elif not isinstance(state, Routing) or state.offsets.shape != (spec.num_experts + 1,):
            raise TypeError(f"state must be this layer's MoEBackward.save(...), got "
                            f"{type(state).__name__}")
        elif state.tokens != x.shape[0]:
            raise ValueError(f"state is for {state.tokens} tokens, x has {x.shape[0]}")
        bias = self._check_bias(router_bias)
        E, S, K, H, F = (spec.num_experts, spec.num_shared_experts, spec.top_k, spec.hidden_dim,
                         spec.ffn_dim)
        G, T, n = bw.w13.shape[1], state.tokens, E + S
        nth = settings.num_threads()
        st = state
        R = len(st.xs)
        gu = st.gu if st.gu is not None else self._gateup(st, bw, nth)
        dys = self._scratch("dys", (R, H))
        self._call("bwd_gather", None, _ptr(dy), _ptr(st.offsets), _ptr(st.order), T, None,
                   _ptr(dys), nth)
        dhu = self._scratch("dhu", (R, F))
        h = self._scratch("h", (R, F))
        dgu = self._scratch("dgu", (R, G))
        dfinal = np.zeros((T, K), np.float32)
        self._call("bwd_hidden", _ptr(dys), _ptr(gu), _ptr(bw.w2), _ptr(bw.b2), _ptr(st.final_w),
                   _ptr(st.offsets), _ptr(st.order), T, _ptr(dhu), _ptr(h), _ptr(dgu),
                   _ptr(dfinal), nth)
        dxs = self._scratch("dxs", (R, H))
        self._call("bwd_dx_rows", _ptr(dgu), _ptr(bw.w13), _ptr(st.offsets), T, _ptr(dxs), nth)
        logits = self._scratch("logits", (T, E))
        self._call("bwd_logits", _ptr(st.xf), _ptr(bw.router), _ptr(bias), T, _ptr(logits), nth)
        total = int(st.counts.sum())
        usage = (st.counts / total) if total else np.zeros(E)
        coef = balance_coefficient(usage, balance_coeff, adaptive)
        bal = daux * coef * E / T if T else 0.0
        zc = daux * z_coeff * 2.0 / T if T else 0.0
        usage32 = _f32(usage)
        dlogits = self._scratch("dlogits", (T, E))
        dxr = self._scratch("dxr", (T, H))
        self._call("bwd_route", _ptr(logits), _ptr(st.ids), _ptr(st.raw_w), _ptr(st.kept),
                   _ptr(dfinal), _ptr(usage32), bal, zc, _ptr(bw.router), T, _ptr(dlogits),
                   _ptr(dxr), nth)
        dx = np.empty((T, H), np.float32)
        pos = self._scratch("pos", (max(T * K, 1),), np.int32)
        self._call("bwd_combine", _ptr(dxs), _ptr(dxr), _ptr(st.offsets), _ptr(st.order), T,
                   _ptr(pos), _ptr(dx), nth)
        dw13 = np.empty((n, G, H), np.float32)
        dw2 = np.empty((n, H, F), np.float32)
        db13 = np.empty((n, G), np.float32) if spec.bias else None
        db2 = np.empty((n, H), np.float32) if spec.bias else None
        drouter = np.empty((E, H), np.float32)
        has_bias_grad = bias is not None and spec.routing != "sigmoid_topk"
        dbias = np.empty(E, np.float32) if has_bias_grad else None
        self._call("bwd_weights", _ptr(st.xs), _ptr(dgu), _ptr(dys), _ptr(h), _ptr(st.xf),
                   _ptr(dlogits), _ptr(st.offsets), T, _ptr(dw13),
                   _ptr(db13), _ptr(dw2), _ptr(db2), _ptr(drouter), _ptr(dbias), nth)
        out = {"x": dx, "router": drouter, "router_bias": dbias, "w2": dw2, "b2": db2,
               "topk_weights": dfinal, "balance_coeff": coef}
        out["w1"] = dw13[:, :F] if spec.gated else dw13
        out["w3"] = dw13[:, F:] if spec.gated else None
        out["b1"] = (db13[:, :F] if spec.gated else db13) if spec.bias else None
        out["b3"] = db13[:, F:] if spec.bias and spec.gated else None
        return out
