"""c backend vs a PyTorch CPU loop over experts (fp32, same thread count), as ratios.

    python benchmarks/c_backend_speed.py [--threads N] [--shapes seed-small,qwen3-30b-a3b]
                                         [--tokens 1,16,128,1024] [--json out.json]

The CPU machines here are shared and noisy, so absolute times drift between runs: each point
times moegen and torch alternately (best-of and median of several rounds) and reports the
ratio torch/moegen (> 1: moegen is faster).  The torch baseline is the HF-transformers style
loop: router, softmax, top-k, renormalise, then per expert gather -> SwiGLU FFN -> index_add.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from moegen.bench.shapes import SHAPES as ALL_SHAPES  # noqa: E402

SHAPES = {name: ALL_SHAPES[name] for name in ("seed-small", "qwen3-30b-a3b")}


def make_kernel(spec):
    """Compile and load directly through the backend (no cache involved)."""
    from moegen.backends.c import CBackend
    from moegen.kernel import MoEKernel
    from moegen.plan import make_plan
    from moegen.render import render
    be = CBackend()
    spec = spec.replace(backend="c")
    plan = make_plan(spec, be.target(spec), {})
    art = be.compile(render(plan), plan.spec, plan.target, "bench")
    return MoEKernel(plan.spec, be.load(art, plan), art.meta)


def torch_loop(torch, x, wr, w1, w3, w2, k):
    logits = x @ wr.T
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    topw, topi = torch.topk(probs, k, dim=-1)
    topw = topw / topw.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(x)
    mask = torch.nn.functional.one_hot(topi, num_classes=wr.shape[0]).permute(2, 1, 0)
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit.flatten().tolist():
        slot, tok = torch.where(mask[e])
        xe = x[tok]
        h = torch.nn.functional.silu(xe @ w1[e].T) * (xe @ w3[e].T)
        y = (h @ w2[e].T) * topw[tok, slot, None]
        out.index_add_(0, tok, y)
    return out


def timeit(fn, reps):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--shapes", default="seed-small,qwen3-30b-a3b")
    ap.add_argument("--tokens", default="1,16,128,1024")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default="c_backend_speed.json")
    args = ap.parse_args(argv)

    os.environ["MOEGEN_NUM_THREADS"] = str(args.threads)
    import torch
    torch.set_num_threads(args.threads)
    from moegen.backends import isa
    from moegen.reference import rel_error
    from moegen.spec import MoESpec

    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"warning: load average {load_before:.2f} before the run: another process is using "
              f"the CPU, and an oversubscribed torch loop slows down far more than moegen does; "
              f"rerun when the machine is idle", file=sys.stderr)
    rows = []
    for shape in args.shapes.split(","):
        E, K, H, F = SHAPES[shape]
        spec = MoESpec(num_experts=E, top_k=K, hidden_dim=H, ffn_dim=F, backend="c")
        kern = make_kernel(spec)
        rng = np.random.default_rng(0)
        wr = (rng.standard_normal((E, H), dtype=np.float32) * (2.0 / H ** 0.5))
        w1 = rng.standard_normal((E, F, H), dtype=np.float32) / np.float32(H ** 0.5)
        w3 = rng.standard_normal((E, F, H), dtype=np.float32) / np.float32(H ** 0.5)
        w2 = rng.standard_normal((E, H, F), dtype=np.float32) / np.float32(F ** 0.5)
        packed = kern.pack(router=wr, w1=w1, w3=w3, w2=w2)
        tw = [torch.from_numpy(a) for a in (wr, w1, w3, w2)]
        for T in (int(t) for t in args.tokens.split(",")):
            x = rng.standard_normal((T, H), dtype=np.float32)
            out = np.empty_like(x)
            tx = torch.from_numpy(x)
            with torch.inference_mode():
                ref = torch_loop(torch, tx, *tw, K).numpy()
                kern(x, packed, out=out)
                err = rel_error(out, ref)
                reps = max(1, min(20, int(2e9 / max(1, spec.flops(T) + 4 * E * H * F * 3))))
                mg, tt = [], []
                for _ in range(args.rounds):     # alternate, so drift hits both sides alike
                    mg += timeit(lambda: kern(x, packed, out=out), reps)
                    tt += timeit(lambda: torch_loop(torch, tx, *tw, K), reps)
            row = {"shape": shape, "tokens": T, "threads": args.threads,
                   "moegen_ms_median": 1e3 * statistics.median(mg),
                   "torch_ms_median": 1e3 * statistics.median(tt),
                   "ratio_median": statistics.median(tt) / statistics.median(mg),
                   "ratio_best": min(tt) / min(mg), "rel_error_vs_torch": err,
                   "samples": len(mg)}
            rows.append(row)
            print(f"{shape:15s} T={T:5d}  moegen {row['moegen_ms_median']:9.3f} ms  torch "
                  f"{row['torch_ms_median']:9.3f} ms  ratio(median) {row['ratio_median']:5.2f}x  "
                  f"ratio(best) {row['ratio_best']:5.2f}x  err {err:.1e}", flush=True)
        del packed, tw, w1, w3, w2
    result = {"isa": isa.resolve().name, "threads": args.threads, "torch": torch.__version__,
              "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
              "rows": rows}
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
