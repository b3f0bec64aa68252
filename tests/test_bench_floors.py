"""Floor arithmetic of moegen.profiling.floors, by hand and against the H100 floor table of docs/PERF.md."""

import math

import pytest

from moegen import MoESpec
from moegen.profiling import floors
from moegen.bench.shapes import SHAPES, TARGET_TOKENS
from moegen.profiling.timing import plan_repeats, summarize


@pytest.mark.parametrize("E,k,T,want", [(8, 2, 0, 0.0), (8, 2, 1, 2.0), (4, 1, 2, 1.75),
                                        (8, 8, 5, 8.0), (256, 8, 1, 8.0),
                                        (8, 2, 2, 8 * (1 - 0.75 ** 2))])
def test_expected_experts_touched(E, k, T, want):
    assert floors.expected_experts_touched(E, k, T) == pytest.approx(want, rel=1e-12)


def test_expected_experts_touched_approaches_all_experts():
    assert floors.expected_experts_touched(256, 8, 16384) == pytest.approx(256.0)


@pytest.mark.parametrize("bad", [(8, 0, 1), (8, 9, 1), (8, 2, -1)])
def test_expected_experts_touched_rejects(bad):
    with pytest.raises(ValueError):
        floors.expected_experts_touched(*bad)


def test_seed_small_bf16_one_token_by_hand():
    spec = MoESpec(8, 2, 512, 2048, dtype="bfloat16")
    assert floors.expert_weight_bytes(spec) == 3 * 512 * 2048 * 2
    # 2 experts' weights + router [8, 512] + x and y of one token
    want = 2 * 3 * 512 * 2048 * 2 + 8 * 512 * 2 + 2 * 512 * 2
    assert floors.bytes_moved(spec, 1) == pytest.approx(want)
    f = floors.floor(spec, 1, bandwidth=3.02e12, peak=694e12)
    assert f.bytes_ms == pytest.approx(want / 3.02e12 * 1e3)
    assert f.flops == 2 * 1 * 2 * 3 * 512 * 2048
    assert f.bound == "memory" and f.floor_ms == f.bytes_ms


def test_compute_bound_point_by_hand():
    spec = MoESpec(8, 2, 512, 2048, dtype="bfloat16")
    f = floors.floor(spec, 16384, bandwidth=3.02e12, peak=694e12)
    assert f.flops == 206_158_430_208
    assert f.bound == "compute"
    assert f.floor_ms == pytest.approx(206_158_430_208 / 694e12 * 1e3)


def test_bias_shared_and_ungated_bytes():
    spec = MoESpec(4, 1, 10, 6, activation="relu", bias=True, num_shared_experts=1)
    assert floors.expert_weight_bytes(spec) == (2 * 10 * 6 + 6 + 10) * 4
    assert spec.flops(3) == 2 * 3 * 2 * 2 * 10 * 6        # k + shared slots, 2 matrices
    # one token: 1 routed + 1 shared expert
    assert floors.bytes_moved(spec, 1) == pytest.approx(2 * (2 * 60 + 16) * 4 + 40 * 4 + 2 * 10 * 4)
    assert floors.bytes_moved(spec, 0) == pytest.approx(40 * 4)   # router only


def test_measured_touched_count_overrides_expectation():
    spec = MoESpec(8, 2, 16, 8)
    assert floors.bytes_moved(spec, 4, experts_touched=3) == pytest.approx(
        3 * 3 * 16 * 8 * 4 + 8 * 16 * 4 + 2 * 4 * 16 * 4)


def test_floor_rejects_nonpositive_ceilings():
    with pytest.raises(ValueError):
        floors.floor(MoESpec(8, 2, 16), 1, bandwidth=0.0, peak=1.0)


def test_fraction_of_floor():
    assert floors.fraction_of_floor(1.0, 4.0) == 0.25
    assert floors.fraction_of_floor(1.0, None) is None
    assert floors.fraction_of_floor(1.0, 0.0) is None


# The floor column (ms) of the H100 targets table, computed with 3.02 TB/s and 694 TFLOP/s.
TARGETS_FLOORS = {
    "seed-small": (0.004, 0.015, 0.017, 0.017, 0.074, 0.297),
    "mixtral-8x7b": (0.233, 0.840, 0.934, 0.936, 4.157, 16.627),
    "qwen3-30b-a3b": (0.025, 0.161, 0.394, 0.401, 0.445, 1.781),
    "deepseek-v3": (0.233, 1.675, 6.490, 7.473, 7.507, 16.627),
}


@pytest.mark.parametrize("shape", list(TARGETS_FLOORS))
def test_matches_targets_table(shape):
    E, k, H, F = SHAPES[shape]
    spec = MoESpec(E, k, H, F, dtype="bfloat16")
    for T, want in zip(TARGET_TOKENS, TARGETS_FLOORS[shape]):
        got = floors.floor(spec, T, 3.02e12, 694e12).floor_ms
        assert abs(got - want) <= 0.002 + 1e-3 * want, (shape, T, got, want)


def test_plan_repeats_and_summary():
    assert plan_repeats(10.0, 1.0, 3, 200) == 100
    assert plan_repeats(1000.0, 1.0, 3, 200) == 3
    assert plan_repeats(0.001, 1.0, 3, 200) == 200
    with pytest.raises(ValueError):
        plan_repeats(1.0, 1.0, 0, 10)
    s = summarize([3.0, 1.0, 2.0, 10.0])
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["n"] == 4 and s["p90"] == 10.0
    assert summarize([]) == {}
    assert not math.isnan(summarize([1.0])["median"])
