"""The semantics real models need, on the cuda backend: DeepSeek-V2's grouped softmax selection
(group_limited_greedy), GPT-OSS's clamped SwiGLU (with and without biases), Qwen2-MoE's
sigmoid-gated shared expert and a float32 router beside bf16/fp16 experts.

* CPU: the plan takes them (no refusal) and picks the kernels they need.
* nvrtc: every kernel of their cubins compiles for sm_90 and sm_90a (every GEMM kind: SIMT,
  mma.sync, wgmma and the persistent warp-specialised kernel).
* gpu: the whole layer, the routing and the experts-only call against the float64 reference,
  fp16, bf16 (and fp32 for the SIMT path), on fresh random inputs with NaN-poisoned outputs, at
  T = 1, 7, odd counts and both sides of every token-count bucket of the plan; the kernel
  picks the reference's expert ids except where the reference's own scores tie within fp32
  rounding.
"""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import multiprocessing
import re

import numpy as np
import pytest

import moegen
from moegen import reference as R
from moegen.backends import cuda_tiles
from moegen.backends.cuda import CudaBackend
from moegen.layout import logical_weights, pack_device, pack_host
from moegen.plan import make_plan
from moegen.render import render
from moegen.spec import MoESpec

pytestmark = pytest.mark.usefixtures("module_cache")

BE = CudaBackend()

GROUPED = dict(n_group=8, topk_group=3, renormalize=False, routed_scaling_factor=1.5)
ALL4 = dict(activation="swiglu_clamped", n_group=4, topk_group=2, router_dtype="float32",
            num_shared_experts=1, shared_expert_gate=True)

# name -> spec (backend cuda; arch None = the device's own target, sm_90a on Hopper)
SPECS = {
    # DeepSeek-V2's group_limited_greedy: mma decode/mid buckets, wgmma_ws prefill on sm_90a
    "grouped-e64-k6-h512-f256-bf16": MoESpec(64, 6, 512, 256, dtype="bfloat16", **GROUPED),
    "grouped-e16-k3-h40-f24-fp16": MoESpec(16, 3, 40, 24, dtype="float16", n_group=4, topk_group=2),
    "grouped-e16-k3-h40-f24-fp32": MoESpec(16, 3, 40, 24, dtype="float32", n_group=4, topk_group=2),
    # GPT-OSS: clamped SwiGLU with biases (no persistent kernel: it reads no bias), without
    # biases (the persistent kernel's epilogue), on plain sm_90 (mma.sync prefill), fp32 SIMT
    "clamped-e32-k4-h256-f256-bf16-topksm-bias": MoESpec(
        32, 4, 256, 256, dtype="bfloat16", activation="swiglu_clamped", routing="topk_softmax",
        bias=True),
    "clamped-e8-k2-h256-f512-fp16": MoESpec(8, 2, 256, 512, dtype="float16",
                                            activation="swiglu_clamped"),
    "clamped-e8-k2-h256-f512-bf16-bias-sm90": MoESpec(8, 2, 256, 512, dtype="bfloat16",
                                                      activation="swiglu_clamped", bias=True,
                                                      arch="sm_90"),
    "clamped-e8-k2-h37-f29-fp32-topksm-bias": MoESpec(
        8, 2, 37, 29, dtype="float32", activation="swiglu_clamped", routing="topk_softmax",
        bias=True),
    # Qwen2-MoE's gated shared experts: tensor cores, odd H (one-element vectors), capacity
    "gate-e16-k4-h256-f128-bf16-sh2": MoESpec(16, 4, 256, 128, dtype="bfloat16",
                                              num_shared_experts=2, shared_expert_gate=True),
    "gate-e8-k2-h45-f31-fp16-sh1": MoESpec(8, 2, 45, 31, dtype="float16", num_shared_experts=1,
                                           shared_expert_gate=True),
    "gate-e16-k2-h256-f128-bf16-sh1-cap": MoESpec(16, 2, 256, 128, dtype="bfloat16",
                                                  num_shared_experts=1, shared_expert_gate=True,
                                                  capacity_factor=1.25),
    "gate-e8-k2-h64-f48-fp32-sh1": MoESpec(8, 2, 64, 48, dtype="float32", num_shared_experts=1,
                                           shared_expert_gate=True),
    # a float32 router beside 16-bit experts (the SIMT router GEMM and GEMV read it)
    "router32-e16-k2-h512-f256-bf16": MoESpec(16, 2, 512, 256, dtype="bfloat16",
                                              router_dtype="float32"),
    "router32-e8-k2-h70-f33-fp16": MoESpec(8, 2, 70, 33, dtype="float16", router_dtype="float32"),
    # all four at once
    "all-e16-k3-h128-f64-bf16": MoESpec(16, 3, 128, 64, dtype="bfloat16", **ALL4),
    "all-e16-k3-h128-f64-fp16": MoESpec(16, 3, 128, 64, dtype="float16", **ALL4),
}


