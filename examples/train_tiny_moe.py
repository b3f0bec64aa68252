"""Train a tiny MoE regression model with moegen's generated backward kernels.

    python examples/train_tiny_moe.py                       # 300 steps, writes train_tiny_moe.png
    python examples/train_tiny_moe.py --steps 50 --out /tmp/curves.png
    python examples/train_tiny_moe.py --device cuda         # the same in bf16 on the GPU

The model is one MoE layer (8 experts, top-2, swiglu, c backend, fp32) fitted to a fixed random
teacher function.  The router starts skewed (a router bias that sends most tokens to the first
experts), so the load-balancing loss has work to do.  The same model is trained twice from the
same initial weights and data: once with the seed's adaptive balance coefficient,
base·(1 + variance of expert usage), once with the fixed coefficient base, and once without a
balance loss as the baseline.  Every run's loss and expert-usage imbalance (coefficient of
variation of the tokens per expert) are printed and plotted to one PNG.

The forward pass is the compiled forward kernel and the backward pass the generated backward
kernels (moegen.torch.autograd): on the CPU the c backend in fp32; on the GPU (``--device cuda``,
the default when one is present) the cuda backend in bf16, with fp32 master weights that the
optimiser updates and that are cast to bf16 for each step.  ``--device cuda`` without a GPU
says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

import torch

from moegen.spec import MoESpec
from moegen.torch.autograd import moe_train, param_names

NO_GPU = "--device cuda needs a CUDA GPU (torch.cuda.is_available() is False); rerun with --device cpu"


def init_params(spec: MoESpec, seed: int):
    """Initial weights (nn.Linear-like scales) and a skewed router bias."""
    g = torch.Generator().manual_seed(seed)
    E, n, H, F = spec.num_experts, spec.num_experts + spec.num_shared_experts, spec.hidden_dim, spec.ffn_dim
    shapes = {"router": (E, H), "w1": (n, F, H), "w3": (n, F, H), "w2": (n, H, F)}
    fan_in = {"router": H, "w1": H, "w3": H, "w2": F}
    params = [torch.randn(shapes[name], generator=g) / fan_in[name] ** 0.5 for name in param_names(spec)]
    bias = torch.linspace(1.5, -1.5, E)          # most tokens to the first experts at the start
    return params, bias


def teacher_data(spec: MoESpec, tokens: int, steps: int, seed: int):
    """Batches of (x, target) from a fixed nonlinear teacher."""
    g = torch.Generator().manual_seed(seed + 1)
    H = spec.hidden_dim
    a = torch.randn(H, 4 * H, generator=g) / H ** 0.5
    b = torch.randn(4 * H, H, generator=g) / (4 * H) ** 0.5
    for _ in range(steps):
        x = torch.randn(tokens, H, generator=g)
        yield x, torch.tanh(x @ a) @ b


def usage_cv(spec: MoESpec, x, router, bias) -> float:
    """Coefficient of variation of the tokens per expert of this batch's top-k routing."""
    probs = torch.softmax(x @ router.T + bias, dim=1)
    ids = torch.topk(probs, spec.top_k, dim=1).indices
    counts = torch.bincount(ids.reshape(-1), minlength=spec.num_experts).double()
    return float(counts.std(unbiased=False) / counts.mean())


def train(spec: MoESpec, steps: int, tokens: int, base: float, adaptive: bool, seed: int, lr: float,
          device: str = "cpu"):
    """One training run; returns the per-step history.  The parameters are fp32 (the optimiser's
    master weights) and are cast to the spec dtype for each step."""
    params, bias = init_params(spec, seed)
    params = [p.to(device).requires_grad_() for p in params]
    bias = bias.to(device).requires_grad_()
    opt = torch.optim.Adam(params + [bias], lr=lr)
    dt = getattr(torch, spec.dtype)
    hist = {"loss": [], "mse": [], "usage_cv": []}
    for x, target in teacher_data(spec, tokens, steps, seed):
        x, target = x.to(device), target.to(device)
        y, aux = moe_train(spec, x.to(dt), [p.to(dt) for p in params], bias.to(dt),
                           balance_coeff=base, z_coeff=1e-4, adaptive=adaptive)
        mse = torch.mean((y.float() - target) ** 2)
        loss = mse + aux.float()
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist["loss"].append(float(loss.detach()))
        hist["mse"].append(float(mse.detach()))
        hist["usage_cv"].append(usage_cv(spec, x, params[0].detach(), bias.detach()))
    return hist


def plot(runs: dict, out: str) -> None:
    import matplotlib                # optional heavy dependency, only for the figure
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for label, hist in runs.items():
        ax1.plot(hist["mse"], label=label)
        ax2.plot(hist["usage_cv"], label=label)
    ax1.set(xlabel="step", ylabel="MSE", yscale="log", title="regression loss")
    ax2.set(xlabel="step", ylabel="std / mean of tokens per expert", title="expert usage imbalance")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--tokens", type=int, default=256, help="tokens per batch")
    p.add_argument("--base-coeff", type=float, default=0.05, help="balance loss coefficient (base)")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda (bf16) when a GPU is present, else cpu (fp32)")
    p.add_argument("--out", default="train_tiny_moe.png", help="PNG path for the curves")
    args = p.parse_args(argv)
    if args.steps < 1 or args.tokens < 1:
        p.error(f"--steps and --tokens must be >= 1, got {args.steps} and {args.tokens}")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        raise SystemExit(2)
    spec = MoESpec(num_experts=8, top_k=2, hidden_dim=16, ffn_dim=32, backend="c")
    if device == "cuda":
        spec = spec.replace(backend="cuda", dtype="bfloat16")
    print(f"training on {device} ({spec.dtype}, {spec.backend} backend)")
    runs = {}
    for label, base, adaptive in (("adaptive coefficient", args.base_coeff, True),
                                  ("fixed coefficient", args.base_coeff, False),
                                  ("no balance loss", 0.0, False)):
        hist = runs[label] = train(spec, args.steps, args.tokens, base, adaptive, args.seed, args.lr,
                                   device)
        print(f"{label:21s} MSE {hist['mse'][0]:.4f} -> {hist['mse'][-1]:.4f}   "
              f"usage cv {hist['usage_cv'][0]:.3f} -> {hist['usage_cv'][-1]:.3f}")
    plot(runs, args.out)
    print(f"wrote {args.out}")
    print("(with E experts the variance of the usage shares is at most (1/E)(1 - 1/E), so the "
          "adaptive coefficient stays within 1 + that of the fixed one)")
    return runs


if __name__ == "__main__":
    main()
