"""Generated c-backend backward kernels against the float64 reference backward.

Grid: token counts 0, 1 and around the work-item size (BWD_CHUNK = 64) and the register tile,
odd H/F, E up to 64 with k up to 8 (most experts then get no tokens), every activation and
routing, capacity dropping, fp32 and bf16 storage.  Outputs are fresh arrays the kernels must
fully write (np.empty), so a skipped element shows up as garbage, not as a lucky zero."""

import numpy as np
import pytest

from moegen import reference as ref
from moegen.backward import MoEBackward
from moegen.backward_build import BWD_CHUNK
from moegen.reference_backward import moe_backward
from moegen.spec import MoESpec

GRADS = ("x", "router", "router_bias", "w1", "w3", "w2", "b1", "b3", "b2", "topk_weights")
AUX = dict(daux=0.8, balance_coeff=0.05, z_coeff=0.01)


def problem(spec, T, seed=0):
    """x, weights, router bias and dy, with no near-tie in the top-k choice (there the fp32
    kernel may legitimately pick another expert than the float64 reference)."""
    for s in range(seed, seed + 20):
        x, w = ref.random_problem(spec, T, seed=s)
        rng = np.random.default_rng(s + 100)
        bias = (rng.standard_normal(spec.num_experts) * 0.2).astype(np.float32)
        dy = rng.standard_normal((T, spec.hidden_dim)).astype(np.float32)
        if T == 0:
            return x, w, bias, dy
        sig = spec.routing == "sigmoid_topk"
        _, _, probs, logits = ref.route(spec, x, w["router"], None if sig else bias,
                                        bias if sig else None)
        scores = probs + bias if sig else (logits if spec.routing == "topk_softmax" else probs)
        if not ref.near_ties(scores, spec.top_k, 1e-4).any():
            return x, w, bias, dy
    raise AssertionError("no tie-free problem found")


def check(spec, T, tol=2e-5, seed=0, save=False):
    x, w, bias, dy = problem(spec, T, seed)
    want = moe_backward(spec, x, w, dy, bias, **AUX)
    bwd = MoEBackward(spec.replace(save_activations=save))
    bw = bwd.prepare(w)
    state = bwd.save(x, bw, bias) if save else None
    got = bwd.backward(x, bw, dy, bias, state=state, **AUX)
    for name in GRADS:
        if want[name] is None:
            assert got[name] is None, name
            continue
        assert got[name].shape == want[name].shape, name
        assert got[name].dtype == np.float32, name
        err = ref.rel_error(got[name], want[name])
        assert err < tol, f"{spec.name} T={T} {name}: rel error {err:.2e}"
    assert got["balance_coeff"] == pytest.approx(want["balance_coeff"])
    return got, want


BASE = MoESpec(num_experts=8, top_k=2, hidden_dim=33, ffn_dim=17, backend="c")


@pytest.mark.parametrize("T", [0, 1, 3, 4, 5, BWD_CHUNK - 1, BWD_CHUNK, BWD_CHUNK + 1])
def test_token_counts_fp32(T):
    check(BASE, T)


@pytest.mark.parametrize("T", [1, BWD_CHUNK + 1])
def test_token_counts_bf16(T):
    check(BASE.replace(dtype="bfloat16"), T)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_many_experts_most_empty(dtype):
    spec = MoESpec(num_experts=64, top_k=8, hidden_dim=16, ffn_dim=12, dtype=dtype, backend="c",
                   bias=True)
    got, want = check(spec, 3)
    empty = [e for e in range(64) if not np.any(want["w1"][e])]
    assert len(empty) >= 64 - 3 * 8
    # experts without tokens: gradients exactly zero (the kernels write them, from np.empty)
    for name in ("w1", "w3", "w2", "b1", "b3", "b2"):
        assert not got[name][empty].any(), name


SPECS = [
    dict(num_experts=5, top_k=3, hidden_dim=7, ffn_dim=9, activation="geglu", bias=True),
    dict(num_experts=6, top_k=1, hidden_dim=9, ffn_dim=5, activation="relu", renormalize=False),
    dict(num_experts=6, top_k=2, hidden_dim=5, ffn_dim=7, activation="gelu", routing="topk_softmax",
         bias=True),
    dict(num_experts=4, top_k=2, hidden_dim=6, ffn_dim=3, activation="silu", num_shared_experts=1),
    dict(num_experts=16, top_k=4, hidden_dim=12, ffn_dim=7, routing="sigmoid_topk", n_group=4,
         topk_group=2, routed_scaling_factor=2.5, num_shared_experts=2),
    dict(num_experts=8, top_k=2, hidden_dim=10, ffn_dim=6, routing="sigmoid_topk",
         renormalize=False),
]


