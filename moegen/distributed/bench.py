"""Per-stage timing of an expert-parallel layer over N spawned ranks.

    python -m moegen.distributed.bench --ranks 2 --experts 8 --topk 2 --hidden 512 --tokens 256

``run_ep_bench(spec, ranks, tokens, backend)`` launches ``ranks`` processes (gloo + the c backend
on CPUs, each rank with its share of the cores unless ``MOEGEN_NUM_THREADS`` is set; NCCL +
cuda on GPUs), runs the layer ``repeat`` times on ``tokens`` random tokens per
rank after ``warmup`` calls, and returns the per-stage breakdown (route, pack, exchange,
experts, return, combine: the median per call of the slowest rank, in milliseconds), the
unprofiled layer time, and each rank's bytes sent to other ranks and their achieved bandwidth.  Profiling waits at each stage
boundary, so the stage times add up to more than the layer time when stages overlap.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from .. import settings
from ..bench.shapes import SHAPES
from ..jit import resolve
from ..spec import MoESpec
from .dispatch import prebuild
from .launch import launch
from .layer import STAGE_NAMES, ExpertParallelMoE
from .placement import Placement

_TORCH_BACKEND = {"c": "gloo", "cuda": "nccl"}


def _stage_names():
    return STAGE_NAMES


def local_weights(spec: MoESpec, ranks: int, rank: int) -> dict:
    """Random weights of one rank's block only (the router whole, the same on every rank), so
    no rank ever holds a large layer's full weights; generated an expert at a time in fp32 and
    stored in the spec dtype.  Keyword arguments of `ExpertParallelMoE`."""
    E, H, F, S = spec.num_experts, spec.hidden_dim, spec.ffn_dim, spec.num_shared_experts
    dt, n = spec.dt.numpy, E // ranks

    def block(count, shape, scale, seed):
        rng = np.random.default_rng(seed)
        out = np.empty((count, *shape), dt)
        for e in range(count):
            out[e] = (rng.standard_normal(shape, dtype=np.float32) * scale).astype(dt)
        return out

    w = {"router": block(1, (E, H), 2.0 / H ** 0.5, 0)[0]}
    base = 1 + 4 * rank
    names = [("w1", (F, H), H), ("w2", (H, F), F)] + ([("w3", (F, H), H)] if spec.gated else [])
    for i, (name, shape, fan_in) in enumerate(names):
        w[name] = block(n, shape, fan_in ** -0.5, 1000 * base + i)
        if S:
            w["shared_" + name] = block(S, shape, fan_in ** -0.5, 7 + i)
    if spec.bias:
        for i, (name, width) in enumerate([("b1", F), ("b2", H)] + ([("b3", F)] if spec.gated else [])):
            w[name] = block(n, (width,), 0.1, 2000 * base + i)
            if S:
                w["shared_" + name] = block(S, (width,), 0.1, 17 + i)
    return w


def _bench_rank(rank: int, spec: MoESpec, tokens: int, warmup: int, repeat: int,
                chunks: int) -> dict:
    import torch  # optional heavy dependency: only spawned ranks need it
    import torch.distributed as dist
    ranks = dist.get_world_size()
    x = np.random.default_rng(100 + rank).standard_normal((tokens, spec.hidden_dim))
    x = x.astype(np.float32).astype(spec.dt.numpy)
    layer = ExpertParallelMoE(spec, max_tokens=tokens, chunks=chunks,
                              **local_weights(spec, ranks, rank))
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
    counts = layer._buf.send_counts.cpu()
    remote = int(counts.sum()) - int(counts[:, rank].sum())      # rows that leave this rank
    stages = {k: statistics.median(v) for k, v in per_stage.items()}
    # dispatch: a row, its expert id and weight; return: an fp32 row
    dispatch = remote * (spec.hidden_dim * spec.dt.itemsize + 8)
    back = remote * spec.hidden_dim * 4
    return {"stages": stages, "layer": statistics.median(totals), "remote_rows": remote,
            "dispatch_bytes": dispatch, "return_bytes": back,
            "dispatch_gbps": dispatch / stages["exchange"] / 1e9 if stages["exchange"] else 0.0,
            "return_gbps": back / stages["return"] / 1e9 if stages["return"] else 0.0}


def run_ep_bench(spec: MoESpec, ranks: int, tokens: int, backend: str | None = None, *,
                 warmup: int = 2, repeat: int = 5, chunks: int = 1) -> dict:
    """Time an expert-parallel layer of ``spec`` over ``ranks`` spawned ranks, ``tokens`` tokens
    per rank.  ``backend``: the torch.distributed backend ("gloo" or "nccl"; default from the
    spec's backend: c -> gloo, cuda -> nccl).

    Returns {"spec", "ranks", "tokens", "chunks", "backend", "stages_ms" {stage: ms},
    "layer_ms", and per rank "remote_rows_per_rank", "dispatch_bytes_per_rank",
    "dispatch_gbps_per_rank", "return_gbps_per_rank"}: per stage and for the layer, the median
    over ``repeat`` calls of the slowest rank; the bandwidths count only the bytes that leave
    a rank (its rows for its own experts stay), over the exchange (dispatch, with the count
    exchange) and return stages of that rank.
    """
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise ValueError(f"tokens must be an int >= 1, got {tokens!r}")
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise ValueError(f"chunks must be an int >= 1, got {chunks!r}")
    spec = resolve(spec)
    Placement(spec.num_experts, ranks)            # ranks must divide E: say so before spawning
    backend = backend or _TORCH_BACKEND[spec.backend]
    if backend != _TORCH_BACKEND[spec.backend]:
        raise ValueError(f"backend must be {_TORCH_BACKEND[spec.backend]!r} for a "
                         f"{spec.backend}-backend spec, got {backend!r}")
    prebuild(spec, ranks)
    share = spec.backend == "c" and "MOEGEN_NUM_THREADS" not in os.environ
    if share:
        # the ranks share this machine's cores: oversubscribed OpenMP teams spin against
        # each other (and against gloo's threads); the spawned ranks inherit the setting
        os.environ["MOEGEN_NUM_THREADS"] = str(max(1, settings.num_threads() // ranks))
    try:
        per_rank = launch(_bench_rank, ranks, args=(spec, tokens, warmup, repeat, chunks),
                          backend=backend)
    finally:
        if share:
            del os.environ["MOEGEN_NUM_THREADS"]
    return {"spec": spec.name, "ranks": ranks, "tokens": tokens, "chunks": chunks,
            "backend": backend,
            "stages_ms": {s: 1e3 * max(r["stages"][s] for r in per_rank) for s in _stage_names()},
            "layer_ms": 1e3 * max(r["layer"] for r in per_rank),
            "remote_rows_per_rank": [r["remote_rows"] for r in per_rank],
            "dispatch_bytes_per_rank": [r["dispatch_bytes"] for r in per_rank],
            "dispatch_gbps_per_rank": [r["dispatch_gbps"] for r in per_rank],
            "return_gbps_per_rank": [r["return_gbps"] for r in per_rank]}


def format_table(result: dict) -> str:
    """The breakdown as aligned text lines."""
    lines = [f"{result['spec']}: {result['ranks']} ranks ({result['backend']}), "
             f"{result['tokens']} tokens per rank, {result['chunks']} chunk(s)",
             f"{'stage':<10}{'ms':>10}"]
    lines += [f"{name:<10}{ms:>10.3f}" for name, ms in result["stages_ms"].items()]
    lines.append(f"{'layer':<10}{result['layer_ms']:>10.3f}   (unprofiled, stages overlap)")
    mb = ", ".join(f"{b / 1e6:.3f}" for b in result["dispatch_bytes_per_rank"])
    lines.append(f"dispatched to other ranks per call (MB, by rank): {mb}")
    for what in ("dispatch", "return"):
        gbps = ", ".join(f"{g:.2f}" for g in result[f"{what}_gbps_per_rank"])
        lines.append(f"{what} GB/s per rank (bytes to other ranks / stage time): {gbps}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moegen.distributed.bench",
                                description="per-stage timing of an expert-parallel MoE layer")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--shape", default=None,
                   help="a named shape of moegen.bench.matrix.SHAPES (sets E, k, H, F)")
    p.add_argument("--routing", default="softmax_topk")
    p.add_argument("--n-group", type=int, default=1)
    p.add_argument("--topk-group", type=int, default=1)
    p.add_argument("--routed-scaling-factor", type=float, default=1.0)
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
    if a.shape:
        if a.shape not in SHAPES:
            p.error(f"--shape must be one of {sorted(SHAPES)}, got {a.shape!r}")
        a.experts, a.topk, a.hidden, a.ffn = SHAPES[a.shape]
    try:
        spec = MoESpec(num_experts=a.experts, top_k=a.topk, hidden_dim=a.hidden, ffn_dim=a.ffn,
                       dtype=a.dtype, num_shared_experts=a.shared_experts, backend=a.backend,
                       routing=a.routing, n_group=a.n_group, topk_group=a.topk_group,
                       routed_scaling_factor=a.routed_scaling_factor)
        result = run_ep_bench(spec, a.ranks, a.tokens, repeat=a.repeat, chunks=a.chunks)
    except ValueError as exc:
        p.error(str(exc))
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
