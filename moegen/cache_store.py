"""The on-disk pieces of the kernel cache: the entry frame, the pickle-refusing ``Disk``, and the
read-only prebuilt layer.  `moegen.cache.KernelCache` puts them together.

Entry frame (one ``bytes`` value per kernel, the same in the diskcache store, in archives and in
prebuilt directories)::

    b"MOEGENK1"                      8 bytes, magic + frame format version
    header length                    4 bytes, big-endian unsigned
    header                           canonical JSON: {"format": 1, "name": ..., "key": ...,
                                     "size": len(binary), "sha256": sha256(binary), "meta": {...}}
    binary                           the compiled cubin / shared object
    trailer                          32 bytes: sha256 of everything above

A truncated, zero-length, bit-flipped or foreign (other name/key) frame fails `decode` with
`CorruptEntry`: the trailer covers the header as well as the binary, so even a flipped byte in
the metadata is caught.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import diskcache

from .backends.base import Artifact
from .errors import CacheError
from . import trust

MAGIC = b"MOEGENK1"
FRAME_FORMAT = 1
_HEADER_LEN = struct.Struct(">I")
_PREFIX = len(MAGIC) + _HEADER_LEN.size
_TRAILER = 32
MAX_HEADER = 16 << 20          # a header is a few KiB; anything near this is garbage

# Entry names are spec names: lowercase letters, digits and a few separators.  Keys are sha256
# hex.  Both are checked before they are used in a path or a store key.
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
ENTRY_SUFFIX = ".kernel"
ENTRIES_DIR = "entries"
MANIFEST = "manifest.json"


class CorruptEntry(Exception):
    """A stored frame failed its checks; ``str()`` says which."""


class PickledEntryRefused(CacheError):
    """A row of the diskcache table claims to hold a pickle; moegen never stores those."""


def check_name_key(name: str, key: str) -> None:
    """Raise ValueError unless ``name`` is a safe entry name and ``key`` a sha256 hex digest."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise ValueError(f"kernel cache entry name must match {_NAME_RE.pattern} (a spec name), "
                         f"got {name!r}")
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"kernel cache key must be 64 lowercase hex digits (sha256), got {key!r}")


def entry_name(name: str, key: str) -> str:
    """The readable entry name ``<spec name>.<key[:16]>``."""
    return f"{name}.{key[:16]}"


def entry_filename(name: str, key: str) -> str:
    """File name of an entry in an archive or prebuilt directory (relative to ``entries/``)."""
    return entry_name(name, key) + ENTRY_SUFFIX


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


# -- frame ------------------------------------------------------------------------------------

def encode(name: str, key: str, artifact: Artifact) -> bytes:
    """Serialise an artifact into one self-checking frame (see the module docstring)."""
    binary = bytes(artifact.binary)
    header = canonical_json({
        "format": FRAME_FORMAT, "name": name, "key": key, "size": len(binary),
        "sha256": hashlib.sha256(binary).hexdigest(), "meta": artifact.meta,
    })
    body = b"".join((MAGIC, _HEADER_LEN.pack(len(header)), header, binary))
    return body + hashlib.sha256(body).digest()


@dataclass(frozen=True)
class Header:
    name: str
    key: str
    size: int                  # binary size
    sha256: str                # of the binary
    meta: dict = field(default_factory=dict)
    frame_size: int = 0        # whole frame, as stored


