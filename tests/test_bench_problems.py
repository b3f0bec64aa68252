"""Benchmark inputs: device_pack equals pack_host, subset_error, and the CPU baselines agree
with the float64 reference on moegen's routing."""

import numpy as np
import pytest

from moegen import MoESpec
from moegen import reference as R
from moegen.bench import baselines as B
from moegen.bench.matrix import check_rows_for, poison
from moegen.profiling.problems import device_pack, subset_error
from moegen.layout import PackedLayout, logical_weights, pack_host

SPECS = [MoESpec(4, 2, 12, 8, dtype="bfloat16", bias=True, num_shared_experts=1),
         MoESpec(3, 1, 10, 6, activation="relu"),
         MoESpec(5, 2, 7, 6, dtype="float16", activation="geglu")]


@pytest.mark.parametrize("orders", [("nk", "nk", 0, "eh"), ("kn", "kn", 0, "he"),
                                    ("nk", "kn", 2, "eh"), ("kn", "nk", 2, "he")],
                         ids=lambda o: "-".join(map(str, o)))
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_device_pack_equals_pack_host(spec, orders):
    w13, w2, inter, router = orders
    lay = PackedLayout(spec, w13, w2, inter if spec.gated else 0, router)
    _, w = R.random_problem(spec, 0, seed=3)
    logical = logical_weights(spec, **R.weight_kwargs(spec, w))
    want_buf, want_router = pack_host(lay, logical)
    dt = spec.dt.numpy
    buf, r = device_pack(lay, {k: (None if v is None else v.astype(dt)) for k, v in logical.items()},
                         lambda shape: np.zeros(shape, dtype=dt))
    assert buf.shape == want_buf.shape and buf.dtype == want_buf.dtype
    np.testing.assert_array_equal(buf.view(np.uint8), want_buf.view(np.uint8))
    np.testing.assert_array_equal(r, want_router)


def _problem(spec, T, seed=0):
    x, w = R.random_problem(spec, T, seed)
    ids, wts, _, _ = R.route(spec, x, w["router"])
    return x, w, ids, wts.astype(np.float32)


@pytest.mark.parametrize("spec", [MoESpec(6, 2, 16, 24), MoESpec(5, 2, 8, 12, bias=True,
                                                                 num_shared_experts=1)],
                         ids=lambda s: s.name)
def test_subset_error_zero_for_the_reference_and_large_when_wrong(spec):
    x, w, ids, wts = _problem(spec, 9)
    ref = R.experts(spec, x, w, ids, wts)
    assert subset_error(spec, ref, x, w, ids, wts, rows=9) < 1e-12
    assert subset_error(spec, ref, x, w, ids, wts, rows=3) < 1e-12
    bad = ref.copy()
    bad[1] *= 1.5
    assert subset_error(spec, bad, x, w, ids, wts, rows=4) > 1e-2
    bad[0, 0] = np.nan
    assert subset_error(spec, bad, x, w, ids, wts, rows=4) == float("inf")
    assert subset_error(spec, ref[:0], x[:0], w, ids[:0], wts[:0], rows=4) == 0.0


def test_check_rows_bounded_by_host_bytes():
    small = MoESpec(8, 2, 512, 2048, dtype="bfloat16")
    big = MoESpec(256, 8, 7168, 2048, dtype="bfloat16")
    assert check_rows_for(small, 16) == 16
    rows = check_rows_for(big, 16)
    assert rows == 1                      # 8 experts x 88 MB each <= 0.8 GB
    assert check_rows_for(big, 16, host_bytes=1.0) == 1   # always at least one row


def test_poison_fills_nan():
    a = np.zeros(4, np.float32)
    poison(a)
    assert np.isnan(a).all()
    b = np.zeros(3, np.uint16)           # bf16 bits, as the cuda backend stores them
    poison(b)
    assert (b == 0x7FC0).all()


@pytest.mark.parametrize("spec", [MoESpec(6, 2, 16, 24), MoESpec(5, 2, 8, 12, bias=True,
                                                                 num_shared_experts=1),
                                  MoESpec(4, 1, 8, 16, activation="gelu")],
                         ids=lambda s: s.name)
def test_cpu_baselines_match_reference(spec):
    pytest.importorskip("torch")
    x, w, ids, wts = _problem(spec, 13)
    bases, notes = B.build(spec, w, "numpy", "cpu")
    names = {b.name for b in bases}
    assert {"naive", "numpy"} <= names
    assert "triton" not in names          # GPU only
    for b in bases:
        src = B.to_torch(x, "cpu") if b.torch else x
        rid, rw = (B.to_torch(ids, "cpu"), B.to_torch(wts, "cpu")) if b.torch else (ids, wts)
        y = b.run(src, rid, rw)
        err = subset_error(spec, y, x, w, ids, wts, rows=13)
        assert err < 1e-5, (b.name, err)
        b.timed(src, rid, rw)             # its own routing runs too


def test_baselines_skipped_without_logical_weights():
    bases, notes = B.build(MoESpec(4, 2, 8), {"w1": None}, "numpy", "cpu")
    assert bases == [] and notes


@pytest.mark.parametrize("spec", [MoESpec(4, 2, 16, 24, dtype="bfloat16"),
                                  MoESpec(3, 2, 16, 8, dtype="float16", bias=True, num_shared_experts=1),
                                  MoESpec(3, 1, 8, 16, dtype="bfloat16", activation="relu")],
                         ids=lambda s: s.name)
def test_torch_weight_path_packs_and_runs_like_the_gpu_one(spec):
    """The GPU path (torch weights with W1/W3 as views of w13, device_pack with torch ops, the
    torch baselines) run on CPU tensors: bytes equal pack_host's, baselines within tolerance."""
    torch = pytest.importorskip("torch")
    from moegen.arrays import host
    from moegen.profiling.problems import torch_logical
    logical = torch_logical(spec, 7, torch, device="cpu")
    if spec.gated:
        assert logical["w1"].data_ptr() == logical["w13"].data_ptr()     # views, no copy
    lay = PackedLayout(spec, "nk", "nk", 8 if spec.gated and spec.ffn_dim % 8 == 0 else 0, "eh")
    tdt = {"bfloat16": torch.bfloat16, "float16": torch.float16}[spec.dtype]
    buf, r = device_pack(lay, logical, lambda shape: torch.zeros(shape, dtype=tdt))
    np_logical = {k: (None if v is None else host(v)) for k, v in logical.items() if k != "w13"}
    want_buf, want_router = pack_host(lay, np_logical)
    np.testing.assert_array_equal(host(buf).view(np.uint16), want_buf.view(np.uint16))
    np.testing.assert_array_equal(host(r).view(np.uint16), want_router.view(np.uint16))

    T = 11
    x = (torch.randn(T, spec.hidden_dim, generator=torch.Generator().manual_seed(1))).to(tdt)
    ids, wts, _, _ = R.route(spec, host(x), np_logical["router"])
    wts = wts.astype(np.float32)
    bases, _ = B.build(spec, logical, "torch", "cpu", ("naive", "grouped_mm"))
    assert [b.name for b in bases] == ["naive", "grouped_mm"]
    for b in bases:
        y = b.run(x, B.to_torch(ids, "cpu"), B.to_torch(wts, "cpu"))
        assert y.dtype == tdt and tuple(y.shape) == (T, spec.hidden_dim)
        assert subset_error(spec, y, x, logical, ids, wts, rows=T) <= spec.dt.tolerance, b.name
