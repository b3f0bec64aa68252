"""The benchmark shapes and token counts, written once (``moegen bench`` and benchmarks/).

Every shape is SwiGLU with softmax top-k routing and renormalisation.
"""

from __future__ import annotations

# name -> (E experts, k per token, H hidden, F expert ffn)
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "seed-small": (8, 2, 512, 2048),
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "deepseek-v3": (256, 8, 7168, 2048),
}
TARGET_TOKENS = (1, 8, 64, 512, 4096, 16384)
CPU_TOKENS = (1, 16, 128, 1024)


def shape_fields(name: str) -> dict:
    """MoESpec keyword arguments of a named shape; ValueError naming the known shapes."""
    if name not in SHAPES:
        raise ValueError(f"shape must be one of {list(SHAPES)}, got {name!r}")
    E, k, H, F = SHAPES[name]
    return dict(num_experts=E, top_k=k, hidden_dim=H, ffn_dim=F)
