"""Time the cuda backend's route, group and combine stages (and the whole layer) per shape and T.

    python benchmarks/cuda_stages.py [--shapes seed-small,qwen3-30b-a3b] [--tokens 1,64,4096]
                                     [--json out.json]
    python benchmarks/cuda_stages.py --check      # small correctness run (for compute-sanitizer)

Each stage is captured 20 times into a CUDA graph and the graph's replays are timed with CUDA
events (median of 10), so the numbers are GPU time without Python launch cost.  The whole layer
is timed both ways: a graph replay and a plain Python call.  Weights are random on the device
(never zeros); the FLOP/byte floors (docs/PERF.md) are printed beside the layer time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout

from moegen.bench.shapes import SHAPES, shape_fields  # noqa: E402

REPS = 20


def build(spec):
    """A freshly compiled cuda MoEKernel of ``spec`` (no cache) and its compile seconds."""
    from moegen.backends import get_backend
    from moegen.kernel import MoEKernel
    from moegen.plan import make_plan
    from moegen.render import render
    be = get_backend("cuda")
    spec = spec.replace(backend="cuda", arch=spec.arch or be.target(spec))
    plan = make_plan(spec, spec.arch, {})
    t0 = time.perf_counter()
    art = be.compile(render(plan), spec, spec.arch, "bench")
    secs = time.perf_counter() - t0
    return MoEKernel(plan.spec, be.load(art, plan), art.meta), secs


def device_weights(kernel, seed=0):
    """PackedWeights with random N(0, 1/fan_in) values generated on the device in chunks."""
    import cupy as cp
    from moegen.layout import PackedWeights
    spec, layout = kernel.spec, kernel.layout
    rs = cp.random.RandomState(seed)
    dt = np.uint16 if spec.dt.is_half else np.float32

    def fill(n, scale):
        out = cp.empty(n, dt)
        step = 1 << 28
        for i in range(0, n, step):
            v = rs.standard_normal(min(step, n - i), dtype=cp.float32) * scale
            if spec.dtype == "bfloat16":
                out[i:i + len(v)] = (v.view(cp.uint32) >> 16).astype(cp.uint16)
            elif spec.dtype == "float16":
                out[i:i + len(v)] = v.astype(cp.float16).view(cp.uint16)
            else:
                out[i:i + len(v)] = v
        return out

    buf = fill(layout.total, 1.0 / np.sqrt(spec.hidden_dim))
    router = fill(spec.num_experts * spec.hidden_dim, 2.0 / np.sqrt(spec.hidden_dim))
    router = router.reshape(spec.num_experts, spec.hidden_dim)
    if spec.dtype == "float16":
        buf, router = buf.view(cp.float16), router.view(cp.float16)
    return PackedWeights(buf, router, layout)


def device_x(spec, T, seed=1):
    import cupy as cp
    import torch
    v = cp.random.RandomState(seed).standard_normal((T, spec.hidden_dim), dtype=cp.float32)
    if spec.dtype == "bfloat16":
        return torch.as_tensor(v, device="cuda").to(torch.bfloat16)
    return v.astype(spec.dtype)


def graph_time_ms(fn, reps=REPS, trials=10):
    """Median GPU time of one fn() from a CUDA graph of ``reps`` calls."""
    import cupy as cp
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        fn()
        stream.synchronize()
        stream.begin_capture()
        for _ in range(reps):
            fn()
        graph = stream.end_capture()
        graph.launch()
        stream.synchronize()
        times = []
        for _ in range(trials):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record(stream)
            graph.launch(stream)
            b.record(stream)
            b.synchronize()
            times.append(cp.cuda.get_elapsed_time(a, b) / reps)
    return float(np.median(times))


def python_time_ms(fn, reps=50):
    import cupy as cp
    fn()
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    cp.cuda.Device().synchronize()
    return (time.perf_counter() - t0) * 1e3 / reps


def floor_ms(spec, T):
    """max(bytes / 3.02 TB/s, FLOPs / 694 TFLOP/s) on an H100 (docs/PERF.md)."""
    E, k, H, F = spec.num_experts, spec.top_k, spec.hidden_dim, spec.ffn_dim
    touched = E * (1 - (1 - k / E) ** T)
    wbytes = touched * 3 * H * F * spec.dt.itemsize
    abytes = 2 * T * H * spec.dt.itemsize
    return max((wbytes + abytes) / 3.02e12, spec.flops(T) / 694e12) * 1e3


def bench(shapes, tokens, out_json=None):
    import cupy as cp
    import torch
    from moegen import arrays
    from moegen.backends.base import Call
    from moegen.spec import MoESpec
    rows = []
    for sname in shapes:
        spec = MoESpec(**shape_fields(sname), dtype="bfloat16")
        kernel, secs = build(spec)
        w = device_weights(kernel)
        mod = kernel.module
        for T in tokens:
            x = device_x(kernel.spec, T)
            out = torch.empty_like(x) if isinstance(x, torch.Tensor) else cp.empty_like(x)
            kernel(x, w, out=out)
            ws = mod.workspace(T)
            call = Call(x=mod.native(arrays.describe(x, "x")), packed=w,
                        out=mod.native(arrays.describe(out, "out")), tokens=T)
            row = {"shape": sname, "T": T, "compile_s": round(secs, 2)}
            for stage in ("route", "group", "ffn1", "ffn2", "combine"):
                row[stage] = graph_time_ms(lambda s=stage: mod.run_stage(s, ws, call))
            row["layer_graph"] = graph_time_ms(lambda: kernel(x, w, out=out))
            row["layer_python"] = python_time_ms(lambda: kernel(x, w, out=out))
            row["floor"] = floor_ms(kernel.spec, T)
            row["route_share"] = row["route"] / row["layer_graph"]
            rows.append(row)
            print(f"{sname:14s} T={T:6d} route {row['route']*1e3:8.1f}us group {row['group']*1e3:7.1f}us "
                  f"ffn1 {row['ffn1']*1e3:9.1f}us ffn2 {row['ffn2']*1e3:9.1f}us combine {row['combine']*1e3:7.1f}us "
                  f"| layer graph {row['layer_graph']:.4f} ms python {row['layer_python']:.4f} ms "
                  f"floor {row['floor']:.4f} ms route {100*row['route_share']:.1f}%", flush=True)
        del w
    if out_json:
        with open(out_json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


def check(quick=False):
    """Small correctness run of every stage (meant to run under compute-sanitizer); ``quick``:
    one spec at a decode and a multi-block token count (for racecheck, which is slow)."""
    import cupy as cp
    from moegen import reference
    from moegen.spec import MoESpec
    specs = [MoESpec(8, 2, 64, 128, dtype="float16"),
             MoESpec(128, 8, 100, 72, dtype="float32", activation="gelu", bias=True),
             MoESpec(64, 6, 96, 64, dtype="float16", routing="sigmoid_topk", n_group=8,
                     topk_group=2, num_shared_experts=1)]
    worst = 0.0
    for spec in specs[-1:] if quick else specs:
        kernel, _ = build(spec)
        for T in (5, 1200) if quick else (1, 17, 130, 1200):
            x, w = reference.random_problem(spec, T, seed=T)
            packed = kernel.pack(**reference.weight_kwargs(spec, w))
            xd = cp.asarray(x)
            out = cp.full(x.shape, np.nan, x.dtype)
            kernel(xd, packed, out=out, return_stats=True)
            ids, wts = kernel.route(xd, packed)
            ref, _ = reference.moe(spec, x, w, topk_ids=cp.asnumpy(ids), topk_weights=cp.asnumpy(wts))
            err = reference.rel_error(cp.asnumpy(out), ref)
            worst = max(worst, err / spec.dt.tolerance)
            print(f"{spec.name} T={T}: rel error {err:.2e} (tolerance {spec.dt.tolerance:.0e})", flush=True)
            if not err <= spec.dt.tolerance:
                return 1
    print(f"check ok (worst error / tolerance = {worst:.3f})")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--quick", action="store_true", help="with --check: one spec, two token counts")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", default="1,8,64,512,4096,16384")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.check:
        return check(args.quick)
    bench(args.shapes.split(","), [int(t) for t in args.tokens.split(",")], args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