def _cuda(spec: MoESpec) -> MoESpec:
    return spec.replace(backend="cuda")


# -- CPU: the plan ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SPECS))
def test_plan_takes_the_semantics(name):
    spec = _cuda(SPECS[name])
    for arch in ("sm_90", "sm_90a"):
        plan = make_plan(spec.replace(arch=arch), arch, {}).detail
        # the tensor-core router GEMM reads 16-bit routers only
        want_route_mma = bool(spec.dt.cuda_mma) and plan.tensor_cores and spec.router_dtype is None
        assert plan.route.tensor_cores == want_route_mma
        assert ("moe_route_logits_mma" in plan.kernels) == want_route_mma


def test_rendered_source_has_what_each_semantic_needs():
    def src(spec):
        plan = make_plan(_cuda(spec).replace(arch="sm_90a"), "sm_90a", {})
        return render(plan).files["moe.cu"]
    grouped = src(SPECS["grouped-e64-k6-h512-f256-bf16"])
    assert "constexpr bool kGroupScoreTop2 = false;" in grouped
    sig = src(MoESpec(64, 6, 512, 256, dtype="bfloat16", routing="sigmoid_topk", n_group=8,
                      topk_group=3))
    assert "constexpr bool kGroupScoreTop2 = true;" in sig
    clamped = src(SPECS["clamped-e8-k2-h256-f512-fp16"])
    assert "constexpr float kSwigluAlpha = 1.702f;" in clamped
    assert "constexpr float kSwigluLimit = 7.0f;" in clamped
    assert "act_silu_clamped" not in src(MoESpec(8, 2, 256, 512, dtype="float16"))
    gate = src(SPECS["gate-e16-k4-h256-f128-bf16-sh2"])
    assert "kOffSharedGate" in gate and "kOffSharedGate" not in grouped
    r32 = src(SPECS["router32-e16-k2-h512-f256-bf16"])
    assert "typedef float router_t;" in r32 and "moe_route_logits_mma" not in r32
    assert "typedef unsigned short router_t;" in grouped


@pytest.mark.parametrize("name", ["router32-e16-k2-h512-f256-bf16", "all-e16-k3-h128-f64-fp16",
                                  "gate-e16-k4-h256-f128-bf16-sh2"])
def test_pack_device_keeps_the_float32_router_and_the_gate(name):
    """`pack_device` (the GPU packer, here over NumPy) gives pack_host's bytes for the cuda
    layout: the router in router_zeros' float32, the gate in the shared experts' blocks."""
    spec = _cuda(SPECS[name]).replace(arch="sm_90")
    lay = cuda_tiles.packed_layout(spec)
    _, w = R.random_problem(spec, 0, seed=6)
    logical = logical_weights(spec, **R.weight_kwargs(spec, w), router_layout="eh")
    buf, router = pack_host(lay, logical)
    dbuf, drouter = pack_device(lay, logical, lambda shape: np.zeros(shape, spec.dt.numpy),
                                lambda shape: np.zeros(shape, spec.router_dt.numpy))
    np.testing.assert_array_equal(dbuf.view(np.uint8), buf.view(np.uint8))
    assert drouter.dtype == router.dtype == spec.router_dt.numpy
    np.testing.assert_array_equal(drouter, router)
    if spec.shared_expert_gate:
        gate = buf.reshape(lay.num_slots_experts, -1)[:, lay.offsets["gate"]:][:, :spec.hidden_dim]
        assert not gate[:spec.num_experts].any()
        np.testing.assert_array_equal(gate[spec.num_experts:].astype(np.float32),
                                      np.broadcast_to(w["shared_gate"].astype(np.float32),
                                                      (spec.num_shared_experts, spec.hidden_dim)))


