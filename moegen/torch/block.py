"""`MoEBlock`: an ``nn.Module`` holding a compiled moegen kernel and its packed weights.

The packed buffer, the router and the optional router bias are module buffers (they follow
``.to()`` and ``state_dict``); ``forward`` is one call of the ``moegen::moe`` custom op, so the
block runs eagerly, under ``torch.compile(fullgraph=True)`` and inside CUDA graphs.

``MoEBlock(spec, weights, trainable=True)`` holds the logical weights as parameters instead and
runs the training op (`moegen.torch.autograd.moe_train`: the forward kernel, the generated
backward kernels), so ``loss.backward()`` reaches them; the auxiliary loss of the last call is
``block.aux_loss``.  Training runs on the CPU (c backend, float32) and on a GPU (cuda backend,
bfloat16, float16 or float32: the generated CUDA backward), the parameters on the kernel's device
in the spec's dtype.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .. import compile as compile_kernel
from ..backward import check_trainable
from ..layout import weight_shapes
from ..kernel import MoEKernel
from ..layout import logical_weights
from ..spec import MoESpec
from .autograd import CUDA_SAVE_ACTIVATIONS, moe_train, param_names
from .ops import kernel_handle, run_moe


def as_tensor(a, spec: MoESpec) -> torch.Tensor | None:
    """A packed array (NumPy, CuPy or torch) as a torch tensor sharing its memory; bf16 stored
    as bits (ml_dtypes or uint16) comes back as torch.bfloat16."""
    if a is None or isinstance(a, torch.Tensor):
        return a
    if type(a).__module__.startswith("cupy"):
        t = torch.from_dlpack(a)
    else:
        arr = np.asarray(a)
        t = torch.from_numpy(arr.view(np.uint16) if arr.dtype.name == "bfloat16" else arr)
    if spec.dtype == "bfloat16" and t.dtype == torch.uint16:      # bf16 bits (not a float32 router)
        t = t.view(torch.bfloat16)
    return t


def _to_device(v, device):
    if isinstance(v, torch.Tensor):
        return v.detach().to(device)
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor):
        return [t.detach().to(device) for t in v]
    return v


class _NoBackward(torch.autograd.Function):
    """Passes the block's output through; a backward through it is refused with one line
    (the moegen ops are non-differentiable, so without this x would silently get no gradient)."""

    @staticmethod
    def forward(ctx, x, y):
        return y

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("this moegen.torch.MoEBlock has no backward (it is for inference): "
                           "run it under torch.no_grad(), or train with MoEBlock(..., "
                           "trainable=True) or moegen.torch.autograd.moe_train")


class MoEBlock(nn.Module):
    """A MoE layer run by a moegen kernel: ``y = block(x)`` for x [..., H] of the spec dtype.

    ``MoEBlock(spec_or_kernel, weights=None, router_bias=None)``: ``weights`` is a dict of
    `MoEKernel.pack` keywords (NumPy, CuPy or torch arrays; CUDA tensors are packed on the
    GPU); without it the buffers are zero-filled, to be filled by ``load_state_dict``.
    ``router_bias`` [E] float32 is added to the router logits (softmax routings) or biases the
    selection only (sigmoid routing, DeepSeek-V3's ``e_score_correction_bias``).
    `from_config` builds one from a transformers config, `moegen.torch.from_hf` from a
    transformers block.

    ``trainable=True`` (c backend float32, or cuda backend bfloat16/float16/float32): the weights
    become parameters, in the spec's dtype on the kernel's device, in logical orientation
    (``router`` [E, H], ``w1``/``w3`` [E+S, F, H], ``w2`` [E+S, H, F], biases), ``forward`` runs
    the training op and sets ``aux_loss`` (``balance_coeff``, ``z_coeff``, ``adaptive``: the
    auxiliary loss, see `moegen.torch.autograd`).
    """

    def __init__(self, spec: MoESpec | MoEKernel, weights: dict | None = None, *, router_bias=None,
                 trainable: bool = False, balance_coeff: float = 0.01, z_coeff: float = 0.0,
                 adaptive: bool = True):
        super().__init__()
        if not isinstance(trainable, bool):
            raise TypeError(f"trainable must be True or False, got {trainable!r}")
        if trainable:
            s = spec.spec if isinstance(spec, MoEKernel) else spec
            on_cuda = (spec.backend if isinstance(spec, MoEKernel) else s.backend) == "cuda"
            if on_cuda and s.save_activations:
                raise ValueError(f"MoEBlock(trainable=True): {CUDA_SAVE_ACTIVATIONS}")
            if not on_cuda and s.dtype != "float32":
                raise ValueError(f"MoEBlock(trainable=True) on the c backend needs spec.dtype "
                                 f"'float32' (its training kernels; bfloat16 and float16 train "
                                 f"on the cuda backend), got {s.dtype!r}")
            check_trainable(s)
            if not isinstance(spec, MoEKernel) and not on_cuda:
                spec = spec.replace(backend="c")
        kernel = spec if isinstance(spec, MoEKernel) else compile_kernel(spec)
        self.kernel = kernel
        self.spec = kernel.spec
        self.handle = kernel_handle(kernel)
        self.trainable = trainable
        self.aux_loss = None
        device = torch.device("cpu" if kernel.device_index is None else f"cuda:{kernel.device_index}")
        tdt = getattr(torch, self.spec.dtype)
        if router_bias is not None:
            router_bias = torch.as_tensor(router_bias).detach().to(device=device, dtype=torch.float32).contiguous()
        self.register_buffer("router_bias", router_bias)
        if trainable:
            self._aux_args = (float(balance_coeff), float(z_coeff), bool(adaptive))
            # GPU tensors stay where they are (device=True); the rest comes as NumPy
            logical = logical_weights(self.spec, device=True, **weights) if weights is not None else {}
            for name, shape in weight_shapes(self.spec).items():
                value = logical.get(name)
                value = (torch.zeros(shape) if value is None else
                         value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value)))
                value = value.detach().to(device=device, dtype=tdt).reshape(shape).clone()
                self.register_parameter(name, nn.Parameter(value))
            return
        if weights is None:
            lay = kernel.layout
            E, H = self.spec.num_experts, self.spec.hidden_dim
            buf = torch.zeros(lay.total, dtype=tdt, device=device)
            router = torch.zeros((E, H) if lay.router_order == "eh" else (H, E), device=device,
                                 dtype=getattr(torch, self.spec.router_dt.name))
        else:
            if device.type == "cuda":       # move torch weights first: they are packed on the GPU
                weights = {k: _to_device(v, device) for k, v in weights.items()}
            packed = kernel.pack(**weights)
            buf, router = as_tensor(packed.buffer, self.spec), as_tensor(packed.router, self.spec)
        self.register_buffer("packed", buf)
        self.register_buffer("router", router)

    @classmethod
    def from_config(cls, config, weights=None, *, dtype=None, backend: str = "auto") -> "MoEBlock":
        """A block for the MoE layers of a transformers config (``weights``: one block's state
        dict in transformers 4.5x or 5.x key layout, or None for zero-filled buffers).  Raises
        ValueError naming a semantic moegen's kernels do not have yet."""
        from .hf import block_weights, spec_from_config
        spec = spec_from_config(config, dtype=dtype, backend=backend)
        if weights is None:
            return cls(spec)
        kwargs, bias = block_weights(spec, config, weights)
        return cls(spec, kwargs, router_bias=bias)

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The training op over the parameters; sets ``aux_loss``."""
        balance, z, adaptive = self._aux_args
        params = [getattr(self, name) for name in param_names(self.spec)]
        y, self.aux_loss = moe_train(self.spec, x.reshape(-1, self.spec.hidden_dim), params,
                                     self.router_bias, balance_coeff=balance, z_coeff=z,
                                     adaptive=adaptive)
        return y.reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.trainable:
            return self._train_forward(x.contiguous())
        x = x.contiguous()
        b = self._buffers
        if torch.compiler.is_compiling():
            return torch.ops.moegen.moe(x, b["packed"], b["router"], b["router_bias"], self.handle)
        # Eager: the op's body without the dispatcher (same code, same result).
        y = run_moe(x, b["packed"], b["router"], b["router_bias"], self.handle)
        if x.requires_grad and torch.is_grad_enabled():
            y = _NoBackward.apply(x, y)
        return y

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_ids [T, k] int32, topk_weights [T, k] float32) of the block's router
        (inference blocks)."""
        if self.trainable:
            raise ValueError("MoEBlock.route is for inference blocks (trainable=False): the "
                             "trainable block has no packed weights")
        b = self._buffers           # as in forward: no nn.Module.__getattr__ per buffer
        return torch.ops.moegen.route(x.contiguous(), b["packed"], b["router"], b["router_bias"],
                                      self.handle)

    def extra_repr(self) -> str:
        extra = ", trainable" if self.trainable else ""
        return f"{self.spec.name}, backend={self.kernel.backend}, target={self.kernel.target}{extra}"
