"""A training step (forward + backward) of one MoE layer: moegen's training op against
``torch._grouped_mm`` forward + backward, bf16, on the GPU.

Both sides compute the same layer and the same gradients: softmax top-k routing with
renormalisation (the benchmark shapes of `moegen.bench.shapes`, SwiGLU), y = Σ_slots w·FFN(x),
then the gradients of ``<dy, y>`` with respect to x, the router and every expert weight.

* moegen: ``moegen.torch.autograd.moe_train`` on CUDA tensors (the cuda forward kernel, then the
  generated CUDA backward kernels), aux-loss coefficients 0.
* grouped_mm: the router in torch (logits, softmax, top-k, renormalise), a stable sort of the
  slots by expert, ``torch._grouped_mm`` for W13 and W2, SiLU·up, the weighted ``index_add``
  combine; ``torch.autograd`` differentiates all of it.

Per (shape, T): one warm-up step each (checked: the two dx agree to a relative L2 difference
printed as ``dx_diff``; the routings can differ at fp32 ties only), then CUDA-event medians of
``--reps`` steps.  The matmul ceiling is the median rate of a dense 8192³ bf16 ``torch.mm``; a
step's useful work is 18·T·k·H·F flops (6 forward, 12 backward; the router and moegen's
recomputed gate/up GEMM not counted), and ``ceiling`` is that rate over the dense one.
A shape that does not fit in memory is reported as skipped.

    python benchmarks/train_step.py --json train_step.json [--shapes mixtral-8x7b,deepseek-v3]
                                    [--tokens 4096,16384] [--reps 3] [--kernels]

``--kernels`` also profiles one moegen step per point (torch.profiler, CUDA activity) and
prints its GPU kernels by total time (the JSON rows get them as ``moegen_kernels``).
``--pipe-warps MxN`` builds the CUDA backward's pipelined GEMM tile with M x N warps instead of
`moegen.backends.cuda_backward.PIPE_WARPS` (2x4: 8 warps of 64 x 32 outputs; 2x2: 4 warps of
64 x 64), to compare the two (the JSON records the choice).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moegen.bench.shapes import SHAPES, shape_fields  # noqa: E402

# The warp layouts of the backward's pipelined tile that --pipe-warps offers (128 x 128 outputs).
PIPE_WARP_CHOICES = ("2x4", "2x2")
from moegen.spec import MoESpec  # noqa: E402

TOKENS = (4096, 16384)
CEILING_N = 8192


def commit() -> str:
    """The repository's HEAD commit (with ``-dirty`` when the work tree has changes)."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def median_ms(torch, fn, reps: int) -> float:
    """Median CUDA-event time of ``fn()`` over ``reps`` calls (after the caller's warm-up)."""
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def ceiling_tflops(torch) -> float:
    """The dense bf16 matmul rate of this GPU (TFLOP/s, median of 10 8192³ torch.mm)."""
    a = torch.randn(CEILING_N, CEILING_N, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(CEILING_N, CEILING_N, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)
    ms = median_ms(torch, lambda: torch.mm(a, b), 10)
    return 2.0 * CEILING_N ** 3 / (ms * 1e-3) / 1e12


def make_problem(torch, spec: MoESpec, T: int, seed: int = 0) -> dict:
    """Random bf16 x, dy and logical weights on the GPU (weights ~ N(0, 1/fan_in))."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    E, H, F = spec.num_experts, spec.hidden_dim, spec.ffn_dim

    def rand(*shape, scale=1.0):
        return (torch.randn(shape, device="cuda", generator=g) * scale).to(torch.bfloat16)

    return {"x": rand(T, H), "dy": rand(T, H), "router": rand(E, H, scale=2.0 / H ** 0.5),
            "w1": rand(E, F, H, scale=H ** -0.5), "w3": rand(E, F, H, scale=H ** -0.5),
            "w2": rand(E, H, F, scale=F ** -0.5)}


def moegen_step(torch, spec: MoESpec, p: dict):
    """A step of moegen's training op (the problem's tensors become its leaves); returns its
    step function."""
    from moegen.torch.autograd import moe_train, param_names
    x, params = p["x"], [p[n] for n in param_names(spec)]

    def step():
        y, _ = moe_train(spec, x, params, None, balance_coeff=0.0, z_coeff=0.0)
        return torch.autograd.grad([y], [x, *params], grad_outputs=[p["dy"]])[0]
    return step


def grouped_mm_step(torch, spec: MoESpec, p: dict):
    """A step of the torch._grouped_mm layer; returns its step function.  Its W13 is the
    concatenation of the problem's W1 and W3, which it replaces (memory for the big shapes)."""
    E, k, F = spec.num_experts, spec.top_k, spec.ffn_dim
    x, router, w2 = p["x"], p["router"], p["w2"]
    w13 = torch.cat([p.pop("w1").detach(), p.pop("w3").detach()], dim=1).requires_grad_()
    gmm = torch._grouped_mm

    def step():
        probs = torch.softmax((x @ router.t()).float(), dim=-1)
        topw, ids = probs.topk(k, dim=-1)
        topw = topw / topw.sum(dim=-1, keepdim=True)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok = order // k
        offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
        h = gmm(x[tok], w13.transpose(-2, -1), offs=offs)
        h = torch.nn.functional.silu(h[:, :F]) * h[:, F:]
        y = gmm(h, w2.transpose(-2, -1), offs=offs).float() * topw.reshape(-1)[order, None]
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add(0, tok, y)
        return torch.autograd.grad([y.to(x.dtype)], [x, router, w13, w2],
                                   grad_outputs=[p["dy"]])[0]
    return step


