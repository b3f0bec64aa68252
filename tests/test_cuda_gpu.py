"""The cuda backend on a GPU: every stage and the whole layer against the float64 reference.

Marked ``gpu``; skipped without CuPy and a visible device.  The specs cover E in {2, 8, 64, 128,
256}, k in {1, 2, 6, 8}, odd H/F (100, 1000, 1408), every dtype, activation and routing, shared
experts and routed scaling; token counts sit on both sides of tile and bucket boundaries.
Outputs are NaN-poisoned before every run, so an unwritten element fails the comparison.
All specs are compiled once per session, in parallel processes (NVRTC is single-threaded).
"""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing

import numpy as np
import pytest

from moegen import arrays, reference
from moegen.backends.base import Call
from moegen.kernel import MoEKernel
from moegen.spec import MoESpec

from backward_cuda_specs import SPECS as BACKWARD_SPECS  # noqa: E402  (tests/ is on sys.path)

pytestmark = pytest.mark.gpu


def _cuda_ok() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no CuPy / driver / device
        return False


if not _cuda_ok():
    pytest.skip("needs CuPy and a CUDA device", allow_module_level=True)

import cupy as cp  # noqa: E402

try:
    import torch  # noqa: E402
    HAVE_TORCH = torch.cuda.is_available()
except Exception:  # noqa: BLE001
    HAVE_TORCH = False

# Five layers shared with the CUDA backward's tests (tests/backward_cuda_specs.py), then three
# of the forward's own.
SPECS = {name: BACKWARD_SPECS[name] for name in (
    "e8-k2-h512-f2048-bf16-swiglu", "e2-k1-h100-f1000-fp32-relu",
    "e64-k6-h1000-f1408-fp16-geglu-topksm-bias", "e128-k8-h1408-f100-bf16-silu-raw-rs2.5",
    "e256-k8-h256-f128-bf16-sigmoid-g8-tg4-sh1")}
SPECS.update({
    "e8-k2-h100-f100-fp32-gelu-bias": MoESpec(8, 2, 100, 100, dtype="float32", activation="gelu", bias=True),
    "e128-k8-h2048-f256-bf16-swiglu": MoESpec(128, 8, 2048, 256, dtype="bfloat16"),
    "e16-k2-h64-f64-fp16-sigmoid-sh2": BACKWARD_SPECS["e16-k2-h64-f64-fp16-sigmoid-sh2"],
})
# Expert capacity (spec.capacity_factor): both drop modes, with and without renormalize.
CAP_SPECS = {
    "cap-e8-k2-h128-f256-fp32-token": MoESpec(8, 2, 128, 256, dtype="float32", capacity_factor=1.0),
    "cap-e8-k2-h128-f256-fp32-weight-raw": MoESpec(
        8, 2, 128, 256, dtype="float32", capacity_factor=1.0, capacity_drop="weight",
        renormalize=False),
    "cap-e16-k2-h256-f128-bf16-weight-sh1": MoESpec(
        16, 2, 256, 128, dtype="bfloat16", capacity_factor=1.25, capacity_drop="weight",
        num_shared_experts=1),
    "cap-e16-k4-h256-f128-bf16-token-raw": MoESpec(
        16, 4, 256, 128, dtype="bfloat16", activation="gelu", capacity_factor=0.75,
        renormalize=False),
}
ALL_SPECS = {**SPECS, **CAP_SPECS}
TOKENS = (1, 15, 16, 17, 127, 128, 129)
# The float64 reference of the whole layer at T = 4096 is only cheap for small shapes.
LARGE_LAYER = ("e8-k2-h512-f2048-bf16-swiglu", "e2-k1-h100-f1000-fp32-relu",
               "e256-k8-h256-f128-bf16-sigmoid-g8-tg4-sh1", "e8-k2-h100-f100-fp32-gelu-bias",
               "e128-k8-h1408-f100-bf16-silu-raw-rs2.5")


# -- building -------------------------------------------------------------------------------
def _resolved(spec: MoESpec) -> MoESpec:
    from moegen.backends import get_backend
    spec = spec.replace(backend="cuda")
    return spec.replace(arch=get_backend("cuda").target(spec))


def _compile(spec_dict: dict):
    from moegen.backends import get_backend
    from moegen.render import render
    spec = MoESpec.from_dict(spec_dict)
    be = get_backend("cuda")
    art = be.compile(render(_plan(spec)), spec, spec.arch, "test")
    return art.binary, art.meta


def _plan(spec: MoESpec):
    """The plan of a resolved spec on this GPU (the one device's SM count)."""
    from moegen.backends import get_backend
    from moegen.plan import make_plan
    return make_plan(spec, spec.arch, {}, sms=get_backend("cuda").sm_count(spec.arch))


@functools.lru_cache(maxsize=1)
def _artifacts() -> dict:
    specs = [_resolved(s) for s in ALL_SPECS.values()]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(len(specs), 8), mp_context=ctx) as pool:
        built = list(pool.map(_compile, [s.to_dict() for s in specs]))
    return dict(zip(specs, built))


@functools.lru_cache(maxsize=None)
def kernel_for(name: str) -> MoEKernel:
    from moegen.backends import get_backend
    from moegen.layout import PackedWeights  # noqa: F401
    spec = _resolved(ALL_SPECS[name])
    binary, meta = _artifacts()[spec]
    from moegen.backends.base import Artifact
    module = get_backend("cuda").load(Artifact(binary, meta), _plan(spec))
    return MoEKernel(spec, module, meta)


