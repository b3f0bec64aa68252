"""The CUDA expert FFN kernels alone (templates/cuda/ffn.cu.jinja, backends/cuda_tiles.py,
backends/cuda_ffn.py).

* CPU: bucket/tile/layout/workspace rules.
* nvrtc: every bucket's kernels compile to an sm_90 cubin without spills.
* gpu: ffn1 + ffn2 on a grouped layout built on the host from `reference.group`'s order,
  summed over splits and slots on the host, against the float64 reference, at token counts
  on both sides of every bucket boundary; workspaces are NaN-poisoned first.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import numpy as np
import pytest

from moegen import reference
from moegen.backends import cuda_plan, cuda_tiles
from moegen.backends.base import Call
from moegen.layout import PackedWeights, logical_weights, pack_host
from moegen.plan import make_plan
from moegen.render import render_template
from moegen.spec import MoESpec

SPECS = {
    "e8-k2-h256-f512-bf16-swiglu": MoESpec(8, 2, 256, 512, dtype="bfloat16"),
    "e8-k2-h256-f512-fp16-swiglu": MoESpec(8, 2, 256, 512, dtype="float16"),
    "e8-k2-h128-f192-fp32-swiglu": MoESpec(8, 2, 128, 192, dtype="float32"),
    "e16-k4-h200-f136-bf16-geglu-bias": MoESpec(16, 4, 200, 136, dtype="bfloat16", activation="geglu", bias=True),
    "e4-k1-h64-f256-fp16-relu-bias": MoESpec(4, 1, 64, 256, dtype="float16", activation="relu", bias=True),
    "e8-k2-h100-f60-bf16-gelu-odd": MoESpec(8, 2, 100, 60, dtype="bfloat16", activation="gelu"),
    "e5-k3-h33-f17-fp32-silu-bias-odd": MoESpec(5, 3, 33, 17, dtype="float32", activation="silu", bias=True),
    "e64-k8-h512-f256-bf16-sh1": MoESpec(64, 8, 512, 256, dtype="bfloat16", num_shared_experts=1),
}


def _plan(spec: MoESpec, arch: str | None = None, tuning: dict | None = None, sms: int = 132):
    arch = arch or spec.arch or "sm_90"
    return make_plan(spec.replace(backend="cuda", arch=arch), arch, tuning or {}, sms=sms).detail


def _buckets(spec: MoESpec, tuning: dict | None = None) -> list:
    return list(_plan(spec, tuning=tuning).buckets)


def _context(spec: MoESpec, arch: str, tuning: dict | None = None) -> dict:
    return cuda_plan.render_context(spec, _plan(spec, arch, tuning))


# -- CPU: configuration rules ----------------------------------------------------------------

def test_grouped_layout_host_pads_segments():
    spec = MoESpec(4, 2, 16, 16, num_shared_experts=1)
    ids = np.array([[0, 2], [2, 0], [2, 3]], np.int32)
    rows, te, tr, nt = cuda_tiles.grouped_layout_host(spec, ids, 2, 8)
    # slots t*3+s; expert 0: slots 0, 4; expert 2: 1, 3, 6; expert 3: 7; shared (4): 2, 5, 8
    assert list(rows) == [0, 4, 1, 3, 6, -1, 7, -1, 2, 5, 8, -1, -1, -1, -1, -1]
    assert nt[0] == 6
    assert list(te[:6]) == [0, 2, 2, 3, 4, 4] and list(tr[:6]) == [0, 2, 4, 6, 8, 10]
    assert te[6] == 0x7fffffff
    with pytest.raises(ValueError, match="tiles"):
        cuda_tiles.grouped_layout_host(spec, ids, 2, 5)


@pytest.mark.parametrize("name", list(SPECS))
def test_buckets_sorted_last_unbounded(name):
    spec = SPECS[name]
    cfgs = _buckets(spec)
    bounds = [c.max_tokens for c in cfgs]
    assert bounds[-1] is None
    assert all(b is not None for b in bounds[:-1])
    assert bounds[:-1] == sorted(set(bounds[:-1]))
    for c in cfgs:
        assert c.ffn1.bm == c.ffn2.bm == c.bm
        assert c.ffn2_splits >= 1
        assert c.ffn1_kernel.startswith("moe_ffn1_") and c.ffn2_kernel.startswith("moe_ffn2_")
    assert cfgs[-1].ffn2_splits == 1
    # bucket_for picks the first bucket that holds T
    for T in (0, 1, 1000, 10**6):
        cfg = cuda_tiles.bucket_for(cfgs, T)
        assert cfg.accepts(T)
        assert all(not c.accepts(T) for c in cfgs[:cfgs.index(cfg)])


def test_preferred_arch_is_arch_specific_on_hopper():
    assert cuda_tiles.preferred_arch("90") == "sm_90a"
    assert cuda_tiles.preferred_arch("89") == "sm_89"


def test_mma_only_for_aligned_half_specs():
    assert cuda_tiles.use_mma(SPECS["e8-k2-h256-f512-bf16-swiglu"])
    assert not cuda_tiles.use_mma(SPECS["e8-k2-h128-f192-fp32-swiglu"])
    assert not cuda_tiles.use_mma(SPECS["e8-k2-h100-f60-bf16-gelu-odd"])


def test_layout_interleaves_gate_up_by_8():
    lay = cuda_tiles.packed_layout(SPECS["e8-k2-h256-f512-bf16-swiglu"])
    assert (lay.w13_order, lay.w2_order, lay.gate_up_interleave) == ("nk", "nk", 8)
    order = lay.gate_up_row_order()
    assert list(order[:16]) == list(range(8)) + list(range(512, 520))
    assert cuda_tiles.packed_layout(SPECS["e4-k1-h64-f256-fp16-relu-bias"]).gate_up_interleave == 0


def test_workspace_sizes():
    spec = SPECS["e64-k8-h512-f256-bf16-sh1"]
    for cfg in _buckets(spec):
        ws = cuda_tiles.workspace_sizes(spec, cfg, 100)
        tiles = math.ceil(100 * 9 / cfg.bm) + 64 + 1
        assert ws == {"max_tiles": tiles, "h": tiles * cfg.bm * 256,
                      "y_slot": cfg.ffn2_splits * 900 * 512}


# -- NVRTC: every bucket compiles ------------------------------------------------------------

def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
    except Exception:  # noqa: BLE001 - no CuPy: skip
        pytest.skip("CuPy/NVRTC not installed")
    return nvrtc


def compile_ffn(spec: MoESpec, arch: str = "sm_90", tuning: dict | None = None) -> tuple[bytes, str]:
    """The ffn template alone, compiled by NVRTC: (cubin, ptxas log)."""
    nvrtc = _nvrtc()
    ctx = _context(spec, arch, tuning)       # the layer's constants and conversions, then the FFNs
    src = render_template("cuda/_layer.cuh.jinja", **ctx) + render_template("cuda/ffn.cu.jinja", **ctx)
    prog = nvrtc.createProgram(src, "ffn.cu", [], [])
    try:
        nvrtc.compileProgram(prog, [f"--gpu-architecture={arch}", "-std=c++17",
                                    "--ptxas-options=-v"])
    except nvrtc.NVRTCError:
        pytest.fail(nvrtc.getProgramLog(prog))
    return nvrtc.getCUBIN(prog), nvrtc.getProgramLog(prog)


@pytest.mark.nvrtc
@pytest.mark.parametrize("name", list(SPECS))
def test_every_bucket_compiles_without_spills(name):
    spec = SPECS[name]
    cubin, log = compile_ffn(spec)
    for cfg in _buckets(spec):
        for kname in (cfg.ffn1_kernel, cfg.ffn2_kernel):
            assert kname.encode() in cubin, f"{kname} missing from the cubin"
    spills = re.findall(r"(\d+) bytes spill stores", log)
    assert spills and all(s == "0" for s in spills), log


@pytest.mark.nvrtc
@pytest.mark.parametrize("name", [n for n, s in SPECS.items() if cuda_tiles.use_mma(s)])
def test_sm90a_uses_wgmma_for_prefill(name):
    spec = SPECS[name].replace(arch="sm_90a")
    assert cuda_tiles.use_wgmma(spec) and not cuda_tiles.use_wgmma(SPECS[name])
    last = _buckets(spec)[-1]
    want = "wgmma_ws" if cuda_tiles.use_ws(spec, "sm_90a") else "wgmma"   # persistent where it applies
    assert last.ffn1.kind == last.ffn2.kind == want
    cubin, log = compile_ffn(spec, arch="sm_90a")
    assert last.ffn1_kernel.encode() in cubin and last.ffn2_kernel.encode() in cubin
    spills = re.findall(r"(\d+) bytes spill stores", log)
    assert spills and all(s == "0" for s in spills), log


@pytest.mark.nvrtc
def test_matrix_shapes_compile():
    for spec in (MoESpec(8, 2, 4096, 14336, dtype="bfloat16"), MoESpec(256, 8, 7168, 2048, dtype="bfloat16"),
                 MoESpec(128, 8, 2048, 768, dtype="bfloat16")):
        cubin, _ = compile_ffn(spec)
        assert len(cubin) > 0


# -- GPU: the kernels against the reference --------------------------------------------------

def _cupy():
    try:
        import cupy as cp
        if cp.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no device")
    except Exception:  # noqa: BLE001 - no GPU: skip
        pytest.skip("no CUDA device")
    return cp


@dataclass
class FfnModule:
    """The ffn kernels of one spec, loaded from their own cubin (what CudaModule provides to
    `cuda_ffn`: spec, plan, layout, function(name))."""
    spec: MoESpec
    plan: object
    layout: object
    raw: object

    def function(self, name):
        return self.raw.get_function(name)


@dataclass
class FfnWorkspace:
    bucket: object
    tokens: int
    sorted_rows: object
    tile_expert: object
    tile_row0: object
    num_tiles: object
    h: object
    y_slot: object
    topk_weights: object
    sched1: object = None
    sched2: object = None
    h_map: object = None


def _raw(spec: MoESpec):
    """The NumPy/CuPy dtype holding the storage bits (CuPy has no bfloat16: uint16 for it)."""
    return np.dtype(np.uint16) if spec.dtype == "bfloat16" else spec.dt.numpy


def _poison(cp, a):
    # all-ones bits are a NaN in fp32, fp16 and bf16 alike
    a.view(cp.uint8).fill(0xFF)


def run_ffn(spec: MoESpec, T: int, seed: int = 0, tuning: dict | None = None, repeat: int = 1):
    """Run ffn1 + ffn2 for T random tokens; returns (out [T, H] float64, ref [T, H] float64).
    ``repeat`` > 1: run them that many times and require bitwise equal y_slot every time, and
    the persistent kernels' tile counters back at 0."""
    cp = _cupy()
    from moegen.backends import cuda_ffn, cuda_tma
    mod = _module(spec, tuning)
    x, w = reference.random_problem(spec, T, seed=seed)
    ids, wts, _, _ = reference.route(spec, x, w["router"])
    wts = wts.astype(np.float32)
    logical = logical_weights(spec, **reference.weight_kwargs(spec, w))
    buf, router = pack_host(mod.layout, logical)
    raw = _raw(spec)
    packed = PackedWeights(cp.asarray(buf.view(raw)), cp.asarray(router.view(raw)), mod.layout)
    cfg = cuda_tiles.bucket_for(list(mod.plan.buckets), T)
    sizes = cuda_tiles.workspace_sizes(spec, cfg, max(T, 1))
    sr, te, tr, nt = cuda_tiles.grouped_layout_host(spec, ids, cfg.bm, sizes["max_tiles"])
    ws = FfnWorkspace(cfg, T, cp.asarray(sr), cp.asarray(te), cp.asarray(tr), cp.asarray(nt),
                      cp.empty(sizes["h"], raw), cp.empty(sizes["y_slot"], raw),
                      cp.asarray(wts.reshape(T, spec.top_k)))
    if cfg.ffn2.persistent:
        c = mod.plan.ws.counters
        sched = cp.zeros(2 * c, cp.int32)
        ws.sched1, ws.sched2 = sched[:c], sched[c:]
        t = cfg.ffn2
        ws.h_map = cuda_tma.encode(ws.h.data.ptr, cuda_tma.h_map(spec, sizes["max_tiles"] * cfg.bm, t.bm, t.bk))
    _poison(cp, ws.h)
    _poison(cp, ws.y_slot)
    call = Call(x=cp.asarray(x.view(raw)), packed=packed, out=None, tokens=T)
    first = None
    for _ in range(repeat):
        cuda_ffn.launch_ffn1(mod, ws, call)
        cuda_ffn.launch_ffn2(mod, ws, call)
        cp.cuda.get_current_stream().synchronize()
        if first is None:
            first = ws.y_slot.copy()
        else:
            assert bool((ws.y_slot == first).all()), "y_slot differs between two runs"
        if ws.sched1 is not None:
            assert ws.sched1.tolist() == ws.sched2.tolist() == [0] * mod.plan.ws.counters
    KT = spec.top_k + spec.num_shared_experts
    y = ws.y_slot.get().view(spec.dt.numpy)[: cfg.ffn2_splits * T * KT * spec.hidden_dim]
    y = y.astype(np.float64).reshape(cfg.ffn2_splits, T, KT, spec.hidden_dim)
    out = np.zeros((T, spec.hidden_dim))
    for s in range(KT):               # the combine stage's order: slots, then splits
        for z in range(cfg.ffn2_splits):
            out += y[z, :, s]
    ref = reference.experts(spec, x, logical, ids, wts)
    return out, ref


