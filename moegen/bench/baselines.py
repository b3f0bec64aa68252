"""Baselines timed beside moegen in the same run, on the same inputs and the same routing.

* ``naive``: the Hugging Face Mixtral-style loop over experts in PyTorch (``one_hot`` mask,
  ``torch.where`` per hit expert, ``index_add_``), on GPU or CPU.
* ``grouped_mm``: ``torch._grouped_mm`` after a stable sort of the slots by expert (one GEMM
  per FFN half), then a weighted ``index_add_``.
* ``numpy``: a NumPy float32 loop over experts (CPU).
* ``triton``: vLLM's fused-MoE Triton kernels (``fused_experts``, which includes vLLM's block
  alignment sort) when ``vllm`` is importable.

Every baseline consumes the routing moegen chose (``topk_ids``/``topk_weights``), so the work
and the error are comparable; ``naive``, ``grouped_mm`` and ``numpy`` also compute their own
routing inside the timed region (router GEMM, softmax, top-k), as a framework layer does, and
discard it.  The ``triton`` column is timed without routing, as vLLM runs it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..reference import gelu
from ..spec import MoESpec

log = logging.getLogger("moegen.bench")


@dataclass
class Baseline:
    """One baseline: ``run(x, ids, wts)`` returns y [T, H] (its own kind), timed with its
    ``route(x)`` before it when ``route`` is set.  ``device``: "cpu" or "cuda"; ``torch``:
    whether it launches torch work (time it with torch events); ``graph``: on CUDA also time
    a replay of it captured in a torch CUDA graph (the contenders)."""
    name: str
    device: str
    run: Callable[[Any, Any, Any], Any]
    route: Callable[[Any], Any] | None
    torch: bool
    note: str = ""
    graph: bool = False

    def timed(self, x, ids, wts):
        if self.route is not None:
            self.route(x)
        return self.run(x, ids, wts)


# -- torch ------------------------------------------------------------------------------------
def _act_torch(torch, spec: MoESpec):
    F = torch.nn.functional
    return {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[spec.act.fn]


def torch_route(spec: MoESpec, router):
    """A torch routing of ``spec.routing`` (fp32 scores, top-k, renormalise, scale): the work
    a framework layer does before its experts.  Grouped selection is not modelled."""
    import torch

    def route(x):
        logits = (x @ router.T).float()
        if spec.routing == "topk_softmax":
            top, ids = torch.topk(logits, spec.top_k, dim=-1)
            w = torch.softmax(top, dim=-1)
        else:
            probs = torch.softmax(logits, -1) if spec.routing == "softmax_topk" else torch.sigmoid(logits)
            w, ids = torch.topk(probs, spec.top_k, dim=-1)
            if spec.renormalize:
                w = w / w.sum(dim=-1, keepdim=True)
        return ids, w * spec.routed_scaling_factor
    return route


def _torch_expert(spec: MoESpec, w: dict):
    """expert(e, rows) -> rows' FFN output (unweighted), nn.Linear style."""
    import torch
    act = _act_torch(torch, spec)
    lin = torch.nn.functional.linear
    bias = lambda name, e: None if w.get(name) is None else w[name][e]  # noqa: E731

    def expert(e, rows):
        h = act(lin(rows, w["w1"][e], bias("b1", e)))
        if spec.gated:
            h = h * lin(rows, w["w3"][e], bias("b3", e))
        return lin(h, w["w2"][e], bias("b2", e))
    return expert


def naive_torch(spec: MoESpec, w: dict):
    """HF MixtralSparseMoeBlock's expert loop over torch weights ``w`` (logical orientation)."""
    import torch
    E, S = spec.num_experts, spec.num_shared_experts
    expert = _torch_expert(spec, w)

    def run(x, ids, wts):
        out = torch.zeros_like(x)
        mask = torch.nn.functional.one_hot(ids.long(), num_classes=E).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit.flatten().tolist():
            slot, tok = torch.where(mask[e])
            y = expert(e, x[tok]) * wts[tok, slot, None].to(x.dtype)
            out.index_add_(0, tok, y.to(x.dtype))
        for j in range(S):
            out += expert(E + j, x)
        return out
    return run


