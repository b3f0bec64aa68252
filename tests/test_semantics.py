"""The semantics real models need, on the c backend against the float64 reference: DeepSeek-V2's
grouped softmax selection (group_limited_greedy), GPT-OSS's clamped SwiGLU and a float32 router
beside bf16/fp16 experts, fp32 and bf16 (and fp16),
token counts 0, 1, odd and at the tile/route-chunk boundaries; their spec validation; and that
the cuda backend plans them (tests/test_cuda_semantics.py runs them there)."""

import numpy as np
import pytest

import moegen
from moegen import MoESpec
from moegen import reference as R
from moegen.backends import isa
from moegen.errors import SpecError
from moegen.jit import clear_memo
from moegen.plan import make_plan

pytestmark = pytest.mark.usefixtures("module_cache")

TOKENS = (0, 1, 3, 4, 7, 63, 64, 65, 200)

GROUPED = dict(num_experts=16, top_k=3, hidden_dim=40, ffn_dim=24, routing="softmax_topk",
               n_group=4, topk_group=2, renormalize=False, routed_scaling_factor=1.5)
CLAMPED = dict(num_experts=8, top_k=2, hidden_dim=37, ffn_dim=29, activation="swiglu_clamped",
               routing="topk_softmax", bias=True)
SHARED_GATE = dict(num_experts=8, top_k=2, hidden_dim=45, ffn_dim=31, num_shared_experts=2,
                   shared_expert_gate=True)
ROUTER32 = dict(num_experts=8, top_k=2, hidden_dim=70, ffn_dim=33, router_dtype="float32")
SPECS = [pytest.param(MoESpec(**kw, dtype=dt, backend="c"), id=f"{name}-{dt}")
         for name, kw in (("grouped", GROUPED), ("clamped", CLAMPED), ("router32", ROUTER32),
                          ("shared-gate", SHARED_GATE))
         for dt in ("float32", "bfloat16")] + [
    pytest.param(MoESpec(**ROUTER32, dtype="float16", backend="c"), id="router32-float16")]


def _problem(spec, T, seed):
    x, w = R.random_problem(spec, T, seed=seed)
    if spec.activation == "swiglu_clamped":
        # gate and up pre-activations well beyond the limit of 7, both signs, so the clamps act
        for name in ("w1", "w3"):
            w[name] = (w[name].astype(np.float32) * 9.0).astype(spec.dt.numpy)
    return x, w


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("T", TOKENS)
def test_layer_matches_reference(spec, T):
    kernel = moegen.compile(spec)
    x, w = _problem(spec, T, seed=T + 11)
    weights = kernel.pack(**R.weight_kwargs(spec, w))
    bias = (np.random.default_rng(T).standard_normal(spec.num_experts) * 0.1).astype(np.float32)
    out = np.full((T, spec.hidden_dim), np.nan, dtype=spec.dt.numpy)
    y = kernel(x, weights, router_bias=bias, out=out)
    assert y is out
    if T == 0:
        return
    ids, wts, probs, logits = R.route(spec, x, w["router"], router_bias=bias)
    got_ids, got_w = kernel.route(x, weights, router_bias=bias)
    if spec.n_group > 1:
        # a near tie between two groups' best scores also changes the pick
        best = np.sort(probs.reshape(T, spec.n_group, -1).max(axis=2), axis=1)[:, ::-1]
        gap = best[:, spec.topk_group - 1] - best[:, spec.topk_group]
        kept = np.isfinite(R._keep_groups(spec, probs, lambda g: g[..., 0]))
        keep = ~R.near_ties(np.where(kept, probs, -np.inf), spec.top_k, tol=1e-4) & (gap > 1e-5)
    else:
        keep = ~R.near_ties(logits, spec.top_k, tol=1e-4)
    assert keep.mean() > 0.9
    np.testing.assert_array_equal(np.sort(got_ids[keep], 1), np.sort(ids[keep], 1))
    np.testing.assert_array_equal(got_ids[keep], ids[keep])
    np.testing.assert_allclose(got_w[keep], wts[keep], rtol=1e-5, atol=1e-6)
    ref = R.experts(spec, x, w, ids, wts)
    err = R.rel_error(y[keep], ref[keep])
    assert err <= spec.dt.tolerance, f"rel error {err:.3g} > {spec.dt.tolerance}"


