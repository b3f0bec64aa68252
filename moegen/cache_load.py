"""Why a cached kernel failed to load: a bad binary (drop it and rebuild), or the machine
(keep it: no space in TMPDIR, too many open files, no usable GPU...).

`is_bad_binary` decides; `KernelCache.drop_if_bad` drops an entry only when it says so, and
`load_failure` is the one line shown for the other case.  Dropping a good entry for a resource
error is how a full TMPDIR used to delete kernels that an offline machine cannot rebuild.
"""

from __future__ import annotations

import errno

from .errors import exception_chain as _chain

# OSError numbers that describe the machine, not the file being loaded.
RESOURCE_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ENOSPC", "EDQUOT", "EMFILE", "ENFILE", "ENOMEM", "EACCES", "EPERM", "EROFS", "EAGAIN",
    "ENOENT", "ENOTDIR", "EIO", "EINTR", "ETXTBSY", "ENAMETOOLONG") if hasattr(errno, name))

# Words in a loader or driver message that blame the binary itself.
BAD_BINARY_MARKERS = (
    "CUDA_ERROR_INVALID_IMAGE", "CUDA_ERROR_NO_BINARY_FOR_GPU", "CUDA_ERROR_INVALID_PTX",
    "CUDA_ERROR_UNSUPPORTED_PTX_VERSION", "CUDA_ERROR_INVALID_SOURCE", "CUDA_ERROR_NOT_FOUND",
    "cudaErrorInvalidKernelImage", "cudaErrorNoKernelImageForDevice", "cudaErrorInvalidPtx",
    "cudaErrorUnsupportedPtxVersion", "cudaErrorInvalidSource", "cudaErrorSymbolNotFound",
    "invalid ELF header", "wrong ELF class", "ELF file", "file too short", "undefined symbol",
    "not a dynamic executable", "Exec format error", "no version information",
)

# Words that blame the machine: the driver, the device, memory, the file system.
RESOURCE_MARKERS = (
    "cudaErrorNoDevice", "CUDA_ERROR_NO_DEVICE", "cudaErrorInsufficientDriver",
    "CUDA_ERROR_INSUFFICIENT_DRIVER", "cudaErrorInitializationError", "CUDA_ERROR_NOT_INITIALIZED",
    "CUDA_ERROR_DEINITIALIZED", "cudaErrorDevicesUnavailable", "CUDA_ERROR_DEVICE_UNAVAILABLE",
    "cudaErrorSystemDriverMismatch", "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
    "cudaErrorCompatNotSupportedOnDevice", "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE",
    "cudaErrorMemoryAllocation", "CUDA_ERROR_OUT_OF_MEMORY", "cudaErrorOperatingSystem",
    "CUDA_ERROR_OPERATING_SYSTEM", "cudaErrorStubLibrary", "CUDA_ERROR_STUB_LIBRARY",
    "cudaErrorDeviceUnavailable", "cudaErrorNotPermitted", "CUDA_ERROR_NOT_PERMITTED",
    "no CUDA-capable device", "cannot allocate memory", "failed to map segment",
    "No space left on device", "Disk quota exceeded", "Too many open files",
    "Permission denied", "Read-only file system", "Operation not permitted",
    "libcuda.so", "libnvrtc", "CUDA driver version is insufficient",
    "built for ISA tier",       # a good binary for another CPU (the c backend refuses it)
)


def is_bad_binary(exc: BaseException) -> bool:
    """True when ``exc``, raised while loading a cached kernel, blames the binary (a corrupt or
    foreign image: drop it and rebuild); False when it blames the machine (an OS or resource
    error such as ENOSPC, EMFILE or EACCES in TMPDIR, memory, or a missing GPU or driver: keep
    the entry).  Unknown errors count as a bad binary, so a broken entry is never kept forever.
    """
    for link in _chain(exc):
        text = f"{type(link).__name__}: {link}"
        if any(m in text for m in BAD_BINARY_MARKERS):
            return True
        if isinstance(link, MemoryError) or any(m in text for m in RESOURCE_MARKERS):
            return False
        if isinstance(link, OSError) and link.errno is not None:
            return link.errno == errno.ENOEXEC or link.errno not in RESOURCE_ERRNOS
    return True


def load_failure(entry: str, exc: BaseException) -> str:
    """One line for a kernel that could not be loaded for a reason of the machine."""
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return (f"cannot load cached kernel {entry}: {type(exc).__name__}: {first}. This is a "
            f"problem of this machine (disk space, open files, permissions in TMPDIR, or no "
            f"usable GPU/driver), not of the kernel: the cache entry is kept")
