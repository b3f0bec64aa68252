"""The compile flow: spec -> plan -> render -> key -> cache (or compile) -> load -> MoEKernel.

    resolve(spec)          the concrete backend and target of a spec ("auto" picked here)
    plan_for(spec)         the `KernelPlan` (the stored tuning record looked up first)
    key_parts_of(...)      pure: everything that changes the binary, as one readable dict
    key_parts(spec)        the same for a spec on this machine (gathers the inputs first)
    build(spec)            make sure the binary is in the cache; returns BuildInfo
    compile(spec)          a MoEKernel, memoised per process

The machine is asked everything it has to say (device, SM count, stored tuning record, code
settings, compiler identity) before planning and keying; `moegen.plan.make_plan` and
`key_parts_of` do no I/O.  Finding and loading a cached kernel never needs the compiler: when the
backend's toolchain cannot be identified (no C compiler), the entry is found by its
``plan_key`` (the key without the toolchain), recorded in every entry's metadata.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass

from . import __version__, settings, tuning as tuning_records
from .backends import get_backend, cuda_usable
from .backends.base import Artifact, Sources
from .cache import CACHE_FORMAT, default_cache, digest, is_bad_binary
from .errors import BackendUnavailable, CompileError, DeviceError
from .kernel import MoEKernel
from .plan import KernelPlan, make_plan
from .render import render
from .spec import MoESpec

log = logging.getLogger("moegen.jit")


def resolve(spec: MoESpec) -> MoESpec:
    """Pick the backend of an "auto" spec (cuda when CuPy, NVRTC and a GPU are present, else c)
    and the arch of a cuda spec without one (the current device, else MOEGEN_CUDA_ARCH)."""
    if spec.backend == "auto":
        spec = spec.replace(backend="cuda" if cuda_usable() else "c")
    if spec.backend == "cuda" and spec.arch is None:
        spec = spec.replace(arch=get_backend("cuda").target(spec))
    return spec


def plan_for(spec: MoESpec, tuning: dict | None = None) -> KernelPlan:
    """The plan of ``spec`` on this machine: resolved, for the backend's target, with ``tuning``
    (None: the stored `moegen tune` record, else the defaults) and, for cuda, the SM count of
    the current device when it is of the target's arch."""
    spec = resolve(spec)
    be = get_backend(spec.backend)
    target = be.target(spec)
    if tuning is None:
        tuning = tuning_records.lookup(spec, target, be.tunables(spec))
    sms = be.sm_count(target) if spec.backend == "cuda" else None
    return make_plan(spec, target, tuning, sms=sms)


def toolchain_identity(backend) -> dict | None:
    """The backend's compiler identity, or None when there is no usable compiler here (the
    kernel can then only come from the cache or a prebuilt layer)."""
    try:
        identity = backend.toolchain()
    except (OSError, subprocess.SubprocessError, ImportError) as exc:
        log.info("%s toolchain unavailable: %s", backend.name, exc)
        return None
    if identity.get("missing"):                 # the backend says so instead of raising
        log.info("%s toolchain unavailable: %s", backend.name, identity["missing"])
        return None
    return identity


def key_parts_of(plan: KernelPlan, sources: Sources, toolchain: dict | None, options: list,
                 code_settings: dict) -> dict:
    """Every input that changes the binary, as a JSON-able dict (pure: no I/O).

    The plan (spec, target, tuning and every constant), the rendered sources, the toolchain
    identity, the compiler options, the ``MOEGEN_*`` settings that change code, moegen's
    version and the cache format.  ``toolchain`` None leaves it out (see `plan_key`).
    """
    parts = {
        "format": CACHE_FORMAT,
        "moegen": __version__,
        "backend": plan.backend,
        "target": plan.target,
        "plan": plan.to_dict(),
        "source": {name: _sha(text) for name, text in sorted(sources.files.items())},
        "options": list(options),
        "settings": dict(code_settings),
    }
    if toolchain is not None:
        parts["toolchain"] = toolchain
    return parts


def plan_key(parts: dict) -> str:
    """The key without the compiler (its identity and MOEGEN_CC, which names it): what a
    machine without a compiler matches entries on."""
    rest = {k: v for k, v in parts.items() if k != "toolchain"}
    rest["settings"] = {k: v for k, v in parts["settings"].items() if k != "MOEGEN_CC"}
    return digest(rest)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Prepared:
    """One build before the cache is asked: the plan, its sources and its key parts."""
    plan: KernelPlan
    sources: Sources
    parts: dict
    toolchain_ok: bool

    @property
    def key(self) -> str:
        return digest(self.parts)


