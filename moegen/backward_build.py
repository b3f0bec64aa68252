"""Building the c backend's backward binary: the one place the backward pass calls into the
c backend's build machinery (its render context, compiler, target and library loader), so a
change there is followed here and nowhere else.

The binary is the forward source plus ``templates/c/backward.c.jinja``; it is rendered from the
c backend's render context (every constant baked in) and compiled with the backend's own
options for the current ISA tier.  Builds are kept for the life of the process.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib

from .backends.base import Sources
from .backends.c import CBackend, write_library
from .render import render_template
from .spec import MoESpec

TEMPLATE = "c/backward.c.jinja"
# Output rows (or columns) per backward work item: enough to amortise a thread hand-off, few
# enough that an expert's GEMM splits over several threads.
BWD_CHUNK = 64


def render_backward(spec: MoESpec) -> Sources:
    """The backward source of ``spec`` (pure: reads templates, writes nothing)."""
    ctx = CBackend().render_context(spec)
    ctx["bwd_chunk"] = BWD_CHUNK
    return Sources(backend="c", files={"backward.c": render_template(TEMPLATE, **ctx)},
                   entry="backward.c")


@functools.lru_cache(maxsize=32)
def load_backward(spec: MoESpec) -> ctypes.CDLL:
    """Compile (once per process and spec) and load the backward binary of ``spec``."""
    be = CBackend()
    sources = render_backward(spec)
    target = be.target(spec)
    key = hashlib.sha256((target + sources.text).encode()).hexdigest()
    artifact = be.compile(sources, spec, target, key)
    return ctypes.CDLL(str(write_library(artifact.binary)))