# -- nvrtc: every kernel compiles for sm_90 and sm_90a ----------------------------------------
# Kernels this change touches (route, ffn1 epilogues, combine): they must not spill.
TOUCHED = ("moe_route_", "moe_ffn1_", "moe_combine")


@pytest.mark.nvrtc
@pytest.mark.parametrize("arch", ["sm_90", "sm_90a"])
@pytest.mark.parametrize("name", list(SPECS))
def test_cubin_compiles(name, arch):
    """The whole cubin through NVRTC with the backend's options: every kernel of the plan is
    in it, the GEMM kinds the spec should get are there, the touched kernels do not spill."""
    try:
        from cupy_backends.cuda.libs import nvrtc
    except Exception:  # noqa: BLE001 - no CuPy: skip
        pytest.skip("CuPy/NVRTC not installed")
    spec = _cuda(SPECS[name]).replace(arch=arch)
    plan = make_plan(spec, arch, {})
    sources = render(plan)
    prog = nvrtc.createProgram(sources.files[sources.entry], sources.entry, [], [])
    try:
        nvrtc.compileProgram(prog, BE.options(spec, arch) + ["--ptxas-options=-v"])
    except nvrtc.NVRTCError:
        pytest.fail(nvrtc.getProgramLog(prog))
    cubin, log = nvrtc.getCUBIN(prog), nvrtc.getProgramLog(prog)
    for kname in plan.detail.kernels:
        assert kname.encode() in cubin, kname
    entries = re.findall(r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores", log, re.S)
    assert {e for e, _ in entries} >= set(plan.detail.kernels)
    spilled = [(e, n) for e, n in entries if e.startswith(TOUCHED) and n != "0"]
    assert not spilled, log
    kinds = {t.kind for b in plan.detail.buckets for t in (b.ffn1, b.ffn2)}
    if spec.dt.cuda_mma and spec.hidden_dim % 8 == 0 and spec.ffn_dim % 8 == 0:
        assert "mma" in kinds
        if arch == "sm_90a":
            assert kinds & {"wgmma", "wgmma_ws"}
    else:
        assert kinds == {"simt"}


# -- gpu ----------------------------------------------------------------------------------------
def _gpu_or_skip():
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # noqa: BLE001 - no CuPy / driver / device
        pass
    pytest.skip("needs CuPy and a CUDA device")


def _warm(spec_dict: dict) -> str:
    """Compile one spec into the (inherited) MOEGEN_CACHE_DIR, in a worker process."""
    return moegen.compile(MoESpec.from_dict(spec_dict)).name


@pytest.fixture(scope="module")
def warm_cache(module_cache):
    """Every GPU spec compiled once, in parallel processes (NVRTC is single-threaded); the
    tests' moegen.compile then loads them from the module's cache."""
    _gpu_or_skip()
    specs = [_cuda(s).to_dict() for s in SPECS.values()]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(len(specs), 8), mp_context=ctx) as pool:
        list(pool.map(_warm, specs))
    return module_cache


@functools.lru_cache(maxsize=None)
def _kernel(name: str):
    return moegen.compile(_cuda(SPECS[name]))


def _weights(spec: MoESpec, seed: int):
    """Fresh random logical weights; the clamped SwiGLU's gate and up weights are scaled so the
    pre-activations reach well past the limit of 7 on both sides (the clamps act)."""
    _, w = R.random_problem(spec, 0, seed=seed)
    if spec.activation == "swiglu_clamped":
        for name in ("w1", "w3"):
            w[name] = (w[name].astype(np.float32) * 9.0).astype(spec.dt.numpy)
    return w


