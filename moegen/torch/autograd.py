"""Training through torch.autograd: the layer as ``torch.library`` custom ops with a backward.

    y, aux = moe_train(spec, x, params, router_bias=None, balance_coeff=0.01, z_coeff=0.0)
    (loss(y) + aux).backward()           # grads on x, every parameter and the router bias

``params`` are the layer's logical weights as tensors, in `param_names(spec)` order: router
[E, H], w1 [E+S, F, H], w3 (gated), w2 [E+S, H, F], then b1, b3, b2 when ``spec.bias``.
``aux`` is the auxiliary loss (scalar): ``coeff · E · Σ f_e·P_e + z_coeff · mean(lse²)`` with
coeff = balance_coeff · (1 + var(f)) when ``adaptive`` (the seed's adaptive coefficient).

Two ops, both with fake implementations so torch.compile traces them (``moe_train`` under
``torch.compile`` needs torch >= 2.13: older dynamo cannot pass the frozen spec through):

* ``moegen_train::forward(x, params, router_bias, spec, balance_coeff, z_coeff, adaptive)
  -> (y, aux, gu)``, with ``torch.library.register_autograd`` calling
* ``moegen_train::backward(dy, daux, x, params, router_bias, gu, spec, ...) -> (dx, dparams,
  drouter_bias)``.

float32 tensors run the c backend: the forward is the compiled forward kernel, found by its
handle like every moegen op (`moegen.torch.ops.kernel_for`), and the backward the generated
backward kernels (`moegen.backward.MoEBackward`, from the kernel cache; it rebuilds the
forward's routing bitwise).  With ``spec.save_activations`` the forward also keeps the gate/up
pre-activations (``gu``: [T·(k+S), G] fp32, the first R rows used) for the backward, which
then skips that GEMM; otherwise ``gu`` is empty.  float64 tensors run the float64 reference
forward (`moegen.reference.moe`) and reference backward (`moegen.reference_backward`), so
``torch.autograd.gradcheck`` checks the very formulas the kernels implement.  ``spec`` travels
as the kernel handle: the canonical JSON of the c-backend `MoESpec`.

CUDA tensors (of the spec's dtype: float32, float16 or bfloat16) run the cuda backend: the
forward is the compiled cuda kernel of the spec (``backend='cuda'``, the device's arch) and the
backward the generated CUDA backward kernels (`moegen.backends.cuda_backward.CudaBackward`),
which rebuild the forward's routing with the kernel's own route and group stages.  Gradients are
accumulated in fp32 and stored by the kernels in the tensors' dtype (rounded once, no
conversion pass); only the router bias's (E values, fp32 in the kernels) is converted.
``save_activations`` is refused on CUDA (the CUDA backward always recomputes the gate/up
pre-activations).
"""

from __future__ import annotations

import json
import threading
from typing import Optional

import numpy as np
import torch

from .. import reference as ref
from ..backends.cuda_backward import CudaBackward
from ..backward import MoEBackward, check_trainable
from ..layout import weight_shapes
from ..reference_backward import aux_loss, balance_coefficient, moe_backward
from ..spec import MoESpec
from .ops import kernel_for

CUDA_SAVE_ACTIVATIONS = ("moegen training op: save_activations=True is not built on CUDA yet (the "
                         "CUDA backward recomputes the gate/up pre-activations); use "
                         "save_activations=False")

# torch dtype of each spec dtype the cuda training path takes
_CUDA_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_WEIGHTS = ("w1", "w3", "w2", "b1", "b3", "b2")


def param_names(spec: MoESpec) -> tuple[str, ...]:
    """Names of the parameter tensors the ops take, in order."""
    return tuple(weight_shapes(spec))


@torch.compiler.assume_constant_result      # a pure function of a frozen spec: no trace needed
def spec_handle(spec: MoESpec) -> str:
    """The canonical JSON of ``spec`` with backend c (no arch): the ops' ``spec`` argument (the
    CUDA path makes the cuda spec of it, for the device's arch)."""
    if not isinstance(spec, MoESpec):
        raise TypeError(f"spec must be a MoESpec, got {type(spec).__name__}")
    return json.dumps(spec.replace(backend="c", arch=None).to_dict(), sort_keys=True,
                      separators=(",", ":"))


