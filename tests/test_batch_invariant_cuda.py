"""Batch invariance on the cuda backend, without a GPU: the plan of a batch-invariant spec uses
one GEMM configuration (tile per stage, no split-K) and one router path (no split-K) for every
token count, and its cubin compiles.  The GPU comparison of token outputs across T is in
tests/test_batch_invariant_gpu.py."""

import pytest

from moegen.backends import cuda_tiles
from moegen.backends.cuda import CudaBackend
from moegen.backends.cuda_workspace import launch_shapes
from moegen.plan import make_plan
from moegen.render import render
from moegen.spec import MoESpec

TOKENS = (1, 7, 16, 17, 100, 300, 1000, 9000, 65536)

SPECS = [
    pytest.param(MoESpec(128, 8, 2048, 768, dtype="bfloat16"), "sm_90a", id="qwen3-bf16-sm90a"),
    pytest.param(MoESpec(8, 2, 512, 2048, dtype="float16", bias=True), "sm_90a", id="e8-fp16-bias-sm90a"),
    pytest.param(MoESpec(64, 6, 1000, 1408, dtype="bfloat16", activation="geglu"), "sm_90",
                 id="e64-bf16-geglu-sm90"),
    pytest.param(MoESpec(8, 2, 100, 100, dtype="float32", activation="gelu"), "sm_90", id="e8-fp32-simt"),
    pytest.param(MoESpec(256, 8, 7168, 2048, dtype="bfloat16", routing="sigmoid_topk", n_group=8,
                         topk_group=4, num_shared_experts=1), "sm_90a", id="dsv3-bf16-sm90a"),
]


def _plan(spec, arch, bi):
    return make_plan(spec.replace(backend="cuda", arch=arch, batch_invariant=bi), arch, {}).detail


@pytest.mark.parametrize("spec,arch", SPECS)
def test_one_gemm_configuration_without_split_k(spec, arch):
    p = _plan(spec, arch, True)
    assert len(p.buckets) == 1
    (b,) = p.buckets
    assert b.max_tokens is None and b.ffn2_splits == 1
    # the tile is the default plan's prefill tile: a kernel the default already runs
    default = _plan(spec, arch, False).buckets[-1]
    assert (b.ffn1, b.ffn2, b.ffn1_kernel, b.ffn2_kernel) == (default.ffn1, default.ffn2,
                                                              default.ffn1_kernel, default.ffn2_kernel)
    assert {cuda_tiles.bucket_for(list(p.buckets), T) for T in TOKENS} == {b}


@pytest.mark.parametrize("spec,arch", SPECS)
def test_one_router_path_without_split_k(spec, arch):
    s = spec.replace(backend="cuda", arch=arch, batch_invariant=True)
    p = _plan(spec, arch, True)
    shapes = [launch_shapes(s, p, T) for T in TOKENS]
    assert {(ls.route_kernel, ls.route_splits, ls.route_k_chunk >= spec.hidden_dim) for ls in shapes} \
        == {(shapes[0].route_kernel, 1, True)}
    assert shapes[0].route_kernel != "moe_route_logits_gemv"


@pytest.mark.parametrize("spec,arch", SPECS[:1])
def test_default_plan_changes_configuration_with_t(spec, arch):
    """What the mode removes: the default picks tiles, split-K and router path by T."""
    s = spec.replace(backend="cuda", arch=arch)
    p = _plan(spec, arch, False)
    configs = {(cuda_tiles.bucket_for(list(p.buckets), T).ffn2_kernel, launch_shapes(s, p, T).route_kernel,
                launch_shapes(s, p, T).route_splits) for T in TOKENS}
    assert len(configs) > 2


def test_tuning_offers_the_one_bucket_only():
    spec = MoESpec(128, 8, 2048, 768, dtype="bfloat16", backend="cuda", arch="sm_90a", batch_invariant=True)
    choices = cuda_tiles.tile_choices(spec, "sm_90a")
    assert list(choices) == ["tile_bm128"]
    p = make_plan(spec, "sm_90a", {"tile_bm128": choices["tile_bm128"][1]}).detail
    assert len(p.buckets) == 1 and p.buckets[0].ffn2_splits == 1
    with pytest.raises(ValueError, match="tile_bm16"):
        make_plan(spec, "sm_90a", {"tile_bm16": "mma_bm16_bn64_bk64_w1x4_s4"})


@pytest.mark.nvrtc
def test_batch_invariant_cubin_compiles():
    be = CudaBackend()
    if not be.can_compile():
        pytest.skip("CuPy/NVRTC not installed")
    spec = MoESpec(8, 2, 512, 1024, dtype="bfloat16", backend="cuda", arch="sm_90a", batch_invariant=True)
    plan = make_plan(spec, "sm_90a", {})
    art = be.compile(render(plan), spec, "sm_90a", "test-key")
    for name in plan.detail.kernels:
        assert name.encode() in art.binary, name
