"""A float64 NumPy reference of the layer's backward pass: readable first, fast second.

The loss it differentiates is ``<dy, y> + daux · aux`` where ``y`` is `moegen.reference.moe`'s
output and ``aux`` the auxiliary loss a training step adds:

    aux = balance_coeff · E · Σ_e f_e · P_e  +  z_coeff · mean_t(logsumexp(logits_t)²)

f_e (the share of kept slots expert e received) and P_e (its mean router probability) are the
forward statistics of `moegen.reference.stats`.  With ``adaptive=True`` the balance coefficient
is ``balance_coeff · (1 + var(f))``, the seed's adaptive coefficient, exactly as the forward
statistics report it.  f_e, its variance and the top-k selection are piecewise constant in the
inputs, so they carry no gradient; everything else does: the expert FFNs, the routing weights
(through capacity renormalisation, scaling, renormalisation and softmax/sigmoid) to the router
logits, router weight, router bias (softmax routings; for sigmoid_topk the bias only steers the
selection) and x.  Dropped slots (capacity) contribute nothing to the expert path.
"""

from __future__ import annotations

import numpy as np

from . import reference as ref
from .spec import MoESpec

# derivative of each activation function, in float64
_SQRT_2PI = np.sqrt(2.0 * np.pi)


def _dsilu(g):
    s = 1.0 / (1.0 + np.exp(-g))
    return s * (1.0 + g * (1.0 - s))


def _dgelu(g):
    return 0.5 * (1.0 + ref._erf(g / np.sqrt(2.0))) + g * np.exp(-0.5 * g * g) / _SQRT_2PI


def _drelu(g):
    return (g > 0).astype(np.float64)


ACT_GRAD = {"silu": _dsilu, "gelu": _dgelu, "relu": _drelu}


def balance_coefficient(usage, balance_coeff: float, adaptive: bool) -> float:
    """The balance loss coefficient a step applies: ``base · (1 + var(usage))`` when adaptive
    (the forward statistics' ``adaptive_coeff``), else ``base``."""
    return float(balance_coeff) * (1.0 + float(np.var(usage))) if adaptive else float(balance_coeff)


def aux_loss(spec: MoESpec, counts, probs, logits, balance_coeff=0.0, z_coeff=0.0,
             adaptive=True) -> float:
    """The auxiliary loss value of one forward pass (see the module docstring)."""
    st = ref.stats(spec, counts, probs, logits)
    coef = balance_coefficient(st["usage"], balance_coeff, adaptive)
    return coef * st["aux_loss"] + float(z_coeff) * st["z_loss"]


def _expert_backward(spec, rows, w, e, dout):
    """One expert's FFN backward on rows [n, H] with output gradient dout [n, H].

    Returns (dx [n, H], grads dict w1/w3/w2/b1/b3/b2 of expert e, unweighted output [n, H])."""
    fn = spec.act.fn
    W1, W2 = ref.f64(w["w1"][e]), ref.f64(w["w2"][e])
    g = rows @ W1.T
    if w.get("b1") is not None:
        g = g + ref.f64(w["b1"][e])
    a = ref.ACT_FN[fn](g)
    if spec.gated:
        W3 = ref.f64(w["w3"][e])
        u = rows @ W3.T
        if w.get("b3") is not None:
            u = u + ref.f64(w["b3"][e])
        h = a * u
    else:
        h = a
    out = h @ W2.T
    if w.get("b2") is not None:
        out = out + ref.f64(w["b2"][e])
    dh = dout @ W2
    grads = {"w2": dout.T @ h, "b2": dout.sum(axis=0)}
    if spec.gated:
        du = dh * a
        dg = dh * u * ACT_GRAD[fn](g)
        grads["w3"] = du.T @ rows
        grads["b3"] = du.sum(axis=0)
        dx = dg @ W1 + du @ W3
    else:
        dg = dh * ACT_GRAD[fn](g)
        dx = dg @ W1
    grads["w1"] = dg.T @ rows
    grads["b1"] = dg.sum(axis=0)
    return dx, grads, out


def routing_weights_backward(spec: MoESpec, ids, probs, logits, kept, raw_w, dfinal):
    """Gradient of the final (after capacity) routing weights ``dfinal`` [T, k] back to the
    logits [T, E] (through capacity renormalisation, scaling, renormalisation and the scores),
    as (dlogits_from_weights [T, E], dprobs [T, E]): dprobs still has to pass through the
    score function (softmax or sigmoid); topk_softmax puts its part straight into dlogits."""
    T, k = dfinal.shape
    dw = dfinal.copy()
    if spec.capacity_factor is not None and spec.renormalize:
        wk = np.where(kept, raw_w, 0.0)
        before = raw_w.sum(axis=1, keepdims=True)
        after = wk.sum(axis=1, keepdims=True)
        safe = np.where(after > 0, after, 1.0)
        s = np.sum(np.where(kept, dfinal * raw_w, 0.0), axis=1, keepdims=True)
        dw = np.where(after > 0, np.where(kept, dfinal * before / safe - s * before / safe ** 2, 0.0)
                      + s / safe, 0.0)
    elif spec.capacity_factor is not None:
        dw = np.where(kept, dfinal, 0.0)
    dr = dw * spec.routed_scaling_factor          # gradient of the unscaled weights
    dlogits = np.zeros((T, spec.num_experts))
    dprobs = np.zeros((T, spec.num_experts))
    if spec.routing == "topk_softmax":
        sel = np.take_along_axis(logits, ids, axis=1)
        r = ref.softmax(sel) if T else sel
        dsel = r * (dr - np.sum(r * dr, axis=1, keepdims=True))
        np.put_along_axis(dlogits, ids, dsel, axis=1)
        return dlogits, dprobs
    q = np.take_along_axis(probs, ids, axis=1)
    if spec.renormalize:
        tot = q.sum(axis=1, keepdims=True)
        r = q / tot
        dq = (dr - np.sum(dr * r, axis=1, keepdims=True)) / tot
    else:
        dq = dr
    np.put_along_axis(dprobs, ids, dq, axis=1)     # ids of one row are distinct
    return dlogits, dprobs


