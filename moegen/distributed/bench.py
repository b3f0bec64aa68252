"""Per-stage timing of an expert-parallel layer over N spawned ranks.

    python -m moegen.distributed.bench --ranks 2 --experts 8 --topk 2 --hidden 512 --tokens 256

``run_ep_bench(spec, ranks, tokens, backend)`` launches ``ranks`` processes (gloo + the c backend
on CPUs, NCCL + cuda on GPUs), runs the layer ``repeat`` times on ``tokens`` random tokens per
rank after ``warmup`` calls, and returns the per-stage breakdown (route, pack, exchange,
experts, return, combine: the median per call of the slowest rank, in milliseconds), the
unprofiled layer time, and the bytes each rank sent per call.  Profiling waits at each stage
boundary, so the stage times add up to more than the layer time when stages overlap.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from ..spec import MoESpec
from .launch import launch

_TORCH_BACKEND = {"c": "gloo", "cuda": "nccl"}


def _stage_names():
    from .layer import STAGE_NAMES
    return STAGE_NAMES


def _bench_rank(rank: int, spec: MoESpec, tokens: int, warmup: int, repeat: int,
                chunks: int) -> dict:
    import torch  # optional heavy dependency: only spawned ranks need it
    import torch.distributed as dist
    from .. import reference
    from .layer import ExpertParallelMoE
    _, w = reference.random_problem(spec, 1, seed=0)          # the same weights on every rank
    x = np.random.default_rng(100 + rank).standard_normal((tokens, spec.hidden_dim))
    x = x.astype(np.float32).astype(spec.dt.numpy)
    layer = ExpertParallelMoE(spec, max_tokens=tokens, chunks=chunks,
                              **reference.weight_kwargs(spec, w))
    xt = torch.from_numpy(np.ascontiguousarray(x).view(np.int16 if x.dtype.itemsize == 2 else np.int32))
    xt = xt.view(layer.torch_dtype).to(layer.device)

    def sync():
        if layer.device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    for _ in range(warmup):
        layer(xt)
    per_stage = {name: [] for name in _stage_names()}
    for _ in range(repeat):
        layer.timings.clear()
        sync()
        layer(xt, profile=True)
        for name in per_stage:
            per_stage[name].append(layer.timings.get(name, 0.0))
    totals = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        layer(xt)
        if layer.device.type == "cuda":
            torch.cuda.synchronize()
        totals.append(time.perf_counter() - t0)
    sent = int(layer._buf.send_counts.sum()) * spec.hidden_dim * spec.dt.itemsize
    return {"stages": {k: statistics.median(v) for k, v in per_stage.items()},
            "layer": statistics.median(totals), "sent_bytes": sent}


def run_ep_bench(spec: MoESpec, ranks: int, tokens: int, backend: str | None = None, *,
                 warmup: int = 2, repeat: int = 5, chunks: int = 1) -> dict:
    """Time an expert-parallel layer of ``spec`` over ``ranks`` spawned ranks, ``tokens`` tokens
    per rank.  ``backend``: the torch.distributed backend ("gloo" or "nccl"; default from the
    spec's backend: c -> gloo, cuda -> nccl).

    Returns {"spec", "ranks", "tokens", "chunks", "backend", "stages_ms" {stage: ms},
    "layer_ms", "sent_bytes_per_rank"}: per stage and for the layer, the median over ``repeat``
    calls of the slowest rank.
    """
    from ..jit import resolve
    from .dispatch import prebuild
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise ValueError(f"tokens must be an int >= 1, got {tokens!r}")
    spec = resolve(spec)
    backend = backend or _TORCH_BACKEND[spec.backend]
    if backend != _TORCH_BACKEND[spec.backend]:
        raise ValueError(f"backend must be {_TORCH_BACKEND[spec.backend]!r} for a "
                         f"{spec.backend}-backend spec, got {backend!r}")
    prebuild(spec, ranks)
    per_rank = launch(_bench_rank, ranks, args=(spec, tokens, warmup, repeat, chunks),
                      backend=backend)
    return {"spec": spec.name, "ranks": ranks, "tokens": tokens, "chunks": chunks,
            "backend": backend,
            "stages_ms": {s: 1e3 * max(r["stages"][s] for r in per_rank) for s in _stage_names()},
            "layer_ms": 1e3 * max(r["layer"] for r in per_rank),
            "sent_bytes_per_rank": max(r["sent_bytes"] for r in per_rank)}


def format_table(result: dict) -> str:
    """The breakdown as aligned text lines."""
    lines = [f"{result['spec']}: {result['ranks']} ranks ({result['backend']}), "
             f"{result['tokens']} tokens per rank, {result['chunks']} chunk(s)",
             f"{'stage':<10}{'ms':>10}"]
    lines += [f"{name:<10}{ms:>10.3f}" for name, ms in result["stages_ms"].items()]
    lines.append(f"{'layer':<10}{result['layer_ms']:>10.3f}   (unprofiled, stages overlap)")
    lines.append(f"sent per rank per call: {result['sent_bytes_per_rank'] / 1e6:.3f} MB")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moegen.distributed.bench",
                                description="per-stage timing of an expert-parallel MoE layer")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--shared-experts", type=int, default=0)
    p.add_argument("--backend", default="c", choices=["c", "cuda"])
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    p.add_argument("--chunks", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args(argv)
    spec = MoESpec(num_experts=a.experts, top_k=a.topk, hidden_dim=a.hidden, ffn_dim=a.ffn,
                   dtype=a.dtype, num_shared_experts=a.shared_experts, backend=a.backend)
    print(format_table(run_ep_bench(spec, a.ranks, a.tokens, repeat=a.repeat, chunks=a.chunks)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
