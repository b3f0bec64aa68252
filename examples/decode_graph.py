"""A serving-style decode loop with CUDA graphs: a moegen MoE block captured once per batch
size, replayed every step with no host work but the replay (GPU only).

    python examples/decode_graph.py [--batch 8] [--steps 200]

Each decode step feeds [batch, H] hidden states through norm -> MoE -> residual.  The block's
launches go to the capturing stream, allocate nothing after warm-up and never synchronise, so
`torch.cuda.graph` captures them; the replayed result is checked against an eager call.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description="decode loop with CUDA graphs over a moegen MoE block")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("decode_graph.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "examples/hf_model.py runs on the CPU", file=sys.stderr)
        return 2
    from moegen import MoESpec
    from moegen import reference as R
    from moegen.torch import MoEBlock

    spec = MoESpec(num_experts=8, top_k=2, hidden_dim=1024, ffn_dim=2048, dtype="bfloat16", backend="cuda")
    _, w = R.random_problem(spec, 0, seed=0)
    weights = {k: torch.from_numpy(R.f64(v).astype("float32")).cuda() for k, v in R.weight_kwargs(spec, w).items()}
    block = MoEBlock(spec, weights)                       # packed on the GPU
    norm = torch.nn.RMSNorm(spec.hidden_dim, device="cuda", dtype=torch.bfloat16)

    def step(h):
        return h + block(norm(h))

    static_h = torch.randn(args.batch, spec.hidden_dim, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):                                # warm-up: workspaces for this batch
            step(static_h)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = step(static_h)

    h = torch.randn(args.batch, spec.hidden_dim, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = step(h)
    static_h.copy_(h)
    graph.replay()
    torch.cuda.synchronize()
    if not torch.equal(static_out, want):
        print("FAILED: the replayed graph differs from the eager step", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    for _ in range(args.steps):
        graph.replay()
        static_h.copy_(static_out)                        # the next step's input
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    print(f"{spec.name}: batch {args.batch}, {args.steps} graph replays, {dt * 1e6:.1f} µs/step; "
          f"replay == eager: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
