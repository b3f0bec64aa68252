"""The c backend's build side: ISA tiers and flags, compile errors, content-addressed
libraries, reusable workspaces, and what the compiler made of the micro-kernels."""

import dataclasses
import hashlib
import re
import shutil
import subprocess
import tracemalloc

import numpy as np
import pytest

from moegen import MoESpec
from moegen import reference as R
from moegen.backends import isa
from moegen.backends.base import Sources
from moegen.backends.c import CBackend, library_name
from moegen.errors import CompileError, SpecError
from moegen.kernel import MoEKernel
from moegen.render import render

BE = CBackend()
SPEC = MoESpec(8, 2, 100, 257, backend="c")


def build(spec, tier=None):
    """The artifact of ``spec`` rendered and compiled for ``tier`` (default: this CPU's)."""
    with pytest.MonkeyPatch.context() as mp:
        if tier:
            mp.setenv("MOEGEN_ISA", tier)
        return BE.compile(render(spec, BE), spec, BE.target(spec), "test")


@pytest.fixture(scope="module")
def seed_artifact():
    return build(SPEC)


def test_options_name_a_tier_and_keep_nan_checks():
    for name in isa.TIERS:
        opts = BE.options(SPEC, name)
        assert "-O3" in opts and "-fPIC" in opts and "-shared" in opts and "-fopenmp" in opts
        assert "-ffast-math" not in opts and "-march=native" not in opts
        assert any(o.startswith("-march=") for o in opts)
    with pytest.raises(SpecError, match="target"):
        BE.options(SPEC, "pentium4")


def test_isa_override_and_validation(monkeypatch):
    monkeypatch.setenv("MOEGEN_ISA", "x86-64-v2")
    assert BE.target(SPEC) == "x86-64-v2"
    assert "-march=x86-64-v2" in BE.options(SPEC, BE.target(SPEC))
    monkeypatch.setenv("MOEGEN_ISA", "sse9")
    with pytest.raises(SpecError, match="MOEGEN_ISA"):
        BE.target(SPEC)
    monkeypatch.delenv("MOEGEN_ISA")
    assert BE.target(SPEC) == isa.detect()
    assert isa.runnable(isa.TIERS[isa.detect()])


def test_toolchain_is_resolved_and_cached():
    tc = BE.toolchain()
    assert tc["cc"].startswith("/") and tc["version"] and "missing" not in tc
    assert BE.toolchain() == tc


def test_plan_is_pure_frozen_and_complete(monkeypatch):
    """Same inputs, equal plans, whatever the environment says; every constant the C code and
    the module need is in it."""
    plan = BE.plan(SPEC, "x86-64-v3", {})
    monkeypatch.setenv("MOEGEN_ISA", "sse9")                  # a plan reads no environment
    again = BE.plan(SPEC, "x86-64-v3", {})
    assert plan == again and hash(plan) == hash(again)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.bk = 1
    assert (plan.lanes, plan.bm, plan.bn, plan.bn1, plan.bk) == (8, 3, 4, 2, 512)
    assert (plan.widen, plan.pair_dot, plan.route_chunk) == ("copy", False, 64)
    assert "-march=x86-64-v3" in plan.options
    big = BE.plan(SPEC.replace(dtype="bfloat16", activation="relu"), "avx512-bf16",
                  {"kc": 256, "par_min_work": 1 << 16})
    assert (big.lanes, big.bm, big.bn, big.bn1, big.bk) == (16, 4, 6, 6, 256)
    assert (big.widen, big.pair_dot, big.par_min_work) == ("shift", True, 1 << 16)
    assert dict(big.tuning) == {"kc": 256, "par_min_work": 1 << 16}
    assert BE.plan(SPEC.replace(dtype="float16"), "x86-64-v2").widen == "scalar"
    assert BE.plan(SPEC.replace(dtype="float16"), "x86-64-v3").widen == "f16c"
    with pytest.raises(SpecError, match="target must be one of"):
        BE.plan(SPEC, "pentium4")
    with pytest.raises(ValueError, match="kc=3"):
        BE.plan(SPEC, "x86-64-v3", {"kc": 3})
    cap = BE.plan(MoESpec(8, 2, 64, capacity_factor=1.25, capacity_drop="weight", backend="c"),
                  "x86-64-v3")
    assert cap.fn["group_capacity"] == "moe_group_capacity"
    assert "scratch" in {b.name for b in cap.buffers(8)}
    assert "group_capacity" not in plan.fn
    assert "scratch" not in {b.name for b in plan.buffers(8)}