def test_float32_router_keeps_a_near_tie_as_the_model_does():
    """Two experts whose logits differ by less than one bf16 step: transformers' float32 router
    tells them apart; a router rounded to bf16 would make them tie (and pick the lower id)."""
    H = 8
    bf16 = R.random_problem(MoESpec(4, 1, H, 4, dtype="bfloat16"), 1)[0].dtype
    x = np.zeros((1, H), dtype=np.float32)
    x[0, 0] = 1.0
    router = np.zeros((4, H), dtype=np.float32)
    router[:, 0] = [0.1, 1.0, 1.001, -0.3]        # 1.0 and 1.001 round to the same bf16 value
    assert router[1, 0].astype(bf16) == router[2, 0].astype(bf16)
    want, *_ = R.route(MoESpec(4, 1, H, 4), x, router)
    assert want[0, 0] == 2
    w = dict(w1=np.ones((4, 4, H)), w3=np.ones((4, 4, H)), w2=np.ones((4, H, 4)))
    xb = x.astype(bf16)
    for router_dtype, expect in (("float32", 2), (None, 1)):
        spec = MoESpec(4, 1, H, 4, dtype="bfloat16", router_dtype=router_dtype, backend="c")
        kernel = moegen.compile(spec)
        weights = kernel.pack(router=router, router_layout="eh", **w)
        assert weights.router.dtype == (np.float32 if router_dtype else bf16)
        ids, _ = kernel.route(xb, weights)
        assert ids[0, 0] == expect, router_dtype


def test_float32_router_is_the_storage_dtype_spelled_once():
    assert MoESpec(8, 2, 16, 8, router_dtype="float32").router_dtype is None
    assert "r32" in MoESpec(8, 2, 16, 8, dtype="bf16", router_dtype="float32").name


def test_grouped_softmax_keeps_only_the_best_groups():
    """Group score = the group's best softmax score (not the sum of two, as sigmoid_topk): a
    group with one strong expert beats a group with two fairly good ones."""
    spec = MoESpec(8, 2, 8, 4, n_group=4, topk_group=1, backend="c")
    router = np.zeros((8, 8), dtype=np.float32)
    x = np.zeros((1, 8), dtype=np.float32)
    x[0, 0] = 1.0
    router[:, 0] = [3.0, -5.0, 2.5, 2.5, -5, -5, -5, -5]   # group 0: {3, -5}, group 1: {2.5, 2.5}
    ids, *_ = R.route(spec, x, router)
    assert sorted(ids[0].tolist()) == [0, 1]               # only group 0 is kept
    sig = spec.replace(routing="sigmoid_topk")
    ids_sig, *_ = R.route(sig, x, router)
    assert sorted(ids_sig[0].tolist()) == [2, 3]           # the sum of two picks group 1
    kernel = moegen.compile(spec)
    got, _ = kernel.route(x, kernel.pack(router=router, router_layout="eh", w1=np.ones((8, 4, 8), np.float32),
                                         w3=np.ones((8, 4, 8), np.float32),
                                         w2=np.ones((8, 8, 4), np.float32)))
    assert sorted(got[0].tolist()) == [0, 1]


def test_clamped_swiglu_reference_formula():
    g = np.array([-10.0, -1.0, 0.5, 7.0, 12.0, np.nan])
    u = np.array([-9.0, 8.0, 0.25, -7.5, 3.0, 1.0])
    got = R.clamped_swiglu(g, u, 1.702, 7.0)
    gc = np.minimum(g, 7.0)
    want = gc / (1 + np.exp(-1.702 * gc)) * (np.clip(u, -7, 7) + 1)
    np.testing.assert_allclose(got[:5], want[:5], rtol=1e-15)
    assert got[4] == pytest.approx(7.0 / (1 + np.exp(-1.702 * 7.0)) * 4.0)
    assert np.isnan(got[5])


