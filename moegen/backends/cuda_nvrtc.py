"""The CUDA compiler driver: NVRTC (through CuPy's bindings) from source text to a cubin.

Nothing here needs a GPU or a driver: NVRTC compiles for a named ``sm_XY`` on any machine.
We ship SASS (cubins) only: PTX from a newer NVRTC than the driver's does not load.
"""

from __future__ import annotations

import functools
import logging

from ..errors import CompileError

log = logging.getLogger("moegen.cuda")


def nvrtc_module():
    """CuPy's NVRTC bindings; ImportError when CuPy (or its NVRTC) is missing."""
    from cupy_backends.cuda.libs import nvrtc
    return nvrtc


@functools.lru_cache(maxsize=1)
def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library CuPy loads.  Raises when it cannot be loaded."""
    major, minor = nvrtc_module().getVersion()
    return int(major), int(minor)


def supported_archs() -> tuple[int, ...]:
    """Compute capabilities this NVRTC can emit SASS for, e.g. (75, 80, ..., 90, 100)."""
    return tuple(int(a) for a in nvrtc_module().getSupportedArchs())


def compile_cubin(source: str, options: list[str], *, spec_name: str, key: str,
                  filename: str = "moe.cu") -> tuple[bytes, str]:
    """Compile CUDA C++ ``source`` with NVRTC ``options`` (which name an ``sm_XY`` arch).

    Returns (cubin bytes, compiler log).  Raises `CompileError` carrying the options, the log
    and the source when NVRTC rejects the program.
    """
    nvrtc = nvrtc_module()
    prog = nvrtc.createProgram(source, filename, (), ())
    try:
        try:
            nvrtc.compileProgram(prog, list(options))
        except nvrtc.NVRTCError as exc:
            text = _program_log(nvrtc, prog) or str(exc)
            raise CompileError("cuda", spec_name, key, ["nvrtc", *options], text, source) from None
        text = _program_log(nvrtc, prog)
        if text.strip():
            log.debug("nvrtc log for %s:\n%s", spec_name, text)
        return bytes(nvrtc.getCUBIN(prog)), text
    finally:
        nvrtc.destroyProgram(prog)


def _program_log(nvrtc, prog) -> str:
    try:
        text = nvrtc.getProgramLog(prog)
    except Exception:  # noqa: BLE001 - a missing log must not hide the real error
        return ""
    return text.decode(errors="replace") if isinstance(text, bytes) else str(text)
