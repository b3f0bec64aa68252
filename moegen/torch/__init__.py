"""moegen inside PyTorch models (optional: ``pip install 'moegen[torch]'``).

    from moegen.torch import MoEBlock, from_hf, patch_model
    block = from_hf(model.model.layers[0].mlp)      # a transformers MoE block -> MoEBlock
    report = patch_model(model)                     # swap every supported block in place

The kernels are ``torch.library`` custom ops (``torch.ops.moegen.moe``/``route``/``experts``,
see `moegen.torch.ops` for how an op finds its kernel), so ``torch.compile(fullgraph=True)``
traces them.  ``MoEBlock(spec, weights, trainable=True)`` trains on the CPU through the
``moegen_train`` ops (`moegen.torch.autograd`).  ``import moegen`` never imports torch; this
package does.
"""

try:
    import torch  # noqa: F401  (the optional dependency this package is for)
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError("moegen.torch needs PyTorch: pip install 'moegen[torch]'") from exc

from .block import MoEBlock  # noqa: E402
from .hf import PatchReport, Unsupported, from_hf, patch_model, spec_from_config  # noqa: E402
from .ops import experts, kernel_for, kernel_handle, moe, route  # noqa: E402

__all__ = ["MoEBlock", "from_hf", "patch_model", "PatchReport", "Unsupported", "spec_from_config",
           "moe", "route", "experts", "kernel_handle", "kernel_for"]
