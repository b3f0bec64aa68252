"""One table of dtype spellings: every backend, template and test reads it from here.

Templates receive these strings; they never branch on a dtype name themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class DType:
    name: str          # canonical spelling, a spec field value
    short: str         # spelling inside kernel names
    itemsize: int      # bytes per element in storage
    c_type: str        # C storage type
    c_load: str        # C function: storage -> float
    c_store: str       # C function: float -> storage (round to nearest even)
    cuda_type: str     # CUDA storage type
    cuda_header: str   # header the CUDA type needs ("" for none)
    cuda_load: str     # CUDA device function: storage -> float
    cuda_store: str    # CUDA device function: float -> storage
    tolerance: float   # allowed ||out - ref|| / ||ref|| of the whole layer
    aliases: tuple[str, ...] = ()
    cuda_raw: str = "float"   # header-free CUDA storage type (bit-level conversions)
    cuda_mma: str = ""        # PTX type of mma.sync operands ("" when tensor cores are not used)

    @property
    def numpy(self) -> np.dtype:
        """The NumPy dtype of the storage (``ml_dtypes.bfloat16`` for bf16)."""
        if self.name == "bfloat16":
            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(self.name)

    @property
    def is_half(self) -> bool:
        return self.itemsize == 2


DTYPES: dict[str, DType] = {
    d.name: d for d in (
        DType("float32", "fp32", 4, "float", "ld_f32", "st_f32",
              "float", "", "ld_f32", "st_f32", 1e-5, ("fp32", "f32", "float")),
        DType("float16", "fp16", 2, "uint16_t", "ld_f16", "st_f16",
              "__half", "cuda_fp16.h", "ld_f16", "st_f16", 5e-3, ("fp16", "f16", "half"),
              cuda_raw="unsigned short", cuda_mma="f16"),
        DType("bfloat16", "bf16", 2, "uint16_t", "ld_bf16", "st_bf16",
              "__nv_bfloat16", "cuda_bf16.h", "ld_bf16", "st_bf16", 1e-2, ("bf16",),
              cuda_raw="unsigned short", cuda_mma="bf16"),
    )
}

_ALIASES = {alias: d for d in DTYPES.values() for alias in (d.name, *d.aliases)}


def lookup(value) -> DType:
    """Resolve a dtype spelling, a NumPy dtype or a torch dtype to its table row.

    Raises ``ValueError`` naming the accepted spellings.
    """
    if isinstance(value, DType):
        return value
    key = value
    if not isinstance(value, str):
        key = str(getattr(value, "name", None) or value)
        key = key.replace("torch.", "")
    try:
        return _ALIASES[key.lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_ALIASES)}, got {value!r}") from None


def names() -> list[str]:
    return list(DTYPES)
