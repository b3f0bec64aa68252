"""The c backend against the float64 reference: a covering grid of specs (every E, k, dtype,
activation, bias, renormalisation and routing value appears at least once), token counts
at the tile and bucket boundaries, NaN and tie handling, stage entry points, stats."""

import numpy as np
import pytest

import moegen
from moegen import MoESpec
from moegen import reference as R
from moegen.backends import isa

# Tile sizes of the generated code on every tier (moegen.backends.c_plan): BM = 3 or 4 token
# rows per register tile, route_chunk = 64 tokens per route work item; buckets are powers of two.
BOUNDARY_T = (0, 1, 2, 3, 4, 5, 7, 63, 64, 65, 1000)

# (id, spec, token counts).  Odd H and F everywhere so every k loop and column loop has a tail.
CASES = [
    ("e8-k2-h100-f257-fp32-swiglu-bias", MoESpec(8, 2, 100, 257, bias=True, backend="c"), BOUNDARY_T),
    ("e2-k1-h257-f100-fp16-geglu-raw", MoESpec(2, 1, 257, 100, dtype="float16", activation="geglu",
                                               renormalize=False, backend="c"), (1, 7, 64)),
    ("e64-k8-h65-f33-bf16-relu-bias", MoESpec(64, 8, 65, 33, dtype="bfloat16", activation="relu",
                                              bias=True, backend="c"), (1, 7, 64, 1000)),
    ("e256-k8-h33-f17-fp32-gelu", MoESpec(256, 8, 33, 17, activation="gelu", backend="c"), (1, 64, 1000)),
    ("e8-k2-h100-f257-fp16-silu-bias", MoESpec(8, 2, 100, 257, dtype="float16", activation="silu",
                                               bias=True, backend="c"), (1, 64)),
    ("e16-k4-h200-f130-bf16-swiglu-raw", MoESpec(16, 4, 200, 130, dtype="bfloat16", renormalize=False,
                                                 backend="c"), (1, 7, 1000)),
    ("e8-k2-h96-f64-fp32-topksm", MoESpec(8, 2, 96, 64, routing="topk_softmax", backend="c"), (1, 65)),
    ("e16-k4-h64-f48-fp32-sigmoid-g4-tg2-rs2p5", MoESpec(16, 4, 64, 48, routing="sigmoid_topk",
                                                         n_group=4, topk_group=2,
                                                         routed_scaling_factor=2.5, backend="c"),
     (1, 7, 200)),
    # k longer than one BK = 512 chunk, with a short last chunk
    ("e4-k2-h1100-f1029-fp32-swiglu-bias", MoESpec(4, 2, 1100, 1029, bias=True, backend="c"), (1, 70)),
    ("e4-k1-h1030-f1100-bf16-relu", MoESpec(4, 1, 1030, 1100, dtype="bfloat16", activation="relu",
                                            backend="c"), (5, 100)),
    ("e8-k2-h72-f40-bf16-shared2-bias", MoESpec(8, 2, 72, 40, dtype="bfloat16", bias=True,
                                                num_shared_experts=2, backend="c"), (1, 7, 64)),
]
PARAMS = [pytest.param(spec, T, id=f"{cid}-T{T}") for cid, spec, ts in CASES for T in ts]


pytestmark = pytest.mark.usefixtures("module_cache")


def selection_bias(spec, seed=0):
    """A router bias for the test: logit bias, or the selection bias of sigmoid routing."""
    return (np.random.default_rng(seed).standard_normal(spec.num_experts) * 0.1).astype(np.float32)


def reference(spec, x, w, bias):
    """(y, ids, weights, scores used for selection) in float64."""
    if spec.routing == "sigmoid_topk":
        ids, wts, probs, logits = R.route(spec, x, w["router"], selection_bias=bias)
        scores = probs + bias
    else:
        ids, wts, probs, logits = R.route(spec, x, w["router"], router_bias=bias)
        scores = logits if spec.routing == "topk_softmax" else probs
    y = R.experts(spec, x, w, ids, wts)
    return y, ids, wts, scores


