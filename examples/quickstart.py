"""Build a MoE layer, check it against the float64 reference, print the error, then time it.

    python examples/quickstart.py                 # the seed's 8 experts x top-2 x 512, on CPU
    python examples/quickstart.py --backend cuda --dtype bfloat16 --tokens 4096
"""

import argparse
import time

import moegen
from moegen import reference
from moegen.profiling.timing import clock_for, time_calls


def clock_of(kernel):
    """The clock that times this kernel's calls: CUDA events recorded on the stream the call
    launches on (CuPy's current stream, as ``x`` is a CuPy array) for cuda, perf_counter on the
    CPU.  A CUDA call returns before the GPU has finished, so host time alone would measure
    only the launch."""
    return clock_for("cpu" if kernel.spec.backend == "c" else "cuda")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--backend", default="c", choices=["c", "cuda", "auto"])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()

    spec = moegen.MoESpec(num_experts=args.experts, top_k=args.topk, hidden_dim=args.hidden,
                          ffn_dim=args.ffn, dtype=args.dtype, backend=args.backend)
    t0 = time.perf_counter()
    kernel = moegen.compile(spec)
    print(f"{kernel}  (ready in {time.perf_counter() - t0:.2f} s)")

    # Random weights in HF layout (router [E, H], w1/w3 [E, F, H], w2 [E, H, F]) and tokens.
    x, w = reference.random_problem(spec, args.tokens, seed=0)
    weights = kernel.pack(**reference.weight_kwargs(spec, w))
    xd = kernel.module.to_device(x)

    y, stats = kernel(xd, weights, return_stats=True)
    y_ref, _ = reference.moe(spec, x, w)
    err = reference.rel_error(kernel.to_host(y), y_ref)
    ok = err <= spec.dt.tolerance
    print(f"relative error vs float64 reference: {err:.2e} (tolerance {spec.dt.tolerance:.0e}) "
          f"{'ok' if ok else 'FAIL'}")
    print(stats)

    out = kernel.module.empty_like(moegen.arrays.describe(xd, "x"))
    timed = time_calls(lambda i: kernel(xd, weights, out=out), clock_of(kernel), warmup=2,
                       repeats=args.repeats)
    ms = timed["median"]
    print(f"T={args.tokens}: {ms:.3f} ms per call (median of {args.repeats}), "
          f"{args.tokens / ms * 1e3:,.0f} tokens/s, {spec.flops(args.tokens) / ms / 1e9:.2f} TFLOP/s")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
