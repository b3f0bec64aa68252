"""Array interop: describe NumPy, CuPy, torch and any ``__cuda_array_interface__`` /
``__dlpack__`` object uniformly, so the kernel can validate before any launch.

Nothing here copies data unless asked (``host``), and nothing allocates on a device.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

_TYPESTR = {"<f4": "float32", "<f2": "float16", "<i4": "int32", "<i8": "int64", "<u2": "uint16",
            "<i2": "int16", "|u1": "uint8", "|b1": "bool", "<f8": "float64", "<V2": "bfloat16"}


class ArrayInfo(NamedTuple):
    """What the checks need of one array.  A NamedTuple, not a frozen dataclass: one is built
    for every array of every call, and a frozen dataclass's __init__ costs ~1.6 µs, this ~0.3."""
    obj: Any
    kind: str            # "numpy" | "cupy" | "torch" | "cuda_array_interface"
    shape: tuple
    dtype: str           # canonical name: float32, float16, bfloat16, int32, ...
    device: str          # "cpu" or "cuda:N"
    contiguous: bool
    ptr: int
    writable: bool = True    # False for a read-only NumPy array (np.frombuffer(bytes(...)))

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")


def describe(a, name: str) -> ArrayInfo:
    """Shape, dtype, device, contiguity and data pointer of an array; TypeError naming
    ``name`` when it is not an array we understand."""
    mod = type(a).__module__ or ""
    if isinstance(a, np.ndarray):
        flags = a.flags
        return ArrayInfo(a, "numpy", tuple(a.shape), _np_name(a.dtype), "cpu",
                         bool(flags.c_contiguous), a.ctypes.data if a.size else 0,
                         bool(flags.writeable))
    if mod.startswith("torch"):
        return _describe_torch(a)
    if mod.startswith("cupy"):
        return ArrayInfo(a, "cupy", tuple(a.shape), _np_name(a.dtype), f"cuda:{a.device.id}",
                         bool(a.flags.c_contiguous), int(a.data.ptr))
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is not None:
        shape = tuple(cai["shape"])
        dtype = _TYPESTR.get(cai["typestr"], cai["typestr"])
        strides = cai.get("strides")
        itemsize = int(cai["typestr"][2:])
        contiguous = strides is None or tuple(strides) == _c_strides(shape, itemsize)
        ptr = int(cai["data"][0])
        return ArrayInfo(a, "cuda_array_interface", shape, dtype, _pointer_device(ptr), contiguous,
                         ptr, not cai["data"][1])
    raise TypeError(f"{name} must be a NumPy, CuPy or torch array (or expose "
                    f"__cuda_array_interface__), got {type(a).__module__}.{type(a).__name__}")


_TORCH_DTYPES: dict = {}


def _describe_torch(t) -> ArrayInfo:
    """`describe` of a torch tensor.  Names come from memo tables (``str(t.dtype)`` and
    ``str(t.device)`` cost microseconds, and this runs for every tensor of every call)."""
    name = _TORCH_DTYPES.get(t.dtype)
    if name is None:
        name = _TORCH_DTYPES[t.dtype] = str(t.dtype).replace("torch.", "")
    dev = f"cuda:{t.get_device()}" if t.is_cuda else "cpu"
    return ArrayInfo(t, "torch", tuple(t.shape), name, dev, t.is_contiguous(), t.data_ptr())


def _pointer_device(ptr: int) -> str:
    """``cuda:N`` of the device holding ``ptr`` (``cuda:?`` when it cannot be asked)."""
    if not ptr:
        return "cuda:?"
    try:
        import cupy  # optional: only __cuda_array_interface__ objects need a driver query
        return f"cuda:{cupy.cuda.runtime.pointerGetAttributes(ptr).device}"
    except Exception:  # noqa: BLE001 - no CuPy / driver: the device stays unknown
        return "cuda:?"


_DTYPE_NAMES: dict = {}


def _np_name(dt) -> str:
    """Canonical name of a NumPy dtype, memoised: ``dtype.name`` costs microseconds, and this
    runs for every array of every call."""
    name = _DTYPE_NAMES.get(dt)
    if name is None:
        name = _DTYPE_NAMES[dt] = np.dtype(dt).name
    return name


def _c_strides(shape, itemsize) -> tuple:
    out, acc = [], itemsize
    for n in reversed(shape):
        out.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(out))


_ALIAS_NOTE = {"uint16": ": the bits of bfloat16 values, since CuPy has no bfloat16"}


def storage_dtypes(dtype: str, device_kind: str) -> tuple[str, ...]:
    """The array dtypes that hold a spec dtype on a device: CuPy has no bfloat16, so on the GPU
    a uint16 array of bf16 bits is accepted too (torch bf16 tensors are bfloat16)."""
    if dtype == "bfloat16" and device_kind == "cuda":
        return ("bfloat16", "uint16")
    return (dtype,)


def check(info: ArrayInfo, name: str, *, shape=None, dtype=None, device_kind=None,
          device_index=None, writable=False) -> None:
    """Raise TypeError/ValueError naming ``name``, the expected and the actual value.
    ``dtype`` is one name or a tuple of accepted names (the first is the one to name);
    ``device_index``: the CUDA device the array must live on; ``writable``: refuse a read-only
    array (an output)."""
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, str) else tuple(dtype)
        if info.dtype not in allowed:
            also = "".join(f" (or {a}{_ALIAS_NOTE.get(a, '')})" for a in allowed[1:])
            raise TypeError(f"{name} must have dtype {allowed[0]}{also}, got {info.dtype}")
    if shape is not None and tuple(info.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(info.shape)}")
    if device_kind == "cpu" and info.on_gpu:
        raise ValueError(f"{name} must be a host (CPU) array for the c backend, got one on {info.device}")
    if device_kind == "cuda" and not info.on_gpu:
        raise ValueError(f"{name} must be a CUDA device array for the cuda backend, got a host array "
                         f"({info.kind}); move it with cupy.asarray(...) or tensor.cuda()")
    if device_index is not None and info.on_gpu and info.device != f"cuda:{device_index}":
        raise ValueError(f"{name} must be on cuda:{device_index} (the kernel's device), got one on "
                         f"{info.device}; compile the kernel with that device current, or move "
                         f"the array")
    if writable and not info.writable:
        raise ValueError(f"{name} must be writable, got a read-only {info.kind} array")
    if not info.contiguous:
        raise ValueError(f"{name} must be C-contiguous, got a strided view of shape {info.shape}; "
                         f"call .copy()/.contiguous() first")


def host(a) -> np.ndarray:
    """Copy any supported array to a host NumPy array (bf16 as ml_dtypes.bfloat16)."""
    return to_numpy(a, "array")


def to_numpy(a, name: str = "array") -> np.ndarray:
    """Any array (NumPy, CuPy, torch, list) as a host NumPy array, keeping bf16 as ml_dtypes."""
    if a is None:
        return None
    mod = type(a).__module__
    if mod.startswith("torch"):
        import torch  # optional heavy package: only for torch inputs
        t = a.detach()
        if t.dtype == torch.bfloat16:
            return t.cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.cpu().numpy()
    if mod.startswith("cupy"):
        return a.get()
    try:
        return np.asarray(a)
    except Exception as exc:  # pragma: no cover - defensive
        raise TypeError(f"{name} must be an array (NumPy, CuPy or torch), got {type(a).__name__}") from exc

