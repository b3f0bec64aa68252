"""Contender plugin files (``moegen bench --contender FILE``): other MoE kernels timed beside
moegen in the same run, as extra columns of the table and the JSON report.

A contender file is a Python file that defines::

    def contenders(E, k, H, F, w13, w2, wg):
        return {"name": fn, ...}        # fn(x, topk_w, topk_ids, wg) -> y [T, H]

``w13`` [E, 2F, H] (the gate rows, then the up rows), ``w2`` [E, H, F] and the router ``wg``
[H, E] are torch tensors of the benchmark's dtype on its device (CUDA on a GPU).  Each call gets
``x`` [T, H], moegen's own fp32 routing (``topk_w`` [T, k] float32, ``topk_ids`` [T, k] int32)
and ``wg``, and returns y [T, H].  It is timed with the routing given (like the ``triton``
column), its output is checked against the float64 reference like every baseline, and the GPU
target verdicts compare moegen with it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Callable

from ..spec import MoESpec
from .baselines import Baseline, torch_weights

MAX_FILE_BYTES = 1 << 20
RESERVED = ("moegen", "naive", "grouped_mm", "numpy", "triton")


def load(path) -> Callable:
    """The ``contenders`` function of a plugin file; ValueError naming the file and what is
    wrong (missing, not .py, fails to import, no callable ``contenders``)."""
    p = Path(path)
    if p.suffix != ".py":
        raise ValueError(f"--contender must be a .py file, got {str(path)!r}")
    if not p.is_file():
        raise ValueError(f"--contender file {str(path)!r} does not exist")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"--contender file {str(path)!r} is larger than {MAX_FILE_BYTES} bytes")
    name = f"moegen_contender_{abs(hash(str(p.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, p)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the plugin's own error, reported in one line
        raise ValueError(f"--contender file {str(path)!r} failed to import: "
                         f"{type(exc).__name__}: {exc}") from None
    fn = getattr(module, "contenders", None)
    if not callable(fn):
        raise ValueError(f"--contender file {str(path)!r} must define a function "
                         f"contenders(E, k, H, F, w13, w2, wg), found "
                         f"{type(fn).__name__ if fn is not None else 'none'}")
    sys.modules.setdefault(name, module)
    return fn


def _checked(name: str, fn: Callable, H: int) -> Callable:
    def run(x, ids, wts, wg):
        y = fn(x, wts, ids, wg)
        shape = tuple(getattr(y, "shape", ()))
        if shape != (x.shape[0], H):
            raise ValueError(f"contender {name!r} returned shape {shape}, expected "
                             f"({x.shape[0]}, {H})")
        return y
    return run


def build(files: dict[str, Callable], spec: MoESpec, logical: dict, kind: str,
          device: str) -> tuple[list[Baseline], list[str]]:
    """A Baseline per contender the files return for ``spec`` (notes for those that cannot run).

    ``files``: path -> the loaded ``contenders`` function.  ValueError when a file returns
    something other than a dict of str -> callable, or a name that is taken.
    """
    if not files:
        return [], []
    if kind == "cupy":
        return [], ["torch has no CUDA here: contenders skipped"]
    tw = torch_weights(logical, kind)
    import torch  # torch_weights above needs torch; contenders are torch code
    E = spec.num_experts
    w13 = torch.cat([tw["w1"][:E], tw["w3"][:E]], dim=1).contiguous()
    w2 = tw["w2"][:E].contiguous()
    wg = tw["router"].T.contiguous()
    out, seen = [], set(RESERVED)
    for path, make in files.items():
        got = make(E, spec.top_k, spec.hidden_dim, spec.ffn_dim, w13, w2, wg)
        if not isinstance(got, dict) or not all(isinstance(k, str) and callable(v)
                                                for k, v in got.items()):
            raise ValueError(f"--contender file {path!r}: contenders() must return a dict of "
                             f"name -> callable, got {type(got).__name__}")
        for name, fn in got.items():
            if name in seen:
                raise ValueError(f"--contender file {path!r}: name {name!r} is taken "
                                 f"(built-in columns and earlier contenders: {sorted(seen)})")
            seen.add(name)
            run = _checked(name, fn, spec.hidden_dim)
            out.append(Baseline(name, device, lambda x, ids, wts, run=run: run(x, ids, wts, wg),
                                None, True, f"contender from {Path(path).name}", graph=True))
    return out, []