def _spec(handle: str) -> MoESpec:
    """The spec of a handle (the forward kernel's, so a bad handle fails as in every op)."""
    return kernel_for(handle).spec


# The backward kernels of each handle in this process (they keep per-thread scratch buffers
# between steps); the binary itself comes from the kernel cache.
_backwards: dict[str, MoEBackward] = {}
_lock = threading.Lock()


def _backward(handle: str) -> MoEBackward:
    bwd = _backwards.get(handle)
    if bwd is None:
        bwd = MoEBackward(_spec(handle))
        with _lock:
            bwd = _backwards.setdefault(handle, bwd)
    return bwd


def _cuda_spec(handle: str) -> MoESpec:
    """The cuda-backend spec of a (c-backend) handle; its arch is the device's."""
    return MoESpec.from_dict(json.loads(handle)).replace(backend="cuda", arch=None)


# The cuda forward kernel and backward kernels of each handle in this process.
_cuda_layers: dict[str, tuple] = {}


def _cuda_layer(handle: str) -> tuple:
    """(forward MoEKernel, CudaBackward) of a handle, built (or found in the cache) once."""
    layer = _cuda_layers.get(handle)
    if layer is None:
        s = _cuda_spec(handle)
        kernel = kernel_for(json.dumps(s.to_dict(), sort_keys=True, separators=(",", ":")))
        layer = (kernel, CudaBackward(kernel.spec))
        with _lock:
            layer = _cuda_layers.setdefault(handle, layer)
    return layer


def _gu_rows(spec: MoESpec, x: torch.Tensor) -> int:
    """Rows of the kept pre-activations: T·(k+S) when kept (float32 c path), else 0."""
    keep = spec.save_activations and x.dtype == torch.float32 and not x.is_cuda
    return x.shape[0] * (spec.top_k + spec.num_shared_experts) if keep else 0


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _logical(spec: MoESpec, params) -> dict:
    """The reference's weight dict from the parameter tensors (NumPy views, no copy)."""
    w = dict.fromkeys(_WEIGHTS)
    w.update(zip(param_names(spec), (_np(p) for p in params)))
    return w


def _check(spec: MoESpec, x, params, router_bias) -> None:
    """One clear line for a wrong argument, before anything runs."""
    check_trainable(spec)
    if x.is_cuda:
        want = _CUDA_DTYPES.get(spec.dtype)
        if x.dtype != want:
            raise TypeError(f"x on CUDA must have the spec's dtype {spec.dtype} (float32, float16 "
                            f"or bfloat16 specs), got {x.dtype}")
        if spec.save_activations:
            raise ValueError(CUDA_SAVE_ACTIVATIONS)
        for name, t in (("router_bias", router_bias), *zip(weight_shapes(spec), params)):
            if t is not None and t.device != x.device:
                raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    elif x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x must be float32 (c backend kernels) or float64 (reference), got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != spec.hidden_dim:
        raise ValueError(f"x must have shape [T, {spec.hidden_dim}], got {tuple(x.shape)}")
    shapes = weight_shapes(spec)
    if len(params) != len(shapes):
        raise ValueError(f"params must be the {len(shapes)} tensors {list(shapes)}, got {len(params)}")
    for (name, shape), p in zip(shapes.items(), params):
        if tuple(p.shape) != shape or p.dtype != x.dtype:
            raise ValueError(f"params[{name!r}] must be {x.dtype} of shape {shape}, got "
                             f"{p.dtype} of shape {tuple(p.shape)}")
    E = spec.num_experts
    if router_bias is not None and tuple(router_bias.shape) != (E,):
        raise ValueError(f"router_bias must have shape ({E},), got {tuple(router_bias.shape)}")