def grouped_mm_torch(spec: MoESpec, w: dict):
    """``torch._grouped_mm`` after a stable sort of the slots by expert.

    Raises AttributeError when this torch has no ``_grouped_mm``.
    """
    import torch
    gmm = torch._grouped_mm
    act = _act_torch(torch, spec)
    E, k, F = spec.num_experts, spec.top_k, spec.ffn_dim
    # [E, H, G] and [E, F, H] views with column-major last two dims, as _grouped_mm wants.
    if w.get("w13") is not None:
        w13 = w["w13"][:E]
    else:
        w13 = torch.cat([w["w1"][:E], w["w3"][:E]], dim=1) if spec.gated else w["w1"][:E]
    w13t, w2t = w13.transpose(-2, -1), w["w2"][:E].transpose(-2, -1)
    b13 = b2 = None
    if spec.bias:
        b13 = torch.cat([w["b1"][:E], w["b3"][:E]], dim=1) if spec.gated else w["b1"][:E]
        b2 = w["b2"][:E]
    expert = _torch_expert(spec, w)

    def run(x, ids, wts):
        flat = ids.reshape(-1).long()
        order = torch.argsort(flat, stable=True)
        tok = order // k
        offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
        h = gmm(x[tok], w13t, offs=offs)
        if b13 is not None:
            h = h + b13[flat[order]]
        h = act(h[:, :F]) * h[:, F:] if spec.gated else act(h)
        y = gmm(h.to(x.dtype), w2t, offs=offs)
        if b2 is not None:
            y = y + b2[flat[order]]
        y = y.float() * wts.reshape(-1)[order, None]
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, tok, y)
        for j in range(spec.num_shared_experts):
            out += expert(E + j, x).float()
        return out.to(x.dtype)
    run.keep = (w13,)
    return run


def vllm_triton(spec: MoESpec, w: dict):
    """vLLM's ``fused_experts`` (Triton).  Raises ImportError when vllm is not importable."""
    import torch
    from vllm.model_executor.layers.fused_moe import fused_experts
    E = spec.num_experts
    w13 = w["w13"][:E] if w.get("w13") is not None else torch.cat([w["w1"][:E], w["w3"][:E]], dim=1)
    w13, w2 = w13.contiguous(), w["w2"][:E].contiguous()

    def run(x, ids, wts):
        return fused_experts(x, w13, w2, wts, ids, inplace=False)
    return run


# -- NumPy ------------------------------------------------------------------------------------
_NP_ACT = {"silu": lambda g: g / (1.0 + np.exp(-g)), "relu": lambda g: np.maximum(g, 0.0)}


def numpy_route(spec: MoESpec, router):
    """NumPy float32 softmax/sigmoid top-k routing (timed with the NumPy loop)."""
    r = np.asarray(router, dtype=np.float32)

    def route(x):
        logits = np.asarray(x, dtype=np.float32) @ r.T
        if spec.routing == "sigmoid_topk":
            p = 1.0 / (1.0 + np.exp(-logits))
        else:
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
        ids = np.argsort(-p, axis=1, kind="stable")[:, :spec.top_k]
        wts = np.take_along_axis(p, ids, 1)
        if spec.renormalize:
            wts /= wts.sum(axis=1, keepdims=True)
        return ids, wts
    return route


