"""The CUDA backward on a GPU: every gradient against the float64 reference backward.

Marked ``gpu``; skipped without torch CUDA and CuPy.  Specs cover every dtype, activation and
routing (grouped selection, routed scaling, no renormalisation), biases, shared experts and
capacity with and without renormalisation; token counts sit on both sides of the forward's
group tiles and of its token-count buckets, and T = 1 leaves most experts without a token.
Gradient outputs are NaN-poisoned before every run, so an element the kernels leave unwritten
fails the comparison.

The reference routes in float64 and the kernels in fp32: inputs whose top-k selection changes
under a 1e-3 relative perturbation of the router are redrawn (`stable_problem`), so the two
always pick the same experts and a gradient difference is the kernels' own.
"""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing

import numpy as np
import pytest

import moegen
from moegen import reference as ref
from moegen.layout import weight_shapes
from moegen.reference_backward import moe_backward
from moegen.spec import MoESpec

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("module_cache")]

if not torch.cuda.is_available():
    pytest.skip("needs torch with a CUDA device", allow_module_level=True)
pytest.importorskip("cupy")

from moegen.backends import cuda_backward  # noqa: E402
from moegen.backends.cuda_backward import CudaBackward  # noqa: E402
from moegen.torch.autograd import moe_train, param_names  # noqa: E402

from backward_cuda_specs import SPECS as ALL_SPECS  # noqa: E402

SPECS = {name: s for name, s in ALL_SPECS.items() if s.num_experts <= 256}
TOKENS = (1, 17, 128, 129, 333)
# Specs small enough for the float64 reference at the forward's bucket boundaries (<= 2048).
BOUNDARY_SPECS = ("e8-k2-h100-f100-fp32-gelu-bias-cap", "e16-k2-h64-f64-fp16-sigmoid-sh2",
                  "e256-k8-h256-f128-bf16-sigmoid-g8-tg4-sh1", "e16-k4-h256-f128-bf16-gelu-cap0.75-raw")
COEFFS = dict(balance_coeff=0.05, z_coeff=0.01)
DAUX = 0.5              # exact in every dtype (the aux loss's gradient travels in x's dtype)
# fp32 gradients against float64: SIMT GEMMs (fp32, fp16) accumulate in fp32 from exact
# operands; the bf16 tensor-core GEMMs also round their fp32 intermediate operands (dgu, the
# row-weighted h, dlogits) to bf16.
TOL = {"float32": 1e-3, "float16": 2e-3, "bfloat16": 1e-2}
TOL_ROUNDED = 1.5e-2    # gradients returned in fp16/bf16 by the training op
GRADS = ("x", "router", "router_bias", "w1", "w3", "w2", "b1", "b3", "b2")


def _prebuild(spec_dict: dict) -> str:
    """In a worker process: the forward and backward binaries of a spec into the cache."""
    from moegen import jit
    from moegen.backends import cuda_backward as cb
    try:
        spec = MoESpec.from_dict(spec_dict)
        jit.build(spec)
        cb.load_backward_cubin(cb.backward_plan(spec))
    except Exception as exc:  # noqa: BLE001 - the test that needs the spec reports it
        return f"{type(exc).__name__}: {exc}"
    return ""


@pytest.fixture(scope="module", autouse=True)
def prebuilt(module_cache):
    """Every spec's binaries compiled once, in parallel processes (NVRTC is single-threaded)."""
    ctx = multiprocessing.get_context("spawn")
    specs = [s.replace(backend="cuda").to_dict() for s in SPECS.values()]
    with concurrent.futures.ProcessPoolExecutor(min(len(specs), 8), mp_context=ctx) as pool:
        list(pool.map(_prebuild, specs))


@functools.lru_cache(maxsize=None)
def layer(name: str):
    """(forward MoEKernel, CudaBackward) of a spec, built once per session."""
    kernel = moegen.compile(SPECS[name].replace(backend="cuda"))
    return kernel, CudaBackward(kernel.spec)


def _biases(spec: MoESpec, bias):
    """(logit bias, selection bias) of the reference's route for the op's router_bias."""
    return (None, bias) if spec.routing == "sigmoid_topk" else (bias, None)


def _ids(spec, x, router, bias):
    return np.sort(ref.route(spec, x, router, *_biases(spec, bias))[0], axis=1)