def _x(spec: MoESpec, T: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((T, spec.hidden_dim)).astype(np.float32).astype(spec.dt.numpy)


def _dev(cp, a: np.ndarray):
    """Host array -> CuPy (bf16 as its uint16 bits, which the cuda backend accepts)."""
    a = np.ascontiguousarray(a)
    return cp.asarray(a.view(np.uint16) if a.dtype.name == "bfloat16" else a)


def _poisoned(cp, spec: MoESpec, T: int):
    if spec.dtype == "bfloat16":
        return cp.full((T, spec.hidden_dim), 0x7FC0, dtype=cp.uint16)      # bf16 NaN
    return cp.full((T, spec.hidden_dim), np.nan, dtype=spec.dt.numpy)


def _host(cp, spec: MoESpec, a) -> np.ndarray:
    h = cp.asnumpy(a)
    return h.view(spec.dt.numpy) if spec.dtype == "bfloat16" else h


def _token_counts(kernel) -> list[int]:
    """1, 7, 16/17 (the router's GEMV and the fused route + group end at 16), odd counts, and
    both sides of every bucket boundary of the plan."""
    plan = kernel.module.plan
    ts = {1, 7, 16, 17, 33}
    bounds = [b.max_tokens for b in plan.buckets if b.max_tokens is not None]
    for m in bounds:
        ts |= {m, m + 1}
    ts.add(2 * max(bounds + [64]) + 3)                    # well inside the last bucket
    return sorted(ts)


def _route_reference(spec, x, w, bias):
    """(ids, weights, choice) of the float64 reference; ``bias`` as the kernels apply it."""
    sel = bias if spec.routing == "sigmoid_topk" else None
    logit_bias = None if spec.routing == "sigmoid_topk" else bias
    ids, wts, probs, logits = R.route(spec, x, w["router"], logit_bias, sel)
    # the scores the selection ranks: logits, biased sigmoid scores, or softmax probabilities
    choice = {"topk_softmax": logits, "sigmoid_topk": probs + bias}.get(spec.routing, probs)
    return ids, wts, choice


def _group_tied(spec, choice, rtol=1e-5):
    """Tokens whose topk_group-th and next best group scores tie within fp32 rounding (there
    the kernel may keep another group).  Group score: the best choice (softmax_topk) or the sum
    of the two best (sigmoid_topk)."""
    T = len(choice)
    if spec.n_group <= 1 or spec.topk_group >= spec.n_group:
        return np.zeros(T, dtype=bool)
    g = -np.sort(-choice.reshape(T, spec.n_group, -1), axis=2)
    score = g[:, :, :2].sum(axis=2) if spec.routing == "sigmoid_topk" else g[:, :, 0]
    s = -np.sort(-score, axis=1)
    a, b = s[:, spec.topk_group - 1], s[:, spec.topk_group]
    return np.abs(a - b) <= rtol * np.abs(a)


def check_routing(spec, x, w, bias, ids, wts, where=""):
    """The kernel's routing is the reference's: the same expert ids in the same order, except
    on tokens whose reference scores tie within fp32 rounding (then the picks are as good);
    the weights of the other tokens within fp32 error."""
    r_ids, r_w, choice = _route_reference(spec, x, w, bias)
    assert ids.dtype == np.int32 and ids.shape == r_ids.shape, where
    assert ((ids >= 0) & (ids < spec.num_experts)).all(), where
    T = len(ids)
    differ = np.nonzero((ids != r_ids).any(axis=1))[0]
    tied = _group_tied(spec, choice)
    for t in differ:
        if tied[t]:
            continue
        got, want = np.sort(choice[t, ids[t]]), np.sort(choice[t, r_ids[t]])
        assert np.allclose(got, want, rtol=1e-4, atol=1e-6), (where, t, ids[t], r_ids[t])
    assert len(differ) <= max(2, T // 100), f"{where}: {len(differ)} of {T} tokens routed differently"
    same = np.setdiff1d(np.arange(T), differ)
    np.testing.assert_allclose(wts[same], r_w[same], rtol=1e-4, atol=1e-6, err_msg=where)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SPECS))
