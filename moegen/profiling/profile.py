"""`profile_kernel`: where the time of one call goes, and how close it is to the floor.

Used by `MoEKernel.profile` and by ``moegen bench``.  For one token count it reports

* per-stage times: each of ``kernel.stages`` run alone through ``kernel.module.run_stage`` on the
  module's workspace (CUDA events between stages on a GPU, perf_counter on a CPU);
* the whole call from Python (``kernel(x, weights, out=out)``: validation + launches), timed one
  call at a time, and the back-to-back throughput of many calls; on a GPU also a CUDA-graph
  replay of one call when capture works;
* tokens/s, achieved GB/s and TFLOP/s, and the fraction of the floor (`moegen.profiling.floors`)
  for ceilings measured on this machine in this run;
* memory: workspace bytes, device bytes in use, and allocations made by calls after the first
  (a CuPy MemoryHook / torch allocator counters on GPU; tracemalloc on CPU, as bytes).

Inputs are rotated over several x buffers so that repeats do not time a warm cache of one x.
"""

from __future__ import annotations

import contextlib
import logging
import time
import tracemalloc

import numpy as np

from .. import arrays
from ..backends.base import Call
from . import ceilings as ceilings_mod
from . import floors
from .timing import clock_for, summarize, time_calls

log = logging.getLogger("moegen.profiling")

_CEILINGS: dict[str, ceilings_mod.Ceilings] = {}


def default_ceilings(device: str) -> ceilings_mod.Ceilings:
    """Ceilings of ``device`` measured once per process (on first use)."""
    if device not in _CEILINGS:
        _CEILINGS[device] = ceilings_mod.measure(device)
    return _CEILINGS[device]


def _copy(a):
    return a.clone() if type(a).__module__.startswith("torch") else a.copy()


def _tokens(x) -> int:
    shape = tuple(x.shape)
    return int(np.prod(shape[:-1])) if len(shape) > 1 else 1


def profile_kernel(kernel, x, weights, *, repeats: int | None = None, warmup: int = 3,
                   rotate: int = 4, budget_s: float = 1.0, router_bias=None, ceilings=None,
                   memory: bool = True, graph: bool | None = None) -> dict:
    """Profile ``kernel`` on ``x`` [..., H] (or a list of such buffers to rotate over).

    Args:
        kernel: a `moegen.kernel.MoEKernel`.
        x: input tokens of the kernel's device and dtype, or a list of same-shape buffers.
        weights: ``kernel.pack(...)`` output.
        repeats: timed calls per measurement; None plans them from ``budget_s``.
        warmup: untimed calls first (the first call for a token count allocates its workspace).
        rotate: how many x buffers to cycle through when one x is given (copies of x).
        budget_s: time budget of each measurement when ``repeats`` is None.
        router_bias: passed to every call.
        ceilings: a `moegen.profiling.ceilings.Ceilings`; None measures this device's once.
        memory: also measure allocations per call (slows CPU calls under tracemalloc).
        graph: time a CUDA-graph replay (GPU only); None = on for GPU.
    Returns a dict (see `moegen.bench.report.PROFILE_KEYS`); times in ms.
    Raises the kernel's TypeError/ValueError for bad inputs (from the first, validated call).
    """
    spec, mod = kernel.spec, kernel.module
    device = "cpu" if mod.device_kind == "cpu" else "cuda"
    xs = list(x) if isinstance(x, (list, tuple)) else [x] + [_copy(x) for _ in range(max(0, rotate - 1))]
    R = len(xs)
    T = _tokens(xs[0])
    # First calls validate every argument and allocate the workspace of this token bucket.
    outs = [kernel(xi, weights, router_bias=router_bias) for xi in xs]
    clock = clock_for(device)

    def whole(i):
        kernel(xs[i % R], weights, out=outs[i % R], router_bias=router_bias)

    total = time_calls(whole, clock, warmup=warmup, repeats=repeats, budget_s=budget_s)
    n = total["n"]
    stage_ms = _time_stages(kernel, xs, outs, weights, router_bias, clock, n, T)

    t0 = time.perf_counter()
    for i in range(n):
        whole(i)
    clock.sync()
    throughput_ms = (time.perf_counter() - t0) * 1e3 / n

    graph_ms, graph_note = None, ""
    if device == "cuda" and graph is not False:
        graph_ms, graph_note = _graph_replay(kernel, xs[0], weights, outs[0], router_bias, n)

    ids, _ = kernel.route(xs[0], weights, router_bias=router_bias)
    touched = int(np.unique(np.asarray(arrays.host(ids))).size) if T else 0
    ceil = ceilings if ceilings is not None else default_ceilings(device)
    fl = floors.floor(spec, T, ceil.bandwidth, ceil.peak_for(spec.dtype))
    nbytes = floors.bytes_moved(spec, T, touched)
    total_s = total["median"] / 1e3
    result = {
        "spec": spec.name, "backend": kernel.backend, "target": kernel.target,
        "dtype": spec.dtype, "tokens": T, "stages": list(kernel.stages),
        "stage_ms": stage_ms, "stage_sum_ms": sum(stage_ms.values()),
        "total_ms": total["median"], "total_min_ms": total["min"], "total_p90_ms": total["p90"],
        "repeats": n, "warmup": warmup, "rotate": R,
        "throughput_ms": throughput_ms, "graph_ms": graph_ms, "graph_note": graph_note,
        "tokens_per_s": T / total_s if total_s > 0 else None,
        "experts_touched": touched, "bytes": nbytes, "flops": fl.flops,
        "gbps": nbytes / total_s / 1e9 if total_s > 0 else None,
        "tflops": fl.flops / total_s / 1e12 if total_s > 0 else None,
        "floor_ms": fl.floor_ms, "floor_bound": fl.bound,
        "frac_of_floor": floors.fraction_of_floor(fl.floor_ms, total["median"]),
        "ceilings": {"bandwidth": ceil.bandwidth, "peak": ceil.peak_for(spec.dtype),
                     "measured": ceil.measured},
        "memory": _memory(kernel, whole, T, device) if memory else {},
    }
    return result


