"""Expert capacity (spec.capacity_factor) on the c backend against the float64 reference:
both drop modes, renormalisation on and off, routing skewed so experts really overflow,
weight ties and NaN weights, shared experts, token counts at bucket boundaries, stats."""

import numpy as np
import pytest

import moegen
from moegen import MoESpec
from moegen import reference as R
from moegen.backends.c import CBackend
from moegen.render import render

TOL = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 1e-2}
TOKENS = (0, 1, 7, 64, 1000)

SPECS = [
    MoESpec(8, 2, 40, 33, capacity_factor=1.0, backend="c"),
    MoESpec(8, 2, 40, 33, capacity_factor=1.25, capacity_drop="weight", backend="c"),
    MoESpec(8, 2, 40, 33, capacity_factor=1.0, capacity_drop="weight", renormalize=False,
            bias=True, backend="c"),
    MoESpec(16, 4, 36, 20, dtype="bfloat16", capacity_factor=0.5, renormalize=False,
            num_shared_experts=1, activation="geglu", backend="c"),
    MoESpec(16, 4, 36, 20, dtype="bfloat16", capacity_factor=2.0, capacity_drop="weight",
            routing="sigmoid_topk", n_group=4, topk_group=2, routed_scaling_factor=2.5,
            num_shared_experts=2, backend="c"),
]
PARAMS = [pytest.param(s, T, id=f"{s.name}-T{T}") for s in SPECS for T in TOKENS]


pytestmark = pytest.mark.usefixtures("module_cache")


def skewed_bias(spec):
    """Sends most tokens to experts 0 and 1, so they overflow any capacity factor used here."""
    b = np.zeros(spec.num_experts, np.float32)
    b[:2] = 3.0 if spec.routing != "sigmoid_topk" else 1.0
    return b


def setup(spec, T, seed=0):
    kernel = moegen.compile(spec)
    x, w = R.random_problem(spec, T, seed=seed)
    return kernel, x, w, kernel.pack(**R.weight_kwargs(spec, w))


@pytest.mark.parametrize("spec,T", PARAMS)
def test_layer_matches_reference(spec, T):
    """Whole layer vs reference.moe on the kernel's own routing (so a float32 near-tie in the
    router cannot flip a selection), and that routing vs the float64 one away from ties."""
    kernel, x, w, packed = setup(spec, T, seed=T)
    bias = skewed_bias(spec)
    ids, wts = kernel.route(x, packed, router_bias=bias)
    sel = dict(selection_bias=bias) if spec.routing == "sigmoid_topk" else dict(router_bias=bias)
    ref_ids, _, probs, logits = R.route(spec, x, w["router"], **sel)
    scores = probs + bias if spec.routing == "sigmoid_topk" else probs
    agree = ~R.near_ties(scores, spec.top_k)
    np.testing.assert_array_equal(ids[agree], ref_ids[agree])

    out = np.full_like(x, np.nan)
    y, st = kernel(x, packed, router_bias=bias, out=out, return_stats=True)
    assert y is out
    ref, info = R.moe(spec, x, w, topk_ids=ids, topk_weights=wts)
    if T:
        assert R.rel_error(out, ref) <= TOL[spec.dtype]
        cap = R.capacity(spec, T)
        assert info["counts"].max() <= cap
        if T >= 64:
            assert info["dropped"] > 0            # the skew really overflows experts
    np.testing.assert_array_equal(st.tokens_per_expert, info["counts"])
    assert st.dropped == info["dropped"]


@pytest.mark.parametrize("spec", SPECS[:4], ids=lambda s: s.name)
def test_route_is_unchanged_by_capacity(spec):
    """Capacity acts after routing: kernel.route equals the dropless kernel's, and a full call
    leaves the route outputs in the workspace as they were (renormalisation writes elsewhere)."""
    T = 200
    kernel, x, w, packed = setup(spec, T, seed=3)
    dropless = spec.replace(capacity_factor=None)
    bias = skewed_bias(spec)
    ids, wts = kernel.route(x, packed, router_bias=bias)
    kernel(x, packed, router_bias=bias)
    ids2, wts2 = kernel.route(x, packed, router_bias=bias)
    ws = kernel.module.workspace(T)
    kernel(x, packed, router_bias=bias)
    np.testing.assert_array_equal(ws.topk_ids, ids)
    np.testing.assert_array_equal(ws.topk_weights, wts)
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_array_equal(wts, wts2)
    k0 = moegen.compile(dropless)
    p0 = k0.pack(**R.weight_kwargs(dropless, w))
    d_ids, d_wts = k0.route(x, p0, router_bias=bias)
    np.testing.assert_array_equal(ids, d_ids)
    np.testing.assert_array_equal(wts, d_wts)


def given_routing(spec, T, seed, weights=None):
    rng = np.random.default_rng(seed)
    E, k = spec.num_experts, spec.top_k
    ids = np.empty((T, k), np.int32)
    for t in range(T):
        # expert 0 in most tokens, the rest spread; distinct per token like a real top-k
        pool = rng.permutation(np.arange(1, E))[:k]
        ids[t] = np.concatenate([[0], pool[:k - 1]]) if rng.random() < 0.8 else pool
    wts = rng.uniform(0.05, 1.0, (T, k)).astype(np.float32) if weights is None else weights
    return ids, np.ascontiguousarray(wts, dtype=np.float32)


FP16 = MoESpec(8, 2, 40, 33, dtype="float16", capacity_factor=0.75, capacity_drop="weight",
               activation="silu", bias=True, backend="c")


