"""The CUDA backward without a GPU: its plan, its source and an NVRTC compile of every kernel.

Marked ``nvrtc`` where NVRTC is needed (CuPy's, no GPU).  The grid covers every dtype,
activation and routing, biases, shared experts, capacity with and without renormalisation,
E up to 1024 and odd H/F, on sm_90 and sm_90a.
"""

from __future__ import annotations

import re

import pytest

from moegen.backends import cuda_backward as cb
from moegen.backends.cuda import CudaBackend
from moegen.spec import MoESpec

from backward_cuda_specs import SPECS

GRID = SPECS


def _need_nvrtc():
    if not CudaBackend().can_compile():
        pytest.skip("CuPy/NVRTC not installed")


def _plan(spec: MoESpec, arch: str) -> cb.CudaBackwardPlan:
    return cb.backward_plan(spec.replace(backend="cuda", arch=arch))


@pytest.mark.nvrtc
@pytest.mark.parametrize("arch", ["sm_90", "sm_90a"])
@pytest.mark.parametrize("name", list(GRID))
def test_every_backward_kernel_compiles(name, arch):
    _need_nvrtc()
    art = cb.compile_backward(_plan(GRID[name], arch))
    assert art.meta["target"] == arch
    for kernel in cb.KERNELS:
        assert kernel.encode() in art.binary, kernel


@pytest.mark.parametrize("name", list(GRID))
def test_the_source_has_no_atomics_and_every_kernel(name):
    src = cb.render_backward(_plan(GRID[name], "sm_90")).text
    assert not re.search(r"atomic\w*\s*\(|\batom\.|\bred\.", src)     # no atomic op, C++ or PTX
    defined = set(re.findall(r'extern "C" __global__ void(?: __launch_bounds__\(\w+\))?\s+(\w+)\(', src))
    assert defined == set(cb.KERNELS)
    spec = GRID[name]
    assert f"constexpr int kGate = {spec.ffn_dim * (2 if spec.gated else 1)};" in src
    assert f"act_{spec.act.fn}(gf)" in src and f"dact_{spec.act.fn}(gf)" in src


@pytest.mark.parametrize("name", list(GRID))
def test_bf16_takes_tensor_cores_and_the_rest_simt(name):
    spec = GRID[name]
    for arch in ("sm_80", "sm_90", "sm_90a"):
        plan = _plan(spec, arch)
        src = cb.render_backward(plan).text
        tc = spec.dtype == "bfloat16"
        assert plan.tensor_cores is tc
        assert ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in src) is tc
        assert "#define BWD_TILE " + ("bwd_mma_tile" if tc else "bwd_gemm_tile") in src
        assert (plan.bm, plan.bn, plan.bk) == ((128, 128, 64) if tc else (64, 64, 16))
        # the five big GEMMs take the cp.async pipeline where every row is whole 16-byte chunks
        pipe = tc and spec.hidden_dim % 8 == 0 and spec.ffn_dim % 8 == 0
        assert plan.pipelined is pipe
        assert ("#define BWD_BIG_TILE bwd_pipe_tile" in src) is pipe
        assert ("#define BWD_BIG_TILE BWD_TILE" in src) is not pipe
        assert plan.pipe_smem == (3 * 2 * 128 * 64 * 2 if pipe else 0)
    assert not _plan(spec, "sm_75").tensor_cores
    assert not _plan(spec, "sm_75").pipelined


@pytest.mark.nvrtc
@pytest.mark.parametrize("warps", [(2, 4), (2, 2)])
@pytest.mark.parametrize("arch", ["sm_90", "sm_90a"])
def test_pipelined_gemms_compile_without_spills_two_blocks_per_sm(arch, warps, monkeypatch):
    """The five kernels on bwd_pipe_tile (mixtral-8x7b's shape), in both warp layouts: no
    spills, and two blocks fit an H100/H200 SM: registers (64K a SM) and twice the dynamic
    shared memory plus the 1 KB a block reserves (228 KB a SM)."""
    _need_nvrtc()
    from cupy_backends.cuda.libs import nvrtc   # optional heavy package: NVRTC tests only
    monkeypatch.setattr(cb, "PIPE_WARPS", warps)
    spec = MoESpec(8, 2, 4096, 14336, dtype="bfloat16").replace(backend="cuda", arch=arch)
    plan = cb.backward_plan(spec)
    assert plan.pipelined and plan.pipe_warps == warps and plan.pipe_threads == 32 * warps[0] * warps[1]
    assert 2 * (plan.pipe_smem + 1024) <= 228 * 1024
    prog = nvrtc.createProgram(cb.render_backward(plan).text, "backward.cu", [], [])
    nvrtc.compileProgram(prog, CudaBackend().options(spec, arch) + ["--ptxas-options=-v"])
    log = nvrtc.getProgramLog(prog)
    log = log if isinstance(log, str) else log.decode()
    props = dict(re.findall(r"Function properties for (\w+)\n((?:[^\n]*\n){2})", log))
    for name in cb.PIPE_KERNELS:
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", props[name])
        regs = re.search(r"Used (\d+) registers", props[name])
        assert spills.groups() == ("0", "0"), (name, props[name])
        assert 2 * int(regs.group(1)) * plan.pipe_threads <= 64 * 1024, (name, props[name])