@pytest.mark.parametrize("kw", SPECS, ids=lambda kw: MoESpec(**kw).name)
def test_activations_and_routings(kw):
    check(MoESpec(backend="c", **kw), 17)


@pytest.mark.parametrize("drop", ["token", "weight"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_capacity_dropped_slots_get_no_gradient(drop, renormalize):
    spec = MoESpec(num_experts=4, top_k=2, hidden_dim=9, ffn_dim=5, backend="c",
                   capacity_factor=0.5, capacity_drop=drop, renormalize=renormalize)
    got, _ = check(spec, 21)
    x, w, bias, dy = problem(spec, 21)
    _, info = ref.moe(spec, x, w, router_bias=bias)
    dropped = ~info["kept"]
    assert dropped.sum() >= 10
    assert np.all(got["topk_weights"][dropped] == 0.0)
    # a dropped slot's expert never sees its token: dy on tokens whose slots were all dropped
    # changes no expert weight gradient
    all_dropped = dropped.all(axis=1)
    if all_dropped.any():
        bwd = MoEBackward(spec)
        bw = bwd.prepare(w)
        dy2 = dy.copy()
        dy2[all_dropped] *= 3.0
        got2 = bwd.backward(x, bw, dy2, bias, **AUX)
        for name in ("w1", "w3", "w2"):
            assert np.array_equal(got[name], got2[name]), name


def test_deterministic_and_thread_count_independent(monkeypatch):
    spec = BASE.replace(hidden_dim=64, ffn_dim=48)      # enough work for the thread team
    x, w, bias, dy = problem(spec, 130)
    bwd = MoEBackward(spec)
    bw = bwd.prepare(w)
    runs = []
    for threads in ("2", "2", "1"):
        monkeypatch.setenv("MOEGEN_NUM_THREADS", threads)
        runs.append(bwd.backward(x, bw, dy, bias, **AUX))
    for name in GRADS:
        if runs[0][name] is not None:
            assert np.array_equal(runs[0][name], runs[1][name]), name
            assert np.array_equal(runs[0][name], runs[2][name]), name


def test_save_activations_gives_the_same_bits():
    spec = SPECS[0]
    spec = MoESpec(backend="c", **spec)
    a, _ = check(spec, 20, save=False)
    b, _ = check(spec, 20, save=True)
    for name in GRADS:
        if a[name] is not None:
            assert np.array_equal(a[name], b[name]), name


def test_bad_input_is_one_clear_error():
    bwd = MoEBackward(BASE)
    x, w, bias, dy = problem(BASE, 4)
    bw = bwd.prepare(w)
    with pytest.raises(ValueError, match=r"x must have shape \[T, 33\]"):
        bwd.backward(x[:, :5], bw, dy, bias)
    with pytest.raises(TypeError, match="x must have dtype float32"):
        bwd.backward(x.astype(np.float64), bw, dy, bias)
    with pytest.raises(ValueError, match="dy must have the shape of x"):
        bwd.backward(x, bw, dy[:2], bias)
    with pytest.raises(ValueError, match=r"router_bias must have shape \(8,\)"):
        bwd.backward(x, bw, dy, bias[:3])
    with pytest.raises(ValueError, match=r"weights\['w2'\] must have shape"):
        bwd.prepare({**w, "w2": w["w2"][:, :3]})
    with pytest.raises(TypeError, match="weights must be the BackwardWeights"):
        bwd.backward(x, w, dy, bias)
    other = MoEBackward(BASE.replace(ffn_dim=9))
    with pytest.raises(ValueError, match="weights were prepared for another layer"):
        other.backward(x, bw, dy, bias)
    with pytest.raises(TypeError, match="state must be this layer's"):
        bwd.backward(x, bw, dy, bias, state=object())
    with pytest.raises(ValueError, match="state is for 4 tokens, x has 2"):
        bwd.backward(x[:2], bw, dy[:2], bias, state=bwd.save(x, bw, bias))
    with pytest.raises(ValueError, match="spec.backend must be 'c'"):
        MoEBackward(BASE.replace(backend="cuda"))
    with pytest.raises(ValueError, match="save_activations=True: pass state"):
        MoEBackward(BASE.replace(save_activations=True)).backward(x, bw, dy, bias)
