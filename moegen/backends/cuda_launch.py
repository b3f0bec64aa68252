"""Pre-packed kernel launches of the cuda backend: record a call's launches once, replay them.

A call of a `CudaModule` enqueues a handful of kernels (route logits, select + group, ffn1,
ffn2, combine) and a memset or two.  Through ``cupy.RawKernel.__call__`` every launch converts
every argument on every call; here the stage code (`cuda.CudaModule`, `cuda_ffn`) runs once per
*shape* of a call, in recording mode: each launch it asks for is kept as a `Program` step, its
arguments packed into one persistent parameter buffer (the layout ``cuLaunchKernel`` reads: an
array of pointers, one per argument, to the argument's bytes).  Later calls of the same shape
replay the program through ``cuLaunchKernel`` with only the user's data pointers (x, out, the
weights, ...) written into the buffer, at the places recorded for them.

What a program depends on, and so what keys it (`CudaModule.enqueue`): the workspace view (the
bucket and the token count, hence every grid and integer argument), the stages, whether stats
are wanted, which optional arrays are given, and, where a constant argument is derived from the
weights' address (the TMA maps of persistent tiles), that address.

The argument types of every kernel come from one place: the ``extern "C" __global__``
signatures of the rendered source (`signatures`), parsed once when a module loads.
"""

from __future__ import annotations

import re

import numpy as np

# Kernel parameter kinds: (bytes, alignment).  A TMA descriptor (CUtensorMap) is passed by value
# and is 64-byte aligned.
KINDS = {"ptr": (8, 8), "i32": (4, 4), "f32": (4, 4), "tma": (128, 64)}

# The user arrays a call's launches may read or write, in the order of a call's pointer tuple.
SLOTS = ("x", "out", "buffer", "router", "router_bias", "topk_ids", "topk_weights")

_EXTERN = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?'
                     r'(\w+)\s*\(([^)]*)\)')
_SCALARS = {"int": "i32", "unsigned": "i32", "unsigned int": "i32", "float": "f32"}


def param_kind(decl: str) -> str:
    """The kind of one C parameter declaration (``const int* __restrict__ ids`` -> "ptr")."""
    words = decl.replace("*", " * ").split()
    if "*" in words:
        return "ptr"
    if any(w.endswith("TmaDesc") for w in words):
        return "tma"
    base = " ".join(w for w in words[:-1]
                    if w not in ("const", "__restrict__", "__grid_constant__"))
    kind = _SCALARS.get(base)
    if kind is None:
        raise ValueError(f"kernel parameter {decl.strip()!r}: type {base!r} is not one of "
                         f"pointer, TmaDesc, {', '.join(_SCALARS)}")
    return kind


def signatures(source: str) -> dict[str, tuple[str, ...]]:
    """Kernel name -> parameter kinds, for every ``extern "C" __global__`` kernel of ``source``."""
    out = {}
    for name, params in _EXTERN.findall(source):
        decls = [p for p in params.split(",") if p.strip() and p.strip() != "void"]
        out[name] = tuple(param_kind(p) for p in decls)
    return out


