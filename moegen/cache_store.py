"""The writable store of the kernel cache: a diskcache.Cache that holds bytes only and never
leaves its directory, its read-only fallback, raw row access and the per-key build locks.

diskcache 5.6.3 trusts its SQLite table: it unpickles rows that say they are pickled, opens and
deletes whatever path a row's ``filename`` names (absolute or with ``..``, and then its empty
parent folders), and passes every ``disk_*`` row of its Settings table to the Disk.  Here:

- `SafeDisk` refuses pickled rows, reads and deletes only ``xx/yy/<28 hex>.val`` files that
  resolve inside the cache directory, opens them without following links or blocking on a FIFO,
  and makes every folder and file it creates private (0700/0600) whatever the umask;
- `settings_problem` refuses a Settings table holding keys moegen does not write, and
  `open_store` passes every setting explicitly so a planted value of a known key is overridden;
- `ReadOnlyStore` reads an existing cache whose database cannot be opened for writing (a full
  disk): entries still load, new kernels are kept in memory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sqlite3
import stat
import threading
import time
from pathlib import Path

import diskcache

from . import trust
from .cache_format import CorruptEntry, PickledEntryRefused, open_regular

DEFAULT_SIZE_LIMIT = 8 << 30     # diskcache evicts least-recently-stored entries beyond this
STORE_SETTINGS = {**diskcache.DEFAULT_SETTINGS, "size_limit": DEFAULT_SIZE_LIMIT,
                  "eviction_policy": "least-recently-stored", "statistics": 0, "tag_index": 0}
KNOWN_SETTINGS = frozenset(diskcache.DEFAULT_SETTINGS) | frozenset(diskcache.core.METADATA)
ORPHAN_AGE = 60.0                # seconds: a younger unreferenced value file may be mid-store
LOCKS_DIR = "locks"
DB_FILES = ("cache.db", "cache.db-wal", "cache.db-shm")
_VALUE_RE = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{28}\.val$")


def value_path(directory: str | Path, filename) -> str:
    """The absolute path of a value file named by a row, or CorruptEntry when the name is not
    one diskcache makes (``xx/yy/<28 hex>.val``) or resolves outside ``directory``."""
    root = os.path.realpath(directory)
    if not isinstance(filename, str) or not _VALUE_RE.match(filename):
        raise CorruptEntry(f"refused a cache row whose value file name {filename!r:.80} is not "
                           f"one moegen writes (planted row)")
    full = os.path.join(root, filename)
    if os.path.commonpath([root, os.path.realpath(full)]) != root:
        raise CorruptEntry(f"refused a cache row whose value file {filename} resolves outside "
                           f"{root}")
    return full


class RefusedKey:
    """Stands in for a key row that claims to be pickled; listings skip it."""

    def __repr__(self) -> str:
        return "<refused pickled key>"


REFUSED_KEY = RefusedKey()


class SafeDisk(diskcache.Disk):
    """A `diskcache.Disk` for str keys and bytes values only (see the module docstring)."""

    def __init__(self, directory, min_file_size=STORE_SETTINGS["disk_min_file_size"],
                 pickle_protocol=STORE_SETTINGS["disk_pickle_protocol"], **_planted):
        # ``_planted``: disk_* rows of a Settings table moegen did not write (refused earlier
        # by `settings_problem`; ignored here so a race cannot raise a raw TypeError).
        super().__init__(directory, min_file_size=min_file_size, pickle_protocol=pickle_protocol)

    def put(self, key):
        if type(key) is not str:
            raise TypeError(f"moegen's cache stores str keys only, got {type(key).__name__}")
        return super().put(key)

    def get(self, key, raw):
        return super().get(key, raw) if raw else REFUSED_KEY

    def filename(self, key=diskcache.core.UNKNOWN, value=diskcache.core.UNKNOWN):
        filename, full_path = super().filename(key, value)
        top = os.path.join(self._directory, filename.split(os.sep)[0])
        if os.path.islink(top) or os.path.islink(os.path.dirname(full_path)):
            raise OSError(errno.EPERM, f"the cache folder for {filename} is a link (planted); "
                                       f"nothing is written through it")
        os.makedirs(os.path.dirname(full_path), mode=0o700, exist_ok=True)
        for folder in (top, os.path.dirname(full_path)):     # private whatever the umask
            os.chmod(folder, 0o700)
        return filename, full_path

    def store(self, value, read, key=diskcache.core.UNKNOWN):
        if read or type(value) is not bytes:
            raise TypeError(f"moegen's cache stores bytes values only, got {type(value).__name__}")
        size, mode, filename, db_value = super().store(value, read, key=key)
        if filename is not None:
            os.chmod(os.path.join(self._directory, filename), 0o600)   # before the row exists
        return size, mode, filename, db_value

    def fetch(self, mode, filename, value, read):
        if mode not in (diskcache.core.MODE_RAW, diskcache.core.MODE_BINARY):
            raise PickledEntryRefused(
                f"refused a cache row stored in diskcache mode {mode} (pickle or text); moegen "
                f"only stores bytes, so the row was planted or written by another program")
        if mode == diskcache.core.MODE_RAW:
            return super().fetch(mode, filename, value, read)
        fh = open_regular(value_path(self._directory, filename))
        if read:
            return fh
        with fh:
            return fh.read()

    def remove(self, file_path):
        try:
            full = value_path(self._directory, file_path)
        except CorruptEntry:
            return                     # never delete what a planted row names
        with contextlib.suppress(OSError):
            os.remove(full)
        for folder in (os.path.dirname(full), os.path.dirname(os.path.dirname(full))):
            with contextlib.suppress(OSError):
                os.rmdir(folder)      # only the two levels diskcache made, only when empty


def settings_problem(directory: Path) -> str | None:
    """Why the Settings table of an existing cache must not be used, or None."""
    db = directory / "cache.db"
    if not db.exists():
        return None
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.Error:
        return None                    # opening it for real reports the problem
    try:
        rows = con.execute("SELECT key, value FROM Settings").fetchall()
    except sqlite3.Error:
        return None
    finally:
        con.close()
    for key, value in rows:
        if key not in KNOWN_SETTINGS or (key in diskcache.core.METADATA and type(value) is not int):
            return (f"its database holds a Settings row moegen does not write ({key!r:.80}); "
                    f"move or delete {directory} to start afresh")
    return None


def open_store(directory: Path) -> diskcache.Cache:
    return diskcache.Cache(str(directory), disk=SafeDisk, **STORE_SETTINGS)


class ReadOnlyStore:
    """The subset of `diskcache.Cache` that KernelCache uses, reading an existing database
    read-only; every write raises OSError(EROFS), which `KernelCache.put` turns into a warning."""

    def __init__(self, directory: Path):
        self._disk = SafeDisk(str(directory))
        self._lock = threading.Lock()
        db = directory / "cache.db"
        try:
            self._con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, check_same_thread=False)
            self._con.execute("SELECT 1 FROM Cache LIMIT 1").fetchall()
        except sqlite3.Error:
            self._con = sqlite3.connect(f"file:{db}?immutable=1", uri=True,
                                        check_same_thread=False)
            self._con.execute("SELECT 1 FROM Cache LIMIT 1").fetchall()

    def get(self, skey: str, read: bool = False, **_):
        with self._lock:
            row = self._con.execute("SELECT mode, filename, value FROM Cache WHERE key = ? AND "
                                    "raw = 1", (skey,)).fetchone()
        return None if row is None else self._disk.fetch(*row, read)

    def iterkeys(self):
        with self._lock:
            rows = self._con.execute("SELECT key, raw FROM Cache ORDER BY rowid").fetchall()
        return (self._disk.get(key, raw) for key, raw in rows)

    def _refuse(self, *_, **__):
        raise OSError(errno.EROFS, "the kernel cache database is open read-only")

    set = delete = clear = _refuse

    def close(self) -> None:
        with self._lock:
            self._con.close()


def read_value(store, skey: str) -> bytes | None:
    """The frame stored under ``skey`` (None when absent); `SafeDisk.fetch` has checked the
    value file (inside the cache, a trusted regular file)."""
    value = store.get(skey, read=True)
    if value is None or isinstance(value, bytes):
        return value
    if not hasattr(value, "read"):
        raise CorruptEntry(f"row holds {type(value).__name__}, not bytes")
    with value as fh:
        return fh.read()


def refused_rows(directory: Path) -> list[tuple[int, str]]:
    """Rows moegen never writes (pickled keys or values, text values, value files outside the
    cache), read without unpickling or opening anything they name."""
    db = directory / "cache.db"
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT rowid, raw, mode, filename FROM Cache").fetchall()
    except sqlite3.Error:
        return []
    finally:
        con.close()
    out = []
    for rowid, raw, mode, filename in rows:
        if raw == 0 or mode not in (diskcache.core.MODE_RAW, diskcache.core.MODE_BINARY):
            out.append((rowid, f"planted row (key raw={raw}, value mode={mode}): moegen stores "
                               f"only str keys and bytes values; refused without unpickling"))
        elif filename is not None:
            try:
                value_path(directory, filename)
            except CorruptEntry as exc:
                out.append((rowid, str(exc)))
    return out


def delete_row(directory: Path, rowid: int) -> None:
    """Delete one row by id, never touching the file it names."""
    con = sqlite3.connect(str(directory / "cache.db"), timeout=60)
    try:
        with con:
            con.execute("DELETE FROM Cache WHERE rowid = ?", (rowid,))
    finally:
        con.close()


def orphan_files(directory: Path, min_age: float = ORPHAN_AGE) -> list[Path]:
    """Value files no row names (left by a store that a full disk or a kill interrupted), older
    than ``min_age`` seconds; only diskcache-shaped names inside the cache, never links."""
    db = directory / "cache.db"
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        named = {r[0] for r in con.execute("SELECT filename FROM Cache WHERE filename IS NOT NULL")}
    except sqlite3.Error:
        return []
    finally:
        con.close()
    now, out = time.time(), []
    for top in sorted(directory.glob("[0-9a-f][0-9a-f]")):
        for path in sorted(top.glob("[0-9a-f][0-9a-f]/*.val")):
            rel = f"{top.name}/{path.parent.name}/{path.name}"
            try:
                value_path(directory, rel)          # no folder on the way is a link outside
                st = path.lstat()
            except (CorruptEntry, OSError):
                continue
            if (rel not in named and stat.S_ISREG(st.st_mode) and not top.is_symlink()
                    and not path.parent.is_symlink() and trust.check_stat(st, path) is None
                    and now - st.st_mtime >= min_age):
                out.append(path)
    return out


@contextlib.contextmanager
def key_lock(directory: Path, key: str, on_wait=None):
    """Hold ``locks/<key>.lock`` of the cache at ``directory`` (a cross-process build lock).

    ``on_wait()`` is called once when another process holds it.  `clear` never deletes the
    lock folder; should it vanish anyway, it is made again (0700) before each attempt.
    """
    import filelock  # ~13 ms of import that a warm lookup (no build, no lock) never needs
    locks = directory / LOCKS_DIR
    lock = filelock.FileLock(str(locks / f"{key}.lock"), timeout=-1, mode=0o600)
    waited = False
    while True:
        locks.mkdir(mode=0o700, exist_ok=True)
        try:
            lock.acquire(timeout=0 if not waited else 0.05)
            break
        except filelock.Timeout:
            if not waited and on_wait is not None:
                on_wait()
            waited = True
        except FileNotFoundError:
            continue
    try:
        yield
    finally:
        lock.release()
