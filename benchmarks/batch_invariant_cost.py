"""Cost of ``batch_invariant=True`` on the c backend: wall clock and callgrind instructions.

    python benchmarks/batch_invariant_cost.py [--shapes seed-small,qwen3-30b-a3b]
                                              [--tokens 1,128,1024] [--budget 4] [--instructions]

Wall clock: the default and the batch-invariant build of each shape, fp32, one thread
(MOEGEN_NUM_THREADS=1 and OMP_NUM_THREADS=1 are set before the first compile), called
alternately in one process for ``--budget`` seconds per token count; medians and minima.
``--instructions``: also callgrind instructions per call (`moegen.bench.instructions`,
x86-64-v3), which takes minutes per shape and token count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout
os.environ.setdefault("MOEGEN_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import moegen  # noqa: E402
from moegen import MoESpec  # noqa: E402
from moegen import reference as R  # noqa: E402
from moegen.bench import instructions  # noqa: E402
from moegen.bench.shapes import SHAPES  # noqa: E402


def wall(name: str, tokens, budget: float) -> list[dict]:
    E, k, H, F = SHAPES[name]
    specs = {bi: MoESpec(E, k, H, F, backend="c", batch_invariant=bi) for bi in (False, True)}
    _, w = R.random_problem(specs[False], 0, seed=0)
    kernels = {bi: moegen.compile(s) for bi, s in specs.items()}
    packed = {bi: kernels[bi].pack(**R.weight_kwargs(s, w)) for bi, s in specs.items()}
    rows = []
    for T in tokens:
        x = np.random.default_rng(T).standard_normal((T, H), dtype=np.float32)
        out = np.empty((T, H), np.float32)
        times = {False: [], True: []}
        for bi in times:
            kernels[bi](x, packed[bi], out=out)
        end = time.perf_counter() + budget
        while time.perf_counter() < end or len(times[True]) < 5:
            for bi in times:
                t0 = time.perf_counter()
                kernels[bi](x, packed[bi], out=out)
                times[bi].append(time.perf_counter() - t0)
        med = {bi: float(np.median(v)) * 1e3 for bi, v in times.items()}
        low = {bi: float(np.min(v)) * 1e3 for bi, v in times.items()}
        rows.append({"shape": name, "T": T, "n": len(times[True]),
                     "default_ms": [med[False], low[False]], "binv_ms": [med[True], low[True]],
                     "ratio_median": med[True] / med[False], "ratio_min": low[True] / low[False]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="seed-small,qwen3-30b-a3b")
    ap.add_argument("--tokens", default="1,128,1024")
    ap.add_argument("--budget", type=float, default=4.0)
    ap.add_argument("--instructions", action="store_true")
    a = ap.parse_args()
    tokens = [int(t) for t in a.tokens.split(",")]
    for name in a.shapes.split(","):
        for row in wall(name, tokens, a.budget):
            print(json.dumps(row), flush=True)
        if a.instructions:
            E, k, H, F = SHAPES[name]
            for bi in (False, True):
                spec = MoESpec(E, k, H, F, backend="c", batch_invariant=bi)
                for r in instructions.measure(spec, tokens, contenders=("moegen",), timeout=7200):
                    print(json.dumps({"shape": name, "batch_invariant": bi, **r}), flush=True)


if __name__ == "__main__":
    main()