def test_layer_matches_reference(name, warm_cache):
    """The whole layer and its routing, at every token count of `_token_counts`, fresh inputs
    and a fresh router bias per count, outputs NaN-poisoned."""
    cp = _gpu_or_skip()
    spec = SPECS[name]
    kernel = _kernel(name)
    w = _weights(spec, seed=1)
    packed = kernel.pack(**R.weight_kwargs(spec, w), router_layout="eh")
    if spec.router_dtype:
        assert packed.router.dtype == np.float32          # kept in float32 on the device
    if spec.activation == "swiglu_clamped":          # the test itself: the clamps act
        g = R.f64(_x(spec, 64, 0)) @ R.f64(w["w1"][0]).T
        assert (g > spec.swiglu_limit).mean() > 0.1 and (g < -spec.swiglu_limit).mean() > 0.1
    for T in _token_counts(kernel):
        where = f"{name} T={T}"
        x = _x(spec, T, seed=1000 + T)
        bias = (np.random.default_rng(T).standard_normal(spec.num_experts) * 0.1).astype(np.float32)
        xd, bd = _dev(cp, x), cp.asarray(bias)
        out = _poisoned(cp, spec, T)
        got = kernel(xd, packed, router_bias=bd, out=out)
        assert got is out, where
        ids, wts = kernel.route(xd, packed, router_bias=bd)
        ids, wts = cp.asnumpy(ids), cp.asnumpy(wts)
        check_routing(spec, x, w, bias, ids, wts, where)
        # the experts on the kernel's own routing (a legitimate near-tie flip cannot fail this)
        ref, _ = R.moe(spec, x, w, topk_ids=ids, topk_weights=wts)
        err = R.rel_error(_host(cp, spec, out), ref)
        assert err <= spec.dt.tolerance, f"{where}: rel error {err:.3g} > {spec.dt.tolerance}"


@pytest.mark.gpu
@pytest.mark.parametrize("name", [n for n in SPECS if n.startswith(("gate-", "clamped-", "all-"))])
def test_experts_with_caller_routing(name, warm_cache):
    """kernel.experts on a routing made here: the clamped activation and the shared-expert gate
    (computed in the combine from x and the packed gate) without the route stage."""
    cp = _gpu_or_skip()
    spec = SPECS[name]
    kernel = _kernel(name)
    w = _weights(spec, seed=2)
    packed = kernel.pack(**R.weight_kwargs(spec, w), router_layout="eh")
    rng = np.random.default_rng(3)
    for T in (1, 7, 129):
        x = _x(spec, T, seed=T)
        ids = np.stack([rng.permutation(spec.num_experts)[:spec.top_k] for _ in range(T)]).astype(np.int32)
        wts = rng.random((T, spec.top_k)).astype(np.float32)
        out = _poisoned(cp, spec, T)
        kernel.experts(_dev(cp, x), packed, cp.asarray(ids), cp.asarray(wts), out=out)
        ref, _ = R.moe(spec, x, w, topk_ids=ids, topk_weights=wts)
        err = R.rel_error(_host(cp, spec, out), ref)
        assert err <= spec.dt.tolerance, f"{name} T={T}: rel error {err:.3g} > {spec.dt.tolerance}"


@pytest.mark.gpu
def test_float32_router_keeps_a_near_tie_as_the_model_does(module_cache):
    """Logits 1.0 and 1.001 (one bf16 step apart or less): the float32 router picks expert 2,
    as transformers does; a router rounded to bf16 makes them tie and picks expert 1."""
    cp = _gpu_or_skip()
    H = 8
    x = np.zeros((1, H), dtype=np.float32)
    x[0, 0] = 1.0
    router = np.zeros((4, H), dtype=np.float32)
    router[:, 0] = [0.1, 1.0, 1.001, -0.3]
    w = dict(w1=np.ones((4, 4, H)), w3=np.ones((4, 4, H)), w2=np.ones((4, H, 4)))
    for router_dtype, expect in (("float32", 2), (None, 1)):
        spec = MoESpec(4, 1, H, 4, dtype="bfloat16", router_dtype=router_dtype, backend="cuda")
        kernel = moegen.compile(spec)
        weights = kernel.pack(router=router, router_layout="eh", **w)
        ids, _ = kernel.route(_dev(cp, x.astype(spec.dt.numpy)), weights)
        assert int(cp.asnumpy(ids)[0, 0]) == expect, router_dtype


