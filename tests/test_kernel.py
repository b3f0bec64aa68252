"""MoEKernel's contract on the C backend: input validation before any launch, nothing
written on a rejected call, stage entry points, stats, memoisation."""

import numpy as np
import pytest

import moegen
from moegen import MoESpec
from moegen import reference as R

SPEC = MoESpec(8, 2, 48, 40, dtype="float32", backend="c")


@pytest.fixture(scope="module")
def kernel(module_cache):
    return moegen.compile(SPEC)


@pytest.fixture(scope="module")
def problem(kernel):
    x, w = R.random_problem(SPEC, 13, seed=5)
    return x, w, kernel.pack(**R.weight_kwargs(SPEC, w))


def test_whole_layer_and_stats(kernel, problem):
    x, w, weights = problem
    out = np.full_like(x, np.nan)
    y, st = kernel(x, weights, out=out, return_stats=True)
    assert y is out
    ref, info = R.moe(SPEC, x, w)
    assert R.rel_error(y, ref) <= 1e-5
    np.testing.assert_array_equal(st.tokens_per_expert, info["counts"])
    ref_stats = R.stats(SPEC, info["counts"], info["probs"], info["logits"])
    assert st.aux_loss == pytest.approx(ref_stats["aux_loss"], rel=1e-5)
    assert st.z_loss == pytest.approx(ref_stats["z_loss"], rel=1e-5)


def test_batch_shape_is_flattened(kernel, problem):
    x, w, weights = problem
    x3 = np.ascontiguousarray(x[:12].reshape(3, 4, SPEC.hidden_dim))
    y = kernel(x3, weights)
    assert y.shape == x3.shape
    ref, _ = R.moe(SPEC, x3, w)
    assert R.rel_error(y, ref) <= 1e-5


def test_route_and_experts_entry_points(kernel, problem):
    x, w, weights = problem
    ids, wts = kernel.route(x, weights)
    rid, rw, probs, _ = R.route(SPEC, x, w["router"])
    np.testing.assert_array_equal(ids, rid)
    np.testing.assert_allclose(wts, rw, rtol=1e-5)
    y = kernel.experts(x, weights, ids, wts)
    assert R.rel_error(y, R.experts(SPEC, x, w, ids, wts)) <= 1e-5


def _poisoned(x):
    return np.full_like(x, np.nan)


@pytest.mark.parametrize("make, exc, words", [
    (lambda x, w: dict(x=x.astype(np.float64)), TypeError, ["x", "float32", "float64"]),
    (lambda x, w: dict(x=x[:, :-1].copy()), ValueError, ["x", "48", "47"]),
    (lambda x, w: dict(x=x[:, ::2]), ValueError, ["x"]),
    (lambda x, w: dict(x=np.asfortranarray(np.ones((13, 48), np.float32))[:, :]), ValueError,
     ["x", "contiguous"]),
    (lambda x, w: dict(x=[[1.0] * 48]), TypeError, ["x"]),
    (lambda x, w: dict(weights={"w1": 1}), TypeError, ["weights", "pack"]),
    (lambda x, w: dict(router_bias=np.zeros(7, np.float32)), ValueError, ["router_bias", "(8,)", "(7,)"]),
    (lambda x, w: dict(router_bias=np.zeros(8, np.float64)), TypeError, ["router_bias", "float32"]),
    (lambda x, w: dict(out_shape=(12, 48)), ValueError, ["out", "(13, 48)", "(12, 48)"]),
    (lambda x, w: dict(out_dtype=np.float16), TypeError, ["out", "float32", "float16"]),
])
def test_bad_inputs_are_rejected_before_any_write(kernel, problem, make, exc, words):
    x, w, weights = problem
    args = dict(x=x, weights=weights, router_bias=None)
    over = make(x, w)
    out = _poisoned(x)
    if "out_shape" in over:
        out = np.full(over.pop("out_shape"), np.nan, np.float32)
    if "out_dtype" in over:
        out = np.full(x.shape, np.nan, over.pop("out_dtype"))
    args.update(over)
    with pytest.raises(exc) as info:
        kernel(args["x"], args["weights"], router_bias=args["router_bias"], out=out)
    msg = str(info.value)
    for word in words:
        assert word in msg, (word, msg)
    assert np.all(np.isnan(np.asarray(out, np.float32))), "a rejected call wrote into out"