def stable_problem(spec: MoESpec, T: int, seed: int = 0):
    """(x, weights, router bias, dy) in the spec dtype (bias fp32 of dtype-exact values), with
    every token's expert selection stable under small perturbations of the router."""
    x, w = ref.random_problem(spec, T, seed=seed)
    rng = np.random.default_rng(seed + 100)
    bias = (rng.standard_normal(spec.num_experts) * 0.1).astype(spec.dt.numpy).astype(np.float32)
    router = ref.f64(w["router"])
    for _ in range(50):
        base = _ids(spec, x, router, bias)
        fragile = np.zeros(T, bool)
        for _ in range(3):
            moved = router * (1.0 + 1e-3 * rng.standard_normal(router.shape))
            fragile |= (_ids(spec, x, moved, bias) != base).any(axis=1)
        if not fragile.any():
            break
        x[fragile] = rng.standard_normal((int(fragile.sum()), spec.hidden_dim)).astype(
            np.float32).astype(spec.dt.numpy)
    else:
        raise AssertionError("could not draw a problem with a stable routing")
    dy = rng.standard_normal((T, spec.hidden_dim)).astype(np.float32).astype(spec.dt.numpy)
    return x, w, bias, dy


def cuda(a: np.ndarray, dtype=None):
    """Host array -> torch CUDA tensor (bf16 through its bits: torch has no ml_dtypes)."""
    a = np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).cuda().view(torch.bfloat16)
    t = torch.from_numpy(a).cuda()
    return t if dtype is None else t.to(dtype)


def host(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def poisoned_out(bwd: CudaBackward, T: int, has_bias_grad: bool) -> dict:
    """NaN-filled outputs of every gradient the layer has, in the dtypes ``bwd`` writes (its
    plan's gradient dtype; float32 for the router bias)."""
    spec = bwd.spec
    shapes = {"x": (T, spec.hidden_dim), **weight_shapes(spec)}
    if has_bias_grad:
        shapes["router_bias"] = (spec.num_experts,)
    gdt = getattr(torch, bwd.plan.grad_dtype)
    return {k: torch.full(s, float("nan"), dtype=torch.float32 if k == "router_bias" else gdt,
                          device="cuda") for k, s in shapes.items()}


def run_backward(name: str, x, w, bias, dy, bwd=None):
    """The gradients of the spec's layer (its CudaBackward, or ``bwd``) into poisoned outputs."""
    spec = SPECS[name]
    kernel, default = layer(name)
    bwd = bwd or default
    params = {k: cuda(w[k]) for k in param_names(spec)}
    has_bias_grad = spec.routing != "sigmoid_topk"
    out = poisoned_out(bwd, len(x), has_bias_grad)
    g = bwd.backward(kernel, cuda(x), params, cuda(dy), cuda(bias), torch.tensor([DAUX], device="cuda"),
                     out=out, **COEFFS)
    torch.cuda.synchronize()
    for k, a in out.items():
        assert g[k] is a, k                     # written in place
    return g


def check_against_reference(spec, g, r, tol, what=""):
    for k in GRADS:
        if r[k] is None:
            assert g[k] is None, (what, k)
            continue
        err = ref.rel_error(host(g[k]), r[k])
        assert err < tol, f"{what} {k}: relative error {err:.2e}"


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("name", list(SPECS))
def test_gradients_match_the_float64_reference(name, T):
    spec = SPECS[name]
    x, w, bias, dy = stable_problem(spec, T, seed=T)
    g = run_backward(name, x, w, bias, dy)
    r = moe_backward(spec, x, w, dy, bias, daux=DAUX, **COEFFS)
    check_against_reference(spec, g, r, TOL[spec.dtype], f"{name} T={T}")
    # the gradient of each slot's final routing weight (slots compared as sorted rows)
    assert ref.rel_error(np.sort(host(g["topk_weights"]), axis=1),
                         np.sort(r["topk_weights"], axis=1)) < TOL[spec.dtype]
    assert abs(float(g["balance_coeff"]) - r["balance_coeff"]) <= 1e-6 * max(1.0, r["balance_coeff"])


@pytest.mark.parametrize("name", BOUNDARY_SPECS)
def test_gradients_across_the_forward_buckets(name):
    spec = SPECS[name]
    kernel, _ = layer(name)
    edges = [b.max_tokens for b in kernel.module.buckets if b.max_tokens and b.max_tokens < 2048]
    for T in sorted({t for m in edges for t in (m, m + 1)} | {2048}):
        x, w, bias, dy = stable_problem(spec, T, seed=T)
        g = run_backward(name, x, w, bias, dy)
        r = moe_backward(spec, x, w, dy, bias, daux=DAUX, **COEFFS)
        check_against_reference(spec, g, r, TOL[spec.dtype], f"{name} T={T}")


def test_experts_without_tokens_get_exact_zeros():
    name = "e64-k6-h1000-f1408-fp16-geglu-topksm-bias"
    spec = SPECS[name]
    x, w, bias, dy = stable_problem(spec, 1, seed=3)
    g = run_backward(name, x, w, bias, dy)
    used = set(_ids(spec, x, ref.f64(w["router"]), bias)[0].tolist())
    idle = [e for e in range(spec.num_experts) if e not in used]
    assert len(idle) == spec.num_experts - spec.top_k
    for k in ("w1", "w3", "w2", "b1", "b3", "b2"):
        assert torch.count_nonzero(g[k][idle]) == 0, k
        assert torch.count_nonzero(g[k][sorted(used)]) > 0, k


@pytest.mark.parametrize("name", ["e8-k2-h512-f2048-bf16-swiglu", "e8-k2-h100-f100-fp32-gelu-bias-cap",
                                  "e256-k8-h256-f128-bf16-sigmoid-g8-tg4-sh1"])
def test_two_backward_passes_are_bitwise_equal(name):
    spec = SPECS[name]
    x, w, bias, dy = stable_problem(spec, 257, seed=7)
    a = run_backward(name, x, w, bias, dy)
    b = run_backward(name, x, w, bias, dy)
    for k in GRADS + ("topk_weights",):
        if a[k] is not None:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", ["e8-k2-h512-f2048-bf16-swiglu", "e8-k2-h100-f100-fp32-gelu-bias-cap",
                                  "e16-k2-h64-f64-fp16-sigmoid-sh2",
                                  "e64-k6-h1000-f1408-fp16-geglu-topksm-bias"])