@pytest.mark.parametrize("spec,T", PARAMS)
def test_layer_matches_reference(spec, T):
    kernel = moegen.compile(spec)
    x, w = R.random_problem(spec, T, seed=T + 1)
    weights = kernel.pack(**R.weight_kwargs(spec, w))
    bias = selection_bias(spec, seed=T)
    out = np.full((T, spec.hidden_dim), np.nan, dtype=spec.dt.numpy)
    y = kernel(x, weights, router_bias=bias, out=out)
    assert y is out
    if T == 0:
        return
    ref, ids, wts, scores = reference(spec, x, w, bias)
    got_ids, got_w = kernel.route(x, weights, router_bias=bias)
    assert got_ids.min() >= 0 and got_ids.max() < spec.num_experts
    if spec.n_group > 1:
        # grouped selection: a near tie between groups also changes the pick
        keep = np.all(got_ids == ids, axis=1)
        assert keep.mean() > 0.95
    else:
        keep = ~R.near_ties(scores, spec.top_k, tol=1e-4)
        np.testing.assert_array_equal(got_ids[keep], ids[keep])
    np.testing.assert_allclose(got_w[keep], wts[keep], rtol=1e-5, atol=1e-6)
    # Compare the layer on tokens routed the same way (all of them, but for near ties).
    err = R.rel_error(y[keep], ref[keep])
    assert err <= spec.dt.tolerance, f"rel error {err:.3g} > {spec.dt.tolerance}"


EXPERT_CASES = [c for c in CASES if c[0].startswith(("e8-k2-h100-f257-fp32", "e2-", "e64-", "e4-k2",
                                                      "e16-k4-h64", "e8-k2-h72"))]


@pytest.mark.parametrize("spec", [c[1] for c in EXPERT_CASES], ids=[c[0] for c in EXPERT_CASES])
def test_experts_entry_point(spec):
    """kernel.experts with a routing from elsewhere (uniform random ids, random weights)."""
    kernel = moegen.compile(spec)
    T = 50
    x, w = R.random_problem(spec, T, seed=3)
    weights = kernel.pack(**R.weight_kwargs(spec, w))
    rng = np.random.default_rng(4)
    ids = np.stack([rng.choice(spec.num_experts, spec.top_k, replace=False) for _ in range(T)]).astype(np.int32)
    wts = rng.random((T, spec.top_k)).astype(np.float32)
    out = np.full((T, spec.hidden_dim), np.nan, dtype=spec.dt.numpy)
    kernel.experts(x, weights, ids, wts, out=out)
    ref = R.experts(spec, x, w, ids, wts)
    assert R.rel_error(out, ref) <= spec.dt.tolerance


@pytest.mark.parametrize("routing", ["softmax_topk", "topk_softmax", "sigmoid_topk"])
def test_nan_token_keeps_ids_in_range(routing):
    spec = MoESpec(8, 2, 40, 24, routing=routing, backend="c")
    kernel = moegen.compile(spec)
    x, w = R.random_problem(spec, 9, seed=1)
    x[3, 5] = np.nan
    weights = kernel.pack(**R.weight_kwargs(spec, w))
    ids, _ = kernel.route(x, weights)
    assert ids.min() >= 0 and ids.max() < spec.num_experts
    assert len(set(ids[3].tolist())) == spec.top_k             # distinct experts, still
    out = np.full_like(x, np.nan)
    kernel(x, weights, out=out)
    assert np.isnan(out[3]).all()                              # NaN never passes as a number
    ref, _ = R.moe(spec, x, w)
    rows = np.arange(9) != 3
    assert R.rel_error(out[rows], ref[rows]) <= 1e-5


def test_nan_router_row_is_never_picked_by_sigmoid():
    spec = MoESpec(8, 2, 40, 24, routing="sigmoid_topk", backend="c")
    kernel = moegen.compile(spec)
    x, w = R.random_problem(spec, 33, seed=2)
    w["router"][6] = np.nan
    weights = kernel.pack(**R.weight_kwargs(spec, w))
    ids, wts = kernel.route(x, weights)
    assert ids.min() >= 0 and ids.max() < spec.num_experts
    assert not (ids == 6).any()
    assert np.isfinite(wts).all()


def test_nan_router_row_softmax_ids_in_range():
    spec = MoESpec(8, 2, 40, 24, backend="c")
    kernel = moegen.compile(spec)
    x, w = R.random_problem(spec, 5, seed=2)
    w["router"][6] = np.nan
    weights = kernel.pack(**R.weight_kwargs(spec, w))
    ids, _ = kernel.route(x, weights)
    rid, _, _, _ = R.route(spec, x, w["router"])
    np.testing.assert_array_equal(ids, rid)                    # all scores NaN: ids 0..k-1


@pytest.mark.parametrize("routing", ["softmax_topk", "topk_softmax", "sigmoid_topk"])
def test_ties_go_to_the_lower_expert(routing):
    spec = MoESpec(8, 3, 40, 24, routing=routing, backend="c")
    kernel = moegen.compile(spec)
    x, w = R.random_problem(spec, 6, seed=3)
    w["router"][:] = 0                       # every logit equal
    weights = kernel.pack(**R.weight_kwargs(spec, w))
    ids, wts = kernel.route(x, weights)
    np.testing.assert_array_equal(ids, np.tile(np.arange(3, dtype=np.int32), (6, 1)))
    np.testing.assert_allclose(wts, 1 / 3, rtol=1e-6)