def prepare(spec: MoESpec, tuning: dict | None = None) -> Prepared:
    """Plan, render and key ``spec`` (``tuning`` None: the stored record)."""
    plan = plan_for(spec, tuning)
    be = get_backend(plan.backend)
    sources = render(plan)
    toolchain = toolchain_identity(be)
    parts = key_parts_of(plan, sources, toolchain, be.options(plan.spec, plan.target),
                         settings.code_settings())
    return Prepared(plan, sources, parts, toolchain is not None)


def key_parts(spec: MoESpec, tuning: dict | None = None) -> dict:
    """The key parts of ``spec`` on this machine (``moegen cache explain``): `key_parts_of`
    over what `prepare` gathers."""
    return prepare(spec, tuning).parts


@dataclass(frozen=True)
class BuildInfo:
    spec: MoESpec
    name: str
    key: str
    backend: str
    target: str
    seconds: float          # wall time of this call (compile time when built)
    built: bool             # True when this call compiled, False when the cache had it
    entry: str              # "<name>.<key[:16]>"
    location: str           # the cache directory (or layer) holding the entry


def _find_without_toolchain(cache, prep: Prepared) -> tuple[str, Artifact] | None:
    """(key, artifact) of an entry built from this plan and these sources by any toolchain."""
    name, want = prep.plan.spec.name, plan_key(prep.parts)
    for info in cache.entries():
        if info.name == name and info.meta.get("plan_key") == want:
            art = cache.get(name, info.key)
            if art is not None:
                return info.key, art
    return None


def _build(spec: MoESpec, tuning: dict | None = None, cache=None):
    """(prepared, artifact, BuildInfo, cache, compile function)."""
    t0 = time.perf_counter()
    prep = prepare(spec, tuning)
    plan, parts = prep.plan, prep.parts
    be = get_backend(plan.backend)
    name = plan.spec.name
    cache = cache or default_cache()

    if not prep.toolchain_ok:
        found = _find_without_toolchain(cache, prep)
        if found is None:
            raise BackendUnavailable(_no_toolchain_message(be, plan))
        key, artifact = found
        info = BuildInfo(plan.spec, name, key, be.name, plan.target, time.perf_counter() - t0,
                         False, f"{name}.{key[:16]}", str(cache.directory))
        return prep, artifact, info, cache, None

    key = prep.key

    def compile_now() -> Artifact:
        t = time.perf_counter()
        try:
            art = be.compile(prep.sources, plan.spec, plan.target, key)
        except CompileError as err:
            if settings.keep_source():
                err.save_source()
            raise
        meta = dict(art.meta)
        meta.update(key=key, plan_key=plan_key(parts), key_parts=parts, spec_name=name,
                    spec=plan.spec.to_dict(), backend=be.name, target=plan.target,
                    toolchain=parts["toolchain"], options=parts["options"],
                    tuning=dict(plan.tuning), moegen_version=__version__,
                    build_seconds=round(time.perf_counter() - t, 4), created=time.time())
        return Artifact(art.binary, meta)

    hint = f"moegen build {cli_args(plan.spec)}"
    artifact, built = cache.get_or_build(name, key, compile_now, hint=hint)
    info = BuildInfo(plan.spec, name, key, be.name, plan.target, time.perf_counter() - t0, built,
                     f"{name}.{key[:16]}", str(cache.directory))
    return prep, artifact, info, cache, compile_now


def _no_toolchain_message(be, plan: KernelPlan) -> str:
    if be.name == "c":
        named = (f"MOEGEN_CC={os.environ['MOEGEN_CC']!r} is not an executable C compiler"
                 if os.environ.get("MOEGEN_CC") else "no 'cc' on PATH and MOEGEN_CC is unset")
        return (f"no C compiler: {named}, and {plan.spec.name} is in no cache or prebuilt layer; "
                f"set MOEGEN_CC to a C compiler, or prebuild the kernel where one exists")
    return (f"the {be.name} toolchain is not usable here, and {plan.spec.name} is in no cache "
            f"or prebuilt layer; install the cuda extra (pip install 'moegen[cuda]')")


def build(spec: MoESpec) -> BuildInfo:
    """Make sure ``spec``'s binary is in the cache (compiling it if needed)."""
    return _build(spec)[2]


_memo: dict = {}
_memo_lock = threading.Lock()


def compile(spec: MoESpec) -> MoEKernel:  # noqa: A001 - the public verb
    """A `MoEKernel` for ``spec``, memoised per process.

    Plans (with the spec's stored tuning record, if `moegen tune` made one), renders, looks
    the binary up in the cache (prebuilt layers first), compiles on a miss (unless offline),
    loads it.  A cached binary that is bad (does not load as a binary) is dropped and rebuilt
    once; a missing device or driver is not a bad binary: the entry is kept.
    Raises SpecError, TemplateError, CompileError, MissingKernelError, BackendUnavailable,
    DeviceError.
    """
    return _compile(spec, None)


