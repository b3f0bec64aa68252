"""Run generated CUDA kernels on the CPU, for tests on machines without a GPU.

The kernel source is compiled by the host C++ compiler with a small shim: ``__global__`` and
friends vanish, ``__shared__`` becomes ``static`` (one block runs at a time), every thread of a
block is an OS thread, ``__syncthreads`` a ``std::barrier`` of the block, and blockIdx /
threadIdx are thread-locals.  Dynamic shared memory (``extern __shared__``) is one static
buffer of which a launch may use ``shared_mem`` bytes.  Inline PTX (``asm``) compiles to
nothing, except these tensor-core helpers, which are replaced by emulations of their PTX
semantics (the warp's lanes exchange their registers through memory between two barriers of the
warp): ``ldmatrix_x4``, ``mma_16816`` (bf16), ``cp_async_16`` / ``cp_async_commit`` /
``cp_async_wait`` of templates/cuda/_mma.cuh.jinja and ``bwd_ldmatrix_x4_trans`` of
backward.cu.jinja.  cp.async is as asynchronous as PTX allows: a thread's copies wait in their
commit group and are done only when a wait_group retires the group (a read before the wait sees
stale shared memory); src-size 0 zero-fills.  Misaligned addresses, copies past the launch's
dynamic shared memory and copies still pending when a thread exits abort.  ldmatrix checks
that its row addresses are 16-byte aligned and counts the phases whose 8 rows share a bank
group (`Emulator.ldmatrix_conflicts`).  Kernels whose executed paths use other PTX (fp16
conversions, wgmma) cannot be emulated.  A launch takes the same argument tuple a ``cupy.RawKernel`` call gets, with host memory (CPU torch tensors, NumPy
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
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
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

static inline char* shared_ptr(unsigned addr) { return &g_anchor + (int)addr; }
[[noreturn]] static void emu_fail(const char* what, const void* p) {
    std::fprintf(stderr, "emulator: %s at %p\n", what, p);
    std::abort();
}

// Dynamic shared memory: one buffer, of which the launch gives the block g_dyn_bytes.
constexpr std::size_t EMU_DYN_SMEM = 232448;            // 227 KB, the most an sm_90 block has
alignas(1024) static unsigned char g_dyn_smem[EMU_DYN_SMEM];
static std::size_t g_dyn_bytes;

// ldmatrix phases (one 8 x 8 matrix: 8 rows of 16 bytes) whose rows are not in 8 different
// 16-byte bank groups (the GPU serialises those), counted by lane 0 of the warp.
static std::atomic<long> g_ldmatrix_conflicts{0};
static void ldmatrix_rows_check(const unsigned (&rows)[32]) {
    for (int j = 0; j < 4; ++j) {
        unsigned groups = 0;
        for (int i = 0; i < 8; ++i) {
            const unsigned a = rows[8 * j + i];
            if (a % 16 != 0) emu_fail("ldmatrix row address not 16-byte aligned", shared_ptr(a));
            groups |= 1u << ((a >> 4) & 7);
        }
        if (groups != 0xffu) ++g_ldmatrix_conflicts;
    }
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8j..8j+7 give the row addresses of matrix j;
// each lane gets, of every matrix j, the 32-bit pair at row lane/4, columns 2(lane%4), +1.
static void emu_ldmatrix_x4(unsigned (&r)[4], unsigned addr) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    g_lane_addr[w][lane] = addr;
    warp_sync();
    if (lane == 0) ldmatrix_rows_check(g_lane_addr[w]);
    for (int j = 0; j < 4; ++j) {
        const char* row = shared_ptr(g_lane_addr[w][8 * j + (lane >> 2)]);
        std::memcpy(&r[j], row + (lane & 3) * 4, 4);
    }
    warp_sync();
}

// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: the same row addresses; each lane gets, of
// every matrix j, the 16-bit elements (row 2(lane%4), column lane/4) in the low half and (row
// 2(lane%4)+1, column lane/4) in the high half: the transposed matrix's pair.
static void emu_ldmatrix_x4_trans(unsigned (&r)[4], unsigned addr) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    g_lane_addr[w][lane] = addr;
    warp_sync();
    if (lane == 0) ldmatrix_rows_check(g_lane_addr[w]);
    for (int j = 0; j < 4; ++j) {
        std::uint16_t lo, hi;
        std::memcpy(&lo, shared_ptr(g_lane_addr[w][8 * j + 2 * (lane & 3)]) + 2 * (lane >> 2), 2);
        std::memcpy(&hi, shared_ptr(g_lane_addr[w][8 * j + 2 * (lane & 3) + 1]) + 2 * (lane >> 2), 2);
        r[j] = lo | (unsigned)hi << 16;
    }
    warp_sync();
}

// cp.async.cg.shared.global [dst], [src], 16, src-size (16, or 0: zero fill), commit_group and
// wait_group N: a thread's copies wait in their commit group until a wait_group retires it.
struct EmuCopy { char* dst; const char* src; int bytes; };
static thread_local std::vector<EmuCopy> t_open;                  // not yet committed
static thread_local std::deque<std::vector<EmuCopy>> t_groups;    // committed, in flight
static void emu_cp_async_16(unsigned dst, const void* src, bool full) {
    char* d = shared_ptr(dst);
    const unsigned char* u = reinterpret_cast<const unsigned char*>(d);
    if (dst % 16 != 0) emu_fail("cp.async shared destination not 16-byte aligned", d);
    if (full && reinterpret_cast<std::uintptr_t>(src) % 16 != 0)
        emu_fail("cp.async global source not 16-byte aligned", src);
    if (u + 16 > g_dyn_smem && u < g_dyn_smem + EMU_DYN_SMEM && u + 16 > g_dyn_smem + g_dyn_bytes)
        emu_fail("cp.async past the launch's dynamic shared memory", d);
    t_open.push_back({d, static_cast<const char*>(src), full ? 16 : 0});
}
static void emu_cp_async_commit() { t_groups.push_back(std::move(t_open)); t_open.clear(); }
static void emu_cp_async_wait(int n) {
    while ((int)t_groups.size() > n) {
        for (const EmuCopy& c : t_groups.front()) {
            std::memcpy(c.dst, c.src, c.bytes);
            std::memset(c.dst + c.bytes, 0, 16 - c.bytes);
        }
        t_groups.pop_front();
    }
}
static void emu_cp_async_exit_check() {
    if (!t_open.empty() || !t_groups.empty()) emu_fail("a thread exits with cp.async copies not waited for", nullptr);
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

# The tensor-core helpers (of _mma.cuh.jinja, and backward.cu.jinja's ldmatrix .trans) and their
# emulations: name -> (its definition, the emulated definition).  A source that calls one of
# these names but defines it in another form is refused (its PTX would reach g++).
MMA_HELPERS = {
    "ldmatrix_x4": (r"void ldmatrix_x4\(unsigned \(&r\)\[4\], unsigned addr\)\n\{.*?\n\}",
                    "void ldmatrix_x4(unsigned (&r)[4], unsigned addr)\n{ emu_ldmatrix_x4(r, addr); }"),
    "bwd_ldmatrix_x4_trans": (
        r"void bwd_ldmatrix_x4_trans\(unsigned \(&r\)\[4\], unsigned addr\)\n\{.*?\n\}",
        "void bwd_ldmatrix_x4_trans(unsigned (&r)[4], unsigned addr)\n{ emu_ldmatrix_x4_trans(r, addr); }"),
    "mma_16816": (
        r"void mma_16816\(float \(&c\)\[4\], const unsigned \(&a\)\[4\], unsigned b0, unsigned b1\)\n\{.*?\n\}",
        "void mma_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1)\n"
        "{ emu_mma_16816(c, a, b0, b1); }"),
    "cp_async_16": (r"void cp_async_16\(unsigned dst, const void\* src, bool full\)\n\{.*?\n\}",
                    "void cp_async_16(unsigned dst, const void* src, bool full)\n"
                    "{ emu_cp_async_16(dst, src, full); }"),
    "cp_async_commit": (r"void cp_async_commit\(\) \{[^\n]*\}",
                        "void cp_async_commit() { emu_cp_async_commit(); }"),
    "cp_async_wait": (r"void cp_async_wait\(\) \{[^\n]*\}", "void cp_async_wait() { emu_cp_async_wait(N); }"),
}
# Dynamic shared memory (extern __shared__ unsigned char name[]) -> the emulator's buffer.
DYNAMIC_SHARED = (r"extern __shared__ (?:__align__\(\d+\) )?unsigned char (\w+)\[\];",
                  r"unsigned char* const \1 = g_dyn_smem;")

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
                        emu_cp_async_exit_check();
                        bar.arrive_and_drop();
                        warps[t / 32]->arrive_and_drop();
                    });
                for (auto& th : ts) th.join();
            }
}
extern "C" long emu_ldmatrix_conflicts() { return g_ldmatrix_conflicts.load(); }
extern "C" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                          unsigned long shared_mem, void** args) {
    if (shared_mem > EMU_DYN_SMEM) return 2;
    g_dyn_bytes = shared_mem;
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
        for name, (pattern, emulated) in MMA_HELPERS.items():
            source, n = re.subn(pattern, emulated.replace("\\", "\\\\"), source, flags=re.S)
            if not n and re.search(rf"\b{name}\s*[<(]", source):
                raise RuntimeError(f"emulator: {name} is in the source but not in the form emulated")
        source = re.sub(DYNAMIC_SHARED[0], DYNAMIC_SHARED[1], source)
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
                                         ctypes.c_uint, ctypes.c_uint, ctypes.c_ulong,
                                         ctypes.POINTER(ctypes.c_void_p))
        self._lib.emu_ldmatrix_conflicts.restype = ctypes.c_long
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

    def ldmatrix_conflicts(self) -> int:
        """The ldmatrix phases so far whose 8 rows were not in 8 different bank groups."""
        return int(self._lib.emu_ldmatrix_conflicts())

    def launch(self, name: str, grid: tuple, block: int, args: tuple, shared_mem: int = 0) -> None:
        vals = [self._value(a) for a in args]
        ptrs = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals])
        g = tuple(grid) + (1,) * (3 - len(grid))
        rc = self._lib.emu_launch(name.encode(), g[0], g[1], g[2], block, shared_mem, ptrs)
        if rc == 2:
            raise ValueError(f"shared_mem {shared_mem} is more than an emulated block has")
        if rc:
            raise KeyError(f"no kernel {name!r} in the emulated source")
        self.launches.append(name)


def kernel_names(source: str) -> list[str]:
    """The extern "C" __global__ kernels a source defines."""
    return re.findall(r'extern "C" __global__ void(?: __launch_bounds__\(\w+\))?\s+(\w+)\(', source)
