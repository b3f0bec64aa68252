"""Exceptions raised by moegen.

Every error a user can meet is one of these (or a plain ``ValueError``/``TypeError`` for bad call
arguments).  They carry enough context to act on without a debugger: the spec's name, the cache
key, the compiler command and log.  All of them survive pickling, so they cross process pools.
"""

from __future__ import annotations

import os
import tempfile


class MoegenError(Exception):
    """Base class of moegen's own errors."""


class SpecError(MoegenError, ValueError):
    """A `MoESpec` field is out of range or inconsistent with another field."""


class TemplateError(MoegenError):
    """A Jinja template failed to load or render; the message names the file and line."""

    def __init__(self, message: str, template: str | None = None, lineno: int | None = None):
        super().__init__(message)
        self.template = template
        self.lineno = lineno

    def __reduce__(self):
        return (type(self), (self.args[0], self.template, self.lineno))


class CompileError(MoegenError):
    """A backend compiler rejected a rendered source.

    Attributes: ``backend``, ``spec_name``, ``key``, ``command`` (the options or argv),
    ``log`` (the compiler's output), ``source`` (the rendered text) and ``source_path`` (where
    the source was saved for inspection, or None).  ``str(err)`` shows the first diagnostic;
    ``err.dump()`` returns a numbered listing of the source followed by the whole log.
    """

    def __init__(self, backend: str, spec_name: str, key: str, command, log: str, source: str,
                 source_path: str | None = None):
        self.backend = backend
        self.spec_name = spec_name
        self.key = key
        self.command = list(command) if command is not None else []
        self.log = log or ""
        self.source = source or ""
        self.source_path = source_path
        super().__init__(self._summary())

    def _summary(self) -> str:
        first = _first_diagnostic(self.log)
        where = f"; source saved to {self.source_path}" if self.source_path else ""
        return (f"{self.backend} compile of {self.spec_name} (key {self.key[:16]}) failed: {first}"
                f"{where}. Call .dump() for the numbered source and full log.")

    def dump(self) -> str:
        width = len(str(self.source.count("\n") + 1))
        listing = "\n".join(f"{i:>{width}} | {line}"
                            for i, line in enumerate(self.source.splitlines(), start=1))
        return (f"=== {self.backend} compile of {self.spec_name} ===\n"
                f"command: {' '.join(map(str, self.command))}\n"
                f"--- source ---\n{listing}\n--- log ---\n{self.log}")

    def save_source(self, directory: str | None = None, suffix: str = ".src") -> str:
        """Write the source to a private file and remember its path."""
        fd, path = tempfile.mkstemp(prefix=f"moegen-{self.spec_name}-", suffix=suffix, dir=directory)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.source)
        self.source_path = path
        self.args = (self._summary(),)
        return path

    def __reduce__(self):
        return (type(self), (self.backend, self.spec_name, self.key, self.command, self.log,
                             self.source, self.source_path))


class CacheError(MoegenError):
    """The kernel cache cannot be used as asked (unwritable, untrusted, bad archive...)."""


class BackendUnavailable(MoegenError, RuntimeError):
    """The backend's toolchain is missing here (no C compiler, no CuPy/NVRTC) and the kernel is
    in no cache or prebuilt layer."""


class DeviceError(MoegenError, RuntimeError):
    """A good kernel cannot run here: no usable GPU or driver, or no room to load it.  The
    cached entry is kept."""


class MissingKernelError(MoegenError):
    """Offline mode (``MOEGEN_OFFLINE=1``) and the variant is neither cached nor prebuilt."""


def _first_diagnostic(log: str) -> str:
    for line in (log or "").splitlines():
        low = line.lower()
        if "error" in low:
            return line.strip()
    lines = [l.strip() for l in (log or "").splitlines() if l.strip()]
    return lines[0] if lines else "no compiler output"


def exception_chain(exc: BaseException | None):
    """``exc``, then its cause or context, and so on (each exception once)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__