def _time_stages(kernel, xs, outs, weights, router_bias, clock, repeats, T) -> dict:
    """Median ms of each stage run alone (same calls as MoEKernel._run makes)."""
    mod = kernel.module
    ws = mod.workspace(T)
    bias = mod.native(arrays.describe(router_bias, "router_bias")) if router_bias is not None else None
    calls = [Call(x=mod.native(arrays.describe(xi, "x")), packed=weights,
                  out=mod.native(arrays.describe(oi, "out")), tokens=T, router_bias=bias)
             for xi, oi in zip(xs, outs)]
    times = {s: [] for s in kernel.stages}
    for r in range(repeats):
        call = calls[r % len(calls)]
        marks = [clock.mark()]
        for stage in kernel.stages:
            mod.run_stage(stage, ws, call)
            marks.append(clock.mark())
        for stage, a, b in zip(kernel.stages, marks, marks[1:]):
            times[stage].append(clock.elapsed(a, b))
    return {s: summarize(t)["median"] for s, t in times.items()}


def _graph_replay(kernel, x, weights, out, router_bias, repeats) -> tuple[float | None, str]:
    """ms per replay of a CUDA graph holding one call, replayed back to back; (None, why)
    when capture fails (a call that allocates or synchronises cannot be captured)."""
    try:
        import cupy  # only for a CUDA kernel
        stream = cupy.cuda.Stream(non_blocking=True)
        torch_ctx = contextlib.nullcontext()
        if type(x).__module__.startswith("torch"):
            import torch
            torch_ctx = torch.cuda.stream(torch.cuda.ExternalStream(stream.ptr))
        with stream, torch_ctx:
            kernel(x, weights, out=out, router_bias=router_bias)
            stream.synchronize()
            stream.begin_capture()
            try:
                kernel(x, weights, out=out, router_bias=router_bias)
            finally:
                g = stream.end_capture()
            g.launch(stream)
            a, b = cupy.cuda.Event(), cupy.cuda.Event()
            a.record(stream)
            for _ in range(repeats):
                g.launch(stream)
            b.record(stream)
            b.synchronize()
        return cupy.cuda.get_elapsed_time(a, b) / repeats, ""
    except Exception as exc:  # noqa: BLE001 - report why capture did not work, keep going
        return None, f"graph capture failed: {type(exc).__name__}: {exc}"


