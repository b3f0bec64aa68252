"""`CModule`: one loaded C binary (ctypes) for one `CPlan`, and its reusable workspaces.

The plan names the exported functions and the workspace buffers of a bucket; this module
binds and allocates exactly those.  Implements the Module protocol of `moegen.backends.base`.  Arrays are NumPy (torch CPU tensors
are viewed as NumPy without a copy).  Workspaces are allocated once per token-count bucket (the
next power of two >= T) and calling thread, and reused: a call after the first one of its
bucket allocates no buffers; the stage functions receive raw pointers into them.

Capacity specs (``spec.capacity_factor``) run ``moe_group_capacity`` as the group stage, with
the capacity ceil(factor·T·k/E) passed per call, and ``moe_combine_kept`` as the combine.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from pathlib import Path

import numpy as np

from .. import settings
from ..arrays import to_numpy
from ..reference import capacity as expert_capacity
from .c_plan import CACHE_LINE, CPlan

log = logging.getLogger("moegen.backends.c")

_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int

# Function role (`CPlan.functions`) -> argtypes, as templates/c/moe.c.jinja declares them.
_ARGTYPES = {
    # x, router, bias, T, ids, weights, partials, sums, nthreads
    "route": (_P, _P, _P, _L, _P, _P, _P, _P, _I),
    # ids, T, counts, offsets, order
    "group": (_P, _L, _P, _P, _P),
    # x, packed, offsets, order, T, xf, h, nthreads
    "ffn1": (_P, _P, _P, _P, _L, _P, _P, _I),
    # h, packed, offsets, order, weights, T, y, nthreads
    "ffn2": (_P, _P, _P, _P, _P, _L, _P, _I),
    # y, T, out, nthreads
    "combine": (_P, _L, _P, _I),
    # ids, weights, T, cap, counts, offsets, order, kept, cap_weights, dropped, scratch
    "group_capacity": (_P, _P, _L, _L, _P, _P, _P, _P, _P, _P, _P),
    # y, kept, T, out, nthreads
    "combine_kept": (_P, _P, _L, _P, _I),
}


@functools.lru_cache(maxsize=1)
def cpu_count() -> int:
    """CPUs this process may run on (read once: every stage of every call asks)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


_clamp_warned: set[int] = set()


def thread_count() -> int:
    """``MOEGEN_NUM_THREADS`` (default: every CPU), at most the CPUs this process may use:
    asking OpenMP for far more threads than that (100000) dies inside the runtime.  A
    clamped request is logged as a warning once per value."""
    requested, cpus = settings.num_threads(), cpu_count()
    if requested <= cpus:
        return requested
    if requested not in _clamp_warned:
        _clamp_warned.add(requested)
        log.warning("MOEGEN_NUM_THREADS=%d is more than the %d CPUs this process may use; "
                    "using %d threads", requested, cpus, cpus)
    return cpus


def _ptr(a) -> int:
    return a.__array_interface__["data"][0]


def _ptr_or_none(a) -> int | None:
    return None if a is None else _ptr(a)


# torch dtype -> the NumPy dtype of the same bits, for the dtypes both libraries have (filled on
# the first torch tensor: importing this module must not import torch).
_TORCH_NUMPY: dict = {}


def _torch_numpy(t):
    """The NumPy dtype of torch tensor ``t``'s dtype, or None (bfloat16: NumPy has none)."""
    if not _TORCH_NUMPY:
        import torch  # only reached with a torch tensor in hand
        _TORCH_NUMPY.update({torch.float32: np.dtype(np.float32), torch.float16: np.dtype(np.float16),
                             torch.float64: np.dtype(np.float64), torch.int32: np.dtype(np.int32),
                             torch.int64: np.dtype(np.int64)})
    return _TORCH_NUMPY.get(t.dtype)


def _call_ptrs(call) -> dict:
    """The data pointers of a call's x, out and weights, read once per call (the stages share
    them; reading one costs ~2 µs); the weights' pointers are kept on the validated weights
    object, which the kernel reuses while the caller passes the same arrays."""
    ptrs = call.__dict__.get("_ptrs")
    if ptrs is None:
        packed = call.packed
        w = packed.__dict__.get("_ptrs")
        if w is None or w[0] is not packed.buffer or w[1] is not packed.router:
            w = packed.__dict__["_ptrs"] = (packed.buffer, packed.router, {
                "buffer": _ptr_or_none(packed.buffer), "router": _ptr_or_none(packed.router)})
        ptrs = call.__dict__["_ptrs"] = {**w[2], "x": call.x_ptr or _ptr_or_none(call.x),
                                         "out": call.out_ptr or _ptr_or_none(call.out)}
    return ptrs