@pytest.mark.parametrize("kwargs,words", [
    (dict(n_group=2, topk_group=1, routing="topk_softmax"), "n_group > 1 needs routing"),
    (dict(swiglu_alpha=1.5), "swiglu_alpha applies to activation='swiglu_clamped' only"),
    (dict(activation="swiglu_clamped", swiglu_limit=-1.0), r"swiglu_limit must be in \(0.0"),
    (dict(router_dtype="float16"), "router_dtype must be None"),
    (dict(shared_expert_gate=True), "needs num_shared_experts >= 1 and bias=False"),
    (dict(shared_expert_gate=True, num_shared_experts=1, bias=True), "got num_shared_experts=1, bias=True"),
    (dict(shared_expert_gate=1, num_shared_experts=1), "shared_expert_gate must be True or False"),
])
def test_bad_fields_are_refused_in_one_line(kwargs, words):
    with pytest.raises(SpecError, match=words) as info:
        MoESpec(8, 2, 16, 8, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs", [GROUPED, CLAMPED, SHARED_GATE, dict(ROUTER32, dtype="bfloat16")])
def test_cuda_plans_the_new_semantics(kwargs):
    """The cuda backend takes them (tests/test_cuda_semantics.py compiles and runs them)."""
    spec = MoESpec(**kwargs, backend="cuda", arch="sm_90")
    plan = make_plan(spec)
    assert plan.spec == spec and plan.detail.kernels


def test_names_differ():
    a = MoESpec(8, 2, 16, 8, activation="swiglu_clamped")
    assert a.name != MoESpec(8, 2, 16, 8).name
    assert "a1p5" in a.replace(swiglu_alpha=1.5).name
    assert MoESpec(8, 2, 16, 8, n_group=2, topk_group=1).name != MoESpec(8, 2, 16, 8).name


@pytest.mark.parametrize("kwargs", [CLAMPED, SHARED_GATE])
def test_the_backward_refuses_what_it_has_no_gradient_for(kwargs):
    from moegen.backward import MoEBackward
    with pytest.raises(ValueError, match="MoEBackward has no gradient for") as info:
        MoEBackward(MoESpec(**kwargs, backend="c"))
    assert "\n" not in str(info.value)


ALL = dict(num_experts=16, top_k=3, hidden_dim=70, ffn_dim=40, dtype="bfloat16",
           activation="swiglu_clamped", n_group=4, topk_group=2, router_dtype="float32",
           num_shared_experts=1, shared_expert_gate=True, backend="c")


@pytest.mark.parametrize("tier", sorted(isa.TIERS))
def test_every_isa_tier_computes_the_new_semantics(tier, monkeypatch):
    """All four at once, on each ISA tier this CPU runs (its own SIMD width, register tile
    and bf16 conversion path), against the reference."""
    if not isa.runnable(isa.TIERS[tier]):
        pytest.skip(f"this CPU cannot run {tier}")
    monkeypatch.setenv("MOEGEN_ISA", tier)
    clear_memo()
    spec = MoESpec(**ALL)
    kernel = moegen.compile(spec)
    assert kernel.target == tier
    T = 65
    x, w = _problem(spec, T, seed=5)
    weights = kernel.pack(**R.weight_kwargs(spec, w))
    out = np.full((T, spec.hidden_dim), np.nan, dtype=spec.dt.numpy)
    kernel(x, weights, out=out)
    ids, wts, probs, _ = R.route(spec, x, w["router"])
    got_ids, _ = kernel.route(x, weights)
    keep = np.all(got_ids == ids, axis=1)
    assert keep.mean() > 0.9
    ref = R.experts(spec, x, w, ids, wts)
    assert R.rel_error(out[keep], ref[keep]) <= spec.dt.tolerance
    clear_memo()
