"""The ``c`` backend: generated C compiled by the system C compiler, loaded with ctypes.

    plan(spec, tier, tuning) -> CPlan (moegen.backends.c_plan)
    render(plan) -> templates/c/moe.c.jinja -> compile (cc -O3 ... -shared) -> .so bytes
    load(artifact) -> CModule (moegen.backends.c_module)

The binary is built for an explicit ISA tier (`moegen.backends.isa`), never ``-march=native``,
and without ``-ffast-math`` (which would delete the NaN checks of the routing); its source is
rendered for that tier alone.  Threads come from OpenMP; the thread count is a call argument
(``MOEGEN_NUM_THREADS``).  Loading a binary needs no compiler.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from .. import __version__, settings
from ..errors import CompileError, SpecError
from ..render import render_template
from ..spec import MoESpec
from . import c_plan, isa
from .base import Artifact, Sources
from .c_module import CModule
from .c_plan import TUNABLES, CPlan

log = logging.getLogger("moegen.backends.c")

TEMPLATE = "c/moe.c.jinja"
SOURCE_NAME = "moe.c"
# Seconds a compile may take before we give up on the compiler.
_COMPILE_TIMEOUT = 600


class CompilerMissing(OSError):
    """The C compiler named by ``MOEGEN_CC`` (default ``cc``) is not on this machine."""


def _missing_message(cc: str) -> str:
    return (f"C compiler {cc!r} not found (MOEGEN_CC={os.environ.get('MOEGEN_CC', '')!r}): "
            f"install gcc or clang, or set MOEGEN_CC to one")


@functools.lru_cache(maxsize=8)
def _toolchain(cc: str) -> tuple[str, str]:
    """(resolved path, first line of ``cc --version``).  Raises CompilerMissing when ``cc`` is
    not found or does not run."""
    path = shutil.which(cc)
    if path is None:
        raise CompilerMissing(_missing_message(cc))
    path = os.path.realpath(path)
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise CompilerMissing(f"{_missing_message(cc)} ({exc})") from None
    first = (proc.stdout or proc.stderr).strip().splitlines()
    return path, first[0] if first else ""


class CBackend:
    """Backend protocol (`moegen.backends.base.Backend`) for CPUs."""

    name = "c"
    templates = (TEMPLATE,)

    # -- capability --------------------------------------------------------------------------
    def can_compile(self) -> bool:
        try:
            _toolchain(settings.cc())
            return True
        except CompilerMissing as exc:
            log.info("c backend cannot compile: %s", exc)
            return False

    def available(self) -> bool:
        if not self.can_compile():
            return False
        try:
            return isa.runnable(isa.resolve())
        except SpecError:
            return False

    # -- what gets built ---------------------------------------------------------------------
    def tunables(self, spec: MoESpec) -> dict[str, tuple]:
        """The template constants `moegen tune` may choose, with their allowed values."""
        return dict(TUNABLES)

    def target(self, spec: MoESpec) -> str:
        """The ISA tier to build for (``MOEGEN_ISA`` or detected)."""
        return isa.resolve().name

    def plan(self, spec: MoESpec, target: str | None = None, tuning: dict | None = None) -> CPlan:
        """The `CPlan` of ``spec`` for ISA tier ``target`` (None: `target(spec)`) with
        ``tuning`` applied.  Raises SpecError for an unknown tier, ValueError for a tuning
        that is not allowed."""
        return c_plan.make(spec, self.target(spec) if target is None else target, tuning)

    def render(self, plan) -> Sources:
        """The C source of a `CPlan` (or of a plan whose ``detail`` is one)."""
        plan = _detail(plan)
        text = render_template(TEMPLATE, **_context(plan))
        return Sources(backend=self.name, files={SOURCE_NAME: text}, entry=SOURCE_NAME)

    def toolchain(self) -> dict:
        """{"cc": resolved compiler path, "version": first line of ``cc --version``}; with no
        compiler here, {"cc": the name asked for, "version": "", "missing": why}: asking never
        raises, so a prebuilt kernel can be found and loaded without a compiler."""
        cc = settings.cc()
        try:
            path, version = _toolchain(cc)
        except CompilerMissing as exc:
            return {"cc": cc, "version": "", "missing": str(exc)}
        return {"cc": path, "version": version}

    def options(self, spec: MoESpec, target: str) -> list[str]:
        """The full flag list for ISA tier ``target`` (see `c_plan.options`)."""
        return list(c_plan.options(c_plan.tier_of(target)))

    # -- compile and load --------------------------------------------------------------------
    def compile(self, sources: Sources, spec: MoESpec, target: str, key: str) -> Artifact:
        """Compile the rendered source to a shared object in a private temp dir.

        Returns an Artifact with the .so bytes.  Raises CompileError (argv, log and source)
        when the compiler fails or is missing (then its message is one line naming the
        compiler and MOEGEN_CC).
        """
        opts = self.options(spec, target)
        try:
            cc_path, version = _toolchain(settings.cc())
        except CompilerMissing as exc:
            raise CompileError("c", spec.name, key, [settings.cc(), *opts], str(exc),
                               sources.text) from None
        with tempfile.TemporaryDirectory(prefix="moegen-cc-") as tmp:
            src = Path(tmp) / sources.entry
            src.write_text(sources.text, encoding="utf-8")
            out = Path(tmp) / "moe.so"
            argv = [cc_path, *opts, "-o", str(out), str(src), "-lm"]
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp,
                                      timeout=_COMPILE_TIMEOUT)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise CompileError("c", spec.name, key, argv, str(exc), sources.text) from None
            logtext = (proc.stdout or "") + (proc.stderr or "")
            if proc.returncode != 0 or not out.exists():
                raise CompileError("c", spec.name, key, argv, logtext, sources.text)
            binary = out.read_bytes()
        meta = {"backend": "c", "target": target, "options": opts,
                "toolchain": {"cc": cc_path, "version": version},
                "build_seconds": round(time.perf_counter() - t0, 4)}
        if logtext.strip():
            log.debug("cc output for %s:\n%s", spec.name, logtext)
        return Artifact(binary, meta)

    def load(self, artifact: Artifact, spec) -> CModule:
        """Write the bytes under a content-addressed name (dlopen hands back an already-loaded
        library for a path it has seen) in a private directory, and load them with ctypes.
        Needs no compiler.

        ``spec`` is the spec, or its plan (a `CPlan`, or a plan whose ``detail`` is one);
        given a spec, the plan is remade from ``artifact.meta`` (target, tuning).
        Returns a `moegen.backends.c_module.CModule`.  Raises RuntimeError when the binary's
        ISA tier is one this CPU cannot run; OSError, unchanged, when the library file cannot
        be written (ENOSPC: the binary is fine, the disk is not) or the bytes do not load.
        """
        plan = spec if isinstance(spec, MoESpec) else _detail(spec)
        if isinstance(plan, MoESpec):
            target = artifact.meta.get("target") or self.target(plan)
            plan = self.plan(plan, target, artifact.meta.get("tuning") or None)
        if not isa.runnable(isa.TIERS[plan.target]):
            # Calling into it would die of SIGILL; refuse while it is still an exception.
            raise RuntimeError(f"{plan.spec.name}: binary built for ISA tier {plan.target!r}, "
                               f"which this CPU cannot run (it runs {isa.detect()!r}); unset "
                               f"MOEGEN_ISA or set it to a tier this CPU has")
        return CModule(plan, write_library(artifact.binary))


def _detail(plan) -> CPlan:
    """The CPlan of a CPlan or of a plan that carries one as ``detail``."""
    detail = getattr(plan, "detail", plan)
    if not isinstance(detail, CPlan):
        raise TypeError(f"c backend needs a CPlan (or a plan whose detail is one), got "
                        f"{type(detail).__name__}")
    return detail


def _context(plan: CPlan) -> dict:
    return {"p": plan, "s": plan.spec, "dt": plan.spec.dt, "version": __version__}


@functools.lru_cache(maxsize=1)
def _library_dir() -> Path:
    """A private (0700) directory for this process's loaded libraries, removed at exit."""
    d = Path(tempfile.mkdtemp(prefix="moegen-so-"))
    atexit.register(shutil.rmtree, d, True)
    return d


def library_name(binary: bytes) -> str:
    """``moegen_<sha256[:20]>.so``: the file name a binary is loaded from."""
    return f"moegen_{hashlib.sha256(binary).hexdigest()[:20]}.so"


def write_library(binary: bytes, directory: Path | None = None) -> Path:
    """The path of ``binary`` in the private library dir (or ``directory``), written (0700)
    if not there yet.  Written to a temporary name, then renamed, so a reader never sees a
    partial file; on any failure (ENOSPC on a full TMPDIR, say) the partial file is removed
    and the OSError propagates unchanged."""
    path = (directory or _library_dir()) / library_name(binary)
    if path.exists():
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
        with os.fdopen(fd, "wb") as fh:
            fh.write(binary)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
