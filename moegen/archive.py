"""Move prebuilt kernels between machines as one archive (re-exported by `moegen.deploy`).

An archive is a ``.tar.gz`` holding, in this order::

    manifest.json                         what is inside and the sha256 of every entry file
    entries/<spec name>.<key[:16]>.kernel one self-checking entry frame per kernel

The manifest::

    {"format": "moegen-kernels", "format_version": 1, "moegen_version": "0.1.0",
     "created": <unix time>, "toolchains": [{"backend", "target", "toolchain"}, ...],
     "entries": {"entries/<file>": {"sha256", "size", "name", "key", "backend", "target"}}}

Importing reads the whole archive and checks it before anything becomes loadable: the manifest
comes first, every member is a regular file at ``entries/<safe name>.kernel`` listed in the
manifest (no links, devices, directories, absolute or ``..`` paths, duplicates or extras), its
sha256 and size match, its frame decodes and names the same spec and key, and every listed
entry is present.  Any violation raises CacheError and nothing is imported.

Unpacked with `extract_archive`, an archive is a prebuilt layer for ``MOEGEN_PREBUILT_DIR``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from .cache import KernelCache
from .cache_store import (ENTRIES_DIR, ENTRY_SUFFIX, MANIFEST, CorruptEntry, check_name_key,
                          decode, encode, entry_filename, header_of)
from .errors import CacheError

ARCHIVE_FORMAT = "moegen-kernels"
ARCHIVE_VERSION = 1
MAX_MANIFEST = 64 << 20
MAX_MEMBER = 2 << 30
_MEMBER_RE = re.compile(r"^entries/[A-Za-z0-9_][A-Za-z0-9_.\-]{0,240}\.kernel$")


def _moegen_version() -> str:
    try:
        from . import __version__
        return __version__
    except ImportError:  # pragma: no cover - partial checkouts
        return "unknown"


def export_archive(cache: KernelCache, path: str | Path, names: list[str] | None = None) -> dict:
    """Write the entries of ``cache`` (all layers; a key found twice is written once) to a
    ``.tar.gz`` at ``path`` (replaced atomically).  ``names`` keeps only entries whose spec name
    or entry name (``<name>.<key16>``) is listed.

    Every entry is read back and checked first; a bad one is skipped with the cache's warning.
    Returns the manifest.  Raises CacheError when a requested name matches nothing or nothing
    is left to export.
    """
    path = Path(path)
    wanted = set(names or ())
    seen: set[str] = set()
    frames: dict[str, bytes] = {}
    records: dict[str, dict] = {}
    toolchains: dict[str, dict] = {}
    matched: set[str] = set()
    for info in cache.entries():
        if info.key in seen:
            continue
        if wanted:
            hit = {info.name, info.entry} & wanted
            if not hit:
                continue
            matched |= hit
        art = cache.get(info.name, info.key)
        if art is None:
            continue
        seen.add(info.key)
        rel = f"{ENTRIES_DIR}/{entry_filename(info.name, info.key)}"
        frame = encode(info.name, info.key, art)
        frames[rel] = frame
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
                "moegen_version": _moegen_version(), "created": time.time(),
                "toolchains": [toolchains[k] for k in sorted(toolchains)],
                "entries": dict(sorted(records.items()))}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            _add(tar, MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
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


def read_archive(path: str | Path) -> tuple[dict, dict[str, bytes]]:
    """Read and check a whole archive (see the module docstring); ``(manifest, {rel: frame})``.

    Raises CacheError naming the archive and the offending member.
    """
    path = Path(path)

    def bad(msg: str) -> CacheError:
        return CacheError(f"archive {path} rejected, nothing imported: {msg}")

    try:
        tar = tarfile.open(path, mode="r:*")
    except (OSError, tarfile.TarError) as exc:
        raise bad(f"not a readable tar archive ({exc})") from None
    frames: dict[str, bytes] = {}
    manifest = None
    with tar:
        try:
            for member in tar:
                if manifest is None:
                    if member.name != MANIFEST or not member.isreg():
                        raise bad(f"the first member must be the regular file {MANIFEST}, "
                                  f"got {member.name!r}")
                    if member.size > MAX_MANIFEST:
                        raise bad(f"{MANIFEST} is implausibly large ({member.size} bytes)")
                    manifest = _check_manifest(tar.extractfile(member).read(), bad)
                    continue
                rel = member.name
                if not _MEMBER_RE.match(rel) or ".." in rel:
                    raise bad(f"unexpected member {rel!r} (only {ENTRIES_DIR}/<name>"
                              f"{ENTRY_SUFFIX} files are allowed)")
                if not member.isreg():
                    raise bad(f"member {rel!r} is not a regular file (links, directories and "
                              f"devices are refused)")
                if rel in frames:
                    raise bad(f"member {rel!r} appears twice")
                record = manifest["entries"].get(rel)
                if record is None:
                    raise bad(f"member {rel!r} is not listed in the manifest")
                if member.size != record["size"] or member.size > MAX_MEMBER:
                    raise bad(f"member {rel!r} has {member.size} bytes, the manifest says "
                              f"{record['size']}")
                data = tar.extractfile(member).read()
                if hashlib.sha256(data).hexdigest() != record["sha256"]:
                    raise bad(f"member {rel!r} does not match its sha256 in the manifest")
                try:
                    decode(data, record["name"], record["key"])
                except CorruptEntry as exc:
                    raise bad(f"member {rel!r}: {exc}") from None
                if rel != f"{ENTRIES_DIR}/{entry_filename(record['name'], record['key'])}":
                    raise bad(f"member {rel!r} is named differently from its entry")
                frames[rel] = data
        except (OSError, tarfile.TarError, EOFError, ValueError) as exc:
            raise bad(f"unreadable ({exc.__class__.__name__}: {exc})") from None
    if manifest is None:
        raise bad(f"no {MANIFEST}")
    absent = sorted(set(manifest["entries"]) - set(frames))
    if absent:
        raise bad(f"entries listed in the manifest are missing: {absent[:5]}"
                  f"{' ...' if len(absent) > 5 else ''}")
    return manifest, frames


def _check_manifest(raw: bytes, bad) -> dict:
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"{MANIFEST} is not JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARCHIVE_FORMAT:
        raise bad(f"{MANIFEST} is not a moegen kernel manifest")
    if manifest.get("format_version") != ARCHIVE_VERSION:
        raise bad(f"archive format version {manifest.get('format_version')!r} is not supported "
                  f"(this moegen reads version {ARCHIVE_VERSION})")
    entries = manifest.get("entries")
    if not isinstance(entries, dict):
        raise bad(f"{MANIFEST} has no entries table")
    for rel, rec in entries.items():
        ok = (isinstance(rel, str) and _MEMBER_RE.match(rel) and isinstance(rec, dict)
              and isinstance(rec.get("sha256"), str) and len(rec["sha256"]) == 64
              and isinstance(rec.get("size"), int) and not isinstance(rec.get("size"), bool))
        if ok:
            try:
                check_name_key(rec.get("name"), rec.get("key"))
            except ValueError:
                ok = False
        if not ok:
            raise bad(f"{MANIFEST} has a malformed entry {rel!r}")
    return manifest


def import_archive(path: str | Path, cache: KernelCache) -> list[str]:
    """Check an archive completely (`read_archive`), then store its entries in ``cache``'s
    writable layer.  Returns the entry names imported.

    Raises CacheError when the archive is rejected (nothing imported), when the cache directory
    is not trusted (see `moegen.trust`), or when entries could not be stored (disk full).
    """
    _, frames = read_archive(path)
    if not cache.trusted:
        raise CacheError(f"import of {path}: the cache {cache.requested_directory} is not used "
                         f"({cache.untrusted_reason}); importing into this process's temporary "
                         f"fallback would be lost at exit. Fix the directory or set "
                         f"MOEGEN_CACHE_DIR.")
    done, failed = [], []
    for rel, frame in sorted(frames.items()):
        hdr = header_of(frame)
        art = decode(frame, hdr.name, hdr.key)
        (done if cache.put(hdr.name, hdr.key, art) else failed).append(rel)
    if failed:
        raise CacheError(f"import of {path}: {len(failed)} of {len(frames)} entries could not be "
                         f"stored in {cache.directory} (see the warning above)")
    return [Path(rel).name[:-len(ENTRY_SUFFIX)] for rel in done]


def extract_archive(path: str | Path, directory: str | Path, *, replace: bool = False) -> Path:
    """Check an archive completely and unpack it as a prebuilt layer at ``directory``.

    The layer is assembled next to ``directory`` and renamed into place, so a reader never sees
    half of it.  ``directory`` must not exist (or be empty) unless ``replace``.  Directories are
    made 0755 and files 0644 (readable by a service user, writable by nobody else).
    Raises CacheError.
    """
    manifest, frames = read_archive(path)
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
        for rel, frame in frames.items():
            (stage / rel).write_bytes(frame)
            os.chmod(stage / rel, 0o644)
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.chmod(stage / MANIFEST, 0o644)
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
