"""The kernel cache's entry format: one self-checking frame per kernel, and bounded reads.

Entry frame (one ``bytes`` value per kernel, the same in the diskcache store, in archives and in
prebuilt directories)::

    b"MOEGENK1"                      8 bytes, magic + frame format version
    header length                    4 bytes, big-endian unsigned
    header                           canonical JSON: {"format": 1, "name": ..., "key": ...,
                                     "size": len(binary), "sha256": sha256(binary), "meta": {...}}
    binary                           the compiled cubin / shared object
    trailer                          32 bytes: sha256 of everything above

A truncated, zero-length, bit-flipped or foreign (other name/key) frame fails `decode` with
`CorruptEntry`: the trailer covers the header as well as the binary.  A hostile header (nested
100,000 deep, ``"size": 1e400``, wrong types) is a `CorruptEntry` too, never a RecursionError
or OverflowError.  The digests detect accidents, not forgery: whoever can write a frame can
recompute them (`moegen.signing` is the defence against forgery).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from . import trust
from .backends.base import Artifact
from .errors import CacheError

MAGIC = b"MOEGENK1"
FRAME_FORMAT = 1
_HEADER_LEN = struct.Struct(">I")
_PREFIX = len(MAGIC) + _HEADER_LEN.size
_TRAILER = 32
MAX_HEADER = 16 << 20          # a header is a few KiB; anything near this is garbage
MAX_BINARY = 1 << 40           # a size above this in a header is garbage, not a kernel
NAME_SHOWN = 80                # characters of a hostile name echoed into a message

# Entry names are spec names: letters, digits and a few separators.  Keys are sha256 hex.
# Both are checked before they are used in a path or a store key.
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_SHA_RE = _KEY_RE
ENTRY_SUFFIX = ".kernel"
ENTRIES_DIR = "entries"
MANIFEST = "manifest.json"


class CorruptEntry(Exception):
    """A stored frame or file failed its checks; ``str()`` says which."""


class PickledEntryRefused(CacheError):
    """A row of the diskcache table claims to hold a pickle; moegen never stores those."""


def shorten(text: Any, width: int = NAME_SHOWN, *, quote: bool = True) -> str:
    """A name for a message (its ``repr`` when ``quote``), cut to ``width`` characters: a
    hostile name can be megabytes long."""
    shown = repr(text) if quote or not isinstance(text, str) else text
    return shown if len(shown) <= width else f"{shown[:width - 3]}... ({len(shown)} chars)"


def check_name_key(name: str, key: str) -> None:
    """Raise ValueError unless ``name`` is a safe entry name and ``key`` a sha256 hex digest."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise ValueError(f"kernel cache entry name must match {_NAME_RE.pattern} (a spec name), "
                         f"got {shorten(name)}")
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"kernel cache key must be 64 lowercase hex digits (sha256), "
                         f"got {shorten(key)}")


def entry_name(name: str, key: str) -> str:
    """The readable entry name ``<spec name>.<key[:16]>``."""
    return f"{name}.{key[:16]}"


def entry_filename(name: str, key: str) -> str:
    """File name of an entry in an archive or prebuilt directory (relative to ``entries/``)."""
    return entry_name(name, key) + ENTRY_SUFFIX


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def load_json(raw: bytes | memoryview, what: str) -> Any:
    """JSON from untrusted bytes; CorruptEntry (never RecursionError/OverflowError) if bad."""
    try:
        return json.loads(bytes(raw).decode("utf-8"))
    except (ValueError, RecursionError, OverflowError) as exc:
        raise CorruptEntry(f"unreadable {what} ({exc.__class__.__name__})") from None


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


def _header_length(prefix: bytes) -> int:
    if len(prefix) < _PREFIX or prefix[:len(MAGIC)] != MAGIC:
        raise CorruptEntry("not a moegen kernel entry (bad magic, empty or truncated)")
    (hl,) = _HEADER_LEN.unpack(prefix[len(MAGIC):_PREFIX])
    if hl > MAX_HEADER:
        raise CorruptEntry(f"header length {hl} is implausible")
    return hl


