"""The float64 reference backward against torch.autograd of a float64 torch forward.

The torch forward below is written independently of moegen.reference_backward: it takes the
(piecewise constant) top-k selection and capacity mask from the NumPy reference and computes
everything differentiable with torch ops, so autograd gives the gradients to compare with."""

import numpy as np
import pytest

from moegen import reference as ref
from moegen.reference_backward import moe_backward
from moegen.spec import MoESpec

torch = pytest.importorskip("torch")
F = torch.nn.functional

ACT = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def torch_layer(spec, x, p, bias, ids, kept, balance_coeff, z_coeff, adaptive):
    """y and aux of the layer for a fixed selection (ids [T, k], kept [T, k] bool)."""
    E, S, k = spec.num_experts, spec.num_shared_experts, spec.top_k
    sigmoid = spec.routing == "sigmoid_topk"
    logits = x @ p["router"].T
    if bias is not None and not sigmoid:
        logits = logits + bias
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    kept_t = torch.as_tensor(kept)
    if sigmoid:
        probs = torch.sigmoid(logits)
        w = probs.gather(1, ids_t)
    else:
        probs = torch.softmax(logits, dim=1)
        if spec.routing == "topk_softmax":
            w = torch.softmax(logits.gather(1, ids_t), dim=1)
        else:
            w = probs.gather(1, ids_t)
    if spec.renormalize and spec.routing != "topk_softmax":
        w = w / w.sum(1, keepdim=True)
    w = w * spec.routed_scaling_factor
    if spec.capacity_factor is not None:
        before = w.sum(1, keepdim=True)
        wk = torch.where(kept_t, w, torch.zeros_like(w))
        if spec.renormalize:
            after = wk.sum(1, keepdim=True)
            wk = torch.where(after > 0, wk * before / torch.where(after > 0, after, torch.ones_like(after)),
                             torch.zeros_like(wk))
        w = wk
    act = ACT[spec.act.fn]

    def ffn(rows, e):
        g = rows @ p["w1"][e].T
        if p.get("b1") is not None:
            g = g + p["b1"][e]
        h = act(g)
        if spec.gated:
            u = rows @ p["w3"][e].T
            if p.get("b3") is not None:
                u = u + p["b3"][e]
            h = h * u
        out = h @ p["w2"][e].T
        if p.get("b2") is not None:
            out = out + p["b2"][e]
        return out

    y = torch.zeros_like(x)
    for e in range(E):
        t, s = np.nonzero((ids == e) & kept)
        if len(t):
            contrib = w[torch.as_tensor(t), torch.as_tensor(s)][:, None] * ffn(x[torch.as_tensor(t)], e)
            y = y.index_add(0, torch.as_tensor(t), contrib)
    for j in range(S):
        y = y + ffn(x, E + j)
    counts = np.bincount(ids[kept], minlength=E).astype(np.float64)
    usage = counts / counts.sum() if counts.sum() > 0 else np.zeros(E)
    coef = balance_coeff * (1 + np.var(usage)) if adaptive else balance_coeff
    aux = coef * E * (torch.as_tensor(usage) * probs.mean(0)).sum()
    aux = aux + z_coeff * (torch.logsumexp(x @ p["router"].T + (bias if bias is not None and not sigmoid else 0),
                                           dim=1) ** 2).mean()
    return y, aux


SPECS = [
    dict(num_experts=4, top_k=2, hidden_dim=6, ffn_dim=5),
    dict(num_experts=5, top_k=3, hidden_dim=7, ffn_dim=3, activation="geglu", bias=True),
    dict(num_experts=4, top_k=1, hidden_dim=5, ffn_dim=4, activation="relu", renormalize=False),
    dict(num_experts=6, top_k=2, hidden_dim=5, ffn_dim=6, activation="gelu", routing="topk_softmax",
         bias=True),
    dict(num_experts=4, top_k=2, hidden_dim=6, ffn_dim=3, activation="silu", num_shared_experts=1),
    dict(num_experts=8, top_k=3, hidden_dim=6, ffn_dim=4, routing="sigmoid_topk", n_group=4,
         topk_group=2, routed_scaling_factor=2.5, num_shared_experts=2),
    dict(num_experts=4, top_k=2, hidden_dim=5, ffn_dim=4, capacity_factor=0.6),
    dict(num_experts=4, top_k=2, hidden_dim=5, ffn_dim=4, capacity_factor=0.6, capacity_drop="weight",
         renormalize=False, activation="relu"),
    dict(num_experts=4, top_k=2, hidden_dim=5, ffn_dim=4, routing="sigmoid_topk", renormalize=False),
]


@pytest.mark.parametrize("kw", SPECS, ids=lambda kw: MoESpec(**kw).name)
@pytest.mark.parametrize("adaptive", [True, False])
def test_reference_backward_matches_autograd(kw, adaptive):
    spec = MoESpec(backend="c", **kw)
    T = 11
    x, w = ref.random_problem(spec, T, seed=3)
    rng = np.random.default_rng(5)
    bias = rng.standard_normal(spec.num_experts) * 0.3
    dy = rng.standard_normal((T, spec.hidden_dim))
    daux, bc, zc = 0.7, 0.05, 0.01
    got = moe_backward(spec, x, w, dy, bias, daux=daux, balance_coeff=bc, z_coeff=zc,
                       adaptive=adaptive)
    y_ref, info = ref.moe(spec, x, w, router_bias=bias)
    xt = torch.tensor(ref.f64(x), requires_grad=True)
    p = {n: (torch.tensor(ref.f64(v), requires_grad=True) if v is not None else None)
         for n, v in w.items()}
    bt = torch.tensor(bias, requires_grad=True)
    y, aux = torch_layer(spec, xt, p, bt, info["topk_ids"], info["kept"], bc, zc, adaptive)
    np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-10, atol=1e-12)
    assert abs(aux.item() - got["aux"]) < 1e-10
    loss = (y * torch.tensor(dy)).sum() + daux * aux
    names = [n for n in ("w1", "w3", "w2", "b1", "b3", "b2") if p[n] is not None]
    tens = [xt, p["router"], bt] + [p[n] for n in names]
    grads = torch.autograd.grad(loss, tens, allow_unused=True)
    want = dict(zip(["x", "router", "router_bias"] + names, grads))
    for n, g in want.items():
        if n == "router_bias" and spec.routing == "sigmoid_topk":
            assert got[n] is None and g is None
            continue
        np.testing.assert_allclose(got[n], g.numpy(), rtol=1e-9, atol=1e-11, err_msg=n)
    if spec.capacity_factor is not None:
        assert not info["kept"].all()               # the case really drops slots
        assert np.all(got["topk_weights"][~info["kept"]] == 0)


def test_reference_backward_no_tokens():
    spec = MoESpec(num_experts=4, top_k=2, hidden_dim=6, ffn_dim=5, backend="c")
    x, w = ref.random_problem(spec, 0)
    got = moe_backward(spec, x, w, np.zeros((0, 6)), daux=1.0, balance_coeff=0.1)
    assert got["x"].shape == (0, 6)
    assert not got["w1"].any() and not got["router"].any()