def _parse_header(prefix: bytes, header_bytes: bytes) -> Header:
    if len(prefix) < _PREFIX or prefix[:len(MAGIC)] != MAGIC:
        raise CorruptEntry("not a moegen kernel entry (bad magic or too short)")
    try:
        head = json.loads(header_bytes.decode("utf-8"))
        hdr = Header(name=head["name"], key=head["key"], size=int(head["size"]),
                     sha256=head["sha256"], meta=dict(head["meta"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptEntry(f"unreadable header ({exc.__class__.__name__})") from None
    if head.get("format") != FRAME_FORMAT:
        raise CorruptEntry(f"unknown frame format {head.get('format')!r}")
    hl = len(header_bytes)
    return Header(hdr.name, hdr.key, hdr.size, hdr.sha256, hdr.meta,
                  frame_size=_PREFIX + hl + hdr.size + _TRAILER)


def _header_length(prefix: bytes) -> int:
    if len(prefix) < _PREFIX or prefix[:len(MAGIC)] != MAGIC:
        raise CorruptEntry("not a moegen kernel entry (bad magic, empty or truncated)")
    (hl,) = _HEADER_LEN.unpack(prefix[len(MAGIC):_PREFIX])
    if hl > MAX_HEADER:
        raise CorruptEntry(f"header length {hl} is implausible")
    return hl


def decode(data: bytes, name: str | None = None, key: str | None = None) -> Artifact:
    """Check a frame completely and return its artifact.

    Raises CorruptEntry when the frame is empty, truncated, altered, or belongs to another
    name/key than the ones given.
    """
    hl = _header_length(data[:_PREFIX])
    if len(data) < _PREFIX + hl + _TRAILER:
        raise CorruptEntry(f"truncated ({len(data)} bytes)")
    hdr = _parse_header(data[:_PREFIX], data[_PREFIX:_PREFIX + hl])
    if len(data) != hdr.frame_size:
        raise CorruptEntry(f"length {len(data)} != {hdr.frame_size} recorded (truncated or padded)")
    body, trailer = data[:-_TRAILER], data[-_TRAILER:]
    if hashlib.sha256(body).digest() != trailer:
        raise CorruptEntry("sha256 mismatch (the entry was altered or partly written)")
    binary = body[_PREFIX + hl:]
    if hashlib.sha256(binary).hexdigest() != hdr.sha256:
        raise CorruptEntry("binary sha256 mismatch")
    if key is not None and hdr.key != key:
        raise CorruptEntry(f"entry holds key {hdr.key[:16]}..., not the requested {key[:16]}...")
    if name is not None and hdr.name != name:
        raise CorruptEntry(f"entry holds {hdr.name!r}, not the requested {name!r}")
    meta = dict(hdr.meta)
    meta.setdefault("key", hdr.key)
    meta.setdefault("spec_name", hdr.name)
    return Artifact(binary=binary, meta=meta)


def read_header(fh: BinaryIO) -> Header:
    """Read only the header of a frame (for listings); the binary is not checked."""
    prefix = fh.read(_PREFIX)
    hl = _header_length(prefix)
    header_bytes = fh.read(hl)
    if len(header_bytes) != hl:
        raise CorruptEntry("truncated header")
    return _parse_header(prefix, header_bytes)


def header_of(data: bytes) -> Header:
    """`read_header` for a frame held in memory."""
    import io
    return read_header(io.BytesIO(data))


# -- diskcache Disk that never unpickles --------------------------------------------------------

class RefusedKey:
    """Stands in for a key row that claims to be pickled; listings skip it."""

    def __repr__(self) -> str:
        return "<refused pickled key>"


REFUSED_KEY = RefusedKey()


class SafeDisk(diskcache.Disk):
    """A `diskcache.Disk` for bytes and JSON only: it refuses every pickled row on read.

    diskcache 5.6.3 unpickles whatever a row of its SQLite table says is pickled, so a planted
    row runs code on ``get`` (value ``mode = 4``) or while keys are listed (key ``raw = 0``).
    Here a pickled value raises `PickledEntryRefused` (the cache treats it as a corrupt entry)
    and a pickled key comes back as `REFUSED_KEY` (listings skip it).  Storing anything that
    would need pickling raises TypeError instead.
    """

    def put(self, key):
        if type(key) is not str:
            raise TypeError(f"moegen's cache stores str keys only, got {type(key).__name__}")
        return super().put(key)

    def get(self, key, raw):
        if not raw:
            return REFUSED_KEY
        return super().get(key, raw)

    def store(self, value, read, key=diskcache.core.UNKNOWN):
        if read or type(value) is not bytes:
            raise TypeError(f"moegen's cache stores bytes values only, got {type(value).__name__}")
        size, mode, filename, db_value = super().store(value, read, key=key)
        if filename is not None:
            # Private regardless of the umask (a 002 umask would make it group-writable, which
            # the trust check on read would then refuse).  Done before the row exists.
            os.chmod(os.path.join(self._directory, filename), 0o600)
        return size, mode, filename, db_value

    def fetch(self, mode, filename, value, read):
        if mode not in (diskcache.core.MODE_RAW, diskcache.core.MODE_BINARY):
            raise PickledEntryRefused(
                f"refused a cache row stored in diskcache mode {mode} (pickle or text); moegen "
                f"only stores bytes, so the row was planted or written by another program")
        return super().fetch(mode, filename, value, read)


# -- read-only prebuilt layer -------------------------------------------------------------------

class PrebuiltLayer:
    """A read-only directory of entries: ``manifest.json`` plus ``entries/<name>.<key16>.kernel``,
    i.e. an unpacked `moegen.deploy.export_archive` archive (`moegen.deploy.extract_archive`).

    Lookups open one file by name (no directory listing).  Every read is fully checked with
    `decode`; nothing here ever writes, renames or deletes.  The directory, ``entries/`` and each
    file must be owned by the current user or root and not be group/world-writable or symlinks.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self._problem: str | None = None
        self._checked = False

    def problem(self) -> str | None:
        """Why this layer is not used (checked once per process), or None."""
        if not self._checked:
            self._problem = (trust.check_path(self.root, what="prebuilt directory",
                                              allow_root=True, kind="dir")
                             or trust.check_path(self.root / ENTRIES_DIR, what="prebuilt directory",
                                                 allow_root=True, kind="dir"))
            self._checked = True
        return self._problem

    def path_of(self, name: str, key: str) -> Path:
        return self.root / ENTRIES_DIR / entry_filename(name, key)

    def read(self, name: str, key: str) -> bytes | None:
        """The raw frame for (name, key) or None when absent.  Raises CorruptEntry when the file
        is not trustworthy."""
        path = self.path_of(name, key)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CorruptEntry(f"cannot open {path}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "rb") as fh:
            reason = trust.check_open_file(fh, path, allow_root=True)
            if reason:
                raise CorruptEntry(reason)
            return fh.read()

    def get(self, name: str, key: str) -> Artifact | None:
        data = self.read(name, key)
        return None if data is None else decode(data, name, key)

    def verify(self) -> list[tuple[str, str]]:
        """(file name, problem) for every entry file that fails a complete check."""
        out = []
        for path in self.files():
            stem = path.name[:-len(ENTRY_SUFFIX)]
            try:
                with open(path, "rb") as fh:
                    hdr = read_header(fh)
                if entry_name(hdr.name, hdr.key) != stem:
                    raise CorruptEntry(f"file name does not match its header "
                                       f"({entry_name(hdr.name, hdr.key)})")
                check_name_key(hdr.name, hdr.key)
                if self.get(hdr.name, hdr.key) is None:
                    raise CorruptEntry("vanished while checking")
            except (OSError, CorruptEntry, ValueError) as exc:
                out.append((path.name, str(exc)))
        return out

    def files(self) -> list[Path]:
        """Every entry file (for listings and verify; not on the lookup path)."""
        d = self.root / ENTRIES_DIR
        try:
            return sorted(p for p in d.iterdir() if p.name.endswith(ENTRY_SUFFIX))
        except OSError:
            return []


# -- listing records and low-level row access ----------------------------------------------

WRITABLE = "cache"               # EntryInfo.layer of the writable cache


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


def read_value(store, skey: str) -> bytes | None:
    """The frame stored under ``skey`` (None when absent); a value file must pass the trust
    checks (owner, mode, no symlink), checked on the open handle."""
    value = store.get(skey, read=True)
    if value is None or isinstance(value, bytes):
        return value
    if not hasattr(value, "read"):
        raise CorruptEntry(f"row holds {type(value).__name__}, not bytes")
    with value as fh:
        reason = trust.check_open_file(fh, fh.name)
        if reason:
            raise CorruptEntry(reason)
        return fh.read()


def entry_info(hdr, size: int, layer: str) -> EntryInfo:
    meta = hdr.meta
    return EntryInfo(name=hdr.name, key=hdr.key, backend=str(meta.get("backend", "?")),
                     target=str(meta.get("target", "?")), size=size,
                     created=float(meta.get("created", 0.0) or 0.0), layer=layer, meta=meta)


def refused_rows(directory: Path) -> list[tuple[int, str]]:
    """Rows moegen never writes (pickled keys or values, text values), read without unpickling."""
    db = directory / "cache.db"
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT rowid, raw, mode FROM Cache WHERE raw = 0 OR mode NOT IN (1, 2)"
                           ).fetchall()
    except sqlite3.Error:
        return []
    finally:
        con.close()
    return [(rowid, f"planted row (key raw={raw}, value mode={mode}): moegen stores only str keys "
                    f"and bytes values; refused without unpickling") for rowid, raw, mode in rows]


def delete_row(directory: Path, rowid: int) -> None:
    con = sqlite3.connect(str(directory / "cache.db"), timeout=60)
    try:
        with con:
            con.execute("DELETE FROM Cache WHERE rowid = ?", (rowid,))
    finally:
        con.close()


def validate_artifact(artifact, name: str, key: str) -> Artifact:
    """What a build returned, checked to be bytes + JSON for ``key``; key and spec_name filled
    into its meta.  Raises CacheError naming the problem."""
    if not isinstance(artifact, Artifact):
        raise CacheError(f"the build of {name} returned {type(artifact).__name__}, "
                         f"expected moegen.backends.base.Artifact")
    if not isinstance(artifact.binary, (bytes, bytearray)) or not artifact.binary:
        raise CacheError(f"the build of {name} returned an artifact whose binary is "
                         f"{type(artifact.binary).__name__} of length "
                         f"{len(artifact.binary) if hasattr(artifact.binary, '__len__') else '?'}"
                         f"; expected non-empty bytes")
    if not isinstance(artifact.meta, dict):
        raise CacheError(f"the build of {name} returned meta of type "
                         f"{type(artifact.meta).__name__}, expected a JSON-able dict")
    try:
        canonical_json(artifact.meta)
    except (TypeError, ValueError) as exc:
        raise CacheError(f"the build of {name} returned meta that is not JSON-able: {exc}") \
            from None
    if artifact.meta.get("key", key) != key:
        raise CacheError(f"the build of {name} returned an artifact for key "
                         f"{artifact.meta['key'][:16]}..., expected {key[:16]}...")
    if artifact.meta.get("key") == key and artifact.meta.get("spec_name", name) == name \
            and "spec_name" in artifact.meta:
        return artifact
    return Artifact(binary=bytes(artifact.binary),
                    meta={"spec_name": name, **artifact.meta, "key": key})