_MODULES: dict = {}


def _module(spec: MoESpec, tuning: dict | None = None) -> FfnModule:
    cp = _cupy()
    key = (spec, tuple(sorted((tuning or {}).items())))
    if key not in _MODULES:
        import os
        import tempfile
        arch = spec.arch or _arch(cp)
        cubin, _ = compile_ffn(spec, arch=arch, tuning=tuning)
        path = os.path.join(tempfile.mkdtemp(prefix="moegen-ffn-test-"), "ffn.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        raw = cp.RawModule(path=path)       # loads lazily: the file must outlive this call
        sms = cp.cuda.Device().attributes["MultiProcessorCount"]
        _MODULES[key] = FfnModule(spec, _plan(spec, arch, tuning, sms=sms), cuda_tiles.packed_layout(spec), raw)
    return _MODULES[key]


def _arch(cp) -> str:
    return f"sm_{cp.cuda.Device().compute_capability}"


def _token_counts(spec):
    counts = {1, 2, 7}
    for cfg in _buckets(spec):
        if cfg.max_tokens is not None:
            counts |= {cfg.max_tokens, cfg.max_tokens + 1}
        counts |= {cfg.bm - 1, cfg.bm, cfg.bm + 1}
    counts.add(700)
    return sorted(counts)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SPECS))
