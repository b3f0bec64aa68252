"""The persistent warp-specialised prefill GEMM (templates/cuda/ffn_ws.cu.jinja) without a GPU:
its shared memory fits an H100/H200 block, and every kernel of the harness renders and compiles
for sm_90a through NVRTC with a spill-free consumer path.  The GPU check (NaN-poisoned outputs
against moegen's bm128 kernels and a float64 reference) is benchmarks/prefill_gemm.py on the
device."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("prefill_gemm", ROOT / "benchmarks" / "prefill_gemm.py")
prefill_gemm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prefill_gemm)

SM90_MAX_DYNAMIC_SMEM = 227 * 1024     # cudaDevAttrMaxSharedMemoryPerBlockOptin on H100 / H200


@pytest.mark.parametrize("name", sorted(prefill_gemm.VARIANTS))
def test_variant_fits_shared_memory(name):
    bn, stages, _ = prefill_gemm.VARIANTS[name]
    assert prefill_gemm.smem_bytes(bn, stages) <= SM90_MAX_DYNAMIC_SMEM


def test_render_names_every_kernel_the_harness_launches():
    spec = prefill_gemm.make_spec("deepseek-v3")
    src, _ = prefill_gemm.sources(spec, ["ws256s4g8"])
    for kname in ("ffn1", "ffn1t", "ffn1r", "ffn1n", "ffn1f", "ffn1d", "ffn2", "ffn2n", "ffn2f", "ffn2d"):
        assert f"{kname}_ws256s4g8(" in src
    assert "constexpr int kHidden = 7168;" in src and "constexpr int kGateRows = 4096;" in src


@pytest.mark.nvrtc
@pytest.mark.timeout(600)
def test_compiles_for_sm90a_without_consumer_spills(tmp_path):
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    spec = prefill_gemm.make_spec("qwen3-30b-a3b")
    src, _ = prefill_gemm.sources(spec, ["ws256s4g8"])
    from cupy_backends.cuda.libs import nvrtc   # optional heavy package: this test only
    prog = nvrtc.createProgram(src, "ffn_ws.cu", [], [])
    nvrtc.compileProgram(prog, ["--gpu-architecture=sm_90a", "-std=c++17", "--ptxas-options=-v"])
    log = nvrtc.getProgramLog(prog)
    log = log if isinstance(log, str) else log.decode()
    assert len(nvrtc.getCUBIN(prog)) > 0
    # setmaxnreg is honoured (ptxas warns C7508 when it ignores it) and nothing spills where
    # the main loop's accumulators live: the TMA-only kernels (A_MODE 1) spill nothing at all.
    assert "C7508" not in log
    spills = dict(re.findall(r"Function properties for (\w+)\n[^\n]*?(\d+) bytes spill stores", log))
    for name in ("ffn2_ws256s4g8", "ffn2d_ws256s4g8", "ffn1t_ws256s4g8"):
        assert spills[name] == "0", (name, log)
