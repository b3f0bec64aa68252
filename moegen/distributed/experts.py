"""The expert stage of one rank: its own experts' FFNs over rows sent by every rank.

The single-process layer writes one fp32 row per slot (``weight · FFN(x)``) and sums a token's
slots in slot order before it rounds to the storage dtype once.  An expert-parallel layer must
return those fp32 rows, not a rounded per-rank sum, to reproduce that sum bit for bit.  So a
rank's experts run as a specialised kernel of their own (``num_experts`` = the rank's experts,
``top_k`` = 1: each received row is one slot) through the kernel module's group, ffn1 and ffn2
stages (the `moegen.backends.base.Module` contract), and `rows` hands back its per-slot fp32
output.  The shared experts run the same way on the rank's own tokens: a kernel with
``num_experts = top_k`` = the shared experts and every weight 1, whose slot ``t·S + j`` is
token t's row of shared expert j, as in the single-process layer.
"""

from __future__ import annotations

from .. import arrays
from ..backends.base import Call

# The stages of an experts-only pass (routing is given).
_STAGES = ("group", "ffn1", "ffn2")


def expert_spec(spec, experts: int, top_k: int):
    """A spec for ``experts`` experts with ``top_k`` slots per row and the layer's FFN (dtype,
    activation, sizes, biases, backend), no routing options and no shared experts."""
    return spec.replace(num_experts=experts, top_k=top_k, num_shared_experts=0,
                        routing="softmax_topk", n_group=1, topk_group=1,
                        routed_scaling_factor=1.0, capacity_factor=None)


class ExpertStage:
    """One compiled kernel's expert FFNs on rows given with their (local) expert ids.

    ``kernel``: a `MoEKernel` for an `expert_spec`; ``weights``: its packed weights.
    """

    def __init__(self, kernel, weights):
        self.kernel = kernel
        self.weights = weights
        self.module = kernel.module
        self.spec = kernel.spec

    def run(self, x, ids, weights, rows: int):
        """Run the FFNs of ``rows`` rows (``rows / top_k`` tokens): x [tokens, H], ids and
        weights [tokens, top_k] int32 / float32, all of this kernel's device (torch tensors or
        NumPy/CuPy arrays).  Returns the workspace, whose slot outputs `slot_rows` reads."""
        mod = self.module
        tokens = rows // self.spec.top_k
        native = [mod.native(arrays.describe(a, name))
                  for a, name in ((x, "x"), (ids, "topk_ids"), (weights, "topk_weights"))]
        ws = mod.workspace(tokens)
        call = Call(x=native[0], packed=self.weights, out=None, tokens=tokens,
                    topk_ids=native[1], topk_weights=native[2])
        for stage in _STAGES:
            mod.run_stage(stage, ws, call)
        return ws

    def slot_rows(self, ws, rows: int):
        """The fp32 slot rows [rows, H] of a c-backend run (a view into its workspace, valid
        until the kernel's next call with the same token bucket)."""
        return ws.buffers.y[:rows]

    def split_rows(self, ws):
        """(y_slot, splits) of a cuda-backend run: the split-K partial sums [splits, rows, H]."""
        return ws.y_slot, ws.y_slot.shape[0]
