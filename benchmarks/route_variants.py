"""Route-stage time of every routing variant beside softmax_topk (issue 6: within 10%).

    python benchmarks/route_variants.py [--backend c|cuda] [--shapes qwen3-30b-a3b,deepseek-v3]
                                        [--tokens 1,64,4096] [--json out.json]

For each shape and token count the route stage (``route`` or the fused ``route+group``) is
timed alone through `moegen.profiling.profile.profile_kernel` (CUDA events on a GPU, perf_counter
on a CPU; median, rotated inputs) for softmax_topk, topk_softmax and sigmoid_topk (grouped
like DeepSeek-V3 where E allows it), and printed as a ratio to softmax_topk of the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout

from moegen.bench.shapes import shape_fields  # noqa: E402

SHAPES = {name: shape_fields(name) for name in ("seed-small", "qwen3-30b-a3b", "deepseek-v3")}


def variants(shape: dict) -> dict[str, dict]:
    E = shape["num_experts"]
    out = {"softmax_topk": {}, "topk_softmax": {"routing": "topk_softmax"},
           "sigmoid_topk": {"routing": "sigmoid_topk", "routed_scaling_factor": 2.5}}
    if E % 8 == 0 and shape["top_k"] <= 4 * (E // 8):
        out["sigmoid_grouped"] = {"routing": "sigmoid_topk", "n_group": 8, "topk_group": 4,
                                  "routed_scaling_factor": 2.5}
    return out


def _free_device_memory() -> None:
    """Forget memoised kernels (their workspaces) and return pooled device memory."""
    import gc
    from moegen.jit import clear_memo
    clear_memo()
    gc.collect()
    for name in ("cupy", "torch"):
        mod = sys.modules.get(name)
        if name == "cupy" and mod is not None:
            mod.get_default_memory_pool().free_all_blocks()
        if name == "torch" and mod is not None and mod.cuda.is_available():
            mod.cuda.empty_cache()


def main() -> int:
    import moegen
    from moegen.profiling.problems import make_inputs, make_weights
    from moegen.profiling.profile import profile_kernel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="auto", choices=["auto", "c", "cuda"])
    ap.add_argument("--shapes", default="qwen3-30b-a3b,deepseek-v3")
    ap.add_argument("--tokens", default="1,64,4096")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on c")
    ap.add_argument("--budget", type=float, default=0.5, help="seconds per measurement")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    rows = []
    print(f"{'shape':<14} {'T':>6} {'routing':<16} {'stage':<12} {'ms':>9} {'x softmax':>9}")
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        for T in (int(t) for t in args.tokens.split(",")):
            base = None
            for label, extra in variants(shape).items():
                spec = moegen.MoESpec(**shape, **extra, backend=args.backend,
                                      dtype=args.dtype or "float32")
                if spec.backend == "auto":
                    spec = moegen.jit.resolve(spec)
                if args.dtype is None and spec.backend == "cuda":
                    spec = spec.replace(dtype="bfloat16")
                kernel = moegen.compile(spec)
                weights = make_weights(kernel, keep_logical=False)
                xs = make_inputs(kernel, T, count=4)
                prof = profile_kernel(kernel, xs, weights.packed, budget_s=args.budget,
                                      memory=False, graph=False)
                stage = next(s for s in prof["stages"] if s.startswith("route"))
                ms = prof["stage_ms"][stage]
                base = ms if base is None else base
                ratio = ms / base if base else float("nan")
                rows.append({"shape": name, "tokens": T, "routing": label, "stage": stage,
                             "ms": ms, "ratio": ratio, "backend": spec.backend,
                             "target": kernel.target, "spec": spec.name})
                print(f"{name:<14} {T:>6} {label:<16} {stage:<12} {ms:>9.4f} {ratio:>9.2f}",
                      flush=True)
                del kernel, weights, xs, prof           # DeepSeek-V3 weights are 22 GB each:
                _free_device_memory()                   # keep one variant alive at a time
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
