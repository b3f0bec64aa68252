"""One streaming, bounded pass over a kernel archive (the checks listed in `moegen.archive`).

`Scan.run(sink)` reads the archive once, member by member, and hands each entry to ``sink`` only
after it passed every check; a violation raises CacheError naming the archive and the member
(cut short).  One entry is in memory at a time, in a buffer allocated once from its declared
size, which the limits bound before anything is read.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

from . import signing
from .cache_format import (ENTRIES_DIR, ENTRY_SUFFIX, MANIFEST, CorruptEntry, check_frame,
                           entry_filename, read_header, shorten)
from .cache_layers import MAX_MANIFEST, MEMBER_RE, check_manifest
from .errors import CacheError

MAX_ENTRY = 2 << 30              # bytes of one entry frame an import accepts
MAX_TOTAL = 16 << 30             # bytes of all entry frames of one archive
CHUNK = 1 << 20


class _HashingReader:
    """Reads one member of known size in order into a buffer allocated once, hashing as it
    goes (one copy of the entry in memory, however it is compressed)."""

    def __init__(self, fh, size: int):
        self._fh, self.sha = fh, hashlib.sha256()
        self.data, self.pos = bytearray(size), 0

    def _fill(self, n: int) -> memoryview:
        view = memoryview(self.data)[self.pos:self.pos + n]
        got = self._fh.readinto(view) or 0
        self.sha.update(view[:got])
        self.pos += got
        return view[:got]

    def read(self, n: int) -> bytes:
        """The next ``n`` bytes or fewer (for `read_header`)."""
        return bytes(self._fill(n))

    def read_rest(self) -> None:
        while self.pos < len(self.data) and len(self._fill(CHUNK)):
            pass


class Scan:
    """One streaming pass over an archive (see the module docstring)."""

    def __init__(self, path: Path, keys: list | None, max_entry: int, max_total: int):
        self.path, self.keys = path, keys
        self.max_entry, self.max_total = max_entry, max_total
        self.manifest: dict | None = None
        self.raw_manifest = b""
        self.signature: bytes | None = None

    def bad(self, msg: str) -> CacheError:
        return CacheError(f"archive {self.path} rejected, nothing imported: {msg}")

    def run(self, sink) -> None:
        """Check every member, calling ``sink(record, frame)`` for each checked entry."""
        try:
            tar = tarfile.open(self.path, mode="r|*")
        except (OSError, tarfile.TarError) as exc:
            raise self.bad(f"not a readable tar archive ({exc})") from None
        seen: set[str] = set()
        with tar:
            try:
                for member in tar:
                    if self.manifest is None:
                        self._manifest(tar, member)
                    elif member.name == signing.SIGNATURE and not seen and self.signature is None:
                        self.signature = self._small(tar, member, signing.MAX_SIGNATURE)
                    else:
                        self._check_signature()
                        record = self._member(member, seen)
                        sink(record, self._frame(tar, member, record))
                        seen.add(member.name)
            except (OSError, tarfile.TarError, EOFError, ValueError) as exc:
                raise self.bad(f"unreadable ({exc.__class__.__name__}: "
                               f"{shorten(str(exc), quote=False)})") from None
        if self.manifest is None:
            raise self.bad(f"no {MANIFEST}")
        self._check_signature()
        absent = sorted(set(self.manifest["entries"]) - seen)
        if absent:
            raise self.bad(f"entries listed in the manifest are missing: {absent[:5]}"
                           f"{' ...' if len(absent) > 5 else ''}")

    def _small(self, tar, member, limit: int) -> bytes:
        if not member.isreg() or member.size > limit:
            raise self.bad(f"{member.name} is not a regular file of at most {limit} bytes")
        return tar.extractfile(member).read()

    def _manifest(self, tar, member) -> None:
        if member.name != MANIFEST:
            raise self.bad(f"the first member must be the regular file {MANIFEST}, got "
                           f"{shorten(member.name)}")
        self.raw_manifest = self._small(tar, member, MAX_MANIFEST)
        try:
            self.manifest = check_manifest(self.raw_manifest)
        except CorruptEntry as exc:
            raise self.bad(str(exc)) from None
        sizes = [rec["size"] for rec in self.manifest["entries"].values()]
        if any(s > self.max_entry for s in sizes):
            raise self.bad(f"an entry declares {max(sizes)} bytes, more than the limit of "
                           f"{self.max_entry} per entry")
        if sum(sizes) > self.max_total:
            raise self.bad(f"the entries declare {sum(sizes)} bytes in all, more than the limit "
                           f"of {self.max_total}")

    def _check_signature(self) -> None:
        if self.keys:
            why = signing.verify(self.raw_manifest, self.signature, self.keys)
            if why:
                raise self.bad(why)
            self.keys = None                      # checked once, before the first entry

    def _member(self, member, seen: set[str]) -> dict:
        rel, shown = member.name, shorten(member.name)
        if not MEMBER_RE.match(rel) or ".." in rel:
            raise self.bad(f"unexpected member {shown} (only {ENTRIES_DIR}/<name>{ENTRY_SUFFIX} "
                           f"files are allowed)")
        if not member.isreg():
            raise self.bad(f"member {shown} is not a regular file (links, directories and "
                           f"devices are refused)")
        if rel in seen:
            raise self.bad(f"member {shown} appears twice")
        record = self.manifest["entries"].get(rel)
        if record is None:
            raise self.bad(f"member {shown} is not listed in the manifest")
        if member.size != record["size"]:
            raise self.bad(f"member {shown} has {member.size} bytes, the manifest says "
                           f"{record['size']}")
        return record

    def _frame(self, tar, member, record: dict) -> bytearray:
        shown = shorten(member.name)
        reader = _HashingReader(tar.extractfile(member), record["size"])
        try:
            hdr = read_header(reader)
            if (hdr.name, hdr.key, hdr.frame_size) != (record["name"], record["key"],
                                                       record["size"]):
                raise CorruptEntry("its header does not name the listed spec, key and size")
            reader.read_rest()
            if reader.pos != record["size"] or reader.sha.hexdigest() != record["sha256"]:
                raise CorruptEntry("it does not match its sha256 in the manifest")
            check_frame(reader.data, record["name"], record["key"])
        except CorruptEntry as exc:
            raise self.bad(f"member {shown}: {exc}") from None
        return reader.data


def read_archive(path: str | Path, *, keys: list | None = None, max_entry: int = MAX_ENTRY,
                 max_total: int = MAX_TOTAL) -> tuple[dict, dict[str, bytes]]:
    """Read and check a whole archive (see the module docstring) into memory;
    ``(manifest, {rel: frame})``.  Raises CacheError naming the archive and the member."""
    frames: dict[str, bytes] = {}
    scan = Scan(Path(path), keys, max_entry, max_total)
    scan.run(lambda rec, frame: frames.__setitem__(
        f"{ENTRIES_DIR}/{entry_filename(rec['name'], rec['key'])}", bytes(frame)))
    return scan.manifest, frames
