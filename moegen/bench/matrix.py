"""The benchmark matrix (docs/PERF.md; and custom grids): shapes x token counts, moegen and the
baselines in the same run, with a time budget so the whole GPU matrix fits one 10-minute call.

For each shape: compile, draw weights on the device (`moegen.profiling.problems`), build the
baselines; for each token count: rotated random inputs, `profile_kernel`, the baselines on the
same inputs and routing, and the error of each against the float64 reference on the first
rows.  Each finished point goes to ``on_point`` at once (the CLI prints it and flushes).
Weights that do not fit the device are skipped with a note; memory is freed between shapes.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import jit
from ..jit import resolve
from ..spec import MoESpec
from ..profiling import ceilings as ceilings_mod
from ..profiling import floors
from ..profiling.profile import profile_kernel
from ..profiling.timing import clock_for, time_calls
from ..profiling.problems import make_inputs, make_weights, subset_reference, subset_rel_error
from . import baselines as baselines_mod
from . import contenders as contenders_mod
from .shapes import shape_fields

log = logging.getLogger("moegen.bench")



@dataclass
class Config:
    """What a matrix run measures.  ``budget_s``: seconds per point (moegen gets half, the
    baselines share the rest); ``time_limit_s``: the whole run (points left when it runs out
    are skipped with a note, and budgets shrink as it approaches)."""
    shapes: list[tuple[str, MoESpec]]
    tokens: list[int]
    baselines: tuple[str, ...] = ("naive", "grouped_mm", "numpy", "triton")
    budget_s: float = 3.0
    time_limit_s: float | None = None
    warmup: int = 3
    rotate: int = 4
    check_rows: int = 16
    seed: int = 0
    repeats: int | None = None
    memory: bool = True
    graph: bool | None = None
    ceilings: object = None
    notes: list[str] = field(default_factory=list)
    contenders: dict = field(default_factory=dict)   # file -> its contenders() function


def shape_specs(names, backend: str = "auto", dtype: str = "bfloat16") -> list[tuple[str, MoESpec]]:
    """(label, spec) for named benchmark shapes (`moegen.bench.shapes`).  Raises ValueError for an unknown name."""
    return [(n, MoESpec(**shape_fields(n), dtype=dtype, backend=backend)) for n in names]


def grid_specs(experts, topk, hidden, ffn, dtypes, backend: str = "auto",
               activation: str = "swiglu") -> list[tuple[str, MoESpec]]:
    """(label, spec) for every combination of the lists; label ``e8k2h512f2048-bf16``.
    ``ffn`` entries may be None (4·H).  Raises SpecError for an invalid combination."""
    out = []
    for E in experts:
        for k in topk:
            for H in hidden:
                for F in ffn:
                    for dt in dtypes:
                        s = MoESpec(num_experts=E, top_k=k, hidden_dim=H, ffn_dim=F, dtype=dt,
                                    activation=activation, backend=backend)
                        out.append((f"e{E}k{k}h{H}f{s.ffn_dim}-{s.dt.short}", s))
    return out


def device_of(spec: MoESpec) -> str:
    return "cpu" if resolve(spec).backend == "c" else "cuda"


def _free_device(device: str) -> None:
    gc.collect()
    if device != "cuda":
        return
    try:
        import cupy
        cupy.get_default_memory_pool().free_all_blocks()
    except ImportError:
        pass
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def free_device_bytes(device: str) -> int | None:
    """Free device memory in bytes (after freeing cached pools); None on CPU."""
    if device != "cuda":
        return None
    _free_device(device)
    import cupy
    return int(cupy.cuda.runtime.memGetInfo()[0])


def _oom_types():
    types = [MemoryError]
    try:
        import cupy
        types.append(cupy.cuda.memory.OutOfMemoryError)
    except ImportError:
        pass
    try:
        import torch
        types.append(torch.cuda.OutOfMemoryError)
    except (ImportError, AttributeError):
        pass
    return tuple(types)


def poison(a) -> None:
    """Fill an output with NaN (bf16 kept as uint16 bits gets the bf16 NaN pattern)."""
    if type(a).__module__.startswith("torch"):
        a.fill_(float("nan"))
    elif a.dtype == np.uint16:
        a.fill(0x7FC0)
    else:
        a.fill(np.nan)


def _point(label: str, spec: MoESpec, T: int, fl: floors.Floor | None) -> dict:
    return {"shape": label, "spec": spec.name, "E": spec.num_experts, "k": spec.top_k,
            "H": spec.hidden_dim, "F": spec.ffn_dim, "dtype": spec.dtype,
            "backend": spec.backend, "tokens": T,
            "floor_ms": fl.floor_ms if fl else None, "floor_bound": fl.bound if fl else None,
            "moegen": None, "moegen_err": None, "baselines": {}, "skipped": None}


def check_rows_for(spec: MoESpec, rows: int, host_bytes: float = 0.8e9) -> int:
    """Rows whose reference check fetches at most ``host_bytes`` of expert weights (>= 1)."""
    per_row = (spec.top_k + spec.num_shared_experts) * floors.expert_weight_bytes(spec)
    return max(1, min(rows, int(host_bytes // per_row)))


def run(cfg: Config, on_point: Callable[[dict], None] = lambda p: None,
        progress: Callable[[str], None] = lambda s: None) -> tuple[list[dict], dict]:
    """Run the matrix.  Returns (points, ceilings by device as dicts); notes go to cfg.notes."""
    t_start = time.perf_counter()
    n_total = len(cfg.shapes) * len(cfg.tokens)
    done = 0
    points: list[dict] = []
    ceils: dict[str, ceilings_mod.Ceilings] = {}
    oom = _oom_types()

    def remaining_budget() -> float:
        if cfg.time_limit_s is None:
            return cfg.budget_s
        left = cfg.time_limit_s - (time.perf_counter() - t_start)
        return max(0.0, min(cfg.budget_s, 0.8 * left / max(1, n_total - done)))

    def emit(p):
        nonlocal done
        done += 1
        points.append(p)
        on_point(p)
        progress(f"{done}/{n_total} {p['shape']} T={p['tokens']}")

    for label, spec in cfg.shapes:
        device = device_of(spec)
        if device not in ceils:
            ceils[device] = cfg.ceilings if cfg.ceilings is not None else ceilings_mod.measure(device)
        ceil = ceils[device]
        peak = ceil.peak_for(spec.dtype)
        floors_of = {T: floors.floor(spec, T, ceil.bandwidth, peak) for T in cfg.tokens}
        try:
            kernel = jit.compile(spec)
        except Exception as exc:  # noqa: BLE001 - one bad shape must not end the matrix
            why = f"compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            log.warning("%s: %s", label, why)
            for T in cfg.tokens:
                p = _point(label, spec, T, floors_of[T])
                p["skipped"] = why
                emit(p)
            continue
        spec = kernel.spec
        wbytes = floors.expert_weight_bytes(spec) * (spec.num_experts + spec.num_shared_experts)
        want_base = bool(cfg.baselines or cfg.contenders)
        free = free_device_bytes(device)
        why_skip = None
        if free is not None:
            if 1.15 * wbytes > free:
                why_skip = f"weights need {wbytes / 1e9:.1f} GB, {free / 1e9:.1f} GB free"
            elif want_base and 2.3 * wbytes > free:
                want_base = False
                cfg.notes.append(f"{label}: one copy of the weights only ({wbytes / 1e9:.1f} GB of "
                                 f"{free / 1e9:.1f} GB free): no baselines, no error check")
        weights = None
        if why_skip is None:
            try:
                weights = make_weights(kernel, cfg.seed, keep_logical=True)
                if not want_base and device == "cuda":
                    weights.drop_logical()
            except oom as exc:
                why_skip = f"out of memory making weights: {exc}"
        if why_skip is not None:
            for T in cfg.tokens:
                p = _point(label, spec, T, floors_of[T])
                p["skipped"] = why_skip
                emit(p)
            _free_device(device)
            continue
        bases, notes = ([], [])
        if want_base:
            bases, notes = baselines_mod.build(spec, weights.logical, weights.kind, device, cfg.baselines)
            extra, more = contenders_mod.build(cfg.contenders, spec, weights.logical, weights.kind,
                                               device)
            bases, notes = bases + extra, notes + more
        for n in notes:
            if n not in cfg.notes:
                cfg.notes.append(n)
        rows = check_rows_for(spec, cfg.check_rows)
        for T in cfg.tokens:
            p = _point(label, spec, T, floors_of[T])
            budget = remaining_budget()
            if budget <= 0:
                p["skipped"] = "time limit reached"
                emit(p)
                continue
            try:
                _measure_point(p, kernel, weights, bases, T, cfg, ceil, budget, rows, device)
            except oom as exc:
                p["skipped"] = f"out of memory: {str(exc)[:160]}"
            except Exception as exc:  # noqa: BLE001 - record and go on with the next point
                log.exception("%s T=%d failed", label, T)
                p["skipped"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            _free_device(device)
            emit(p)
        del weights, bases, kernel
        jit.clear_memo()                 # drop the kernel's workspaces with it
        _free_device(device)
    return points, {d: c.as_dict() for d, c in ceils.items()}


def _measure_point(p, kernel, weights, bases, T, cfg: Config, ceil, budget, rows, device) -> None:
    spec = kernel.spec
    xs = make_inputs(kernel, T, cfg.rotate, seed=cfg.seed + 1 + T)
    packed = weights.packed
    # correctness first: a poisoned output, one call, error on the first rows
    out = kernel(xs[0], packed)
    poison(out)
    kernel(xs[0], packed, out=out)
    routes = [kernel.route(x, packed) for x in xs]
    ref = None
    if weights.logical.get("w1") is not None:
        ref = subset_reference(spec, xs[0], weights.logical, *routes[0], rows)
        p["moegen_err"] = subset_rel_error(spec, out, ref)
    del out
    share = budget / 2 if bases else budget
    p["moegen"] = profile_kernel(kernel, xs, packed, repeats=cfg.repeats, warmup=cfg.warmup,
                                 budget_s=share, ceilings=ceil, memory=cfg.memory, graph=cfg.graph)
    if not bases:
        return
    tx = [baselines_mod.to_torch(x, device) for x in xs] if any(b.torch for b in bases) else xs
    for b in bases:
        try:
            p["baselines"][b.name] = _measure_baseline(b, tx if b.torch else xs, routes, spec, ref,
                                                       cfg, device, (budget - share) / len(bases), T)
        except Exception as exc:  # noqa: BLE001 - a broken (or out-of-memory) baseline must not hide moegen's numbers
            _free_device(device)
            log.warning("%s T=%d: baseline %s failed: %s", p["shape"], T, b.name, exc)
            p["baselines"][b.name] = {"ms": None, "min_ms": None, "repeats": 0, "err": None,
                                      "note": f"failed: {type(exc).__name__}: {str(exc)[:160]}"}


def _measure_baseline(b, src, routes, spec, ref, cfg: Config, device, budget, T) -> dict:
    rts = [(baselines_mod.to_torch(i, device), baselines_mod.to_torch(w, device)) if b.torch else (i, w)
           for i, w in routes]
    R = len(src)
    res = time_calls(lambda i: b.timed(src[i % R], *rts[i % R]), clock_for(device, prefer_torch=b.torch),
                     warmup=1, repeats=cfg.repeats, budget_s=budget,
                     min_repeats=2 if T else 3, max_repeats=100)
    err = None
    if ref is not None:
        err = subset_rel_error(spec, b.run(src[0], *rts[0]), ref)
    out = {"ms": res["median"], "min_ms": res["min"], "repeats": res["n"],
           "err": err if err is None or math.isfinite(err) else float("inf"), "note": b.note}
    if b.graph and device == "cuda" and cfg.graph is not False:
        out["graph_ms"], why = _graph_ms(b, src[0], *rts[0], cfg.repeats or 20)
        if why:
            out["note"] = f"{b.note}; no graph time: {why}".lstrip("; ")
    return out


def _graph_ms(b, x, ids, wts, repeats: int) -> tuple[float | None, str]:
    """Median ms of replaying ``b.run(x, ids, wts)`` captured in a torch CUDA graph (warmed up
    on a side stream first, as capture requires), or (None, why) when it does not capture."""
    import torch  # contenders are torch code; only reached on CUDA with torch present
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                b.run(x, ids, wts)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            b.run(x, ids, wts)
        res = time_calls(lambda i: graph.replay(), clock_for("cuda", prefer_torch=True),
                         warmup=2, repeats=repeats)
        return res["median"], ""
    except Exception as exc:  # noqa: BLE001 - a contender that cannot be captured: say why
        return None, f"{type(exc).__name__}: {str(exc)[:120]}"