def layout(kinds) -> tuple[tuple[int, ...], int]:
    """(byte offset of each parameter, total bytes) of parameters packed back to back, each at
    its kind's alignment; the total is a multiple of 64 so blocks can follow one another."""
    offsets, at = [], 0
    for k in kinds:
        size, align = KINDS[k]
        at = -(-at // align) * align
        offsets.append(at)
        at += size
    return tuple(offsets), -(-at // 64) * 64


class Slot(int):
    """A user array's data pointer, named, as the stage code sees it while a call is recorded:
    an int (alignment checks and address arithmetic work on it) whose launches' parameter
    places are remembered and rewritten on every replay."""

    def __new__(cls, value: int, name: str):
        s = super().__new__(cls, value)
        s.name = name
        return s


def value_of(kind: str, a):
    """(value, slot name or None) of one kernel argument as the stage code passes it: for
    pointers a `Slot`, None (null), an int or a CuPy array; for scalars an int or float (NumPy
    or Python); for a TMA map its 128 bytes (a NumPy structured scalar or bytes)."""
    if kind == "ptr":
        if type(a) is Slot:
            return int(a), a.name
        if a is None:
            return 0, None
        if isinstance(a, (int, np.integer)):
            v = int(a)
        else:
            v = int(getattr(getattr(a, "data", None), "ptr", -1))   # a CuPy array
        if not 0 <= v < 1 << 64:
            raise TypeError(f"a pointer kernel argument must be a device array, an address or "
                            f"None, got {type(a).__name__}")
        return v, None
    if kind == "i32":
        v = int(a)
        if not -(1 << 31) <= v < 1 << 31:
            raise ValueError(f"an int kernel argument must fit 32 bits, got {v}")
        return v, None
    if kind == "f32":
        return float(a), None
    raw = bytes(a) if isinstance(a, (bytes, bytearray)) else np.asarray(a).tobytes()
    if len(raw) != KINDS["tma"][0]:
        raise ValueError(f"a TMA map kernel argument must be {KINDS['tma'][0]} bytes, got {len(raw)}")
    return raw, None


def pack(kinds, args) -> tuple[bytes, tuple[tuple[str, int], ...]]:
    """The parameter bytes of one launch (laid out by `layout`) and its slot places: (slot
    name, byte offset) of every argument that is a user's pointer.  Pure."""
    kinds = tuple(kinds)
    if len(args) != len(kinds):
        raise ValueError(f"the kernel takes {len(kinds)} arguments ({', '.join(kinds)}), "
                         f"got {len(args)}")
    offsets, size = layout(kinds)
    buf = bytearray(size)
    places = []
    for kind, off, a in zip(kinds, offsets, args):
        v, slot = value_of(kind, a)
        if kind == "ptr":
            buf[off:off + 8] = v.to_bytes(8, "little")
        elif kind == "i32":
            buf[off:off + 4] = v.to_bytes(4, "little", signed=True)
        elif kind == "f32":
            buf[off:off + 4] = np.float32(v).tobytes()
        else:
            buf[off:off + len(v)] = v
        if slot is not None:
            places.append((slot, off))
    return bytes(buf), tuple(places)


def dims(d) -> tuple[int, int, int]:
    """A grid or block (an int or 1 to 3 ints) as three ints."""
    d = (d,) if isinstance(d, (int, np.integer)) else tuple(d)
    if not 1 <= len(d) <= 3:
        raise ValueError(f"a grid or block has 1 to 3 dimensions, got {d}")
    return tuple(int(v) for v in d) + (1,) * (3 - len(d))


class Launch:
    """One recorded kernel launch: the function, its raw handle, grid, block, dynamic shared
    memory and arguments as the stage code passed them."""
    __slots__ = ("name", "func", "grid", "block", "smem", "args")

    def __init__(self, name: str, func: int, grid, block, smem: int, args: tuple):
        self.name, self.func, self.smem, self.args = name, int(func), int(smem), tuple(args)
        self.grid, self.block = dims(grid), dims(block)


class Memset:
    """One recorded memset to zero of ``nbytes`` at device address ``ptr``."""
    __slots__ = ("ptr", "nbytes")

    def __init__(self, ptr: int, nbytes: int):
        self.ptr, self.nbytes = int(ptr), int(nbytes)


class RecordingKernel:
    """Stands in for a ``cupy.RawKernel`` while a call is recorded: calling it records the
    launch (``sink(name, raw, grid, block, args, smem)``) instead of launching; the dynamic
    shared-memory limit reads and sets the real kernel's (`cuda_ffn` raises it as before)."""
    __slots__ = ("raw", "name", "sink")

    def __init__(self, raw, name: str, sink):
        self.raw, self.name, self.sink = raw, name, sink

    def __call__(self, grid, block, args, shared_mem: int = 0):
        self.sink(self.name, self.raw, grid, block, args, shared_mem)

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        return self.raw.max_dynamic_shared_size_bytes

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value: int) -> None:
        self.raw.max_dynamic_shared_size_bytes = value


# cuLaunchKernelEx's configuration (cuda.h, CUDA 12 and 13): CUlaunchConfig is grid x/y/z,
# block x/y/z, sharedMemBytes (7 x uint32), then the stream, the attribute array and their count
# at byte offsets 32, 40 and 48 (56 bytes); a CUlaunchAttribute is a 4-byte id, 4 bytes of
# padding and a 64-byte value union (72 bytes).
CONFIG_BYTES, ATTR_BYTES = 56, 72
CONFIG_STREAM, CONFIG_ATTRS, CONFIG_NUM_ATTRS = 32, 40, 48
ATTR_PROGRAMMATIC_STREAM_SERIALIZATION = 6   # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


def pdl_config(step) -> np.ndarray:
    """The CUlaunchConfig bytes (followed by its one attribute) of a launch step tuple
    ``(func, gx, gy, gz, bx, by, bz, smem, params)`` with programmatic stream serialisation
    allowed; the stream is written per call (`Program.run`).  The attribute sits inside the
    same array, so its address is fixed once the array is."""
    buf = np.zeros(CONFIG_BYTES + ATTR_BYTES, np.uint8)
    u32 = buf[:28].view(np.uint32)
    u32[:] = step[1:8]
    attr = buf[CONFIG_BYTES:]
    attr[:4].view(np.uint32)[0] = ATTR_PROGRAMMATIC_STREAM_SERIALIZATION
    attr[8:12].view(np.int32)[0] = 1
    buf[CONFIG_ATTRS:CONFIG_ATTRS + 8].view(np.uint64)[0] = attr.ctypes.data
    buf[CONFIG_NUM_ATTRS:CONFIG_NUM_ATTRS + 4].view(np.uint32)[0] = 1
    return buf


class DriverLaunchEx:
    """``cuLaunchKernelEx`` of the driver library through ctypes (CuPy does not expose it):
    ``launch(config_address, function, params_address)``; a CUDA error raises RuntimeError
    naming it."""

    def __init__(self, lib=None):
        import ctypes
        if lib is None:
            lib = ctypes.CDLL("libcuda.so.1")
        fn = lib.cuLaunchKernelEx
        fn.restype = ctypes.c_int
        fn.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
        self._fn, self._lib = fn, lib

    def __call__(self, config: int, func: int, params: int) -> None:
        rc = self._fn(config, func, params, None)
        if rc:
            import ctypes
            name = ctypes.c_char_p()
            self._lib.cuGetErrorName(rc, ctypes.byref(name))
            raise RuntimeError(f"cuLaunchKernelEx failed: {(name.value or b'?').decode()} ({rc})")


def driver_launch_ex():
    """A `DriverLaunchEx`, or None where the driver library or its cuLaunchKernelEx is missing
    (the launches then go through cuLaunchKernel without the attribute)."""
    try:
        return DriverLaunchEx()
    except (OSError, AttributeError):
        return None


class Program:
    """The launches of one call shape, packed once, replayed by `run`.

    All launches' parameter bytes live in one 64-byte aligned buffer, followed by the arrays of
    parameter pointers ``cuLaunchKernel`` takes; both stay alive (and unmoved) with the program.

    With ``launch_pdl`` (a `DriverLaunchEx`), every kernel launch that directly follows another
    kernel launch of the program goes through it with programmatic stream serialisation
    (programmatic dependent launch, sm_90+): its CTAs may start while the previous kernel runs,
    and wait for it in the kernel (pdl_wait in templates/cuda/_pdl.cuh.jinja).  The first
    launch, and one after a memset, are ordinary launches: they start after everything before
    them, so work the caller enqueued earlier (a weight update, say) is complete before any
    kernel of the call reads weights.
    """

    def __init__(self, steps, kinds_of, launch, memset, launch_pdl=None):
        """``steps``: `Launch` and `Memset` in order; ``kinds_of(name)``: a kernel's parameter
        kinds (see `signatures`); ``launch`` / ``memset``: ``cupy.cuda.driver.launchKernel``
        and ``cupy.cuda.runtime.memsetAsync`` (or stand-ins with their signatures);
        ``launch_pdl``: None, or the launcher of programmatic dependent launches."""
        self._launch, self._memset, self._launch_pdl = launch, memset, launch_pdl
        blocks, places, at = [], [], 0
        for s in steps:
            if isinstance(s, Launch):
                raw, slot_places = pack(kinds_of(s.name), s.args)
                blocks.append((at, raw, layout(kinds_of(s.name))[0]))
                places += [(SLOTS.index(name), (at + off) // 8) for name, off in slot_places]
                at += len(raw)
        nptr = sum(len(o) for _, _, o in blocks)
        mem = np.zeros(at + 8 * nptr + 64, np.uint8)           # 64 spare: to align the start
        skip = -mem.ctypes.data % 64
        self._mem = mem
        self.values = mem[skip:skip + at]
        self.pointers = mem[skip + at:skip + at + 8 * nptr].view(np.uint64)
        base = self.values.ctypes.data
        self._u64 = self.values.view(np.uint64)
        self._places = tuple(places)
        run, p = [], 0
        blk = iter(blocks)
        self._configs = []                    # CUlaunchConfig of each programmatic launch
        after_kernel = False
        for s in steps:
            if isinstance(s, Launch):
                start, raw, offsets = next(blk)
                self.values[start:start + len(raw)] = np.frombuffer(raw, np.uint8)
                for i, off in enumerate(offsets):
                    self.pointers[p + i] = base + start + off
                step = (s.func, *s.grid, *s.block, s.smem, self.pointers.ctypes.data + 8 * p)
                if launch_pdl is not None and after_kernel:
                    cfg = pdl_config(step)
                    self._configs.append(cfg)
                    step = (s.func, cfg.ctypes.data, step[8])
                run.append(step)
                p += len(offsets)
                after_kernel = True
            else:
                run.append((None, s.ptr, s.nbytes))
                after_kernel = False
        self.steps = tuple(run)
        self._streams = tuple(c[CONFIG_STREAM:CONFIG_STREAM + 8].view(np.uint64) for c in self._configs)
        self._stream = None
        self._last = None

    @property
    def programmatic(self) -> int:
        """How many of the program's launches are programmatic dependent launches."""
        return len(self._configs)

    def patch(self, ptrs) -> None:
        """Write the call's pointers (a tuple in `SLOTS` order) into their recorded places."""
        if ptrs != self._last:
            u64 = self._u64
            for slot, i in self._places:
                u64[i] = ptrs[slot]
            self._last = ptrs

    def run(self, stream: int, ptrs) -> None:
        """Enqueue every step on ``stream`` (a raw handle) for the call's pointers ``ptrs``."""
        self.patch(ptrs)
        if stream != self._stream:
            for v in self._streams:
                v[0] = stream
            self._stream = stream
        launch, memset, launch_pdl = self._launch, self._memset, self._launch_pdl
        for s in self.steps:
            if s[0] is None:
                memset(s[1], 0, s[2], stream)
            elif len(s) == 3:
                launch_pdl(s[1], s[0], s[2])
            else:
                launch(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], stream, s[8], 0)
