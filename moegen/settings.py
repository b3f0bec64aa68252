"""Every ``MOEGEN_*`` environment setting, read in one place.

Each is read when asked (never at import), so tests and long-lived processes can change the
environment between calls.  The README lists the same table.

| variable                 | meaning                                                         |
|--------------------------|-----------------------------------------------------------------|
| MOEGEN_CACHE_DIR         | writable kernel cache (default: the user cache dir, ~/.cache/moegen) |
| MOEGEN_PREBUILT_DIR      | read-only prebuilt layer searched first (os.pathsep-separated)  |
| MOEGEN_OFFLINE           | 1: a missing variant raises MissingKernelError instead of compiling |
| MOEGEN_ALWAYS_COMPILE    | 1: ignore cached entries and rebuild (the result is still stored) |
| MOEGEN_KEEP_SOURCE       | 1: save the rendered source of a failed compile (path in the error) |
| MOEGEN_CC                | C compiler for the c backend (default: cc)                      |
| MOEGEN_ISA               | force the CPU ISA tier (x86-64-v2, x86-64-v3, avx512, avx512-bf16, generic) |
| MOEGEN_NUM_THREADS       | threads of the c backend (default: all cores the process may use) |
| MOEGEN_CUDA_ARCH         | CUDA target when none is given and no GPU is visible (e.g. sm_90) |
| MOEGEN_CUDA_PDL          | 0: launch a call's kernels without programmatic dependent launch (default 1; sm_90+) |
| MOEGEN_LOG_LEVEL         | logging level of the ``moegen`` logger (default WARNING)        |
| MOEGEN_TRUSTED_KEYS      | Ed25519 public key files (os.pathsep-separated): prebuilt layers and imports must be signed by one |
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import platformdirs

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}

# Settings that change generated code or compiler flags: their values are part of the cache key.
CODE_SETTINGS = ("MOEGEN_CC", "MOEGEN_ISA", "MOEGEN_CUDA_ARCH")


def _flag(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{name} must be one of 1/0/true/false/yes/no/on/off, got {raw!r}")


def cache_dir() -> Path:
    raw = os.environ.get("MOEGEN_CACHE_DIR")
    if raw:
        return Path(raw).expanduser()
    return Path(platformdirs.user_cache_dir("moegen", appauthor=False))


def prebuilt_dirs() -> list[Path]:
    raw = os.environ.get("MOEGEN_PREBUILT_DIR", "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p]


def trusted_key_files() -> list[Path]:
    """The public key files of MOEGEN_TRUSTED_KEYS (empty: signatures are not required)."""
    raw = os.environ.get("MOEGEN_TRUSTED_KEYS", "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p]


def offline() -> bool:
    return _flag("MOEGEN_OFFLINE")


def always_compile() -> bool:
    return _flag("MOEGEN_ALWAYS_COMPILE")


def keep_source() -> bool:
    return _flag("MOEGEN_KEEP_SOURCE")


def cc() -> str:
    return os.environ.get("MOEGEN_CC", "") or "cc"


def isa_override() -> str | None:
    return os.environ.get("MOEGEN_ISA") or None


def num_threads() -> int:
    raw = os.environ.get("MOEGEN_NUM_THREADS", "")
    if raw:
        try:
            n = int(raw)
        except ValueError:
            raise ValueError(f"MOEGEN_NUM_THREADS must be a positive integer, got {raw!r}") from None
        if n < 1:
            raise ValueError(f"MOEGEN_NUM_THREADS must be a positive integer, got {raw!r}")
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def cuda_arch() -> str | None:
    return os.environ.get("MOEGEN_CUDA_ARCH") or None


def cuda_pdl() -> bool:
    """Programmatic dependent launch of a call's kernels on sm_90+ (read when a module loads)."""
    return os.environ.get("MOEGEN_CUDA_PDL", "").strip() == "" or _flag("MOEGEN_CUDA_PDL")


_LOG_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
               "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}


def log_level() -> int:
    raw = os.environ.get("MOEGEN_LOG_LEVEL", "") or "WARNING"
    level = _LOG_LEVELS.get(raw.strip().upper())
    if level is None:
        raise ValueError(f"MOEGEN_LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, "
                         f"got {raw[:40]!r}")
    return level


def code_settings() -> dict[str, str]:
    """The settings that change generated code, for the cache key."""
    return {name: os.environ.get(name, "") for name in CODE_SETTINGS}


def describe() -> dict[str, str]:
    """Every setting and its current raw value (for ``moegen env``)."""
    names = ("MOEGEN_CACHE_DIR", "MOEGEN_PREBUILT_DIR", "MOEGEN_OFFLINE", "MOEGEN_ALWAYS_COMPILE",
             "MOEGEN_KEEP_SOURCE", "MOEGEN_CC", "MOEGEN_ISA", "MOEGEN_NUM_THREADS",
             "MOEGEN_CUDA_ARCH", "MOEGEN_CUDA_PDL", "MOEGEN_LOG_LEVEL", "MOEGEN_TRUSTED_KEYS")
    return {n: os.environ.get(n, "") for n in names}