def test_out_aliasing_x_is_rejected(kernel, problem):
    x, w, weights = problem
    xc = x.copy()
    with pytest.raises(ValueError, match="alias"):
        kernel(xc, weights, out=xc)
    np.testing.assert_array_equal(xc, x)


def test_experts_checks_ids_and_writes_nothing(kernel, problem):
    x, w, weights = problem
    ids, wts = kernel.route(x, weights)
    bad = ids.copy()
    bad[3, 1] = 8
    out = _poisoned(x)
    with pytest.raises(ValueError, match=r"topk_ids.*\[0, 8\)"):
        kernel.experts(x, weights, bad, wts, out=out)
    bad[3, 1] = -1
    with pytest.raises(ValueError, match="topk_ids"):
        kernel.experts(x, weights, bad, wts, out=out)
    with pytest.raises(TypeError, match="topk_ids.*int32"):
        kernel.experts(x, weights, ids.astype(np.int64), wts, out=out)
    with pytest.raises(ValueError, match=r"topk_weights.*\(13, 2\)"):
        kernel.experts(x, weights, ids, wts[:, :1].copy(), out=out)
    assert np.all(np.isnan(out))


def test_weights_for_another_kernel_are_refused(kernel, tmp_path, monkeypatch):
    other = MoESpec(8, 2, 48, 40, dtype="float32", activation="relu", backend="c")
    monkeypatch.setenv("MOEGEN_CACHE_DIR", str(tmp_path))
    k2 = moegen.compile(other)
    x, w = R.random_problem(other, 2)
    w_other = k2.pack(**R.weight_kwargs(other, w))
    with pytest.raises(ValueError, match="packed for"):
        kernel(x, w_other)


def test_compile_is_memoised(kernel):
    assert moegen.compile(SPEC) is kernel
    assert kernel.name == SPEC.name and len(kernel.key) == 64
    assert kernel.backend == "c" and kernel.target
    assert "MoEKernel(" in repr(kernel)


def test_zero_tokens(kernel, problem):
    x, w, weights = problem
    x0 = np.zeros((0, SPEC.hidden_dim), np.float32)
    y, st = kernel(x0, weights, return_stats=True)
    assert y.shape == (0, SPEC.hidden_dim)
    assert st.tokens == 0 and int(np.sum(st.tokens_per_expert)) == 0


# -- PackedWeights contents, read-only out, pack keywords (issue 9 item 10) ------------------------
def _with(weights, **parts):
    from moegen.layout import PackedWeights
    d = {"buffer": weights.buffer, "router": weights.router}
    d.update(parts)
    return PackedWeights(d["buffer"], d["router"], weights.layout)


@pytest.mark.parametrize("part, make, exc, words", [
    ("buffer", lambda b: np.zeros(16, np.float32), ValueError, ["weights.buffer", "(16,)"]),
    ("buffer", lambda b: b.astype(np.float16), TypeError, ["weights.buffer", "float32", "float16"]),
    ("buffer", lambda b: np.repeat(b, 2)[::2], ValueError, ["weights.buffer", "contiguous"]),
    ("buffer", lambda b: b.reshape(8, -1), ValueError, ["weights.buffer", "shape"]),
    ("router", lambda r: r[:, :4].copy(), ValueError, ["weights.router", "shape"]),
    ("router", lambda r: r.astype(np.float64), TypeError, ["weights.router", "float64"]),
    ("router", lambda r: [[0.0]], TypeError, ["weights.router"]),
])
def test_packed_weight_contents_are_checked_before_any_write(kernel, problem, part, make, exc, words):
    x, w, weights = problem
    bad = _with(weights, **{part: make(getattr(weights, part))})
    out = _poisoned(x)
    with pytest.raises(exc) as info:
        kernel(x, bad, out=out)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert np.all(np.isnan(out))
    with pytest.raises(exc):
        kernel.route(x, bad)


def test_swapped_packed_buffer_is_checked_again(kernel, problem):
    """Validation is remembered per (buffer, router) object: replacing one re-checks it."""
    x, w, weights = problem
    good = _with(weights)
    kernel(x, good)
    good.buffer = np.zeros(16, np.float32)
    with pytest.raises(ValueError, match="weights.buffer"):
        kernel(x, good)


