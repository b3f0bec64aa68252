"""Prefill: moegen's whole layer with the persistent warp-specialised expert GEMMs (tile kind
"wgmma_ws", templates/cuda/_gemm_ws.cuh.jinja; the sm_90a tuning choice
``tile_bm128=wgmma_ws_bm128_bn256_bk64_w2x4_s4``) against the same layer on the default
one-CTA-per-tile wgmma kernels.

Per (shape, T): random bf16 packed weights made on the GPU (torch), random x; each variant's
layer runs once on NaN-poisoned outputs (checked NaN-free), then three more times (required
bitwise equal to the first: the dynamic tile scheduler changes which CTA computes a tile, never
its arithmetic), and the two variants' outputs are compared (relative L2; the fast epilogue
differs from the exact one by ~1e-5).  The persistent kernels' tile counters must be 0 after
the runs.  Then CUDA-event medians of eager calls, alternated between the variants.

The design, the kernel-alone measurements (runs 1-8) and what is left are in
results/prefill_gemm_notes.md.

    python benchmarks/prefill_gemm.py --json out.json [--shapes mixtral-8x7b,deepseek-v3]
                                      [--tokens 4096,16384] [--check-only]

``--check-only`` skips the timing (for compute-sanitizer: ``compute-sanitizer --tool racecheck
--kernel-name kns=wgmma_ws python benchmarks/prefill_gemm.py --shapes small --tokens 300
--check-only --variants ws``).
``--async-tile-store`` builds the persistent kernels with the plan's ``ws.async_tile_store``
(the tile ring's index by st.async), to compare racecheck reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moegen.backends.cuda_tiles import WGMMA_TILES, WS_TILES  # noqa: E402
from moegen.spec import MoESpec  # noqa: E402

SHAPES = {
    "mixtral-8x7b": MoESpec(8, 2, 4096, 14336, dtype="bfloat16"),
    "deepseek-v3": MoESpec(256, 8, 7168, 2048, dtype="bfloat16", routing="sigmoid_topk", n_group=8,
                           topk_group=4, routed_scaling_factor=2.5, num_shared_experts=1),
    "qwen3-30b-a3b": MoESpec(128, 8, 2048, 768, dtype="bfloat16"),
    "small": MoESpec(8, 2, 512, 1024, dtype="bfloat16"),
}
WS_TILE = {"tile_bm128": WS_TILES[128].tag}
WGMMA_TILE = {"tile_bm128": WGMMA_TILES[128][0].tag}


def build(spec: MoESpec, tuning: dict, async_store: bool):
    """A MoEKernel of ``spec`` with ``tuning`` (no cache write outside MOEGEN_CACHE_DIR)."""
    from moegen import jit
    if not async_store:
        return jit.compile_tuned(spec, tuning)
    from moegen.backends.base import Artifact
    from moegen.backends import get_backend
    from moegen.kernel import MoEKernel
    from moegen.render import render
    plan = jit.plan_for(jit.resolve(spec), tuning)
    detail = dataclasses.replace(plan.detail, ws=dataclasses.replace(plan.detail.ws, async_tile_store=True))
    plan = dataclasses.replace(plan, detail=detail)
    be = get_backend("cuda")
    art = be.compile(render(plan), plan.spec, plan.target, "async-tile-store")
    return MoEKernel(plan.spec, be.load(Artifact(art.binary, art.meta), plan), art.meta)


def random_weights(torch, kernel):
    from moegen.layout import PackedWeights
    lay, spec = kernel.layout, kernel.spec
    buf = torch.empty(lay.total, dtype=torch.bfloat16, device="cuda")
    for i in range(0, lay.total, 1 << 28):
        buf[i:i + (1 << 28)].normal_(0.0, 1.0 / math.sqrt(spec.hidden_dim))
    router = torch.randn(spec.num_experts, spec.hidden_dim, device="cuda").to(torch.bfloat16)
    return PackedWeights(buf, router, lay)


def median_ms(torch, fn, reps, rounds=5):
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(rounds):
        s.record()
        for _ in range(reps):
            fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / reps)
    return statistics.median(times)


def run(args):
    import torch  # optional heavy package: the device run only
    dev = torch.cuda.get_device_name(0)
    print(f"device {dev}, torch {torch.__version__}", flush=True)
    out = {"device": dev, "rows": []}
    variants = args.variants.split(",")
    for shape in args.shapes.split(","):
        spec = SHAPES[shape].replace(backend="cuda")
        t0 = time.perf_counter()
        kernels = {}
        if "ws" in variants:
            kernels["ws"] = build(spec, WS_TILE, args.async_tile_store)
        if "wgmma" in variants:
            kernels["wgmma"] = build(spec, WGMMA_TILE, False)
        print(f"{shape}: built in {time.perf_counter() - t0:.1f} s; prefill tiles "
              f"{ {n: k.module.plan.buckets[-1].ffn1.tag for n, k in kernels.items()} }", flush=True)
        torch.manual_seed(0)
        weights = random_weights(torch, next(iter(kernels.values())))
        for T in map(int, args.tokens.split(",")):
            x = torch.randn(T, spec.hidden_dim, device="cuda").to(torch.bfloat16)
            row = {"shape": shape, "T": T}
            outs = {}
            for name, k in kernels.items():
                o = torch.full_like(x, float("nan"))
                k(x, weights, out=o)
                torch.cuda.synchronize()
                row[f"{name}_nan"] = int(torch.isnan(o).sum().item())
                same = True
                for _ in range(3):
                    o2 = torch.full_like(x, float("nan"))
                    k(x, weights, out=o2)
                    torch.cuda.synchronize()
                    same &= torch.equal(o2.view(torch.int16), o.view(torch.int16))
                row[f"{name}_bitwise_repeat"] = bool(same)
                ws = k.module.workspace(T)
                if ws.sched1 is not None:
                    row[f"{name}_sched_after"] = ws.sched1.tolist() + ws.sched2.tolist()
                outs[name] = o
            if len(outs) == 2:
                a, b = outs["ws"].double(), outs["wgmma"].double()
                row["rel_diff"] = (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()
            if not args.check_only:
                reps = 3 if T > 8192 else 10
                for name, k in kernels.items():      # warm both, then alternate
                    k(x, weights, out=outs[name])
                for _ in range(2):
                    for name, k in kernels.items():
                        ms = median_ms(torch, lambda k=k, o=outs[name]: k(x, weights, out=o), reps)
                        row.setdefault(f"{name}_ms", []).append(round(ms, 4))
            print(json.dumps(row), flush=True)
            out["rows"].append(row)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(out, f, indent=1)
        weights = kernels = outs = None          # free this shape's weights before the next
        torch.cuda.empty_cache()
    if not args.check_only and len(variants) == 2:
        print("\n| shape | T | wgmma ms | wgmma_ws ms | change | bitwise repeat | rel diff |")
        print("|---|---|---|---|---|---|---|")
        for r in out["rows"]:
            old, new = min(r["wgmma_ms"]), min(r["ws_ms"])
            print(f"| {r['shape']} | {r['T']} | {old:.3f} | {new:.3f} | {100 * (new / old - 1):+.1f}% | "
                  f"{r['ws_bitwise_repeat']} | {r['rel_diff']:.1e} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="mixtral-8x7b,deepseek-v3")
    ap.add_argument("--tokens", default="4096,16384")
    ap.add_argument("--json", default=None)
    ap.add_argument("--variants", default="ws,wgmma", help="ws (the persistent kernels), wgmma (the default)")
    ap.add_argument("--check-only", action="store_true", help="check, do not time (for compute-sanitizer)")
    ap.add_argument("--async-tile-store", action="store_true",
                    help="the persistent kernels with the tile ring's index stored by st.async")
    run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