def _defines(text: str) -> dict[str, str]:
    return dict(re.findall(r"^#define (\w+) +(\S+)", text, re.M))


@pytest.mark.parametrize("tier", sorted(isa.TIERS))
def test_source_is_specialised_to_one_tier(tier):
    """The C of one tier carries that tier's constants only: no preprocessor conditionals,
    the tier's tile and SIMD width, the spec's numbers under their names."""
    spec = SPEC.replace(dtype="float16", bias=True, routing="sigmoid_topk", n_group=4,
                        topk_group=2)
    text = BE.render(BE.plan(spec, tier)).text
    assert not re.search(r"^\s*#\s*(if|ifdef|ifndef|elif|else|endif)\b", text, re.M)
    t = isa.TIERS[tier]
    d = _defines(text)
    assert (d["kLanes"], d["BM"], d["BN"], d["BK"]) == (str(t.vec_floats), str(t.mr),
                                                         str(t.ncol), "512")
    assert (d["kExperts"], d["kTopK"], d["kHidden"], d["kFfn"]) == ("8", "2", "100", "257")
    assert (d["kGroups"], d["kTopKGroups"], d["kGroupSize"]) == ("4", "2", "2")
    assert f"vector_size({4 * t.vec_floats})" in text and f"ISA tier {tier}" in text
    assert ("_cvtph_ps" in text) == ("f16c" in t.needs)
    tiles = set(re.findall(r"void tile_ffn2_(\d+)\(", text))
    assert tiles == {str(m) for m in range(1, t.mr + 1)}


