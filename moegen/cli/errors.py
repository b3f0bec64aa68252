"""Which exceptions the command line turns into one ``error:`` line, and that line.

moegen's own errors and bad values (ValueError/TypeError), OS errors (a missing compiler names
MOEGEN_CC), a missing CuPy (names the ``cuda`` extra) and a CUDA driver/runtime error (says that
no usable GPU is present).  Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from ..environment import CUDA_EXTRA_HINT
from ..errors import MoegenError, exception_chain as _chain

# CuPy's driver/runtime errors, matched by module so that CuPy need not be importable here.
_CUDA_ERROR_MODULES = ("cupy_backends.cuda.api.runtime", "cupy_backends.cuda.api.driver",
                       "cupy.cuda.runtime", "cupy.cuda.driver")


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _missing_cupy(exc: BaseException) -> bool:
    name = getattr(exc, "name", None) or ""
    return isinstance(exc, ImportError) and (name == "cupy" or name.startswith(("cupy.", "cupy_backends")))


def _cuda_error(exc: BaseException) -> bool:
    return any(type(e).__module__ in _CUDA_ERROR_MODULES and type(e).__name__.startswith("CUDA")
               for e in _chain(exc))


def one_line(exc: BaseException) -> str | None:
    """The message for ``exc``, or None when it is not a user-facing error (a bug)."""
    for e in _chain(exc):
        if _missing_cupy(e):
            return f"the cuda backend needs CuPy, which is not installed: {CUDA_EXTRA_HINT}"
    if _cuda_error(exc):
        cause = next(e for e in _chain(exc) if type(e).__module__ in _CUDA_ERROR_MODULES)
        return (f"no usable GPU is present ({_first_line(cause)}); CUDA kernels still build "
                f"without one: moegen build --backend cuda --arch sm_90 ...")
    if isinstance(exc, (MoegenError, ValueError, TypeError, OSError)):
        return _first_line(exc) or type(exc).__name__
    return None