def kernel_times(torch, step, top: int = 12) -> list:
    """[(kernel name, total ms, calls)] of one ``step()``, the ``top`` longest (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 1e3, e.count) for e in prof.key_averages()
            if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    return [(k[:60], round(ms, 3), n) for k, ms, n in rows[:top]]


def measure(torch, name: str, T: int, reps: int, ceiling: float, kernels: bool = False) -> dict:
    """One (shape, T) point: both steps timed, or skipped when it does not fit."""
    E, k, H, F = (shape_fields(name)[f] for f in ("num_experts", "top_k", "hidden_dim", "ffn_dim"))
    spec = MoESpec(**shape_fields(name), dtype="bfloat16", backend="cuda")
    flops = 18.0 * T * k * H * F
    row = {"shape": name, "tokens": T, "E": E, "k": k, "H": H, "F": F, "flops": flops}
    p = None
    try:
        p = make_problem(torch, spec, T)
        for n in ("x", "router", "w1", "w3", "w2"):
            p[n].requires_grad_()
        results = {}
        dx = {}
        for label, make in (("moegen", moegen_step), ("grouped_mm", grouped_mm_step)):
            step = make(torch, spec, p)
            dx[label] = step().float()                 # warm-up (compiles, workspaces)
            torch.cuda.synchronize()
            results[label] = median_ms(torch, step, reps)
            if kernels and label == "moegen":
                row["moegen_kernels"] = kernel_times(torch, step)
            del step
            gc.collect()
            torch.cuda.empty_cache()
        diff = (dx["moegen"] - dx["grouped_mm"]).norm() / dx["grouped_mm"].norm()
        row["dx_diff"] = float(diff)
        for label, ms in results.items():
            row[f"{label}_ms"] = round(ms, 3)
            row[f"{label}_tflops"] = round(flops / (ms * 1e-3) / 1e12, 1)
            row[f"{label}_ceiling"] = round(flops / (ms * 1e-3) / 1e12 / ceiling, 3)
        row["speedup"] = round(results["grouped_mm"] / results["moegen"], 3)
    except torch.cuda.OutOfMemoryError as exc:
        row["skipped"] = f"out of memory: {str(exc).splitlines()[0][:160]}"
    finally:
        del p
        gc.collect()
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES),
                    help=f"comma-separated names from {list(SHAPES)}")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated T")
    ap.add_argument("--reps", type=int, default=3, help="timed steps per point (median)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--kernels", action="store_true",
                    help="also list the GPU kernels of one moegen step by time")
    ap.add_argument("--pipe-warps", default=None, choices=PIPE_WARP_CHOICES,
                    help="warps (along M x along N) of the backward's pipelined GEMM tile")
    args = ap.parse_args(argv)
    from moegen.backends import cuda_backward  # the backward whose tile the flag picks
    if args.pipe_warps:
        cuda_backward.PIPE_WARPS = tuple(int(v) for v in args.pipe_warps.split("x"))
    shapes = [s for s in args.shapes.split(",") if s]
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"--shapes: {s!r} is not one of {list(SHAPES)}")
    try:
        tokens = [int(t) for t in args.tokens.split(",") if t]
    except ValueError:
        ap.error(f"--tokens must be comma-separated integers, got {args.tokens!r}")
    if args.reps < 1:
        ap.error(f"--reps must be >= 1, got {args.reps}")
    import torch  # the benchmark's only GPU library
    if not torch.cuda.is_available():
        print("train_step: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    ceiling = ceiling_tflops(torch)
    rows = []
    print(f"dense bf16 matmul ceiling: {ceiling:.0f} TFLOP/s ({torch.cuda.get_device_name()})")
    print(f"{'shape':<15}{'T':>7}{'moegen ms':>11}{'gmm ms':>10}{'speedup':>9}"
          f"{'moegen/ceil':>13}{'gmm/ceil':>10}{'dx diff':>10}")
    for name in shapes:
        for T in tokens:
            r = measure(torch, name, T, args.reps, ceiling, args.kernels)
            rows.append(r)
            if "skipped" in r:
                print(f"{name:<15}{T:>7}  skipped: {r['skipped']}")
                continue
            print(f"{name:<15}{T:>7}{r['moegen_ms']:>11.2f}{r['grouped_mm_ms']:>10.2f}"
                  f"{r['speedup']:>9.2f}{r['moegen_ceiling']:>13.3f}{r['grouped_mm_ceiling']:>10.3f}"
                  f"{r['dx_diff']:>10.1e}")
            for kname, ms, calls in r.get("moegen_kernels", []):
                print(f"    {ms:>9.3f} ms  x{calls:<3} {kname}")
    out = {"benchmark": "train_step", "commit": commit(), "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "ceiling_tflops": round(ceiling, 1), "reps": args.reps,
           "pipe_warps": "x".join(map(str, cuda_backward.PIPE_WARPS)),
           "rows": rows}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
