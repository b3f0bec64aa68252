"""`ExpertParallelMoE`: one MoE layer whose routed experts are spread over the ranks of a
``torch.distributed`` process group (gloo on CPUs with the c backend, NCCL on GPUs with cuda).

    route (full router, every rank, its own tokens)
    -> plan: count slots per destination rank, give each slot a send row (generated kernel)
    -> pack: gather the token rows into the send buffer by index (generated kernel)
    -> exchange: counts (all_to_all_single), then rows, expert ids and weights (with split sizes)
    -> experts: the rank's own experts, a kernel specialised to them, one slot per row
    -> return: the fp32 slot rows all-to-all back to the tokens' ranks
    -> combine: each token's slots in slot order, then its shared experts (generated kernel)

The combine adds exactly what the single-process layer adds, in its order, so on the c backend
the output equals the single-process layer over the ranks' tokens concatenated in rank order,
bit for bit, whatever the rank count (see `ExpertParallelMoE`).  The only host synchronisation is
reading the split sizes the all-to-all needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time

import numpy as np

from .. import arrays
from ..arrays import to_numpy
from ..backends.base import Call
from ..jit import compile as compile_kernel, resolve
from ..layout import PackedWeights
from ..stats import LayerStats
from .dispatch import dispatch_kernels
from .experts import ExpertStage, expert_spec
from .placement import Placement

# Expert weights indexed by routed expert (leading dim E for the whole layer, E/R for one rank's
# block), and by shared expert.
_ROUTED = ("w1", "w3", "w2", "w13", "b1", "b3", "b2", "b13")
_SHARED = ("shared_w1", "shared_w3", "shared_w2", "shared_b1", "shared_b3", "shared_b2")
# The stages `profile` times, in order.
STAGE_NAMES = ("route", "pack", "exchange", "experts", "return", "combine")


def _torch():
    import torch  # optional heavy dependency: only the distributed layer needs it
    return torch


def _ptr(a) -> int:
    """The data pointer of a torch tensor, NumPy array or CuPy array."""
    if hasattr(a, "data_ptr"):
        return int(a.data_ptr())
    if isinstance(a, np.ndarray):
        return int(a.ctypes.data)
    return int(a.data.ptr)


def _signature(value) -> list:
    """Shape and dtype of a weight argument (a list of per-expert arrays: its length and the
    first's), for the cross-rank check."""
    if isinstance(value, (list, tuple)):
        return ["list", len(value), *(_signature(value[0]) if value else [])]
    return [list(getattr(value, "shape", ())), str(getattr(value, "dtype", type(value).__name__))]


# Each chunk's received rows start at a multiple of this many rows, so the expert kernel's
# vector loads of them stay aligned whatever the row width.
_CHUNK_ALIGN_ROWS = 16


def _chunk_starts(recv: list) -> list[int]:
    """The first receive row of each chunk (``recv``: [chunks][R] row counts)."""
    starts, row = [], 0
    for counts in recv:
        starts.append(row)
        row += -(-sum(counts) // _CHUNK_ALIGN_ROWS) * _CHUNK_ALIGN_ROWS
    return starts


class _Buffers:
    """The layer's preallocated buffers on its device, for up to ``tokens`` tokens of this rank
    (send side: tokens·k rows) and ``recv_rows`` received rows; grown, never shrunk."""

    def __init__(self, layer, tokens: int, recv_rows: int):
        torch, spec, dev = _torch(), layer.spec, layer.device
        k, H, R, E, S = spec.top_k, spec.hidden_dim, layer.ranks, spec.num_experts, spec.num_shared_experts
        n = max(1, tokens * k)
        i32, f32 = torch.int32, torch.float32
        self.tokens, self.recv_rows = tokens, recv_rows
        self.send_counts = torch.zeros((layer.chunks, R), dtype=i32, device=dev)
        self.expert_counts = torch.zeros((layer.chunks, E), dtype=i32, device=dev)
        self.pos = torch.empty(n, dtype=i32, device=dev)
        self.src = torch.empty(n, dtype=i32, device=dev)
        self.send_eid = torch.empty(n, dtype=i32, device=dev)
        self.send_w = torch.empty(n, dtype=f32, device=dev)
        self.send_rows = torch.empty((n, H), dtype=layer.torch_dtype, device=dev)
        self.ret_rows = torch.empty((n, H), dtype=f32, device=dev)
        self.shared_rows = (torch.empty((max(1, tokens * S), H), dtype=f32, device=dev)
                            if S and layer.device.type == "cuda" else None)
        # the shared experts' routing: every token to shared experts 0..S-1 with weight 1
        self.shared_ids = torch.arange(S, dtype=i32, device=dev).repeat(max(1, tokens), 1)
        self.shared_w = torch.ones((max(1, tokens), S), dtype=f32, device=dev)
        self.grow_recv(layer, recv_rows)

    def grow_recv(self, layer, rows: int) -> None:
        torch, dev, H = _torch(), layer.device, layer.spec.hidden_dim
        rows = max(1, rows)
        self.recv_rows = rows
        self.recv_eid = torch.empty(rows, dtype=torch.int32, device=dev)
        self.recv_w = torch.empty(rows, dtype=torch.float32, device=dev)
        self.recv_x = torch.empty((rows, H), dtype=layer.torch_dtype, device=dev)
        # fp32 slot rows of the expert stage: the c kernel's own workspace serves one chunk
        self.recv_y = (torch.empty((rows, H), dtype=torch.float32, device=dev)
                       if dev.type == "cuda" or layer.chunks > 1 else None)


class ExpertParallelMoE:
    """One MoE layer over the ranks of a process group, each rank owning E/R routed experts.

    Args:
        spec: the layer's `MoESpec` (backend ``c`` for gloo/CPU, ``cuda`` for NCCL/GPU);
            capacity specs are refused (dropping needs every rank's counts).
        group: the ``torch.distributed`` process group (default: the world).
        router: [E, H] (or [H, E]; ``router_layout`` as in ``MoEKernel.pack``), the whole router.
        w1, w3, w2 (or w13), biases: either the whole layer's ([E, ...]) or just this rank's block
            ([E/R, ...]); shared_w1... [S, ...] when ``spec.num_shared_experts``.
        max_tokens: tokens per call the buffers are first sized for (they grow when exceeded).
        chunks: split each call's tokens into this many chunks, so one chunk's exchange overlaps
            another's expert GEMMs (every rank must pass the same number).

    Construction is collective: every rank checks that all ranks passed the same spec, chunk
    count, weight shapes/dtypes and router values, and raises one ValueError naming the first rank that
    differs.  ``placement`` says which experts live where.

    On the c backend the output equals the single-process layer (``moegen.compile(spec)``) over
    all ranks' tokens concatenated in rank order, bit for bit: each expert sees the same rows in
    the same order as there.  Its shared experts run on the rank's own tokens, which gives the
    same bits whenever the c kernel's rows are batch-invariant (hidden and ffn widths up to its
    k-chunk of 512, or an expert with few rows); with ``chunks`` > 1 the same holds for the
    routed experts.  On the cuda backend the GEMM tiles and split-K count depend on the token
    count, so equality there is to the backend's tolerance.
    """

    def __init__(self, spec, group=None, *, max_tokens: int = 256, chunks: int = 1,
                 router_layout: str | None = None, **weights):
        torch = _torch()
        import torch.distributed as dist  # optional heavy dependency (see _torch)
        self._dist = dist
        if not dist.is_initialized():
            raise ValueError("ExpertParallelMoE needs torch.distributed initialised "
                             "(dist.init_process_group(...)) before construction")
        self.group = group
        self.rank = dist.get_rank(group)
        self.ranks = dist.get_world_size(group)
        spec = resolve(spec)
        if spec.capacity_factor is not None:
            raise ValueError(f"spec.capacity_factor must be None for an expert-parallel layer "
                             f"(dropping needs the global counts), got {spec.capacity_factor}")
        if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
            raise ValueError(f"chunks must be an int >= 1, got {chunks!r}")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            raise ValueError(f"max_tokens must be an int >= 0, got {max_tokens!r}")
        self.spec, self.chunks = spec, chunks
        self.placement = Placement(spec.num_experts, self.ranks, spec.num_shared_experts)
        unknown = sorted(set(weights) - set(_ROUTED) - set(_SHARED) - {"router"})
        if unknown:
            raise TypeError(f"ExpertParallelMoE got unknown weight arguments {unknown}; known: "
                            f"router, {', '.join(_ROUTED + _SHARED)}")
        self._check_ranks_agree(weights, router_layout)
        if spec.backend == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
            import cupy  # optional heavy dependency: the cuda backend's launcher
            if cupy.cuda.Device().id != self.device.index:
                raise ValueError(f"CuPy's current device ({cupy.cuda.Device().id}) must be torch's "
                                 f"({self.device.index}): the kernels load on CuPy's; call "
                                 f"cupy.cuda.Device({self.device.index}).use()")
        else:
            self.device = torch.device("cpu")
        self.torch_dtype = getattr(torch, spec.dtype)

        # routing: the full layer's kernel, its route stage only, on a router-only packing
        self.route_kernel = compile_kernel(spec)
        self._router = self._pack_router(weights.get("router"), router_layout)
        # this rank's routed experts, one slot per received row
        local = self._local_weights(weights)
        epr = self.placement.experts_per_rank
        routed = compile_kernel(expert_spec(spec, epr, 1))
        self.routed = ExpertStage(routed, routed.pack(router=np.zeros((epr, spec.hidden_dim), np.float32),
                                                      **local))
        self.shared = None
        if spec.num_shared_experts:
            S = spec.num_shared_experts
            shared = compile_kernel(expert_spec(spec, S, S))
            sw = {k.removeprefix("shared_"): v for k, v in weights.items() if k in _SHARED}
            self.shared = ExpertStage(shared, shared.pack(router=np.zeros((S, spec.hidden_dim), np.float32),
                                                          **sw))
        self.kernels = dispatch_kernels(spec, self.ranks)
        self._buf = _Buffers(self, max_tokens, max_tokens * spec.top_k)
        self.timings: dict[str, float] = {}

    # -- construction helpers --------------------------------------------------------------------
    def _check_ranks_agree(self, weights: dict, router_layout) -> None:
        router = weights.get("router")
        router = None if router is None else np.ascontiguousarray(to_numpy(router, "router"))
        mine = {"spec": self.spec.to_dict(), "chunks": self.chunks, "router_layout": router_layout,
                "weights": {k: _signature(v) for k, v in sorted(weights.items())},
                # the router's values too (it is small): every rank must route alike
                "router values (sha256)": None if router is None else
                hashlib.sha256(router.view(np.uint8)).hexdigest()[:16]}
        digest = hashlib.sha256(json.dumps(mine, sort_keys=True).encode()).hexdigest()
        every = [None] * self.ranks
        self._dist.all_gather_object(every, (digest, mine), group=self.group)
        for r, (d, theirs) in enumerate(every):
            if d != every[0][0]:
                what = next(k for k in mine if theirs[k] != every[0][1][k])
                raise ValueError(f"ExpertParallelMoE: rank {r} differs from rank 0 in its {what}: "
                                 f"{theirs[what]} vs {every[0][1][what]}")

    def _local_weights(self, weights: dict) -> dict:
        """This rank's block of each routed weight (given whole or already sliced)."""
        E, epr = self.spec.num_experts, self.placement.experts_per_rank
        mine = self.placement.experts_of(self.rank)
        out = {}
        for name in _ROUTED:
            value = weights.get(name)
            if value is None:
                continue
            n = len(value) if isinstance(value, (list, tuple)) else getattr(value, "shape", (None,))[0]
            if n == E:
                value = value[mine.start:mine.stop]
            elif n != epr:
                raise ValueError(f"{name} must hold the whole layer's {E} experts or this rank's "
                                 f"{epr} (leading dimension), got {n}")
            out[name] = value
        return out

    def _pack_router(self, router, router_layout):
        spec, kernel = self.spec, self.route_kernel
        E, H = spec.num_experts, spec.hidden_dim
        r = to_numpy(router, "router")
        if r is None:
            raise ValueError(f"router weight is required: shape (E, H) = ({E}, {H})")
        if router_layout == "he" or (router_layout is None and r.shape == (H, E) and E != H):
            r = r.T
        if r.shape != (E, H):
            raise ValueError(f"router must have shape ({E}, {H}) (or ({H}, {E})), got {r.shape}")
        r = r.astype(spec.dt.numpy)
        if kernel.layout.router_order == "he":
            r = r.T
        mod = kernel.module
        # The route stage reads only the router; the one-element expert buffer is never read.
        return PackedWeights(mod.to_device(np.zeros(1, spec.dt.numpy)),
                             mod.to_device(np.ascontiguousarray(r)), kernel.layout)

    def __repr__(self) -> str:
        return (f"ExpertParallelMoE({self.spec.name}, rank {self.rank} of {self.ranks}, "
                f"backend={self.spec.backend}, chunks={self.chunks})\n{self.placement}")

    # -- forward ---------------------------------------------------------------------------------
    def _check_x(self, x):
        info = arrays.describe(x, "x")
        if info.kind != "torch":
            raise TypeError(f"x must be a torch tensor (the collectives exchange torch tensors), "
                            f"got {info.kind}")
        H = self.spec.hidden_dim
        if len(info.shape) < 1 or info.shape[-1] != H:
            raise ValueError(f"x must have shape [..., {H}] (hidden_dim), got {info.shape}")
        if info.dtype != self.spec.dtype:
            raise ValueError(f"x must have dtype {self.spec.dtype} (the spec's), got {info.dtype}")
        if not info.contiguous:
            raise ValueError("x must be contiguous; call .contiguous() first")
        if x.device != self.device:
            raise ValueError(f"x must be on {self.device} (this layer's device), got {x.device}")
        return x.reshape(-1, H)

    def _stream(self):
        """Torch's current CUDA stream as CuPy's current one (cuda), else nothing."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        import cupy  # optional heavy dependency: the cuda backend's launcher
        torch = _torch()
        return cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream, self.device.index)

    def _tick(self, profile: bool, stage: str, t0: float) -> float:
        if not profile:
            return t0
        if self.device.type == "cuda":
            _torch().cuda.synchronize()
        t = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + t - t0
        return t

    def __call__(self, x, *, router_bias=None, return_stats: bool = False, profile: bool = False):
        """The layer on this rank's tokens ``x`` [..., H] (a torch tensor of the spec dtype on the
        layer's device); collective: every rank of the group must call it.

        ``router_bias``: optional [E] float32 tensor added to the router logits.
        ``return_stats``: also return the global `LayerStats` (all ranks' tokens; one
        all-reduce).  ``profile``: add each stage's wall time to ``self.timings`` (waits for
        each stage; for measuring only).  Returns a new tensor like x, or ``(out, stats)``.
        """
        torch = _torch()
        xs = self._check_x(x)
        T, spec = xs.shape[0], self.spec
        k, H = spec.top_k, spec.hidden_dim
        binfo = None
        if router_bias is not None:
            binfo = arrays.describe(router_bias, "router_bias")
            arrays.check(binfo, "router_bias", shape=(spec.num_experts,), dtype="float32",
                         device_kind=self.route_kernel.module.device_kind)
        out = torch.empty_like(xs)
        if T > self._buf.tokens:     # more tokens than ever before: the one reallocation
            self._buf = _Buffers(self, T, max(T * k, self._buf.recv_rows))
        b = self._buf
        with self._stream():
            t0 = time.perf_counter()
            ws = self._route(xs, binfo, T, return_stats)
            t0 = self._tick(profile, "route", t0)
            bounds = [T * c // self.chunks for c in range(self.chunks + 1)]
            ids, wts = _ptr(ws.topk_ids), _ptr(ws.topk_weights)
            for c in range(self.chunks):
                t_lo, n = bounds[c], bounds[c + 1] - bounds[c]
                s = t_lo * k
                self.kernels.plan(ids + 4 * s, wts + 4 * s, n, _ptr(b.send_counts[c]),
                                  _ptr(b.expert_counts[c]), _ptr(b.pos[s:]), _ptr(b.src[s:]),
                                  _ptr(b.send_eid[s:]), _ptr(b.send_w[s:]))
            t0 = self._tick(profile, "pack", t0)
            send, recv = self._exchange_counts(b)          # [chunks][R] host lists
            t0 = self._tick(profile, "exchange", t0)
            total_recv = _chunk_starts(recv + [[0]])[-1]
            if total_recv > b.recv_rows:
                b.grow_recv(self, total_recv)
            starts, handles = _chunk_starts(recv), []
            for c in range(self.chunks):         # chunk c's rows travel while c+1 packs
                s = bounds[c] * k
                self.kernels.pack(_ptr(xs[bounds[c]:]), _ptr(b.src[s:]), sum(send[c]),
                                  _ptr(b.send_rows[s:]))
                t0 = self._tick(profile, "pack", t0)
                handles.append(self._dispatch(b, s, starts[c], send[c], recv[c], profile))
                t0 = self._tick(profile, "exchange", t0)
            shared_ptr = self._run_shared(xs, T) if self.shared else 0
            back = []
            for c in range(self.chunks):
                for h in handles[c]:
                    h.wait()
                y = self._run_routed(b, starts[c], sum(recv[c]))
                t0 = self._tick(profile, "experts", t0)
                back.append(self._return(b, y, bounds[c] * k, send[c], recv[c], profile))
                t0 = self._tick(profile, "return", t0)
            for h in back:
                h.wait()
            t0 = self._tick(profile, "return", t0)
            for c in range(self.chunks):
                s, n = bounds[c] * k, bounds[c + 1] - bounds[c]
                sp = shared_ptr + 4 * H * spec.num_shared_experts * bounds[c] if shared_ptr else 0
                self.kernels.combine(_ptr(b.ret_rows[s:]), _ptr(b.pos[s:]), sp, n,
                                     _ptr(out[bounds[c]:]))
            self._tick(profile, "combine", t0)
        out = out.reshape(x.shape)
        if return_stats:
            return out, self._global_stats(ws, T)
        return out

    # -- stages ----------------------------------------------------------------------------------
    def _route(self, xs, binfo, T: int, want_stats: bool):
        mod = self.route_kernel.module
        ws = mod.workspace(T)
        call = Call(x=mod.native(arrays.describe(xs, "x")), packed=self._router, out=None,
                    tokens=T, router_bias=mod.native(binfo) if binfo else None,
                    want_stats=want_stats)
        mod.run_stage("route", ws, call)
        return ws

    def _exchange_counts(self, b):
        """Every rank's row counts for every chunk: (send, recv), each [chunks][R] host ints.
        The one host synchronisation of a call: the all-to-all needs its split sizes."""
        torch = _torch()
        sendc = b.send_counts.t().contiguous()               # [R, chunks]: rank r's block
        recvc = torch.empty_like(sendc)
        self._dist.all_to_all_single(recvc, sendc, group=self.group)
        both = torch.stack([sendc, recvc]).tolist()
        send = [[both[0][r][c] for r in range(self.ranks)] for c in range(self.chunks)]
        recv = [[both[1][r][c] for r in range(self.ranks)] for c in range(self.chunks)]
        return send, recv

    def _a2a(self, out, inp, out_splits, in_splits, profile):
        work = self._dist.all_to_all_single(out, inp, output_split_sizes=out_splits,
                                            input_split_sizes=in_splits, group=self.group,
                                            async_op=True)
        if profile:
            work.wait()
        return work

    @staticmethod
    def _bytes(t):
        """A 2-D tensor as its raw bytes, [rows, row bytes] (gloo has no bfloat16)."""
        return t.view(_torch().uint8) if t.dim() == 2 else t.view(_torch().uint8).reshape(t.shape[0], -1)

    def _dispatch(self, b, s: int, r0: int, send: list, recv: list, profile: bool) -> list:
        ns, nr = sum(send), sum(recv)
        return [self._a2a(self._bytes(b.recv_x[r0:r0 + nr]), self._bytes(b.send_rows[s:s + ns]),
                          recv, send, profile),
                self._a2a(b.recv_eid[r0:r0 + nr], b.send_eid[s:s + ns], recv, send, profile),
                self._a2a(b.recv_w[r0:r0 + nr], b.send_w[s:s + ns], recv, send, profile)]

    def _run_routed(self, b, r0: int, n: int):
        """This rank's experts over received rows r0..r0+n: fp32 slot rows [n, H]."""
        torch = _torch()
        if n == 0:
            return b.ret_rows[:0]
        st = self.routed
        ws = st.run(b.recv_x[r0:r0 + n], b.recv_eid[r0:r0 + n].view(n, 1),
                    b.recv_w[r0:r0 + n].view(n, 1), n)
        if self.device.type == "cuda":
            y, splits = st.split_rows(ws)
            self.kernels.slot_rows(_ptr(y), splits, n, _ptr(b.recv_y[r0:]))
            return b.recv_y[r0:r0 + n]
        y = torch.from_numpy(st.slot_rows(ws, n))
        if self.chunks == 1:
            return y                    # sent before the next call reuses the workspace
        b.recv_y[r0:r0 + n].copy_(y)    # the next chunk's run reuses the workspace
        return b.recv_y[r0:r0 + n]

    def _return(self, b, y, s: int, send: list, recv: list, profile: bool):
        return self._a2a(b.ret_rows[s:s + sum(send)], y, send, recv, profile)

    def _run_shared(self, xs, T: int) -> int:
        """The shared experts on this rank's tokens; returns the pointer of their fp32 rows
        [T·S, H] (row t·S + j: token t, shared expert j)."""
        S, b = self.spec.num_shared_experts, self._buf
        if T == 0:
            return 0
        ws = self.shared.run(xs, b.shared_ids[:T], b.shared_w[:T], T * S)
        if self.device.type == "cuda":
            y, splits = self.shared.split_rows(ws)
            self.kernels.slot_rows(_ptr(y), splits, T * S, _ptr(self._buf.shared_rows))
            return _ptr(self._buf.shared_rows)
        return _ptr(self.shared.slot_rows(ws, T * S))

    def _global_stats(self, ws, T: int) -> LayerStats:
        """All ranks' statistics: per-expert slot counts and router sums all-reduced."""
        torch, E = _torch(), self.spec.num_experts
        counts = self._buf.expert_counts.sum(0, dtype=torch.float64)
        sums = torch.as_tensor(arrays.host(ws.router_sums), dtype=torch.float64).to(self.device)
        local = torch.cat([counts, sums, torch.tensor([float(T)], dtype=torch.float64,
                                                      device=self.device)])
        self._dist.all_reduce(local, group=self.group)
        h = local.cpu().numpy()
        return LayerStats(self.spec, int(h[-1]), h[:E].astype(np.int64), h[E:-1].astype(np.float32))