def test_read_only_out_is_refused(kernel, problem):
    x, w, weights = problem
    ro = np.frombuffer(bytes(x.nbytes), np.float32).reshape(x.shape)
    with pytest.raises(ValueError, match="out must be writable"):
        kernel(x, weights, out=ro)
    assert not ro.any()
    xr = x.copy()
    xr.flags.writeable = False                   # a read-only input is fine
    assert R.rel_error(kernel(xr, weights), R.moe(SPEC, x, w)[0]) <= 1e-5


def test_pack_lists_the_valid_keywords(kernel, problem):
    x, w, _ = problem
    with pytest.raises(TypeError) as info:
        kernel.pack(gate=w["router"], **{k: v for k, v in R.weight_kwargs(SPEC, w).items()
                                        if k != "router"})
    msg = str(info.value)
    assert "gate" in msg and "router" in msg and "w13" in msg and "logical_weights" not in msg


def test_device_index_is_checked():
    """An array on another CUDA device than the kernel's is refused, naming both (the check
    the cuda kernel runs on x, out, weights, router_bias and topk arrays)."""
    from moegen import arrays
    info = arrays.ArrayInfo(None, "torch", (2, 4), "float32", "cuda:1", True, 256)
    with pytest.raises(ValueError, match=r"x must be on cuda:0 \(the kernel's device\), got one on cuda:1"):
        arrays.check(info, "x", device_kind="cuda", device_index=0)
    arrays.check(info, "x", device_kind="cuda", device_index=1)


def test_cpu_kernel_has_no_device_index(kernel):
    assert kernel.device_index is None


def test_expert_parallel_shard_runs_its_experts(tmp_path, monkeypatch):
    """A rank's shard (3 of 8 experts, by global id) packed from the whole layer's weights: the
    experts stage with the local ids equals the float64 reference on the global ids; routing
    needs the whole layer and is refused."""
    full = MoESpec(8, 2, 16, 24)
    local = MoESpec(3, 2, 16, 24, backend="c")
    monkeypatch.setenv("MOEGEN_CACHE_DIR", str(tmp_path))
    k = moegen.compile(local)
    x, w = R.random_problem(full, 9, seed=2)
    shard = k.pack(w1=w["w1"], w3=w["w3"], w2=w["w2"], expert_ids=[5, 1, 6])
    assert shard.router is None and shard.expert_ids == (5, 1, 6)
    rng = np.random.default_rng(0)
    gids = np.array([rng.choice([5, 1, 6], 2, replace=False) for _ in range(9)], np.int32)
    wts = rng.random((9, 2)).astype(np.float32)
    out = _poisoned(x)
    k.experts(x, shard, shard.local_ids(gids), wts, out=out)
    assert R.rel_error(out, R.experts(full, x, w, gids, wts)) <= 1e-5
    with pytest.raises(ValueError, match="expert-parallel shard"):
        k(x, shard)


def test_swapped_weights_are_read_at_their_new_address(kernel, problem):
    """The data pointers of the weights are remembered per weights object: replacing the
    buffer or router (same shape, other values) must run on the new arrays, not the old."""
    x, w, weights = problem
    good = _with(weights)
    first = kernel(x, good)
    _, w2 = R.random_problem(SPEC, 0, seed=6)
    other = kernel.pack(**R.weight_kwargs(SPEC, w2))
    good.buffer, good.router = other.buffer, other.router
    np.testing.assert_array_equal(kernel(x, good), kernel(x, other))
    assert not np.array_equal(kernel(x, good), first)


def test_torch_cpu_tensors_in_torch_out(kernel, problem):
    """A torch CPU x gives a torch out (allocated through NumPy), equal to the NumPy call."""
    torch = pytest.importorskip("torch")
    x, w, weights = problem
    y = kernel(torch.from_numpy(x), weights)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and y.shape == x.shape
    np.testing.assert_array_equal(y.numpy(), kernel(x, weights))


def test_accepted_x_memo_still_refuses_what_differs(kernel, problem):
    """x's checks are remembered per description; an x that differs from an accepted one in
    dtype, contiguity or shape is still refused, every time."""
    x, w, weights = problem
    kernel(x, weights)
    for _ in range(2):
        with pytest.raises(TypeError, match="x must have dtype float32, got float64"):
            kernel(x.astype(np.float64), weights)
        with pytest.raises(ValueError, match="x must be C-contiguous"):
            kernel(np.asfortranarray(np.ascontiguousarray(x[:4]).reshape(2, 2, -1)), weights)
        with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 48\]"):
            kernel(x[:, :40].copy(), weights)
    kernel(x, weights)
