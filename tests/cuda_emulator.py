"""Run generated CUDA kernels on the CPU, for tests on machines without a GPU.

The kernel source is compiled by the host C++ compiler with a small shim: ``__global__`` and
friends vanish, ``__shared__`` becomes ``static`` (one block runs at a time), every thread of a
block is an OS thread, ``__syncthreads`` a ``std::barrier`` of the block, and blockIdx /
threadIdx are thread-locals.  Inline PTX (``asm``) compiles to nothing, except the tensor-core
helpers of templates/cuda/_mma.cuh.jinja, ``ldmatrix_x4`` and ``mma_16816`` (bf16), which are
replaced by emulations of their PTX semantics (the warp's lanes exchange their registers
through memory between two barriers of the warp).  Kernels whose executed paths use other PTX
(fp16 conversions, cp.async, wgmma) cannot be emulated.  A launch takes the same
argument tuple a ``cupy.RawKernel`` call gets, with host memory (CPU torch tensors, NumPy
arrays) where the GPU would have device memory.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np

SHIM = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>
struct dim3 { unsigned x = 1, y = 1, z = 1; };
static thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
static std::barrier<>* g_barrier;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define asm(...) ((void)0)
static inline void __syncthreads() { g_barrier->arrive_and_wait(); }
static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
using std::min; using std::max;
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
static inline unsigned __shfl_xor_sync(unsigned, unsigned v, int) { return v; }   // never called
static inline float __shfl_xor_sync(unsigned, float v, int) { return v; }
static inline unsigned long long __shfl_xor_sync(unsigned, unsigned long long v, int) { return v; }
// A read-only vector load: the GPU faults on a misaligned one, so the emulation aborts.
template <class T> static inline T __ldg(const T* p) {
    if (reinterpret_cast<std::uintptr_t>(p) % alignof(T) != 0 || reinterpret_cast<std::uintptr_t>(p) % sizeof(T) != 0) {
        std::fprintf(stderr, "emulator: misaligned %zu-byte load at %p\n", sizeof(T), (const void*)p);
        std::abort();
    }
    return *p;
}

// Tensor-core emulation: "shared addresses" are offsets from an anchor in this module.
static char g_anchor;
static inline unsigned __cvta_generic_to_shared(const void* p) {
    return (unsigned)(std::intptr_t)((const char*)p - &g_anchor);
}
static std::barrier<>* g_warp_barrier[32];
static unsigned g_lane_addr[32][32];
static unsigned g_lane_a[32][32][4], g_lane_b[32][32][2];
static inline void warp_sync() { g_warp_barrier[threadIdx.x >> 5]->arrive_and_wait(); }
static inline float bf16_at(unsigned word, int half) { return __uint_as_float(((word >> (16 * half)) & 0xffffu) << 16); }

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8j..8j+7 give the row addresses of matrix j;
// each lane gets, of every matrix j, the 32-bit pair at row lane/4, columns 2(lane%4), +1.
static void emu_ldmatrix_x4(unsigned (&r)[4], unsigned addr) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    g_lane_addr[w][lane] = addr;
    warp_sync();
    for (int j = 0; j < 4; ++j) {
        const char* row = &g_anchor + (int)g_lane_addr[w][8 * j + (lane >> 2)];
        std::memcpy(&r[j], row + (lane & 3) * 4, 4);
    }
    warp_sync();
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: the PTX fragment layouts of A (16 x 16),
// B (16 x 8) and C (16 x 8), gathered from the warp's lanes.
static void emu_mma_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    for (int i = 0; i < 4; ++i) g_lane_a[w][lane][i] = a[i];
    g_lane_b[w][lane][0] = b0; g_lane_b[w][lane][1] = b1;
    warp_sync();
    const int g = lane >> 2, t = lane & 3;
    for (int ci = 0; ci < 4; ++ci) {
        const int row = g + (ci >> 1) * 8, col = t * 2 + (ci & 1);
        float sum = 0.0f;
        for (int k = 0; k < 16; ++k) {
            const int a_lane = (row % 8) * 4 + (k % 8) / 2;
            const int a_reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
            const int b_lane = col * 4 + (k % 8) / 2;
            const int b_reg = k >= 8 ? 1 : 0;
            sum += bf16_at(g_lane_a[w][a_lane][a_reg], k & 1) * bf16_at(g_lane_b[w][b_lane][b_reg], k & 1);
        }
        c[ci] += sum;
    }
    warp_sync();
}
"""

