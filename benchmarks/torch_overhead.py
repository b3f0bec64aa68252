"""Host overhead of the torch-facing call over the raw moegen callable.

Times, for a tiny spec at T=1 (so the kernel itself costs next to nothing), the median host time
of many calls of: the raw `MoEKernel` call on the backend's native arrays (NumPy / CuPy), the
``torch.ops.moegen.moe`` custom op on torch tensors, the op's body without the dispatcher
(`moegen.torch.ops.run_moe`), and a `moegen.torch.MoEBlock` forward.  Every call gets its
arguments from local variables, as the raw call does; the row "op, args read off the block"
passes ``block.packed`` and ``block.router`` as the op row did before commit 9b2f385: two
``nn.Module.__getattr__`` lookups, ~2.8 µs on the CPU dev box, which are not the op's.
On the GPU the calls are launches (no synchronisation inside the timed loop, one at the end),
so the figure is the host time per call.

Each round times every row once, in batches of ``--batch`` calls and in a new random order
(a fixed order moved a row by up to 1 µs depending on the row before it), so a load change on a
shared machine hits every row alike; each row's figure is the median over ``--rounds`` rounds,
and the overhead is the median of the per-round differences to the raw call, with its spread
(the rounds' 25th and 75th percentiles).  ``--parts`` also times the host-side pieces of a call
(describe, output allocation, weights lookup, workspace; on c the NumPy view, on cuda the
alignment check, torch's stream and the replay of the recorded launches) and the dispatcher
alone: an op of ``moe``'s schema whose body returns a tensor it keeps, and one whose body
returns a new ``torch.empty_like(x)``.  ``--dispatch`` (with ``--parts``) adds empty ops with
another handle (32 characters, an int) or fewer arguments, and the real op called with a
32-character handle registered for the same kernel (what a short digest handle would save).
Prints a table and writes JSON.

    python benchmarks/torch_overhead.py [--backend c|cuda] [--rounds 60] [--batch 200]
                                        [--parts [--dispatch]] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import time

import numpy as np
import torch

import moegen
from moegen import MoESpec
from moegen import reference as R
from moegen.torch import MoEBlock


def _batch_us(fn, batch: int) -> float:
    """Mean host time per call in µs over one batch of ``batch`` calls."""
    t0 = time.perf_counter()
    for _ in range(batch):
        fn()
    return (time.perf_counter() - t0) / batch * 1e6


def _percentile(v: list[float], q: float) -> float:
    v = sorted(v)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


def interleaved(rows: dict, rounds: int, batch: int, sync) -> dict[str, list[float]]:
    """Per-round µs/call of every row, the rows timed one after another within each round, in
    a new (seeded) random order each round."""
    for fn in rows.values():            # warm up: workspaces, memo tables, lazy imports
        for _ in range(200):
            fn()
    sync()
    times = {name: [] for name in rows}
    order = list(rows.items())
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name, fn in order:
            times[name].append(_batch_us(fn, batch))
            sync()
    return times


_libraries = []      # the empty ops' Library objects: deleting one removes its ops
_SCHEMA = "(Tensor x, Tensor buffer, Tensor router, Tensor? router_bias, str kernel) -> Tensor"
_SHORT_HANDLE = "moegen-overhead-bench-0123456789"      # 32 characters


def _empty_ops(x, packed, router, handle, variants: bool) -> dict:
    """Rows calling ops whose bodies do nothing, registered as moegen's are (body on the CPU and
    CUDA keys, Autograd a fallthrough): the dispatcher's share of the op.  With ``moe``'s schema
    the body returns a tensor it keeps, or a new ``torch.empty_like(x)``; with ``variants`` also
    other handle values (32 characters, an int) and fewer arguments, kept output."""
    kept_out = torch.empty_like(x)
    kept = lambda *_: kept_out                                  # noqa: E731
    ops = {"kept": (_SCHEMA, kept), "fresh": (_SCHEMA, lambda x, *_: torch.empty_like(x))}
    if variants:
        ops.update({
            "int_handle": (_SCHEMA.replace("str kernel", "int kernel"), kept),
            "no_bias": ("(Tensor x, Tensor buffer, Tensor router, str kernel) -> Tensor", kept),
            "one_weight": ("(Tensor x, Tensor buffer, str kernel) -> Tensor", kept),
            "x_only": ("(Tensor x) -> Tensor", kept),
            "weight_list": ("(Tensor x, Tensor[] weights, str kernel) -> Tensor", kept)})
    lib = torch.library.Library("moegen_overhead_bench", "DEF")
    for name, (schema, body) in ops.items():
        lib.define(name + schema)
        lib.impl(name, body, "CPU")
        lib.impl(name, body, "CUDA")
        lib.impl(name, torch.library.fallthrough_kernel, "Autograd")
    _libraries.append(lib)
    ns = torch.ops.moegen_overhead_bench
    rows = {"part: empty op, kept output": lambda: ns.kept(x, packed, router, None, handle),
            "part: empty op, new output": lambda: ns.fresh(x, packed, router, None, handle)}
    if variants:
        direct = ns.kept.default._op
        rows.update({
            "part: empty op, 32-char handle": lambda: ns.kept(x, packed, router, None, _SHORT_HANDLE),
            "part: empty op, int handle": lambda: ns.int_handle(x, packed, router, None, 7),
            "part: empty op, .default._op": lambda: direct(x, packed, router, None, handle),
            "part: empty op, no router_bias": lambda: ns.no_bias(x, packed, router, handle),
            "part: empty op, (x, buffer, str)": lambda: ns.one_weight(x, packed, handle),
            "part: empty op, (x)": lambda: ns.x_only(x),
            "part: empty op, (x, [buffer, router], str)":
                lambda: ns.weight_list(x, [packed, router], handle)})
    return rows


def _parts(kernel, block, x, dispatch: bool):
    """The host-side pieces of one torch call on their own: on the c backend the native
    (NumPy) view the stages take; on cuda the alignment check, torch's stream and the replay
    of the recorded launches (`CudaModule.enqueue`: the launches' host time alone); on both the
    dispatcher with empty bodies (`_empty_ops`, its variants with ``dispatch``)."""
    from moegen import arrays
    from moegen.torch.ops import kernel_for, packed_weights
    mod, handle = kernel.module, block.handle
    packed, router = block.packed, block.router
    info = arrays.describe(x, "x")
    parts = {
        **_empty_ops(x, packed, router, handle, dispatch),
        "part: torch.empty_like(x)": lambda: torch.empty_like(x),
        "part: describe(x)": lambda: arrays.describe(x, "x"),
        "part: module.empty_like(x)": lambda: mod.empty_like(info),
        "part: kernel_for(handle)": lambda: kernel_for(handle),
        "part: packed_weights lookup": lambda: packed_weights(kernel, handle, packed, router),
        "part: module.workspace(1)": lambda: mod.workspace(1),
    }
    if kernel.backend != "cuda":
        return {**parts, "part: module.native(x)": lambda: mod.native(info)}
    out = torch.empty_like(x)
    checked = kernel._check_weights(packed_weights(kernel, handle, packed, router))
    ptrs = (x.data_ptr(), out.data_ptr(), *checked.ptrs, None, None, None)
    ws = mod.workspace(1)
    return {**parts,
            "part: check_aligned(x)": lambda: mod.check_aligned(info),
            "part: torch stream lookup": mod._torch_stream_ptr,
            "part: enqueue (replay launches)": lambda: mod.enqueue(kernel.stages, ws, ptrs, False, True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="c", choices=["c", "cuda"])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--parts", action="store_true", help="also time the pieces of a torch call")
    ap.add_argument("--dispatch", action="store_true",
                    help="with --parts: also empty ops with other handles and fewer arguments, "
                         "and the op called with a 32-character handle of the same kernel")
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

    from moegen.torch.ops import run_moe
    op = torch.ops.moegen.moe
    packed, router, handle = block.packed, block.router, block.handle
    rows = {
        "raw MoEKernel": lambda: kernel(raw_x, raw_w),
        "torch.ops.moegen.moe": lambda: op(x, packed, router, None, handle),
        "op, args read off the block": lambda: op(x, block.packed, block.router, None, block.handle),
        "op body, no dispatcher": lambda: run_moe(x, packed, router, None, handle),
        "MoEBlock forward": lambda: block(x),
    }
    if args.parts and args.dispatch:
        # The same kernel under a short handle: what a digest handle would save per call.
        from moegen.torch import ops
        ops._kernels[_SHORT_HANDLE] = kernel
        rows["op, 32-char handle"] = lambda: op(x, packed, router, None, _SHORT_HANDLE)
    if args.parts:
        rows.update(_parts(kernel, block, x, args.dispatch))
    with torch.no_grad():
        times = interleaved(rows, args.rounds, args.batch, sync)
    base = times["raw MoEKernel"]
    med = {k: statistics.median(v) for k, v in times.items()}
    over = {k: [a - b for a, b in zip(v, base)] for k, v in times.items() if not k.startswith("part")}
    spread = {k: [_percentile(v, 0.25), _percentile(v, 0.75)] for k, v in over.items()}
    print(f"{spec.name} backend={kernel.backend} target={kernel.target} T=1, "
          f"{args.rounds} interleaved rounds of {args.batch} calls; MOEGEN_NUM_THREADS="
          f"{os.environ.get('MOEGEN_NUM_THREADS', '(all CPUs)')}")
    print(f"{'call':<44}{'µs/call':>10}{'overhead µs (p25..p75)':>30}")
    for name, us in med.items():
        extra = ""
        if name in over:
            extra = f"{statistics.median(over[name]):>10.2f} ({spread[name][0]:.2f}..{spread[name][1]:.2f})"
        print(f"{name:<44}{us:>10.2f}{extra:>30}")
    result = {"spec": spec.name, "backend": kernel.backend, "target": kernel.target, "tokens": 1,
              "rounds": args.rounds, "batch": args.batch,
              "num_threads": os.environ.get("MOEGEN_NUM_THREADS"),
              "torch": torch.__version__, "moegen": moegen.__version__, "commit": _commit(),
              "python": platform.python_version(), "machine": platform.machine(),
              "device": torch.cuda.get_device_name() if args.backend == "cuda" else platform.processor(),
              "us_per_call": med,
              "overhead_us": {k: statistics.median(v) for k, v in over.items()},
              "overhead_us_p25_p75": spread}
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {args.json}")


def _commit() -> str:
    """The git commit of this checkout ("" when it is not one)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return ""


if __name__ == "__main__":
    main()