@pytest.mark.gpu
def test_grouped_softmax_keeps_only_the_best_group(module_cache):
    """Group score = the group's best softmax score: group 0 {3, -5} beats group 1 {2.5, 2.5}
    (which the sum of two would pick)."""
    cp = _gpu_or_skip()
    spec = MoESpec(8, 2, 8, 4, n_group=4, topk_group=1, backend="cuda")
    kernel = moegen.compile(spec)
    router = np.zeros((8, 8), dtype=np.float32)
    router[:, 0] = [3.0, -5.0, 2.5, 2.5, -5, -5, -5, -5]
    x = np.zeros((1, 8), dtype=np.float32)
    x[0, 0] = 1.0
    ones = dict(w1=np.ones((8, 4, 8), np.float32), w3=np.ones((8, 4, 8), np.float32),
                w2=np.ones((8, 8, 4), np.float32))
    ids, _ = kernel.route(cp.asarray(x), kernel.pack(router=router, router_layout="eh", **ones))
    assert sorted(cp.asnumpy(ids)[0].tolist()) == [0, 1]


def _bytes(a) -> np.ndarray:
    """The bytes of a device array (torch tensor or CuPy array), on the host."""
    if type(a).__module__.startswith("torch"):
        return a.detach().contiguous().view(-1).view(_torch().uint8).cpu().numpy()
    import cupy
    return cupy.asnumpy(a).reshape(-1).view(np.uint8)


def _torch():
    try:
        import torch  # optional heavy package: only the torch device-packing case needs it
    except Exception:  # noqa: BLE001
        pytest.skip("needs torch")
    if not torch.cuda.is_available():
        pytest.skip("needs torch with CUDA")
    return torch


@pytest.mark.gpu
@pytest.mark.parametrize("source", ["cupy", "torch"])
@pytest.mark.parametrize("name", ["router32-e16-k2-h512-f256-bf16", "router32-e8-k2-h70-f33-fp16",
                                  "gate-e16-k4-h256-f128-bf16-sh2", "all-e16-k3-h128-f64-bf16",
                                  "clamped-e32-k4-h256-f256-bf16-topksm-bias"])
def test_packing_on_the_device_is_the_host_packing(name, source, warm_cache):
    """Weights already on the GPU (CuPy, bf16 as uint16 bits; or torch) pack on the GPU into the
    same bytes as the host packing: the float32 router stays float32 (widened exactly from bf16
    bits), the shared gate lands in the shared experts' blocks."""
    cp = _gpu_or_skip()
    spec = SPECS[name]
    kernel = _kernel(name)
    w = _weights(spec, seed=4)
    kw = R.weight_kwargs(spec, w)
    host = kernel.pack(**kw, router_layout="eh")
    if source == "torch":
        torch = _torch()

        def dev(a):
            a = np.ascontiguousarray(a)
            if a.dtype.name == "bfloat16":
                return torch.from_numpy(a.view(np.int16)).cuda().view(torch.bfloat16)
            return torch.from_numpy(a).cuda()
    else:
        def dev(a):
            return _dev(cp, a)
    packed = kernel.pack(**{k: dev(v) for k, v in kw.items()}, router_layout="eh")
    assert type(packed.buffer).__module__.split(".")[0] == source
    np.testing.assert_array_equal(_bytes(packed.buffer), _bytes(host.buffer))
    np.testing.assert_array_equal(_bytes(packed.router), _bytes(host.router))
    if spec.router_dtype:
        assert _bytes(packed.router).size == 4 * spec.num_experts * spec.hidden_dim
    if spec.router_dtype and spec.dtype == "bfloat16" and source == "cupy":
        # a bf16 router given as CuPy bf16 bits is widened to float32 exactly
        r16 = w["router"].astype(spec.dt.numpy)
        want = kernel.pack(**dict(kw, router=r16), router_layout="eh").router
        got = kernel.pack(**{k: dev(v) for k, v in dict(kw, router=r16).items()},
                          router_layout="eh").router
        np.testing.assert_array_equal(_bytes(got), _bytes(want))
    T = 17
    x = _x(spec, T, seed=5)
    out = _poisoned(cp, spec, T)
    kernel(_dev(cp, x), packed, out=out)
    ids, wts = kernel.route(_dev(cp, x), packed)
    ref, _ = R.moe(spec, x, w, topk_ids=cp.asnumpy(ids), topk_weights=cp.asnumpy(wts))
    assert R.rel_error(_host(cp, spec, out), ref) <= spec.dt.tolerance