def test_ffn_matches_reference(name):
    spec = SPECS[name]
    for T in _token_counts(spec):
        out, ref = run_ffn(spec, T, seed=T)
        err = reference.rel_error(out, ref)
        assert err <= spec.dt.tolerance, f"{name} T={T}: rel error {err:.3g} > {spec.dt.tolerance}"


@pytest.mark.gpu
def test_zero_tokens_launch_nothing():
    out, ref = run_ffn(SPECS["e8-k2-h256-f512-bf16-swiglu"], 0)
    assert out.shape == ref.shape == (0, 256)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["e8-k2-h256-f512-bf16-swiglu", "e16-k4-h200-f136-bf16-geglu-bias",
                                  "e5-k3-h33-f17-fp32-silu-bias-odd"])
def test_small_grid(name):
    """A few token counts per path: small enough to run under compute-sanitizer memcheck."""
    spec = SPECS[name]
    for T in (1, 17, 300):
        out, ref = run_ffn(spec, T, seed=100 + T)
        assert reference.rel_error(out, ref) <= spec.dt.tolerance


_WS_TILE = {"tile_bm128": cuda_tiles.WS_TILES[128].tag}


# The sm_90a prefill kernels' specs: the tensor-core ones, and one whose N sizes (2F = 640,
# H = 192) are not whole 256-wide tiles (TMA fills the boxes' out-of-bounds rows with zeros).
PREFILL_SPECS = {**{n: s for n, s in SPECS.items() if cuda_tiles.use_mma(s)},
                 "e8-k2-h192-f320-bf16-swiglu": MoESpec(8, 2, 192, 320, dtype="bfloat16")}


