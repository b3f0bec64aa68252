"""The compile flow: spec -> render -> key -> cache (or compile) -> load -> MoEKernel.

    resolve(spec)      the concrete backend and target of a spec ("auto" picked here)
    key_parts(spec)    everything that changes the binary, as one readable dict
    build(spec)        make sure the binary is in the cache; returns BuildInfo
    compile(spec)      a MoEKernel, memoised per process

Each step is usable alone (the CLI's ``render``, ``cache explain`` and ``build`` use them).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from . import __version__, settings
from .backends import get_backend, cuda_usable
from .backends.base import Artifact
from .cache import CACHE_FORMAT
from .errors import CompileError
from .kernel import MoEKernel
from .render import render, template_digests
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


def _tuning(spec: MoESpec, tuning: dict | None) -> dict:
    """The tuning to build with: the given one, else the stored record (moegen tune), else {}."""
    if tuning is not None:
        return dict(tuning)
    from .tuning import lookup
    return lookup(spec)


def key_parts(spec: MoESpec, tuning: dict | None = None) -> dict:
    """Every input that changes the binary (DESIGN §5), as a JSON-able dict.  ``tuning``
    defaults to the stored tuning record of the spec (none: the backend's defaults)."""
    return _parts_and_sources(spec, tuning)[0]


def _parts_and_sources(spec: MoESpec, tuning: dict | None):
    """(key parts, rendered sources): the sources are hashed into the key and, on a miss,
    compiled, so they are rendered once."""
    spec = resolve(spec)
    be = get_backend(spec.backend)
    tuning = _tuning(spec, tuning)
    sources = render(spec, be, tuning)
    target = be.target(spec)
    parts = {
        "format": CACHE_FORMAT,
        "moegen": __version__,
        "templates": template_digests(),
        "source": {name: _sha(text) for name, text in sorted(sources.files.items())},
        "backend": be.name,
        "toolchain": be.toolchain(),
        "target": target,
        "options": be.options(spec, target),
        "spec": spec.to_dict(),
        "settings": settings.code_settings(),
        "tuning": tuning,
    }
    return parts, sources


def _sha(text: str) -> str:
    import hashlib
    return hashlib.sha256(text.encode()).hexdigest()


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


def _build(spec: MoESpec, tuning: dict | None = None):
    """(resolved spec, artifact, BuildInfo, cache, compile function)."""
    from .cache import default_cache, digest
    t0 = time.perf_counter()
    spec = resolve(spec)
    be = get_backend(spec.backend)
    parts, sources = _parts_and_sources(spec, tuning)
    tuning = parts["tuning"]
    key = digest(parts)
    name = spec.name
    cache = default_cache()

    def compile_now() -> Artifact:
        t = time.perf_counter()
        try:
            art = be.compile(sources, spec, parts["target"], key)
        except CompileError as err:
            if settings.keep_source():
                err.save_source()
            raise
        meta = dict(art.meta)
        meta.update(key=key, spec_name=name, spec=spec.to_dict(), backend=be.name,
                    target=parts["target"], toolchain=parts["toolchain"],
                    options=parts["options"], tuning=tuning, moegen_version=__version__,
                    build_seconds=round(time.perf_counter() - t, 4), created=time.time())
        return Artifact(art.binary, meta)

    hint = f"moegen build {cli_args(spec)}"
    artifact, built = cache.get_or_build(name, key, compile_now, hint=hint)
    info = BuildInfo(spec, name, key, be.name, parts["target"], time.perf_counter() - t0, built,
                     f"{name}.{key[:16]}", str(cache.directory))
    return spec, artifact, info, cache, compile_now


def build(spec: MoESpec) -> BuildInfo:
    """Make sure ``spec``'s binary is in the cache (compiling it if needed)."""
    return _build(spec)[2]


_memo: dict = {}
_memo_lock = threading.Lock()


def compile(spec: MoESpec) -> MoEKernel:  # noqa: A001 - the public verb
    """A `MoEKernel` for ``spec``, memoised per process.

    Renders (with the spec's stored tuning record, if `moegen tune` made one), looks the binary
    up in the cache (prebuilt layers first), compiles on a miss (unless offline), loads it.  A
    cached binary that fails to load is dropped and rebuilt once.
    Raises SpecError, TemplateError, CompileError, MissingKernelError.
    """
    return _compile(spec, None)


def compile_tuned(spec: MoESpec, tuning: dict) -> MoEKernel:
    """Like `compile`, with explicit tuning constants (see `moegen.tuning`) instead of the
    stored record.  Raises ValueError for a tuning the backend does not allow."""
    return _compile(spec, dict(tuning))


def _compile(spec: MoESpec, tuning: dict | None) -> MoEKernel:
    rspec = resolve(spec)
    memo_key = (rspec, settings.cache_dir(), tuple(settings.code_settings().items()),
                None if tuning is None else tuple(sorted(tuning.items())))
    with _memo_lock:
        hit = _memo.get(memo_key)
    if hit is not None:
        return hit
    rspec, artifact, info, cache, compile_now = _build(rspec, tuning)
    be = get_backend(rspec.backend)
    try:
        module = be.load(artifact, rspec)
    except Exception as exc:  # noqa: BLE001 - any load failure means a bad binary: rebuild once
        if info.built:
            raise
        log.warning("cached binary %s failed to load (%s: %s); rebuilding", info.entry,
                    type(exc).__name__, exc)
        cache.drop(info.name, info.key, f"failed to load: {exc}")
        artifact, _ = cache.get_or_build(info.name, info.key, compile_now,
                                         hint=f"moegen build {cli_args(rspec)}")
        module = be.load(artifact, rspec)
    kernel = MoEKernel(rspec, module, artifact.meta)
    with _memo_lock:
        _memo[memo_key] = kernel
    return kernel


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
    for field, flag in (("n_group", "--n-group"), ("topk_group", "--topk-group"),
                        ("routed_scaling_factor", "--routed-scaling-factor"),
                        ("num_shared_experts", "--shared-experts"),
                        ("capacity_factor", "--capacity-factor"),
                        ("capacity_drop", "--capacity-drop")):
        value = getattr(spec, field)
        if value != MoESpec.__dataclass_fields__[field].default:
            parts.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return " ".join(parts)