def test_tile_change_in_the_plan_reaches_render_workspace_and_launch():
    """Change tiles in a plan: the render, the workspace and the launch all follow (one
    source of each constant), and the result still matches the reference."""
    spec = MoESpec(8, 2, 100, 600, backend="c")
    plan = dataclasses.replace(BE.plan(spec, BE.target(spec)), bm=2, whole_rows=8, bk=256,
                               route_chunk=16)
    sources = BE.render(plan)
    d = _defines(sources.text)
    assert (d["BM"], d["BK"], d["kRouteChunk"], d["kChunksF"], d["kLastF"]) == \
        ("2", "256", "16", "3", "88")
    assert "tile_ffn2_3" not in sources.text
    module = BE.load(BE.compile(sources, spec, plan.target, "test"), plan)
    assert module.plan is plan
    kernel = MoEKernel(spec, module, {})
    x, w = R.random_problem(spec, 100, seed=3)
    y, st = kernel(x, kernel.pack(**R.weight_kwargs(spec, w)), return_stats=True)
    assert module.workspace(100).buffers.partials.shape == (128 // 16, spec.num_experts + 1)
    ref, _ = R.moe(spec, x, w)
    assert R.rel_error(y, ref) <= 1e-5
    ids, _, probs, logits = R.route(spec, x, w["router"])
    np.testing.assert_allclose(st.router_prob_mean, R.stats(spec, R.group(ids, 8)[0], probs,
                                                            logits)["router_prob_mean"],
                               rtol=1e-5)


def test_compile_error_carries_argv_log_and_source():
    bad = Sources("c", {"moe.c": "int broken( {"}, "moe.c")
    with pytest.raises(CompileError) as info:
        BE.compile(bad, SPEC, BE.target(SPEC), "deadbeef" * 8)
    err = info.value
    assert err.backend == "c" and err.spec_name == SPEC.name and err.key.startswith("deadbeef")
    assert any(a.startswith("-march=") for a in err.command)
    assert "error" in err.log and err.source == "int broken( {"
    assert "1 | int broken( {" in err.dump()


def test_library_name_is_content_addressed(seed_artifact):
    module = BE.load(seed_artifact, SPEC)
    digest = hashlib.sha256(seed_artifact.binary).hexdigest()[:20]
    assert module.path.name == f"moegen_{digest}.so" == library_name(seed_artifact.binary)
    assert module.path.stat().st_mode & 0o077 == 0                # owner-only
    assert module.path.parent.stat().st_mode & 0o077 == 0
    other = build(SPEC.replace(bias=True))
    assert BE.load(other, SPEC.replace(bias=True)).path != module.path


def test_workspace_is_allocated_once_per_bucket(seed_artifact):
    module = BE.load(seed_artifact, SPEC)
    kernel = MoEKernel(SPEC, module, seed_artifact.meta)
    x, w = R.random_problem(SPEC, 100, seed=1)
    weights = kernel.pack(**R.weight_kwargs(SPEC, w))
    out = np.empty_like(x)
    kernel(x, weights, out=out)                          # first call of bucket 128
    ws = module.workspace(100)
    assert ws.bucket == 128 and module.workspace(100) is ws
    assert module.workspace(70).buffers is ws.buffers     # same bucket, same buffers
    assert module.workspace(129).bucket == 256
    smallest = min(ws.buffers.xf.nbytes, ws.buffers.h.nbytes, ws.buffers.y.nbytes)
    kernel(x, weights, out=out)
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(3):
            kernel(x, weights, out=out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Only small Python objects come and go; not one workspace-sized buffer.
    assert peak - base < min(4096, smallest), peak - base
    ref, _ = R.moe(SPEC, x, w)
    assert R.rel_error(out, ref) <= 1e-5


objdump = shutil.which("objdump")


def disassemble(binary: bytes, tmp_path) -> str:
    so = tmp_path / "lib.so"
    so.write_bytes(binary)
    return subprocess.run([objdump, "-d", "--no-show-raw-insn", str(so)], capture_output=True,
                          text=True, check=True).stdout


@pytest.mark.skipif(objdump is None, reason="objdump not installed")
def test_micro_kernels_use_ymm_fmas(tmp_path):
    art = build(MoESpec(8, 2, 512, 2048, backend="c"), "x86-64-v3")
    asm = disassemble(art.binary, tmp_path)
    tile = asm[asm.index("<tile_ffn2_3>:"):]
    tile = tile[:tile.index("\n\n")]
    assert tile.count("vfmadd231ps") >= 12 and "ymm" in tile
    assert "(%rsp)" not in tile.split("vfmadd231ps", 1)[1].rsplit("vfmadd231ps", 1)[0]   # no spills


@pytest.mark.skipif(objdump is None, reason="objdump not installed")
def test_avx512_bf16_tier_uses_vdpbf16ps(tmp_path):
    spec = MoESpec(8, 2, 512, 256, dtype="bfloat16", backend="c")
    art = build(spec, "avx512-bf16")
    asm = disassemble(art.binary, tmp_path)
    assert "vdpbf16ps" in asm and "vcvtne2ps2bf16" in asm
    assert "vdpbf16ps" not in disassemble(build(spec, "avx512").binary, tmp_path)


@pytest.mark.skipif(objdump is None, reason="objdump not installed")
def test_fp16_weights_convert_with_f16c(tmp_path):
    art = build(MoESpec(8, 2, 128, 96, dtype="float16", backend="c"), "x86-64-v3")
    assert "vcvtph2ps" in disassemble(art.binary, tmp_path)


def test_threads_calling_one_kernel_get_their_own_workspaces(seed_artifact):
    import threading
    module = BE.load(seed_artifact, SPEC)
    kernel = MoEKernel(SPEC, module, seed_artifact.meta)
    problems = [R.random_problem(SPEC, 40, seed=s) for s in range(4)]
    weights = kernel.pack(**R.weight_kwargs(SPEC, problems[0][1]))
    outs = [np.full((40, SPEC.hidden_dim), np.nan, np.float32) for _ in problems]

    def work(i):
        for _ in range(5):
            kernel(problems[i][0], weights, out=outs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (x, _), out in zip(problems, outs):
        ref, _ = R.moe(SPEC, x, problems[0][1])
        assert R.rel_error(out, ref) <= 1e-5


@pytest.mark.parametrize("dtype,activation", [("float32", "swiglu"), ("float16", "relu")])
def test_avx512_tier_compiles(dtype, activation):
    """This CPU cannot run the avx512 tiers, but their code must still compile (zmm tiles,
    4 x 6 register tile, separate horizontal sums)."""
    spec = MoESpec(8, 2, 100, 257, dtype=dtype, activation=activation, bias=True, backend="c")
    assert build(spec, "avx512").binary


def test_binary_for_a_tier_this_cpu_lacks_is_refused_at_load():
    missing = [t for t in isa.TIERS.values() if t.machine == "x86_64" and not isa.runnable(t)]
    if not missing:
        pytest.skip("this CPU runs every x86 tier")
    tier = missing[0].name
    art = build(MoESpec(8, 2, 64, 96, backend="c"), tier)
    assert art.meta["target"] == tier
    with pytest.raises(RuntimeError, match="cannot run"):
        BE.load(art, MoESpec(8, 2, 64, 96, backend="c"))
