"""Building the c backend's backward binary: plan, render, key, cache, load.

    plan = backward_plan(spec)          # the forward's KernelPlan + the backward's constants
    sources = render_backward(plan)     # templates/c/backward.c.jinja (includes the forward)
    path = load_backward(spec)          # from the kernel cache, built on a miss

The backward source includes the forward template and is rendered from the same `CPlan` the
forward kernel of ``spec`` is (`moegen.jit.plan_for`: the stored tuning record, the resolved
ISA tier), so both share every constant and the recomputed routing is bitwise the forward's.
The binary goes through the kernel cache like the forward: its key is `moegen.jit.key_parts_of`
over the forward plan and the backward sources, plus the backward's own plan (pure, no I/O);
the entry is named ``<spec name>_backward``.  It is compiled and loaded by the c backend's
``compile`` and ``load`` (ISA check, private library directory).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__, jit, settings
from .backends.base import Artifact, Sources
from .backends.c import CBackend
from .cache import default_cache, digest
from .errors import BackendUnavailable
from .plan import KernelPlan
from .render import render_template
from .spec import MoESpec

TEMPLATE = "c/backward.c.jinja"
SOURCE_NAME = "backward.c"
# Output rows (or columns) per backward work item: enough to amortise a thread hand-off, few
# enough that an expert's GEMM splits over several threads.
BWD_CHUNK = 64
# Appended to the spec name: the cache entry of the backward binary.
ENTRY_SUFFIX = "_backward"


@dataclass(frozen=True)
class BackwardPlan:
    """The backward build of one spec: the forward's plan (every shared constant) and the
    backward's own constants."""
    forward: KernelPlan
    chunk: int                   # output rows/columns of one backward work item

    @property
    def spec(self) -> MoESpec:
        return self.forward.spec

    def own(self) -> dict:
        """The backward's constants (the forward plan left out), for the key."""
        return {"chunk": self.chunk}


def backward_plan(spec: MoESpec) -> BackwardPlan:
    """The backward plan of ``spec`` on this machine: the plan `moegen.compile` would use for
    the forward of the c-backend spec (stored tuning record, resolved ISA tier)."""
    fwd = jit.plan_for(spec.replace(backend="c"))
    return BackwardPlan(fwd, BWD_CHUNK)


def render_backward(plan: BackwardPlan) -> Sources:
    """The backward source of ``plan`` (pure: reads templates, writes nothing)."""
    cplan = plan.forward.detail
    text = render_template(TEMPLATE, p=cplan, s=cplan.spec, dt=cplan.spec.dt, version=__version__,
                           b=plan)
    return Sources(backend="c", files={SOURCE_NAME: text}, entry=SOURCE_NAME)


def key_parts(plan: BackwardPlan, sources: Sources, toolchain: dict | None) -> dict:
    """Every input that changes the backward binary (pure): the forward's key parts over the
    backward sources, plus the backward's own plan."""
    return backward_key_parts(CBackend(), plan, sources, toolchain)


def backward_key_parts(be, plan, sources: Sources, toolchain: dict | None) -> dict:
    """The key parts of any backend's backward build: ``plan`` has ``forward`` (the forward's
    `KernelPlan`), ``spec`` and ``own()`` (the backward's own constants)."""
    parts = jit.key_parts_of(plan.forward, sources, toolchain,
                             be.options(plan.spec, plan.forward.target), settings.code_settings())
    parts["backward"] = plan.own()
    return parts


def backward_builder(be, plan, sources: Sources, parts: dict, key: str):
    """The ``build`` callable of the cache for a backward binary: ``be`` compiles ``sources``,
    and the artifact carries the entry's metadata (kind "backward")."""
    def compile_now() -> Artifact:
        t = time.perf_counter()
        art = be.compile(sources, plan.spec, plan.forward.target, key)
        meta = dict(art.meta)
        meta.update(key=key, plan_key=jit.plan_key(parts), key_parts=parts,
                    spec_name=plan.spec.name + ENTRY_SUFFIX, kind="backward",
                    spec=plan.spec.to_dict(), backend=be.name, target=plan.forward.target,
                    tuning=dict(plan.forward.tuning), moegen_version=__version__,
                    build_seconds=round(time.perf_counter() - t, 4), created=time.time())
        return Artifact(art.binary, meta)
    return compile_now


def load_backward(spec: MoESpec) -> Path:
    """The loaded backward library of ``spec``: its path (load it with ctypes; dlopen hands
    back the handle the c backend's load opened).  Found in the kernel cache, else compiled
    and stored.  Raises BackendUnavailable without a C compiler, CompileError when cc fails."""
    be = CBackend()
    plan = backward_plan(spec)
    sources = render_backward(plan)
    toolchain = jit.toolchain_identity(be)
    if toolchain is None:
        raise BackendUnavailable(f"no C compiler (MOEGEN_CC={settings.cc()!r}) to build the "
                                 f"backward of {plan.spec.name}; set MOEGEN_CC to a C compiler")
    parts = key_parts(plan, sources, toolchain)
    key = digest(parts)
    name = plan.spec.name + ENTRY_SUFFIX
    compile_now = backward_builder(be, plan, sources, parts, key)
    cache = default_cache()
    artifact, built = cache.get_or_build(name, key, compile_now,
                                         hint=f"moegen.backward.MoEBackward({plan.spec.name})")
    try:
        module = be.load(artifact, plan.forward)
    except Exception as exc:  # noqa: BLE001 - a bad binary is rebuilt once, anything else raised
        if built or not cache.drop_if_bad(name, key, exc):
            raise
        artifact, _ = cache.get_or_build(name, key, compile_now)
        module = be.load(artifact, plan.forward)
    return module.path

