"""The float64 reference against hand-written per-token loops and hand-computed cases."""

import math

import numpy as np
import pytest

from moegen import MoESpec
from moegen import reference as R


def test_topk_ties_go_to_lower_index_and_nan_ranks_last():
    scores = np.array([[0.1, 0.5, 0.5, 0.2],
                       [np.nan, 0.3, np.nan, 0.3],
                       [np.nan] * 4])
    ids = R.topk(scores, 2)
    assert ids.tolist() == [[1, 2], [1, 3], [0, 1]]


def test_route_softmax_topk_renormalised_by_hand():
    spec = MoESpec(4, 2, 2, 4)
    x = np.array([[1.0, 0.0]])
    router = np.array([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [0.0, 0.0]])  # logits 1, 3, 2, 0
    ids, w, probs, logits = R.route(spec, x, router)
    assert ids.tolist() == [[1, 2]]
    e = np.exp([3.0, 2.0])
    np.testing.assert_allclose(w[0], e / e.sum())
    raw = R.route(spec.replace(renormalize=False), x, router)[1]
    np.testing.assert_allclose(raw[0], np.exp([3.0, 2.0]) / np.exp([1.0, 3.0, 2.0, 0.0]).sum())


def test_route_topk_softmax_equals_renormalised_softmax_topk():
    spec = MoESpec(16, 4, 32, 8)
    x, w = R.random_problem(spec, 50, seed=1)
    a = R.route(spec, x, w["router"])
    b = R.route(spec.replace(routing="topk_softmax"), x, w["router"])
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], rtol=1e-12)


def test_sigmoid_grouped_selection_by_hand():
    spec = MoESpec(8, 2, 1, 4, routing="sigmoid_topk", n_group=4, topk_group=1,
                   routed_scaling_factor=2.0)
    # logits per expert; groups {0,1} {2,3} {4,5} {6,7}; group 1 has the best top-2 sum
    logits = np.array([3.0, -5.0, 2.0, 2.0, 0.0, 0.0, -1.0, 2.5])
    x = np.ones((1, 1))
    ids, w, _, _ = R.route(spec, x, logits[:, None])
    assert ids.tolist() == [[2, 3]]
    np.testing.assert_allclose(w.sum(), 2.0)
    # a selection bias changes the choice but not the weights' source
    bias = np.zeros(8)
    bias[0] = 10.0
    ids_b, w_b, probs, _ = R.route(spec, x, logits[:, None], selection_bias=bias)
    assert 0 in ids_b[0]
    sel = probs[0, ids_b[0]]
    np.testing.assert_allclose(w_b[0], 2.0 * sel / sel.sum())


def test_group_is_stable_counting_sort():
    ids = np.array([[2, 0], [0, 1], [2, 1]])
    counts, offsets, order = R.group(ids, 3)
    assert counts.tolist() == [2, 2, 2]
    assert offsets.tolist() == [0, 2, 4, 6]
    assert order.tolist() == [1, 2, 3, 5, 0, 4]


@pytest.mark.parametrize("act", ["swiglu", "geglu", "relu", "gelu", "silu"])
def test_layer_matches_a_per_token_loop(act):
    spec = MoESpec(6, 2, 12, 10, activation=act, bias=True, num_shared_experts=1)
    x, w = R.random_problem(spec, 9, seed=3)
    y, info = R.moe(spec, x, w)
    fn = {"swiglu": "silu", "geglu": "gelu"}.get(act, act)
    scalar = {"silu": lambda g: g / (1 + math.exp(-g)),
              "gelu": lambda g: 0.5 * g * (1 + math.erf(g / math.sqrt(2))),
              "relu": lambda g: max(g, 0.0)}[fn]
    xf = x.astype(np.float64)
    for t in range(9):
        acc = np.zeros(12)
        slots = [(e, wt) for e, wt in zip(info["topk_ids"][t], info["topk_weights"][t])]
        slots += [(6, 1.0)]
        for e, wt in slots:
            g = w["w1"][e].astype(np.float64) @ xf[t] + w["b1"][e]
            h = np.array([scalar(v) for v in g])
            if spec.gated:
                h = h * (w["w3"][e].astype(np.float64) @ xf[t] + w["b3"][e])
            acc += wt * (w["w2"][e].astype(np.float64) @ h + w["b2"][e])
        np.testing.assert_allclose(y[t], acc, rtol=1e-10, atol=1e-12)


def test_stats_by_hand():
    spec = MoESpec(4, 1, 2, 4)
    counts = np.array([2, 1, 1, 0])
    probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1],
                      [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1]])
    s = R.stats(spec, counts, probs, logits=np.zeros((4, 4)))
    f = counts / 4
    p = probs.mean(0)
    assert s["aux_loss"] == pytest.approx(4 * np.sum(f * p))
    assert s["usage_variance"] == pytest.approx(np.var(f))
    assert s["adaptive_coeff"] == pytest.approx(0.01 * (1 + np.var(f)))
    assert s["max_over_mean_load"] == pytest.approx(2.0)
    assert s["z_loss"] == pytest.approx(math.log(4) ** 2)


def test_rel_error_flags_nan_and_inf():
    ref = np.ones(4)
    assert R.rel_error(ref, ref) == 0.0
    assert R.rel_error(np.array([1, 1, np.nan, 1.0]), ref) == math.inf
    with pytest.raises(ValueError, match="shapes"):
        R.rel_error(np.ones(3), ref)


def test_random_problem_is_never_zero_and_respects_dtype():
    for dt in ("float32", "float16", "bfloat16"):
        spec = MoESpec(4, 2, 8, 16, dtype=dt, bias=True)
        x, w = R.random_problem(spec, 5)
        assert x.dtype == spec.dt.numpy and w["w1"].dtype == spec.dt.numpy
        assert np.count_nonzero(x.astype(np.float32)) == x.size


def test_capacity_drops_in_token_order_and_renormalises():
    spec = MoESpec(2, 1, 4, 4, capacity_factor=1.0)         # capacity ceil(1·4·1/2) = 2
    ids = np.array([[0], [0], [0], [1]])
    w = np.ones((4, 1))
    w2, kept, dropped = R.apply_capacity(spec, ids, w)
    assert kept[:, 0].tolist() == [True, True, False, True]
    assert dropped == 1 and w2[:, 0].tolist() == [1.0, 1.0, 0.0, 1.0]


def test_capacity_by_weight_keeps_the_largest():
    spec = MoESpec(2, 2, 4, 4, capacity_factor=0.5, capacity_drop="weight", renormalize=False)
    ids = np.array([[0, 1], [0, 1]])                          # capacity ceil(0.5·2·2/2) = 1
    w = np.array([[0.3, 0.7], [0.6, 0.4]])
    w2, kept, dropped = R.apply_capacity(spec, ids, w)
    assert kept.tolist() == [[False, True], [True, False]]
    assert dropped == 2
    np.testing.assert_allclose(w2, [[0.0, 0.7], [0.6, 0.0]])
