"""The CUDA backward's generated kernels, run on the CPU (tests/cuda_emulator.py), against the
float64 reference backward: fp32 specs (the SIMT GEMM tile) and bf16 specs (the tensor-core
tiles, their ldmatrix / ldmatrix .trans / mma.sync / cp.async emulated: the cp.async pipeline
bwd_pipe_tile where H and F are multiples of 8, else bwd_mma_tile) of every routing, gated and ungated activations, biases,
shared experts, capacity with and without renormalisation, several k steps and output tiles.

`CudaBackward.backward` runs as it does on a GPU (the same launches, grids and argument
tuples); only the launcher, the stream and the forward kernel's route and group stages are
replaced: the grouped layout comes from `grouped_layout` (the group stage's contract: each
expert's slots in slot order, padded to bm rows, then junk past num_tiles·bm that the kernels
must ignore).  The GPU tests (test_backward_cuda_gpu.py) run the real thing.
"""

from __future__ import annotations

import contextlib
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from moegen import reference as ref
from moegen.backends import cuda_backward as cb
from moegen.layout import weight_shapes
from moegen.reference_backward import balance_coefficient, moe_backward
from moegen.stats import LayerStats
from moegen.spec import MoESpec

import cuda_emulator

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not cuda_emulator.available(), reason="needs g++ (C++20)")

SPECS = {
    "e8-k2-h40-f24-swiglu": MoESpec(8, 2, 40, 24, dtype="float32"),
    "e6-k2-h24-f40-gelu-bias-cap1": MoESpec(6, 2, 24, 40, dtype="float32", activation="gelu",
                                            bias=True, capacity_factor=1.0),
    "e8-k3-h16-f24-relu-topksm-cap0.6-raw": MoESpec(8, 3, 16, 24, dtype="float32", activation="relu",
                                                    routing="topk_softmax", capacity_factor=0.6,
                                                    renormalize=False),
    "e16-k4-h32-f16-geglu-sigmoid-g4-tg2-sh1": MoESpec(
        16, 4, 32, 16, dtype="float32", activation="geglu", routing="sigmoid_topk", n_group=4,
        topk_group=2, routed_scaling_factor=2.5, num_shared_experts=1, bias=True),
}
# bf16: the tensor-core tiles (128 x 128 outputs, 64 k a step): H = 136 and 2F = 144 make
# several k steps and output tiles, T = 150 several k steps of the weight gradients; H = 60,
# F = 36 rows that are not 16-byte multiples (bwd_mma_tile, no vector reads for them); the
# others take bwd_pipe_tile.  e2-k2 at T = 200: every token in both experts, so the weight
# gradients' k (200 rows an expert) and the gate/up and dh GEMMs' k (H = 264) run past the
# 3-stage ring (it wraps), with a partial last step and partial output tiles (H = 264, F = 40).
TC_SPECS = {
    "e2-k2-h264-f40-bf16-swiglu": MoESpec(2, 2, 264, 40, dtype="bfloat16"),
    "e4-k2-h136-f72-bf16-swiglu": MoESpec(4, 2, 136, 72, dtype="bfloat16"),
    "e6-k2-h24-f40-bf16-gelu-bias-cap1-sh1": MoESpec(
        6, 2, 24, 40, dtype="bfloat16", activation="gelu", bias=True, capacity_factor=1.0,
        num_shared_experts=1),
    "e4-k2-h60-f36-bf16-swiglu": MoESpec(4, 2, 60, 36, dtype="bfloat16"),   # H, F not multiples of 8
    "e16-k4-h32-f16-bf16-relu-sigmoid-g4-tg2": MoESpec(
        16, 4, 32, 16, dtype="bfloat16", activation="relu", routing="sigmoid_topk", n_group=4,
        topk_group=2, routed_scaling_factor=2.5),
}
TOL = {"float32": 1e-4, "bfloat16": 1e-2}
BM = 16                 # the group stage's tile rows in these runs
JUNK_TILES = 2          # tiles past num_tiles, filled with junk
COEFFS = dict(balance_coeff=0.05, z_coeff=0.01)
DAUX = 0.5