# The tensor-core helpers of _mma.cuh.jinja and their emulations.
MMA_HELPERS = {
    r"void ldmatrix_x4\(unsigned \(&r\)\[4\], unsigned addr\)\n\{.*?\n\}":
        "void ldmatrix_x4(unsigned (&r)[4], unsigned addr)\n{ emu_ldmatrix_x4(r, addr); }",
    r"void mma_16816\(float \(&c\)\[4\], const unsigned \(&a\)\[4\], unsigned b0, unsigned b1\)\n\{.*?\n\}":
        "void mma_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1)\n"
        "{ emu_mma_16816(c, a, b0, b1); }",
}

LAUNCHER = r"""
template <class... A, std::size_t... I>
static void call_with(void (*k)(A...), void** a, std::index_sequence<I...>) {
    k(*reinterpret_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(a[I])...);
}
template <class... A>
static void launch(void (*k)(A...), dim3 g, dim3 b, void** a) {
    gridDim = g; blockDim = b;
    const unsigned nt = b.x * b.y * b.z;
    for (unsigned z = 0; z < g.z; ++z)
        for (unsigned y = 0; y < g.y; ++y)
            for (unsigned x = 0; x < g.x; ++x) {
                std::barrier<> bar(nt);
                g_barrier = &bar;
                std::vector<std::unique_ptr<std::barrier<>>> warps;
                for (unsigned w = 0; w * 32 < nt; ++w) {
                    warps.emplace_back(new std::barrier<>(std::min(32u, nt - w * 32)));
                    g_warp_barrier[w] = warps.back().get();
                }
                std::vector<std::thread> ts;
                for (unsigned t = 0; t < nt; ++t)
                    ts.emplace_back([=, &bar, &warps]() {
                        blockIdx = dim3{x, y, z};
                        threadIdx = dim3{t % b.x, (t / b.x) % b.y, t / (b.x * b.y)};
                        call_with(k, a, std::index_sequence_for<A...>{});
                        bar.arrive_and_drop();
                        warps[t / 32]->arrive_and_drop();
                    });
                for (auto& th : ts) th.join();
            }
}
extern "C" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                          void** args) {
    static const std::map<std::string, std::function<void(dim3, dim3, void**)>> table = {
%s
    };
    auto it = table.find(name);
    if (it == table.end()) return 1;
    it->second(dim3{gx, gy, gz}, dim3{bx, 1, 1}, args);
    return 0;
}
"""


def available() -> bool:
    """A host C++20 compiler is here."""
    return shutil.which("g++") is not None


class Emulator:
    """The kernels ``names`` of CUDA ``source``, compiled for the CPU."""

    def __init__(self, source: str, names):
        entries = ",\n".join(f'        {{"{n}", [](dim3 g, dim3 b, void** a) {{ launch({n}, g, b, a); }}}}'
                             for n in names)
        for pattern, emulated in MMA_HELPERS.items():
            source = re.sub(pattern, emulated.replace("\\", "\\\\"), source, flags=re.S)
        text = SHIM + source + LAUNCHER.replace("%s", entries)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        self._dir = tempfile.mkdtemp(prefix="moegen-emu-")
        src = os.path.join(self._dir, f"k{digest}.cpp")
        lib = os.path.join(self._dir, f"k{digest}.so")
        with open(src, "w") as fh:
            fh.write(text)
        r = subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", src,
                            "-o", lib], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"emulator compile failed:\n{r.stderr[-4000:]}")
        self._lib = ctypes.CDLL(lib)
        self._lib.emu_launch.argtypes = (ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint,
                                         ctypes.c_uint, ctypes.c_uint,
                                         ctypes.POINTER(ctypes.c_void_p))
        self.launches: list[str] = []

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    @staticmethod
    def _value(a):
        """A kernel argument as the ctypes value the kernel's parameter holds."""
        if isinstance(a, np.uint64):
            return ctypes.c_uint64(int(a))
        if isinstance(a, np.int32):
            return ctypes.c_int32(int(a))
        if isinstance(a, np.float32):
            return ctypes.c_float(float(a))
        if hasattr(a, "data_ptr"):                   # a torch tensor (CPU)
            return ctypes.c_uint64(a.data_ptr())
        if isinstance(a, np.ndarray):
            return ctypes.c_uint64(a.ctypes.data)
        raise TypeError(f"kernel argument of type {type(a).__name__}")

    def launch(self, name: str, grid: tuple, block: int, args: tuple) -> None:
        vals = [self._value(a) for a in args]
        ptrs = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals])
        g = tuple(grid) + (1,) * (3 - len(grid))
        rc = self._lib.emu_launch(name.encode(), g[0], g[1], g[2], block, ptrs)
        if rc:
            raise KeyError(f"no kernel {name!r} in the emulated source")
        self.launches.append(name)


def kernel_names(source: str) -> list[str]:
    """The extern "C" __global__ kernels a source defines."""
    return re.findall(r'extern "C" __global__ void(?: __launch_bounds__\(\w+\))?\s+(\w+)\(', source)