# Hugging Face blocks needing these semantics (tests/test_torch_hf.py's tiny configs).
HF_BLOCKS = ("qwen2_moe", "gpt_oss", "deepseek_v2-grouped", "deepseek_v3")


def hf_block_case(name: str, dtype: str, device: str, backend: str, T: int = 21):
    """A transformers block of tests/test_torch_hf.py with random weights rounded to ``dtype``
    (DeepSeek's router and correction bias kept float32, as transformers keeps them), converted
    by from_hf on ``device``, against the same block in float32 on the CPU: the same expert ids
    for every token, outputs within the dtype tolerance.  Returns the moegen block."""
    torch = _torch() if device == "cuda" else pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_torch_hf import _block_class, _configs, _hf_ids, randomize  # the CPU tests' blocks
    from moegen.torch import from_hf
    cfg = _configs()[name]
    tdt = getattr(torch, dtype)
    hf32 = randomize(_block_class(cfg.model_type)(cfg).eval(), seed=3)
    fp32_router = name.startswith("deepseek")
    with torch.no_grad():
        for key, t in hf32.state_dict(keep_vars=True).items():
            if t.is_floating_point() and not (fp32_router and key.startswith("gate.")):
                t.copy_(t.to(tdt).float())              # the reference holds the dtype's values
    hf = copy.deepcopy(hf32).to(device=device, dtype=tdt)
    if fp32_router:                                     # back to float32, as transformers keeps it
        hf.gate.weight.data = hf32.gate.weight.data.to(device).clone()
        if hasattr(hf.gate, "e_score_correction_bias"):
            hf.gate.e_score_correction_bias.data = hf32.gate.e_score_correction_bias.data.to(device).clone()
    ours = from_hf(hf, backend=backend)
    assert ours.spec.backend == backend and ours.spec.dtype == dtype
    assert (ours.spec.router_dtype == "float32") == fp32_router
    H = cfg.hidden_size
    x = torch.randn(1, T, H, generator=torch.Generator().manual_seed(7)).to(tdt)
    with torch.no_grad():
        want = hf32(x.float())
        got = ours(x.to(device))
        if isinstance(want, tuple):                     # GPT-OSS: (hidden states, router scores)
            want, got = want[0], got[0]
        ids, _ = ours.route(x.to(device))
        hf_ids = _hf_ids(hf32, x.float().view(-1, H))
    assert got.dtype == tdt and got.device.type == device
    np.testing.assert_array_equal(np.sort(ids.cpu().numpy(), 1), np.sort(hf_ids.numpy(), 1))
    err = R.rel_error(got.float().cpu().numpy(), want.numpy().astype(np.float64))
    assert err <= ours.spec.dt.tolerance, f"{name} {dtype}: rel error {err:.3g}"
    return ours


@pytest.fixture(scope="module")
def hf_warm(module_cache):
    """The specs from_hf makes of HF_BLOCKS on CUDA, compiled once in parallel processes."""
    _gpu_or_skip()
    _torch()
    pytest.importorskip("transformers")
    from test_torch_hf import _configs  # the CPU tests' tiny configs
    from moegen.torch.hf import spec_from_config
    specs = []
    for name in HF_BLOCKS:
        for dtype in ("bfloat16", "float16"):
            spec = spec_from_config(_configs()[name], dtype=dtype, backend="cuda")
            if name.startswith("deepseek"):
                spec = spec.replace(router_dtype="float32")
            specs.append(spec.to_dict())
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(8, mp_context=ctx) as pool:
        list(pool.map(_warm, specs))
    return module_cache


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", HF_BLOCKS)
def test_hf_block_on_cuda_matches_transformers(name, dtype, hf_warm):
    """Qwen2-MoE's gated shared expert, GPT-OSS's clamped SwiGLU with biases, DeepSeek-V2's
    grouped softmax and DeepSeek's float32 router, from_hf on CUDA tensors."""
    hf_block_case(name, dtype, "cuda", "cuda")


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v2-grouped"])
def test_hf_block_case_on_the_cpu(name, module_cache):
    """The same comparison on the c backend (CI runs it; the GPU run runs the cuda one)."""
    hf_block_case(name, "float16", "cpu", "c")
