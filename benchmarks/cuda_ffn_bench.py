"""Time the CUDA expert GEMMs (ffn1 + ffn2) at the benchmark matrix points (moegen.bench.shapes).

For each shape and token count: random bf16 weights in the packed layout (generated on the GPU),
random uniform top-k routing, the grouped layout built on the host (not timed), then

    moegen     launch_ffn1 + launch_ffn2 (the two expert GEMMs, activation fused; no combine)
    grouped_mm torch._grouped_mm: gather x by expert, W13, SiLU·mul, W2, weighted index_add
    dense      two torch.mm of the same M = T·k on one expert's weights (tensor-core yardstick)
    triton     vLLM's fused_experts, if vllm imports (not expected on the device image)

and the floor: max(touched weight bytes + activation bytes over 3.02 TB/s, 2·T·k·3·H·F over
694 TFLOP/s).  Each moegen point is also checked against an fp32 CuPy reference on a few tokens.
Times are CUDA-event medians over rounds of back-to-back calls after a warm-up.

    python benchmarks/cuda_ffn_bench.py [--shapes seed-small,mixtral-8x7b] [--tokens 1,64]
                                        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from moegen.backends import cuda_ffn, cuda_plan, cuda_tiles  # noqa: E402
from moegen.backends.cuda_workspace import Workspace  # noqa: E402
from moegen.plan import make_plan  # noqa: E402
from moegen.backends.base import Call  # noqa: E402
from moegen.bench.shapes import SHAPES, TARGET_TOKENS  # noqa: E402
from moegen.layout import PackedWeights  # noqa: E402
from moegen.render import render_template  # noqa: E402
from moegen.spec import MoESpec  # noqa: E402

TOKENS = TARGET_TOKENS
COPY_BW = 3.02e12        # H100 copy bandwidth (docs/PERF.md)
MMA_PEAK = 694e12
BASELINES = True

import cupy as cp  # noqa: E402


class Module:
    """The ffn kernels of one spec from their own cubin (spec, layout, function(name))."""

    def __init__(self, spec: MoESpec):
        from cupy_backends.cuda.libs import nvrtc
        self.spec, self.layout = spec, cuda_tiles.packed_layout(spec)
        self.plan = make_plan(spec.replace(backend="cuda"), spec.arch, {},
                              sms=cp.cuda.Device().attributes["MultiProcessorCount"]).detail
        ctx = cuda_plan.render_context(spec, self.plan)
        src = render_template("cuda/_layer.cuh.jinja", **ctx) + render_template("cuda/ffn.cu.jinja", **ctx)
        prog = nvrtc.createProgram(src, "ffn.cu", [], [])
        arch = spec.arch
        t = time.perf_counter()
        try:
            nvrtc.compileProgram(prog, [f"--gpu-architecture={arch}", "-std=c++17"])
        except nvrtc.NVRTCError:
            raise RuntimeError(nvrtc.getProgramLog(prog)) from None
        self.compile_s = time.perf_counter() - t
        path = os.path.join(tempfile.mkdtemp(prefix="moegen-ffn-bench-"), "ffn.cubin")
        with open(path, "wb") as f:
            f.write(nvrtc.getCUBIN(prog))
        self.raw = cp.RawModule(path=path)      # loads lazily: the file stays
        self._fn = {}

    def function(self, name):
        if name not in self._fn:
            self._fn[name] = self.raw.get_function(name)
        return self._fn[name]


def bf16_bits(a):
    """float32 CuPy array -> bf16 bit patterns (uint16, round to nearest even)."""
    u = a.view(cp.uint32)
    u = u + cp.uint32(0x7FFF) + ((u >> 16) & 1)
    return (u >> 16).astype(cp.uint16)


def as_f32(bits):
    return (bits.astype(cp.uint32) << 16).view(cp.float32)


def random_packed(layout) -> "cp.ndarray":
    spec = layout.spec
    buf = cp.empty(layout.total, dtype=cp.uint16)
    chunk = 1 << 27
    scale = 1.0 / math.sqrt(spec.hidden_dim)
    for i in range(0, layout.total, chunk):
        n = min(chunk, layout.total - i)
        buf[i:i + n] = bf16_bits(cp.random.standard_normal(n, dtype=cp.float32) * cp.float32(scale))
    return buf


def time_ms(fn, budget_ms=150.0, rounds=7):
    fn()
    cp.cuda.get_current_stream().synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    fn()
    end.record()
    end.synchronize()
    est = max(cp.cuda.get_elapsed_time(start, end), 1e-3)
    reps = int(max(1, min(50, budget_ms / rounds / est)))
    times = []
    for _ in range(rounds):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / reps)
    return statistics.median(times)


def check(spec, layout, buf, x, ids, wts, y_slot, splits, T, sample):
    """Relative error of the kernels' per-token sums on ``sample`` tokens vs an fp32 CuPy
    reference computed from the same bf16 weights."""
    off, stride = layout.offsets, layout.expert_stride
    H, F, G, k = spec.hidden_dim, spec.ffn_dim, layout.gate_rows, spec.top_k
    y = y_slot[: splits * T * k * H].reshape(splits, T, k, H)
    num = den = 0.0
    inter = layout.gate_up_interleave
    for t in sample:
        xt = as_f32(x[t])
        ref = cp.zeros(H, cp.float32)
        for s in range(k):
            e = int(ids[t, s])
            base = e * stride
            w13 = as_f32(buf[base + off["w13"]: base + off["w13"] + G * H]).reshape(G, H)
            w2 = as_f32(buf[base + off["w2"]: base + off["w2"] + H * F]).reshape(H, F)
            a = (w13 @ xt).reshape(F // inter, 2, inter)
            g, u = a[:, 0].ravel(), a[:, 1].ravel()
            h = g / (1 + cp.exp(-g)) * u
            ref += float(wts[t, s]) * (w2 @ h)
        got = as_f32(y[:, t]).sum(axis=(0, 1))
        num += float(cp.sum((got - ref) ** 2))
        den += float(cp.sum(ref ** 2))
    return math.sqrt(num / den) if den > 0 else float("nan")


def torch_baselines(spec, layout, buf, x, ids_np, wts_np, T):
    """{name: ms} of the PyTorch baselines (missing names when unavailable)."""
    out = {}
    try:
        import torch
    except ImportError:
        return out
    H, F, G, E, k = spec.hidden_dim, spec.ffn_dim, layout.gate_rows, spec.num_experts, spec.top_k
    off, stride = layout.offsets, layout.expert_stride
    tb = torch.from_dlpack(buf).view(torch.bfloat16)
    w13 = tb.as_strided((E, G, H), (stride, H, 1), off["w13"])
    w2 = tb.as_strided((E, H, F), (stride, F, 1), off["w2"])
    tx = torch.from_dlpack(x).view(torch.bfloat16)
    ids = torch.as_tensor(ids_np, device="cuda").long()
    wts = torch.as_tensor(wts_np, device="cuda").float()
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token_of = order // k
    w_sorted = wts.reshape(-1)[order]
    offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)

    def swiglu(a):
        a = a.view(a.shape[0], F // layout.gate_up_interleave, 2, layout.gate_up_interleave)
        return (torch.nn.functional.silu(a[:, :, 0].float()) * a[:, :, 1].float()).to(torch.bfloat16).reshape(-1, F)

    def grouped():
        xs = tx[token_of]
        a = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
        y = torch._grouped_mm(swiglu(a), w2.transpose(1, 2), offs=offs)
        res = torch.zeros(T, H, device="cuda", dtype=torch.float32)
        res.index_add_(0, token_of, y.float() * w_sorted[:, None])
        return res

    try:
        grouped()
        out["grouped_mm"] = time_ms(grouped)
    except Exception as exc:  # noqa: BLE001 - report and go on
        out["grouped_mm_error"] = f"{type(exc).__name__}: {exc}"[:200]
    xs = tx[token_of].contiguous()
    w13_0, w2_0 = w13[0].contiguous(), w2[0].contiguous()

    def dense():
        a = torch.mm(xs, w13_0.t())
        return torch.mm(a[:, :F], w2_0.t())

    out["dense"] = time_ms(dense)
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts  # noqa: F401
        out["triton_error"] = "vllm importable but not wired up in this script"
    except Exception:  # noqa: BLE001
        pass
    return out


def run_point(shape, spec, mod, buf, T, rng):
    E, k, H, F = spec.num_experts, spec.top_k, spec.hidden_dim, spec.ffn_dim
    x = bf16_bits(cp.random.standard_normal((T, H), dtype=cp.float32))
    ids_np = np.argsort(rng.random((T, E)), axis=1)[:, :k].astype(np.int32)
    wts_np = rng.random((T, k)).astype(np.float32)
    wts_np /= wts_np.sum(axis=1, keepdims=True)
    cfg = cuda_tiles.bucket_for(mod.plan.buckets, T)
    sizes = cuda_tiles.workspace_sizes(spec, cfg, T)
    sr, te, tr, nt = cuda_tiles.grouped_layout_host(spec, ids_np, cfg.bm, sizes["max_tiles"])
    # The library's own workspace (so the persistent kernels find their tile counters and
    # tensor maps), with the grouped layout built on the host written into it.
    ws = Workspace(spec, mod.plan, cfg, T).view(T)
    for dst, src in ((ws.sorted_rows, sr), (ws.tile_expert, te), (ws.tile_row0, tr), (ws.num_tiles, nt),
                     (ws.topk_weights, wts_np)):
        dst[...] = cp.asarray(src).reshape(dst.shape)
    ws.y_slot.view(cp.uint16)[...] = 0xFFFF                         # NaN poison
    packed = PackedWeights(buf, None, mod.layout)
    call = Call(x=x, packed=packed, out=None, tokens=T)

    def ours():
        cuda_ffn.launch_ffn1(mod, ws, call)
        cuda_ffn.launch_ffn2(mod, ws, call)

    ours()
    cp.cuda.get_current_stream().synchronize()
    sample = sorted(set(np.linspace(0, T - 1, min(T, 4)).astype(int).tolist()))
    err = check(spec, mod.layout, buf, x, ids_np, wts_np, ws.y_slot, cfg.ffn2_splits, T, sample)
    ms = time_ms(ours)
    touched = len(np.unique(ids_np))
    wbytes = touched * 3 * H * F * 2
    floor = max((wbytes + 2 * T * H * 2) / COPY_BW, 2 * T * k * 3 * H * F / MMA_PEAK) * 1e3
    row = {"shape": shape, "T": T, "bucket": cfg.name, "splits": cfg.ffn2_splits,
           "moegen_ms": ms, "floor_ms": floor, "fraction_of_floor": floor / ms,
           "check_rel_err": err, "experts_touched": touched,
           "GBps": wbytes / ms / 1e6, "TFLOPs": 2 * T * k * 3 * H * F / ms / 1e9}
    if BASELINES:
        row.update(torch_baselines(spec, mod.layout, buf, x, ids_np, wts_np, T))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--json", default=None)
    ap.add_argument("--tile", action="append", default=[],
                    help="tile candidate KIND:BM:BN:WM:WN:STAGES[:MINBLOCKS[:BK]] for bucket BM; KIND mma or "
                         "wgmma, or mma-ffn1, wgmma-ffn2... for one GEMM only; BK 64 (default) or 128 (mma)")
    ap.add_argument("--no-baselines", action="store_true", help="time moegen only")
    ap.add_argument("--arch", default=None, help="target (default: sm_90a on sm_90 devices, else the device's)")
    args = ap.parse_args(argv)
    for spec_ in args.tile:
        kind, bm, bn, wm, wn, st, *extra = spec_.split(":")
        stage = "both"
        if kind.endswith("-ffn1") or kind.endswith("-ffn2"):
            kind, stage = kind.rsplit("-", 1)
        table = cuda_tiles.WGMMA_TILES if kind == "wgmma" else cuda_tiles.MMA_TILES
        bk = int(extra[1]) if len(extra) > 1 else cuda_tiles.MMA_BK
        tile = cuda_tiles.GemmTile(kind, int(bm), int(bn), bk, int(wm), int(wn), int(st),
                                   min_blocks=int(extra[0]) if extra else 1)
        f1, f2 = table[int(bm)]
        table[int(bm)] = (tile if stage != "ffn2" else f1, tile if stage != "ffn1" else f2)
    global BASELINES
    BASELINES = not args.no_baselines
    rng = np.random.default_rng(0)
    rows = []
    dev = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"device: {dev}, arch {args.arch or 'auto'}")
    cc = cp.cuda.Device().compute_capability
    arch = args.arch or (f"sm_{cc}a" if cc == "90" else f"sm_{cc}")
    for shape in args.shapes.split(","):
        E, k, H, F = SHAPES[shape]
        spec = MoESpec(E, k, H, F, dtype="bfloat16", arch=arch)
        mod = Module(spec)
        buf = random_packed(mod.layout)
        print(f"{shape}: compiled in {mod.compile_s:.2f} s; tiles {mod.plan.buckets[0].ffn1.tag} / {mod.plan.buckets[-1].ffn1.tag} + {mod.plan.buckets[-1].ffn2.tag}; buckets "
              + ", ".join(f"{c.name}<= {c.max_tokens} (splits {c.ffn2_splits})" for c in mod.plan.buckets))
        for T in map(int, args.tokens.split(",")):
            row = run_point(shape, spec, mod, buf, T, rng)
            rows.append(row)
            print(f"  T={T:6d} {row['bucket']:6s} moegen {row['moegen_ms']:8.3f} ms  floor {row['floor_ms']:7.3f}"
                  f"  ({row['fraction_of_floor']:.2f} of floor, {row['GBps']:.0f} GB/s, {row['TFLOPs']:.0f} TFLOP/s)"
                  f"  grouped_mm {row.get('grouped_mm', float('nan')):8.3f}  dense {row.get('dense', float('nan')):7.3f}"
                  f"  err {row['check_rel_err']:.2e}", flush=True)
            if "grouped_mm_error" in row:
                print("    grouped_mm:", row["grouped_mm_error"])
        del buf, mod
        cp.get_default_memory_pool().free_all_blocks()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev, "rows": rows}, f, indent=1)
    print("\n| shape | T | bucket | moegen ms | floor ms | of floor | grouped_mm ms | dense ms | err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['T']} | {r['bucket']} | {r['moegen_ms']:.3f} | {r['floor_ms']:.3f} | "
              f"{r['fraction_of_floor']:.2f} | {r.get('grouped_mm', float('nan')):.3f} | "
              f"{r.get('dense', float('nan')):.3f} | {r['check_rel_err']:.1e} |")


if __name__ == "__main__":
    main()