# -- arrays ---------------------------------------------------------------------------------
def to_device(a: np.ndarray, use_torch: bool = False):
    """Host array -> device array: torch for bf16 (CuPy has no bfloat16) or when asked."""
    if a.dtype.name == "bfloat16" or use_torch:
        if not HAVE_TORCH:
            pytest.skip("bf16 inputs need torch")
        if a.dtype.name == "bfloat16":
            return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).cuda().view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(a)).cuda()
    return cp.asarray(a)


def to_host(a) -> np.ndarray:
    if HAVE_TORCH and isinstance(a, torch.Tensor):
        if a.dtype == torch.bfloat16:
            import ml_dtypes
            return a.view(torch.int16).cpu().numpy().view(ml_dtypes.bfloat16)
        return a.cpu().numpy()
    return cp.asnumpy(a)


def poisoned_like(x):
    """A NaN-filled array like x (same kind, dtype, shape)."""
    if HAVE_TORCH and isinstance(x, torch.Tensor):
        return torch.full_like(x, float("nan"))
    return cp.full(x.shape, np.nan, dtype=x.dtype)


@functools.lru_cache(maxsize=None)
def weights_for(name: str):
    """(logical weights, packed weights) of a spec, made once per session (big specs take
    seconds of host RNG and packing)."""
    spec = ALL_SPECS[name]
    _, w = reference.random_problem(spec, 0, seed=0)
    packed = kernel_for(name).pack(**reference.weight_kwargs(spec, w), router_layout="eh")
    return w, packed


