"""The kernel cache (DESIGN §5): compiled binaries keyed by everything that changes them.

Layout of the writable cache directory (``$MOEGEN_CACHE_DIR``, created 0700)::

    cache.db, cache.db-wal, 00/ ... ff/    a diskcache.Cache (SQLite index + value files);
                                           key "<spec name>.<sha256 key>" -> entry frame (bytes)
    locks/<key>.lock                       per-key file locks held while one process builds

Read-only prebuilt layers (``$MOEGEN_PREBUILT_DIR``, os.pathsep-separated) are unpacked export
archives: ``manifest.json`` + ``entries/<spec name>.<key[:16]>.kernel``.  They are searched
before the writable cache and never modified.

Failure contract, in short: a bad entry is a miss (warned once, dropped from the writable
layer, rebuilt); an untrusted cache directory is replaced by a private temporary one for this
process; a full disk leaves the freshly built kernel usable in memory.  Only offline mode
(`MissingKernelError`) and a build that returns something other than an `Artifact`
(`CacheError`) raise.
"""

from __future__ import annotations

import atexit
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

from . import settings, trust
from .backends.base import Artifact
from .cache_store import (WRITABLE, CorruptEntry, EntryInfo, PickledEntryRefused, PrebuiltLayer,
                          Problem, REFUSED_KEY, SafeDisk, canonical_json, check_name_key, decode,
                          delete_row, entry_info, entry_name, encode, header_of, read_header,
                          read_value, refused_rows, validate_artifact)
from .errors import MissingKernelError

log = logging.getLogger("moegen.cache")

CACHE_FORMAT = 1                 # bump when the frame or store layout changes (also in the key)
DEFAULT_SIZE_LIMIT = 8 << 30     # diskcache evicts least-recently-stored entries beyond this


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