def test_autograd_through_the_training_op_on_cuda(name):
    spec = SPECS[name]
    T = 129
    x, w, bias, dy = stable_problem(spec, T, seed=11)
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[spec.dtype]
    xt = cuda(x).requires_grad_()
    ps = [cuda(w[k]).requires_grad_() for k in param_names(spec)]
    bt = cuda(bias, tdt).requires_grad_()
    y, aux = moe_train(spec.replace(backend="cuda"), xt, ps, bt, **COEFFS)
    assert y.is_cuda and y.dtype == tdt and aux.dtype == tdt
    loss = (y.float() * cuda(dy).float()).sum() + DAUX * aux
    grads = torch.autograd.grad(loss, [xt, bt, *ps])
    tol = TOL["float32"] if spec.dtype == "float32" else TOL_ROUNDED
    y_ref, _ = ref.moe(spec, x, w, router_bias=bias)
    assert ref.rel_error(host(y), y_ref) < tol
    r = moe_backward(spec, x, w, dy, bias, daux=DAUX, **COEFFS)
    assert abs(float(aux) - r["aux"]) <= tol * max(1e-3, abs(r["aux"]))
    for k, gk in zip(["x", "router_bias", *param_names(spec)], grads):
        assert gk.dtype == tdt and gk.is_cuda, k
        if r[k] is None:                        # sigmoid_topk: a selection bias, no gradient
            assert torch.count_nonzero(gk) == 0, k
            continue
        err = ref.rel_error(host(gk), r[k])
        assert err < tol, f"{k}: relative error {err:.2e}"


def test_no_tokens_gives_zero_gradients_on_cuda():
    spec = SPECS["e8-k2-h512-f2048-bf16-swiglu"]
    _, w, _, _ = stable_problem(spec, 1)
    xt = torch.zeros((0, spec.hidden_dim), dtype=torch.bfloat16, device="cuda", requires_grad=True)
    ps = [cuda(w[k]).requires_grad_() for k in param_names(spec)]
    y, aux = moe_train(spec, xt, ps, None, **COEFFS)
    assert y.shape == (0, spec.hidden_dim)
    grads = torch.autograd.grad(y.float().sum() + aux, [xt, *ps], allow_unused=True)
    assert grads[0].shape == (0, spec.hidden_dim)
    for gk in grads[1:]:
        assert gk is None or torch.count_nonzero(gk) == 0