@pytest.mark.parametrize("spec", SPECS + [FP16], ids=lambda s: s.name)
@pytest.mark.parametrize("T", (1, 7, 65))
def test_experts_with_given_routing(spec, T):
    kernel, x, w, packed = setup(spec, T, seed=11)
    ids, wts = given_routing(spec, T, seed=T)
    keep_ids, keep_wts = ids.copy(), wts.copy()
    out = np.full_like(x, np.nan)
    kernel.experts(x, packed, ids, wts, out=out)
    ref, info = R.moe(spec, x, w, topk_ids=ids, topk_weights=wts)
    assert R.rel_error(out, ref) <= TOL[spec.dtype]
    np.testing.assert_array_equal(ids, keep_ids)          # the caller's routing is read only
    np.testing.assert_array_equal(wts, keep_wts)
    if T == 65:
        assert info["dropped"] > 0


@pytest.mark.parametrize("renormalize", (True, False))
def test_weight_ties_keep_lower_slots_and_nan_ranks_lowest(renormalize):
    """Equal weights: "weight" mode keeps the lowest slot indices, i.e. the same slots as
    "token" mode; a NaN weight is dropped before any number."""
    base = dict(num_experts=4, top_k=2, hidden_dim=24, ffn_dim=16, capacity_factor=0.5,
                renormalize=renormalize, backend="c")
    T = 16                                              # capacity ceil(0.5*16*2/4) = 4
    by_w = MoESpec(**base, capacity_drop="weight")
    by_t = MoESpec(**base, capacity_drop="token")
    ids = np.tile(np.array([[0, 1]], np.int32), (T, 1))
    ids[T // 2:] = [1, 0]                               # expert 0 in slot 0 then slot 1
    ties = np.full((T, 2), 0.5, np.float32)
    outs = []
    for spec in (by_w, by_t):
        kernel, x, w, packed = setup(spec, T, seed=5)
        out = np.full_like(x, np.nan)
        kernel.experts(x, packed, ids, ties, out=out)
        ref, info = R.moe(spec, x, w, topk_ids=ids, topk_weights=ties)
        assert R.rel_error(out, ref) <= 1e-5
        assert info["dropped"] == 2 * (T - 4)
        outs.append(out)
    np.testing.assert_array_equal(outs[0], outs[1])

    # NaN weights in slot 0 of tokens 0..11 (8 on expert 0, 4 on expert 1): "weight" mode
    # drops them before any number.
    kernel, x, w, packed = setup(by_w, T, seed=5)
    wts = np.random.default_rng(1).uniform(0.1, 1.0, (T, 2)).astype(np.float32)
    wts[:T - 4, 0] = np.nan
    kernel(x, packed)                                   # leave other data in the workspace
    out = np.full_like(x, np.nan)
    kernel.experts(x, packed, ids, wts, out=out)
    ref, info = R.moe(by_w, x, w, topk_ids=ids, topk_weights=wts)
    assert not np.isnan(wts[info["kept"]]).any()        # every NaN slot was dropped
    # With renormalize a token whose NaN was dropped still has NaN in its sum before
    # dropping (NaN out, like the reference) unless nothing of it was kept (routed part 0).
    rows = np.isnan(ref).any(axis=1)
    assert rows.any() == renormalize
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    assert R.rel_error(out[~rows], ref[~rows]) <= 1e-5


def test_every_slot_of_a_token_dropped_leaves_only_shared_experts():
    spec = MoESpec(4, 1, 24, 16, capacity_factor=0.25, num_shared_experts=1, backend="c")
    T = 8                                               # capacity ceil(0.25*8/4) = 1
    kernel, x, w, packed = setup(spec, T, seed=2)
    ids = np.zeros((T, 1), np.int32)
    wts = np.ones((T, 1), np.float32)
    out = np.full_like(x, np.nan)
    kernel.experts(x, packed, ids, wts, out=out)
    ref, info = R.moe(spec, x, w, topk_ids=ids, topk_weights=wts)
    assert info["dropped"] == T - 1
    assert R.rel_error(out, ref) <= 1e-5
    shared = R.expert_ffn(spec, x[1:], w, spec.num_experts)
    np.testing.assert_allclose(out[1:], shared, rtol=1e-4, atol=1e-5)


def test_per_expert_drops_and_determinism(monkeypatch):
    """ws.dropped counts each routed expert's drops; results do not depend on the thread count."""
    spec = SPECS[1]
    T = 300
    kernel, x, w, packed = setup(spec, T, seed=8)
    bias = skewed_bias(spec)
    monkeypatch.setenv("MOEGEN_NUM_THREADS", "1")
    y1, st1 = kernel(x, packed, router_bias=bias, return_stats=True)
    monkeypatch.setenv("MOEGEN_NUM_THREADS", "3")
    ids, wts = kernel.route(x, packed, router_bias=bias)
    _, info = R.moe(spec, x, w, topk_ids=ids, topk_weights=wts)
    ws = kernel.module.workspace(T)
    per_expert = np.bincount(ids[~info["kept"]], minlength=spec.num_experts)
    np.testing.assert_array_equal(ws.dropped, per_expert)
    y2, st2 = kernel(x, packed, router_bias=bias, return_stats=True)
    np.testing.assert_array_equal(y1, y2)
    assert st1.dropped == st2.dropped == info["dropped"] > 0


def test_dropless_source_has_no_capacity_code():
    """Capacity code is rendered only for capacity specs."""
    src = render(MoESpec(8, 2, 40, 33, backend="c"), CBackend()).text
    assert "moe_group_capacity" not in src and "moe_combine_kept" not in src
    src = render(SPECS[1], CBackend()).text
    assert "moe_group_capacity" in src and "qsort(keys" in src and "#include <stdlib.h>" in src
