"""The cuda backend's launch layer (moegen.backends.cuda_launch) on the CPU: the parameter
kinds parsed from the rendered source, the packed parameter bytes, and a whole call's launches
recorded and replayed through stand-ins for cuLaunchKernel / cudaMemsetAsync that read the
parameters back through the pointers the driver would read, compared with the launches the
direct (CuPy RawKernel) path makes for the same call.  No GPU, no cubin."""

from __future__ import annotations

import ctypes
import hashlib
import sys
import types

import numpy as np
import pytest

from moegen.backends import cuda_launch, cuda_tiles, cuda_tma
from moegen.backends.base import Call
from moegen.backends.cuda import CudaModule, render_sources
from moegen.backends.cuda_launch import Slot
from moegen.plan import make_plan
from moegen.spec import MoESpec

SPECS = [
    MoESpec(8, 2, 512, 2048, dtype="bfloat16", backend="cuda", arch="sm_90a"),
    MoESpec(16, 4, 256, 128, dtype="bfloat16", backend="cuda", arch="sm_90", activation="gelu",
            capacity_factor=0.75),
    MoESpec(8, 2, 128, 256, dtype="float32", backend="cuda", arch="sm_90", capacity_factor=1.0),
    MoESpec(64, 6, 1000, 1408, dtype="float16", backend="cuda", arch="sm_90", activation="geglu",
            routing="topk_softmax", bias=True),
    MoESpec(256, 8, 256, 128, dtype="bfloat16", backend="cuda", arch="sm_90a",
            routing="sigmoid_topk", n_group=8, topk_group=4, routed_scaling_factor=2.5,
            num_shared_experts=1),
]


# -- parameter kinds and bytes (pure) ----------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_every_kernel_of_the_plan_has_parameter_kinds(spec):
    plan = make_plan(spec, spec.arch, {})
    kinds = cuda_launch.signatures(render_sources(spec, plan.detail).text)
    assert set(plan.detail.kernels) <= set(kinds)
    assert kinds["moe_route_logits_gemv"] == ("ptr", "ptr", "ptr", "i32")
    assert kinds["moe_combine"] == ("ptr", "ptr", "i32", "i32") + ("ptr",) * (spec.capacity_factor is not None)
    for b in plan.detail.buckets:
        want = ("tma", "tma") + ("ptr",) * 8 if b.ffn1.persistent else ("ptr",) * 7
        assert kinds[b.ffn1_kernel] == want, b.ffn1_kernel


def test_param_kinds_of_declarations():
    k = cuda_launch.param_kind
    assert k("const int* __restrict__ ids") == "ptr"
    assert k(" unsigned char *kept") == "ptr"
    assert k("int tokens") == "i32" and k("unsigned int n") == "i32" and k("float scale") == "f32"
    assert k("const __grid_constant__ moe_ffn::TmaDesc map_a") == "tma"
    with pytest.raises(ValueError, match="long long"):
        k("long long n")
    src = 'extern "C" __global__ void __launch_bounds__(256, 1)\nf(const float* a, int n)\n{}\n' \
          'extern "C" __global__ void g(void) {}'
    assert cuda_launch.signatures(src) == {"f": ("ptr", "i32"), "g": ()}


def test_layout_aligns_each_kind():
    offsets, size = cuda_launch.layout(("i32", "ptr", "i32", "tma", "f32"))
    assert offsets == (0, 8, 16, 64, 192) and size == 256
    assert cuda_launch.layout(()) == ((), 0)


def test_pack_writes_each_value_and_names_the_slots():
    desc = np.frombuffer(bytes(range(128)), np.uint8)
    dev = types.SimpleNamespace(data=types.SimpleNamespace(ptr=0x7000))   # a CuPy-like array
    raw, places = cuda_launch.pack(
        ("ptr", "ptr", "i32", "ptr", "tma", "ptr", "f32"),
        (Slot(0x1000, "x"), dev, np.int32(-3), None, desc, np.uint64(0xABC), 1.5))
    offsets, size = cuda_launch.layout(("ptr", "ptr", "i32", "ptr", "tma", "ptr", "f32"))
    assert len(raw) == size
    u64 = lambda off: int.from_bytes(raw[off:off + 8], "little")   # noqa: E731
    assert u64(offsets[0]) == 0x1000 and u64(offsets[1]) == 0x7000 and u64(offsets[3]) == 0
    assert int.from_bytes(raw[offsets[2]:offsets[2] + 4], "little", signed=True) == -3
    assert raw[offsets[4]:offsets[4] + 128] == bytes(range(128))
    assert u64(offsets[5]) == 0xABC
    assert np.frombuffer(raw[offsets[6]:offsets[6] + 4], np.float32)[0] == 1.5
    assert places == (("x", offsets[0]),)


