"""Move prebuilt kernels between machines as one archive (re-exported by `moegen.deploy`).

An archive is a ``.tar.gz`` holding, in this order::

    manifest.json                         what is inside and the sha256 of every entry file
    manifest.sig                          only when signed: Ed25519 over manifest.json
    entries/<spec name>.<key[:16]>.kernel one self-checking entry frame per kernel

The manifest::

    {"format": "moegen-kernels", "format_version": 1, "moegen_version": "0.1.0",
     "created": <unix time>, "toolchains": [{"backend", "target", "toolchain"}, ...],
     "entries": {"entries/<file>": {"sha256", "size", "name", "key", "backend", "target"}}}

Importing streams the archive once and checks it before anything becomes loadable: the
manifest comes first and its declared sizes must fit the limits (``max_entry`` per entry,
``max_total`` in all) before any entry is read; with keys (``--verify``, or
``MOEGEN_TRUSTED_KEYS``) its signature must verify before any entry is read; every member is a
regular file at ``entries/<safe name>.kernel`` listed in the manifest (no links, devices,
directories, absolute or ``..`` paths, duplicates or extras) whose declared size matches; its
header must name the listed spec and key (checked before the rest is read), its sha256 is
computed in chunks as it is read, its frame decodes, and every listed entry is present.  Checked
entries wait in a private spool directory, one in memory at a time.  Any violation raises
CacheError and nothing is imported.

Unpacked with `extract_archive`, an archive is a prebuilt layer for ``MOEGEN_PREBUILT_DIR``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from . import __version__, signing
from .cache import KernelCache
from .cache_format import (ENTRIES_DIR, ENTRY_SUFFIX, MANIFEST, CorruptEntry, check_frame, encode,
                           entry_filename, read_header, shorten)
from .cache_layers import ARCHIVE_FORMAT, ARCHIVE_VERSION, MAX_MANIFEST, MEMBER_RE, check_manifest
from .errors import CacheError

MAX_ENTRY = 2 << 30              # bytes of one entry frame an import accepts
MAX_TOTAL = 16 << 30             # bytes of all entry frames of one archive
CHUNK = 1 << 20


def export_archive(cache: KernelCache, path: str | Path, names: list[str] | None = None, *,
                   sign_key: str | Path | None = None) -> dict:
    """Write the entries of ``cache`` (all layers; a key found twice is written once) to a
    ``.tar.gz`` at ``path`` (replaced atomically).  ``names`` keeps only entries whose spec name
    or entry name (``<name>.<key16>``) is listed; ``sign_key`` (an Ed25519 private key file,
    `moegen.signing.keygen`) adds ``manifest.sig``.

    Every entry is read back and checked first; a bad one is skipped with the cache's warning.
    Returns the manifest.  Raises CacheError when a requested name matches nothing, nothing
    is left to export, or the key cannot be read.
    """
    path = Path(path)
    key = signing.load_private_key(sign_key) if sign_key is not None else None
    wanted = set(names or ())
    frames: dict[str, bytes] = {}
    records: dict[str, dict] = {}
    toolchains: dict[str, dict] = {}
    matched: set[str] = set()
    for info in cache.entries():
        rel = f"{ENTRIES_DIR}/{entry_filename(info.name, info.key)}"
        hit = {info.name, info.entry} & wanted
        if rel in frames or (wanted and not hit):
            continue
        matched |= hit
        art = cache.get(info.name, info.key)
        if art is None:
            continue
        frames[rel] = frame = encode(info.name, info.key, art)
        meta = art.meta
        records[rel] = {"sha256": hashlib.sha256(frame).hexdigest(), "size": len(frame),
                        "name": info.name, "key": info.key,
                        "backend": str(meta.get("backend", "?")),
                        "target": str(meta.get("target", "?"))}
        tc = {"backend": meta.get("backend"), "target": meta.get("target"),
              "toolchain": meta.get("toolchain")}
        toolchains[json.dumps(tc, sort_keys=True, default=str)] = tc
    missing = sorted(wanted - matched)
    if missing:
        raise CacheError(f"export: no cached entry matches {missing}; `moegen cache ls` lists "
                         f"what {cache.requested_directory} holds")
    if not frames:
        raise CacheError(f"export: the cache {cache.requested_directory} has no entries to "
                         f"export; build some first (moegen build ...)")
    manifest = {"format": ARCHIVE_FORMAT, "format_version": ARCHIVE_VERSION,
                "moegen_version": __version__, "created": time.time(),
                "toolchains": [toolchains[k] for k in sorted(toolchains)],
                "entries": dict(sorted(records.items()))}
    raw = json.dumps(manifest, indent=1, sort_keys=True).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out, tarfile.open(fileobj=out, mode="w:gz") as tar:
            _add(tar, MANIFEST, raw)
            if key is not None:
                _add(tar, signing.SIGNATURE, signing.sign(raw, key))
            for rel in sorted(frames):
                _add(tar, rel, frames[rel])
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return manifest


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = int(time.time())
    info.type = tarfile.REGTYPE
    tar.addfile(info, io.BytesIO(data))


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


class _Scan:
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
    scan = _Scan(Path(path), keys, max_entry, max_total)
    scan.run(lambda rec, frame: frames.__setitem__(
        f"{ENTRIES_DIR}/{entry_filename(rec['name'], rec['key'])}", bytes(frame)))
    return scan.manifest, frames


def _keys(keys: list | None) -> list:
    return signing.trusted_keys() if keys is None else keys


def import_archive(path: str | Path, cache: KernelCache, *, keys: list | None = None,
                   max_entry: int = MAX_ENTRY, max_total: int = MAX_TOTAL) -> list[str]:
    """Check an archive completely, then store its entries in ``cache``'s writable layer.
    ``keys``: public keys one of which must have signed it (default: ``MOEGEN_TRUSTED_KEYS``,
    none required when unset).  Returns the entry names imported.

    Raises CacheError when the archive is rejected (nothing imported), when the cache directory
    is not trusted (see `moegen.trust`), or when entries could not be stored (disk full).
    """
    if not cache.trusted:
        raise CacheError(f"import of {path}: the cache {cache.requested_directory} is not used "
                         f"({cache.untrusted_reason}); importing into this process's temporary "
                         f"fallback would be lost at exit. Fix the directory or set "
                         f"MOEGEN_CACHE_DIR.")
    with tempfile.TemporaryDirectory(prefix="moegen-import-") as spool:
        spooled: list[tuple[dict, Path]] = []

        def keep(record: dict, frame: bytearray) -> None:
            spooled.append((record, Path(spool) / str(len(spooled))))
            spooled[-1][1].write_bytes(frame)

        _Scan(Path(path), _keys(keys), max_entry, max_total).run(keep)
        done, failed = [], []
        for record, file in spooled:
            stored = cache.put_frame(record["name"], record["key"], file.read_bytes())
            (done if stored else failed).append(entry_filename(record["name"], record["key"]))
    if failed:
        raise CacheError(f"import of {path}: {len(failed)} of {len(spooled)} entries could not "
                         f"be stored in {cache.directory} (see the warning above)")
    return [rel[:-len(ENTRY_SUFFIX)] for rel in done]


def extract_archive(path: str | Path, directory: str | Path, *, replace: bool = False,
                    keys: list | None = None, max_entry: int = MAX_ENTRY,
                    max_total: int = MAX_TOTAL) -> Path:
    """Check an archive completely and unpack it as a prebuilt layer at ``directory`` (the
    manifest byte for byte, and its signature when signed).  ``keys`` as for `import_archive`.

    The layer is assembled next to ``directory`` and renamed into place, so a reader never sees
    half of it.  ``directory`` must not exist (or be empty) unless ``replace``.  Directories are
    made 0755 and files 0644 (readable by a service user, writable by nobody else).
    Raises CacheError.
    """
    directory = Path(directory)
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise CacheError(f"{directory} exists and is not a directory")
    if directory.exists() and any(directory.iterdir()) and not replace:
        raise CacheError(f"{directory} is not empty; pass replace=True (--replace) to swap it "
                         f"for the archive's contents")
    directory.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        (stage / ENTRIES_DIR).mkdir()

        def place(record: dict, frame: bytearray) -> None:
            target = stage / ENTRIES_DIR / entry_filename(record["name"], record["key"])
            target.write_bytes(frame)
            os.chmod(target, 0o644)

        scan = _Scan(Path(path), _keys(keys), max_entry, max_total)
        scan.run(place)
        (stage / MANIFEST).write_bytes(scan.raw_manifest)
        os.chmod(stage / MANIFEST, 0o644)
        if scan.signature is not None:
            (stage / signing.SIGNATURE).write_bytes(scan.signature)
            os.chmod(stage / signing.SIGNATURE, 0o644)
        os.chmod(stage / ENTRIES_DIR, 0o755)
        os.chmod(stage, 0o755)
        old = None
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{os.getpid()}"
            os.rename(directory, old)
        os.rename(stage, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return directory