class KernelCache:
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
                reason = self._prepare(self._requested)
                store = None
                if reason is None:
                    try:
                        store = self._diskcache(self._requested)
                        self._dir = self._requested
                    except (OSError, sqlite3.Error) as exc:
                        reason = (f"its database cannot be opened ({exc}); move or delete "
                                  f"{self._requested} to start afresh")
                if store is None:
                    fallback = _private_tempdir()
                    _warn_once(f"untrusted:{self._requested}",
                               f"moegen kernel cache: not using {self._requested}: {reason}. "
                               f"Kernels are built into a private temporary cache {fallback} "
                               f"for this process only. Set MOEGEN_CACHE_DIR to a directory "
                               f"you own with mode 0700.")
                    self._why_untrusted = reason
                    self._dir = fallback
                    store = self._diskcache(fallback)
                self._trusted = reason is None
                self._store = store
        return self._store

    @staticmethod
    def _prepare(directory: Path) -> str | None:
        """Create the directory (0700) if missing and say why it must not be used, or None."""
        try:
            if not os.path.lexists(directory):
                directory.parent.mkdir(parents=True, exist_ok=True)
                directory.mkdir(mode=0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            return f"it cannot be created: {exc.strerror or exc}"
        reason = trust.check_path(directory, what="cache directory", kind="dir")
        if reason:
            return reason
        db = directory / "cache.db"
        if not os.path.lexists(db):
            # Create the database file 0600 ourselves (SQLite would honour the umask, and gives
            # its -wal/-shm files the database's mode).
            try:
                os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass
            except OSError as exc:
                return f"its database cannot be created: {exc.strerror or exc}"
        for fname in ("cache.db", "cache.db-wal", "cache.db-shm"):
            if os.path.lexists(directory / fname):
                reason = trust.check_path(directory / fname, what="cache database", kind="file")
                if reason:
                    return reason
        return None

    @staticmethod
    def _diskcache(directory: Path):
        import diskcache
        return diskcache.Cache(str(directory), disk=SafeDisk, size_limit=DEFAULT_SIZE_LIMIT,
                               eviction_policy="least-recently-stored", statistics=False)

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
        frame = encode(name, key, artifact)
        store = self._open()
        try:
            store.set(f"{name}.{key}", frame, retry=True)
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
        import contextlib

        import filelock
        self._open()
        locks = self._dir / "locks"
        try:
            locks.mkdir(mode=0o700, exist_ok=True)
            lock = filelock.FileLock(str(locks / f"{key}.lock"), timeout=-1)
        except OSError as exc:
            log.warning("moegen kernel cache: no lock directory in %s (%s); building %s "
                        "without a cross-process lock", self._dir, exc, entry_name(name, key))
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def held():
            try:
                lock.acquire(timeout=0)
            except filelock.Timeout:
                log.info("waiting for another process to finish building %s",
                         entry_name(name, key))
                lock.acquire()
            try:
                yield
            finally:
                lock.release()
        return held()

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

    # -- listing and maintenance --------------------------------------------------------------
    def _writable_rows(self):
        """(store key, name, key) of every well-formed writable row; refused rows skipped."""
        store = self._open()
        for skey in list(store.iterkeys()):
            if skey is REFUSED_KEY or not isinstance(skey, str) or "." not in skey:
                continue
            name, key = skey.rsplit(".", 1)
            yield skey, name, key

    def _writable_header(self, skey: str):
        value = self._open().get(skey, read=True)
        if value is None:
            return None
        if isinstance(value, bytes):
            return header_of(value)
        if not hasattr(value, "read"):
            raise CorruptEntry(f"row holds {type(value).__name__}, not bytes")
        with value as fh:
            return read_header(fh)

    def entries(self) -> list[EntryInfo]:
        """Every readable entry of every layer (prebuilt first), from the frame headers only.

        Rows that are not moegen frames (planted, pickled, unreadable) are skipped; `verify`
        reports them.
        """
        out: list[EntryInfo] = []
        for layer in self._layers:
            if layer.problem():
                continue
            for path in layer.files():
                try:
                    with open(path, "rb") as fh:
                        hdr = read_header(fh)
                except (OSError, CorruptEntry):
                    continue
                out.append(entry_info(hdr, path.stat().st_size, str(layer.root)))
        for skey, name, key in self._writable_rows():
            try:
                hdr = self._writable_header(skey)
            except (OSError, sqlite3.Error, diskcache.Timeout, CorruptEntry, PickledEntryRefused):
                continue
            if hdr is not None:
                out.append(entry_info(hdr, hdr.frame_size, WRITABLE))
        return out

    def clear(self) -> int:
        """Delete every entry of the writable cache (prebuilt layers untouched); returns the
        number of rows removed."""
        n = self._open().clear(retry=True)
        shutil.rmtree(self._dir / "locks", ignore_errors=True)
        return n

    def prune(self, older_than: float | None = None, max_size: int | None = None) -> int:
        """Delete writable entries built more than ``older_than`` seconds ago, then the oldest
        until the writable cache holds at most ``max_size`` bytes.  Returns how many went."""
        now = time.time()
        infos = sorted((e for e in self.entries() if e.writable), key=lambda e: e.created)
        removed = 0
        keep = []
        for e in infos:
            if older_than is not None and now - e.created > older_than:
                removed += self._delete(f"{e.name}.{e.key}")
            else:
                keep.append(e)
        if max_size is not None:
            total = sum(e.size for e in keep)
            for e in keep:
                if total <= max_size:
                    break
                if self._delete(f"{e.name}.{e.key}"):
                    removed += 1
                    total -= e.size
        return removed

    def verify(self, repair: bool = False) -> list[Problem]:
        """Check every entry completely (digests, names, ownership) and the directories.

        With ``repair``, bad writable entries and planted rows are deleted.  Returns the
        problems found (empty when all is well).
        """
        problems: list[Problem] = []
        store = self._open()
        if not self.trusted:
            problems.append(Problem(WRITABLE, str(self._requested),
                                    f"not used: {self._why_untrusted}"))
        for layer in self._layers:
            if layer.problem():
                problems.append(Problem(str(layer.root), "-", f"not used: {layer.problem()}"))
                continue
            problems += [Problem(str(layer.root), f, msg) for f, msg in layer.verify()]
        for rowid, detail in refused_rows(self._dir):
            problems.append(Problem(WRITABLE, f"row {rowid}", detail))
            if repair:
                delete_row(self._dir, rowid)
        for skey, name, key in self._writable_rows():
            try:
                check_name_key(name, key)
                value = read_value(store, skey)
                if value is not None:
                    decode(value, name, key)
            except PickledEntryRefused:
                continue                      # reported with the planted rows above
            except (OSError, sqlite3.Error, diskcache.Timeout, CorruptEntry, PickledEntryRefused,
                    ValueError) as exc:
                problems.append(Problem(WRITABLE, skey if len(skey) < 120 else skey[:120],
                                        str(exc)))
                if repair:
                    self._delete(skey)
        return problems

    def size(self) -> int:
        """Bytes used by the writable cache's entries."""
        return sum(e.size for e in self.entries() if e.writable)

    def __repr__(self) -> str:
        return f"KernelCache({str(self._requested)!r}, prebuilt={[str(p) for p in self.prebuilt]})"


_default: KernelCache | None = None
_default_sig: tuple | None = None
_default_lock = threading.Lock()


def default_cache() -> KernelCache:
    """The process's cache for the current settings; a new one when ``MOEGEN_CACHE_DIR`` or
    ``MOEGEN_PREBUILT_DIR`` changed since the last call."""
    global _default, _default_sig
    sig = (str(settings.cache_dir()), tuple(str(p) for p in settings.prebuilt_dirs()))
    with _default_lock:
        if _default is None or sig != _default_sig:
            _default = KernelCache(Path(sig[0]), [Path(p) for p in sig[1]])
            _default_sig = sig
        return _default
