"""What ``moegen env`` reports: compilers, CPU ISA tier, CUDA/NVRTC/GPU, cache, settings."""

from __future__ import annotations

import platform
import shutil
import sys

from . import __version__, settings
from .backends import get_backend
from .cache import KernelCache

# How to get the cuda backend's Python packages (CuPy, NVRTC); named wherever CuPy is missing.
CUDA_EXTRA_HINT = "pip install 'moegen[cuda]'"


def _try(fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - report, never fail
        return f"unavailable ({type(exc).__name__}: {exc})"


def describe_environment() -> dict[str, dict]:
    info: dict[str, dict] = {
        "moegen": {"version": __version__, "python": sys.version.split()[0],
                   "platform": platform.platform(), "machine": platform.machine()},
    }
    c = {}
    cc = settings.cc()
    c["cc"] = shutil.which(cc) or f"{cc} (not found)"
    be = _try(lambda: get_backend("c"))
    if not isinstance(be, str):
        c["available"] = _try(be.available)
        c["toolchain"] = _try(be.toolchain)
        c["isa_tier"] = _try(lambda: be.target(None))
    c["threads"] = _try(settings.num_threads)
    info["c backend"] = c

    cu = {}
    try:
        import cupy
        cu["cupy"] = cupy.__version__
    except Exception as exc:  # noqa: BLE001
        cu["cupy"] = f"not installed ({type(exc).__name__}); {CUDA_EXTRA_HINT}"
    be = _try(lambda: get_backend("cuda"))
    if not isinstance(be, str):
        cu["can_compile"] = _try(be.can_compile)
        cu["available"] = _try(be.available)
        cu["toolchain"] = _try(be.toolchain)
        cu["device"] = _try(_gpu_name)
    info["cuda backend"] = cu

    cache = _try(KernelCache)
    info["cache"] = {"directory": str(settings.cache_dir()),
                     "prebuilt": [str(p) for p in settings.prebuilt_dirs()] or "none",
                     "entries": _try(lambda: len(cache.entries())) if not isinstance(cache, str) else cache}
    info["settings"] = {k: (v or "(unset)") for k, v in settings.describe().items()}
    return info


def _gpu_name() -> str:
    import cupy
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        return f"no GPU visible ({exc}); CUDA builds still work with --arch sm_XX"
    if n == 0:
        return "no GPU visible"
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return f"{name} (sm_{props['major']}{props['minor']}), {n} device(s)"
