"""CPU instruction-set tiers of the c backend: what this machine runs, and the flags for each.

A tier is an explicit, named ``-march`` level (never a bare ``-march=native``), so a binary
built on one machine runs on every machine of the same tier, and the tier is part of the cache
key.  `detect()` reads the CPU flags once per process; ``MOEGEN_ISA`` overrides it.

Each tier also fixes the register-tile shape of the generated GEMM micro-kernel (read by
`moegen.backends.c_plan`, written into the C as BM and BN): the SIMD width in floats, MR token
rows and NCOL weight rows (output columns; a gated tile spends half of them on gate rows, half
on up rows), so that MR*NCOL accumulators + MR activation vectors + one weight vector fit the
tier's SIMD registers.
"""

from __future__ import annotations

import functools
import logging
import platform
from dataclasses import dataclass

from .. import settings
from ..errors import SpecError

log = logging.getLogger("moegen.backends.isa")


@dataclass(frozen=True)
class Tier:
    name: str
    machine: str                 # "x86_64" or "aarch64"
    flags: tuple[str, ...]       # compiler flags selecting the tier
    needs: frozenset[str]        # /proc/cpuinfo flags a CPU must have to run it
    vec_floats: int              # fp32 lanes of one SIMD register
    mr: int                      # token rows of a register tile
    ncol: int                    # weight rows (output columns) of a register tile, even
    registers: int               # SIMD registers: mr*ncol + mr + 1 must fit
    vreg: str                    # GCC asm constraint for "any SIMD register" of the tier


_V2 = frozenset({"sse3", "ssse3", "sse4_1", "sse4_2", "popcnt", "cx16"})
_V3 = _V2 | {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm"}
_V4 = _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}

TIERS: dict[str, Tier] = {t.name: t for t in (
    Tier("generic", "x86_64", ("-march=x86-64", "-mtune=generic"), frozenset(), 4, 3, 4, 16,
         "x"),
    Tier("x86-64-v2", "x86_64", ("-march=x86-64-v2", "-mtune=generic"), _V2, 4, 3, 4, 16, "x"),
    Tier("x86-64-v3", "x86_64", ("-march=x86-64-v3", "-mtune=generic"), _V3, 8, 3, 4, 16, "x"),
    # "v": any of the 32 zmm registers ("x" would allow only the first 16)
    Tier("avx512", "x86_64", ("-march=x86-64-v4", "-mtune=generic"), _V4, 16, 4, 6, 32, "v"),
    Tier("avx512-bf16", "x86_64", ("-march=x86-64-v4", "-mavx512bf16", "-mtune=generic"),
         _V4 | {"avx512_bf16"}, 16, 4, 6, 32, "v"),
    Tier("armv8-a", "aarch64", ("-march=armv8-a",), frozenset(), 4, 4, 6, 32, "w"),
)}

# Best first: the first tier whose needs the CPU meets is the one we build for.
_X86_ORDER = ("avx512-bf16", "avx512", "x86-64-v3", "x86-64-v2", "generic")


# Linux spells some flags its own way: SSE3 is "pni"; lzcnt is listed as "abm".
_LINUX_SPELLING = {"pni": "sse3", "lzcnt": "abm"}


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return frozenset(flags | {_LINUX_SPELLING[f] for f in flags & set(_LINUX_SPELLING)})
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def detect() -> str:
    """The best tier this CPU runs (read once per process from /proc/cpuinfo)."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "armv8-a"
    if machine not in ("x86_64", "amd64"):
        log.warning("unknown machine %r: building for the generic x86-64 tier", machine)
        return "generic"
    flags = _cpu_flags()
    if not flags:
        log.warning("no CPU flags in /proc/cpuinfo: building for the generic x86-64 tier")
    for name in _X86_ORDER:
        if TIERS[name].needs <= flags:
            return name
    return "generic"  # pragma: no cover - generic needs nothing


def resolve() -> Tier:
    """The tier to build for: ``MOEGEN_ISA`` when set (validated), else `detect()`.

    Raises SpecError naming the known tiers when ``MOEGEN_ISA`` is not one of them.
    """
    name = settings.isa_override() or detect()
    try:
        return TIERS[name]
    except KeyError:
        raise SpecError(f"MOEGEN_ISA must be one of {sorted(TIERS)}, got {name!r}") from None


def runnable(tier: Tier) -> bool:
    """True when this CPU can run code built for ``tier``."""
    machine = platform.machine().lower()
    if tier.machine == "aarch64":
        return machine in ("aarch64", "arm64")
    return machine in ("x86_64", "amd64") and tier.needs <= _cpu_flags()