def numpy_loop(spec: MoESpec, w: dict):
    """A NumPy float32 loop over the experts the routing hit (CPU).  Exact (erf) GELU comes
    from `moegen.reference.gelu`, which is slow; the benchmark shapes use SwiGLU."""
    if spec.act.fn == "gelu":
        act = lambda g: gelu(g).astype(np.float32)  # noqa: E731
    else:
        act = _NP_ACT[spec.act.fn]
    f32 = {k: (None if v is None else np.asarray(v, dtype=np.float32)) for k, v in w.items()}
    E = spec.num_experts

    def expert(e, rows):
        h = rows @ f32["w1"][e].T
        if f32.get("b1") is not None:
            h += f32["b1"][e]
        h = act(h)
        if spec.gated:
            u = rows @ f32["w3"][e].T
            if f32.get("b3") is not None:
                u += f32["b3"][e]
            h *= u
        y = h @ f32["w2"][e].T
        if f32.get("b2") is not None:
            y += f32["b2"][e]
        return y

    def run(x, ids, wts):
        x32 = np.asarray(x, dtype=np.float32)
        ids = np.asarray(ids)
        wts = np.asarray(wts, dtype=np.float32)
        out = np.zeros_like(x32)
        for e in np.unique(ids):
            tok, slot = np.nonzero(ids == e)     # a token picks an expert at most once
            out[tok] += wts[tok, slot, None] * expert(int(e), x32[tok])
        for j in range(spec.num_shared_experts):
            out += expert(E + j, x32)
        return out.astype(np.asarray(x).dtype)
    return run


# -- assembly ---------------------------------------------------------------------------------
def torch_weights(logical: dict, kind: str) -> dict:
    """Logical weights as torch tensors (zero-copy from NumPy, bf16 through an int16 view)."""
    import torch
    out = {}
    for key, a in logical.items():
        if a is None or kind == "torch":
            out[key] = a
        elif a.dtype.name == "bfloat16":
            out[key] = torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
        else:
            out[key] = torch.from_numpy(np.ascontiguousarray(a))
    return out


def to_torch(a, device: str):
    """A NumPy/CuPy/torch array as a torch tensor on ``device`` (zero-copy where possible)."""
    import torch
    if type(a).__module__.startswith("torch"):
        return a
    if device == "cpu":
        a = np.asarray(a)
        if a.dtype.name == "bfloat16":
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)
    return torch.as_tensor(a, device="cuda")


def build(spec: MoESpec, logical: dict, kind: str, device: str,
          names=("naive", "grouped_mm", "numpy", "triton")) -> tuple[list[Baseline], list[str]]:
    """The baselines among ``names`` that can run here, and a note for each that cannot.

    ``logical``: the logical weights (`moegen.profiling.problems.Weights.logical`) of library
    ``kind``; ``device``: "cpu" or "cuda".
    """
    out, notes = [], []
    if logical is None or logical.get("w1") is None:
        return out, ["baselines skipped: no logical weights kept"]
    tw = None
    if any(n in names for n in ("naive", "grouped_mm", "triton")):
        try:
            import torch  # noqa: F401
        except ImportError:
            notes.append("torch not installed: naive and grouped_mm baselines skipped")
        else:
            if kind == "cupy":
                notes.append("torch has no CUDA here: naive and grouped_mm baselines skipped")
            else:
                tw = torch_weights(logical, kind)
    if tw is not None:
        route = torch_route(spec, tw["router"])
        if "naive" in names:
            out.append(Baseline("naive", device, naive_torch(spec, tw), route, True))
        if "grouped_mm" in names:
            try:
                out.append(Baseline("grouped_mm", device, grouped_mm_torch(spec, tw), route, True))
            except (AttributeError, RuntimeError) as exc:
                notes.append(f"grouped_mm unavailable: {type(exc).__name__}: {exc}")
        if "triton" in names and device == "cuda":
            try:
                out.append(Baseline("triton", device, vllm_triton(spec, tw), None, True,
                                    "vLLM fused_experts incl. its block-alignment sort"))
            except Exception as exc:  # noqa: BLE001 - any import failure: say why
                notes.append(f"vllm not importable ({type(exc).__name__}: {exc}): triton column empty")
    if "numpy" in names and device == "cpu" and kind == "numpy":
        out.append(Baseline("numpy", "cpu", numpy_loop(spec, logical),
                            numpy_route(spec, logical["router"]), False))
    return out, notes
