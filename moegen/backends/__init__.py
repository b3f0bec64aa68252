"""Backends: ``c`` (system C compiler, ctypes) and ``cuda`` (NVRTC through CuPy)."""

from __future__ import annotations

import functools

from ..errors import SpecError

BACKEND_NAMES = ("c", "cuda")


@functools.lru_cache(maxsize=None)
def get_backend(name: str):
    """The backend object for ``name`` ("c" or "cuda"); imported lazily so that the c backend
    never needs CuPy."""
    if name == "c":
        from .c import CBackend
        return CBackend()
    if name == "cuda":
        from .cuda import CudaBackend
        return CudaBackend()
    raise SpecError(f"backend must be one of {list(BACKEND_NAMES)} (or 'auto' in a spec), got {name!r}")


def cuda_usable() -> bool:
    """True when the cuda backend can compile and run here (CuPy, NVRTC and a GPU)."""
    try:
        return get_backend("cuda").available()
    except Exception:  # noqa: BLE001 - any import/driver failure means "not usable"
        return False
