"""Planting rows straight into a kernel cache's diskcache database, as an attacker who can write
the cache directory would (shared by the cache security tests)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import diskcache


def plant(directory: Path, *, key, raw: int = 1, mode: int = diskcache.core.MODE_BINARY,
          value=None, filename=None) -> None:
    """One row of diskcache's ``Cache`` table under ``directory``, bypassing diskcache."""
    con = sqlite3.connect(str(directory / "cache.db"))
    now = time.time()
    with con:
        con.execute("INSERT INTO Cache (key, raw, store_time, expire_time, access_time, "
                    "access_count, tag, size, mode, filename, value) "
                    "VALUES (?, ?, ?, NULL, ?, 0, NULL, ?, ?, ?, ?)",
                    (key, raw, now, now, len(value or b""), mode, filename, value))
    con.close()