def grouped_layout(spec: MoESpec, ids, kept, T: int) -> dict:
    """The group stage's outputs for ``ids`` (kept slots only)."""
    E, S, K = spec.num_experts, spec.num_shared_experts, spec.top_k
    slots = [[] for _ in range(E + S)]
    for t in range(T):
        for s in range(K + S):
            if s < K:
                if kept[t, s]:
                    slots[ids[t, s]].append(t * (K + S) + s)
            else:
                slots[E + s - K].append(t * (K + S) + s)
    rows, tile_expert, tile_row0 = [], [], []
    for e, sl in enumerate(slots):
        n = -(-len(sl) // BM)
        for j in range(n):
            tile_expert.append(e)
            tile_row0.append(len(rows) + j * BM)
        rows += sl + [-1] * (n * BM - len(sl))
    num_tiles = len(tile_expert)
    junk = np.random.default_rng(0).integers(0, T * (K + S), JUNK_TILES * BM)
    i32 = lambda a: torch.tensor(np.asarray(a, np.int64), dtype=torch.int32)  # noqa: E731
    return dict(sorted_rows=i32(rows + list(junk)), tile_expert=i32(tile_expert + [0] * JUNK_TILES),
                tile_row0=i32(tile_row0 + [0] * JUNK_TILES), num_tiles=i32([num_tiles]),
                max_tiles=num_tiles + JUNK_TILES,
                counts=i32([len(slots[e]) for e in range(E)]))


class FakeForward:
    """The forward kernel's route and group stages, from the reference routing."""

    stages = ("route", "group", "ffn1", "ffn2", "combine")

    def __init__(self, spec, x, w, bias):
        sigmoid = spec.routing == "sigmoid_topk"
        ids, raw_w, _, _ = ref.route(spec, x, w["router"], None if sigmoid else bias,
                                     bias if sigmoid else None)
        final_w, kept, _ = ref.apply_capacity(spec, ids, raw_w)
        T = len(x)
        cap = spec.capacity_factor is not None
        f32 = lambda a: torch.tensor(np.asarray(a, np.float32))  # noqa: E731
        self.ws = SimpleNamespace(
            bucket=SimpleNamespace(bm=BM), topk_ids=torch.tensor(ids.astype(np.int32)),
            topk_weights=f32(raw_w), kept=torch.tensor(kept.astype(np.uint8)) if cap else None,
            cap_weights=f32(final_w) if cap and spec.renormalize else None,
            **grouped_layout(spec, ids, kept, T))
        self.stages_run = None

    def launch(self, stages, x, packed, out, router_bias):
        self.stages_run = stages
        return None, self.ws


@pytest.fixture(scope="module")
def emulated():
    made = {}

    def get(name, pipe_warps=cb.PIPE_WARPS, fp32_grads=False):
        if (name, pipe_warps, fp32_grads) not in made:
            spec = {**SPECS, **TC_SPECS}[name]
            default = cb.PIPE_WARPS
            cb.PIPE_WARPS = pipe_warps
            try:
                plan = cb.backward_plan(spec.replace(backend="cuda", arch="sm_90"))
            finally:
                cb.PIPE_WARPS = default
            plan = dataclasses.replace(plan, fp32_grads=fp32_grads)
            assert plan.tensor_cores is (name in TC_SPECS)
            emu = cuda_emulator.Emulator(cb.render_backward(plan).text, cb.KERNELS)
            bwd = cb.CudaBackward.__new__(cb.CudaBackward)
            bwd.plan, bwd.spec = plan, plan.spec
            bwd._launch = emu.launch
            bwd._stream = lambda device: contextlib.nullcontext()
            made[(name, pipe_warps, fp32_grads)] = (bwd, emu)
        return made[(name, pipe_warps, fp32_grads)]
    yield get
    for _, emu in made.values():
        emu.close()


def run(emulated, spec, name, T, **variant):
    """The emulated backward of ``name`` on a fresh problem of T tokens: (gradients, the
    problem (x, w, dy, bias)); every output starts as NaN, in the plan's gradient dtype."""
    bwd, emu = emulated(name, **variant)
    x, w = ref.random_problem(spec, T, seed=T)
    rng = np.random.default_rng(T + 1)
    bias = (rng.standard_normal(spec.num_experts) * 0.1).astype(spec.dt.numpy).astype(np.float32)
    dy = rng.standard_normal((T, spec.hidden_dim)).astype(np.float32).astype(spec.dt.numpy)
    fwd = FakeForward(spec, x, w, bias)
    params = {k: host_tensor(w[k]) for k in weight_shapes(spec)}
    gdt = getattr(torch, bwd.plan.grad_dtype)
    out = {k: torch.full(tuple(p.shape), float("nan"), dtype=gdt) for k, p in params.items()}
    out["x"] = torch.full((T, spec.hidden_dim), float("nan"), dtype=gdt)
    has_bias_grad = spec.routing != "sigmoid_topk"
    if has_bias_grad:
        out["router_bias"] = torch.full((spec.num_experts,), float("nan"))
    emu.launches.clear()
    g = bwd.backward(fwd, host_tensor(x), params, host_tensor(dy), torch.tensor(bias),
                     torch.tensor([DAUX]), packed=object(), out=out, **COEFFS)
    assert fwd.stages_run == ("route", "group")
    assert emu.launches[0] == "bwd_segments" and len(emu.launches) >= 13
    for k, a in out.items():
        assert g[k] is a and a.dtype == (torch.float32 if k == "router_bias" else gdt), k
    return g, (x, w, dy, bias)


def check(emulated, spec, name, T, **variant):
    g, (x, w, dy, bias) = run(emulated, spec, name, T, **variant)
    _, emu = emulated(name, **variant)
    r = moe_backward(spec, x, w, dy, bias, daux=DAUX, **COEFFS)
    tol = TOL[spec.dtype]
    for k in ("x", "router", "router_bias", "w1", "w3", "w2", "b1", "b3", "b2"):
        if r[k] is None:
            assert g[k] is None, k
            continue
        err = ref.rel_error(g[k].float().numpy(), r[k])
        assert err < tol, f"{k}: relative error {err:.2e}"
    assert ref.rel_error(np.sort(g["topk_weights"].numpy(), 1), np.sort(r["topk_weights"], 1)) < tol
    assert abs(float(g["balance_coeff"]) - r["balance_coeff"]) < 1e-6
    assert emu.ldmatrix_conflicts() == 0          # the swizzles keep ldmatrix conflict-free


def host_tensor(a: np.ndarray):
    """A CPU torch tensor of a NumPy array (bf16 through its bits)."""
    a = np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("name", list(SPECS))
def test_emulated_simt_kernels_match_the_float64_reference(emulated, name, T):
    check(emulated, SPECS[name], name, T)


@pytest.mark.parametrize("name, T", [("e4-k2-h136-f72-bf16-swiglu", 1), ("e4-k2-h136-f72-bf16-swiglu", 150),
                                     ("e2-k2-h264-f40-bf16-swiglu", 200),
                                     ("e6-k2-h24-f40-bf16-gelu-bias-cap1-sh1", 37),
                                     ("e4-k2-h60-f36-bf16-swiglu", 37),
                                     ("e16-k4-h32-f16-bf16-relu-sigmoid-g4-tg2", 37)])
def test_emulated_tensor_core_kernels_match_the_float64_reference(emulated, name, T):
    spec = TC_SPECS[name]
    assert emulated(name)[0].plan.pipelined is (spec.hidden_dim % 8 == 0 and spec.ffn_dim % 8 == 0)
    check(emulated, spec, name, T)


def test_emulated_pipelined_tile_with_four_warps(emulated):
    """bwd_pipe_tile's other warp layout (2 x 2 warps of 64 x 64, 128 threads: 8 copies a
    thread per operand and stage), over a ring that wraps and partial tiles."""
    name = "e2-k2-h264-f40-bf16-swiglu"
    bwd, _ = emulated(name, pipe_warps=(2, 2))
    assert bwd.plan.pipelined and bwd.plan.pipe_threads == 128
    check(emulated, TC_SPECS[name], name, 200, pipe_warps=(2, 2))


@pytest.mark.parametrize("name, T", [("e6-k2-h24-f40-bf16-gelu-bias-cap1-sh1", 37),
                                     ("e4-k2-h136-f72-bf16-swiglu", 150),
                                     ("e4-k2-h60-f36-bf16-swiglu", 37)])
def test_emulated_bf16_gradients_are_the_fp32_gradients_rounded(emulated, name, T):
    """The bf16 gradient stores (one rounding in each epilogue) give bit for bit what the
    fp32-output build gives converted by torch's round to nearest even; the router bias's
    gradient is fp32 in both."""
    spec = TC_SPECS[name]
    g16, _ = run(emulated, spec, name, T)
    g32, _ = run(emulated, spec, name, T, fp32_grads=True)
    names = [k for k in ("x", "router", "w1", "w3", "w2", "b1", "b3", "b2") if g16[k] is not None]
    assert {"x", "router", "w1", "w2"} <= set(names) and (not spec.bias or "b2" in names)
    for k in names:
        assert g16[k].dtype == torch.bfloat16 and g32[k].dtype == torch.float32, k
        assert torch.equal(g16[k].view(torch.int16), g32[k].to(torch.bfloat16).view(torch.int16)), k
    assert torch.equal(g16["router_bias"], g32["router_bias"])


@pytest.mark.parametrize("adaptive", [True, False])
def test_emulated_aux_loss_value_matches_the_layer_statistics(emulated, adaptive):
    name = "e8-k2-h40-f24-swiglu"
    spec = SPECS[name]
    _, emu = emulated(name)
    rng = np.random.default_rng(5)
    E, T = spec.num_experts, 13
    for counts in (rng.integers(0, 9, E).astype(np.int32), np.zeros(E, np.int32)):
        sums = (rng.random(E + 1) * 5).astype(np.float32)
        aux = np.full(1, np.nan, np.float32)
        emu.launch("train_aux_loss", (1,), 1, (counts, sums, np.int32(T), np.float32(0.05),
                                              np.float32(0.01), np.int32(adaptive), aux))
        d = LayerStats(spec, T, counts, sums).as_dict()
        want = balance_coefficient(d["usage"], 0.05, adaptive) * d["aux_loss"] + 0.01 * d["z_loss"]
        assert abs(float(aux[0]) - want) <= 1e-5 * max(1.0, abs(want))


# The emulated PTX helpers alone, in the forms the emulator replaces (their bodies are dropped).
PTX_PROBE = r'''
__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], unsigned addr)
{
    asm volatile("ldmatrix");
}
__device__ __forceinline__ void bwd_ldmatrix_x4_trans(unsigned (&r)[4], unsigned addr)
{
    asm volatile("ldmatrix.trans");
}
__device__ __forceinline__ void cp_async_16(unsigned dst, const void* src, bool full)
{
    asm volatile("cp.async");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }

// One warp: four 8 x 8 matrices of 16-bit values from src, lane l addressing row l % 8 of
// matrix l / 8; out[4 l + j] = register j of lane l.
extern "C" __global__ void probe_ldmatrix(const unsigned short* src, int trans, unsigned* out) {
    __shared__ __align__(16) unsigned short tile[4][8][8];
    const int lane = threadIdx.x;
    for (int i = 0; i < 8; ++i) (&tile[0][0][0])[lane * 8 + i] = src[lane * 8 + i];
    __syncthreads();
    unsigned r[4];
    const unsigned addr = smem_addr(&tile[lane / 8][lane % 8][0]);
    if (trans) bwd_ldmatrix_x4_trans(r, addr); else ldmatrix_x4(r, addr);
    for (int j = 0; j < 4; ++j) out[4 * lane + j] = r[j];
}

// One thread: two commit groups (a 16-byte copy, then a zero fill) over a buffer of 7s, the
// buffer read before any wait, after wait_group 1 and after wait_group 0.
extern "C" __global__ void probe_cp_async(const unsigned* src, unsigned* out) {
    __shared__ __align__(16) unsigned buf[8];
    for (int i = 0; i < 8; ++i) buf[i] = 7;
    cp_async_16(smem_addr(buf), src, true);
    cp_async_commit();
    cp_async_16(smem_addr(buf + 4), src, false);
    cp_async_commit();
    for (int i = 0; i < 8; ++i) out[i] = buf[i];
    cp_async_wait<1>();
    for (int i = 0; i < 8; ++i) out[8 + i] = buf[i];
    cp_async_wait<0>();
    for (int i = 0; i < 8; ++i) out[16 + i] = buf[i];
}
'''


@pytest.fixture(scope="module")
def probe():
    emu = cuda_emulator.Emulator(PTX_PROBE, ["probe_ldmatrix", "probe_cp_async"])
    yield emu
    emu.close()


@pytest.mark.parametrize("trans", [0, 1])
def test_emulated_ldmatrix_gives_the_ptx_fragments(probe, trans):
    """PTX ISA, ldmatrix .m8n8 .b16: lane l holds, of each matrix, row l/4's elements 2(l%4) and
    2(l%4)+1; with .trans the matrix is read column-major: column l/4's elements 2(l%4), +1."""
    src = np.random.default_rng(3).integers(0, 1 << 16, 256).astype(np.uint16)
    out = np.zeros(128, np.uint32)
    probe.launch("probe_ldmatrix", (1,), 32, (src, np.int32(trans), out))
    tile = src.reshape(4, 8, 8).astype(np.uint32)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for j in range(4):
            lo, hi = (tile[j, 2 * t, g], tile[j, 2 * t + 1, g]) if trans else (tile[j, g, 2 * t], tile[j, g, 2 * t + 1])
            assert out[4 * lane + j] == lo | hi << 16, (lane, j)


def test_emulated_cp_async_lands_only_at_its_wait_group(probe):
    src = np.arange(100, 104, dtype=np.uint32)
    out = np.zeros(24, np.uint32)
    probe.launch("probe_cp_async", (1,), 1, (src, out))
    assert list(out[:8]) == [7] * 8                              # nothing before a wait
    assert list(out[8:16]) == [100, 101, 102, 103, 7, 7, 7, 7]   # the older group retired
    assert list(out[16:]) == [100, 101, 102, 103, 0, 0, 0, 0]    # src-size 0: zeros
