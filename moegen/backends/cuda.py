"""The ``cuda`` backend: NVRTC-compiled cubins run through CuPy.

    CudaBackend.plan/render/options/compile  ->  one cubin per plan (every bucket's kernels)
    CudaBackend.load                         ->  CudaModule: workspaces + stage launches

Every constant the templates and the launches share lives in the plan
(`moegen.backends.cuda_plan.CudaPlan`).

Importing this module never needs CuPy: it is imported lazily inside the methods, so
``moegen env`` and ``moegen build --backend cuda --arch sm_90`` work on a machine without it
(``available()`` is False there) or without a GPU (NVRTC needs none).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from typing import NamedTuple

import numpy as np

from .. import arrays, settings
from ..errors import SpecError
from ..reference import capacity as expert_capacity
from ..render import render_files
from ..spec import MoESpec
from . import cuda_launch, cuda_plan, cuda_tiles
from .base import STAGES, Artifact, Call, Sources
from .cuda_ffn import launch_ffn1, launch_ffn2
from .cuda_nvrtc import compile_cubin, nvrtc_version
from .cuda_plan import CudaPlan, vec_width
from .cuda_workspace import Workspace, capacity_for, storage_dtype

log = logging.getLogger("moegen.cuda")


class CudaBackend:
    """NVRTC -> cubin for an exact ``sm_XY``; loaded and launched through CuPy."""

    name = "cuda"
    templates = ("cuda/moe.cu.jinja",)

    # -- availability ----------------------------------------------------------------------
    def can_compile(self) -> bool:
        """CuPy and its NVRTC load (no GPU needed)."""
        try:
            nvrtc_version()
            import cupy  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot compile here"
            log.debug("cuda backend cannot compile: %s: %s", type(exc).__name__, exc)
            return False
        return True

    def available(self) -> bool:
        """CuPy, NVRTC and at least one visible GPU."""
        if not self.can_compile():
            return False
        try:
            import cupy
            return cupy.cuda.runtime.getDeviceCount() > 0
        except Exception as exc:  # noqa: BLE001 - no driver / no device
            log.debug("cuda backend has no device: %s: %s", type(exc).__name__, exc)
            return False

    # -- planning and rendering ------------------------------------------------------------
    def tunables(self, spec: MoESpec) -> dict[str, tuple]:
        """The GEMM tile of each tensor-core token-count bucket (`cuda_tiles.tile_choices`),
        the cost model's tile first; nothing for SIMT (fp32) specs."""
        return cuda_plan.tunables(spec, spec.arch)

    def plan(self, spec: MoESpec, target: str, tuning: dict, sms: int | None = None) -> CudaPlan:
        """The `CudaPlan` of ``spec`` (pure; ``sms`` None: the arch's reference GPU)."""
        return cuda_plan.plan(spec, target, tuning, sms)

    def render(self, plan) -> Sources:
        """The one .cu source of a `moegen.plan.KernelPlan`, rendered from the plan alone."""
        return render_sources(plan.spec, plan.detail)

    def sm_count(self, target: str) -> int | None:
        """Multiprocessors of the current device when it is of ``target``'s arch, else None
        (the plan then uses the arch's reference count)."""
        try:
            import cupy
            if cupy.cuda.runtime.getDeviceCount() > 0:
                dev = cupy.cuda.Device()
                if target.rstrip("a") == f"sm_{dev.compute_capability}":
                    return int(dev.attributes["MultiProcessorCount"])
        except Exception as exc:  # noqa: BLE001 - no CuPy, driver or device: the arch table
            log.debug("no device SM count: %s: %s", type(exc).__name__, exc)
        return None

    # -- target and toolchain --------------------------------------------------------------
    def target(self, spec: MoESpec) -> str:
        """spec.arch, else the current device's target (``sm_90a`` on Hopper, so the prefill
        GEMMs may use wgmma; ``sm_XY`` elsewhere), else MOEGEN_CUDA_ARCH; SpecError when none
        of them says."""
        if spec.arch:
            return spec.arch
        try:
            import cupy
            if cupy.cuda.runtime.getDeviceCount() > 0:
                return cuda_tiles.preferred_arch(cupy.cuda.Device().compute_capability)
        except Exception:  # noqa: BLE001 - no CuPy, driver or device: fall through
            pass
        arch = settings.cuda_arch()
        if arch:
            return arch
        raise SpecError("no CUDA arch: no GPU is visible and MOEGEN_CUDA_ARCH is unset; pass "
                        "arch='sm_90' (MoESpec) or --arch sm_90 (CLI)")

    def toolchain(self) -> dict:
        """NVRTC version and CuPy version (both change the binary or how it loads)."""
        import cupy
        return {"nvrtc": ".".join(map(str, nvrtc_version())), "cupy": cupy.__version__}

    def options(self, spec: MoESpec, target: str) -> list[str]:
        """NVRTC options.  No --use_fast_math: it flushes denormals and breaks NaN handling."""
        return [f"--gpu-architecture={target}", "--std=c++17"]

    # -- compile and load ------------------------------------------------------------------
    def compile(self, sources: Sources, spec: MoESpec, target: str, key: str) -> Artifact:
        """Sources -> cubin bytes.  Raises CompileError with the NVRTC log and the source."""
        t0 = time.perf_counter()
        cubin, text = compile_cubin(sources.text, self.options(spec, target),
                                    spec_name=spec.name, key=key, filename=sources.entry)
        meta = {"backend": self.name, "target": target, "nvrtc": list(nvrtc_version()),
                "compile_seconds": round(time.perf_counter() - t0, 4), "compile_log": text[-4000:]}
        return Artifact(cubin, meta)

    def load(self, artifact: Artifact, plan) -> "CudaModule":
        """Load a cubin built from ``plan`` on the current device.  Raises
        cupy.cuda.driver.CUDADriverError (or another CuPy error) when it cannot be loaded or
        lacks a kernel, and a runtime error when there is no usable device."""
        return CudaModule(plan.spec, plan.detail, artifact.binary)