ALIGN = CACHE_LINE   # so no SIMD load of a row start is split in two


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a cache line (NumPy's own
    allocations start 16 bytes into one, so every other 32-byte load would straddle two)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def aligned_zeros(shape, dtype) -> np.ndarray:
    a = aligned_empty(shape, dtype)
    a.fill(0)
    return a


def bucket_of(tokens: int) -> int:
    """The workspace bucket of a token count: the next power of two >= tokens (>= 1)."""
    return 1 << max(0, int(tokens) - 1).bit_length()


class _Buffers:
    """The arrays of one bucket (`CPlan.buffers`), allocated once."""

    def __init__(self, plan: CPlan, bucket: int):
        self.bucket = bucket
        self.dropped = None
        for buf in plan.buffers(bucket):
            alloc = aligned_zeros if buf.zeroed else aligned_empty
            setattr(self, buf.name, alloc(buf.shape, buf.dtype))
        self.ptr = {buf.name: _ptr(getattr(self, buf.name)) for buf in plan.buffers(bucket)}

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, n).nbytes for n in self.ptr)


class CWorkspace:
    """The workspace of one call: views of a bucket's buffers for ``tokens`` tokens.

    Attributes: tokens, bucket, threads (OpenMP threads of its stages), topk_ids [T, k]
    int32, topk_weights [T, k] float32, counts [E] int32, offsets [E+1] int32, router_sums
    [E+1] float32; with capacity also dropped [E] int32 (slots each routed expert dropped),
    else no ``dropped`` attribute.
    """

    def __init__(self, buffers: _Buffers, tokens: int):
        self.buffers = buffers
        self.tokens = tokens
        self.threads = 1
        self.bucket = buffers.bucket
        self.ptr = buffers.ptr
        self.topk_ids = buffers.ids[:tokens]
        self.topk_weights = buffers.weights[:tokens]
        self.counts = buffers.counts
        self.offsets = buffers.offsets
        self.router_sums = buffers.router_sums
        if buffers.dropped is not None:
            self.dropped = buffers.dropped


