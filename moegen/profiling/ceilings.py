"""Ceilings measured on this machine, in this run: copy bandwidth and matrix peak.

The floor of a call (`moegen.profiling.floors`) divides by these, so a fraction of the floor is only
meaningful against ceilings taken on the same machine in the same run.

* GPU: a large device-to-device copy (CuPy, cudaMemcpyAsync) and a large matrix product in the
  spec's dtype (PyTorch when installed, else CuPy/cuBLAS), timed
  with CUDA events, best of several.
* CPU: a large NumPy copy (``np.copyto``) and a NumPy float32 matmul (BLAS), perf_counter.

Copy bandwidth counts bytes read + bytes written, like the 3.02 TB/s H100 figure of docs/PERF.md.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np

log = logging.getLogger("moegen.profiling")


@dataclass
class Ceilings:
    """Measured (or given) ceilings of one device.

    ``bandwidth``: bytes/s of a device copy (read + write); ``peak``: FLOP/s of a matrix product
    per storage dtype name; ``methods``: how each was measured; ``measured``: False when the
    numbers were given on the command line instead of measured.
    """
    device: str                                      # "cpu" or "cuda"
    bandwidth: float
    peak: dict[str, float] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)
    measured: bool = True
    _matmul: object = field(default=None, repr=False, compare=False)

    def peak_for(self, dtype: str) -> float:
        """Matrix peak for a storage dtype, measuring it on first use."""
        if dtype not in self.peak:
            if self._matmul is None:
                raise KeyError(f"no matrix peak for dtype {dtype!r} and none can be measured")
            self.peak[dtype], self.methods[f"peak_{dtype}"] = self._matmul(dtype)
        return self.peak[dtype]

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("_matmul", None)
        return d


def fixed(device: str, bandwidth: float, peak: float, dtypes=("float32", "float16", "bfloat16")) -> Ceilings:
    """Ceilings given by the user (e.g. an H100's 3.02e12 B/s and 694e12 FLOP/s)."""
    if not bandwidth > 0 or not peak > 0:
        raise ValueError(f"bandwidth and peak must be > 0, got {bandwidth}, {peak}")
    return Ceilings(device, float(bandwidth), {d: float(peak) for d in dtypes},
                    {"bandwidth": "given", **{f"peak_{d}": "given" for d in dtypes}}, measured=False)


# -- CPU ----------------------------------------------------------------------------------------
def _cpu_copy(nbytes: int = 256 << 20, repeats: int = 10) -> float:
    src = np.random.default_rng(0).random(nbytes // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best


def _cpu_matmul(dtype: str, n: int = 1024, repeats: int = 5) -> tuple[float, str]:
    # NumPy has no fast half-precision matmul; the C backend accumulates in fp32, so the fp32
    # BLAS product is the relevant peak for every storage dtype.
    rng = np.random.default_rng(1)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best, f"numpy float32 matmul {n}^3 (for {dtype} storage), best of {repeats}"


def measure_cpu() -> Ceilings:
    """CPU ceilings: NumPy copy of 256 MiB and float32 matmul (threads as BLAS chooses)."""
    bw = _cpu_copy()
    return Ceilings("cpu", bw, {}, {"bandwidth": "numpy copyto 256 MiB, best of 10 (read+write)"},
                    _matmul=_cpu_matmul)


# -- GPU ----------------------------------------------------------------------------------------
def _gpu_copy(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    import cupy
    src = cupy.empty(nbytes // 4, dtype=cupy.float32)
    src.fill(1.0)
    dst = cupy.empty_like(src)
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    dst.data.copy_from_device(src.data, src.nbytes)      # warm-up
    best = float("inf")
    for _ in range(repeats):
        start.record()
        dst.data.copy_from_device(src.data, src.nbytes)
        stop.record()
        stop.synchronize()
        best = min(best, cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    del src, dst
    cupy.get_default_memory_pool().free_all_blocks()
    return 2 * nbytes / best


def _gpu_matmul(dtype: str, n: int = 8192, repeats: int = 10) -> tuple[float, str]:
    try:
        import torch
        if not torch.cuda.is_available():
            raise ImportError("torch has no CUDA")
        tdt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
        a = torch.randn(n, n, device="cuda", dtype=tdt)
        b = torch.randn(n, n, device="cuda", dtype=tdt)
        mm, how = (lambda: a @ b), f"torch {dtype} matmul {n}^3"
        ev = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
        elapsed = lambda s, e: s.elapsed_time(e)  # noqa: E731
    except ImportError:
        import cupy
        cdt = {"bfloat16": cupy.float16, "float16": cupy.float16, "float32": cupy.float32}[dtype]
        a = cupy.random.standard_normal((n, n), dtype=cupy.float32).astype(cdt)
        b = cupy.random.standard_normal((n, n), dtype=cupy.float32).astype(cdt)
        mm = lambda: a @ b  # noqa: E731
        how = f"cupy/cuBLAS {cupy.dtype(cdt).name} matmul {n}^3 (for {dtype})"
        ev, elapsed = cupy.cuda.Event, cupy.cuda.get_elapsed_time
    for _ in range(3):
        mm()
    best = float("inf")
    for _ in range(repeats):
        s, e = ev(), ev()
        s.record()
        mm()
        e.record()
        e.synchronize()
        best = min(best, elapsed(s, e) / 1e3)
    del a, b
    return 2 * n ** 3 / best, how + f", best of {repeats}"


def measure_gpu() -> Ceilings:
    """GPU ceilings: a 1 GiB device copy and (lazily, per dtype) an 8192³ matrix product."""
    bw = _gpu_copy()
    return Ceilings("cuda", bw, {}, {"bandwidth": "cupy device copy 1 GiB, best of 10 (read+write)"},
                    _matmul=_gpu_matmul)


def measure(device: str) -> Ceilings:
    """Ceilings of ``device`` ("cpu" or "cuda"), measured now."""
    t = time.perf_counter()
    c = measure_gpu() if device == "cuda" else measure_cpu()
    log.info("measured %s copy bandwidth %.1f GB/s in %.2fs", device, c.bandwidth / 1e9,
             time.perf_counter() - t)
    return c