def random_x(spec: MoESpec, T: int, seed: int) -> np.ndarray:
    """Fresh x [T, H] ~ N(0, 1) in the spec dtype (never zeros)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((T, spec.hidden_dim)).astype(np.float32).astype(spec.dt.numpy)


def problem(name: str, T: int, seed: int = 0, use_torch: bool = False):
    spec = ALL_SPECS[name]
    k = kernel_for(name)
    w, packed = weights_for(name)
    x = random_x(spec, T, seed)
    rng = np.random.default_rng(seed + 1)
    bias = (rng.standard_normal(spec.num_experts) * 0.1).astype(np.float32)
    return spec, k, x, w, packed, bias, to_device(x, use_torch)


# -- route ----------------------------------------------------------------------------------
def check_routing(spec, x, w, bias, ids, wts):
    """Kernel routing vs the reference: ids equal except where the reference's selection scores
    are tied within fp32 rounding (then the picked experts must be as good); weights close."""
    sel_bias = bias if spec.routing == "sigmoid_topk" else None
    logit_bias = None if spec.routing == "sigmoid_topk" else bias
    r_ids, r_w, probs, logits = reference.route(spec, x, w["router"], logit_bias, sel_bias)
    ids, wts = np.asarray(ids), np.asarray(wts)
    assert ids.dtype == np.int32 and ids.shape == r_ids.shape
    assert ((ids >= 0) & (ids < spec.num_experts)).all()
    T = len(ids)
    if spec.routing == "topk_softmax":
        choice = logits
    elif spec.routing == "sigmoid_topk":
        choice = probs + bias
    else:
        choice = probs
    differ = np.nonzero((ids != r_ids).any(axis=1))[0]
    group_tie = _group_ties(spec, choice)
    for t in differ:
        if group_tie[t]:
            continue        # the kept groups differ by fp32 rounding: the picks may differ too
        got = np.sort(choice[t, ids[t]])
        want = np.sort(choice[t, r_ids[t]])
        assert np.allclose(got, want, rtol=1e-4, atol=1e-6), (t, ids[t], r_ids[t])
    assert len(differ) <= max(2, T // 100), f"{len(differ)} of {T} tokens routed differently"
    same = np.setdiff1d(np.arange(T), differ)
    if len(same):
        np.testing.assert_allclose(wts[same], r_w[same], rtol=1e-4, atol=1e-6)


def _group_ties(spec, choice, rtol=1e-5):
    """Tokens whose topk_group-th and next best group scores (sum of a group's top two) are
    within float32 rounding: there the kernel may keep another group than the reference."""
    T = len(choice)
    if spec.n_group <= 1 or spec.topk_group >= spec.n_group:
        return np.zeros(T, dtype=bool)
    g = choice.reshape(T, spec.n_group, -1)
    top2 = -np.sort(-g, axis=2)[:, :, :2].sum(axis=2)
    s = -np.sort(-top2, axis=1)
    a, b = s[:, spec.topk_group - 1], s[:, spec.topk_group]
    return np.abs(a - b) <= rtol * np.abs(a)


@pytest.mark.parametrize("T", TOKENS + (4096,))
@pytest.mark.parametrize("name", list(SPECS))
def test_route(name, T):
    spec, k, x, w, packed, bias, xd = problem(name, T, seed=T)
    ids, wts = k.route(xd, packed, router_bias=cp.asarray(bias))
    check_routing(spec, x, w, bias, cp.asnumpy(ids), cp.asnumpy(wts))


@pytest.mark.parametrize("T", (1, 17, 300))
@pytest.mark.parametrize("name", ["e8-k2-h512-f2048-bf16-swiglu", "e128-k8-h2048-f256-bf16-swiglu",
                                  "e64-k6-h1000-f1408-fp16-geglu-topksm-bias",
                                  "e2-k1-h100-f1000-fp32-relu"])
def test_router_logit_kernels(name, T):
    """Every router GEMM kernel of the cubin (GEMV, SIMT tiles, tensor cores) gives x · Wrᵀ
    within fp32 accumulation error, one split over all of H."""
    spec, k, x, w, packed, bias, xd = problem(name, T, seed=T + 5)
    mod = k.module
    ws = mod.workspace(T)
    want = reference.router_logits(x, w["router"])
    xn = mod.native(arrays.describe(xd, "x"))
    names = ["moe_route_logits_gemv", "moe_route_logits_tiled"]
    if "moe_route_logits_mma" in mod.kernel_names():
        names.append("moe_route_logits_mma")
    r = mod.plan.route
    E, H = spec.num_experts, spec.hidden_dim
    for kname in names:
        ws.logits.fill(np.nan)
        fn = mod.function(kname)
        if kname.endswith("gemv"):
            fn((E, -(-T // r.gemv_tokens)), (r.gemv_threads,),
               (xn, packed.router, ws.logits, np.int32(T)))
        elif kname.endswith("mma"):
            fn((-(-T // r.tile_m), -(-E // r.tile_n), 1), (r.mma_threads,),
               (xn, packed.router, ws.logits, np.int32(T), np.int32(H)), shared_mem=r.mma_smem)
        else:
            fn((-(-T // r.tile_m), -(-E // r.tile_n), 1), (r.threads,),
               (xn, packed.router, ws.logits, np.int32(T), np.int32(H)))
        got = cp.asnumpy(ws.logits[:T * E]).reshape(T, E)
        err = reference.rel_error(got, want)
        assert err < 1e-5, f"{kname}: rel error {err:.2e}"


@pytest.mark.parametrize("name", ["e128-k8-h1408-f100-bf16-silu-raw-rs2.5",
                                  "e256-k8-h256-f128-bf16-sigmoid-g8-tg4-sh1",
                                  "e8-k2-h100-f100-fp32-gelu-bias"])
def test_route_nan_and_inf_give_valid_distinct_ids(name):
    spec, k, x, w, packed, bias, _ = problem(name, 40)
    x = x.copy()
    x[3, :] = np.nan
    x[5, 0] = np.inf
    x[7, :2] = [np.inf, -np.inf]
    ids, wts = k.route(to_device(x), packed)
    ids = cp.asnumpy(ids)
    assert ((ids >= 0) & (ids < spec.num_experts)).all()
    for row in ids:
        assert len(set(row.tolist())) == spec.top_k
    # the NaN token picks the lowest ids (NaN ranks like -inf, ties to the lower index)
    assert ids[3].tolist() == list(range(spec.top_k))


# -- group ----------------------------------------------------------------------------------
def check_group(spec, ids: np.ndarray, ws):
    T, K = ids.shape
    S = spec.num_shared_experts
    kt = K + S
    full = np.concatenate([ids, np.tile(np.arange(spec.num_experts, spec.num_experts + S), (T, 1))],
                          axis=1).astype(np.int64)
    counts, offsets, order = reference.group(full, spec.num_experts + S)
    np.testing.assert_array_equal(cp.asnumpy(ws.counts), counts[:spec.num_experts])
    np.testing.assert_array_equal(cp.asnumpy(ws.offsets), offsets[:spec.num_experts + 1])
    bm = ws.bucket.bm
    padded = -(-counts // bm) * bm
    pad_off = np.concatenate([[0], np.cumsum(padded)])
    want_rows = np.full(int(pad_off[-1]), -1, np.int64)
    for e in range(len(counts)):
        want_rows[pad_off[e]:pad_off[e] + counts[e]] = order[offsets[e]:offsets[e + 1]]
    n_tiles = int(cp.asnumpy(ws.num_tiles)[0])
    assert n_tiles == int(padded.sum() // bm) <= ws.max_tiles
    np.testing.assert_array_equal(cp.asnumpy(ws.sorted_rows)[:len(want_rows)], want_rows)
    te = np.repeat(np.arange(len(counts)), padded // bm)
    np.testing.assert_array_equal(cp.asnumpy(ws.tile_expert)[:n_tiles], te)
    np.testing.assert_array_equal(cp.asnumpy(ws.tile_row0)[:n_tiles], np.arange(n_tiles) * bm)
    assert kt * T == counts.sum()


@pytest.mark.parametrize("skew", ["uniform", "one-expert", "two-experts"])
@pytest.mark.parametrize("T", (1, 17, 1000, 4096, 20000))
@pytest.mark.parametrize("name", ["e8-k2-h512-f2048-bf16-swiglu", "e128-k8-h2048-f256-bf16-swiglu",
                                  "e256-k8-h256-f128-bf16-sigmoid-g8-tg4-sh1",
                                  "e2-k1-h100-f1000-fp32-relu"])
def test_group_stable_padded(name, T, skew):
    spec = SPECS[name]
    k = kernel_for(name)
    rng = np.random.default_rng(T)
    E, K = spec.num_experts, spec.top_k
    if skew == "uniform":
        ids = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int32)
    else:
        hot = [E - 1] if skew == "one-expert" else [0, E // 2]
        base = np.stack([rng.permutation(E)[:K] for _ in range(T)])
        base[:, 0] = rng.choice(hot, size=T)
        ids = base.astype(np.int32)
    mod = k.module
    ws = mod.workspace(T)
    for a in (ws.sorted_rows, ws.tile_expert, ws.tile_row0, ws.counts, ws.offsets):
        a.fill(-7)
    dev = cp.asarray(ids)
    mod.run_stage("group", ws, Call(x=dev, packed=None, out=None, tokens=T, topk_ids=dev))
    check_group(spec, ids, ws)


@pytest.mark.parametrize("T", (1, 5, 16))
@pytest.mark.parametrize("name", ["e8-k2-h512-f2048-bf16-swiglu", "e256-k8-h256-f128-bf16-sigmoid-g8-tg4-sh1",
                                  "e16-k2-h64-f64-fp16-sigmoid-sh2", "e64-k6-h1000-f1408-fp16-geglu-topksm-bias"])
def test_fused_route_group_at_decode_sizes(name, T):
    """Few tokens: one launch selects the experts and builds the grouped layout; both outputs
    match the reference (the routing) and the stable padded sort of that routing."""
    spec, k, x, w, packed, bias, xd = problem(name, T, seed=40 + T)
    ws = k.module.workspace(T)
    assert ws.shapes.fused_route_group
    for a in (ws.sorted_rows, ws.tile_expert, ws.tile_row0, ws.counts, ws.offsets):
        a.fill(-7)
    ids, wts = k.route(xd, packed, router_bias=cp.asarray(bias))
    check_routing(spec, x, w, bias, cp.asnumpy(ids), cp.asnumpy(wts))
    check_group(spec, cp.asnumpy(ids), ws)


# -- the whole layer ------------------------------------------------------------------------
def run_layer(name, T, seed=0, use_torch=False):
    spec, k, x, w, packed, bias, xd = problem(name, T, seed=seed, use_torch=use_torch)
    out = poisoned_like(xd)
    got = k(xd, packed, router_bias=cp.asarray(bias), out=out)
    assert got is out
    # route again (same kernel, same input: deterministic) to reference the experts on it,
    # so a legitimate near-tie flip in fp32 routing cannot fail the layer comparison
    ids, wts = k.route(xd, packed, router_bias=cp.asarray(bias))
    check_routing(spec, x, w, bias, cp.asnumpy(ids), cp.asnumpy(wts))
    ref, _ = reference.moe(spec, x, w, topk_ids=cp.asnumpy(ids), topk_weights=cp.asnumpy(wts))
    return spec, to_host(out), ref


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("name", list(SPECS))
def test_layer(name, T):
    spec, out, ref = run_layer(name, T, seed=100 + T)
    err = reference.rel_error(out, ref)
    assert err <= spec.dt.tolerance, f"rel error {err:.2e} > {spec.dt.tolerance:.0e}"


@pytest.mark.parametrize("name", LARGE_LAYER)
def test_layer_large(name):
    spec, out, ref = run_layer(name, 4096, seed=7)
    err = reference.rel_error(out, ref)
    assert err <= spec.dt.tolerance, f"rel error {err:.2e} > {spec.dt.tolerance:.0e}"


@pytest.mark.parametrize("name", ["e8-k2-h100-f100-fp32-gelu-bias", "e8-k2-h512-f2048-bf16-swiglu"])
def test_zero_tokens(name):
    spec, k, x, w, packed, bias, xd = problem(name, 0)
    out, stats = k(xd, packed, return_stats=True)
    assert tuple(out.shape) == (0, spec.hidden_dim)
    assert stats.tokens_per_expert.sum() == 0


@pytest.mark.parametrize("name", ["e64-k6-h1000-f1408-fp16-geglu-topksm-bias",
                                  "e256-k8-h256-f128-bf16-sigmoid-g8-tg4-sh1"])
def test_experts_with_caller_routing(name):
    spec = SPECS[name]
    T = 33
    _, k, x, w, packed, bias, xd = problem(name, T, seed=3)
    rng = np.random.default_rng(5)
    ids = np.stack([rng.permutation(spec.num_experts)[:spec.top_k] for _ in range(T)]).astype(np.int32)
    wts = rng.random((T, spec.top_k)).astype(np.float32)
    out = poisoned_like(xd)
    k.experts(xd, packed, cp.asarray(ids), cp.asarray(wts), out=out)
    ref, _ = reference.moe(spec, x, w, topk_ids=ids, topk_weights=wts)
    err = reference.rel_error(to_host(out), ref)
    assert err <= spec.dt.tolerance


@pytest.mark.parametrize("name", ["e8-k2-h512-f2048-bf16-swiglu", "e256-k8-h256-f128-bf16-sigmoid-g8-tg4-sh1",
                                  "e64-k6-h1000-f1408-fp16-geglu-topksm-bias"])
def test_stats(name):
    T = 300
    spec, k, x, w, packed, bias, xd = problem(name, T, seed=11)
    out, stats = k(xd, packed, router_bias=cp.asarray(bias), return_stats=True)
    ids, _ = k.route(xd, packed, router_bias=cp.asarray(bias))
    ids = cp.asnumpy(ids)
    sel = bias if spec.routing == "sigmoid_topk" else None
    lb = None if spec.routing == "sigmoid_topk" else bias
    _, _, probs, logits = reference.route(spec, x, w["router"], lb, sel)
    want = reference.stats(spec, np.bincount(ids.reshape(-1), minlength=spec.num_experts), probs, logits)
    np.testing.assert_array_equal(stats.tokens_per_expert, want["tokens_per_expert"])
    np.testing.assert_allclose(stats.router_prob_mean, want["router_prob_mean"], rtol=1e-4, atol=1e-7)
    assert stats.aux_loss == pytest.approx(want["aux_loss"], rel=1e-4)
    assert stats.z_loss == pytest.approx(want["z_loss"], rel=1e-4)


# -- expert capacity ------------------------------------------------------------------------
def skew_bias(spec: MoESpec) -> np.ndarray:
    """A router bias sending most tokens to expert 0 (and many to 1): experts overflow."""
    bias = np.zeros(spec.num_experts, np.float32)
    bias[0], bias[1] = 4.0, 2.0
    return bias


@pytest.mark.parametrize("T", TOKENS + (1000, 5000))
@pytest.mark.parametrize("name", list(CAP_SPECS))
def test_capacity_layer(name, T):
    """Skewed routing overflows expert 0: the layer, kept counts and dropped slots match the
    reference (5000 tokens take the multi-block group path)."""
    spec, k, x, w, packed, _, xd = problem(name, T, seed=200 + T)
    bias = skew_bias(spec)
    out = poisoned_like(xd)
    got, stats = k(xd, packed, router_bias=cp.asarray(bias), out=out, return_stats=True)
    assert got is out
    ids, wts = k.route(xd, packed, router_bias=cp.asarray(bias))
    ids, wts = cp.asnumpy(ids), cp.asnumpy(wts)
    check_routing(spec, x, w, bias, ids, wts)
    ref, info = reference.moe(spec, x, w, topk_ids=ids, topk_weights=wts)
    err = reference.rel_error(to_host(out), ref)
    assert err <= spec.dt.tolerance, f"rel error {err:.2e} > {spec.dt.tolerance:.0e}"
    if T >= 16:
        assert info["dropped"] > 0, "the skewed routing should overflow expert 0"
    assert stats.dropped == info["dropped"]
    np.testing.assert_array_equal(stats.tokens_per_expert, info["counts"])


def hot_routing(spec: MoESpec, T: int, rng, ties: bool = False):
    """Distinct expert ids per token, 80% of tokens with expert 0 in slot 0, and weights in
    [0, 1) (multiples of 1/4 when ``ties``)."""
    E, K = spec.num_experts, spec.top_k
    ids = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int32)
    for t in np.nonzero(rng.random(T) < 0.8)[0]:
        j = np.nonzero(ids[t] == 0)[0]
        if len(j):
            ids[t, j[0]], ids[t, 0] = ids[t, 0], ids[t, j[0]]
        else:
            ids[t, 0] = 0
    wts = rng.random((T, K)).astype(np.float32)
    if ties:
        wts = (np.floor(wts * 4) / 4).astype(np.float32)
    return ids, wts


def check_capacity_group(spec, ids: np.ndarray, kept: np.ndarray, ws):
    """The second group pass: the stable padded sort of the kept slots only."""
    T, K = ids.shape
    S = spec.num_shared_experts
    kt = K + S
    full = np.concatenate([ids, np.tile(np.arange(spec.num_experts, spec.num_experts + S), (T, 1))],
                          axis=1).astype(np.int64)
    keep = np.concatenate([kept, np.ones((T, S), bool)], axis=1).reshape(-1)
    flat = full.reshape(-1)
    bm = ws.bucket.bm
    rows = []
    counts = []
    for e in range(spec.num_experts + S):
        seg = np.nonzero((flat == e) & keep)[0]
        counts.append(len(seg))
        pad = -(-len(seg) // bm) * bm
        rows.append(np.concatenate([seg, -np.ones(pad - len(seg), np.int64)]))
    want = np.concatenate(rows)
    np.testing.assert_array_equal(cp.asnumpy(ws.counts), counts[:spec.num_experts])
    n_tiles = int(cp.asnumpy(ws.num_tiles)[0])
    assert n_tiles * bm == len(want)
    np.testing.assert_array_equal(cp.asnumpy(ws.sorted_rows)[:len(want)], want)
    te = np.repeat(np.arange(len(counts)), -(-np.array(counts) // bm))
    np.testing.assert_array_equal(cp.asnumpy(ws.tile_expert)[:n_tiles], te)
    np.testing.assert_array_equal(cp.asnumpy(ws.tile_row0)[:n_tiles], np.arange(n_tiles) * bm)
    assert kt * T >= sum(counts)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("T", (1, 17, 1000, 5000))
@pytest.mark.parametrize("name", list(CAP_SPECS))
def test_capacity_group_and_weights(name, T, ties):
    """The group stage alone on a caller routing with one hot expert (coarse weights when
    ``ties``, so the weight mode's tie-break to the lower slot matters): kept mask, dropped,
    renormalised weights and the regrouped layout vs the reference; the caller's weights are
    not modified."""
    spec = CAP_SPECS[name]
    k = kernel_for(name)
    K = spec.top_k
    ids, wts = hot_routing(spec, T, np.random.default_rng(T + 13 * ties), ties)
    mod = k.module
    ws = mod.workspace(T)
    for a in (ws.sorted_rows, ws.tile_expert, ws.tile_row0, ws.counts, ws.dropped):
        a.fill(-7)
    ws.kept.fill(7)
    dev, wdev = cp.asarray(ids), cp.asarray(wts)
    mod.run_stage("group", ws, Call(x=dev, packed=None, out=None, tokens=T, topk_ids=dev,
                                    topk_weights=wdev))
    ref_w, ref_kept, ref_dropped = reference.apply_capacity(spec, ids, wts)
    kept = cp.asnumpy(ws.kept).reshape(T, K)
    assert set(np.unique(kept).tolist()) <= {0, 1}
    np.testing.assert_array_equal(kept.astype(bool), ref_kept)
    assert int(cp.asnumpy(ws.dropped).sum()) == ref_dropped
    if T >= 17:
        assert ref_dropped > 0
    if spec.renormalize:
        np.testing.assert_allclose(cp.asnumpy(ws.cap_weights), ref_w, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(cp.asnumpy(wdev), wts)
    check_capacity_group(spec, ids, ref_kept, ws)


@pytest.mark.parametrize("name", list(CAP_SPECS))
def test_capacity_experts_with_caller_routing(name):
    spec = CAP_SPECS[name]
    T = 129
    _, k, x, w, packed, _, xd = problem(name, T, seed=4)
    ids, wts = hot_routing(spec, T, np.random.default_rng(6))
    out = poisoned_like(xd)
    k.experts(xd, packed, cp.asarray(ids), cp.asarray(wts), out=out)
    ref, info = reference.moe(spec, x, w, topk_ids=ids, topk_weights=wts)
    assert info["dropped"] > 0
    err = reference.rel_error(to_host(out), ref)
    assert err <= spec.dt.tolerance


def test_capacity_zero_tokens():
    name = "cap-e8-k2-h128-f256-fp32-token"
    spec, k, x, w, packed, bias, xd = problem(name, 0)
    out, stats = k(xd, packed, return_stats=True)
    assert tuple(out.shape) == (0, spec.hidden_dim)
    assert stats.tokens_per_expert.sum() == 0 and stats.dropped == 0


# -- launch properties ----------------------------------------------------------------------
def test_cuda_graph_capture_cupy_stream():
    """A call captured into a CUDA graph on a CuPy stream replays correctly on new inputs
    copied into the same buffers (no sync, no allocation inside the call)."""
    name = "e64-k6-h1000-f1408-fp16-geglu-topksm-bias"
    T = 64
    spec, k, x, w, packed, bias, xd = problem(name, T, seed=1)
    out = poisoned_like(xd)
    b = cp.asarray(bias)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        k(xd, packed, out=out, router_bias=b)       # first call of the bucket allocates
        stream.synchronize()
        stream.begin_capture()
        k(xd, packed, out=out, router_bias=b)
        graph = stream.end_capture()
        x2 = random_x(spec, T, seed=99)
        xd[...] = cp.asarray(x2)
        out.fill(np.nan)
        graph.launch()
        stream.synchronize()
    ids, wts = k.route(xd, packed, router_bias=b)
    ref, _ = reference.moe(spec, x2, w, topk_ids=cp.asnumpy(ids), topk_weights=cp.asnumpy(wts))
    assert reference.rel_error(to_host(out), ref) <= spec.dt.tolerance


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_cuda_graph_capture_torch():
    """torch tensors in: launches follow torch's current stream, so torch.cuda.graph captures
    the whole call."""
    name = "e8-k2-h512-f2048-bf16-swiglu"
    T = 16
    spec, k, x, w, packed, bias, xd = problem(name, T, seed=2)
    out = poisoned_like(xd)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        k(xd, packed, out=out)                      # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        k(xd, packed, out=out)
    x2 = random_x(spec, T, seed=98)
    xd.copy_(to_device(x2))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ids, wts = k.route(xd, packed)
    ref, _ = reference.moe(spec, x2, w, topk_ids=cp.asnumpy(ids), topk_weights=cp.asnumpy(wts))
    assert reference.rel_error(to_host(out), ref) <= spec.dt.tolerance


@functools.lru_cache(maxsize=None)
def tuned_kernel_for(name: str, tile: str) -> MoEKernel:
    """``name``'s kernel with its prefill bucket on tile ``tile`` (a tuning choice)."""
    from moegen.backends import get_backend
    from moegen.backends.base import Artifact
    from moegen.plan import make_plan
    from moegen.render import render
    spec = _resolved(ALL_SPECS[name])
    be = get_backend("cuda")
    plan = make_plan(spec, spec.arch, {"tile_bm128": tile}, sms=be.sm_count(spec.arch))
    art = be.compile(render(plan), spec, spec.arch, "test")
    return MoEKernel(spec, be.load(Artifact(art.binary, art.meta), plan), art.meta)


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_persistent_prefill_graph_capture_bitwise_repeats_no_allocation():
    """The persistent "wgmma_ws" prefill kernels (tensor maps as kernel parameters, tile
    counters in the workspace) in the whole layer: against the float64 reference, eager calls
    repeat bit for bit, the tile counters are back at 0, calls after the first allocate
    nothing, and a captured call replays correctly on new inputs."""
    from moegen.backends import cuda_tiles
    name = "e8-k2-h512-f2048-bf16-swiglu"
    T = 3001                                        # prefill bucket, more tiles than SMs
    spec, _, x, w, packed, bias, xd = problem(name, T, seed=3)
    if not cuda_tiles.use_ws(spec, _resolved(spec).arch):
        pytest.skip("the persistent kernel needs sm_90a")
    k = tuned_kernel_for(name, cuda_tiles.WS_TILES[128].tag)
    packed = k.pack(**reference.weight_kwargs(spec, w), router_layout="eh")
    ws = k.module.workspace(T)
    assert ws.bucket.ffn1.kind == "wgmma_ws"
    assert ws.bucket.max_tokens is None
    outs = []
    for _ in range(3):
        out = poisoned_like(xd)
        k(xd, packed, out=out)
        torch.cuda.synchronize()
        outs.append(out)
    assert all(torch.equal(o.view(torch.int16), outs[0].view(torch.int16)) for o in outs[1:])
    assert ws.sched1.tolist() == ws.sched2.tolist() == [0] * k.module.plan.ws.counters
    ids, wts = k.route(xd, packed)
    ref, _ = reference.moe(spec, x, w, topk_ids=cp.asnumpy(ids), topk_weights=cp.asnumpy(wts))
    assert reference.rel_error(to_host(outs[0]), ref) <= spec.dt.tolerance
    hook = _CountAllocs()
    with hook:
        k(xd, packed, out=outs[1])
        torch.cuda.synchronize()
    assert hook.count == 0
    out = outs[0]
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        k(xd, packed, out=out)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        k(xd, packed, out=out)
    x2 = random_x(spec, T, seed=97)
    xd.copy_(to_device(x2))
    out.fill_(float("nan"))
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    ids, wts = k.route(xd, packed)
    ref, _ = reference.moe(spec, x2, w, topk_ids=cp.asnumpy(ids), topk_weights=cp.asnumpy(wts))
    assert reference.rel_error(to_host(out), ref) <= spec.dt.tolerance


class _CountAllocs(cp.cuda.MemoryHook):
    name = "count_allocs"

    def __init__(self):
        self.count = 0

    def malloc_preprocess(self, **kwargs):
        self.count += 1


@pytest.mark.parametrize("name", ["e8-k2-h512-f2048-bf16-swiglu", "e2-k1-h100-f1000-fp32-relu",
                                  "e128-k8-h2048-f256-bf16-swiglu"])
def test_no_allocation_after_first_call_of_a_bucket(name):
    spec = SPECS[name]
    k = kernel_for(name)
    cases = []
    for T in (1, 5, 100, 3000):
        _, _, x, w, packed, bias, xd = problem(name, T, seed=T)
        cases.append((xd, packed, poisoned_like(xd), cp.asarray(bias)))
    for xd, packed, out, b in cases:
        k(xd, packed, out=out, router_bias=b)      # first call per bucket may allocate
    cp.cuda.Device().synchronize()
    hook = _CountAllocs()
    with hook:
        for _ in range(3):
            for xd, packed, out, b in cases:
                k(xd, packed, out=out, router_bias=b)
    cp.cuda.Device().synchronize()
    assert hook.count == 0, f"{hook.count} device allocations in calls after the first"


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_torch_in_torch_out_on_torch_stream():
    name = "e64-k6-h1000-f1408-fp16-geglu-topksm-bias"
    T = 129
    spec, k, x, w, packed, bias, xd = problem(name, T, seed=21, use_torch=True)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        xs = xd.clone()
        y = k(xs, packed)
    s.synchronize()
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float16 and y.device == xd.device
    ids, wts = k.route(xd, packed)
    ref, _ = reference.moe(spec, x, w, topk_ids=cp.asnumpy(ids), topk_weights=cp.asnumpy(wts))
    assert reference.rel_error(to_host(y), ref) <= spec.dt.tolerance


# -- bad input: rejected before any launch, nothing written ----------------------------------
def test_bad_inputs_rejected_and_out_untouched():
    name = "e8-k2-h100-f100-fp32-gelu-bias"
    spec, k, x, w, packed, bias, xd = problem(name, 20)
    out = poisoned_like(xd)
    with pytest.raises(TypeError, match="x"):
        k(xd.astype(cp.float16), packed, out=out)
    with pytest.raises(ValueError, match="x"):
        k(xd[:, :50].copy(), packed, out=out)
    with pytest.raises(ValueError, match="out"):
        k(xd, packed, out=cp.full((21, spec.hidden_dim), np.nan, cp.float32))
    with pytest.raises(ValueError, match="router_bias"):
        k(xd, packed, out=out, router_bias=cp.zeros(spec.num_experts + 1, cp.float32))
    with pytest.raises(ValueError, match="host"):
        k(x, packed, out=out)
    shifted = cp.empty(20 * spec.hidden_dim + 1, cp.float32)[1:].reshape(20, spec.hidden_dim)
    shifted[...] = xd
    with pytest.raises(ValueError, match="aligned"):
        k(shifted, packed, out=out)
    bad = np.zeros((20, spec.top_k), np.int32)
    bad[4, 1] = spec.num_experts
    with pytest.raises(ValueError, match="topk_ids"):
        k.experts(xd, packed, cp.asarray(bad), cp.ones((20, spec.top_k), cp.float32), out=out)
    bad[4, 1] = -1
    with pytest.raises(ValueError, match="topk_ids"):
        k.experts(xd, packed, cp.asarray(bad), cp.ones((20, spec.top_k), cp.float32), out=out)
    cp.cuda.Device().synchronize()
    assert bool(cp.isnan(out).all()), "a rejected call wrote to out"


# -- the recorded launch programs (moegen.backends.cuda_launch) ------------------------------
def _direct_layer(k, xd, packed, out, bias):
    """The layer through the direct path (each stage launched by CuPy's RawKernel, on CuPy
    views of the arrays), as before launches were recorded and replayed."""
    from moegen.backends.base import Call
    mod = k.module
    T = int(np.prod(xd.shape[:-1]))
    w = k._check_weights(packed)
    call = Call(x=mod.native(arrays.describe(xd, "x")), packed=w,
                out=mod.native(arrays.describe(out, "out")), tokens=T,
                router_bias=None if bias is None else mod.native(arrays.describe(bias, "router_bias")))
    ws = mod.workspace(T)
    for stage in k.stages:
        mod.run_stage(stage, ws, call)


@pytest.mark.parametrize("name", ["e8-k2-h512-f2048-bf16-swiglu", "e64-k6-h1000-f1408-fp16-geglu-topksm-bias",
                                  "cap-e16-k4-h256-f128-bf16-token-raw", "e2-k1-h100-f1000-fp32-relu"])
def test_replayed_calls_follow_new_arrays_weights_and_token_counts(name):
    """Calls replay recorded launch programs: token counts interleaved across buckets, and on
    every call new x / out / router_bias arrays and the other of two packed weights, so each
    replay must read the pointers of its own call.  Every output (NaN-poisoned first) against
    the float64 reference, and bitwise equal to the direct RawKernel path's."""
    spec = ALL_SPECS[name]
    k = kernel_for(name)
    w1, packed1 = weights_for(name)
    _, w2 = reference.random_problem(spec, 0, seed=5)
    packed2 = k.pack(**reference.weight_kwargs(spec, w2), router_layout="eh")
    counts = (1, 17, 1, 300, 16, 17, 1, 129, 300) + ((3000, 1) if name in LARGE_LAYER else ())
    for i, T in enumerate(counts):
        w, packed = (w1, packed1) if i % 2 else (w2, packed2)
        x = random_x(spec, T, seed=300 + i)
        xd = to_device(x)
        bias = (np.random.default_rng(i).standard_normal(spec.num_experts) * 0.1).astype(np.float32)
        b = cp.asarray(bias) if i % 3 else None
        out = poisoned_like(xd)
        assert k(xd, packed, out=out, router_bias=b) is out
        ids, wts = k.route(xd, packed, router_bias=b)
        ref, _ = reference.moe(spec, x, w, topk_ids=cp.asnumpy(ids), topk_weights=cp.asnumpy(wts))
        err = reference.rel_error(to_host(out), ref)
        assert err <= spec.dt.tolerance, (T, i, err)
        direct = poisoned_like(xd)
        _direct_layer(k, xd, packed, direct, b)
        cp.cuda.Device().synchronize()
        assert to_host(direct).tobytes() == to_host(out).tobytes(), (T, i)


def test_graph_captures_a_replay_with_other_pointers():
    """A capture after the call shape was recorded with other arrays: the captured launches
    read the captured call's arrays (new x and out), and replay correctly on new inputs."""
    name = "e64-k6-h1000-f1408-fp16-geglu-topksm-bias"
    T = 1
    spec, k, x, w, packed, bias, xd = problem(name, T, seed=4)
    k(xd, packed, out=poisoned_like(xd))                 # recorded with these pointers
    cp.cuda.Device().synchronize()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        x2d = cp.asarray(random_x(spec, T, seed=5))
        out = poisoned_like(x2d)
        stream.begin_capture()
        k(x2d, packed, out=out)
        graph = stream.end_capture()
        x3 = random_x(spec, T, seed=6)
        x2d[...] = cp.asarray(x3)
        graph.launch()
        stream.synchronize()
    ids, wts = k.route(x2d, packed)
    ref, _ = reference.moe(spec, x3, w, topk_ids=cp.asnumpy(ids), topk_weights=cp.asnumpy(wts))
    assert reference.rel_error(to_host(out), ref) <= spec.dt.tolerance


def test_experts_and_stats_replay_with_new_routing_arrays():
    """experts() with caller routing (topk arrays as pointers) and return_stats (a memset in
    the program): each call's own arrays, against the reference, three calls in a row."""
    name = "e64-k6-h1000-f1408-fp16-geglu-topksm-bias"
    T = 33
    spec, k, x, w, packed, bias, xd = problem(name, T, seed=8)
    for seed in (1, 2, 3):
        rng = np.random.default_rng(seed)
        ids = np.stack([rng.permutation(spec.num_experts)[:spec.top_k] for _ in range(T)]).astype(np.int32)
        wts = rng.random((T, spec.top_k)).astype(np.float32)
        out = poisoned_like(xd)
        k.experts(xd, packed, cp.asarray(ids), cp.asarray(wts), out=out)
        ref, _ = reference.moe(spec, x, w, topk_ids=ids, topk_weights=wts)
        assert reference.rel_error(to_host(out), ref) <= spec.dt.tolerance
        _, stats = k(xd, packed, return_stats=True)
        r_ids, _ = k.route(xd, packed)
        counts = np.bincount(cp.asnumpy(r_ids).reshape(-1), minlength=spec.num_experts)
        np.testing.assert_array_equal(stats.tokens_per_expert, counts)
