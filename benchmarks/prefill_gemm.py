"""Prefill expert GEMMs: the persistent warp-specialised kernel (templates/cuda/ffn_ws.cu.jinja)
next to moegen's bm128 wgmma kernels (templates/cuda/ffn.cu.jinja) on the same inputs.

Count first (bf16, SwiGLU, M = T·k slot rows, ceilings of the H200 run of issue 11: copy
4.27 TB/s, matmul 686 TFLOP/s).  ffn1: [M, H] x [H, 2F] (gather x, SwiGLU -> h [M, F]);
ffn2: [M, F] x [F, H] (routing weight -> y_slot [M, H]).  FLOPs = 2·M·K·N; bytes = the weights of
the touched experts once + x + h written/read + y_slot written.

| shape T | GEMM | TFLOP | GB | compute ms | copy ms | bound |
|---|---|---|---|---|---|---|
| mixtral 4096  | ffn1 | 1.924 | 1.88 w + .03 x + .23 h = 2.15 | 2.80 | 0.50 | compute |
| mixtral 4096  | ffn2 | 0.962 | .94 w + .23 h + .07 y = 1.24 | 1.40 | 0.29 | compute |
| mixtral 16384 | ffn1 | 7.70  | 1.88 + .13 + .94 = 2.95 | 11.22 | 0.69 | compute |
| mixtral 16384 | ffn2 | 3.85  | .94 + .94 + .27 = 2.15 | 5.61 | 0.50 | compute |
| deepseek 4096 | ffn1 | 1.924 | 15.03 w + .06 x + .13 h = 15.2 | 2.80 | 3.57 | copy |
| deepseek 4096 | ffn2 | 0.962 | 7.52 w + .13 h + .47 y = 8.12 | 1.40 | 1.90 | copy |
| deepseek 16384| ffn1 | 7.70  | 15.03 + .23 + .54 = 15.8 | 11.22 | 3.70 | compute |
| deepseek 16384| ffn2 | 3.85  | 7.52 + .54 + 1.88 = 9.94 | 5.61 | 2.33 | compute |

Padding: segments are padded to 128 rows per expert.  Mixtral (~1024 / 4096 rows an expert)
wastes < 5%; deepseek T=4096 (128 ± 11 rows an expert) needs ~1.5 tiles an expert, ~50% extra
MMA work with plain 128-row tiles: the new kernel skips a consumer warpgroup whose 64 rows are
all padding, which leaves ~+20% (T=16384: ~+6%).

Prediction (new kernel, mainloop at ~80% of the 686 TFLOP/s ceiling, the epilogue not
overlapped with the tensor cores in the cooperative schedule): mixtral T=4096 ffn1 3.5 ms,
ffn2 1.8 ms (5.3 vs floor 4.2: 0.79); T=16384 ffn1 14.0, ffn2 7.0 (21.0 vs 16.8: 0.80);
deepseek T=4096 ~6.5 ms (floor 5.3 copy-bound, 0.82: the weights stream once per expert when
its 1-2 M tiles run together, and the 1.2x padding work overlaps the copy); T=16384 ~20 ms
(0.84).  The existing bm128 kernels: mixtral 5.6 / 21.2 ms, deepseek ~10 / 26 ms (ffn1+ffn2 of
the whole-layer times of issue 11).

The harness, per (shape, T): random bf16 packed weights built on the GPU with torch, random
uniform top-k routing, the grouped layout from `cuda_tiles.grouped_layout_host` (bm 128), then
for moegen's bm128 kernels and each variant of the new kernel: outputs poisoned with NaN, one
run, every real h row and every y_slot row checked for NaN, full h and y_slot compared to
moegen's (relative L2 error), sampled rows checked against a float64 torch reference; then
CUDA-event medians of back-to-back launches over 2 rotated input sets.  Also the torch bf16
matmul ceiling (8192³) and copy bandwidth of this run.

    python benchmarks/prefill_gemm.py --build-only --cubins DIR   # compile the cubins (NVRTC, sm_90a, no GPU)
    python benchmarks/prefill_gemm.py --cubins DIR --json out.json [--shapes mixtral-8x7b] [--tokens 4096]
                                      [--variants ws256s4g8,ws256s4g16] [--modes d,f,g,t,r,n] [--check-only]

Modes of the new kernel (moegen's kernels always run first, as the reference): g = ffn1's A
gathered by cp.async, static round-robin tiles; f = g with the fast epilogue (cvt.rn.bf16x2,
__expf SiLU); d = f with the dynamic tile scheduler (the kernel to keep); t = ffn1's A by TMA
over x pre-gathered into grouped order (plus the copy, timed alone); r = one TMA per x row;
n = the main loops without epilogue stores (timing only).

Result (H200, run 6, commit 0fe75b2, results/prefill_gemm_h200_run6_final.json; ceilings of
the run 694 TFLOP/s and 4.26 TB/s; ffn1 + ffn2 ms, fraction of floor; run 5 repeats within
~3% except where noted in results/prefill_gemm_notes.md):

| shape | T | floor | moegen bm128 | new (d, ws256s4g8) | change |
|---|---|---|---|---|---|
| mixtral | 4096 | 4.16 | 5.808 (0.72) | 5.210 (0.80) | -10% |
| mixtral | 16384 | 16.65 | 21.690 (0.77) | 19.866 (0.84) | -8% |
| deepseek | 4096 | 5.32 | 9.278 (0.57) | 8.886 (0.60) | -4% |
| deepseek | 16384 | 16.65 | 26.817 (0.62) | 23.526 (0.71) | -12% |
| qwen3 | 4096 | 0.45 | 0.852 (0.52) | 0.698 (0.64) | -18% |
| qwen3 | 16384 | 1.78 | 2.883 (0.62) | 2.376 (0.75) | -18% |

Against the prediction: mixtral met it (5.2 vs 5.3 predicted, 19.9 vs 21.0), deepseek T=4096
missed it (8.9 vs 6.5: the weights do not stream once; ffn1 alone is 6.1 ms for 15 GB of
w13, 2.5 TB/s), deepseek T=16384 missed it (23.5 vs 20).  What moved the time, in order:
the dynamic tile scheduler (deepseek T=16384 -14%: with static round-robin tiles the CTAs
drift apart and the B panels stop being shared in L2), the fast epilogue (ffn1 -5% on
mixtral T=16384), TMA for the contiguous A of ffn2 (-10% on mixtral ffn2 from the first run).
The A gather is not the bottleneck: ffn1 with A by TMA from a pre-gathered copy (t) ran no
faster than the cp.async gather, and one TMA per row (r) ran 3x slower (issue-bound).

The new kernel is launched through the CUDA driver (ctypes: cuModuleLoadData, cuLaunchKernel,
cuTensorMapEncodeTiled), so its tensor maps travel as real 64-byte-aligned __grid_constant__
parameters; moegen's kernels through CuPy as `cuda_ffn` does.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import math
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moegen.backends import cuda_tiles  # noqa: E402
from moegen.render import render_template  # noqa: E402
from moegen.spec import MoESpec  # noqa: E402

SHAPES = {"mixtral-8x7b": (8, 2, 4096, 14336), "deepseek-v3": (256, 8, 7168, 2048),
          "qwen3-30b-a3b": (128, 8, 2048, 768)}
# name -> (BN, stages, GROUP_M) of the new kernel
VARIANTS = {"ws256s4g8": (256, 4, 8), "ws256s4g16": (256, 4, 16), "ws128s6g8": (128, 6, 8)}
ARCH = "sm_90a"
BM = 128


# ---------------------------------------------------------------- compile (no GPU needed)

def ws_context(spec: MoESpec, variants) -> dict:
    layout = cuda_tiles.packed_layout(spec)
    kernels = []
    for name in variants:
        bn, stages, gm = VARIANTS[name]
        for kname, stage, a_mode, epi, fast in (
                ("ffn1", 1, 0, True, False), ("ffn1t", 1, 1, True, False), ("ffn1r", 1, 2, True, False),
                ("ffn2", 2, 1, True, False), ("ffn1n", 1, 0, False, False), ("ffn2n", 2, 1, False, False),
                ("ffn1f", 1, 0, True, True), ("ffn2f", 2, 1, True, True),
                ("ffn1d", 1, 0, True, True), ("ffn2d", 2, 1, True, True)):
            kernels.append({"name": f"{kname}_{name}", "stage": stage, "a_mode": a_mode, "bn": bn,
                            "stages": stages, "group_m": gm, "epi": epi, "fast": fast,
                            "dyn": kname.endswith("d")})
    return {"ws": {"top_k": spec.top_k, "slots": spec.top_k + spec.num_shared_experts,
                   "hidden_dim": spec.hidden_dim, "ffn_dim": spec.ffn_dim,
                   "gate_rows": layout.gate_rows, "gated": spec.gated,
                   "act": cuda_tiles.ACT_FUNCTIONS[spec.act.fn],
                   "ns": sorted({VARIANTS[v][0] for v in variants}), "kernels": kernels}}


def smem_bytes(bn: int, stages: int) -> int:
    """Dynamic shared memory of a variant: WsSmem::kBytes of ffn_ws.cu.jinja (1024-byte alignment
    slack, the stages, full/empty barriers, and the tile ring's 2 + 2 barriers and 2 ints)."""
    return 1024 + stages * (BM + bn) * 128 + 16 * stages + 48


def compile_cached(src: str, cubin_dir: str, tag: str, verbose: bool = False) -> str:
    """Path of the cubin of ``src`` (sm_90a), compiled with NVRTC unless already in cubin_dir."""
    opts = [f"--gpu-architecture={ARCH}", "-std=c++17"]
    key = hashlib.sha256((src + "\0" + " ".join(opts)).encode()).hexdigest()[:20]
    path = os.path.join(cubin_dir, f"{tag}-{key}.cubin")
    if os.path.exists(path):
        return path
    from cupy_backends.cuda.libs import nvrtc   # optional heavy package: only when compiling
    os.makedirs(cubin_dir, exist_ok=True)
    prog = nvrtc.createProgram(src, f"{tag}.cu", [], [])
    t = time.perf_counter()
    try:
        nvrtc.compileProgram(prog, opts + (["--ptxas-options=-v"] if verbose else []))
    except nvrtc.NVRTCError:
        raise RuntimeError(f"{tag}: " + str(nvrtc.getProgramLog(prog))) from None
    log = nvrtc.getProgramLog(prog)
    if verbose and log:
        print(log if isinstance(log, str) else log.decode())
    with open(path, "wb") as f:
        f.write(nvrtc.getCUBIN(prog))
    print(f"compiled {tag} in {time.perf_counter() - t:.1f} s -> {path}", flush=True)
    return path


def sources(spec: MoESpec, variants):
    ws_src = render_template("cuda/ffn_ws.cu.jinja", **ws_context(spec, variants))
    base_src = render_template("cuda/ffn.cu.jinja", **cuda_tiles.render_context(spec))
    return ws_src, base_src


def make_spec(shape: str) -> MoESpec:
    E, k, H, F = SHAPES[shape]
    return MoESpec(E, k, H, F, dtype="bfloat16", arch=ARCH)


# ---------------------------------------------------------------- driver API through ctypes

class Driver:
    """The few CUDA driver calls the new kernel needs, from libcuda through ctypes."""

    def __init__(self):
        self.lib = ctypes.CDLL("libcuda.so.1")

    def check(self, rc, what):
        if rc != 0:
            s = ctypes.c_char_p()
            self.lib.cuGetErrorString(rc, ctypes.byref(s))
            raise RuntimeError(f"{what}: CUDA error {rc} {s.value.decode() if s.value else ''}")

    def load(self, path):
        data = open(path, "rb").read()
        mod = ctypes.c_void_p()
        self.check(self.lib.cuModuleLoadData(ctypes.byref(mod), ctypes.c_char_p(data)), "cuModuleLoadData")
        return mod

    def function(self, mod, name, smem):
        fn = ctypes.c_void_p()
        self.check(self.lib.cuModuleGetFunction(ctypes.byref(fn), mod, name.encode()), f"get {name}")
        # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
        self.check(self.lib.cuFuncSetAttribute(fn, 8, ctypes.c_int(smem)), "cuFuncSetAttribute")
        return fn

    def tensor_map(self, ptr, dims, strides_bytes, box):
        """A bf16 tiled tensor map, 128B swizzle, OOB zero fill.  dims/box innermost first."""
        tmap = (ctypes.c_uint64 * 16)()
        rank = len(dims)
        gdim = (ctypes.c_uint64 * rank)(*dims)
        gstr = (ctypes.c_uint64 * max(1, rank - 1))(*strides_bytes)
        bdim = (ctypes.c_uint32 * rank)(*box)
        est = (ctypes.c_uint32 * rank)(*([1] * rank))
        # dtype BFLOAT16 = 9, interleave NONE = 0, swizzle 128B = 3, L2 promotion 256B = 3, OOB fill NONE = 0
        rc = self.lib.cuTensorMapEncodeTiled(ctypes.byref(tmap), 9, rank, ctypes.c_void_p(ptr), gdim, gstr,
                                             bdim, est, 0, 3, 3, 0)
        self.check(rc, f"cuTensorMapEncodeTiled dims={dims} box={box}")
        return tmap

    def launch(self, fn, grid, block, smem, args, stream=0):
        """args: list of ctypes objects (tensor maps as c_uint64*16, pointers as c_void_p...)."""
        params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        self.check(self.lib.cuLaunchKernel(fn, grid, 1, 1, block, 1, 1, smem, ctypes.c_void_p(stream),
                                           params, None), "cuLaunchKernel")


# ---------------------------------------------------------------- CuPy struct-argument probe

PROBE_SRC = r"""
struct __align__(64) TmaDesc { unsigned long long v[16]; };
extern "C" __global__ void probe_struct_arg(int a, const __grid_constant__ TmaDesc m, unsigned long long* out)
{
    const int i = threadIdx.x;
    if (i < 16) out[i] = m.v[i] + static_cast<unsigned long long>(a);
}
"""
TMA_DESC_DTYPE = np.dtype({"names": ["v"], "formats": [(np.uint64, 16)]}, align=True)


def probe_cupy_struct(cp) -> bool:
    """Can CuPy's RawKernel pass a 128-byte, 64-byte-aligned struct by value after an int (how
    moegen would launch the kernel)?  Launches a tiny kernel and compares what it read."""
    fn = cp.RawModule(code=PROBE_SRC, options=("-std=c++17",)).get_function("probe_struct_arg")
    desc = np.zeros((), TMA_DESC_DTYPE)
    desc["v"] = np.arange(1, 17, dtype=np.uint64) * np.uint64(0x0101010101)
    out = cp.zeros(16, cp.uint64)
    fn((1,), (32,), (np.int32(7), desc[()], out))
    got = out.get()
    ok = bool((got == desc["v"] + np.uint64(7)).all())
    print(f"CuPy struct argument probe: {'OK' if ok else 'MISMATCH'} {got[:4]}", flush=True)
    return ok


# ---------------------------------------------------------------- device run

def run_device(args):
    import cupy as cp       # optional heavy packages: the device run only
    import torch
    from moegen.backends import cuda_ffn

    dev = torch.cuda.get_device_name(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    torch.zeros(1, device="cuda")                 # the primary context must be current for the driver calls
    torch.cuda.synchronize()
    drv = Driver()
    print(f"device {dev}, {sms} SMs, torch {torch.__version__}, cupy {cp.__version__}", flush=True)
    if args.probe_cupy_struct:
        try:
            probe = probe_cupy_struct(cp)
        except Exception as exc:  # noqa: BLE001 - report and go on with the benchmark
            probe = f"{type(exc).__name__}: {exc}"[:300]
            print("CuPy struct argument probe failed:", probe, flush=True)
    results = {"device": dev, "sms": sms, "rows": [],
               "ceilings": RESULTS_CEIL if CHECK_ONLY else ceilings(torch)}
    if args.probe_cupy_struct:
        results["cupy_struct_probe"] = probe
    RESULTS_CEIL.update(results["ceilings"])
    print(f"ceilings: matmul {results['ceilings']['matmul_tflops']:.0f} TFLOP/s, copy "
          f"{results['ceilings']['copy_tbps']:.2f} TB/s", flush=True)
    variants = args.variants.split(",")
    for shape in args.shapes.split(","):
        spec = make_spec(shape)
        layout = cuda_tiles.packed_layout(spec)
        ws_src, base_src = sources(spec, variants)
        ws_mod = drv.load(compile_cached(ws_src, args.cubins, f"ws-{shape}"))
        base_raw = cp.RawModule(path=compile_cached(base_src, args.cubins, f"base-{shape}"))
        E, k, H, F = SHAPES[shape]
        G = layout.gate_rows
        torch.manual_seed(0)
        buf = torch.empty(layout.total, dtype=torch.bfloat16, device="cuda")
        chunk = 1 << 28
        for i in range(0, layout.total, chunk):
            buf[i:i + chunk].normal_(0.0, 1.0 / math.sqrt(H))
        stride, off = layout.expert_stride, layout.offsets
        w13 = buf.as_strided((E, G, H), (stride, H, 1), off["w13"])
        w2 = buf.as_strided((E, H, F), (stride, F, 1), off["w2"])
        maps = {}
        for name in variants:
            bn = VARIANTS[name][0]
            maps[name] = (drv.tensor_map(buf.data_ptr() + 2 * off["w13"], (H, G, E), (2 * H, 2 * stride), (64, bn, 1)),
                          drv.tensor_map(buf.data_ptr() + 2 * off["w2"], (F, H, E), (2 * F, 2 * stride), (64, bn, 1)))
        fns = {name: (drv.function(ws_mod, f"ffn1_{name}", smem_bytes(*VARIANTS[name][:2])),
                      drv.function(ws_mod, f"ffn2_{name}", smem_bytes(*VARIANTS[name][:2])), ws_mod)
               for name in variants}
        rng = np.random.default_rng(1)
        for T in map(int, args.tokens.split(",")):
            row = run_point(torch, cp, drv, cuda_ffn, spec, layout, buf, w13, w2, maps, fns, base_raw,
                            variants, T, rng, sms, args.modes)
            row["shape"] = shape
            results["rows"].append(row)
            print_row(row, variants)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
        del buf, w13, w2
        torch.cuda.empty_cache()
    print("\n| shape | T | kernel | ffn1 ms | ffn2 ms | sum ms | floor ms | of floor | TFLOP/s | err h | err y | err64 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        for kname in r["kernels"]:
            m = r["kernels"].get(kname)
            if not m:
                continue
            if "error" in m:
                print(f"| {r['shape']} | {r['T']} | {kname} | error: {m['error'][:80]} |")
                continue
            s = m["ffn1_ms"] + m["ffn2_ms"]
            print(f"| {r['shape']} | {r['T']} | {kname} | {m['ffn1_ms']:.3f} | {m['ffn2_ms']:.3f} | {s:.3f} | "
                  f"{r['floor_ms']:.3f} | {r['floor_ms'] / s:.2f} | {r['flops'] / s / 1e9:.0f} | "
                  f"{m.get('err_h', float('nan')):.1e} | {m.get('err_y', float('nan')):.1e} | {m['err64']:.1e} |")


def ceilings(torch):
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = median_ms(torch, lambda: torch.mm(a, b), reps=10)
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    cp_ms = median_ms(torch, lambda: dst.copy_(src), reps=10)
    out = {"matmul_tflops": 2 * 8192 ** 3 / mm / 1e9, "copy_tbps": 2 * src.numel() / cp_ms / 1e9}
    del a, b, src, dst
    torch.cuda.empty_cache()
    return out


def median_ms(torch, fn, reps=10, rounds=7, warm=2):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(rounds):
        s.record()
        for _ in range(reps):
            fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / reps)
    return statistics.median(times)


def rel(torch, got, ref):
    got, ref = got.double(), ref.double()
    den = torch.linalg.vector_norm(ref).item()
    return torch.linalg.vector_norm(got - ref).item() / den if den > 0 else float("nan")


def run_point(torch, cp, drv, cuda_ffn, spec, layout, buf, w13, w2, maps, fns, base_raw, variants, T, rng, sms,
              modes):
    E, k, H, F = spec.num_experts, spec.top_k, spec.hidden_dim, spec.ffn_dim
    G = layout.gate_rows
    ids = np.argsort(rng.random((T, E)), axis=1)[:, :k].astype(np.int32)
    wts = rng.random((T, k)).astype(np.float32)
    wts /= wts.sum(axis=1, keepdims=True)
    cfg = cuda_tiles.bucket_for(cuda_tiles.bucket_configs(spec), T)
    assert cfg.bm == BM and cfg.ffn2_splits == 1, (cfg.name, cfg.bm, cfg.ffn2_splits)
    tiles = cuda_tiles.max_tiles(spec, cfg, T)
    sr, te, tr, nt = cuda_tiles.grouped_layout_host(spec, ids, BM, tiles)
    dev = {n: torch.as_tensor(a, device="cuda") for n, a in
           (("sorted_rows", sr), ("tile_expert", te), ("tile_row0", tr), ("num_tiles", nt))}
    m_tiles = int(nt[0])
    slots = T * k
    R = 2                                   # rotated input sets
    xs = [torch.randn(T, H, device="cuda").to(torch.bfloat16) for _ in range(R)]
    hs = [torch.empty(tiles * BM, F, device="cuda", dtype=torch.bfloat16) for _ in range(R)]
    ys = [torch.empty(slots, H, device="cuda", dtype=torch.bfloat16) for _ in range(R)]
    topw = torch.as_tensor(wts, device="cuda")
    real = torch.as_tensor(np.nonzero(sr[:m_tiles * BM] >= 0)[0], device="cuda")
    touched = len(np.unique(ids))
    flops = 2 * slots * 3 * H * F
    wbytes = touched * 3 * H * F * 2
    ceil = RESULTS_CEIL
    floor = max((wbytes + 2 * T * H * 2) / (ceil["copy_tbps"] * 1e12),
                flops / (ceil["matmul_tflops"] * 1e12)) * 1e3
    row = {"T": T, "m_tiles": m_tiles, "real_rows": slots, "padded_rows": m_tiles * BM,
           "experts_touched": touched, "flops": flops, "floor_ms": floor, "kernels": {}}

    # moegen's bm128 kernels, launched as cuda_ffn does (CuPy, the null stream)
    class Mod:
        pass
    mod = Mod()
    mod.spec, mod.layout, mod.sms = spec, layout, sms
    mod.function = lambda name, _raw=base_raw: _raw.get_function(name)

    class WS:
        pass
    ws = WS()
    ws.bucket, ws.tokens = cfg, T
    ws.sorted_rows, ws.tile_expert, ws.tile_row0, ws.num_tiles = (
        np.uint64(dev[n].data_ptr()) for n in ("sorted_rows", "tile_expert", "tile_row0", "num_tiles"))
    ws.topk_weights = np.uint64(topw.data_ptr())

    class CallArgs:
        pass

    def base_calls(i):
        c = CallArgs()
        c.x, c.tokens, c.topk_weights = int(xs[i].data_ptr()), T, None
        c.packed = CallArgs()
        c.packed.buffer = int(buf.data_ptr())
        return c
    calls = [base_calls(i) for i in range(R)]

    def base_ffn1(i):
        ws.h = np.uint64(hs[i].data_ptr())
        cuda_ffn.launch_ffn1(mod, ws, calls[i])

    def base_ffn2(i):
        ws.h, ws.y_slot = np.uint64(hs[i].data_ptr()), np.uint64(ys[i].data_ptr())
        cuda_ffn.launch_ffn2(mod, ws, calls[i])

    ptr = ctypes.c_void_p
    sched = torch.zeros(2, dtype=torch.int32, device="cuda")   # dynamic tile counter (self-resetting)
    launch_args = {}
    for name in variants:
        bn, stages, _ = VARIANTS[name]
        smem = smem_bytes(bn, stages)
        f1, f2, _ = fns[name]
        m13, m2 = maps[name]
        per = []
        for i in range(R):
            hmap = drv.tensor_map(hs[i].data_ptr(), (F, tiles * BM), (2 * F,), (64, BM))
            common = [ptr(dev["sorted_rows"].data_ptr()), ptr(dev["tile_expert"].data_ptr()),
                      ptr(dev["tile_row0"].data_ptr()), ptr(dev["num_tiles"].data_ptr()), ptr(topw.data_ptr())]
            a1 = [m13, m13, ptr(xs[i].data_ptr()), *common, ptr(hs[i].data_ptr()), ptr(sched.data_ptr())]
            a2 = [hmap, m2, ptr(xs[i].data_ptr()), *common, ptr(ys[i].data_ptr()), ptr(sched.data_ptr())]
            per.append((a1, a2))
        launch_args[name] = (f1, f2, smem, per)

    def ws_fn(name, stage, suffix=""):
        f1, f2, smem, per = launch_args[name]
        n_tiles = -(-(G if stage == 1 else H) // VARIANTS[name][0])
        grid = max(1, min(sms, m_tiles * n_tiles))
        fn = f1 if stage == 1 else f2
        if suffix:
            fn = drv.function(fns[name][2], f"ffn{stage}{suffix}_{name}", smem)
        return lambda i: drv.launch(fn, grid, 384, smem, per[i][stage - 1])

    # float64 reference on sampled real rows of the grouped layout
    pick = np.linspace(0, slots - 1, 8).astype(int)
    rows_np = np.nonzero(sr[:m_tiles * BM] >= 0)[0][pick]
    inter = layout.gate_up_interleave

    def ref_h(x, r):
        slot = int(sr[r]); e = int(te[r // BM])
        a = w13[e].double() @ x[slot // k].double()
        a = a.view(F // inter, 2, inter)
        g, u = a[:, 0].reshape(-1), a[:, 1].reshape(-1)
        return g / (1 + torch.exp(-g)) * u

    def ref_y(h, r):
        slot = int(sr[r]); e = int(te[r // BM])
        return float(wts[slot // k, slot % k]) * (w2[e].double() @ h[r].double())

    # mode t: x pre-gathered into grouped order (xg [tiles*BM, H], what a group stage could
    # write); mode r: x rows by one TMA each.
    tok_idx = torch.as_tensor(sr[np.nonzero(sr[:m_tiles * BM] >= 0)[0]] // k, device="cuda").long()
    xgs = []
    if "t" in modes:
        xgs = [torch.zeros(tiles * BM, H, device="cuda", dtype=torch.bfloat16) for _ in range(R)]
        for i in range(R):
            xgs[i][real] = xs[i][tok_idx]
        row["gather_ms"] = median_ms(torch, lambda: xgs[0].index_copy_(0, real, xs[0].index_select(0, tok_idx)))

    def ws_mode_fn(name, mode):
        bn, stages, _ = VARIANTS[name]
        smem = smem_bytes(bn, stages)
        fn = drv.function(fns[name][2], f"ffn1{mode}_{name}", smem)
        m13 = maps[name][0]
        per = []
        for i in range(R):
            amap = (drv.tensor_map(xgs[i].data_ptr(), (H, tiles * BM), (2 * H,), (64, BM)) if mode == "t"
                    else drv.tensor_map(xs[i].data_ptr(), (H, T), (2 * H,), (64, 1)))
            per.append([amap, m13, ptr(xs[i].data_ptr()), ptr(dev["sorted_rows"].data_ptr()),
                        ptr(dev["tile_expert"].data_ptr()), ptr(dev["tile_row0"].data_ptr()),
                        ptr(dev["num_tiles"].data_ptr()), ptr(topw.data_ptr()), ptr(hs[i].data_ptr()),
                        ptr(sched.data_ptr())])
        grid = max(1, min(sms, m_tiles * -(-G // bn)))
        return lambda i: drv.launch(fn, grid, 384, smem, per[i])

    base_h = base_y = None
    impls = [("base", base_ffn1, base_ffn2)]
    for n in variants:
        if "g" in modes:
            impls.append((n, ws_fn(n, 1), ws_fn(n, 2)))
        for mode in "tr":
            if mode in modes:
                impls.append((f"{n}+{mode}", ws_mode_fn(n, mode), ws_fn(n, 2)))
        if "f" in modes:
            impls.append((f"{n}+f", ws_fn(n, 1, "f"), ws_fn(n, 2, "f")))
        if "d" in modes:
            impls.append((f"{n}+d", ws_fn(n, 1, "d"), ws_fn(n, 2, "d")))
        if "n" in modes:
            impls.append((f"{n}+n", ws_fn(n, 1, "n"), ws_fn(n, 2, "n")))
    for name, f1, f2 in impls:
        m = {}
        if name.endswith("+n"):      # main loop alone: nothing is written, so nothing to check
            m = {"nan_h": -1, "nan_y": -1, "err64": float("nan"), "ok": False, "timing_only": True,
                 "ffn1_ms": median_ms(torch, lambda: f1(0)), "ffn2_ms": median_ms(torch, lambda: f2(0))}
            row["kernels"][name] = m
            continue
        try:
            hs[0].fill_(float("nan"))
            ys[0].fill_(float("nan"))
            f1(0)
            torch.cuda.synchronize()
            f2(0)
            torch.cuda.synchronize()
            h_real = hs[0][real]
            m["nan_h"] = int(torch.isnan(h_real).sum().item())
            m["nan_y"] = int(torch.isnan(ys[0]).sum().item())
            if name == "base":
                base_h, base_y = h_real.clone(), ys[0].clone()
            else:
                m["err_h"] = rel(torch, h_real, base_h)
                m["err_y"] = rel(torch, ys[0], base_y)
            e64 = []
            for r in rows_np:
                e64.append(rel(torch, hs[0][r], ref_h(xs[0], r)))
                e64.append(rel(torch, ys[0][int(sr[r])], ref_y(hs[0], r)))
            m["err64"] = max(e64)
            m["ok"] = m["nan_h"] == 0 and m["nan_y"] == 0 and m["err64"] <= 1e-2
            it = [0]

            def rot(fn):
                def g():
                    it[0] = (it[0] + 1) % R
                    fn(it[0])
                return g
            if CHECK_ONLY:
                m["ffn1_ms"] = m["ffn2_ms"] = float("nan")
            else:
                m["ffn1_ms"] = median_ms(torch, rot(f1), reps=5 if T > 8192 else 10)
                m["ffn2_ms"] = median_ms(torch, rot(f2), reps=5 if T > 8192 else 10)
        except Exception as exc:  # noqa: BLE001 - report this kernel and go on
            m = {"error": f"{type(exc).__name__}: {exc}"[:400]}
            try:
                torch.cuda.synchronize()
            except Exception as exc2:  # noqa: BLE001 - a sticky error ends the run
                m["fatal"] = str(exc2)[:200]
                row["kernels"][name] = m
                raise
        row["kernels"][name] = m
    torch.cuda.synchronize()
    row["sched_after"] = sched.tolist()          # the dynamic scheduler must leave [0, 0]
    return row


RESULTS_CEIL = {"matmul_tflops": 686.0, "copy_tbps": 4.27}
CHECK_ONLY = False


def print_row(row, variants):
    parts = [f"{row['shape']} T={row['T']} m_tiles {row['m_tiles']} (rows {row['real_rows']}/{row['padded_rows']}) "
             f"floor {row['floor_ms']:.3f}"]
    parts.append(f"  dynamic scheduler counter after the runs: {row.get('sched_after')}")
    if "gather_ms" in row:
        parts.append(f"  gather x -> grouped order (mode t's extra copy): {row['gather_ms']:.3f} ms")
    for name in row["kernels"]:
        m = row["kernels"].get(name, {})
        if "error" in m:
            parts.append(f"  {name}: ERROR {m['error']}")
        elif m:
            parts.append(f"  {name}: ffn1 {m['ffn1_ms']:.3f} ffn2 {m['ffn2_ms']:.3f} ms  nan {m['nan_h']}/{m['nan_y']}"
                         f"  err_h {m.get('err_h', 0):.1e} err_y {m.get('err_y', 0):.1e} err64 {m['err64']:.1e}"
                         f"  {'OK' if m['ok'] else 'FAIL'}")
    print("\n".join(parts), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="mixtral-8x7b,deepseek-v3")
    ap.add_argument("--tokens", default="4096,16384")
    ap.add_argument("--variants", default="ws256s4g8", help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--cubins", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".cubins"))
    ap.add_argument("--build-only", action="store_true", help="compile the cubins (no GPU) and stop")
    ap.add_argument("--verbose", action="store_true", help="print NVRTC/ptxas logs (registers, spills)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--check-only", action="store_true", help="check, do not time (for compute-sanitizer)")
    ap.add_argument("--probe-cupy-struct", action="store_true",
                    help="first check that CuPy's RawKernel passes a TmaDesc by value (integration path)")
    ap.add_argument("--modes", default="d", help="ffn1 A paths of the new kernel: g (cp.async gather), "
                    "t (TMA over x pre-gathered in grouped order), r (one TMA per x row); f: g with the fast epilogue (cvt.rn.bf16x2, __expf); d: f with the dynamic tile scheduler; n: the main loops "
                    "without epilogue stores (timing only)")
    args = ap.parse_args(argv)
    global CHECK_ONLY
    CHECK_ONLY = args.check_only
    if args.build_only:
        for shape in args.shapes.split(","):
            spec = make_spec(shape)
            ws_src, base_src = sources(spec, args.variants.split(","))
            compile_cached(ws_src, args.cubins, f"ws-{shape}", verbose=args.verbose)
            compile_cached(base_src, args.cubins, f"base-{shape}")
        return
    run_device(args)


if __name__ == "__main__":
    main()
