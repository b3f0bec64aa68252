"""What every backend provides, and the values that flow between the stages.

    plan -> render(plan) -> Sources --Backend.compile--> Artifact --cache--> Backend.load -> Module

A backend is stateless apart from caching its toolchain identity.  A `Module` is one loaded
binary for one spec: it owns its workspaces (sized once per token-count bucket, reused) and runs
the stages of the layer on arrays of its own device (NumPy for ``c``, CuPy for ``cuda``).
`moegen.kernel.MoEKernel` validates user input and then drives a Module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..spec import MoESpec

# The stages of the layer, in order.  A module may fuse neighbours; its
# ``stages`` attribute then names the fused stage "route+group" and so on.
STAGES = ("route", "group", "ffn1", "ffn2", "combine")


@dataclass(frozen=True)
class Sources:
    """Rendered source files of one spec for one backend: pure text, no I/O."""
    backend: str
    files: dict[str, str]       # file name -> text; ``entry`` is the one handed to the compiler
    entry: str

    @property
    def text(self) -> str:
        return self.files[self.entry]


@dataclass(frozen=True)
class Artifact:
    """A compiled binary and its JSON-able metadata; what the cache stores (bytes + JSON only).

    ``meta`` holds at least: backend, spec (``MoESpec.to_dict()``), spec_name, key, target,
    toolchain, options, build_seconds, created (unix time), moegen_version.
    """
    binary: bytes
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.meta.get("key", "")


@runtime_checkable
class Backend(Protocol):
    """A backend turns a plan into sources, sources into a binary, a binary into a Module.

        plan(spec, target, tuning) -> frozen plan (`moegen.plan.KernelPlan.detail`)
        render(KernelPlan)         -> Sources   (templates read the plan only)
        compile(Sources, ...)      -> Artifact
        load(Artifact, KernelPlan) -> Module    (launches and workspaces read the plan only)
    """
    name: str                                   # "c" or "cuda"
    templates: tuple[str, ...]                  # template files rendered for a spec

    def available(self) -> bool:
        """True when this backend can compile *and* run here."""

    def can_compile(self) -> bool:
        """True when this backend can compile here (CUDA can, without a GPU)."""

    def plan(self, spec: MoESpec, target: str, tuning: dict) -> Any:
        """The backend's frozen plan of ``spec`` for ``target``: every bucket, tile, thread
        count, shared-memory size, split-K count, kernel name and workspace size.  Pure (no I/O).
        ``tuning`` (possibly empty) overrides constants named by `tunables`; a value outside the
        allowed ones is a ValueError."""

    def render(self, plan: Any) -> Sources:
        """The sources of a `moegen.plan.KernelPlan`, rendered from the plan alone."""

    def tunables(self, spec: MoESpec) -> dict[str, tuple]:
        """Constants `moegen tune` may choose for ``spec``: name -> allowed values, the first
        being the default.  Empty when the backend has nothing to tune."""

    def target(self, spec: MoESpec) -> str:
        """The resolved target: a CPU ISA tier ("x86-64-v3", "avx512") or a CUDA arch ("sm_90")."""

    def toolchain(self) -> dict:
        """Compiler identity for the cache key (path, version banner).  May run the compiler;
        raises OSError (or subprocess.SubprocessError) when there is none.  Finding and loading
        a cached kernel never needs it (see `moegen.jit`)."""

    def options(self, spec: MoESpec, target: str) -> list[str]:
        """The full compiler option list for the cache key and the compile."""

    def compile(self, sources: Sources, spec: MoESpec, target: str, key: str) -> Artifact:
        """Compile to a binary. Raises CompileError with log and source."""

    def load(self, artifact: Artifact, plan: Any) -> "Module":
        """Load a binary built from ``plan`` (a `moegen.plan.KernelPlan`).  Raises any
        exception on a binary that cannot load; `moegen.jit` drops and rebuilds the entry only
        when the error says the binary is bad, never for a missing device or driver."""


class Module(Protocol):
    """A loaded kernel binary for one spec.

    Attributes:
        spec: the spec it was built for.
        xp: the array module of its device (numpy or cupy).
        device_kind: "cpu" or "cuda" (what `moegen.arrays.check` expects of user arrays).
        layout: the `moegen.layout.PackedLayout` its GEMMs read.
        stages: names of the launches one forward pass makes, in order, from `STAGES`
            (a fused pair is named "route+group").
    """
    spec: MoESpec
    xp: Any
    device_kind: str
    layout: Any
    stages: tuple[str, ...]

    def to_device(self, host_array) -> Any:
        """Copy a host NumPy array to this module's device (once, at pack time)."""

    def native(self, info) -> Any:
        """The object the stages consume for a validated `moegen.arrays.ArrayInfo`
        (zero-copy: a NumPy array for c; a CuPy array or raw pointer for cuda)."""

    def empty_like(self, info) -> Any:
        """A new uninitialised array of the user's kind (NumPy/CuPy/torch) shaped like ``info``."""

    def count_out_of_range(self, ids, num_experts: int) -> int:
        """How many ids are outside [0, num_experts) (synchronises on GPU)."""

    def workspace(self, tokens: int) -> Any:
        """The workspace for ``tokens`` tokens: allocated on the first call for its bucket,
        then reused (no allocation after that).  Exposes, for the current call:
        ``tokens``; ``topk_ids`` [T,k] int32; ``topk_weights`` [T,k] float32; ``counts`` [E]
        int32 (slots per expert); ``router_sums`` [E+1] float32 (Σ_t router prob of each
        expert, then Σ_t logsumexp(logits_t)², filled when ``call.want_stats``); optionally
        ``dropped`` (slots dropped by capacity)."""

    def run_stage(self, stage: str, ws: Any, call: "Call") -> None:
        """Run (CPU) or enqueue on the current stream (GPU) one stage.  When
        ``call.topk_ids`` is given, the group stage reads it instead of ``ws.topk_ids``."""


@dataclass
class Call:
    """The validated arguments of one forward pass, already on the module's device."""
    x: Any                       # [T, H] contiguous, spec dtype
    packed: Any                  # moegen.layout.PackedWeights on the module's device
    out: Any                     # [T, H] contiguous, spec dtype
    tokens: int
    router_bias: Any = None      # [E] float32 or None
    topk_ids: Any = None         # [T, k] int32, given by the caller for experts-only calls
    topk_weights: Any = None     # [T, k] float32, idem
    want_stats: bool = False     # route fills ws.router_sums
    x_ptr: int = 0               # data pointers of x and out as validated (0: unknown), so a
    out_ptr: int = 0             # module need not read them from the arrays again
