"""moegen's kernels as ``torch.library`` custom ops: ``moegen::moe``, ``moegen::route`` and
``moegen::experts``, with fake (meta) implementations, so ``torch.compile(fullgraph=True)``
traces them without a graph break and ``torch.library.opcheck`` passes.

How an op finds its compiled kernel
-----------------------------------
A custom op's arguments must be tensors and plain values that torch can trace, hash and write
into a graph; a loaded kernel is none of these.  So every op takes

* the activations, the packed weight buffer and the router as tensors (a `MoEBlock` owns the
  packed weights as buffers, so ``.to()``, ``state_dict`` and compiled graphs see them), and
* the kernel as a *handle*: the canonical JSON of its resolved `MoESpec` (a ``str``).

`kernel_handle(kernel)` registers a kernel under its handle; `kernel_for(handle)` finds it, and
when this process has not registered it (a graph that torch's compile cache stored, or one saved
with ``torch.export``, loaded in another process) compiles it through `moegen.compile` (disk
cache, per-process memo).  The handle names the layer, never a process-local id or address, so
a saved graph cannot call the wrong kernel, and it needs nothing beside the graph: a short
digest would need a table that a process on another machine, or after the cache was pruned,
does not have.  Its length costs nothing measurable per call: the op under a 32-character
handle of the same kernel measured as under the ~440-character JSON (docs/PERF.md, "where the
torch op's time goes"); the dispatcher's fixed cost of a Python-bodied op is the op's share.

Tensors are used zero-copy: CPU tensors are viewed as NumPy arrays (c backend); CUDA tensors'
data pointers go to the cuda backend's launches as they are, after the same checks (cuda
backend, `moegen.backends.cuda_launch`).  On the GPU the launches go to
``torch.cuda.current_stream()`` of the tensors' device; a tensor on another device than the
kernel's is refused with one line.  ``moe`` and ``route`` never synchronise; ``experts`` checks
the caller's expert ids before any launch, which reads one int back on the GPU (as
`MoEKernel.experts` does), so use ``moe`` (or ``route`` then ``experts`` on the CPU) inside a
CUDA graph.  The ops are for inference: non-differentiable (as argmax is), their outputs never
require grad; `moegen.torch.autograd` is the differentiable layer.
"""

from __future__ import annotations

import json
import threading
import weakref

import numpy as np
import torch

from ..kernel import MoEKernel
from ..layout import PackedWeights
from ..spec import MoESpec

_kernels: dict[str, MoEKernel] = {}
_lock = threading.Lock()


def kernel_handle(kernel: MoEKernel) -> str:
    """Register ``kernel`` and return its handle (the canonical JSON of its resolved spec)."""
    if not isinstance(kernel, MoEKernel):
        raise TypeError(f"kernel must be a MoEKernel (moegen.compile(spec)), got {type(kernel).__name__}")
    handle = json.dumps(kernel.spec.to_dict(), sort_keys=True, separators=(",", ":"))
    with _lock:
        _kernels.setdefault(handle, kernel)
    return handle


def kernel_for(handle: str) -> MoEKernel:
    """The kernel registered under ``handle``, compiled (from the disk cache when it is
    there) on first use in a process that has not registered it."""
    kernel = _kernels.get(handle)
    if kernel is None:
        from .. import compile as compile_kernel
        try:
            spec = MoESpec.from_dict(json.loads(handle))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"kernel handle must be the JSON of a MoESpec (moegen.torch."
                             f"kernel_handle(kernel)), got {handle[:80]!r}: {exc}") from None
        kernel = compile_kernel(spec)
        with _lock:
            kernel = _kernels.setdefault(handle, kernel)
    return kernel


# Validated PackedWeights per (kernel handle, buffer, router) tensor objects: the kernel then
# checks the weights once, not on every call.  Nothing here keeps the tensors alive: each
# PackedWeights is held by its buffer tensor (a cycle the garbage collector frees with the
# block that owns the tensors), and these tables hold weak references.  ``_last`` is the newest
# per handle: a model calls each block with the same tensors, and comparing two identities is
# cheaper than building the key.
_packed: "weakref.WeakValueDictionary[tuple, PackedWeights]" = weakref.WeakValueDictionary()
_last: dict[str, weakref.ref] = {}


def packed_weights(kernel: MoEKernel, handle: str, buffer, router) -> PackedWeights:
    ref = _last.get(handle)
    pw = None if ref is None else ref()
    if pw is not None and pw.buffer is buffer and pw.router is router:
        return pw
    key = (handle, id(buffer), id(router))
    pw = _packed.get(key)
    if pw is None or pw.buffer is not buffer or pw.router is not router:
        pw = PackedWeights(buffer, router, kernel.layout)
        _packed[key] = pw
        buffer.__dict__.setdefault("_moegen_packed", {})[handle] = pw
    _last[handle] = weakref.ref(pw)
    return pw


