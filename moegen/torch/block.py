"""`MoEBlock`: an ``nn.Module`` holding a compiled moegen kernel and its packed weights.

The packed buffer, the router and the optional router bias are module buffers (they follow
``.to()`` and ``state_dict``); ``forward`` is one call of the ``moegen::moe`` custom op, so the
block runs eagerly, under ``torch.compile(fullgraph=True)`` and inside CUDA graphs.  The block
is for inference: the op has no backward.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .. import compile as compile_kernel
from ..kernel import MoEKernel
from ..spec import MoESpec
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


class MoEBlock(nn.Module):
    """A MoE layer run by a moegen kernel: ``y = block(x)`` for x [..., H] of the spec dtype.

    ``MoEBlock(spec_or_kernel, weights=None, router_bias=None)``: ``weights`` is a dict of
    `MoEKernel.pack` keywords (NumPy, CuPy or torch arrays; CUDA tensors are packed on the
    GPU); without it the buffers are zero-filled, to be filled by ``load_state_dict``.
    ``router_bias`` [E] float32 is added to the router logits (softmax routings) or biases the
    selection only (sigmoid routing, DeepSeek-V3's ``e_score_correction_bias``).
    `from_config` builds one from a transformers config, `moegen.torch.from_hf` from a
    transformers block.
    """

    def __init__(self, spec: MoESpec | MoEKernel, weights: dict | None = None, *, router_bias=None):
        super().__init__()
        kernel = spec if isinstance(spec, MoEKernel) else compile_kernel(spec)
        self.kernel = kernel
        self.spec = kernel.spec
        self.handle = kernel_handle(kernel)
        device = torch.device("cpu" if kernel.device_index is None else f"cuda:{kernel.device_index}")
        tdt = getattr(torch, self.spec.dtype)
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
        if router_bias is not None:
            router_bias = torch.as_tensor(router_bias).detach().to(device=device, dtype=torch.float32).contiguous()
        self.register_buffer("router_bias", router_bias)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        if not (torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad)):
            # Eager inference: the op's body without the dispatcher (same code, same result).
            return run_moe(x, self.packed, self.router, self.router_bias, self.handle)
        return torch.ops.moegen.moe(x, self.packed, self.router, self.router_bias, self.handle)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_ids [T, k] int32, topk_weights [T, k] float32) of the block's router."""
        return torch.ops.moegen.route(x.contiguous(), self.packed, self.router, self.router_bias,
                                      self.handle)

    def extra_repr(self) -> str:
        return f"{self.spec.name}, backend={self.kernel.backend}, target={self.kernel.target}"