def test_pack_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="takes 2 arguments"):
        cuda_launch.pack(("ptr", "i32"), (0,))
    with pytest.raises(ValueError, match="32 bits"):
        cuda_launch.pack(("i32",), (1 << 31,))
    with pytest.raises(TypeError, match="pointer"):
        cuda_launch.pack(("ptr",), ("x",))
    with pytest.raises(ValueError, match="128 bytes"):
        cuda_launch.pack(("tma",), (b"\0" * 64,))


# -- a Program replayed through stand-ins that read what the driver would read ----------------
class _Driver:
    """cuLaunchKernel / cudaMemsetAsync stand-ins: each launch's parameters are read back
    through the pointer array, each parameter's bytes from where its pointer points."""

    def __init__(self, kinds: dict, names: dict):
        self.kinds, self.names, self.log = kinds, names, []

    def launch(self, f, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        name = self.names[f]
        kinds = self.kinds[name]
        offsets, size = cuda_launch.layout(kinds)
        buf = bytearray(size)
        for i, (kind, off) in enumerate(zip(kinds, offsets)):
            at = ctypes.c_uint64.from_address(params + 8 * i).value
            n = cuda_launch.KINDS[kind][0]
            buf[off:off + n] = ctypes.string_at(at, n)
        assert extra == 0
        self.log.append(("launch", name, (gx, gy, gz), (bx, by, bz), smem, stream, bytes(buf)))

    def memset(self, ptr, value, nbytes, stream):
        self.log.append(("memset", ptr, value, nbytes, stream))

    def launch_ex(self, config, f, params):
        """cuLaunchKernelEx: the CUlaunchConfig read back from its address, logged as the
        launch it asks for; it must carry exactly the programmatic serialisation attribute."""
        raw = ctypes.string_at(config, cuda_launch.CONFIG_BYTES)
        grid_block_smem = np.frombuffer(raw[:28], np.uint32).tolist()
        stream, attrs = np.frombuffer(raw[32:48], np.uint64).tolist()
        assert np.frombuffer(raw[48:52], np.uint32)[0] == 1
        attr = ctypes.string_at(attrs, cuda_launch.ATTR_BYTES)
        assert np.frombuffer(attr[:4], np.uint32)[0] == cuda_launch.ATTR_PROGRAMMATIC_STREAM_SERIALIZATION
        assert np.frombuffer(attr[8:12], np.int32)[0] == 1
        self.launch(f, *grid_block_smem, stream, params, 0)
        self.log[-1] = ("pdl",) + self.log[-1][1:]


def test_program_replays_its_launches_and_patches_only_the_slots():
    kinds = {"a": ("ptr", "i32", "ptr"), "b": ("tma", "ptr", "ptr", "i32")}
    drv = _Driver(kinds, {11: "a", 22: "b"})
    desc = np.arange(128, dtype=np.uint8)
    steps = [cuda_launch.Launch("a", 11, (3,), (128,), 0, (Slot(0x100, "x"), np.int32(7), 0x900)),
             cuda_launch.Memset(0x5000, 64),
             cuda_launch.Launch("b", 22, (2, 1, 4), (256, 1, 1), 99000,
                                (desc, Slot(0x200, "out"), Slot(0x100, "x"), 5))]
    prog = cuda_launch.Program(steps, kinds.__getitem__, drv.launch, drv.memset)
    ptrs = (0x100, 0x200, None, None, None, None, None)
    prog.run(7, ptrs)
    want_a = cuda_launch.pack(kinds["a"], (0x100, 7, 0x900))[0]
    want_b = cuda_launch.pack(kinds["b"], (desc, 0x200, 0x100, 5))[0]
    assert drv.log == [("launch", "a", (3, 1, 1), (128, 1, 1), 0, 7, want_a),
                       ("memset", 0x5000, 0, 64, 7),
                       ("launch", "b", (2, 1, 4), (256, 1, 1), 99000, 7, want_b)]
    drv.log.clear()
    prog.run(8, (0x1100, 0x2200, None, None, None, None, None))
    assert drv.log[0][-1] == cuda_launch.pack(kinds["a"], (0x1100, 7, 0x900))[0]
    assert drv.log[2][-1] == cuda_launch.pack(kinds["b"], (desc, 0x2200, 0x1100, 5))[0]
    assert [drv.log[0][-2], drv.log[1][-1], drv.log[2][-2]] == [8, 8, 8]     # the streams
    assert prog.values.ctypes.data % 64 == 0 and prog.pointers.ctypes.data % 8 == 0


def test_program_launches_a_kernel_after_a_kernel_as_a_programmatic_dependent_launch():
    """With a programmatic launcher, a launch that follows a launch goes through it (the same
    grid, block, shared memory, parameters and the call's stream); the first launch and one
    after a memset are ordinary launches; without one every launch is ordinary."""
    kinds = {"a": ("ptr", "i32"), "b": ("ptr",)}
    drv = _Driver(kinds, {11: "a", 22: "b"})
    steps = [cuda_launch.Launch("a", 11, (3,), (128,), 0, (Slot(0x100, "x"), 1)),
             cuda_launch.Launch("b", 22, (2, 5), (64,), 4096, (Slot(0x200, "out"),)),
             cuda_launch.Memset(0x5000, 64),
             cuda_launch.Launch("a", 11, (1,), (32,), 0, (0x300, 2)),
             cuda_launch.Launch("b", 22, (7,), (256,), 0, (Slot(0x100, "x"),))]
    prog = cuda_launch.Program(steps, kinds.__getitem__, drv.launch, drv.memset, drv.launch_ex)
    assert prog.programmatic == 2
    for stream, x in ((7, 0x100), (9, 0x1100)):
        drv.log.clear()
        prog.run(stream, (x, 0x200, None, None, None, None, None))
        assert [e[0] for e in drv.log] == ["launch", "pdl", "memset", "launch", "pdl"]
        assert drv.log[1][1:] == ("b", (2, 5, 1), (64, 1, 1), 4096, stream,
                                  cuda_launch.pack(kinds["b"], (0x200,))[0])
        assert drv.log[4][1:] == ("b", (7, 1, 1), (256, 1, 1), 0, stream,
                                  cuda_launch.pack(kinds["b"], (x,))[0])
    plain = cuda_launch.Program(steps, kinds.__getitem__, drv.launch, drv.memset)
    drv.log.clear()
    plain.run(7, (0x100, 0x200, None, None, None, None, None))
    assert plain.programmatic == 0 and [e[0] for e in drv.log].count("pdl") == 0


# -- a whole call: recorded and replayed vs launched directly ----------------------------------
class _Dev(np.ndarray):
    """A NumPy array standing in for a CuPy one: ``a.data.ptr`` is its address."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


def _fake_cupy(monkeypatch):
    """CuPy's allocations answered by NumPy (_Dev), TMA maps by 128 bytes hashed from their
    address and shape (so a map of another address differs)."""
    def alloc(fn):
        return lambda *a, **k: fn(*a, **k).view(_Dev)
    fake = types.SimpleNamespace(empty=alloc(np.empty), zeros=alloc(np.zeros), int32=np.int32,
                                 float32=np.float32, uint8=np.uint8)
    monkeypatch.setitem(sys.modules, "cupy", fake)

    def encode(address, shape):
        return np.frombuffer(hashlib.sha512(repr((address, shape)).encode()).digest() * 2, np.uint8)
    monkeypatch.setattr(cuda_tma, "encode", encode)


class _RawKernel:
    """A cupy.RawKernel stand-in: direct calls are logged with their packed parameter bytes."""

    def __init__(self, name, handle, kinds, log):
        self.name, self.kinds, self.log = name, kinds, log
        self.kernel = types.SimpleNamespace(ptr=handle)
        self.max_dynamic_shared_size_bytes = 48 * 1024

    def __call__(self, grid, block, args, shared_mem=0):
        raw, _ = cuda_launch.pack(self.kinds, args)
        self.log.append(("launch", self.name, cuda_launch.dims(grid), cuda_launch.dims(block),
                         shared_mem, 0, raw))


def _module(spec, monkeypatch, cc="80"):
    """A CudaModule over stand-ins on a device of compute capability ``cc``: both launch paths
    log into ``m.log`` (programmatic launches, sm_90+, as "pdl")."""
    _fake_cupy(monkeypatch)
    plan = make_plan(spec, spec.arch, {})
    m = CudaModule.__new__(CudaModule)
    m.spec, m.plan = spec, plan.detail
    m.layout, m.buckets = cuda_tiles.packed_layout(spec), list(plan.detail.buckets)
    m._workspaces, m._functions, m._external_streams = {}, {}, {}
    m.device = types.SimpleNamespace(id=0, compute_capability=cc)
    m.log = log = []
    kinds = cuda_launch.signatures(render_sources(spec, plan.detail).text)
    handles = {name: 1000 + i for i, name in enumerate(sorted(kinds))}
    m._raw = types.SimpleNamespace(
        get_function=lambda name: _RawKernel(name, handles[name], kinds[name], log))
    drv = _Driver(kinds, {h: n for n, h in handles.items()})
    drv.log = log
    monkeypatch.setattr(cuda_launch, "driver_launch_ex", lambda: drv.launch_ex)
    runtime = types.SimpleNamespace(getDevice=lambda: 0, memsetAsync=drv.memset)
    stream = types.SimpleNamespace(ptr=0)
    m.xp = types.SimpleNamespace(cuda=types.SimpleNamespace(
        runtime=runtime, driver=types.SimpleNamespace(launchKernel=drv.launch),
        get_current_stream=lambda: stream))
    m._init_launch_path(m.xp)
    return m


def _direct(m, stages, ws, ptrs, want_stats):
    """The launches of the direct path (run_stage, CuPy RawKernel calls) for the same call."""
    x, out, buf, router, bias, ids, wts = ptrs
    call = Call(x=x, packed=types.SimpleNamespace(buffer=buf, router=router), out=out,
                tokens=ws.tokens, router_bias=bias, topk_ids=ids, topk_weights=wts,
                want_stats=want_stats)
    for stage in stages:
        m.run_stage(stage, ws, call)


CASES = [  # (stages, T, want_stats, bias, routing given)
    ("all", 1, False, False, False), ("all", 5, True, True, False), ("all", 17, False, True, False),
    ("all", 300, True, False, False), ("all", 9000, False, False, False), ("all", 0, True, False, False),
    ("experts", 7, False, False, True), ("experts", 3000, False, False, True), ("route", 40, False, True, False),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_replayed_launches_equal_the_direct_launches(spec, monkeypatch):
    """For every call shape: the recorded-and-replayed launches (what cuLaunchKernel reads)
    equal the direct path's, byte for byte, on a first call, on a replay with new pointers,
    and again with the first pointers; one program per call shape."""
    m = _module(spec, monkeypatch)
    experts = tuple(s for s in m.stages if not s.startswith("route"))
    for stages_name, T, stats, bias, routed in CASES:
        stages = {"all": m.stages, "route": ("route",), "experts": experts}[stages_name]
        ws = m.workspace(T)
        for base in (0x10000000, 0x20000000, 0x10000000):
            ptrs = (base, base + 0x1000, base + 0x2000, None if routed else base + 0x3000,
                    base + 0x4000 if bias else None, base + 0x5000 if routed else None,
                    base + 0x6000 if routed else None)
            m.log.clear()
            _direct(m, stages, ws, ptrs, stats)
            direct = list(m.log)
            m.log.clear()
            m.enqueue(stages, ws, ptrs, stats, False)
            assert m.log == direct, (stages_name, T, hex(base))
            assert direct or T == 0
    # one program per call shape, and per weights address where a persistent tile takes maps
    persistent = sum(1 for _, T, *_ in CASES if m.workspace(T).weight_maps)
    assert persistent or spec is not SPECS[0]          # the persistent tiles are covered
    assert len(m._programs) == len(CASES) + persistent


def test_program_cache_is_bounded_and_refreshed(monkeypatch):
    from moegen.backends import cuda
    monkeypatch.setattr(cuda, "PROGRAMS_KEPT", 3)
    m = _module(SPECS[0], monkeypatch)
    ptrs = (0x1000, 0x2000, 0x3000, 0x4000, None, None, None)
    for T in (1, 2, 3):
        m.enqueue(m.stages, m.workspace(T), ptrs, False, False)
    m.enqueue(m.stages, m.workspace(1), ptrs, False, False)        # refreshed: now the newest
    m.enqueue(m.stages, m.workspace(4), ptrs, False, False)        # evicts T=2, the oldest
    assert [k[1].tokens for k in m._programs] == [3, 1, 4]
    m.log.clear()
    m.enqueue(m.stages, m.workspace(2), ptrs, False, False)        # recorded again, same launches
    replayed = list(m.log)
    m.log.clear()
    _direct(m, m.stages, m.workspace(2), ptrs, False)
    assert replayed == m.log


def test_a_failed_recording_launches_nothing_and_keeps_nothing(monkeypatch):
    """x misaligned for the tensor-core ffn1: the stage code refuses it while recording, before
    anything is launched; the next good call records and runs."""
    m = _module(SPECS[0], monkeypatch)
    ws = m.workspace(3)
    with pytest.raises(ValueError, match="aligned"):
        m.enqueue(m.stages, ws, (0x1002, 0x2000, 0x3000, 0x4000, None, None, None), False, False)
    assert m.log == [] and not m._programs and m._recorder is None
    m.enqueue(m.stages, ws, (0x1000, 0x2000, 0x3000, 0x4000, None, None, None), False, False)
    assert len(m._programs) == 1 and m.log


class _DeviceArray:
    """A device array by ``__cuda_array_interface__`` at a chosen address (nothing behind it:
    the stand-in driver only reads the parameters)."""

    def __init__(self, shape, typestr: str, ptr: int):
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr,
                                         "data": (ptr, False), "strides": None, "version": 3}


def test_kernel_hands_the_module_its_validated_pointers(monkeypatch):
    """MoEKernel on a pointer-taking module: the launches read exactly the call's x, out,
    weights and router_bias addresses (as the direct path launches them), and a misaligned x,
    out or router_bias is refused before anything is launched."""
    from moegen import arrays
    from moegen.kernel import MoEKernel
    from moegen.layout import PackedWeights
    spec = SPECS[3]
    m = _module(spec, monkeypatch)
    monkeypatch.setattr(arrays, "_pointer_device", lambda ptr: "cuda:0")
    m.native = lambda info: (m.check_aligned(info), info.obj)[1]     # no CuPy views here
    k = MoEKernel(spec, m)
    E, H, T = spec.num_experts, spec.hidden_dim, 5
    ts = {"float16": "<f2", "float32": "<f4"}
    router_shape = (E, H) if k.layout.router_order == "eh" else (H, E)
    weights = PackedWeights(_DeviceArray((k.layout.total,), ts[spec.dtype], 0x7000000),
                            _DeviceArray(router_shape, ts[spec.router_dt.name], 0x8000000), k.layout)
    x = _DeviceArray((T, H), ts[spec.dtype], 0x1000000)
    out = _DeviceArray((T, H), ts[spec.dtype], 0x2000000)
    bias = _DeviceArray((E,), "<f4", 0x3000000)
    k(x, weights, out=out, router_bias=bias)
    replayed = list(m.log)
    m.log.clear()
    _direct(m, m.stages, m.workspace(T),
            (0x1000000, 0x2000000, 0x7000000, 0x8000000, 0x3000000, None, None), False)
    assert replayed == m.log
    m.log.clear()
    for bad in (dict(x=_DeviceArray((T, H), ts[spec.dtype], 0x1000002)),
                dict(out=_DeviceArray((T, H), ts[spec.dtype], 0x2000004)),
                dict(router_bias=_DeviceArray((E,), "<f4", 0x3000002))):
        args = {"x": x, "out": out, "router_bias": bias, **bad}
        with pytest.raises(ValueError, match="aligned"):
            k(args.pop("x"), weights, **args)
    assert m.log == []


# -- the parameter kinds against the compiled kernels (NVRTC, no GPU) --------------------------
_KPARAM_INFO = 0x17       # EIATTR_KPARAM_INFO in a cubin's .nv.info.<kernel> section


def _cubin_param_sizes(cubin: bytes) -> dict[str, dict[int, int]]:
    """Kernel name -> {parameter ordinal: bytes}, from the KPARAM_INFO attributes of the cubin
    (an ELF64 file): each is (index u32, ordinal u16, offset u16, flags u32) with the size in
    the flags' top 14 bits."""
    import struct
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    entsize, count, strndx = struct.unpack_from("<HHH", cubin, 0x3A)
    secs = [struct.unpack_from("<IIQQQQ", cubin, shoff + i * entsize) for i in range(count)]
    names_at = secs[strndx][4]

    def name(o):
        return cubin[names_at + o:cubin.index(b"\0", names_at + o)].decode()
    out = {}
    for sname, _, _, _, off, size in secs:
        n = name(sname)
        if not n.startswith(".nv.info."):
            continue
        params, p = {}, off
        while p + 4 <= off + size:
            fmt, attr, value = cubin[p], cubin[p + 1], struct.unpack_from("<H", cubin, p + 2)[0]
            if fmt != 4:              # no value, byte or half value: 4 bytes in all
                p += 4
                continue
            if attr == _KPARAM_INFO:
                _, ordinal, _, flags = struct.unpack_from("<IHHI", cubin, p + 4)
                params[ordinal] = flags >> 18
            p += 4 + value
        out[n[len(".nv.info."):]] = params
    return out


@pytest.mark.nvrtc
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[2]], ids=lambda s: s.name)
def test_parameter_kinds_have_the_compiled_kernels_sizes(spec):
    """Every kernel's parameter kinds (parsed from the rendered source) have the byte sizes
    the compiled cubin declares, which is what cuLaunchKernel copies from each pointer."""
    from moegen.backends.cuda import CudaBackend
    be = CudaBackend()
    if not be.can_compile():
        pytest.skip("CuPy/NVRTC not installed")
    plan = make_plan(spec, spec.arch, {})
    sources = be.render(plan)
    cubin = be.compile(sources, spec, spec.arch, "t" * 64).binary
    compiled = _cubin_param_sizes(cubin)
    kinds = cuda_launch.signatures(sources.text)
    for name in plan.detail.kernels:
        want = {i: cuda_launch.KINDS[k][0] for i, k in enumerate(kinds[name])}
        assert compiled[name] == want, name