# -- forward ---------------------------------------------------------------------------------
@torch.library.custom_op("moegen_train::forward", mutates_args=())
def _forward(x: torch.Tensor, params: list[torch.Tensor], router_bias: Optional[torch.Tensor],
             spec: str, balance_coeff: float, z_coeff: float,
             adaptive: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.is_cuda:
        return _cuda_forward(x, params, router_bias, spec, balance_coeff, z_coeff, adaptive)
    s = _spec(spec)
    w = _logical(s, params)
    bias = _np(router_bias) if router_bias is not None else None
    T = x.shape[0]
    if x.dtype == torch.float64:
        y, info = ref.moe(s, _np(x), w, router_bias=bias)
        aux = aux_loss(s, info["counts"], info["probs"], info["logits"], balance_coeff, z_coeff,
                       adaptive) if T else 0.0
        return (torch.from_numpy(np.ascontiguousarray(y)), torch.tensor(aux, dtype=torch.float64),
                _empty_gu(s, x))
    kernel = kernel_for(spec)
    packed = kernel.pack(**ref.pack_kwargs(s, w))
    y, st = kernel(_np(x), packed, router_bias=None if bias is None else bias.astype(np.float32),
                   return_stats=True)
    d = st.as_dict()
    coef = balance_coefficient(d["usage"], balance_coeff, adaptive)
    aux = coef * d["aux_loss"] + z_coeff * d["z_loss"] if T else 0.0
    gu = _empty_gu(s, x)
    if gu.shape[0]:
        bwd = _backward(spec)
        kept = bwd.save(_np(x), bwd.prepare(w), None if bias is None else bias.astype(np.float32)).gu
        gu.numpy()[:len(kept)] = kept
    return torch.from_numpy(y), torch.tensor(aux, dtype=torch.float32), gu


def _empty_gu(s: MoESpec, x: torch.Tensor) -> torch.Tensor:
    G = s.ffn_dim * (2 if s.gated else 1)
    return torch.zeros((_gu_rows(s, x), G), dtype=torch.float32, device=x.device)


def _packed(handle: str, kernel, s: MoESpec, params, *, keep: bool):
    """``kernel.pack`` of the parameter tensors.  The forward keeps its packing per handle
    (``keep``) for the backward of the same step, which takes it back if every tensor is still
    the same memory at the same version (else it packs again): one packed copy per handle,
    held until that backward or the handle's next forward."""
    key = tuple((p.data_ptr(), p._version, tuple(p.shape)) for p in params)
    hit = _cuda_packed.pop(handle, None)
    if hit is not None and hit[0] == key:
        packed = hit[1]
    else:
        packed = kernel.pack(**ref.pack_kwargs(s, dict(zip(param_names(s), params))))
    if keep:
        _cuda_packed[handle] = (key, packed)
    return packed


# The packed weights of the last CUDA forward per handle, for its backward (see `_packed`).
_cuda_packed: dict[str, tuple] = {}


def _cuda_forward(x, params, router_bias, handle, balance_coeff, z_coeff, adaptive):
    """The forward on CUDA tensors: the cuda kernel and the aux loss computed on the device
    from its statistics (no read-back, no synchronisation); no kept pre-activations."""
    kernel, bwd = _cuda_layer(handle)
    s = bwd.spec
    if not x.shape[0]:
        return torch.empty_like(x), torch.zeros((), dtype=x.dtype, device=x.device), _empty_gu(s, x)
    bias = None if router_bias is None else router_bias.float().contiguous()
    y, aux = bwd.forward(kernel, x, _packed(handle, kernel, s, params, keep=True), bias,
                         balance_coeff=balance_coeff, z_coeff=z_coeff, adaptive=adaptive)
    return y, aux.reshape(()).to(x.dtype), _empty_gu(s, x)


def _cuda_backward(dy, daux, x, params, router_bias, handle, balance_coeff, z_coeff, adaptive):
    """The backward on CUDA tensors: the generated CUDA backward kernels, which write the
    gradients in x's dtype (the router bias's, fp32 in the kernels, is converted here)."""
    kernel, bwd = _cuda_layer(handle)
    s = bwd.spec
    bias = None if router_bias is None else router_bias.float().contiguous()
    packed = _packed(handle, kernel, s, params, keep=False) if x.shape[0] else None
    g = bwd.backward(kernel, x, dict(zip(param_names(s), params)), dy.to(x.dtype).contiguous(),
                     bias, daux, balance_coeff=balance_coeff, z_coeff=z_coeff, adaptive=adaptive,
                     packed=packed)
    dt = x.dtype                                    # the spec's (checked): the kernels' output
    dx = g.pop("x")
    dparams = [g.pop(n) for n in param_names(s)]
    dbias = g.pop("router_bias")
    dbias = (torch.zeros(s.num_experts, dtype=dt, device=x.device) if dbias is None
             else dbias.to(dt))
    return dx, dparams, dbias


@_forward.register_fake
def _forward_fake(x, params, router_bias, spec, balance_coeff, z_coeff, adaptive):
    s = MoESpec.from_dict(json.loads(spec))
    G = s.ffn_dim * (2 if s.gated else 1)
    return torch.empty_like(x), x.new_empty(()), x.new_empty((_gu_rows(s, x), G), dtype=torch.float32)


# -- backward --------------------------------------------------------------------------------
@torch.library.custom_op("moegen_train::backward", mutates_args=())
def _backward_op(dy: torch.Tensor, daux: torch.Tensor, x: torch.Tensor,
                 params: list[torch.Tensor], router_bias: Optional[torch.Tensor], gu: torch.Tensor,
                 spec: str, balance_coeff: float, z_coeff: float,
                 adaptive: bool) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    if x.is_cuda:
        return _cuda_backward(dy, daux, x, params, router_bias, spec, balance_coeff, z_coeff,
                              adaptive)
    s = _spec(spec)
    w = _logical(s, params)
    bias = _np(router_bias) if router_bias is not None else None
    kw = dict(daux=float(daux), balance_coeff=balance_coeff, z_coeff=z_coeff, adaptive=adaptive)
    if x.dtype == torch.float64:
        g = moe_backward(s, _np(x), w, _np(dy), bias, **kw)
    else:
        bwd = _backward(spec)
        bw = bwd.prepare(w)
        b32 = None if bias is None else bias.astype(np.float32)
        state = bwd.save(_np(x), bw, b32, gu=_np(gu)) if s.save_activations else None
        g = bwd.backward(_np(x), bw, _np(dy), b32, state=state, **kw)
    dt = x.dtype
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dt)  # noqa: E731
    dbias = g["router_bias"] if g["router_bias"] is not None else np.zeros(s.num_experts)
    return as_t(g["x"]), [as_t(g[n]) for n in param_names(s)], as_t(dbias)


