"""Host overhead of the torch-facing call over the raw moegen callable.

Times, for a tiny spec at T=1 (so the kernel itself costs next to nothing), the median host time
of many calls of: the raw `MoEKernel` call on the backend's native arrays (NumPy / CuPy), the
``torch.ops.moegen.moe`` custom op on torch tensors, and a `moegen.torch.MoEBlock` forward.  On
the GPU the calls are launches (no synchronisation inside the timed loop, one at the end), so
the figure is the host time per call.  Prints a table and writes JSON.

    python benchmarks/torch_overhead.py [--backend c|cuda] [--calls 20000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

import moegen
from moegen import MoESpec
from moegen import reference as R
from moegen.torch import MoEBlock


def _median_us(fn, calls: int, sync) -> float:
    """Median per-call host time in µs over ``calls`` calls, timed in batches of 100."""
    for _ in range(200):
        fn()
    sync()
    times = []
    for _ in range(max(1, calls // 100)):
        t0 = time.perf_counter()
        for _ in range(100):
            fn()
        times.append((time.perf_counter() - t0) / 100 * 1e6)
    sync()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="c", choices=["c", "cuda"])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--json", default="torch_overhead.json")
    args = ap.parse_args()

    spec = MoESpec(8, 2, 64, 64, dtype="float32" if args.backend == "c" else "bfloat16",
                   backend=args.backend)
    x_np, w = R.random_problem(spec, 1, seed=0)
    block = MoEBlock(spec, R.weight_kwargs(spec, w))
    kernel = block.kernel
    if args.backend == "cuda":
        import cupy
        raw_x = cupy.asarray(np.asarray(x_np).view(np.uint16))
        raw_w = kernel.pack(**R.weight_kwargs(spec, w))
        x = torch.from_numpy(np.asarray(x_np, np.float32)).to(torch.bfloat16).cuda()

        def sync():
            torch.cuda.synchronize()
            cupy.cuda.get_current_stream().synchronize()
    else:
        raw_x, raw_w = x_np, kernel.pack(**R.weight_kwargs(spec, w))
        x = torch.from_numpy(x_np)

        def sync():
            pass

    rows = {
        "raw MoEKernel": _median_us(lambda: kernel(raw_x, raw_w), args.calls, sync),
        "torch.ops.moegen.moe": _median_us(
            lambda: torch.ops.moegen.moe(x, block.packed, block.router, None, block.handle),
            args.calls, sync),
        "MoEBlock forward": _median_us(lambda: block(x), args.calls, sync),
    }
    base = rows["raw MoEKernel"]
    print(f"{spec.name} backend={kernel.backend} target={kernel.target} T=1, median of "
          f"{args.calls} calls")
    print(f"{'call':<24}{'µs/call':>10}{'overhead µs':>14}")
    for name, us in rows.items():
        print(f"{name:<24}{us:>10.2f}{us - base:>14.2f}")
    result = {"spec": spec.name, "backend": kernel.backend, "target": kernel.target, "tokens": 1,
              "calls": args.calls, "torch": torch.__version__, "moegen": moegen.__version__,
              "python": platform.python_version(), "machine": platform.machine(),
              "device": torch.cuda.get_device_name() if args.backend == "cuda" else platform.processor(),
              "us_per_call": rows, "overhead_us": {k: v - base for k, v in rows.items()}}
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
