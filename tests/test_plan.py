"""KernelPlan: one pure plan that the render, the workspaces and the launches all read.

A tile or launch constant changed in the plan shows up in the rendered source, in the
workspace sizes and in the grid/block the module launches (checked without a GPU: the
workspace is allocated through NumPy standing in for CuPy's allocation calls, and the launch
records its grid instead of running)."""

from __future__ import annotations

import dataclasses
import sys
import types

import numpy as np
import pytest

from moegen.backends import cuda_ffn, cuda_plan, cuda_tiles, cuda_tma, cuda_workspace
from moegen.backends.base import Call
from moegen.backends.cuda_plan import ARCH_SMS, CudaPlan
from moegen.backends.cuda_workspace import Workspace, launch_shapes
from moegen.plan import KernelPlan, make_plan, plan_text
from moegen.render import render
from moegen.spec import MoESpec

SPEC = MoESpec(8, 2, 256, 512, dtype="bfloat16", backend="cuda", arch="sm_90")


def test_make_plan_is_frozen_and_deterministic():
    a, b = make_plan(SPEC, "sm_90", {}), make_plan(SPEC, "sm_90", None)
    assert a == b and isinstance(a.detail, CudaPlan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.detail.sms = 1
    assert a.to_dict() == b.to_dict()


def test_plan_text_lists_every_constant():
    text = plan_text(make_plan(SPEC, "sm_90", {}))
    for needle in ("spec", "moe_e8_k2_h256_f512_bf16_swiglu", "target", "sm_90", "sms", "132",
                   "route.gemv_tokens", "group.warps", "buckets[bm16].ffn1.bn",
                   "buckets[bm16].ffn2_splits", "combine_threads", "kernels"):
        assert needle in text, needle
    assert str(make_plan(SPEC, "sm_90", {})) == text


def test_sm_count_is_a_plan_input_used_by_tiles_and_launches():
    assert make_plan(SPEC, "sm_90", {}).detail.sms == ARCH_SMS["sm_90"] == 132
    # split-K of the decode ffn2 is sized for the plan's SMs, and so are the route launches
    big = MoESpec(8, 2, 4096, 14336, dtype="bfloat16", backend="cuda", arch="sm_90")
    few = make_plan(big, "sm_90", {}, sms=2).detail
    many = make_plan(big, "sm_90", {}, sms=132).detail
    assert few.buckets[0].ffn2_splits < many.buckets[0].ffn2_splits
    assert launch_shapes(big, few, 5000).select_blocks == 4 * 2
    assert launch_shapes(big, many, 5000).select_blocks == 4 * 132
    assert launch_shapes(big, few, 100).route_splits < launch_shapes(big, many, 100).route_splits


def _fake_cupy(monkeypatch, maps: list | None = None):
    """CuPy's allocation calls answered by NumPy (sizes and shapes only; nothing runs), and
    TMA tensor maps recorded in ``maps`` as (address, MapShape) instead of encoded."""
    fake = types.SimpleNamespace(empty=np.empty, zeros=np.zeros, int32=np.int32,
                                 float32=np.float32, uint8=np.uint8)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    log = maps if maps is not None else []

    def encode(address, shape):
        log.append((address, shape))
        return ("map", address, shape)
    monkeypatch.setattr(cuda_tma, "encode", encode)
    monkeypatch.setattr(cuda_workspace, "device_address", lambda a: a.ctypes.data)


class _Recorder:
    """Stands in for a cupy.RawKernel: records the launch instead of running it."""
    max_dynamic_shared_size_bytes = 0

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __call__(self, grid, block, args, shared_mem=0):
        self.log.append((self.name, tuple(grid), tuple(block), shared_mem))
        self.args = args


def _launch(plan: KernelPlan, tokens: int, monkeypatch):
    """(workspace view, recorded ffn1/ffn2 launches) of ``tokens`` tokens under ``plan``."""
    _fake_cupy(monkeypatch)
    cp = plan.detail
    cfg = cuda_tiles.bucket_for(cp.buckets, tokens)
    ws = Workspace(plan.spec, cp, cfg, 64).view(tokens)
    log: list = []
    module = types.SimpleNamespace(spec=plan.spec, layout=cuda_tiles.packed_layout(plan.spec),
                                   function=lambda name: _Recorder(name, log))
    call = Call(x=0, packed=types.SimpleNamespace(buffer=0), out=None, tokens=tokens,
                topk_weights=0)
    cuda_ffn.launch_ffn1(module, ws, call)
    cuda_ffn.launch_ffn2(module, ws, call)
    return ws, log


def test_a_tile_changed_in_the_plan_reaches_render_workspace_and_launch(monkeypatch):
    base = make_plan(SPEC, "sm_90", {})
    bucket = base.detail.buckets[0]
    assert bucket.bm == 16 and bucket.ffn2.bn == 64
    # the decode bucket gets 32-row tiles 64 wide (a shape no default bucket uses), and 3 K splits
    tile = cuda_tiles.GemmTile("mma", 32, 64, 64, 2, 2, 3, min_blocks=1)
    new_bucket = dataclasses.replace(bucket, bm=32, ffn1=tile, ffn2=tile, ffn2_splits=3,
                                     ffn1_kernel=f"moe_ffn1_{tile.tag}",
                                     ffn2_kernel=f"moe_ffn2_{tile.tag}_k3")
    detail = dataclasses.replace(base.detail, buckets=(new_bucket, *base.detail.buckets[1:]),
                                 route=dataclasses.replace(base.detail.route, tile_m=32))
    changed = dataclasses.replace(base, detail=detail)

    # render
    old_src, new_src = render(base).text, render(changed).text
    assert "ffn2_mma<32, 64, 2, 2, 3, 3, 64>(" in new_src and "ffn2_mma<32, 64, 2, 2" not in old_src
    assert "moe_ffn2_mma_bm32_bn64_bk64_w2x2_s3_k3(" in new_src
    assert "constexpr int kRouteBM = 32;" in new_src and "constexpr int kRouteBM = 64;" in old_src

    # workspace and launch
    T = 10
    ws0, log0 = _launch(base, T, monkeypatch)
    ws1, log1 = _launch(changed, T, monkeypatch)
    assert ws0.y_slot.shape == (bucket.ffn2_splits, T * 2, 256)
    assert ws1.y_slot.shape == (3, T * 2, 256)
    assert ws1.sorted_rows.size == ws1.max_tiles * 32 and ws0.sorted_rows.size == ws0.max_tiles * 16
    (n1, grid1, block1, smem1), (n2, grid2, block2, smem2) = log1
    assert n1 == new_bucket.ffn1_kernel and n2 == new_bucket.ffn2_kernel
    assert block1 == block2 == (tile.threads, 1, 1) == (128, 1, 1)
    assert smem2 == tile.smem_bytes(2) == 3 * (32 + 64) * 64 * 2
    m_tiles = min(T * 2, -(-T * 2 // 32) + 8)
    assert grid2 == (m_tiles * -(-256 // 64), 1, 3)
    assert log0[1][1] == (min(T * 2, -(-T * 2 // 16) + 8) * -(-256 // 64), 1, bucket.ffn2_splits)
    # route launches follow the plan's route tile
    assert launch_shapes(SPEC, detail, 100).route_grid[0] == -(-100 // 32)
    assert launch_shapes(SPEC, base.detail, 100).route_grid[0] == -(-100 // 64)


def test_tuning_a_bucket_tile_changes_plan_render_and_names():
    alt = "mma_bm64_bn64_bk64_w2x2_s4"
    tuned = make_plan(SPEC, "sm_90", {"tile_bm64": alt})
    mid = [b for b in tuned.detail.buckets if b.bm == 64][0]
    assert mid.ffn1.tag == alt and mid.ffn1_kernel in tuned.detail.kernels
    assert f"moe_ffn1_{alt}(" in render(tuned).text
    assert tuned.tuning == (("tile_bm64", alt),)
    with pytest.raises(ValueError, match="tile_bm64"):
        make_plan(SPEC, "sm_90", {"tile_bm64": "mma_bm64_bn7"})


def test_unresolved_spec_is_refused():
    with pytest.raises(ValueError, match="backend='auto'"):
        make_plan(MoESpec(8, 2, 64))


@pytest.mark.nvrtc
def test_every_tile_candidate_compiles():
    """Every tile `moegen tune` may pick compiles through NVRTC, without spills."""
    from moegen.backends.cuda import CudaBackend
    from moegen.tuning import candidates
    be = CudaBackend()
    if not be.can_compile():
        pytest.skip("CuPy/NVRTC not installed")
    for arch in ("sm_90", "sm_90a"):
        spec = SPEC.replace(arch=arch)
        allowed = be.tunables(spec)
        # every alternative tile once (one bucket changed at a time)
        choices = [{name: v} for name, values in allowed.items() for v in values[1:]]
        assert len(choices) >= 3 and len(candidates(allowed)) > len(choices)
        for choice in choices:
            plan = make_plan(spec, arch, choice)
            art = be.compile(render(plan), spec, arch, "t" * 64)
            for name in plan.detail.kernels:
                assert name.encode() in art.binary, (choice, name)


def _dry_module(plan: KernelPlan, log: list):
    """A CudaModule whose kernels record their launches (no cubin, no GPU)."""
    import contextlib
    from moegen.backends.cuda import CudaModule
    m = CudaModule.__new__(CudaModule)
    m.spec, m.plan = plan.spec, plan.detail
    m.layout, m.buckets = cuda_tiles.packed_layout(plan.spec), list(plan.detail.buckets)
    m._workspaces, m._functions, m._external_streams = {}, {}, {}

    def function(name):
        assert name in plan.detail.kernels, f"{name} is not a kernel of the plan"
        return _Recorder(name, log)

    m.function = function
    m._memset = lambda a: None
    m._stream_of = lambda a: contextlib.nullcontext()
    return m


@pytest.mark.parametrize("spec", [
    SPEC.replace(arch="sm_90a"),
    MoESpec(16, 2, 64, 64, dtype="float16", backend="cuda", arch="sm_90", capacity_factor=1.0,
            num_shared_experts=2),
    MoESpec(4, 1, 33, 17, backend="cuda", arch="sm_80", capacity_factor=0.5, renormalize=False)],
    ids=lambda s: s.name)
def test_every_stage_launches_the_plans_kernels_with_the_plans_blocks(spec, monkeypatch):
    _fake_cupy(monkeypatch)
    plan = make_plan(spec, spec.arch, {})
    cp, log = plan.detail, []
    m = _dry_module(plan, log)
    for T in (0, 3, 17, 50, 100, 9000):      # one per bucket; 9000 slots: past the one-block group
        ws = m.workspace(T)
        call = Call(x=0, packed=types.SimpleNamespace(buffer=0, router=0), out=0, tokens=T)
        for stage in m.stages:
            m.run_stage(stage, ws, call)
    blocks = {name: block for name, _, block, _ in log}
    want = {"moe_route_logits_gemv": (cp.route.gemv_threads,), "moe_route_select": (32 * cp.route.warps,),
            "moe_route_select_group": (32 * cp.group.fused_warps,),
            "moe_group_single": (32 * cp.group.warps,), "moe_group_scan": (cp.group.scan_threads,),
            "moe_group_count": (32 * cp.group.block_units,), "moe_combine": (cp.combine_threads,)}
    want["moe_route_logits_mma" if cp.tensor_cores else "moe_route_logits_tiled"] = \
        (cp.route.mma_threads if cp.tensor_cores else cp.route.threads,)
    if spec.capacity_factor is not None:
        want["moe_capacity_select"] = (cp.capacity_threads,)
    for b in cp.buckets:
        want[b.ffn1_kernel] = (b.ffn1.threads, 1, 1)
    assert {k: blocks.get(k) for k in want} == want
    smem = {name: s for name, _, _, s in log}
    if cp.tensor_cores:
        assert smem["moe_route_logits_mma"] == cp.route.mma_smem


# -- the persistent warp-specialised prefill kernel (tile kind "wgmma_ws") -------------------

WS_TAG = cuda_tiles.WS_TILES[128].tag


@pytest.mark.parametrize("spec, applies", [
    (MoESpec(8, 2, 4096, 14336, dtype="bfloat16"), True),
    (MoESpec(8, 2, 256, 512, dtype="float16"), True),
    (MoESpec(64, 8, 512, 256, dtype="bfloat16", num_shared_experts=1), True),
    (MoESpec(8, 2, 256, 512, dtype="bfloat16", activation="relu"), True),
    (MoESpec(8, 2, 256, 512, dtype="bfloat16", bias=True), False),        # no bias in its epilogue
    (MoESpec(8, 2, 200, 512, dtype="bfloat16"), False),                   # H not whole 64-wide k tiles
    (MoESpec(8, 2, 256, 136, dtype="bfloat16"), False),                   # F not whole 64-wide k tiles
    (MoESpec(8, 2, 256, 512, dtype="float32"), False),                    # no tensor cores
], ids=lambda v: v.name if isinstance(v, MoESpec) else str(v))
@pytest.mark.parametrize("default", [False, True], ids=["choice", "default"])
def test_persistent_prefill_kernel_is_offered_exactly_where_it_applies(spec, applies, default, monkeypatch):
    """The persistent kernel is offered for the prefill bucket on sm_90a where it applies, and
    only there: as a tuning choice while WS_DEFAULT is off (today), as the default with the
    wgmma tile as the choice once it is on."""
    monkeypatch.setattr(cuda_tiles, "WS_DEFAULT", default)
    for arch in ("sm_90a", "sm_90", "sm_80"):
        want = applies and arch == "sm_90a"
        assert cuda_tiles.use_ws(spec, arch) == want
        choices = cuda_tiles.tile_choices(spec, arch)
        assert (WS_TAG in choices.get("tile_bm128", ())) == want, (arch, choices)
        assert all(WS_TAG not in v for k, v in choices.items() if k != "tile_bm128")
        cp = make_plan(spec.replace(backend="cuda", arch=arch), arch, {}).detail
        kinds = [(b.ffn1.kind, b.ffn2.kind) for b in cp.buckets]
        assert all("wgmma_ws" not in k for k in kinds[:-1])
        assert (kinds[-1] == ("wgmma_ws", "wgmma_ws")) == (want and default), (arch, kinds)
        if want and default:
            assert choices["tile_bm128"][:2] == (WS_TAG, "wgmma_bm128_bn256_bk64_w2x4_s4")
        elif want:
            assert choices["tile_bm128"][:2] == ("wgmma_bm128_bn256_bk64_w2x4_s4", WS_TAG)
        if want:
            tuned = make_plan(spec.replace(backend="cuda", arch=arch), arch, {"tile_bm128": WS_TAG}).detail
            assert [(b.ffn1.kind, b.ffn2.kind) for b in tuned.buckets][-1] == ("wgmma_ws", "wgmma_ws")
        else:
            with pytest.raises(ValueError, match="tile_bm128"):
                make_plan(spec.replace(backend="cuda", arch=arch), arch, {"tile_bm128": WS_TAG})


def test_persistent_kernel_is_the_prefill_default_and_wgmma_the_alternative():
    spec = MoESpec(8, 2, 4096, 14336, dtype="bfloat16", backend="cuda", arch="sm_90a")
    old = make_plan(spec, "sm_90a", {"tile_bm128": "wgmma_bm128_bn256_bk64_w2x4_s4"})
    assert old.detail.buckets[-1].ffn1.kind == "wgmma"
    text = render(old).text
    assert "ffn_ws<" not in text and "mbarrier" not in text
    default = make_plan(spec, "sm_90a", {})
    assert default.detail.buckets[-1].ffn1.kind == "wgmma_ws"
    new_text = render(default).text
    assert "moe_ffn::ffn_ws<1, 256, 4, 8>(" in new_text and "moe_ffn::ffn_ws<2, 256, 4, 8>(" in new_text


def _ws_plan(spec, sms=132):
    return make_plan(spec, spec.arch, {"tile_bm128": WS_TAG}, sms=sms)


def test_a_register_split_the_cta_cannot_satisfy_is_refused():
    """setmaxnreg.inc waits for registers the producers' setmaxnreg.dec gave back to the CTA:
    48 / 232 at 384 threads (168 each at launch) frees 15360 and wants 16384, which hung the
    first device run; the render refuses it, and the default split fits exactly."""
    spec = MoESpec(8, 2, 256, 512, dtype="bfloat16", backend="cuda", arch="sm_90a")
    plan = _ws_plan(spec)
    ws = plan.detail.ws
    assert cuda_plan.launch_registers(384) == 168
    assert (168 - ws.producer_regs) * 128 >= (ws.consumer_regs - 168) * 256
    render(plan)
    for p_regs, c_regs in ((48, 232), (40, 240), (44, 224)):
        bad = dataclasses.replace(plan, detail=dataclasses.replace(
            plan.detail, ws=dataclasses.replace(ws, producer_regs=p_regs, consumer_regs=c_regs)))
        with pytest.raises(ValueError, match="producer_regs"):
            render(bad)
    ok = dataclasses.replace(plan, detail=dataclasses.replace(
        plan.detail, ws=dataclasses.replace(ws, producer_regs=48, consumer_regs=224)))
    assert "constexpr int kProducerRegs = 48;" in render(ok).text


def test_persistent_tile_constants_reach_render_workspace_and_launch(monkeypatch):
    """Every constant of the persistent kernel comes from the plan: a changed stage count,
    raster group and register split show up in the source, the shared memory and the launch;
    the launch uses at most the plan's SM count of CTAs, the tensor maps are made once (h with
    the workspace, the weights per packed buffer) and the tile counters live in the workspace."""
    spec = MoESpec(8, 2, 256, 512, dtype="bfloat16", backend="cuda", arch="sm_90a")
    base = _ws_plan(spec, sms=5)
    last = base.detail.buckets[-1]
    tile = dataclasses.replace(last.ffn1, stages=3, group_m=4)
    bucket = dataclasses.replace(last, ffn1=tile, ffn2=tile, ffn1_kernel=f"moe_ffn1_{tile.tag}",
                                 ffn2_kernel=f"moe_ffn2_{tile.tag}_k1")
    ws_plan = dataclasses.replace(base.detail.ws, producer_regs=48, consumer_regs=224)
    detail = dataclasses.replace(base.detail, buckets=(*base.detail.buckets[:-1], bucket), ws=ws_plan)
    changed = dataclasses.replace(base, detail=detail)
    text = render(changed).text
    assert "moe_ffn::ffn_ws<1, 256, 3, 4>(" in text and f"{bucket.ffn1_kernel}(" in text
    assert "constexpr int kProducerRegs = 48;" in text and "constexpr int kConsumerRegs = 224;" in text
    assert tile.threads == 384 and tile.persistent
    assert tile.smem_bytes(2) == 1024 + 3 * (128 + 256) * 128 + 16 * 3 + cuda_tiles.WS_RING_BYTES

    maps: list = []
    _fake_cupy(monkeypatch, maps)
    T = 5000
    ws = Workspace(spec, detail, bucket, 8192).view(T)
    assert ws.sched1.tolist() == ws.sched2.tolist() == [0] * detail.ws.counters
    (h_addr, h_shape), = maps          # h's map covers the workspace's whole h buffer
    assert h_shape.dims == (512, cuda_tiles.max_tiles(spec, bucket, 8192) * 128)
    assert h_shape.box == (64, 128) and h_shape.strides == (2 * 512,) and h_shape.data_type == 9
    log: list = []
    recorders = {}

    def function(name):
        recorders[name] = _Recorder(name, log)
        return recorders[name]
    module = types.SimpleNamespace(spec=spec, plan=detail, layout=cuda_tiles.packed_layout(spec),
                                   function=function)
    buffer = 0x7f0000000000           # a packed buffer's device address (as from torch)
    call = Call(x=0, packed=types.SimpleNamespace(buffer=buffer), out=None, tokens=T, topk_weights=0)
    for _ in range(2):
        cuda_ffn.launch_ffn1(module, ws, call)
        cuda_ffn.launch_ffn2(module, ws, call)
    assert len(maps) == 3            # h once with the workspace, w13 and w2 once per buffer
    w13, w2 = maps[1][1], maps[2][1]
    assert w13.dims == (256, 1024, 8) and w13.box == (64, 256, 1) and w2.dims == (512, 256, 8)
    for name, grid, block, smem in log:
        assert grid == (5, 1, 1) and block == (384, 1, 1) and smem == tile.smem_bytes(2)
    a1, a2 = recorders[bucket.ffn1_kernel].args, recorders[bucket.ffn2_kernel].args
    assert a1[0] == a1[1] == ("map", *maps[1]) and a1[-1] is ws.sched1 and a1[-2] is ws.h
    assert a2[0] is ws.h_map and a2[1] == ("map", *maps[2]) and a2[-1] is ws.sched2
