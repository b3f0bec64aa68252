"""The kernel cache: compiled binaries keyed by everything that changes them.

Layout of the writable cache directory (``$MOEGEN_CACHE_DIR``, created 0700)::

    cache.db, cache.db-wal, 00/ ... ff/    a diskcache.Cache (SQLite index + value files);
                                           key "<spec name>.<sha256 key>" -> entry frame (bytes)
    locks/<key>.lock                       per-key file locks held while one process builds

Read-only prebuilt layers (``$MOEGEN_PREBUILT_DIR``, os.pathsep-separated) are unpacked export
archives (`moegen.cache_layers`), searched before the writable cache and never modified.

The rooms: `moegen.cache_format` (the entry frame, bounded reads), `moegen.cache_store` (the
diskcache store that keeps to its directory, locks), `moegen.cache_layers` (prebuilt layers and
their signatures), `moegen.cache_maint` (ls, prune, verify, clear), `moegen.cache_load` (why a
load failed), `moegen.archive` (export/import).  This module opens, looks up and publishes.

Failure contract, in short: a bad entry is a miss (warned once, dropped from the writable
layer, rebuilt); an untrusted cache directory is replaced by a private temporary one for this
process; a database that cannot be opened for writing (full disk) is read read-only; a full disk
leaves the freshly built kernel usable in memory.  Only offline mode (`MissingKernelError`) and
a build that returns something other than an `Artifact` (`CacheError`) raise.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import diskcache

from . import settings, signing
from .backends.base import Artifact
from .cache_format import (CorruptEntry, PickledEntryRefused, canonical_json, check_name_key,
                           decode, encode, entry_name, validate_artifact)
from .cache_layers import PrebuiltLayer
from .cache_load import is_bad_binary, load_failure
from .cache_maint import WRITABLE, CacheMaintenance, EntryInfo, Problem
from .cache_store import (DEFAULT_SIZE_LIMIT, ReadOnlyStore, key_lock, open_store,
                          prepare_directory, read_value)
from .errors import MissingKernelError

log = logging.getLogger("moegen.cache")

CACHE_FORMAT = 1                 # bump when the frame or store layout changes (also in the key)

__all__ = ["CACHE_FORMAT", "DEFAULT_SIZE_LIMIT", "CacheWarning", "EntryInfo", "KernelCache",
           "Problem", "WRITABLE", "default_cache", "digest", "is_bad_binary"]


class CacheWarning(UserWarning):
    """A cache entry or directory was not used; the kernel is rebuilt or kept in memory."""


def digest(parts: dict) -> str:
    """sha256 hex of the canonical JSON of ``parts`` (sorted keys, no spaces, no NaN).

    Raises TypeError for values JSON cannot represent, so a key never silently omits a part.
    """
    return hashlib.sha256(canonical_json(parts)).hexdigest()


_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once(tag: str, message: str) -> None:
    """Log and `warnings.warn` a cache problem the first time this process meets it."""
    with _warned_lock:
        first = tag not in _warned
        _warned.add(tag)
    if first:
        log.warning("%s", message)
        warnings.warn(message, CacheWarning, stacklevel=3)
    else:
        log.debug("%s", message)


def _private_tempdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="moegen-cache-"))      # mkdtemp creates it 0700
    atexit.register(shutil.rmtree, path, True)
    return path


class KernelCache(CacheMaintenance):
    """Compiled kernels on disk: read-only prebuilt layers first, then the writable cache.

    Args:
        directory: the writable cache (default ``moegen.settings.cache_dir()``).
        prebuilt: read-only layers searched first (default ``moegen.settings.prebuilt_dirs()``).

    Construction does no I/O; the directory is created, checked and opened on first use.
    """

    def __init__(self, directory: Path | None = None, prebuilt: list[Path] | None = None):
        self._requested = Path(directory if directory is not None else settings.cache_dir())
        self._layers = [PrebuiltLayer(Path(p)) for p in
                        (prebuilt if prebuilt is not None else settings.prebuilt_dirs())]
        self._store = None
        self._dir: Path | None = None
        self._trusted: bool | None = None
        self._why_untrusted: str | None = None
        self._open_lock = threading.Lock()
        self._shadowed: set[str] = set()    # keys dropped this process: skip prebuilt copies

    # -- opening ----------------------------------------------------------------------------
    @property
    def requested_directory(self) -> Path:
        """The directory asked for (the effective one may be a private fallback)."""
        return self._requested

    @property
    def directory(self) -> Path:
        """The writable directory in use (opens the cache)."""
        self._open()
        return self._dir

    @property
    def trusted(self) -> bool:
        """False when the requested directory was refused and a private temp dir is used."""
        self._open()
        return bool(self._trusted)

    @property
    def untrusted_reason(self) -> str | None:
        self._open()
        return self._why_untrusted

    @property
    def prebuilt(self) -> list[Path]:
        return [layer.root for layer in self._layers]

    def layer_status(self) -> list[tuple[Path, str | None]]:
        """Each prebuilt layer and why it is skipped (None when it is used)."""
        return [(layer.root, layer.problem()) for layer in self._layers]

    def _open(self):
        if self._store is not None:
            return self._store
        with self._open_lock:
            if self._store is None:
                self._store = self._open_store()
        return self._store

    def _open_store(self):
        reason = prepare_directory(self._requested)
        if reason is None:
            try:
                store = open_store(self._requested)
                self._dir, self._trusted = self._requested, True
                return store
            except (OSError, sqlite3.Error) as exc:
                reason = (f"its database cannot be opened ({exc}); move or delete "
                          f"{self._requested} to start afresh")
                store = self._read_only(exc)
                if store is not None:
                    return store
        fallback = _private_tempdir()
        _warn_once(f"untrusted:{self._requested}",
                   f"moegen kernel cache: not using {self._requested}: {reason}. Kernels are "
                   f"built into a private temporary cache {fallback} for this process only. "
                   f"Set MOEGEN_CACHE_DIR to a directory you own with mode 0700.")
        self._why_untrusted, self._dir, self._trusted = reason, fallback, False
        return open_store(fallback)

    def _read_only(self, exc: BaseException):
        """The trusted cache read read-only when its database cannot be opened for writing
        (a full disk): its entries still load.  None when even that fails."""
        try:
            store = ReadOnlyStore(self._requested)
        except (OSError, sqlite3.Error):
            return None
        _warn_once(f"readonly:{self._requested}",
                   f"moegen kernel cache: {self._requested} is used read-only ({exc}): cached "
                   f"kernels load, new ones are kept in memory for this process. Free space or "
                   f"run `moegen cache prune`.")
        self._dir, self._trusted = self._requested, True
        return store

    def close(self) -> None:
        """Close the SQLite connection (reopened on next use)."""
        if self._store is not None:
            self._store.close()

    # -- lookups ----------------------------------------------------------------------------
    def get(self, name: str, key: str) -> Artifact | None:
        """The cached artifact for (name, key), or None.

        Prebuilt layers are searched first, then the writable cache.  Every entry is checked
        (sha256, length, name and key); a bad one is warned about once, dropped from the writable
        cache (prebuilt layers are never modified) and reported as a miss.  Never raises for a
        bad entry; raises ValueError for a malformed name or key.
        """
        check_name_key(name, key)
        if key not in self._shadowed:
            for layer in self._layers:
                art = self._get_prebuilt(layer, name, key)
                if art is not None:
                    return art
        return self._get_writable(name, key)

    def _get_prebuilt(self, layer: PrebuiltLayer, name: str, key: str) -> Artifact | None:
        problem = layer.problem()
        if problem:
            _warn_once(f"layer:{layer.root}", f"moegen kernel cache: skipping prebuilt layer "
                                              f"{layer.root}: {problem}")
            return None
        try:
            return layer.get(name, key)
        except CorruptEntry as exc:
            _warn_once(f"bad:{layer.root}:{key}",
                       f"moegen kernel cache: prebuilt entry {entry_name(name, key)} in "
                       f"{layer.root} is not usable ({exc}); it is left in place and the "
                       f"kernel is looked up in the writable cache or rebuilt")
            return None

    def _get_writable(self, name: str, key: str) -> Artifact | None:
        store = self._open()
        skey = f"{name}.{key}"
        try:
            data = read_value(store, skey)
            return None if data is None else decode(data, name, key)
        except (CorruptEntry, PickledEntryRefused) as exc:
            self._discard(name, key, str(exc))
            return None
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            _warn_once(f"read:{self._dir}",
                       f"moegen kernel cache: cannot read {self._dir} ({exc}); treating "
                       f"{entry_name(name, key)} as missing")
            return None

    def _discard(self, name: str, key: str, reason: str) -> None:
        _warn_once(f"bad:{self._dir}:{key}",
                   f"moegen kernel cache: dropping {entry_name(name, key)} from {self._dir}: "
                   f"{reason}; it will be rebuilt")
        self._delete(f"{name}.{key}")

    def _delete(self, skey: str) -> bool:
        try:
            return bool(self._open().delete(skey, retry=True))
        except (OSError, sqlite3.Error) as exc:
            log.warning("moegen kernel cache: could not delete %s: %s", skey, exc)
            return False

    def put(self, name: str, key: str, artifact: Artifact) -> bool:
        """Store an artifact in the writable cache (atomically: readers see all of it or none).

        Returns False, after a warning, when it could not be stored (disk full, read-only
        file system...): the caller keeps the in-memory kernel.  Raises ValueError for a
        malformed name or key, CacheError for an artifact that is not bytes + JSON.
        """
        check_name_key(name, key)
        artifact = validate_artifact(artifact, name, key)
        if "created" not in artifact.meta:          # prune goes by it
            artifact = Artifact(artifact.binary, {**artifact.meta, "created": time.time()})
        return self.put_frame(name, key, encode(name, key, artifact))

    def put_frame(self, name: str, key: str, frame: bytes) -> bool:
        """Store an already checked frame (an imported archive member) as it is; see `put`."""
        check_name_key(name, key)
        store = self._open()
        try:
            store.set(f"{name}.{key}", bytes(frame), retry=True)
            return True
        except (OSError, sqlite3.Error) as exc:
            full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) \
                or "full" in str(exc).lower()
            what = "the disk is full" if full else f"{exc.__class__.__name__}: {exc}"
            _warn_once(f"put:{self._dir}:{'full' if full else type(exc).__name__}",
                       f"moegen kernel cache: could not store {entry_name(name, key)} in "
                       f"{self._dir} ({what}); the kernel is kept in memory for this process "
                       f"and will be rebuilt next time. Free space or run `moegen cache prune`.")
            return False

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
            (self._dir / "locks").mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            log.warning("moegen kernel cache: no lock directory in %s (%s); building %s "
                        "without a cross-process lock", self._dir, exc, entry_name(name, key))
            return contextlib.nullcontext()
        return key_lock(self._dir, key, on_wait=lambda: log.info(
            "waiting for another process to finish building %s", entry_name(name, key)))

    def drop(self, name: str, key: str, reason: str) -> None:
        """Forget an entry that turned out unusable (e.g. the binary failed to load).

        The writable copy is deleted; a prebuilt copy is left in place but skipped for the rest
        of this process, so the caller's rebuild is what the next `get` returns.
        """
        check_name_key(name, key)
        self._shadowed.add(key)
        _warn_once(f"drop:{key}", f"moegen kernel cache: dropping {entry_name(name, key)}: "
                                  f"{reason}; it will be rebuilt")
        self._delete(f"{name}.{key}")

    def drop_if_bad(self, name: str, key: str, exc: BaseException) -> bool:
        """Drop (name, key) only when ``exc``, raised while loading its binary, blames the
        binary (`is_bad_binary`); returns whether it was dropped.  An OS or resource error
        (ENOSPC, EMFILE, EACCES in TMPDIR, no usable GPU...) keeps the entry and is logged in
        one line: the caller should then raise it, not rebuild."""
        check_name_key(name, key)
        if is_bad_binary(exc):
            self.drop(name, key, f"failed to load: {type(exc).__name__}: "
                                 f"{(str(exc).splitlines() or [''])[0][:200]}")
            return True
        log.warning("%s", load_failure(entry_name(name, key), exc))
        return False

    def __repr__(self) -> str:
        return f"KernelCache({str(self._requested)!r}, prebuilt={[str(p) for p in self.prebuilt]})"


_default: KernelCache | None = None
_default_sig: tuple | None = None
_default_lock = threading.Lock()


def default_cache() -> KernelCache:
    """The process's cache for the current settings; a new one when ``MOEGEN_CACHE_DIR``,
    ``MOEGEN_PREBUILT_DIR`` or ``MOEGEN_TRUSTED_KEYS`` changed since the last call."""
    global _default, _default_sig
    sig = (str(settings.cache_dir()), tuple(str(p) for p in settings.prebuilt_dirs()),
           os.environ.get(signing.TRUSTED_KEYS_ENV, ""))
    with _default_lock:
        if _default is None or sig != _default_sig:
            _default = KernelCache(Path(sig[0]), [Path(p) for p in sig[1]])
            _default_sig = sig
        return _default