def _parse_header(header_bytes: bytes | memoryview) -> Header:
    head = load_json(header_bytes, "header")
    if not isinstance(head, dict):
        raise CorruptEntry("unreadable header (not an object)")
    if head.get("format") != FRAME_FORMAT:
        raise CorruptEntry(f"unknown frame format {shorten(head.get('format'))}")
    name, key, size, sha, meta = (head.get(k) for k in ("name", "key", "size", "sha256", "meta"))
    if not (isinstance(name, str) and isinstance(key, str) and isinstance(meta, dict)
            and isinstance(sha, str) and _SHA_RE.match(sha) and type(size) is int
            and 0 <= size <= MAX_BINARY):
        raise CorruptEntry("unreadable header (missing or mistyped name, key, size, sha256 "
                           "or meta)")
    return Header(name, key, size, sha, meta,
                  frame_size=_PREFIX + len(header_bytes) + size + _TRAILER)


def check_frame(data: bytes | bytearray | memoryview, name: str | None = None,
                key: str | None = None) -> Header:
    """Check a frame completely without copying it; its header.

    Raises CorruptEntry when the frame is empty, truncated, altered, or belongs to another
    name/key than the ones given.
    """
    view = memoryview(data)
    hl = _header_length(bytes(view[:_PREFIX]))
    if len(view) < _PREFIX + hl + _TRAILER:
        raise CorruptEntry(f"truncated ({len(view)} bytes)")
    hdr = _parse_header(view[_PREFIX:_PREFIX + hl])
    if len(view) != hdr.frame_size:
        raise CorruptEntry(f"length {len(view)} != {hdr.frame_size} recorded (truncated or padded)")
    if hashlib.sha256(view[:-_TRAILER]).digest() != view[-_TRAILER:]:
        raise CorruptEntry("sha256 mismatch (the entry was altered or partly written)")
    if hashlib.sha256(view[_PREFIX + hl:-_TRAILER]).hexdigest() != hdr.sha256:
        raise CorruptEntry("binary sha256 mismatch")
    if key is not None and hdr.key != key:
        raise CorruptEntry(f"entry holds key {hdr.key[:16]}..., not the requested {key[:16]}...")
    if name is not None and hdr.name != name:
        raise CorruptEntry(f"entry holds {shorten(hdr.name)}, not the requested {name!r}")
    return hdr


def decode(data: bytes | bytearray | memoryview, name: str | None = None,
           key: str | None = None) -> Artifact:
    """Check a frame completely (`check_frame`) and return its artifact."""
    hdr = check_frame(data, name, key)
    binary = memoryview(data)[hdr.frame_size - _TRAILER - hdr.size:-_TRAILER]
    meta = dict(hdr.meta)
    meta.setdefault("key", hdr.key)
    meta.setdefault("spec_name", hdr.name)
    return Artifact(binary=bytes(binary), meta=meta)


def read_header(fh: BinaryIO) -> Header:
    """Read only the header of a frame (for listings); the binary is not checked."""
    prefix = fh.read(_PREFIX)
    hl = _header_length(prefix)
    header_bytes = fh.read(hl)
    if len(header_bytes) != hl:
        raise CorruptEntry("truncated header")
    return _parse_header(header_bytes)


def header_of(data: bytes) -> Header:
    """`read_header` for a frame held in memory."""
    return read_header(io.BytesIO(data))


# -- bounded, non-blocking reads of entry files -------------------------------------------------

def open_regular(path: Path | str, *, what: str = "entry file", allow_root: bool = False,
                 max_size: int | None = None) -> BinaryIO:
    """Open ``path`` for reading only if it is a trusted regular file (see `moegen.trust`).

    Opened with O_NOFOLLOW and O_NONBLOCK, then checked with ``fstat``: a FIFO, device or
    symlink planted in place of an entry is refused at once instead of hanging the process.
    Raises FileNotFoundError when absent, CorruptEntry when refused.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CorruptEntry(f"cannot open {what} {path}: {exc.strerror or exc}") from None
    fh = os.fdopen(fd, "rb")
    try:
        reason = trust.check_open_file(fh, path, what=what, allow_root=allow_root)
        size = os.fstat(fd).st_size
        if reason is None and max_size is not None and size > max_size:
            reason = f"{what} {path} has {size} bytes, more than the limit of {max_size}"
    except BaseException:
        fh.close()
        raise
    if reason:
        fh.close()
        raise CorruptEntry(reason)
    return fh


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
                         f"{str(artifact.meta['key'])[:16]}..., expected {key[:16]}...")
    if artifact.meta.get("key") == key and artifact.meta.get("spec_name", name) == name \
            and "spec_name" in artifact.meta:
        return artifact
    return Artifact(binary=bytes(artifact.binary),
                    meta={"spec_name": name, **artifact.meta, "key": key})
