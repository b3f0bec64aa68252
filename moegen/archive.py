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
from .archive_scan import MAX_ENTRY, MAX_TOTAL, Scan, read_archive
from .cache import KernelCache
from .cache_format import ENTRIES_DIR, ENTRY_SUFFIX, MANIFEST, encode, entry_filename
from .cache_layers import ARCHIVE_FORMAT, ARCHIVE_VERSION
from .errors import CacheError

__all__ = ["MAX_ENTRY", "MAX_TOTAL", "export_archive", "extract_archive", "import_archive",
           "read_archive"]


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

        Scan(Path(path), _keys(keys), max_entry, max_total).run(keep)
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

        scan = Scan(Path(path), _keys(keys), max_entry, max_total)
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