@pytest.mark.gpu
@pytest.mark.parametrize("tile", ["default", "ws"])
@pytest.mark.parametrize("name", list(PREFILL_SPECS))
def test_wgmma_prefill_matches_reference(name, tile):
    """The sm_90a prefill kernels (the default one-CTA-per-tile wgmma tile, and the persistent
    "wgmma_ws" tuning choice where it applies) past the mid bucket, at its boundary, odd counts,
    and a T with more tiles than SMs; the persistent kernel twice per T, bitwise equal."""
    cp = _cupy()
    if cp.cuda.Device().compute_capability != "90":
        pytest.skip("wgmma needs an sm_90 device")
    spec = PREFILL_SPECS[name].replace(arch="sm_90a")
    tuning = _WS_TILE if tile == "ws" else None
    if tile == "ws" and not cuda_tiles.use_ws(spec):
        pytest.skip("the persistent kernel does not apply")
    start = _buckets(spec)[-2].max_tokens + 1
    for T in (start, start + 1, start + 129, 2000, 5001):
        out, ref = run_ffn(spec, T, seed=7 + T, tuning=tuning, repeat=2 if tile == "ws" else 1)
        err = reference.rel_error(out, ref)
        assert err <= spec.dt.tolerance, f"{name} sm_90a {tile} T={T}: rel error {err:.3g}"
