"""Check a compiled kernel against the float64 reference on fresh random inputs.

Used by ``moegen verify`` and the example; the tests use the same pieces directly.
"""

from __future__ import annotations

import numpy as np

from . import arrays, reference
from .jit import compile as compile_spec
from .spec import MoESpec


def poison_like(kernel, x):
    """An output buffer like ``x`` on the kernel's device, filled with NaN so that an element
    the kernel fails to write shows up in the error."""
    out = kernel.module.empty_like(arrays.describe(x, "x"))
    if hasattr(out, "fill_"):
        out.fill_(float("nan"))
    else:
        out[...] = np.nan
    return out


def to_device(kernel, host_array):
    """A host array on the kernel's device (NumPy for c, CuPy for cuda)."""
    return kernel.module.to_device(np.ascontiguousarray(host_array))


def check_tokens(kernel, tokens: int, seed: int = 0) -> dict:
    """Run the layer for ``tokens`` random tokens; compare with the reference.

    Returns {tokens, rel_error, tolerance, ids_match, ok}.  The reference applies the spec's
    expert capacity to the routing, as the kernel does.  Tokens whose k-th and (k+1)-th
    scores are within float32 rounding are routed like the kernel in the reference, so a
    legitimate near-tie never fails the check.
    """
    spec = kernel.spec
    x, w = reference.random_problem(spec, tokens, seed=seed)
    # the reference router is [E, H]: say so, since with E == H its shape cannot
    weights = kernel.pack(**reference.weight_kwargs(spec, w), router_layout="eh")
    xd = to_device(kernel, x)
    out = poison_like(kernel, xd)
    kernel(xd, weights, out=out)
    ids, wts = kernel.route(xd, weights)
    ids = np.asarray(reference.f64(_host(ids)), dtype=np.int64)
    ref_ids, ref_w, probs, logits = reference.route(spec, x, w["router"])
    scores = probs if spec.routing != "topk_softmax" else logits
    ties = reference.near_ties(scores, spec.top_k) if tokens else np.zeros(0, bool)
    same = np.all(np.sort(ids, 1) == np.sort(ref_ids, 1), axis=1) if tokens else np.zeros(0, bool)
    # where the kernel legitimately differs (a near tie), use its routing in the reference
    use_kernel = ~same & ties
    ids_ref = np.where(use_kernel[:, None], ids, ref_ids)
    if use_kernel.any():
        wk = np.asarray(_host(wts), dtype=np.float64)
        ref_w = np.where(use_kernel[:, None], wk, ref_w)
    # the kernel drops the slots beyond each expert's capacity (capacity specs): so does the
    # reference, from the same routing
    ref_w, _, _ = reference.apply_capacity(spec, ids_ref, ref_w)
    y_ref = reference.experts(spec, x, w, ids_ref, ref_w)
    err = reference.rel_error(kernel.to_host(out), y_ref) if tokens else 0.0
    ids_match = float(np.mean(same | ties)) if tokens else 1.0
    tol = spec.dt.tolerance
    return {"tokens": tokens, "rel_error": err, "tolerance": tol, "ids_match": ids_match,
            "ok": bool(err <= tol and ids_match == 1.0)}


def verify_spec(spec: MoESpec, tokens, seed: int = 0) -> list[dict]:
    """Compile ``spec`` and check it at each token count (fresh inputs for each)."""
    kernel = compile_spec(spec)
    return [check_tokens(kernel, t, seed=seed + i) for i, t in enumerate(tokens)]


_host = arrays.host