def _train_step(spec, xt, ps, bt, dy):
    """One step through the training op: the gradients of <dy, y> + DAUX·aux."""
    y, aux = moe_train(spec, xt, ps, bt, **COEFFS)
    loss = (y.float() * dy).sum() + DAUX * aux.float()
    return torch.autograd.grad(loss, [xt, bt, *ps])


def _step_inputs(name: str, T: int):
    spec = SPECS[name]
    x, w, bias, dy = stable_problem(spec, T, seed=5)
    xt = cuda(x).requires_grad_()
    ps = [cuda(w[k]).requires_grad_() for k in param_names(spec)]
    bt = cuda(bias, xt.dtype).requires_grad_()
    return spec.replace(backend="cuda"), xt, ps, bt, cuda(dy).float()


def test_a_training_step_allocates_no_new_memory_after_warm_up():
    spec, xt, ps, bt, dy = _step_inputs("e8-k2-h512-f2048-bf16-swiglu", 300)
    for _ in range(2):
        _train_step(spec, xt, ps, bt, dy)
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    for _ in range(3):
        _train_step(spec, xt, ps, bt, dy)
    torch.cuda.synchronize()
    assert torch.cuda.memory_reserved() == reserved


def test_a_training_step_captures_in_a_cuda_graph_and_replays_bitwise():
    spec, xt, ps, bt, dy = _step_inputs("e8-k2-h512-f2048-bf16-swiglu", 300)
    eager = [g.clone() for g in _train_step(spec, xt, ps, bt, dy)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                # warm-up on a side stream, as torch asks
        for _ in range(2):
            _train_step(spec, xt, ps, bt, dy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _train_step(spec, xt, ps, bt, dy)
    for g in captured:
        g.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for e, c in zip(eager, captured):
        assert torch.equal(e, c)


@pytest.mark.parametrize("name", ["e8-k2-h512-f2048-bf16-swiglu", "e16-k2-h64-f64-fp16-sigmoid-sh2",
                                  "e64-k6-h1000-f1408-fp16-geglu-topksm-bias"])
def test_16_bit_gradients_are_the_fp32_gradients_rounded(name):
    """The gradients stored in the parameter dtype (one rounding in each kernel's epilogue) are
    bit for bit the fp32-output build's gradients converted by torch (round to nearest even)."""
    spec = SPECS[name]
    kernel, bwd = layer(name)
    assert bwd.plan.grad_dtype == spec.dtype != "float32"
    wide = CudaBackward(kernel.spec, fp32_grads=True)
    x, w, bias, dy = stable_problem(spec, 257, seed=13)
    a = run_backward(name, x, w, bias, dy)
    b = run_backward(name, x, w, bias, dy, bwd=wide)
    dt = getattr(torch, spec.dtype)
    for k in GRADS:
        if a[k] is None:
            continue
        if k == "router_bias":
            assert a[k].dtype == b[k].dtype == torch.float32 and torch.equal(a[k], b[k])
            continue
        assert a[k].dtype == dt and b[k].dtype == torch.float32, k
        assert torch.equal(a[k].view(torch.int16), b[k].to(dt).view(torch.int16)), k


def test_the_pipelined_tile_gives_the_same_bits_in_both_warp_layouts(monkeypatch):
    """bwd_pipe_tile with 2 x 2 warps (64 x 64 each) against the default 2 x 4 (64 x 32): every
    output element sums the same k16 products in the same order, so the gradients are bitwise
    equal, and right."""
    name = "e8-k2-h512-f2048-bf16-swiglu"
    spec = SPECS[name]
    kernel, bwd = layer(name)
    assert bwd.plan.pipelined and bwd.plan.pipe_warps == (2, 4)
    monkeypatch.setattr(cuda_backward, "PIPE_WARPS", (2, 2))
    other = CudaBackward(kernel.spec)
    assert other.plan.pipe_threads == 128
    x, w, bias, dy = stable_problem(spec, 333, seed=11)
    a = run_backward(name, x, w, bias, dy)
    b = run_backward(name, x, w, bias, dy, bwd=other)
    for k in GRADS + ("topk_weights",):
        if a[k] is not None:
            assert torch.equal(a[k], b[k]), k
    r = moe_backward(spec, x, w, dy, bias, daux=DAUX, **COEFFS)
    check_against_reference(spec, b, r, TOL[spec.dtype], f"{name} 2x2 warps")