def test_stats_match_reference():
    spec = MoESpec(16, 4, 64, 40, backend="c")
    kernel = moegen.compile(spec)
    x, w = R.random_problem(spec, 300, seed=9)
    weights = kernel.pack(**R.weight_kwargs(spec, w))
    _, st = kernel(x, weights, return_stats=True)
    ids, _, probs, logits = R.route(spec, x, w["router"])
    counts, _, _ = R.group(ids, spec.num_experts)
    ref = R.stats(spec, counts, probs, logits)
    np.testing.assert_array_equal(st.tokens_per_expert, counts)
    np.testing.assert_allclose(st.router_prob_mean, ref["router_prob_mean"], rtol=1e-5)
    assert st.aux_loss == pytest.approx(ref["aux_loss"], rel=1e-5)
    assert st.z_loss == pytest.approx(ref["z_loss"], rel=1e-5)


def test_result_does_not_depend_on_thread_count(monkeypatch):
    spec = MoESpec(8, 2, 100, 257, backend="c")
    kernel = moegen.compile(spec)
    x, w = R.random_problem(spec, 500, seed=5)
    weights = kernel.pack(**R.weight_kwargs(spec, w))
    outs = []
    for n in ("1", "2", "3"):
        monkeypatch.setenv("MOEGEN_NUM_THREADS", n)
        outs.append(kernel(x, weights, return_stats=True))
    for y, st in outs[1:]:
        np.testing.assert_array_equal(y, outs[0][0])
        np.testing.assert_array_equal(st.router_prob_mean, outs[0][1].router_prob_mean)


def test_bad_expert_ids_rejected_before_launch():
    spec = MoESpec(8, 2, 40, 24, backend="c")
    kernel = moegen.compile(spec)
    x, w = R.random_problem(spec, 4, seed=1)
    weights = kernel.pack(**R.weight_kwargs(spec, w))
    ids = np.array([[0, 1], [2, 8], [3, 4], [5, 6]], dtype=np.int32)
    out = np.full_like(x, 7.0)
    with pytest.raises(ValueError, match="topk_ids"):
        kernel.experts(x, weights, ids, np.ones((4, 2), np.float32), out=out)
    assert (out == 7.0).all()


@pytest.mark.parametrize("tier", ["generic", "x86-64-v2"])
def test_lower_tiers_run_here(tier, monkeypatch):
    """Code for every tier this CPU can run is checked against the reference too."""
    if not isa.runnable(isa.TIERS[tier]):
        pytest.skip(f"this CPU cannot run {tier}")
    monkeypatch.setenv("MOEGEN_ISA", tier)
    for spec in (MoESpec(8, 2, 100, 57, dtype="float16", backend="c"),
                 MoESpec(8, 2, 100, 57, dtype="bfloat16", activation="gelu", bias=True, backend="c")):
        kernel = moegen.compile(spec)
        assert kernel.target == tier
        x, w = R.random_problem(spec, 70, seed=1)
        y = kernel(x, kernel.pack(**R.weight_kwargs(spec, w)))
        ref, _ = R.moe(spec, x, w)
        assert R.rel_error(y, ref) <= spec.dt.tolerance


EDGE_SPECS = [
    pytest.param(MoESpec(1, 1, 16, 8, backend="c"), id="e1-k1"),
    pytest.param(MoESpec(2, 2, 16, 8, backend="c"), id="e2-k2-all-experts"),
    pytest.param(MoESpec(4, 2, 16, 8, routing="sigmoid_topk", n_group=4, topk_group=2, backend="c"),
                 id="e4-k2-sigmoid-groups-of-one"),
    pytest.param(MoESpec(8, 8, 16, 8, routing="topk_softmax", backend="c"), id="e8-k8-topksm"),
    pytest.param(MoESpec(3, 1, 5, 3, activation="gelu", num_shared_experts=1, bias=True, backend="c"),
                 id="e3-k1-h5-f3-gelu-shared1-bias"),
]


@pytest.mark.parametrize("spec", EDGE_SPECS)
def test_edge_specs(spec):
    """k = E, one expert, groups of one expert, tiny H and F (every loop is all tail)."""
    kernel = moegen.compile(spec)
    x, w = R.random_problem(spec, 37, seed=1)
    weights = kernel.pack(**R.weight_kwargs(spec, w))
    out = np.full_like(x, np.nan)
    kernel(x, weights, out=out)
    ids, wts, _, _ = R.route(spec, x, w["router"])
    got_ids, _ = kernel.route(x, weights)
    np.testing.assert_array_equal(got_ids, ids)
    assert R.rel_error(out, R.experts(spec, x, w, ids, wts)) <= 1e-5