# ---------------------------------------------------------------------------------------------
def render_sources(spec: MoESpec, plan: CudaPlan) -> Sources:
    """The one .cu source of ``spec``'s `CudaPlan` (pure)."""
    files = render_files(CudaBackend.templates, cuda_plan.render_context(spec, plan))
    return Sources(backend=CudaBackend.name, files=files, entry=next(iter(files)))


def _load_raw_module(cubin: bytes):
    """A cupy.RawModule over the cubin bytes (through a private temp file, removed at once)."""
    import cupy
    fd, path = tempfile.mkstemp(prefix="moegen-", suffix=".cubin")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(cubin)
        raw = cupy.RawModule(path=path)
        raw.module                      # load now: a bad binary must fail here, not later
    finally:
        os.unlink(path)
    return raw


def _arg(a):
    """A pointer kernel argument: CuPy arrays as they are, None as a null pointer."""
    return np.uint64(0) if a is None else a


# Recorded launch programs kept per module (an LRU): one per call shape in use (stages, token
# count, optional arrays given); a decode loop uses one, a server a few token counts.
PROGRAMS_KEPT = 32


class _Packed(NamedTuple):
    """The packed weights as a recorded call's stages see them (`cuda_launch.Slot` pointers)."""
    buffer: object
    router: object


def _torch_stream_getter():
    """A function: device index -> torch's current raw stream handle there."""
    import torch  # optional heavy package: only torch inputs ask for torch's stream
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)   # what torch.compile's code calls
    if raw is not None:
        return raw
    return lambda index: torch.cuda.current_stream(index).cuda_stream


