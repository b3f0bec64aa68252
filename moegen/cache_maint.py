"""Listing and upkeep of the kernel cache: ls, prune, verify (and repair), clear, size.

`CacheMaintenance` is a mixin of `moegen.cache.KernelCache`; it uses the cache's store
(``_open``), layers (``_layers``), directory (``_dir``) and ``_delete``.  Nothing here follows a
file name a row holds: value files are reached only through `SafeDisk`, planted rows are
deleted by row id, and orphan value files are found by their diskcache-shaped names inside the
cache directory.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from dataclasses import dataclass, field

import diskcache

from .cache_format import (CorruptEntry, PickledEntryRefused, check_name_key, decode, entry_name,
                           header_of, read_header, shorten)
from .cache_store import REFUSED_KEY, delete_row, orphan_files, read_value, refused_rows

WRITABLE = "cache"               # EntryInfo.layer of the writable cache
_READ_ERRORS = (OSError, sqlite3.Error, diskcache.Timeout, CorruptEntry, PickledEntryRefused)


@dataclass(frozen=True)
class EntryInfo:
    """One cached kernel, as listed by `KernelCache.entries`."""
    name: str
    key: str
    backend: str
    target: str
    size: int                    # bytes of the stored frame
    created: float               # unix time of the build (or of storing)
    layer: str                   # "cache" or the prebuilt directory
    meta: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def entry(self) -> str:
        return entry_name(self.name, self.key)

    @property
    def writable(self) -> bool:
        return self.layer == WRITABLE


@dataclass(frozen=True)
class Problem:
    """One finding of `KernelCache.verify`."""
    layer: str
    entry: str
    message: str

    def __str__(self) -> str:
        return f"[{self.layer}] {self.entry}: {self.message}"


def entry_info(hdr, size: int, layer: str) -> EntryInfo:
    meta = hdr.meta
    created = meta.get("created", 0.0)
    return EntryInfo(name=hdr.name, key=hdr.key, backend=str(meta.get("backend", "?"))[:64],
                     target=str(meta.get("target", "?"))[:64], size=size,
                     created=float(created) if type(created) in (int, float) else 0.0,
                     layer=layer, meta=meta)


class CacheMaintenance:
    """ls / prune / verify / clear / size over the layers and the writable store."""

    def _writable_rows(self):
        """(store key, name, key) of every well-formed writable row; refused rows skipped."""
        for skey in list(self._open().iterkeys()):
            if skey is REFUSED_KEY or not isinstance(skey, str) or "." not in skey:
                continue
            name, key = skey.rsplit(".", 1)
            yield skey, name, key

    def _writable_header(self, skey: str):
        value = self._open().get(skey, read=True)
        if value is None or isinstance(value, bytes):
            return None if value is None else header_of(value)
        with value as fh:
            return read_header(fh)

    def entries(self) -> list[EntryInfo]:
        """Every readable entry of every layer (prebuilt first), from the frame headers only.

        Rows and files that are not moegen frames (planted, pickled, FIFOs, hostile headers)
        are skipped; `verify` reports them.
        """
        out: list[EntryInfo] = []
        for layer in self._layers:
            if not layer.problem():
                out += [entry_info(hdr, path.lstat().st_size, str(layer.root))
                        for path, hdr in layer.headers()]
        for skey, _, _ in self._writable_rows():
            try:
                hdr = self._writable_header(skey)
            except _READ_ERRORS:
                continue
            if hdr is not None:
                out.append(entry_info(hdr, hdr.frame_size, WRITABLE))
        return out

    def _remove_orphans(self) -> int:
        removed = 0
        for path in orphan_files(self._dir):
            with contextlib.suppress(OSError):
                os.unlink(path)
                removed += 1
        return removed

    def clear(self) -> int:
        """Delete every entry of the writable cache and its orphan value files (prebuilt layers
        untouched; the lock folder is kept, another process may be waiting on a lock).
        Returns the number of rows removed."""
        n = self._open().clear(retry=True)
        for rowid, _ in refused_rows(self._dir):
            delete_row(self._dir, rowid)
            n += 1
        self._remove_orphans()
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
        """Check every entry completely (digests, names, ownership, file names) and the
        directories.  With ``repair``, bad writable entries, planted rows and orphan value
        files are deleted (inside the cache only).  Returns the problems found."""
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
        refused = refused_rows(self._dir)
        for rowid, detail in refused:
            problems.append(Problem(WRITABLE, f"row {rowid}", detail))
            if repair:
                delete_row(self._dir, rowid)
        for skey, name, key in self._writable_rows():
            try:
                check_name_key(name, key)
                value = read_value(store, skey)
                if value is not None:
                    decode(value, name, key)
            except (*_READ_ERRORS, ValueError) as exc:
                if isinstance(exc, PickledEntryRefused) or str(exc) in {d for _, d in refused}:
                    continue                      # reported with the planted rows above
                problems.append(Problem(WRITABLE, shorten(skey, 120, quote=False), str(exc)))
                if repair:
                    self._delete(skey)
        for path in orphan_files(self._dir):
            problems.append(Problem(WRITABLE, str(path.relative_to(self._dir)),
                                    "orphan value file (no row names it; an interrupted store)"))
        if repair:
            self._remove_orphans()
        return problems

    def size(self) -> int:
        """Bytes used by the writable cache's entries."""
        return sum(e.size for e in self.entries() if e.writable)

