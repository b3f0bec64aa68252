"""moegen: a code-generating compiler for Mixture-of-Experts layers.

    import moegen
    spec = moegen.MoESpec(num_experts=8, top_k=2, hidden_dim=512, dtype="bfloat16")
    kernel = moegen.compile(spec)
    weights = kernel.pack(router=wr, w1=w1, w3=w3, w2=w2)
    y = kernel(x, weights)
"""

__version__ = "0.1.0"

from .errors import (CacheError, CompileError, MissingKernelError, MoegenError,  # noqa: E402
                     SpecError, TemplateError)
from .spec import MoESpec  # noqa: E402
from . import arrays  # noqa: E402,F401  (moegen.arrays.host/describe for users)


def compile(spec):  # noqa: A001
    """A compiled, cached `MoEKernel` for ``spec`` (see `moegen.jit.compile`)."""
    from .jit import compile as _compile  # on first use: `import moegen` stays light
    return _compile(spec)


def build(spec):
    """Compile ``spec`` into the cache without loading it (see `moegen.jit.build`)."""
    from .jit import build as _build  # on first use: `import moegen` stays light
    return _build(spec)


__all__ = ["MoESpec", "compile", "build", "__version__", "MoegenError", "SpecError",
           "TemplateError", "CompileError", "CacheError", "MissingKernelError"]
