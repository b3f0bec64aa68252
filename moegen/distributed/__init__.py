"""Expert parallelism: one MoE layer's experts spread over the ranks of a ``torch.distributed``
process group (gloo + the c backend on CPUs, NCCL + the cuda backend on GPUs).

    from moegen.distributed import ExpertParallelMoE
    layer = ExpertParallelMoE(spec, group, router=wr, w1=w1, w3=w3, w2=w2)
    y = layer(x)                      # collective: every rank calls it with its own tokens

Importing this package imports neither torch nor any kernel; the names below load on first use.
"""

import importlib

__all__ = ["ExpertParallelMoE", "Placement", "run_ep_bench"]

_HOMES = {"ExpertParallelMoE": ".layer", "Placement": ".placement", "run_ep_bench": ".bench"}


def __getattr__(name):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'moegen.distributed' has no attribute {name!r}")
    return getattr(importlib.import_module(home, __name__), name)
