"""Generated dispatch and combine kernels of an expert-parallel layer.

    render_dispatch(spec, ranks)  ->  Sources (templates/c/ep_dispatch.c.jinja or
                                      templates/cuda/ep_dispatch.cu.jinja)
    dispatch_kernels(spec, ranks) ->  CDispatch (ctypes) or CudaDispatch (CuPy RawModule)

The binaries are compiled by the spec's backend (its compiler, options and target), stored in
moegen's kernel cache under ``ep<R>_<spec name>`` with a key over everything that changes them,
and loaded once per process.  Every function takes raw data pointers (``tensor.data_ptr()``), so
the layer's buffers can be torch tensors of either device.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from .. import __version__, settings
from ..backends import get_backend
from ..backends.base import Artifact, Sources
from ..backends.c import write_library
from ..backends.cuda import _load_raw_module
from ..cache import default_cache, digest
from ..jit import build, key_parts_of, plan_for, resolve, toolchain_identity
from ..render import render_template
from ..spec import MoESpec
from .experts import expert_spec

# Rows below which the C loops stay on the calling thread (a thread team costs more).
_PAR_MIN_ROWS = 64
# Threads of the elementwise CUDA kernels (pack, slot rows, combine); the plan kernel has its own.
_CUDA_THREADS = 256
_TEMPLATES = {"c": "c/ep_dispatch.c.jinja", "cuda": "cuda/ep_dispatch.cu.jinja"}


def render_dispatch(spec: MoESpec, ranks: int) -> Sources:
    """The dispatch source of a resolved ``spec`` (backend c or cuda) over ``ranks`` ranks."""
    epr = spec.num_experts // ranks
    ctx = {"spec_name": spec.name, "version": __version__, "K": spec.top_k,
           "S": spec.num_shared_experts, "H": spec.hidden_dim, "R": ranks, "EPR": epr}
    dt = spec.dt
    if spec.backend == "c":
        ctx.update(par_min_rows=_PAR_MIN_ROWS, dt_short=dt.short, c_store=dt.c_store)
        entry = "ep_dispatch.c"
    else:
        ctx.update(dtype=dt.name, t_store=dt.cuda_raw, ld_fn=dt.cuda_load, st_fn=dt.cuda_store)
        entry = "ep_dispatch.cu"
    text = render_template(_TEMPLATES[spec.backend], **ctx)
    return Sources(backend=spec.backend, files={entry: text}, entry=entry)


def _key_parts(spec: MoESpec, ranks: int, sources: Sources) -> dict:
    """Every input that changes the dispatch binary: the layer's key parts (`jit.key_parts_of`
    over the spec's plan and the dispatch sources) plus the rank count."""
    be = get_backend(spec.backend)
    plan = plan_for(spec)
    parts = key_parts_of(plan, sources, toolchain_identity(be), be.options(spec, plan.target),
                         settings.code_settings())
    parts["dispatch"] = {"ranks": ranks}
    return parts


def build_dispatch(spec: MoESpec, ranks: int) -> Artifact:
    """The compiled dispatch binary of a resolved ``spec`` over ``ranks`` ranks, from the kernel
    cache or compiled (and stored) on a miss.  Raises CompileError / MissingKernelError."""
    sources = render_dispatch(spec, ranks)
    parts = _key_parts(spec, ranks, sources)
    key = digest(parts)
    name = f"ep{ranks}_{spec.name}"
    be = get_backend(spec.backend)

    def compile_now() -> Artifact:
        art = be.compile(sources, spec, parts["target"], key)
        meta = dict(art.meta, key=key, spec_name=name, spec=spec.to_dict(), backend=be.name,
                    target=parts["target"], toolchain=parts.get("toolchain"),
                    options=parts["options"], moegen_version=__version__)
        return Artifact(art.binary, meta)

    artifact, _ = default_cache().get_or_build(name, key, compile_now)
    return artifact


@functools.lru_cache(maxsize=32)
def _dispatch(spec: MoESpec, ranks: int, cache_dir: str):
    artifact = build_dispatch(spec, ranks)
    return CDispatch(spec, artifact) if spec.backend == "c" else CudaDispatch(spec, artifact)


def dispatch_kernels(spec: MoESpec, ranks: int):
    """The loaded dispatch kernels of a resolved ``spec`` over ``ranks`` ranks (memoised)."""
    return _dispatch(spec, ranks, str(settings.cache_dir()))


