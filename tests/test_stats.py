import numpy as np
import pytest

from moegen import MoESpec
from moegen import reference as R
from moegen.stats import BalanceTracker, LayerStats


def test_layer_stats_match_the_reference():
    spec = MoESpec(8, 2, 16, 8)
    x, w = R.random_problem(spec, 300, seed=2)
    ids, wts, probs, logits = R.route(spec, x, w["router"])
    counts = np.bincount(ids.ravel(), minlength=8).astype(np.int32)
    lse = np.log(np.exp(logits).sum(1))
    sums = np.concatenate([probs.sum(0), [np.sum(lse ** 2)]]).astype(np.float32)
    st = LayerStats(spec, 300, counts, sums).as_dict()
    ref = R.stats(spec, counts, probs, logits)
    for key in ("usage_variance", "usage_cv", "max_over_mean_load", "aux_loss", "adaptive_coeff"):
        assert st[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), key
    assert st["z_loss"] == pytest.approx(ref["z_loss"], rel=1e-6)
    np.testing.assert_array_equal(st["tokens_per_expert"], ref["tokens_per_expert"])


def test_zero_tokens_give_finite_stats():
    spec = MoESpec(4, 1, 4, 4)
    st = LayerStats(spec, 0, np.zeros(4, np.int32), np.zeros(5, np.float32)).as_dict()
    assert st["aux_loss"] == 0.0 and st["z_loss"] == 0.0 and st["usage_cv"] == 0.0


def test_tracker_finds_cold_and_hot_experts():
    spec = MoESpec(4, 1, 4, 4)
    tr = BalanceTracker(spec, decay=0.5)
    for _ in range(10):
        tr.update({"tokens_per_expert": [70, 28, 2, 0], "tokens": 100, "aux_loss": 1.5})
    s = tr.summary()
    assert s["steps"] == 10 and s["tokens"] == 1000
    assert s["cold_experts"] == [2, 3] and s["hot_experts"] == [0]
    assert s["mean_aux_loss"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="shape"):
        tr.update({"tokens_per_expert": [1, 2]})
    with pytest.raises(ValueError, match="num_experts"):
        BalanceTracker()