class CModule:
    """A loaded c-backend binary for ``spec`` (see `moegen.backends.base.Module`).

    Attributes: spec, xp (numpy), device_kind ("cpu"), layout, stages, path (the loaded .so).
    """

    xp = np
    device_kind = "cpu"
    stages = ("route", "group", "ffn1", "ffn2", "combine")

    def __init__(self, plan: CPlan, path: Path):
        self.plan = plan
        self.spec = plan.spec
        self.layout = plan.layout
        self.path = Path(path)
        self._lib = ctypes.CDLL(str(self.path))
        self._fn = {}
        for role, name in plan.functions:
            fn = getattr(self._lib, name)           # AttributeError: not our binary
            fn.argtypes = _ARGTYPES[role]
            fn.restype = ctypes.c_int
            self._fn[role] = fn
        self._buffers: dict[tuple[int, int], _Buffers] = {}
        self._last: dict[tuple[int, int], CWorkspace] = {}

    # -- arrays ------------------------------------------------------------------------------
    def to_device(self, host_array) -> np.ndarray:
        """A cache-line-aligned C-contiguous copy (packed segments are cache-line aligned
        relative to the buffer start, so this aligns every weight row that can be)."""
        host = np.asarray(host_array)
        out = aligned_empty(host.shape, host.dtype)
        out[...] = host
        return out

    def native(self, info) -> np.ndarray:
        """The NumPy array behind a validated ArrayInfo (a zero-copy view of a torch CPU tensor)."""
        if info.kind == "numpy":
            return info.obj
        if info.kind == "torch":
            t = info.obj
            if _torch_numpy(t) is not None:     # as arrays.to_numpy, less its checks
                return (t.detach() if t.requires_grad else t).numpy()
            return to_numpy(t, "array")
        raise TypeError(f"the c backend needs host arrays (NumPy or torch CPU), got {info.kind}")

    def empty_like(self, info):
        """An uninitialised array of the user's kind (torch in -> torch out)."""
        return self.empty_native(info)[0]

    def empty_native(self, info):
        """(array of the user's kind, its NumPy view): a new uninitialised output like
        ``info``.  Torch outputs of the dtypes NumPy has are allocated by NumPy (a third of
        ``torch.empty``'s cost) and shared with torch zero-copy."""
        if info.kind == "torch":
            import torch  # torch in, torch out
            dt = _torch_numpy(info.obj)
            if dt is not None:
                a = np.empty(info.shape, dtype=dt)
                return torch.from_numpy(a), a
            t = torch.empty(info.shape, dtype=info.obj.dtype)
            return t, self.native(info._replace(obj=t))
        a = np.empty(info.shape, dtype=self.spec.dt.numpy)
        return a, a

    def count_out_of_range(self, ids, num_experts: int) -> int:
        ids = np.asarray(ids)
        return int(np.count_nonzero((ids < 0) | (ids >= num_experts)))

    # -- workspaces --------------------------------------------------------------------------
    def workspace(self, tokens: int) -> CWorkspace:
        """Views for ``tokens`` tokens of the buffers of its bucket (allocated on first use).

        Buffers belong to the calling thread as well as the bucket: the stages release the GIL,
        so two Python threads calling one kernel at once must not share them.  The thread
        count of the call's stages (`thread_count`) is read here, once per call."""
        key = (threading.get_ident(), bucket_of(tokens))
        last = self._last.get(key)
        if last is not None and last.tokens == tokens:
            last.threads = thread_count()
            return last
        buffers = self._buffers.get(key)
        if buffers is None:
            buffers = self._buffers[key] = _Buffers(self.plan, key[1])
            log.debug("%s: workspace for bucket %d (%d bytes)", self.spec.name, key[1],
                      buffers.nbytes)
        ws = self._last[key] = CWorkspace(buffers, tokens)
        ws.threads = thread_count()
        return ws

    # -- stages ------------------------------------------------------------------------------
    def run_stage(self, stage: str, ws: CWorkspace, call) -> None:
        """Run one stage on the calling thread (OpenMP threads inside).  Raises ValueError for
        an unknown stage, RuntimeError when the C function reports a failure."""
        T, p, nth = call.tokens, ws.ptr, ws.threads
        a = _call_ptrs(call)
        if stage == "route":
            rc = self._fn["route"](
                a["x"], a["router"],
                _ptr(call.router_bias) if call.router_bias is not None else None, T,
                p["ids"], p["weights"], p["partials"],
                p["router_sums"] if call.want_stats else None, nth)
        elif stage == "group":
            ids = _ptr(call.topk_ids) if call.topk_ids is not None else p["ids"]
            if self.spec.capacity_factor is None:
                rc = self._fn["group"](ids, T, p["counts"], p["offsets"], p["order"])
            else:
                wts = _ptr(call.topk_weights) if call.topk_weights is not None else p["weights"]
                cap = min(expert_capacity(self.spec, T), T * self.spec.top_k)
                rc = self._fn["group_capacity"](
                    ids, wts, T, cap, p["counts"], p["offsets"], p["order"], p["kept"],
                    p.get("cap_weights"), p["dropped"], p.get("scratch"))
        elif stage == "ffn1":
            rc = self._fn["ffn1"](a["x"], a["buffer"], p["offsets"],
                                      p["order"], T, p["xf"], p["h"], nth)
        elif stage == "ffn2":
            if "cap_weights" in p:                  # capacity with renormalize
                wts = p["cap_weights"]
            else:
                wts = _ptr(call.topk_weights) if call.topk_weights is not None else p["weights"]
            rc = self._fn["ffn2"](p["h"], a["buffer"], p["offsets"], p["order"],
                                      wts, T, p["y"], nth)
        elif stage == "combine":
            if self.spec.capacity_factor is None:
                rc = self._fn["combine"](p["y"], T, a["out"], nth)
            else:
                rc = self._fn["combine_kept"](p["y"], p["kept"], T, a["out"], nth)
        else:
            raise ValueError(f"stage must be one of {self.stages}, got {stage!r}")
        if rc != 0:
            raise RuntimeError(f"{self.spec.name}: C stage {stage} returned {rc}")