@pytest.mark.parametrize("cc, pdl_env, programmatic", [("90", "", True), ("90", "0", False),
                                                       ("80", "", False)])
def test_a_call_on_sm90_launches_its_later_kernels_programmatically(cc, pdl_env, programmatic,
                                                                    monkeypatch):
    """On sm_90+ every launch of a call after the first (and not after a memset) is a
    programmatic dependent launch with the direct path's parameters; MOEGEN_CUDA_PDL=0 and
    older GPUs launch them all plainly."""
    monkeypatch.setenv("MOEGEN_CUDA_PDL", pdl_env)
    m = _module(SPECS[0], monkeypatch, cc=cc)
    for T in (1, 300, 9000):
        ws = m.workspace(T)
        ptrs = (0x10000000, 0x10001000, 0x10002000, 0x10003000, None, None, None)
        m.log.clear()
        _direct(m, m.stages, ws, ptrs, False)
        direct = list(m.log)
        m.log.clear()
        m.enqueue(m.stages, ws, ptrs, False, False)
        replayed = list(m.log)
        assert [e[1:] for e in replayed] == [e[1:] for e in direct]
        kinds = [e[0] for e in replayed]
        want = ["pdl" if programmatic and i > 0 and kinds[i - 1] != "memset" and k == "launch"
                else k for i, k in enumerate(e[0] for e in direct)]
        assert kinds == want, (T, kinds)
        assert ("pdl" in kinds) == programmatic