def compile_tuned(spec: MoESpec, tuning: dict, cache=None) -> MoEKernel:
    """Like `compile`, with explicit tuning constants (see `moegen.tuning`) instead of the
    stored record, built in ``cache`` (default: the kernel cache).  Not memoised.
    Raises ValueError for a tuning the backend does not allow."""
    return _load(*_build(resolve(spec), dict(tuning), cache)[:5])


def _compile(spec: MoESpec, tuning: dict | None) -> MoEKernel:
    rspec = resolve(spec)
    memo_key = (rspec, settings.cache_dir(), tuple(settings.code_settings().items()),
                None if tuning is None else tuple(sorted(tuning.items())))
    with _memo_lock:
        hit = _memo.get(memo_key)
    if hit is not None:
        return hit
    kernel = _load(*_build(rspec, tuning))
    with _memo_lock:
        _memo[memo_key] = kernel
    return kernel


def _load(prep: Prepared, artifact: Artifact, info: BuildInfo, cache, compile_now) -> MoEKernel:
    plan = prep.plan
    be = get_backend(plan.backend)
    try:
        module = be.load(artifact, plan)
    except Exception as exc:  # noqa: BLE001 - sorted below: bad binary or not
        if not is_bad_binary(exc):
            raise _unusable(be, plan, info, exc) from None
        if info.built or compile_now is None:
            raise
        log.warning("cached binary %s failed to load (%s: %s); rebuilding", info.entry,
                    type(exc).__name__, exc)
        cache.drop(info.name, info.key, f"failed to load: {exc}")
        artifact, _ = cache.get_or_build(info.name, info.key, compile_now,
                                         hint=f"moegen build {cli_args(plan.spec)}")
        module = be.load(artifact, plan)
    return MoEKernel(plan.spec, module, artifact.meta)


def _unusable(be, plan: KernelPlan, info: BuildInfo, exc: BaseException) -> Exception:
    """The error to raise for a good binary that cannot be loaded here."""
    first = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DeviceError(f"{info.entry}: cannot load the kernel: no space left in the "
                           f"temporary directory ({first}); free space or set TMPDIR; the "
                           f"cached kernel was kept")
    if be.name == "cuda" and isinstance(exc, ImportError):
        return BackendUnavailable(f"{info.entry}: the cuda backend needs CuPy ({first}); "
                                  f"install the cuda extra: pip install 'moegen[cuda]'")
    if be.name == "cuda" and type(exc).__module__.startswith("cupy"):
        return DeviceError(f"no usable GPU for the cuda backend ({type(exc).__name__}: {first}); "
                           f"the cached kernel {info.entry} was kept")
    return exc


def clear_memo() -> None:
    """Forget the per-process memo of compiled kernels (tests; cache dir changes)."""
    with _memo_lock:
        _memo.clear()


_CLI_FLAGS = (("num_experts", "--experts"), ("top_k", "--topk"), ("hidden_dim", "--hidden"),
              ("ffn_dim", "--ffn"), ("dtype", "--dtype"), ("activation", "--activation"),
              ("routing", "--routing"), ("backend", "--backend"), ("arch", "--arch"))


def cli_args(spec: MoESpec) -> str:
    """The ``moegen build`` arguments that make ``spec`` (for messages)."""
    parts = [f"{flag} {getattr(spec, field)}" for field, flag in _CLI_FLAGS
             if getattr(spec, field) is not None]
    if not spec.renormalize:
        parts.append("--no-renormalize")
    if spec.bias:
        parts.append("--bias")
    for field, flag in (("shared_expert_gate", "--shared-expert-gate"),
                        ("batch_invariant", "--batch-invariant"),
                        ("save_activations", "--save-activations")):
        if getattr(spec, field):
            parts.append(flag)
    for field, flag in (("n_group", "--n-group"), ("topk_group", "--topk-group"),
                        ("routed_scaling_factor", "--routed-scaling-factor"),
                        ("num_shared_experts", "--shared-experts"),
                        ("capacity_factor", "--capacity-factor"),
                        ("capacity_drop", "--capacity-drop"),
                        ("router_dtype", "--router-dtype"), ("swiglu_alpha", "--swiglu-alpha"),
                        ("swiglu_limit", "--swiglu-limit")):
        value = getattr(spec, field)
        if value != MoESpec.__dataclass_fields__[field].default:
            parts.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return " ".join(parts)