class CudaModule:
    """One loaded cubin for one spec (the Module contract of moegen.backends.base).

    Launches go to the current CuPy stream, or torch's current stream when the call's x is a
    torch tensor; nothing here synchronises or allocates inside a call once the call's bucket
    has its workspace, so calls can be captured in a CUDA graph.

    `enqueue` (what `moegen.kernel.MoEKernel` calls) takes the call's data pointers and replays
    the call's launches, recorded once per call shape and packed for ``cuLaunchKernel``
    (`moegen.backends.cuda_launch`); `run_stage` launches one stage directly through CuPy
    (profiling, the distributed layer).  Both run the same stage code.
    """

    device_kind = "cuda"
    stages = STAGES

    def __init__(self, spec: MoESpec, plan: CudaPlan, cubin: bytes):
        import cupy
        self.spec = spec
        self.plan = plan
        self.xp = cupy
        self.layout = cuda_tiles.packed_layout(spec)
        self.buckets = list(plan.buckets)
        self.device = cupy.cuda.Device()
        self._raw = _load_raw_module(cubin)
        self._functions: dict = {}
        self._workspaces: dict = {}
        self._external_streams: dict = {}     # torch stream handle -> CuPy wrapper
        self._recorder = None                 # the steps list while a call is recorded
        for name in self.kernel_names():       # a cubin missing a kernel is a bad binary
            self.function(name)
        self._init_launch_path(cupy)

    def _init_launch_path(self, cupy) -> None:
        """The state of `enqueue`: parameter kinds from the source the cubin was built from,
        the recorded programs, and the driver entry points, resolved once (``cupy``: the CuPy
        module, or a stand-in with the same entry points)."""
        self._recorder = None
        self._kinds = cuda_launch.signatures(render_sources(self.spec, self.plan).text)
        self._programs: OrderedDict = OrderedDict()
        self._recording_kernels: dict = {}
        self._lock = threading.Lock()
        self._device_id = int(self.device.id)
        self._get_device = cupy.cuda.runtime.getDevice
        self._cupy_stream = cupy.cuda.get_current_stream
        self._torch_stream = None
        self._launchers = (cupy.cuda.driver.launchKernel, cupy.cuda.runtime.memsetAsync,
                           self._pdl_launcher())
        self._storage_names = arrays.storage_dtypes(self.spec.dtype, self.device_kind)
        dt = self.spec.dt
        self._activation_align = max(vec_width(self.spec.hidden_dim, dt.itemsize) * dt.itemsize,
                                     cuda_tiles.x_alignment(self.spec))

    def _pdl_launcher(self):
        """The programmatic dependent launcher of `cuda_launch.Program` (every kernel of this
        cubin waits for its predecessor in the kernel: pdl_wait), or None: below sm_90, with
        MOEGEN_CUDA_PDL=0, or where the driver lacks cuLaunchKernelEx."""
        if int(self.device.compute_capability) < 90 or not settings.cuda_pdl():
            return None
        return cuda_launch.driver_launch_ex()

    def kernel_names(self) -> list[str]:
        return list(self.plan.kernels)

    def function(self, name: str):
        """The cupy.RawKernel ``name`` of this cubin (cached); while a call is recorded, its
        `cuda_launch.RecordingKernel`."""
        fn = self._functions.get(name)
        if fn is None:
            fn = self._functions[name] = self._raw.get_function(name)
        if self._recorder is not None:
            rec = self._recording_kernels.get(name)
            if rec is None:
                rec = self._recording_kernels[name] = cuda_launch.RecordingKernel(
                    fn, name, self._record_launch)
            return rec
        return fn

    # -- arrays ------------------------------------------------------------------------------
    def to_device(self, host_array):
        """Host NumPy array -> CuPy array (bf16 as its uint16 bits)."""
        a = np.ascontiguousarray(host_array)
        if a.dtype.name == "bfloat16":
            a = a.view(np.uint16)
        return self.xp.asarray(a)

    def check_aligned(self, info) -> None:
        """ValueError when the array's data is not aligned as the kernels read it."""
        align = self._alignment(info)
        if info.ptr % align:
            raise ValueError(f"a {info.dtype} device array of shape {tuple(info.shape)} starts at "
                             f"{info.ptr:#x}, not {align}-byte aligned (a sliced view?): the cuda "
                             f"kernels use {align}-byte loads; pass a fresh contiguous array")

    def native(self, info):
        """CuPy arrays as they are; torch tensors and __cuda_array_interface__ objects as
        zero-copy CuPy views of their memory (bf16 as uint16); the source object stays alive
        as the memory's owner."""
        self.check_aligned(info)
        if info.kind == "cupy":
            return info.obj
        if info.kind not in ("torch", "cuda_array_interface"):
            raise TypeError(f"the cuda backend needs device arrays, got a {info.kind} array")
        cp = self.xp
        dtype = np.dtype(np.uint16) if info.dtype == "bfloat16" else np.dtype(info.dtype)
        n = int(np.prod(info.shape)) if info.shape else 1
        if n == 0:
            return cp.empty(info.shape, dtype)       # no memory to view (and no allocation)
        mem = cp.cuda.UnownedMemory(info.ptr, n * dtype.itemsize, info.obj, self.device.id)
        return cp.ndarray(info.shape, dtype, cp.cuda.MemoryPointer(mem, 0))

    def _alignment(self, info) -> int:
        """Byte alignment the kernels need of an array's data: activations are read in vectors
        (and by cp.async in the tensor-core GEMMs), everything else element by element.  An
        activation is an [..., H] array of the spec dtype or its storage alias (bf16 bits as
        uint16 in CuPy)."""
        if (info.dtype not in self._storage_names or not info.shape
                or info.shape[-1] != self.spec.hidden_dim):
            return 4
        return self._activation_align

    def empty_like(self, info):
        """An uninitialised array of the user's kind: torch in -> torch out, else CuPy."""
        return self.new_output(info)[0]

    def new_output(self, info):
        """(an uninitialised contiguous array like x, of the user's kind: torch in -> torch
        out, else CuPy; its data pointer)."""
        if info.kind == "torch":
            import torch  # optional heavy package: only torch inputs get torch outputs
            out = torch.empty_like(info.obj, memory_format=torch.contiguous_format)
            return out, out.data_ptr()
        out = self.xp.empty(info.shape, storage_dtype(self.spec))
        return out, out.data.ptr

    def count_out_of_range(self, ids, num_experts: int) -> int:
        """Ids outside [0, num_experts) (synchronises: the count is read back)."""
        if num_experts != self.spec.num_experts:
            raise ValueError(f"num_experts must be {self.spec.num_experts} (the spec's), got {num_experts}")
        n = int(ids.size)
        if n == 0:
            return 0
        bad = self._bad_counter()
        with self._stream_of(ids):
            stream = self.xp.cuda.get_current_stream()
            self.xp.cuda.runtime.memsetAsync(bad.data.ptr, 0, 4, stream.ptr)
            threads = self.plan.count_threads
            blocks = max(1, min(-(-n // threads), 4 * self.plan.sms))
            self.function("moe_count_bad_ids")((blocks,), (threads,), (ids, np.int32(n), bad))
            return int(bad.get(stream=stream)[0])

    def _bad_counter(self):
        c = getattr(self, "_bad", None)
        if c is None:
            c = self._bad = self.xp.zeros(1, self.xp.int32)
        return c

    # -- workspaces ----------------------------------------------------------------------------
    def workspace(self, tokens: int):
        """The `WorkspaceView` for ``tokens`` tokens (allocated on the first call of its bucket
        and capacity, reused after)."""
        cfg = cuda_tiles.bucket_for(self.buckets, tokens)
        cap = capacity_for(cfg, tokens)
        key = (cfg.name, cap)
        ws = self._workspaces.get(key)
        if ws is None:
            ws = self._workspaces[key] = Workspace(self.spec, self.plan, cfg, cap)
            log.debug("%s: workspace %s x %d tokens, %.1f MB", self.spec.name, cfg.name, cap,
                      ws.nbytes / 1e6)
        return ws.view(tokens)

    # -- streams -------------------------------------------------------------------------------
    def _stream_of(self, a):
        """Context making the stream a's owner computes on current: torch's current stream for
        torch-owned memory, else nothing (CuPy's current stream)."""
        owner = getattr(getattr(getattr(a, "data", None), "mem", None), "_owner", None)
        if owner is None or not type(owner).__module__.startswith("torch"):
            return contextlib.nullcontext()
        import torch
        ts = torch.cuda.current_stream(owner.device)
        if ts.cuda_stream == self.xp.cuda.get_current_stream().ptr:
            return contextlib.nullcontext()
        # One CuPy wrapper per torch stream, made once: wrapping costs more than a launch.
        cached = self._external_streams.get(ts.cuda_stream)
        if cached is None:
            try:
                cached = self.xp.cuda.Stream.from_external(ts)      # CuPy >= 14: stream protocol
            except Exception:  # noqa: BLE001 - older CuPy or torch without __cuda_stream__
                cached = self.xp.cuda.ExternalStream(ts.cuda_stream, owner.device.index or 0)
            self._external_streams[ts.cuda_stream] = cached
        return cached

    # -- the launch path -----------------------------------------------------------------------
    def enqueue(self, stages, ws, ptrs, want_stats: bool = False, torch_stream: bool = False) -> None:
        """Enqueue ``stages`` for a call of ``ws.tokens`` tokens on torch's current stream of
        the module's device (``torch_stream``, for torch inputs) or CuPy's current stream.
        ``ptrs``: the data pointers of the call's arrays in `cuda_launch.SLOTS` order (None: not
        given), already validated.  The launches are recorded once per call shape and
        replayed; no sync, no allocation."""
        stream = (self._torch_stream_ptr() if torch_stream else self._cupy_stream().ptr)
        key = (stages, ws, want_stats, ptrs[3] is None, ptrs[4] is None, ptrs[5] is None,
               ptrs[6] is None, ptrs[2] if ws.weight_maps else 0)
        if self._get_device() == self._device_id:
            self._replay(key, stages, ws, ptrs, want_stats, stream)
        else:
            with self.device:
                self._replay(key, stages, ws, ptrs, want_stats, stream)

    def _replay(self, key, stages, ws, ptrs, want_stats, stream) -> None:
        with self._lock:
            prog = self._programs.get(key)
            if prog is None:
                prog = self._record(stages, ws, ptrs, want_stats)
                if len(self._programs) >= PROGRAMS_KEPT:
                    self._programs.popitem(last=False)
                self._programs[key] = prog
            else:
                self._programs.move_to_end(key)
            prog.run(stream, ptrs)

    def _record(self, stages, ws, ptrs, want_stats):
        """The `cuda_launch.Program` of the stages for this call shape: the stage code run with
        the user's pointers as named `cuda_launch.Slot` values, its launches recorded."""
        x, out, buf, router, bias, ids, wts = (
            None if p is None else cuda_launch.Slot(p, name) for p, name in zip(ptrs, cuda_launch.SLOTS))
        call = Call(x=x, packed=_Packed(buf, router), out=out, tokens=ws.tokens, router_bias=bias,
                    topk_ids=ids, topk_weights=wts, want_stats=want_stats,
                    x_ptr=int(x or 0), out_ptr=int(out or 0))
        steps = self._recorder = []
        try:
            for stage in stages:
                self._stage(stage, ws, call)
        finally:
            self._recorder = None
        return cuda_launch.Program(steps, self._kinds_of, *self._launchers)

    def _record_launch(self, name, raw, grid, block, args, smem) -> None:
        self._recorder.append(cuda_launch.Launch(name, raw.kernel.ptr, grid, block, smem, args))

    def _kinds_of(self, name: str) -> tuple:
        kinds = self._kinds.get(name)
        if kinds is None:
            raise ValueError(f"kernel {name} has no extern \"C\" __global__ signature in the "
                             f"rendered source of {self.spec.name}")
        return kinds

    def _torch_stream_ptr(self) -> int:
        get = self._torch_stream
        if get is None:
            get = self._torch_stream = _torch_stream_getter()
        return get(self._device_id)

    # -- stages --------------------------------------------------------------------------------
    def run_stage(self, stage: str, ws, call) -> None:
        """Enqueue one stage on the current stream (see the module docstring)."""
        # The stream is looked up once per call (the stages of one call share it).
        ctx = call.__dict__.get("_stream")
        if ctx is None:
            ctx = call.__dict__["_stream"] = self._stream_of(call.x)
        with ctx:
            self._stage(stage, ws, call)

    def _stage(self, stage: str, ws, call) -> None:
        if stage == "route":
            self._route(ws, call)
        elif stage == "group":
            self._group(ws, call)
        elif stage == "ffn1":
            launch_ffn1(self, ws, call)
        elif stage == "ffn2":
            if ws.cap_weights is not None:
                # capacity + renormalize: ffn2 weighs the kept slots by the rescaled weights
                call = dataclasses.replace(call, topk_weights=ws.cap_weights)
            launch_ffn2(self, ws, call)
        elif stage == "combine":
            self._combine(ws, call)
        else:
            raise ValueError(f"stage must be one of {list(self.stages)}, got {stage!r}")

    def _memset(self, arr) -> None:
        if self._recorder is not None:
            self._recorder.append(cuda_launch.Memset(arr.data.ptr, arr.nbytes))
            return
        rt = self.xp.cuda.runtime
        rt.memsetAsync(arr.data.ptr, 0, arr.nbytes, self.xp.cuda.get_current_stream().ptr)

    def _route(self, ws, call) -> None:
        T, p = call.tokens, ws.shapes
        if call.want_stats:
            self._memset(ws.router_sums)
        if T == 0:
            return
        router = call.packed.router
        fn = self.function(p.route_kernel)
        if p.route_kernel == "moe_route_logits_gemv":
            fn(p.route_grid, (p.route_block,), (call.x, router, ws.logits, np.int32(T)))
        else:
            fn(p.route_grid, (p.route_block,),
               (call.x, router, ws.logits, np.int32(T), np.int32(p.route_k_chunk)),
               shared_mem=p.route_smem)
        select = (ws.logits, np.int32(p.route_splits), _arg(call.router_bias), ws.topk_ids,
                  ws.topk_weights, ws.router_sums, np.int32(T), np.int32(1 if call.want_stats else 0))
        if p.fused_route_group:
            # few tokens: select + the whole group stage in one block (see run_stage("group"))
            self.function("moe_route_select_group")(
                (1,), (32 * self.plan.group.fused_warps,),
                select + (np.int32(ws.bucket.bm), ws.counts, ws.offsets, ws.sorted_rows,
                          ws.tile_expert, ws.tile_row0, ws.num_tiles))
            return
        self.function("moe_route_select")((p.select_blocks,), (self.plan.route.warps * 32,), select)

    def _group(self, ws, call) -> None:
        T, p = call.tokens, ws.shapes
        if T == 0:
            for a in (ws.counts, ws.offsets, ws.num_tiles):
                self._memset(a)
            if ws.dropped is not None:
                self._memset(ws.dropped)
            return
        ids = call.topk_ids if call.topk_ids is not None else ws.topk_ids
        if not (p.fused_route_group and call.topk_ids is None):   # else the route stage's
            self._group_pass(ws, ids, T, None)                    # fused kernel did it
        if ws.kept is not None:
            self._capacity(ws, call, ids)

    def _group_pass(self, ws, ids, T: int, kept) -> None:
        """One group pass over every slot, or (``kept`` given) over the kept slots only."""
        p, g, bm = ws.shapes, self.plan.group, ws.bucket.bm
        outs = (ws.counts, ws.offsets, ws.sorted_rows, ws.tile_expert, ws.tile_row0, ws.num_tiles)
        masked = () if kept is None else (kept,)
        suffix = "" if kept is None else "_masked"
        if p.group_single:
            self.function("moe_group_single" + suffix)((1,), (32 * g.warps,),
                                                       (ids, *masked, np.int32(T), np.int32(bm), *outs))
            return
        blocks = -(-p.group_units // g.block_units)
        threads = g.block_units * 32
        self.function("moe_group_count" + suffix)((blocks,), (threads,),
                                                  (ids, *masked, np.int32(T), ws.group_hist))
        self.function("moe_group_scan")((1,), (g.scan_threads,),
                                        (np.int32(T), np.int32(bm), ws.group_hist, ws.pad_off, *outs))
        self.function("moe_group_scatter" + suffix)((blocks,), (threads,),
                                                    (ids, *masked, np.int32(T), ws.group_hist,
                                                     ws.pad_off, ws.sorted_rows))

    def _capacity(self, ws, call, ids) -> None:
        """Capacity (templates/cuda/capacity.cu.jinja): after the first group pass, mark the
        kept slots and count the dropped ones, rescale the kept weights (renormalize), then
        group again over the kept slots only.  Capacity is an argument: no host sync."""
        spec, T = self.spec, call.tokens
        threads = self.plan.capacity_threads
        cap = min(expert_capacity(spec, T), T * spec.top_k)     # beyond T·k nothing drops
        weights = call.topk_weights if call.topk_weights is not None else ws.topk_weights
        self.function("moe_capacity_select")(
            (spec.num_experts,), (threads,),
            (ws.counts, ws.sorted_rows, weights, np.int32(ws.bucket.bm), np.int32(cap),
             ws.kept, ws.dropped))
        if ws.cap_weights is not None:
            self.function("moe_capacity_renorm")((-(-T // threads),), (threads,),
                                                 (weights, ws.kept, np.int32(T), ws.cap_weights))
        self._group_pass(ws, ids, T, ws.kept)

    def _combine(self, ws, call) -> None:
        T = call.tokens
        if T == 0:
            return
        args = (ws.y_slot, call.out, np.int32(T), np.int32(ws.bucket.ffn2_splits))
        if ws.kept is not None:
            args += (ws.kept,)                # capacity: dropped slots are skipped
        if self.spec.shared_expert_gate:
            args += (call.x, call.packed.buffer)  # the gate sigmoid(x·g), g in the packed weights
        self.function("moe_combine")((ws.shapes.combine_blocks,), (self.plan.combine_threads,), args)