_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
_C_SIGNATURES = {
    # ids, weights, T, send_counts, expert_counts, pos, src, eid, wout
    "ep_plan": (_P, _P, _L, _P, _P, _P, _P, _P, _P),
    # x, src, n, rows, nthreads
    "ep_pack": (_P, _P, _L, _P, _I),
    # ret, pos, shared, T, out, nthreads
    "ep_combine": (_P, _P, _P, _L, _P, _I),
}


class CDispatch:
    """The c backend's dispatch functions (ctypes; they release the GIL while they run)."""

    def __init__(self, spec: MoESpec, artifact: Artifact):
        self.spec = spec
        self._lib = ctypes.CDLL(str(write_library(artifact.binary)))
        self._fn = {}
        for name, argtypes in _C_SIGNATURES.items():
            fn = getattr(self._lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
            self._fn[name] = fn

    def plan(self, ids: int, weights: int, tokens: int, send_counts: int, expert_counts: int,
             pos: int, src: int, eid: int, wout: int) -> None:
        if self._fn["ep_plan"](ids, weights, tokens, send_counts, expert_counts, pos, src, eid,
                               wout):
            raise ValueError(f"topk_ids must hold expert ids in [0, {self.spec.num_experts})")

    def pack(self, x: int, src: int, rows_n: int, rows: int) -> None:
        self._fn["ep_pack"](x, src, rows_n, rows, settings.num_threads())

    def combine(self, ret: int, pos: int, shared: int, tokens: int, out: int) -> None:
        self._fn["ep_combine"](ret, pos, shared or None, tokens, out, settings.num_threads())


class CudaDispatch:
    """The cuda backend's dispatch kernels, launched on CuPy's current stream (the layer makes
    torch's current stream CuPy's current one around its launches)."""

    def __init__(self, spec: MoESpec, artifact: Artifact):
        self.spec = spec
        self._raw = _load_raw_module(artifact.binary)
        self._fn = {name: self._raw.get_function(name)
                    for name in ("ep_plan", "ep_pack", "ep_slot_rows", "ep_combine")}

    @staticmethod
    def _blocks(n: int) -> tuple[int]:
        return (max(1, -(-n // _CUDA_THREADS)),)

    def plan(self, ids, weights, tokens, send_counts, expert_counts, pos, src, eid, wout) -> None:
        p = np.uint64
        self._fn["ep_plan"]((1,), (256,), (p(ids), p(weights), np.int32(tokens), p(send_counts),
                                           p(expert_counts), p(pos), p(src), p(eid), p(wout)))

    def pack(self, x, src, rows_n, rows) -> None:
        if rows_n:
            n = rows_n * self.spec.hidden_dim
            self._fn["ep_pack"](self._blocks(n), (_CUDA_THREADS,),
                                (np.uint64(x), np.uint64(src), np.int32(rows_n), np.uint64(rows)))

    def slot_rows(self, y, splits: int, rows_n: int, out) -> None:
        if rows_n:
            n = rows_n * self.spec.hidden_dim
            self._fn["ep_slot_rows"](self._blocks(n), (_CUDA_THREADS,),
                                     (np.uint64(y), np.int32(splits), np.int32(rows_n),
                                      np.uint64(out)))

    def combine(self, ret, pos, shared, tokens, out) -> None:
        if tokens:
            n = tokens * self.spec.hidden_dim
            self._fn["ep_combine"](self._blocks(n), (_CUDA_THREADS,),
                                   (np.uint64(ret), np.uint64(pos), np.uint64(shared or 0),
                                    np.int32(tokens), np.uint64(out)))


def prebuild(spec: MoESpec, ranks: int) -> None:
    """Compile into the cache every binary an expert-parallel layer of ``spec`` over ``ranks``
    ranks loads (the router's kernel, a rank's expert kernel, the shared experts' kernel, the
    dispatch kernels), so spawned ranks only read the cache."""
    spec = resolve(spec)
    build(spec)
    build(expert_spec(spec, spec.num_experts // ranks, 1))
    if spec.num_shared_experts:
        build(expert_spec(spec, spec.num_shared_experts, spec.num_shared_experts))
    build_dispatch(spec, ranks)
