"""The layer's backward pass on the cuda backend: templates/cuda/backward.cu.jinja, driven here.

    bwd = CudaBackward(spec)                       # the backward cubin, from the kernel cache
    g = bwd.backward(kernel, x, params, dy, router_bias, daux, balance_coeff=..., z_coeff=...)
    g["x"], g["w1"], g["router"], ...              # spec-dtype torch tensors, logical orientation

``kernel`` is the layer's forward `MoEKernel` (cuda): its own route and group stages rebuild the
forward's routing (bitwise the same top-k, capacity and grouped layout), and the backward
kernels read that grouped layout (sorted_rows, tile_expert, tile_row0, num_tiles) from its
workspace.  ``params`` are the logical weights as torch CUDA tensors in the spec dtype (router
[E, H], w1/w3 [E+S, F, H], w2 [E+S, H, F], biases); ``daux`` is the aux loss's gradient as a
device scalar (never read back on the host).  The loss differentiated is
`moegen.reference_backward`'s, exactly as the c backward (`moegen.backward`) computes it.
The gate/up pre-activations are always recomputed (``save_activations`` is not built on CUDA).

Gradients come out in the parameter dtype (bf16, fp16 or fp32): each is accumulated in fp32
and rounded once, to nearest even, where its last kernel stores it (dx from its fp32 expert
and router parts), so the bits are those of the fp32 gradient converted afterwards, without
an fp32 gradient buffer or a conversion pass.  The router bias's gradient (E values) is fp32.
``CudaBackward(spec, fp32_grads=True)`` keeps fp32 outputs instead (the tests compare the two
bitwise).

Deterministic: no atomics; every output element is summed by one thread in a fixed order.
The GEMMs are one tile routine over operand accessors: on tensor cores (mma.sync, bf16 on
sm_80+; fp32 intermediates are rounded to bf16 as they are staged) or SIMT (fp32 and fp16), fp32
accumulation, any shape.  The five big GEMMs (gate/up recompute, dh, dx, dW13, dW2) take a
pipelined tensor-core tile instead (cp.async ring in dynamic shared memory, ldmatrix / ldmatrix
.trans) where H and F are multiples of 8 (every row a whole number of 16-byte chunks).  Launches
go to torch's current stream and nothing synchronises.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .. import jit
from ..backward import check_trainable
from ..backward_build import ENTRY_SUFFIX, backward_builder, backward_key_parts
from ..cache import default_cache, digest
from ..errors import BackendUnavailable
from ..plan import KernelPlan
from ..reference import pack_kwargs
from ..render import render_template
from ..spec import MoESpec
from .base import Artifact, Sources
from .cuda import CudaBackend, _load_raw_module

TEMPLATE = "cuda/backward.cu.jinja"
SOURCE_NAME = "backward.cu"

# The GEMM tiles (M, N, K, threads): bwd_gemm_tile (SIMT; its thread map is written for exactly
# these) and bwd_mma_tile (tensor cores: 8 warps of 64 x 32 over the forward's 64-wide k tile).
SIMT_TILE = (64, 64, 16, 256)
MMA_TILE = (128, 128, 64, 256)
# bwd_pipe_tile (the big GEMMs on tensor cores when rows are whole 16-byte chunks): the same
# 128 x 128 outputs and 8 warps as MMA_TILE, PIPE_BK k per stage, PIPE_STAGES stages of
# cp.async copies in flight (dynamic shared memory: PIPE_STAGES · 2 operands · 128 · PIPE_BK · 2 B).
PIPE_BK = 64
PIPE_STAGES = 3
# bwd_pipe_tile's warps (along M, along N): 2 x 4 warps of 64 x 32 outputs; (2, 2) is 4 warps of
# 64 x 64 (half the ldmatrix traffic per mma, twice the accumulators a thread).
PIPE_WARPS = (2, 4)
# Elements of a 16-byte chunk (16-bit types): H and F must be multiples of it for the pipeline.
CHUNK_ELEMS = 8
# The GEMM kernels that take bwd_pipe_tile when the plan is pipelined.
PIPE_KERNELS = ("bwd_gateup", "bwd_dhidden", "bwd_dx_rows", "bwd_dw13", "bwd_dw2")
# The first arch with bf16 mma.sync.
MMA_MIN_ARCH = 80
# Threads of one padded row in bwd_rows (a power of two: its reduction is a halving tree).
ROW_THREADS = 128
# Threads per block of the one-thread-per-item kernels.
ITEM_THREADS = 256
ROUTE_THREADS = 128

KERNELS = ("bwd_segments", "bwd_gateup", "bwd_dhidden", "bwd_rows", "bwd_dx_rows", "bwd_logits",
           "bwd_usage", "bwd_route", "bwd_dx_router", "bwd_combine", "bwd_dw13", "bwd_dw2",
           "bwd_drouter", "bwd_db13", "bwd_db2", "bwd_dbias", "train_aux_loss")


@dataclass(frozen=True)
class CudaBackwardPlan:
    """The backward build of one cuda spec: the forward's plan (spec, target) and the
    backward's own constants."""
    forward: KernelPlan
    tensor_cores: bool
    bm: int
    bn: int
    bk: int
    threads: int
    row_threads: int = ROW_THREADS
    pipelined: bool = False
    pipe_bk: int = PIPE_BK
    pipe_stages: int = PIPE_STAGES
    pipe_warps: tuple = PIPE_WARPS
    fp32_grads: bool = False

    @property
    def grad_dtype(self) -> str:
        """The dtype of the gradients `CudaBackward.backward` returns (the router bias's
        is float32 always): the spec dtype, or float32 with ``fp32_grads``."""
        return "float32" if self.fp32_grads else self.spec.dtype

    @property
    def pipe_threads(self) -> int:
        """Threads of a PIPE_KERNELS block (the plan's ``threads`` when not pipelined)."""
        return 32 * self.pipe_warps[0] * self.pipe_warps[1] if self.pipelined else self.threads

    @property
    def pipe_smem(self) -> int:
        """Dynamic shared memory of a PIPE_KERNELS launch in bytes (0 when not pipelined)."""
        return self.pipe_stages * 2 * self.bm * self.pipe_bk * 2 if self.pipelined else 0

    @property
    def spec(self) -> MoESpec:
        return self.forward.spec

    def own(self) -> dict:
        """The backward's constants (the forward plan left out), for the key."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "forward"}


def gate_cols(spec: MoESpec) -> int:
    """Rows of W13 per expert: gate then up (gated), else F."""
    return spec.ffn_dim * (2 if spec.gated else 1)


def backward_plan(spec: MoESpec) -> CudaBackwardPlan:
    """The backward plan of a cuda ``spec`` (its arch, else the current device's)."""
    if spec.backend != "cuda":
        raise ValueError(f"the CUDA backward needs spec.backend 'cuda', got {spec.backend!r}")
    check_trainable(spec)
    if spec.save_activations:
        raise ValueError("save_activations=True is not built on the cuda backend yet (the CUDA "
                         "backward recomputes the gate/up pre-activations); use the default False")
    fwd = jit.plan_for(spec)
    tc = uses_tensor_cores(fwd.spec, fwd.target)
    bm, bn, bk, threads = MMA_TILE if tc else SIMT_TILE
    pipelined = tc and fwd.spec.hidden_dim % CHUNK_ELEMS == 0 and fwd.spec.ffn_dim % CHUNK_ELEMS == 0
    return CudaBackwardPlan(fwd, tc, bm, bn, bk, threads, pipelined=pipelined,
                            pipe_warps=tuple(PIPE_WARPS))


def uses_tensor_cores(spec: MoESpec, target: str) -> bool:
    """bf16 layers on sm_80 and later take the tensor-core GEMM tile.  fp16 stays on SIMT: the
    tile rounds its fp32 intermediate gradients (dgu, h, dlogits) to the operand type, and
    fp16 would flush small gradients to zero without loss scaling; fp32 has no mma.sync."""
    return spec.dtype == "bfloat16" and int(target[3:].rstrip("a")) >= MMA_MIN_ARCH


def render_backward(plan: CudaBackwardPlan) -> Sources:
    """The backward source of ``plan`` (pure: reads templates, writes nothing)."""
    s = plan.spec
    dt = s.dt
    text = render_template(TEMPLATE, s=s, b=plan, gate_cols=gate_cols(s), spec_name=s.name,
                           dtype=dt.name, t_store=dt.cuda_raw, ld_fn=dt.cuda_load,
                           st_fn=dt.cuda_store, ffn={"mma_type": dt.cuda_mma})
    return Sources(backend="cuda", files={SOURCE_NAME: text}, entry=SOURCE_NAME)


def key_parts(plan: CudaBackwardPlan, sources: Sources, toolchain: dict | None) -> dict:
    """Every input that changes the backward cubin (pure)."""
    return backward_key_parts(CudaBackend(), plan, sources, toolchain)


def compile_backward(plan: CudaBackwardPlan) -> Artifact:
    """NVRTC -> the backward cubin of ``plan`` (no GPU needed).  Raises CompileError."""
    be = CudaBackend()
    sources = render_backward(plan)
    return be.compile(sources, plan.spec, plan.forward.target, "")


def load_backward_cubin(plan: CudaBackwardPlan) -> bytes:
    """The backward cubin of ``plan``: found in the kernel cache, else compiled and stored."""
    be = CudaBackend()
    sources = render_backward(plan)
    toolchain = jit.toolchain_identity(be)
    if toolchain is None:
        raise BackendUnavailable(f"no NVRTC to build the CUDA backward of {plan.spec.name}")
    parts = key_parts(plan, sources, toolchain)
    key = digest(parts)
    artifact, _ = default_cache().get_or_build(
        plan.spec.name + ENTRY_SUFFIX, key, backward_builder(be, plan, sources, parts, key),
        hint=f"moegen.backends.cuda_backward.CudaBackward({plan.spec.name})")
    return artifact.binary


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Byte alignment of every tensor the backward kernels read as vectors.
VECTOR_ALIGN = 16


def _aligned(t):
    """``t``, or a fresh copy of it when its data is not `VECTOR_ALIGN`-aligned."""
    return t if t is None or t.data_ptr() % VECTOR_ALIGN == 0 else t.clone()


def _ptr(a):
    """A kernel argument: a torch tensor or CuPy array as its device address, None as null."""
    if a is None:
        return np.uint64(0)
    if hasattr(a, "data_ptr"):
        return np.uint64(a.data_ptr())
    return np.uint64(a.data.ptr)


class CudaBackward:
    """The backward kernels of one cuda spec (see the module docstring)."""

    def __init__(self, spec: MoESpec, *, fp32_grads: bool = False):
        if not isinstance(spec, MoESpec):
            raise TypeError(f"spec must be a MoESpec, got {type(spec).__name__}")
        self.plan = dataclasses.replace(backward_plan(spec), fp32_grads=bool(fp32_grads))
        self.spec = self.plan.spec
        self._raw = _load_raw_module(load_backward_cubin(self.plan))
        self._fn = {name: self._raw.get_function(name) for name in KERNELS}
        smem = self.plan.pipe_smem
        if smem > 48 * 1024:
            # above 48 KB a kernel opts in to dynamic shared memory, once per function
            for name in PIPE_KERNELS:
                self._fn[name].max_dynamic_shared_size_bytes = smem

    def _launch(self, name: str, grid: tuple, block: int, args: tuple, shared_mem: int = 0) -> None:
        self._fn[name](grid, (block,), args, shared_mem=shared_mem)

    def _stream(self, device):
        """Context making torch's current stream of ``device`` CuPy's current one."""
        import cupy  # optional heavy package: only a GPU run launches
        import torch  # the training op's tensors
        return cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream,
                                        device.index or 0)

    def forward(self, kernel, x, packed, router_bias, *, balance_coeff: float = 0.0,
                z_coeff: float = 0.0, adaptive: bool = True):
        """The layer's forward pass for training: (y, aux) with aux the aux loss of
        `moegen.reference_backward` as a float32 device tensor of shape [1], computed on the
        device from the forward's statistics (nothing is read back, nothing synchronises).
        ``x`` [T >= 1, H] a CUDA tensor of the spec dtype; ``packed`` ``kernel.pack``'s."""
        import torch  # the training op's tensors
        y, ws = kernel.launch(kernel.stages, x, packed, None, router_bias, want_stats=True)
        aux = torch.empty(1, dtype=torch.float32, device=x.device)
        with self._stream(x.device):
            self._launch("train_aux_loss", (1,), 1,
                         (ws.counts, ws.router_sums, np.int32(x.shape[0]), np.float32(balance_coeff),
                          np.float32(z_coeff), np.int32(1 if adaptive else 0), _ptr(aux)))
        return y, aux

    def backward(self, kernel, x, params: dict, dy, router_bias, daux, *,
                 balance_coeff: float = 0.0, z_coeff: float = 0.0, adaptive: bool = True,
                 packed=None, out: dict | None = None) -> dict:
        """Gradients of ``<dy, y> + daux · aux`` as torch tensors: x, router, w1, w3, w2, b1,
        b3, b2 (None where absent) in ``plan.grad_dtype`` (the spec dtype), router_bias float32
        (None for sigmoid_topk or no bias), topk_weights [T, k] float32 (0 for dropped slots)
        and balance_coeff (a float32 device scalar).
        ``x``, ``dy`` [T, H] and ``params`` (name -> tensor) are CUDA tensors of the spec
        dtype, contiguous; ``router_bias`` float32 [E] or None; ``daux`` a float32 device
        tensor of one element.  ``packed``: ``kernel.pack`` of the same params (the forward
        pass's), else they are packed here.  ``out``: tensors to write the gradients into, by
        gradient name (x, router, router_bias, w1, w3, w2, b1, b3, b2), contiguous, of the
        dtypes above, starting on a `VECTOR_ALIGN`-byte boundary; every element of each is
        written.  Missing ones are allocated."""
        import torch  # the training op's tensors
        spec = self.spec
        E, S, K, H, F = (spec.num_experts, spec.num_shared_experts, spec.top_k, spec.hidden_dim,
                         spec.ffn_dim)
        n, T = E + S, x.shape[0]
        has_bias_grad = router_bias is not None and spec.routing != "sigmoid_topk"
        shapes = {"x": (T, H), "router": (E, H), "router_bias": (E,) if has_bias_grad else None,
                  "w1": (n, F, H), "w3": (n, F, H) if spec.gated else None, "w2": (n, H, F),
                  "b1": (n, F) if spec.bias else None,
                  "b3": (n, F) if spec.bias and spec.gated else None,
                  "b2": (n, H) if spec.bias else None}
        o = dict(out or {})
        gdt = getattr(torch, self.plan.grad_dtype)
        for name, shape in shapes.items():
            a = o.get(name)
            want = torch.float32 if name == "router_bias" else gdt
            if shape is None:
                o[name] = None
            elif a is None:
                o[name] = (torch.empty if T else torch.zeros)(shape, dtype=want, device=x.device)
            elif tuple(a.shape) != shape or a.dtype != want or not a.is_contiguous():
                raise ValueError(f"out[{name!r}] must be a contiguous {want} tensor of shape "
                                 f"{shape}, got {a.dtype} of shape {tuple(a.shape)}")
            elif a.data_ptr() % VECTOR_ALIGN:
                # the pipelined tile stores two adjacent outputs at once
                raise ValueError(f"out[{name!r}] must start on a {VECTOR_ALIGN}-byte boundary, got "
                                 f"an address {a.data_ptr() % VECTOR_ALIGN} bytes past one")
            elif not T:
                a.zero_()
        # the tensor-core tile reads 16-byte vectors of x, dy and the weights: a tensor that
        # starts off a 16-byte boundary (an offset view) is copied first
        x, dy = _aligned(x), _aligned(dy)
        params = {k: _aligned(v) for k, v in params.items()}
        o["topk_weights"] = torch.zeros((T, K), dtype=torch.float32, device=x.device)
        factors = torch.zeros(3, dtype=torch.float32, device=x.device)
        if T:
            if packed is None:
                packed = kernel.pack(**pack_kwargs(spec, params))
            self._run(kernel, packed, x, dy, params, router_bias, daux, balance_coeff, z_coeff,
                      adaptive, o, factors)
        o["balance_coeff"] = factors[2]
        return o

    def _run(self, kernel, packed, x, dy, params, router_bias, daux, balance_coeff, z_coeff,
             adaptive, o, factors) -> None:
        import torch  # the training op's tensors
        spec = self.spec
        E, S, K, H, F = (spec.num_experts, spec.num_shared_experts, spec.top_k, spec.hidden_dim,
                         spec.ffn_dim)
        G, n, T = gate_cols(spec), E + S, x.shape[0]
        dev = x.device
        f32 = dict(dtype=torch.float32, device=dev)
        i32 = dict(dtype=torch.int32, device=dev)
        w1, w3, w2, router = params["w1"], params.get("w3"), params["w2"], params["router"]
        b1, b3, b2 = params.get("b1"), params.get("b3"), params.get("b2")
        stages = tuple(st for st in kernel.stages if st.startswith("route") or st == "group")
        _, ws = kernel.launch(stages, x, packed, None, router_bias)
        bm, tiles = ws.bucket.bm, ws.max_tiles
        R = tiles * bm
        final_w = ws.cap_weights if ws.cap_weights is not None else ws.topk_weights
        grouped = (ws.tile_expert, ws.tile_row0, ws.num_tiles, np.int32(bm))
        BM, BN, TH = self.plan.bm, self.plan.bn, self.plan.threads
        SM, PT = self.plan.pipe_smem, self.plan.pipe_threads    # the PIPE_KERNELS' launches
        nsub = _cdiv(bm, BM)
        gu, dhu = torch.empty((R, G), **f32), torch.empty((R, F), **f32)
        # h and dgu: bf16 on the tensor-core path (its GEMMs read them as bf16), else fp32
        inter = dict(dtype=torch.bfloat16 if self.plan.tensor_cores else torch.float32, device=dev)
        h, dgu = torch.empty((R, F), **inter), torch.empty((R, G), **inter)
        dxs = torch.empty((R, H), **f32)
        row_w, row_tok = torch.empty(R, **f32), torch.empty(R, **i32)
        pos = torch.full((T * (K + S),), -1, **i32)
        seg = torch.zeros((2, n), **i32)
        logits, dlogits = torch.empty((T, E), **f32), torch.empty((T, E), **f32)
        usage, dxr = torch.empty(E, **f32), torch.empty((T, H), **f32)
        daux32 = daux.to(**f32).reshape(1).contiguous()
        with self._stream(dev):
            L = self._launch
            P = _ptr
            L("bwd_segments", (_cdiv(tiles, ITEM_THREADS),), ITEM_THREADS,
              (*grouped, P(seg[0]), P(seg[1])))
            L("bwd_gateup", (tiles * nsub, _cdiv(G, BN)), PT,
              (P(x), P(w1), P(w3), P(b1), P(b3), ws.sorted_rows, *grouped, P(gu)), SM)
            L("bwd_dhidden", (tiles * nsub, _cdiv(F, BN)), PT,
              (P(dy), P(w2), ws.sorted_rows, *grouped, P(dhu)), SM)
            L("bwd_rows", (R,), ROW_THREADS,
              (P(gu), P(dhu), P(dy), P(b2), final_w, ws.sorted_rows, ws.tile_expert,
               ws.num_tiles, np.int32(bm), np.int32(R), P(h), P(dgu), P(o["topk_weights"]), P(row_w),
               P(row_tok), P(pos)))
            L("bwd_dx_rows", (tiles * nsub, _cdiv(H, BN)), PT,
              (P(dgu), P(w1), P(w3), *grouped, P(dxs)), SM)
            L("bwd_logits", (_cdiv(T, BM), _cdiv(E, BN)), TH,
              (P(x), P(router), P(router_bias), np.int32(T), P(logits)))
            L("bwd_usage", (1,), 1,
              (ws.counts, P(daux32), np.float32(balance_coeff), np.float32(z_coeff),
               np.int32(1 if adaptive else 0), np.int32(T), P(usage), P(factors)))
            L("bwd_route", (_cdiv(T, ROUTE_THREADS),), ROUTE_THREADS,
              (P(logits), ws.topk_ids, ws.topk_weights, P(ws.kept), P(o["topk_weights"]),
               P(usage), P(factors), np.int32(T), P(dlogits)))
            L("bwd_dx_router", (_cdiv(T, BM), _cdiv(H, BN)), TH,
              (P(dlogits), P(router), np.int32(T), P(dxr)))
            L("bwd_combine", (_cdiv(T * H, ITEM_THREADS),), ITEM_THREADS,
              (P(dxs), P(dxr), P(pos), np.int32(T), P(o["x"])))
            L("bwd_dw13", (_cdiv(H, BN), _cdiv(G, BM), n), PT,
              (P(dgu), P(x), P(row_tok), P(seg[0]), P(seg[1]), P(o["w1"]), P(o["w3"])), SM)
            L("bwd_dw2", (_cdiv(H, BM), _cdiv(F, BN), n), PT,
              (P(dy), P(row_tok), P(h), P(seg[0]), P(seg[1]), P(o["w2"])), SM)
            L("bwd_drouter", (_cdiv(E, BM), _cdiv(H, BN)), TH,
              (P(dlogits), P(x), np.int32(T), P(o["router"])))
            if spec.bias:
                L("bwd_db13", (_cdiv(G, ITEM_THREADS), n), ITEM_THREADS,
                  (P(dgu), P(seg[0]), P(seg[1]), P(o["b1"]), P(o["b3"])))
                L("bwd_db2", (_cdiv(H, ITEM_THREADS), n), ITEM_THREADS,
                  (P(dy), P(row_w), P(row_tok), P(seg[0]), P(seg[1]), P(o["b2"])))
            if o["router_bias"] is not None:
                L("bwd_dbias", (_cdiv(E, ITEM_THREADS),), ITEM_THREADS,
                  (P(dlogits), np.int32(T), P(o["router_bias"])))