def workspace_bytes(ws) -> int:
    """Bytes of a workspace: ``ws.nbytes`` when it has one, else a container attribute's
    ``nbytes`` (the c backend's bucket buffers), else the distinct base arrays it exposes."""
    if isinstance(getattr(ws, "nbytes", None), int):
        return ws.nbytes
    attrs = vars(ws) if hasattr(ws, "__dict__") else {n: getattr(ws, n, None) for n in dir(ws)}
    for name, v in attrs.items():
        if not name.startswith("_") and not hasattr(v, "shape") and isinstance(getattr(v, "nbytes", None), int):
            return v.nbytes
    seen, total = set(), 0
    for name, v in attrs.items():
        if name.startswith("_") or not hasattr(v, "nbytes") or not hasattr(v, "shape"):
            continue
        base = v
        while getattr(base, "base", None) is not None:
            base = base.base
        if id(base) not in seen:
            seen.add(id(base))
            total += int(base.nbytes)
    return total


def _memory(kernel, whole, T, device, calls: int = 5) -> dict:
    """Allocations made by ``calls`` calls after the first, and memory in use.

    GPU: ``allocs_per_call``/``alloc_bytes_per_call`` (CuPy pool mallocs, target 0),
    ``device_pool_used_bytes`` (CuPy pool in use: workspaces, outputs), with torch also
    ``torch_allocs_per_call``, ``torch_peak_bytes`` (peak of torch's allocator during the calls,
    weights and inputs included) and ``torch_call_extra_bytes`` (that peak above what was
    allocated before the calls).  CPU: ``host_peak_bytes_per_call`` (tracemalloc peak above the
    start, all Python/NumPy heap) and ``numpy_blocks_kept`` (NumPy blocks still alive after).
    """
    ws = kernel.module.workspace(T)
    out = {"workspace_bytes": workspace_bytes(ws), "calls": calls}
    if device == "cpu":
        whole(0)
        tracemalloc.start()
        try:
            base = tracemalloc.take_snapshot()
            tracemalloc.reset_peak()
            cur0 = tracemalloc.get_traced_memory()[0]
            for i in range(calls):
                whole(i)
            peak = tracemalloc.get_traced_memory()[1]
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        dom = np.lib.tracemalloc_domain
        flt = [tracemalloc.DomainFilter(True, dom)]
        grown = sum(max(0, s.count_diff) for s in
                    after.filter_traces(flt).compare_to(base.filter_traces(flt), "filename"))
        out.update(method="tracemalloc", host_peak_bytes_per_call=max(0, peak - cur0),
                   numpy_blocks_kept=grown)
        return out
    import cupy

    class _Count(cupy.cuda.MemoryHook):
        name = "moegen-bench-count"

        def __init__(self):
            self.mallocs = self.nbytes = 0

        def malloc_postprocess(self, **kw):
            self.mallocs += 1
            self.nbytes += int(kw.get("size", 0))

    torch_stats, torch_before = None, 0
    try:
        import torch
        if torch.cuda.is_available():
            torch_stats = torch.cuda.memory_stats
            torch.cuda.reset_peak_memory_stats()
            torch_before = torch.cuda.memory_allocated()
    except ImportError:
        pass
    before = torch_stats().get("allocation.all.allocated", 0) if torch_stats else 0
    hook = _Count()
    with hook:
        for i in range(calls):
            whole(i)
    cupy.cuda.get_current_stream().synchronize()
    out.update(method="cupy MemoryHook" + (" + torch allocator" if torch_stats else ""),
               allocs_per_call=hook.mallocs / calls, alloc_bytes_per_call=hook.nbytes / calls,
               device_pool_used_bytes=cupy.get_default_memory_pool().used_bytes())
    if torch_stats:
        stats = torch_stats()
        out["torch_allocs_per_call"] = (stats.get("allocation.all.allocated", 0) - before) / calls
        out["torch_peak_bytes"] = torch.cuda.max_memory_allocated()      # weights and inputs too
        out["torch_call_extra_bytes"] = out["torch_peak_bytes"] - torch_before
    return out
