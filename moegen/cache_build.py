"""Building on a miss, once across processes: look up, take the per-key file lock, look up
again, build, validate, publish.  `BuildOnce` is a mixin of `moegen.cache.KernelCache` (it uses
its ``get``, ``put``, ``_open`` and ``_dir``).  Offline mode turns a miss into
`MissingKernelError` naming the command that builds the kernel.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Callable

from . import settings
from .backends.base import Artifact
from .cache_format import check_name_key, entry_name, validate_artifact
from .cache_store import LOCKS_DIR, key_lock
from .errors import MissingKernelError

log = logging.getLogger("moegen.cache")


class BuildOnce:
    """``get_or_build``: N processes asking for the same cold key build it once."""

    def get_or_build(self, name: str, key: str, build: Callable[[], Artifact], *,
                     hint: str = "") -> tuple[Artifact, bool]:
        """The cached artifact, or one built by ``build()`` and published; ``(artifact, built)``.

        Check, take the per-key file lock, check again, build, validate, publish: N processes
        asking for the same cold key build it once, and the others wait and read it.
        ``MOEGEN_ALWAYS_COMPILE=1`` skips the lookups (the new build is still stored).

        Raises MissingKernelError on a miss when ``MOEGEN_OFFLINE=1`` (``hint``: the arguments
        or command line that builds it, shown in the message); CacheError when ``build``
        returns something that is not an Artifact for this key; whatever ``build`` raises.
        """
        check_name_key(name, key)
        if settings.offline():
            art = self.get(name, key)
            if art is not None:
                return art, False
            raise MissingKernelError(self._offline_message(name, key, hint))
        rebuild = settings.always_compile()
        if not rebuild:
            art = self.get(name, key)
            if art is not None:
                return art, False
        with self._key_lock(name, key):
            if not rebuild:
                art = self.get(name, key)
                if art is not None:
                    return art, False
            start = time.perf_counter()
            art = validate_artifact(build(), name, key)
            log.info("built %s in %.2f s", entry_name(name, key), time.perf_counter() - start)
            self.put(name, key, art)
            return art, True

    def _offline_message(self, name: str, key: str, hint: str) -> str:
        cmd = hint.strip() or "<spec options>"
        if not cmd.startswith("moegen "):
            cmd = f"moegen build {cmd}"
        layers = os.pathsep.join(map(str, self.prebuilt)) or "none"
        return (f"kernel {name} (key {key[:16]}) is not in the kernel cache {self._requested} "
                f"nor in any prebuilt layer (MOEGEN_PREBUILT_DIR: {layers}), and MOEGEN_OFFLINE=1 "
                f"forbids compiling it. On a machine that can compile, run `{cmd}`, then "
                f"`moegen cache export kernels.tar.gz` and here `moegen cache import "
                f"kernels.tar.gz` (or unpack it with `moegen cache import --prebuilt DIR` and "
                f"point MOEGEN_PREBUILT_DIR at DIR); or unset MOEGEN_OFFLINE.")

    def _key_lock(self, name: str, key: str):
        self._open()
        try:
            (self._dir / LOCKS_DIR).mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            log.warning("moegen kernel cache: no lock directory in %s (%s); building %s "
                        "without a cross-process lock", self._dir, exc, entry_name(name, key))
            return contextlib.nullcontext()
        return key_lock(self._dir, key, on_wait=lambda: log.info(
            "waiting for another process to finish building %s", entry_name(name, key)))