@_backward_op.register_fake
def _backward_fake(dy, daux, x, params, router_bias, gu, spec, balance_coeff, z_coeff, adaptive):
    E = json.loads(spec)["num_experts"]
    return torch.empty_like(x), [torch.empty_like(p) for p in params], x.new_empty((E,))


def _setup_context(ctx, inputs, output):
    x, params, router_bias, spec, balance_coeff, z_coeff, adaptive = inputs
    gu = output[2]
    ctx.mark_non_differentiable(gu)
    ctx.save_for_backward(x, router_bias, gu, *params)
    ctx.args = (spec, balance_coeff, z_coeff, adaptive)
    ctx.has_bias = router_bias is not None


def _autograd_backward(ctx, dy, daux, _dgu):
    x, router_bias, gu, *params = ctx.saved_tensors
    spec, balance_coeff, z_coeff, adaptive = ctx.args
    dx, dparams, dbias = _backward_op(dy.contiguous(), daux, x, list(params),
                                      router_bias if ctx.has_bias else None, gu, spec,
                                      balance_coeff, z_coeff, adaptive)
    return dx, dparams, dbias if ctx.has_bias else None, None, None, None, None


torch.library.register_autograd("moegen_train::forward", _autograd_backward,
                                setup_context=_setup_context)


def moe_train(spec: MoESpec, x: torch.Tensor, params, router_bias=None, *,
              balance_coeff: float = 0.01, z_coeff: float = 0.0, adaptive: bool = True):
    """The layer with autograd: returns (y [T, H], aux scalar).  See the module docstring."""
    params = list(params)
    _check(spec, x, params, router_bias)
    y, aux, _ = _forward(x.contiguous(), [p.contiguous() for p in params], router_bias,
                         spec_handle(spec), float(balance_coeff), float(z_coeff), bool(adaptive))
    return y, aux