def _copy_into(dst: torch.Tensor, src) -> None:
    """Copy a workspace array (NumPy or CuPy, contiguous) into ``dst``; on the GPU as an async
    device-to-device copy on torch's current stream of ``dst``'s device."""
    if dst.numel() == 0:
        return
    if dst.is_cuda:
        import cupy  # the cuda backend's workspaces are CuPy arrays
        rt = cupy.cuda.runtime
        rt.memcpyAsync(dst.data_ptr(), src.data.ptr, dst.numel() * dst.element_size(),
                       rt.memcpyDeviceToDevice, torch.cuda.current_stream(dst.device).cuda_stream)
    else:
        np.copyto(dst.numpy(), np.asarray(src), casting="no")


def run_moe(x, buffer, router, router_bias, kernel: str) -> torch.Tensor:
    """The body of ``moegen::moe``, callable without the dispatcher (`MoEBlock` does in eager
    inference, where the op adds only dispatch time)."""
    k = kernel_for(kernel)
    out, _ = k.launch(k.stages, x, packed_weights(k, kernel, buffer, router), None, router_bias)
    return out


def _route(x, buffer, router, router_bias, kernel):
    k = kernel_for(kernel)
    _, ws = k.launch(k.route_stages, x, packed_weights(k, kernel, buffer, router), None, router_bias)
    ids = torch.empty((ws.tokens, k.spec.top_k), dtype=torch.int32, device=x.device)
    wts = torch.empty((ws.tokens, k.spec.top_k), dtype=torch.float32, device=x.device)
    _copy_into(ids, ws.topk_ids)
    _copy_into(wts, ws.topk_weights)
    return ids, wts


def _experts(x, buffer, router, topk_ids, topk_weights, kernel):
    k = kernel_for(kernel)
    out, _ = k.launch(k.experts_stages, x, packed_weights(k, kernel, buffer, router), None, None,
                      topk_ids, topk_weights)
    return out


# The ops are defined with the low-level `torch.library.Library` API, their bodies registered
# straight to the CPU and CUDA dispatch keys and their autograd key a fallthrough: a call then
# costs ~2.4 µs of dispatch (CPU dev box; ~2.8 µs handing back a new tensor) where
# ``torch.library.custom_op``'s Python autograd wrapper, aliasing check and dynamo guard cost
# ~9 µs (benchmarks/torch_overhead.py --parts --dispatch).  That floor is torch's: a handle of
# 32 characters or an int moves it by under 0.05 µs, one argument fewer by 0.1 to 0.3 µs, and
# the schema is what saved graphs call, so it stays.  The ops are
# non-differentiable, as argmax is: their outputs never require grad (`MoEBlock` refuses a
# backward through itself with one line; moegen.torch.autograd has the differentiable layer).
_lib = torch.library.Library("moegen", "DEF")
_SCHEMAS = {
    "moe": ("moe(Tensor x, Tensor buffer, Tensor router, Tensor? router_bias, str kernel) -> Tensor",
            run_moe),
    "route": ("route(Tensor x, Tensor buffer, Tensor router, Tensor? router_bias, str kernel) "
              "-> (Tensor, Tensor)", _route),
    "experts": ("experts(Tensor x, Tensor buffer, Tensor router, Tensor topk_ids, "
                "Tensor topk_weights, str kernel) -> Tensor", _experts),
}
for _name, (_schema, _body) in _SCHEMAS.items():
    _lib.define(_schema)
    _lib.impl(_name, _body, "CPU")
    _lib.impl(_name, _body, "CUDA")
    _lib.impl(_name, torch.library.fallthrough_kernel, "Autograd")


@torch.library.register_fake("moegen::moe", lib=_lib)
def _moe_fake(x, buffer, router, router_bias, kernel):
    return x.new_empty(x.shape)


@torch.library.register_fake("moegen::route", lib=_lib)
def _route_fake(x, buffer, router, router_bias, kernel):
    k = json.loads(kernel)["top_k"]
    tokens = x.numel() // x.shape[-1]
    return (x.new_empty((tokens, k), dtype=torch.int32),
            x.new_empty((tokens, k), dtype=torch.float32))


@torch.library.register_fake("moegen::experts", lib=_lib)
def _experts_fake(x, buffer, router, topk_ids, topk_weights, kernel):
    return x.new_empty(x.shape)


# moe(x, buffer, router, router_bias, kernel) -> y [..., H] like x: the whole layer.
moe = torch.ops.moegen.moe
# route(x, buffer, router, router_bias, kernel) -> (topk_ids [T, k] int32, topk_weights [T, k]
# float32): routing alone.
route = torch.ops.moegen.route
# experts(x, buffer, router, topk_ids, topk_weights, kernel) -> y [..., H] like x: the expert
# FFNs and the combine for a given routing.
experts = torch.ops.moegen.experts