def _empty_grads(spec, w, H, has_bias_grad, coef):
    out = {n: (np.zeros(np.shape(w[n])) if w.get(n) is not None else None)
           for n in ("w1", "w3", "w2", "b1", "b3", "b2")}
    out.update(x=np.zeros((0, H)), router=np.zeros((spec.num_experts, H)),
               router_bias=np.zeros(spec.num_experts) if has_bias_grad else None,
               topk_weights=np.zeros((0, spec.top_k)), aux=0.0, balance_coeff=coef)
    return out


def moe_backward(spec: MoESpec, x, w, dy, router_bias=None, *, daux: float = 0.0,
                 balance_coeff: float = 0.0, z_coeff: float = 0.0, adaptive: bool = True) -> dict:
    """Gradients of ``<dy, y> + daux · aux`` (module docstring) in float64.

    ``x`` [T, H]; ``w`` logical weights (`moegen.reference.random_problem`'s dict); ``dy``
    [T, H].  Returns a dict: x, router, router_bias (None for sigmoid_topk or no bias), w1, w2,
    w3, b1, b3, b2 (None where the layer has none) over all E+S experts, topk_weights (the
    gradient of the final per-slot routing weights, [T, k], zero for dropped slots), aux (the
    aux loss value) and balance_coeff (the coefficient applied)."""
    x = ref.f64(x)
    dy = ref.f64(dy)
    T, H = x.shape
    E, S, k = spec.num_experts, spec.num_shared_experts, spec.top_k
    sigmoid = spec.routing == "sigmoid_topk"
    if T == 0:
        coef = balance_coefficient(np.zeros(E), balance_coeff, adaptive)
        return _empty_grads(spec, w, H, router_bias is not None and not sigmoid, coef)
    ids, raw_w, probs, logits = ref.route(spec, x, w["router"], None if sigmoid else router_bias,
                                          router_bias if sigmoid else None)
    final_w, kept, _ = ref.apply_capacity(spec, ids, raw_w)
    counts = np.bincount(ids[kept], minlength=E)
    names = ("w1", "w3", "w2", "b1", "b3", "b2")
    grads = {n: (np.zeros(np.shape(w[n])) if w.get(n) is not None else None) for n in names}
    dx = np.zeros((T, H))
    dfinal = np.zeros((T, k))
    for e in range(E):
        t, s = np.nonzero((ids == e) & kept)
        if len(t) == 0:
            continue
        dout = final_w[t, s][:, None] * dy[t]
        dxe, ge, out = _expert_backward(spec, x[t], w, e, dout)
        np.add.at(dx, t, dxe)
        dfinal[t, s] = np.sum(dy[t] * out, axis=1)
        for n, g in ge.items():
            if grads[n] is not None:
                grads[n][e] = g
    for j in range(S):
        dxe, ge, _ = _expert_backward(spec, x, w, E + j, dy)
        dx += dxe
        for n, g in ge.items():
            if grads[n] is not None:
                grads[n][E + j] = g
    dlogits, dprobs = routing_weights_backward(spec, ids, probs, logits, kept, raw_w, dfinal)
    st = ref.stats(spec, counts, probs, logits)
    coef = balance_coefficient(st["usage"], balance_coeff, adaptive)
    if T:
        dprobs = dprobs + daux * coef * E * st["usage"][None, :] / T
        lse = np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1)) + logits.max(1)
        dlogits = dlogits + daux * z_coeff * 2.0 * lse[:, None] * ref.softmax(logits) / T
    if sigmoid:
        dlogits = dlogits + dprobs * probs * (1.0 - probs)
    elif T:
        dlogits = dlogits + probs * (dprobs - np.sum(dprobs * probs, axis=1, keepdims=True))
    router = ref.f64(w["router"])
    dx += dlogits @ router
    out = dict(grads)
    out.update(x=dx, router=dlogits.T @ x,
               router_bias=(dlogits.sum(axis=0) if router_bias is not None and not sigmoid else None),
               topk_weights=dfinal,
               aux=coef * st.get("aux_loss", 0.0) + z_coeff * st.get("z_loss", 0.0),
               balance_coeff=coef)
    return out
