"""Opening the writable kernel cache: create and check its directory, open its store, or fall
back: read-only when the database cannot be written (a full disk: existing entries still load),
a private temporary cache for this process when the directory is not trusted.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import trust
from .cache_store import DB_FILES, ReadOnlyStore, open_store, settings_problem


@dataclass(frozen=True)
class Opened:
    """What `open_writable` opened, and the one warning to show (tag, message) if any."""
    store: object
    directory: Path
    trusted: bool
    why_untrusted: str | None = None
    notice: tuple[str, str] | None = None


def prepare_directory(directory: Path) -> str | None:
    """Create the cache directory (0700) and its database (0600) if missing; say why the
    directory must not be used, or None."""
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
    for fname in DB_FILES:
        if os.path.lexists(directory / fname):
            reason = trust.check_path(directory / fname, what="cache database", kind="file")
            if reason:
                return reason
    return settings_problem(directory)


def private_tempdir() -> Path:
    """A 0700 temporary directory removed at exit."""
    path = Path(tempfile.mkdtemp(prefix="moegen-cache-"))      # mkdtemp creates it 0700
    atexit.register(shutil.rmtree, path, True)
    return path


def open_writable(requested: Path) -> Opened:
    """Open the cache at ``requested``: normally, read-only, or in a private fallback."""
    reason = prepare_directory(requested)
    if reason is None:
        try:
            return Opened(open_store(requested), requested, True)
        except (OSError, sqlite3.Error) as exc:
            reason = (f"its database cannot be opened ({exc}); move or delete {requested} to "
                      f"start afresh")
            try:
                return Opened(ReadOnlyStore(requested), requested, True, notice=(
                    f"readonly:{requested}",
                    f"moegen kernel cache: {requested} is used read-only ({exc}): cached "
                    f"kernels load, new ones are kept in memory for this process. Free space "
                    f"or run `moegen cache prune`."))
            except (OSError, sqlite3.Error):
                pass
    fallback = private_tempdir()
    return Opened(open_store(fallback), fallback, False, reason, notice=(
        f"untrusted:{requested}",
        f"moegen kernel cache: not using {requested}: {reason}. Kernels are built into a "
        f"private temporary cache {fallback} for this process only. Set MOEGEN_CACHE_DIR to a "
        f"directory you own with mode 0700."))
