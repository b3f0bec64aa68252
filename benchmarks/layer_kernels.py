"""Per-kernel GPU time of the cuda layer, read from CUPTI through torch.profiler.

    python benchmarks/layer_kernels.py [--shapes mixtral-8x7b,deepseek-v3] [--tokens 1,8,64]
                                       [--contender .anchors/vllm/vllm_contender.py] [--json out.json]
                                       [--batch-invariant]

For each shape and token count, the whole layer (routing included) is called ``--reps`` times
after a warm-up; the profiler's device-side kernel records give each kernel's mean time per
call.  With ``--contender`` (a plugin file of the side-by-side harness: ``contenders(E, k, H, F,
w13, w2, wg)``) its first entry is profiled the same way on the same weights, given moegen's
routing.  Kernel times are on the GPU only (no launch gaps); the table also prints the layer's
graph-replay time so the gaps show.  ``--batch-invariant`` also times the ``batch_invariant=True``
build of each shape (graph replay, same weights and x): the cost of that mode.  Weights and x
are random (never zeros).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout

import moegen  # noqa: E402
from moegen.bench.shapes import SHAPES, shape_fields  # noqa: E402


def _kernel_means(fn, reps: int) -> dict[str, float]:
    """name -> mean µs per call of every kernel ``fn`` launches (CUPTI device records)."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total[ev.name] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
    return {name: us / reps for name, us in sorted(total.items(), key=lambda kv: -kv[1])}


def _graph_us(fn, reps: int) -> float:
    """Median µs of one call replayed from a CUDA graph (20 calls per graph)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(); fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(20):
            fn()
    times = []
    for _ in range(max(5, reps // 20)):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / 20)
    return sorted(times)[len(times) // 2]


def _load_plugin(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _profile_shape(name: str, a, plugin) -> list[dict]:
    """The rows of one shape: moegen (and the contender, and the batch-invariant build) at
    every token count of ``a.tokens``."""
    rows = []
    f = shape_fields(name)
    E, k, H, F = SHAPES[name]
    spec = moegen.MoESpec(**f, dtype="bfloat16", backend="cuda")
    kern = moegen.compile(spec)
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(E, 2 * F, H, device="cuda", generator=g) / H ** 0.5).bfloat16()
    w2 = (torch.randn(E, H, F, device="cuda", generator=g) / F ** 0.5).bfloat16()
    wg = (torch.randn(H, E, device="cuda", generator=g) / H ** 0.5).bfloat16()
    packed = kern.pack(router=wg, w13=w13, w2=w2)
    if a.batch_invariant:
        bi = moegen.compile(spec.replace(batch_invariant=True))
        bi_packed = bi.pack(router=wg, w13=w13, w2=w2)
    other = next(iter(plugin.contenders(E, k, H, F, w13, w2, wg.t().contiguous()).items())) if plugin else None
    for T in (int(t) for t in a.tokens.split(",")):
        x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
        out = torch.empty_like(x)
        layer = lambda: kern(x, packed, out=out)          # noqa: E731
        row = {"shape": name, "T": T, "moegen_kernels_us": _kernel_means(layer, a.reps),
               "moegen_graph_us": _graph_us(layer, a.reps)}
        if other:
            logits = x.float() @ wg.float()
            tw, ti = torch.topk(torch.softmax(logits, -1), k, dim=-1)
            tw = (tw / tw.sum(-1, keepdim=True)).float()
            call = lambda: other[1](x, tw, ti.int(), wg.t().contiguous())   # noqa: E731
            row[f"{other[0]}_kernels_us"] = _kernel_means(call, a.reps)
            row[f"{other[0]}_graph_us"] = _graph_us(call, a.reps)
        if a.batch_invariant:
            bi_out = torch.empty_like(x)
            row["batch_invariant_graph_us"] = _graph_us(lambda: bi(x, bi_packed, out=bi_out), a.reps)
        rows.append(row)
        print(f"\n{name} T={T}: moegen graph {row['moegen_graph_us']:.1f} µs, kernels "
              f"{sum(row['moegen_kernels_us'].values()):.1f} µs"
              + (f"; batch_invariant=True graph {row['batch_invariant_graph_us']:.1f} µs "
                 f"({row['batch_invariant_graph_us'] / row['moegen_graph_us']:.2f}x)"
                 if a.batch_invariant else ""))
        for kn, us in row["moegen_kernels_us"].items():
            print(f"   {us:9.1f}  {kn[:110]}")
        if other:
            ks = row[f"{other[0]}_kernels_us"]
            print(f"  {other[0]} graph {row[f'{other[0]}_graph_us']:.1f} µs, kernels {sum(ks.values()):.1f} µs")
            for kn, us in ks.items():
                print(f"   {us:9.1f}  {kn[:110]}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="mixtral-8x7b,deepseek-v3,qwen3-30b-a3b")
    ap.add_argument("--tokens", default="1,8,64,512")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--contender", default=None, help="a harness plugin file (its first entry is profiled)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--batch-invariant", action="store_true",
                    help="also time the batch_invariant=True build (graph replay)")
    a = ap.parse_args()
    plugin = _load_plugin(a.contender) if a.contender else None
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent).stdout.strip() or None
    print(f"{torch.cuda.get_device_name()}  commit {commit}")
    results = []
    for name in a.shapes.split(","):
        results += _profile_shape(name, a, plugin)
        torch.cuda.empty_cache()          # the shape's weights are gone with its frame
    if a.json:
        Path(a.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "commit": commit,
                                            "rows": results}, indent=1))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
