"""The reference specs whose renders are checked in under ``generated/``.

``moegen render --out generated/`` refreshes them; ``tests/test_generated.py`` fails when the
checked-in files differ from a fresh render (a template changed without a refresh).
"""

from __future__ import annotations

from pathlib import Path

from .backends.base import Sources
from .plan import make_plan
from .render import render
from .spec import MoESpec

# (label, spec): the seed's 8×top-2×512 layer, a Mixtral-8x7B layer, a Qwen3-30B-A3B layer.
REFERENCE_SPECS = (
    ("seed", MoESpec(num_experts=8, top_k=2, hidden_dim=512, dtype="float32")),
    ("mixtral", MoESpec(num_experts=8, top_k=2, hidden_dim=4096, ffn_dim=14336, dtype="bfloat16")),
    ("qwen3", MoESpec(num_experts=128, top_k=8, hidden_dim=2048, ffn_dim=768, dtype="bfloat16")),
)
BACKENDS = ("c", "cuda")
# The c source is rendered for one ISA tier; the checked-in one is for x86-64-v3 (AVX2 + FMA).
C_TARGET = "x86-64-v3"


def expected_files() -> dict[str, str]:
    """Relative path -> rendered text of every checked-in render."""
    out = {}
    for _, spec in REFERENCE_SPECS:
        for be in BACKENDS:
            s = spec.replace(backend=be)
            out.update(_paths(s, render(make_plan(s, C_TARGET) if be == "c" else s)))
    return out


def _paths(spec: MoESpec, sources: Sources) -> dict[str, str]:
    out = {}
    for fname, text in sources.files.items():
        suffix = fname.split(".", 1)[1] if "." in fname else "txt"
        out[f"{sources.backend}/{spec.name}.{suffix}"] = text
    return out


def write_sources(directory: Path, spec: MoESpec, sources: Sources) -> list[Path]:
    paths = []
    for rel, text in _paths(spec, sources).items():
        p = Path(directory) / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        paths.append(p)
    return paths


def write_generated(directory: Path) -> list[Path]:
    """Render every reference spec for every backend into ``directory``."""
    paths = []
    for rel, text in expected_files().items():
        p = Path(directory) / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        paths.append(p)
    return paths
