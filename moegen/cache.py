"""The kernel cache: compiled binaries keyed by everything that changes them.

Layout of the writable cache directory (``$MOEGEN_CACHE_DIR``, created 0700)::

    cache.db, cache.db-wal, 00/ ... ff/    a diskcache.Cache (SQLite index + value files);
                                           key "<spec name>.<sha256 key>" -> entry frame (bytes)
    locks/<key>.lock                       per-key file locks held while one process builds

Read-only prebuilt layers (``$MOEGEN_PREBUILT_DIR``, os.pathsep-separated) are unpacked export
archives (`moegen.cache_layers`), searched before the writable cache and never modified.

The rooms: `moegen.cache_format` (the entry frame, bounded reads), `moegen.cache_store` (the
diskcache store that keeps to its directory, locks), `moegen.cache_open` (create, check, open or
fall back), `moegen.cache_build` (build once on a miss), `moegen.cache_layers` (prebuilt layers
and their signatures), `moegen.cache_maint` (ls, prune, verify, clear), `moegen.cache_load` (why
a load failed), `moegen.archive` (export/import).  This module looks up, publishes and drops.

Failure contract, in short: a bad entry is a miss (warned once, dropped from the writable
layer, rebuilt); an untrusted cache directory is replaced by a private temporary one for this
process; a database that cannot be opened for writing (full disk) is read read-only; a full disk
leaves the freshly built kernel usable in memory.  Only offline mode (`MissingKernelError`) and
a build that returns something other than an `Artifact` (`CacheError`) raise.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import sqlite3
import threading
import time
import warnings
from pathlib import Path

import diskcache

from . import settings
from .backends.base import Artifact
from .cache_build import BuildOnce
from .cache_format import (CorruptEntry, PickledEntryRefused, canonical_json, check_name_key,
                           decode, encode, entry_name, validate_artifact)
from .cache_layers import TRUSTED_KEYS_ENV, PrebuiltLayer
from .cache_load import is_bad_binary, load_failure
from .cache_maint import WRITABLE, CacheMaintenance, EntryInfo, Problem
from .cache_open import open_writable
from .cache_store import DEFAULT_SIZE_LIMIT, read_value

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


class KernelCache(BuildOnce, CacheMaintenance):
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
        opened = open_writable(self._requested)
        if opened.notice is not None:
            _warn_once(*opened.notice)
        self._dir, self._trusted = opened.directory, opened.trusted
        self._why_untrusted = opened.why_untrusted
        return opened.store

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
           os.environ.get(TRUSTED_KEYS_ENV, ""))
    with _default_lock:
        if _default is None or sig != _default_sig:
            _default = KernelCache(Path(sig[0]), [Path(p) for p in sig[1]])
            _default_sig = sig
        return _default
