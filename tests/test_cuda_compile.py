"""The cuda backend without a GPU: render and NVRTC-compile whole cubins, targets, options,
compile errors, and importing the backend without CuPy.

Marked ``nvrtc`` (needs CuPy's NVRTC, no GPU).  A few specs cover every value of the grid:
every dtype, activation and routing, E in {2, 8, 64, 128, 256}, k in {1, 2, 6, 8}, odd H/F
(100, 1000, 1408), biases, shared experts; sm_90 and sm_80.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from moegen.backends.cuda import CudaBackend
from moegen.backends.cuda_workspace import launch_shapes
from moegen.errors import CompileError, SpecError
from moegen.plan import make_plan
from moegen.render import render
from moegen.spec import MoESpec

BE = CudaBackend()


def _need_nvrtc():
    if not BE.can_compile():
        pytest.skip("CuPy/NVRTC not installed")


GRID = {
    "e8-k2-h512-f2048-bf16-swiglu-sm90": (MoESpec(8, 2, 512, 2048, dtype="bfloat16"), "sm_90"),
    "e2-k1-h100-f1000-fp32-relu-sm80": (MoESpec(2, 1, 100, 1000, dtype="float32", activation="relu"), "sm_80"),
    "e64-k6-h1000-f1408-fp16-geglu-topksm-bias-sm90": (
        MoESpec(64, 6, 1000, 1408, dtype="float16", activation="geglu", routing="topk_softmax", bias=True), "sm_90"),
    "e128-k8-h1408-f100-bf16-gelu-raw-sm80": (
        MoESpec(128, 8, 1408, 100, dtype="bfloat16", activation="gelu", renormalize=False), "sm_80"),
    "e256-k8-h7168-f2048-bf16-sigmoid-g8-tg4-sh1-sm90": (
        MoESpec(256, 8, 7168, 2048, dtype="bfloat16", routing="sigmoid_topk", n_group=8, topk_group=4,
                routed_scaling_factor=2.5, num_shared_experts=1), "sm_90"),
    "e1024-k16-h100-f100-fp16-silu-sigmoid-g32-sm90": (
        MoESpec(1024, 16, 100, 100, dtype="float16", activation="silu", routing="sigmoid_topk",
                n_group=32, topk_group=4), "sm_90"),
}


@pytest.mark.nvrtc
@pytest.mark.parametrize("name", list(GRID))
def test_whole_cubin_compiles(name):
    _need_nvrtc()
    spec, arch = GRID[name]
    spec = spec.replace(backend="cuda", arch=arch)
    plan = make_plan(spec, arch, {})
    sources = render(plan)
    art = BE.compile(sources, spec, BE.target(spec), "test-key")
    assert art.binary[:4] == b"\x7fELF"                 # a cubin (SASS), not PTX text
    assert art.meta["target"] == arch
    # every kernel the module will look up (the plan's list) is in the cubin
    names = plan.detail.kernels
    assert {c.ffn1_kernel for c in plan.detail.buckets} <= set(names)
    for n in names:
        assert n.encode() in art.binary, n


@pytest.mark.nvrtc
def test_compile_error_carries_log_and_source():
    _need_nvrtc()
    spec = MoESpec(8, 2, 64, 64, backend="cuda", arch="sm_90")
    from moegen.backends.base import Sources
    bad = Sources("cuda", {"moe.cu": "extern \"C\" __global__ void k() { int x = ; }\n"}, "moe.cu")
    with pytest.raises(CompileError) as info:
        BE.compile(bad, spec, "sm_90", "k" * 64)
    err = info.value
    assert "error" in err.log.lower()
    assert "--gpu-architecture=sm_90" in err.command
    assert "1 | extern" in err.dump()


def test_rendered_source_reads_constants_first():
    spec = MoESpec(8, 2, 512, 2048, dtype="bfloat16", backend="cuda", arch="sm_90")
    text = render(spec, BE).text
    head = text[:text.index("__device__")]
    lines = {line.split("//")[0].strip() for line in head.splitlines()}
    for line in ("constexpr int kExperts = 8;", "constexpr int kTopK = 2;",
                 "constexpr int kHidden = 512;", "constexpr int kFfn = 2048;",
                 "typedef unsigned short elem_t;", "constexpr int kVecH = 8;"):
        assert line in lines, line
    assert "#include" not in text           # no CUDA headers: they cost seconds of NVRTC time


def test_vector_width_divides_odd_rows():
    for H, dtype, vec in ((100, "bfloat16", 4), (1000, "float16", 8), (1408, "float32", 4),
                          (33, "float32", 1), (2, "bfloat16", 2)):
        text = render(MoESpec(8, 2, H, 64, dtype=dtype, backend="cuda", arch="sm_90"), BE).text
        assert f"constexpr int kVecH = {vec};" in text, (H, dtype)


def test_options_have_no_fast_math():
    opts = BE.options(MoESpec(8, 2, 64, 64), "sm_90")
    assert "--gpu-architecture=sm_90" in opts
    assert not any("fast" in o or "ftz=true" in o for o in opts)


def test_target_resolution(monkeypatch):
    assert BE.target(MoESpec(8, 2, 64, arch="sm_90a")) == "sm_90a"
    if BE.available():
        pytest.skip("a GPU is visible: target() follows it")
    monkeypatch.setenv("MOEGEN_CUDA_ARCH", "sm_89")
    assert BE.target(MoESpec(8, 2, 64)) == "sm_89"
    monkeypatch.delenv("MOEGEN_CUDA_ARCH")
    with pytest.raises(SpecError, match="arch"):
        BE.target(MoESpec(8, 2, 64))


CAPACITY = {
    "e8-k2-bf16-cap1-token-renorm": MoESpec(8, 2, 512, 2048, dtype="bfloat16", capacity_factor=1.0),
    "e16-k2-fp16-cap0.5-weight-raw-sh2": MoESpec(
        16, 2, 64, 64, dtype="float16", routing="sigmoid_topk", num_shared_experts=2,
        capacity_factor=0.5, capacity_drop="weight", renormalize=False),
    "e64-k6-fp32-cap1.25-weight-renorm": MoESpec(
        64, 6, 100, 1000, dtype="float32", activation="relu", capacity_factor=1.25,
        capacity_drop="weight"),
}


@pytest.mark.nvrtc
@pytest.mark.parametrize("name", list(CAPACITY))
def test_capacity_cubin_compiles(name):
    _need_nvrtc()
    spec = CAPACITY[name].replace(backend="cuda", arch="sm_90")
    art = BE.compile(render(spec, BE), spec, "sm_90", "test-key")
    assert art.binary[:4] == b"\x7fELF"
    names = ["moe_capacity_select", "moe_group_single_masked", "moe_group_count_masked",
             "moe_group_scatter_masked", "moe_group_single", "moe_group_scan", "moe_combine"]
    if spec.renormalize:
        names.append("moe_capacity_renorm")
    for n in names:
        assert n.encode() in art.binary, n


def test_capacity_code_only_in_capacity_specs():
    plain = render(MoESpec(8, 2, 512, 2048, dtype="bfloat16", backend="cuda", arch="sm_90"), BE).text
    for word in ("moe_capacity_select", "moe_group_single_masked", "MOE_CAPACITY_BY_WEIGHT"):
        assert word not in plain, word
    combine = plain[plain.index("moe_combine("):]
    assert "kept" not in combine[:combine.index("{")]       # the dropless combine is unchanged
    token = render(CAPACITY["e8-k2-bf16-cap1-token-renorm"].replace(backend="cuda", arch="sm_90"), BE).text
    assert "moe_capacity_renorm(" in token and "#define MOE_CAPACITY_BY_WEIGHT" not in token
    weight = render(CAPACITY["e16-k2-fp16-cap0.5-weight-raw-sh2"].replace(backend="cuda", arch="sm_90"),
                    BE).text
    assert "#define MOE_CAPACITY_BY_WEIGHT 1" in weight and "moe_capacity_renorm(" not in weight


def test_import_without_cupy():
    code = ("import sys; sys.modules['cupy'] = None; sys.modules['cupy_backends'] = None\n"
            "from moegen.backends.cuda import CudaBackend\n"
            "b = CudaBackend(); assert not b.available() and not b.can_compile()\n"
            "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


# -- launch plans (host integers only) --------------------------------------------------------
@pytest.mark.parametrize("spec", [MoESpec(8, 2, 512, 2048, dtype="bfloat16"),
                                  MoESpec(256, 8, 7168, 2048, dtype="bfloat16"),
                                  MoESpec(2, 1, 100, 1000, dtype="float32"),
                                  MoESpec(64, 6, 1000, 1408, dtype="float16", num_shared_experts=2)],
                         ids=lambda s: s.name)
@pytest.mark.parametrize("T", [0, 1, 16, 17, 63, 64, 65, 4096, 16384])
def test_plan_covers_every_token_expert_and_h(spec, T):
    spec = spec.replace(backend="cuda", arch="sm_90")
    cp = make_plan(spec, "sm_90", {}, sms=132).detail
    r, g = cp.route, cp.group
    p = launch_shapes(spec, cp, T)
    E, H = spec.num_experts, spec.hidden_dim
    gx, gy, gz = (tuple(p.route_grid) + (1,))[:3]
    if T <= r.gemv_max_tokens:
        assert p.route_kernel == "moe_route_logits_gemv" and p.route_splits == 1
        assert gx == E and gy * r.gemv_tokens >= T         # one block per router row
        assert p.route_block == r.gemv_threads and r.gemv_threads % 32 == 0
        assert 32 <= r.gemv_threads <= 256
    else:
        mma = cp.tensor_cores
        assert p.route_kernel == ("moe_route_logits_mma" if mma else "moe_route_logits_tiled")
        assert gx * r.tile_m >= T and gy * r.tile_n >= E and gz == p.route_splits <= r.max_splits
        # the splits cover H exactly once, each a whole number of k tiles
        assert p.route_k_chunk % (64 if mma else 32) == 0
        assert (p.route_splits - 1) * p.route_k_chunk < H <= p.route_splits * p.route_k_chunk
        assert p.route_block == (r.mma_threads if mma else r.threads)
    slots = T * (spec.top_k + spec.num_shared_experts)
    assert p.fused_route_group == (0 < T <= 16)
    assert p.group_single == (slots <= g.single_max_slots)
    assert p.group_units * g.unit_slots >= slots
    assert p.combine_blocks * cp.combine_threads * cp.vec_h >= T * H


# -- the persistent warp-specialised prefill kernel (sm_90a) ----------------------------------
@pytest.mark.nvrtc
@pytest.mark.parametrize("spec", [
    MoESpec(8, 2, 4096, 14336, dtype="bfloat16"),
    MoESpec(256, 8, 7168, 2048, dtype="bfloat16", routing="sigmoid_topk", n_group=8, topk_group=4,
            num_shared_experts=1),
    MoESpec(128, 8, 2048, 768, dtype="float16", activation="gelu")],
    ids=lambda s: s.name)
def test_persistent_prefill_kernels_compile_for_sm90a_without_spills(spec):
    """The prefill bucket's "wgmma_ws" kernels (a tuning choice) compile through NVRTC for
    sm_90a, the register split of the plan is honoured (ptxas warns C7508 when it ignores
    setmaxnreg) from the launch count the plan's check assumes, nothing spills, and the plan's
    shared memory fits an H100/H200 block."""
    _need_nvrtc()
    from cupy_backends.cuda.libs import nvrtc   # optional heavy package: NVRTC tests only
    from moegen.backends import cuda_plan, cuda_tiles
    spec = spec.replace(backend="cuda", arch="sm_90a")
    plan = make_plan(spec, "sm_90a", {"tile_bm128": cuda_tiles.WS_TILES[128].tag})
    last = plan.detail.buckets[-1]
    assert last.ffn1.kind == last.ffn2.kind == "wgmma_ws"
    assert last.ffn1.smem_bytes(spec.dt.itemsize) <= 227 * 1024
    prog = nvrtc.createProgram(render(plan).text, "moe.cu", [], [])
    nvrtc.compileProgram(prog, BE.options(spec, "sm_90a") + ["--ptxas-options=-v"])
    log = nvrtc.getProgramLog(prog)
    log = log if isinstance(log, str) else log.decode()
    assert "C7508" not in log
    spills = dict(re.findall(r"Function properties for (\w+)\n[^\n]*?(\d+) bytes spill stores", log))
    regs = dict(re.findall(r"Function properties for (\w+)\n[^\n]*\n[^\n]*?Used (\d+) registers", log))
    for name in (last.ffn1_kernel, last.ffn2_kernel):
        assert spills[name] == "0", (name, log)
        assert int(regs[name]) == cuda_plan.launch_registers(last.ffn1.threads), (name, log)
        assert name.encode() in nvrtc.getCUBIN(prog)


def _kernel_bodies(text: str) -> dict[str, str]:
    """Name -> body (between its braces) of every extern "C" __global__ kernel of ``text``."""
    out = {}
    for m in re.finditer(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?'
                         r'(\w+)\s*\(', text):
        start = text.index("{", m.end())
        depth, i = 0, start
        while True:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        out[m.group(1)] = text[start + 1:i]
    return out


@pytest.mark.parametrize("name", list(GRID) + ["capacity"])
def test_every_kernel_of_a_call_waits_for_the_kernel_before_it(name):
    """Programmatic dependent launch (cuda_launch.Program launches every kernel after the
    first that way on sm_90+) is only safe if every kernel of the cubin waits for its
    predecessor: pdl_enter() first, or, in ffn2's tensor-core kernels, the main loop's wait
    after the weight prefetch."""
    if name == "capacity":
        spec, arch = MoESpec(16, 2, 256, 512, dtype="bfloat16", capacity_factor=1.25), "sm_90a"
    else:
        spec, arch = GRID[name]
    spec = spec.replace(backend="cuda", arch=arch)
    plan = make_plan(spec, arch, {})
    bodies = _kernel_bodies(render(plan).text)
    assert set(plan.detail.kernels) <= set(bodies)
    for kernel, body in bodies.items():
        first = body.strip().split(";")[0].strip()
        assert first == "pdl_enter()" or ("ffn2_mma<" in body and "pdl_enter" not in body), kernel
