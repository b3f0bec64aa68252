"""Deployment: prebuild many variants, move them as archives, read model configs.

    specs = [MoESpec(**kw) for kw in parse_model_config("Mixtral-8x7B/config.json")]
    results = build_many(specs, archs=["sm_90", "sm_100"], jobs=8)     # into the cache
    export_archive(default_cache(), "kernels.tar.gz")                  # on the build machine
    import_archive("kernels.tar.gz", default_cache())                  # on the target, or:
    extract_archive("kernels.tar.gz", "/opt/moegen/prebuilt")          # MOEGEN_PREBUILT_DIR

See ``docs/DEPLOY.md`` for the workflow and the cache layout.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Callable, Iterable

from .archive import export_archive, extract_archive, import_archive, read_archive
from .jit import build as jit_build
from .console import Progress, table
from .model_config import ModelConfigWarning, parse_model_config
from .spec import MoESpec

log = logging.getLogger("moegen.deploy")

__all__ = ["BuildResult", "build_many", "expand_variants", "format_summary",
           "parse_model_config", "ModelConfigWarning", "export_archive", "import_archive",
           "extract_archive", "read_archive"]


@dataclass(frozen=True)
class BuildResult:
    """The outcome of building one variant.

    ``ok`` False means ``error`` holds ``"<ExceptionType>: <message>"`` (for a CompileError the
    first compiler diagnostic); ``built`` False with ``ok`` True means it was already cached.
    """
    spec: MoESpec
    name: str
    ok: bool
    built: bool = False
    seconds: float = 0.0
    key: str = ""
    entry: str = ""
    backend: str = ""
    target: str = ""
    error: str = ""


def expand_variants(specs: Iterable[MoESpec], archs: Iterable[str] | None = None) -> list[MoESpec]:
    """Each spec once per CUDA arch in ``archs``: a cuda (or auto) spec without an arch becomes
    one cuda spec per arch; c specs and specs with an arch are kept as they are.  Duplicates
    are dropped, order kept.  Raises SpecError for a malformed arch."""
    archs = list(archs or ())
    out: list[MoESpec] = []
    for spec in specs:
        if archs and spec.arch is None and spec.backend in ("cuda", "auto"):
            out.extend(spec.replace(backend="cuda", arch=a) for a in archs)
        else:
            out.append(spec)
    return list(dict.fromkeys(out))


def _run_one(build: Callable, spec: MoESpec) -> BuildResult:
    """Build one variant, turning any exception into a failed result (runs in a worker)."""
    t0 = time.perf_counter()
    try:
        info = build(spec)
    except Exception as exc:  # noqa: BLE001 - collected for the summary, not raised
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return BuildResult(spec, spec.name, False, seconds=time.perf_counter() - t0,
                           backend=spec.backend, target=spec.arch or "",
                           error=f"{type(exc).__name__}: {first}")
    return BuildResult(spec, getattr(info, "name", spec.name), True,
                       built=bool(getattr(info, "built", True)),
                       seconds=float(getattr(info, "seconds", time.perf_counter() - t0)),
                       key=getattr(info, "key", ""), entry=getattr(info, "entry", ""),
                       backend=getattr(info, "backend", spec.backend),
                       target=getattr(info, "target", spec.arch or ""))


def _state(r: BuildResult) -> str:
    return "FAILED" if not r.ok else ("built" if r.built else "cached")


def build_many(specs: Iterable[MoESpec], archs: Iterable[str] | None = None, jobs: int = 1,
               progress: bool = True, *, build: Callable | None = None) -> list[BuildResult]:
    """Build every spec (× every CUDA arch in ``archs``, see `expand_variants`) into the cache.

    Args:
        specs: the specs to build.
        archs: CUDA targets to cross cuda/auto specs with (e.g. ``["sm_90", "sm_90a"]``).
        jobs: parallel worker processes (spawned, so CUDA state is never forked); 1 builds
            in this process.
        progress: show a progress bar (rich on a terminal, else a line per variant) and the
            summary table on stderr.
        build: the function building one spec (default `moegen.jit.build`); it must be
            picklable (a module-level function) when ``jobs > 1``.

    Returns one BuildResult per variant, in order.  Failures are collected, never raised, so a
    caller can report them all and exit non-zero (``any(not r.ok for r in results)``).
    """
    build = jit_build if build is None else build
    variants = expand_variants(specs, archs)
    bar = Progress(len(variants), "moegen build", progress)
    t0 = time.perf_counter()
    results: list[BuildResult | None] = [None] * len(variants)
    try:
        if jobs <= 1 or len(variants) <= 1:
            for i, spec in enumerate(variants):
                results[i] = _run_one(build, spec)
                bar.advance(f"{_state(results[i])} {results[i].name}")
        else:
            _run_pool(build, variants, jobs, results, bar)
    finally:
        bar.close()
    out = [r for r in results if r is not None]
    if progress:
        print(format_summary(out, time.perf_counter() - t0), file=sys.stderr, flush=True)
    return out


def _run_pool(build, variants, jobs, results, bar) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(jobs, len(variants)), mp_context=ctx) as pool:
        futures = {pool.submit(_run_one, build, spec): i for i, spec in enumerate(variants)}
        try:
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    results[i] = fut.result()
                except BrokenProcessPool as exc:
                    results[i] = BuildResult(variants[i], variants[i].name, False,
                                             error=f"worker process died: {exc}")
                except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable build function
                    results[i] = BuildResult(variants[i], variants[i].name, False,
                                             error=f"{type(exc).__name__}: {exc}")
                bar.advance(f"{_state(results[i])} {results[i].name}")
        except KeyboardInterrupt:
            for fut in futures:
                fut.cancel()
            raise


def format_summary(results: list[BuildResult], seconds: float | None = None) -> str:
    """A table of the results (status, name, backend, target, entry, seconds, error) and a
    totals line."""
    lines = [table(("status", "name", "backend", "target", "entry", "seconds"),
                   [(_state(r), r.name, r.backend or "-", r.target or "-",
                     r.entry[len(r.name) + 1:] if r.entry else "-", f"{r.seconds:.2f}")
                    for r in results], right=[5])]
    failed = [r for r in results if not r.ok]
    built = sum(r.ok and r.built for r in results)
    total = f" in {seconds:.1f} s" if seconds is not None else ""
    lines.append(f"{len(results)} variants: {built} built, {len(results) - built - len(failed)} "
                 f"cached, {len(failed)} failed{total}")
    for r in failed:
        lines.append(f"FAILED {r.name} [{r.backend or '?'} {r.target or ''}]: {r.error}")
    return "\n".join(lines)
