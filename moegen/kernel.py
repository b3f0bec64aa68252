"""`MoEKernel`: the callable a user gets from `moegen.compile`.

It validates every argument before any launch (shape, dtype, device, contiguity, expert ids),
so a rejected call writes nothing, then drives the loaded backend `Module` stage by stage on
the module's workspaces.  Shapes: x [..., H] (a leading batch shape is flattened to T tokens),
out like x; routing tensors [T, k].
"""

from __future__ import annotations

import math

import numpy as np

from . import arrays
from .backends.base import Call
from .layout import (PACK_KEYWORDS, PackedWeights, bf16_bits_as_float32, cupy_bf16_bits,
                     logical_weights, on_gpu, pack_device, pack_host)
from .profiling import profile_kernel
from .spec import MoESpec
from .stats import LayerStats

# Byte alignment the cuda kernels need of the packed buffer and router (16-byte vector loads).
_WEIGHT_ALIGN = 16

# Descriptions of accepted activations remembered per kernel (one per leading shape in use).
_ACCEPTED_X_MAX = 256

# stages tuple -> whether one of them reads the router (asked on every call).
_READS_ROUTER: dict = {}


class MoEKernel:
    """A compiled MoE layer for one `MoESpec`.

    Attributes: ``spec``, ``name``, ``key`` (the cache key), ``backend`` ("c" or "cuda"),
    ``target`` (ISA tier or sm arch), ``layout`` (the packed weight layout), ``stages``.
    """

    def __init__(self, spec: MoESpec, module, meta: dict | None = None):
        self.spec = spec
        self._module = module
        self.meta = dict(meta or {})
        self.layout = module.layout
        self.stages = tuple(module.stages)
        self._storage = arrays.storage_dtypes(spec.dtype, module.device_kind)
        self._router_storage = arrays.storage_dtypes(spec.router_dt.name, module.device_kind)
        # The CUDA device the module was loaded on (None for the c backend): every device array
        # of a call must live there.
        device = getattr(module, "device", None)
        self.device_index = None if device is None else int(getattr(device, "id", device))
        self._device = dict(device_kind=module.device_kind, device_index=self.device_index)
        self._accepted_x: dict[tuple, int] = {}
        # (user's array, module's native view) of a new output in one step, where the module
        # has it (the c backend: NumPy memory shared with torch, no second conversion)
        self._empty_native = getattr(module, "empty_native", None)
        # Modules that take the call's data pointers and replay pre-packed launches (cuda):
        # no per-call array views.
        self._enqueue = getattr(module, "enqueue", None)

    # -- identity ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def key(self) -> str:
        return self.meta.get("key", "")

    @property
    def backend(self) -> str:
        return self.spec.backend

    @property
    def target(self) -> str:
        return self.meta.get("target", "")

    @property
    def module(self):
        return self._module

    def __repr__(self) -> str:
        return f"MoEKernel({self.name}, backend={self.backend}, target={self.target}, key={self.key[:16]})"

    @property
    def route_stages(self) -> tuple[str, ...]:
        """The launches of `route` (routing alone)."""
        return tuple(s for s in self.stages if s.startswith("route"))

    @property
    def experts_stages(self) -> tuple[str, ...]:
        """The launches of `experts` (group, expert FFNs, combine for a given routing)."""
        stages = tuple(s for s in self.stages if not s.startswith("route"))
        return ("group",) * ("group" not in stages and "route+group" in self.stages) + stages

    # -- weights -----------------------------------------------------------------------------
    def pack(self, **weights) -> PackedWeights:
        """Pack expert weights into this kernel's contiguous layout, on its device.

        Keywords (see `moegen.layout.logical_weights`): ``router`` [E, H] or [H, E];
        either ``w1``, ``w3`` [E, F, H] (or lists of per-expert [F, H], HF Mixtral) or
        ``w13`` [E, 2F, H] (vLLM); ``w2`` [E, H, F]; biases when ``spec.bias``; shared
        experts' ``shared_w1``... when ``spec.num_shared_experts``; ``expert_ids`` for an
        expert-parallel shard (the global ids of the experts this kernel holds; no router).
        NumPy, CuPy or torch arrays; values are cast to the spec dtype.

        On the cuda backend, weights that are all on the GPU (torch CUDA tensors or CuPy arrays,
        on the kernel's device) are packed there, never through host memory: torch in gives
        torch tensors out, CuPy gives CuPy.  Anything else is packed on the host and copied
        to the device once.  Raises ValueError/TypeError naming the argument.
        """
        unknown = sorted(set(weights) - set(PACK_KEYWORDS))
        if unknown:
            raise TypeError(f"pack() got unknown keyword(s) {unknown}; valid keywords: "
                            f"{', '.join(PACK_KEYWORDS)}")
        if self._module.device_kind == "cuda" and self._all_on_device(weights):
            return self._pack_on_device(weights)
        logical = logical_weights(self.spec, **weights)
        buf, router = pack_host(self.layout, logical)
        return PackedWeights(self._module.to_device(buf),
                             None if router is None else self._module.to_device(router),
                             self.layout, logical["expert_ids"])

    def _all_on_device(self, weights) -> bool:
        """True when every weight array is on a GPU; each must then be on this kernel's."""
        found = [(f"{k}[{i}]" if isinstance(v, (list, tuple)) else k, a)
                 for k, v in weights.items() if k not in ("router_layout", "expert_ids")
                 and v is not None
                 for i, a in enumerate(v if isinstance(v, (list, tuple)) else [v])]
        if not found or not all(on_gpu(a) for _, a in found):
            return False
        for name, a in found:
            arrays.check(arrays.describe(a, name), name, **self._device)
        return True

    def _pack_on_device(self, weights) -> PackedWeights:
        logical = logical_weights(self.spec, device=True, **weights)
        first = next(v for k, v in logical.items() if k != "expert_ids" and v is not None)
        if type(first).__module__.startswith("torch"):
            import torch  # torch inputs: pack with torch ops on their device
            tdt, rdt = getattr(torch, self.spec.dtype), getattr(torch, self.spec.router_dt.name)
            dev = first.device
            buf, router = pack_device(self.layout, logical,
                                      lambda shape: torch.zeros(shape, dtype=tdt, device=dev),
                                      lambda shape: torch.zeros(shape, dtype=rdt, device=dev))
        else:
            xp = self._module.xp
            storage = np.dtype(np.uint16) if self.spec.dtype == "bfloat16" else self.spec.dt.numpy
            # a float32 router (spec.router_dtype) is packed as float32 (from bf16 bits exactly)
            rstorage = np.float32 if self.spec.router_dtype else storage
            if self.spec.dtype == "bfloat16":
                logical = {k: (v if v is None or k == "expert_ids" else
                               bf16_bits_as_float32(v) if k == "router" and self.spec.router_dtype
                               else cupy_bf16_bits(v))
                           for k, v in logical.items()}
            with xp.cuda.Device(self.device_index):
                buf, router = pack_device(self.layout, logical,
                                          lambda shape: xp.zeros(shape, dtype=storage),
                                          lambda shape: xp.zeros(shape, dtype=rstorage))
        return PackedWeights(buf, router, self.layout, logical["expert_ids"])

    def to_host(self, a) -> np.ndarray:
        """Copy an array of this kernel's device to a host NumPy array; a CuPy uint16 array
        holding bf16 bits (CuPy has no bfloat16) comes back as ``ml_dtypes.bfloat16``."""
        h = arrays.host(a)
        if self.spec.dtype == "bfloat16" and h.dtype == np.uint16:
            h = h.view(self.spec.dt.numpy)
        return h

    # -- validation --------------------------------------------------------------------------
    def _check_x(self, x, name="x"):
        """(info, tokens) of a valid x.  The outcome is remembered per description (kind,
        shape, dtype, device, contiguity: everything the checks read), so an x like one
        already accepted is not checked again; a refused one is refused every time."""
        info = arrays.describe(x, name)
        sig = info[1:6]
        tokens = self._accepted_x.get(sig)
        if tokens is not None:
            return info, tokens
        H = self.spec.hidden_dim
        if len(info.shape) < 1 or info.shape[-1] != H:
            raise ValueError(f"{name} must have shape [..., {H}] (hidden_dim), got {tuple(info.shape)}")
        arrays.check(info, name, dtype=self._storage, **self._device)
        tokens = math.prod(info.shape[:-1]) if len(info.shape) > 1 else 1
        if len(self._accepted_x) < _ACCEPTED_X_MAX:
            self._accepted_x[sig] = tokens
        return info, tokens

    def _check_weights(self, weights, need_router: bool = True) -> PackedWeights:
        """Validate ``weights`` and return them as the module's native arrays (zero-copy views;
        remembered on the weights object, so a call with the same arrays checks nothing again).
        ``need_router``: the stages to run read the router (an expert-parallel shard has none)."""
        if not isinstance(weights, PackedWeights):
            raise TypeError(f"weights must be the PackedWeights returned by kernel.pack(...), "
                            f"got {type(weights).__name__}")
        if weights.router is None and need_router:
            raise ValueError(f"weights.router is None (an expert-parallel shard of experts "
                             f"{list(weights.expert_ids or ())[:8]}...): route with the whole "
                             f"layer's kernel and call kernel.experts with weights.local_ids(ids)")
        memo = weights.__dict__.get("_native")
        if memo is not None and memo[0] is self and memo[1] is weights.buffer and memo[2] is weights.router:
            return memo[3]
        if weights.layout != self.layout:
            raise ValueError(f"weights were packed for {weights.layout.spec.name} "
                             f"({weights.layout.w13_order}/{weights.layout.w2_order}), "
                             f"this kernel is {self.name} ({self.layout.w13_order}/{self.layout.w2_order}); "
                             f"pack them with this kernel's pack()")
        E, H = self.spec.num_experts, self.spec.hidden_dim
        shapes = {"buffer": (self.layout.total,),
                  "router": (E, H) if self.layout.router_order == "eh" else (H, E)}
        native = {"router": None}
        ptrs = {"router": None}
        for part, shape in shapes.items():
            if getattr(weights, part) is None:
                continue
            name = f"weights.{part}"
            info = arrays.describe(getattr(weights, part), name)
            arrays.check(info, name, shape=shape, **self._device,
                         dtype=self._router_storage if part == "router" else self._storage)
            if self.device_index is not None and info.ptr % _WEIGHT_ALIGN:
                raise ValueError(f"{name} must start on a {_WEIGHT_ALIGN}-byte boundary (the cuda "
                                 f"kernels use vector loads), got address {info.ptr:#x}")
            native[part] = self._module.native(info)
            ptrs[part] = info.ptr
        checked = PackedWeights(native["buffer"], native["router"], self.layout, weights.expert_ids)
        checked.__dict__["ptrs"] = (ptrs["buffer"], ptrs["router"])   # for pointer-taking modules
        weights.__dict__["_native"] = (self, weights.buffer, weights.router, checked)
        return checked

    def _check_out(self, out, xinfo):
        if out is None:
            return None
        info = arrays.describe(out, "out")
        arrays.check(info, "out", shape=xinfo.shape, dtype=self._storage, writable=True,
                     **self._device)
        if info.ptr and info.ptr == xinfo.ptr:
            raise ValueError("out must not alias x (the layer reads x after it starts writing out)")
        return info

    def _check_router_bias(self, router_bias):
        if router_bias is None:
            return None
        info = arrays.describe(router_bias, "router_bias")
        arrays.check(info, "router_bias", shape=(self.spec.num_experts,), dtype="float32",
                     **self._device)
        return info

    def _check_routing(self, topk_ids, topk_weights, tokens):
        k, E = self.spec.top_k, self.spec.num_experts
        ids = arrays.describe(topk_ids, "topk_ids")
        arrays.check(ids, "topk_ids", shape=(tokens, k), dtype="int32", **self._device)
        wts = arrays.describe(topk_weights, "topk_weights")
        arrays.check(wts, "topk_weights", shape=(tokens, k), dtype="float32", **self._device)
        bad = self._module.count_out_of_range(self._module.native(ids), E) if tokens else 0
        if bad:
            raise ValueError(f"topk_ids must hold expert ids in [0, {E}), got {bad} out of range")
        return ids, wts

    # -- running -----------------------------------------------------------------------------
    def launch(self, stages, x, weights, out=None, router_bias=None, topk_ids=None,
               topk_weights=None, want_stats=False):
        """The driver under every entry point: validate, then run ``stages`` (names from
        ``self.stages``) on the workspace of this token count.  Returns (out, workspace); the
        workspace's ``topk_ids``/``topk_weights`` views are overwritten by the next call of the
        same bucket (copy them to keep them).  Integrations (``moegen.torch``) use it to write
        the routing into their own tensors on their own stream."""
        return self._run(stages, x, weights, out, router_bias, topk_ids, topk_weights, want_stats)

    def _run(self, stages, x, weights, out, router_bias, topk_ids=None, topk_weights=None,
             want_stats=False):
        xinfo, tokens = self._check_x(x)
        reads_router = _READS_ROUTER.get(stages)
        if reads_router is None:
            reads_router = _READS_ROUTER[stages] = any(s.startswith("route") for s in stages)
        weights = self._check_weights(weights, reads_router)
        oinfo = self._check_out(out, xinfo)
        binfo = self._check_router_bias(router_bias)
        rinfo = self._check_routing(topk_ids, topk_weights, tokens) if topk_ids is not None else None
        if self._enqueue is not None:
            return self._run_pointers(stages, xinfo, tokens, weights, out, oinfo, binfo, rinfo,
                                      want_stats)
        mod = self._module
        native_out = None
        if out is None:
            if self._empty_native is not None:
                out, native_out = self._empty_native(xinfo)
            else:
                out = mod.empty_like(xinfo)
            oinfo = arrays.describe(out, "out")
        if native_out is None:
            native_out = mod.native(oinfo)
        ws = mod.workspace(tokens)
        call = Call(x=mod.native(xinfo), packed=weights, out=native_out, tokens=tokens,
                    router_bias=mod.native(binfo) if binfo else None,
                    topk_ids=mod.native(rinfo[0]) if rinfo else None,
                    topk_weights=mod.native(rinfo[1]) if rinfo else None,
                    want_stats=want_stats, x_ptr=xinfo.ptr, out_ptr=oinfo.ptr)
        for stage in stages:
            mod.run_stage(stage, ws, call)
        return out, ws

    def _run_pointers(self, stages, xinfo, tokens, weights, out, oinfo, binfo, rinfo, want_stats):
        """`_run` for a module that takes data pointers (`CudaModule.enqueue`): the validated
        arrays' addresses go to the module as they are; the alignment the kernels need is
        checked here, as the module's ``native`` views check it."""
        mod = self._module
        for info in (xinfo, oinfo, binfo) + (rinfo or ()):
            if info is not None:
                mod.check_aligned(info)
        if out is None:
            out, out_ptr = mod.new_output(xinfo)
        else:
            out_ptr = oinfo.ptr
        ws = mod.workspace(tokens)
        buf, router = weights.ptrs
        ptrs = (xinfo.ptr, out_ptr, buf, router, binfo.ptr if binfo else None,
                rinfo[0].ptr if rinfo else None, rinfo[1].ptr if rinfo else None)
        self._enqueue(stages, ws, ptrs, want_stats, xinfo.kind == "torch")
        return out, ws

    def __call__(self, x, weights: PackedWeights, *, router_bias=None, out=None,
                 return_stats: bool = False):
        """Run the whole layer: route, group, expert FFNs, combine.

        Args:
            x: [..., H] tokens, spec dtype, contiguous, on the backend's device (NumPy for c;
               CuPy/torch CUDA for cuda).
            weights: from ``self.pack(...)``.
            router_bias: optional [E] float32 added to the router logits.
            out: optional [..., H] destination (like x); written only if every check passes.
            return_stats: also return a `LayerStats` (load-balancing statistics).
        Returns ``out`` (a new array like x when not given), or ``(out, stats)``.
        Raises TypeError/ValueError naming the argument before any launch.
        """
        out, ws = self._run(self.stages, x, weights, out, router_bias, want_stats=return_stats)
        if return_stats:
            return out, LayerStats.from_workspace(self.spec, self._module, ws)
        return out

    def route(self, x, weights: PackedWeights, *, router_bias=None):
        """Routing alone: returns (topk_ids [T, k] int32, topk_weights [T, k] float32) as arrays
        of the backend's device (copies, safe to keep)."""
        _, ws = self._run(self.route_stages, x, weights, None, router_bias)
        return ws.topk_ids.copy(), ws.topk_weights.copy()

    def experts(self, x, weights: PackedWeights, topk_ids, topk_weights, *, out=None):
        """The expert FFNs and the combine for a routing computed elsewhere.

        ``topk_ids`` [T, k] int32 in [0, E) (checked; on GPU this check synchronises),
        ``topk_weights`` [T, k] float32.  Returns ``out``.
        """
        out, _ = self._run(self.experts_stages, x, weights, out, None, topk_ids, topk_weights)
        return out

    def profile(self, x, weights: PackedWeights, **kwargs) -> dict:
        """Per-stage time breakdown (see `moegen.profiling.profile.profile_kernel`)."""
        return profile_kernel(self, x, weights, **kwargs)