def test_render_is_pure_and_follows_the_plan():
    plan = _plan(GRID["e8-k2-h512-f2048-bf16-swiglu"], "sm_90")
    a, b = cb.render_backward(plan).text, cb.render_backward(plan).text
    assert a == b
    other = cb.render_backward(_plan(GRID["e8-k2-h512-f2048-bf16-swiglu"].replace(top_k=3), "sm_90"))
    assert "constexpr int kTopK = 3;" in other.text and "constexpr int kTopK = 2;" in a
    assert cb.key_parts(plan, cb.render_backward(plan), None)["backward"] == plan.own()


def test_what_the_cuda_backward_lacks_is_refused_in_one_line():
    spec = GRID["e8-k2-h512-f2048-bf16-swiglu"]
    with pytest.raises(ValueError, match="save_activations=True is not built on the cuda backend"):
        _plan(spec.replace(save_activations=True), "sm_90")
    with pytest.raises(ValueError, match="the CUDA backward needs spec.backend 'cuda', got 'c'"):
        cb.backward_plan(spec.replace(backend="c"))
    with pytest.raises(TypeError, match="spec must be a MoESpec, got dict"):
        cb.CudaBackward({})


def test_tensors_off_a_16_byte_boundary_are_copied_before_vector_reads():
    torch = pytest.importorskip("torch")
    base = torch.arange(64, dtype=torch.bfloat16)
    view = base[1:33]                               # 2 bytes past an aligned start
    assert view.data_ptr() % cb.VECTOR_ALIGN != 0
    fixed = cb._aligned(view)
    assert fixed.data_ptr() % cb.VECTOR_ALIGN == 0 and torch.equal(fixed, view)
    aligned = base[8:40]
    assert cb._aligned(aligned) is aligned and cb._aligned(None) is None


@pytest.mark.nvrtc
@pytest.mark.parametrize("name", ["e8-k2-h512-f2048-bf16-swiglu", "e16-k2-h64-f64-fp16-sigmoid-sh2",
                                  "e8-k2-h100-f100-fp32-gelu-bias-cap"])
def test_gradients_are_stored_in_the_parameter_dtype_unless_fp32_is_asked(name):
    """The gradient outputs (grad_t) are the storage type, fp32 for fp32 layers; the
    fp32_grads build (the reference of the bitwise rounding tests) also compiles."""
    _need_nvrtc()
    import dataclasses
    plan = _plan(GRID[name], "sm_90")
    assert plan.grad_dtype == GRID[name].dtype and not plan.fp32_grads
    src = cb.render_backward(plan).text
    assert "typedef elem_t grad_t;" in src and "typedef float grad_t;" not in src
    wide = dataclasses.replace(plan, fp32_grads=True)
    assert wide.grad_dtype == "float32" and wide.own() != plan.own()
    wsrc = cb.render_backward(wide).text
    assert "typedef float grad_t;" in wsrc and "typedef elem_t grad_t;" not in wsrc
    art = cb.compile_backward(wide)
    for kernel in cb.KERNELS:
        assert kernel.encode() in art.binary, kernel


def test_gradient_outputs_of_the_wrong_dtype_are_refused_in_one_line():
    torch = pytest.importorskip("torch")
    spec = GRID["e8-k2-h512-f2048-bf16-swiglu"]
    bwd = cb.CudaBackward.__new__(cb.CudaBackward)          # no GPU: the checks run first
    bwd.plan = _plan(spec, "sm_90")
    bwd.spec = bwd.plan.spec
    H, F, E = spec.hidden_dim, spec.ffn_dim, spec.num_experts
    x = torch.zeros((0, H), dtype=torch.bfloat16)
    params = {"router": torch.zeros((E, H), dtype=torch.bfloat16)}
    with pytest.raises(ValueError, match=r"out\['w1'\] must be a contiguous torch.bfloat16 tensor "
                                         rf"of shape \({E}, {F}, {H}\), got torch.float32"):
        bwd.backward(None, x, params, x, None, None, out={"w1": torch.zeros((E, F, H))})


def test_gradient_outputs_off_a_16_byte_boundary_are_refused_in_one_line():
    """The pipelined tile stores two adjacent gradients at once: an offset view is refused."""
    torch = pytest.importorskip("torch")
    spec = GRID["e8-k2-h512-f2048-bf16-swiglu"]
    bwd = cb.CudaBackward.__new__(cb.CudaBackward)
    bwd.plan = _plan(spec, "sm_90")
    bwd.spec = bwd.plan.spec
    H, E = spec.hidden_dim, spec.num_experts
    x = torch.zeros((0, H), dtype=torch.bfloat16)
    router = torch.zeros(E * H + 1, dtype=torch.bfloat16)[1:].view(E, H)
    with pytest.raises(ValueError, match=r"out\['router'\] must start on a 16-byte boundary, got "
                                         r"an address 2 bytes past one"):
        bwd.backward(None, x, {"router": router}, x, None, None, out={"router": router})
