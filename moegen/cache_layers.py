"""Read-only prebuilt layers (``MOEGEN_PREBUILT_DIR``): unpacked kernel archives.

A layer is ``manifest.json`` (the archive manifest, byte for byte), ``manifest.sig`` when the
archive was signed, and ``entries/<spec name>.<key[:16]>.kernel``.  Lookups open one file by
name (no directory listing), without following links or blocking on a FIFO, and check it
completely with `decode`; nothing here ever writes, renames or deletes.  The directory,
``entries/`` and each file must be owned by the current user or root and not be group/world
writable or symlinks.

With ``MOEGEN_TRUSTED_KEYS`` set (`moegen.signing`), a layer is used only when its manifest
carries a valid signature by one of those keys, and an entry loads only when its file's sha256
is the one the signed manifest lists: an entry forged with recomputed digests is refused.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from . import settings, trust
from .backends.base import Artifact
from .cache_format import (ENTRIES_DIR, ENTRY_SUFFIX, MANIFEST, CorruptEntry, check_name_key,
                           decode, entry_filename, entry_name, load_json, open_regular,
                           read_header, shorten)

ARCHIVE_FORMAT = "moegen-kernels"
ARCHIVE_VERSION = 1
MAX_MANIFEST = 64 << 20
MEMBER_RE = re.compile(r"^entries/[A-Za-z0-9_][A-Za-z0-9_.\-]{0,240}\.kernel$")
SIGNATURE = "manifest.sig"            # next to manifest.json when signed (moegen.signing)
MAX_SIGNATURE = 4 << 10
TRUSTED_KEYS_ENV = "MOEGEN_TRUSTED_KEYS"


def check_manifest(raw: bytes) -> dict:
    """The parsed manifest of an archive or layer; CorruptEntry (one line) when malformed."""
    manifest = load_json(raw, MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != ARCHIVE_FORMAT:
        raise CorruptEntry(f"{MANIFEST} is not a moegen kernel manifest")
    if manifest.get("format_version") != ARCHIVE_VERSION:
        raise CorruptEntry(f"archive format version {shorten(manifest.get('format_version'))} "
                           f"is not supported (this moegen reads version {ARCHIVE_VERSION})")
    entries = manifest.get("entries")
    if not isinstance(entries, dict):
        raise CorruptEntry(f"{MANIFEST} has no entries table")
    for rel, rec in entries.items():
        ok = (isinstance(rel, str) and MEMBER_RE.match(rel) and ".." not in rel
              and isinstance(rec, dict) and isinstance(rec.get("sha256"), str)
              and len(rec["sha256"]) == 64 and type(rec.get("size")) is int
              and rec["size"] >= 0)
        if ok:
            try:
                check_name_key(rec.get("name"), rec.get("key"))
            except ValueError:
                ok = False
        if not ok or rel != f"{ENTRIES_DIR}/{entry_filename(rec['name'], rec['key'])}":
            raise CorruptEntry(f"{MANIFEST} has a malformed entry {shorten(rel)}")
    return manifest


class PrebuiltLayer:
    """One read-only layer (see the module docstring).

    ``keys``: the public keys a signature must verify with; None reads ``MOEGEN_TRUSTED_KEYS``
    when the layer is first checked; an empty list turns signing off.
    """

    def __init__(self, root: Path, keys: list | None = None):
        self.root = Path(root)
        self._keys = keys
        self._problem: str | None = None
        self._checked = False
        self._signed: dict[str, str] | None = None     # rel -> sha256 when signing is on

    def problem(self) -> str | None:
        """Why this layer is not used (checked once per process), or None."""
        if not self._checked:
            self._problem = (trust.check_path(self.root, what="prebuilt directory",
                                              allow_root=True, kind="dir")
                             or trust.check_path(self.root / ENTRIES_DIR, what="prebuilt directory",
                                                 allow_root=True, kind="dir")
                             or self._check_signature())
            self._checked = True
        return self._problem

    def _check_signature(self) -> str | None:
        if self._keys is None and not settings.trusted_key_files():
            return None
        from . import signing  # cryptography adds ~50 ms to every import; needed only here
        try:
            keys = signing.trusted_keys() if self._keys is None else self._keys
        except signing.SigningError as exc:
            return f"{TRUSTED_KEYS_ENV}: {exc}"
        if not keys:
            return None
        try:
            with open_regular(self.root / MANIFEST, what="manifest", allow_root=True,
                              max_size=MAX_MANIFEST) as fh:
                raw = fh.read()
            try:
                with open_regular(self.root / SIGNATURE, what="signature",
                                  allow_root=True, max_size=MAX_SIGNATURE) as fh:
                    sig = fh.read()
            except FileNotFoundError:
                sig = None
            why = signing.verify(raw, sig, keys)
            if why:
                return f"{why} ({TRUSTED_KEYS_ENV} is set)"
            manifest = check_manifest(raw)
        except FileNotFoundError:
            return f"it has no {MANIFEST} to check its signature ({TRUSTED_KEYS_ENV} is set)"
        except CorruptEntry as exc:
            return str(exc)
        self._signed = {rel: rec["sha256"] for rel, rec in manifest["entries"].items()}
        return None

    def path_of(self, name: str, key: str) -> Path:
        return self.root / ENTRIES_DIR / entry_filename(name, key)

    def read(self, name: str, key: str) -> bytes | None:
        """The raw frame for (name, key) or None when absent.  Raises CorruptEntry when the file
        is not trustworthy, or (signing on) not the one the signed manifest lists."""
        path = self.path_of(name, key)
        try:
            with open_regular(path, allow_root=True) as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        if self._signed is not None:
            want = self._signed.get(f"{ENTRIES_DIR}/{path.name}")
            if want is None:
                raise CorruptEntry("not listed in the layer's signed manifest")
            if hashlib.sha256(data).hexdigest() != want:
                raise CorruptEntry("does not match the sha256 in the layer's signed manifest "
                                   "(altered or forged)")
        return data

    def get(self, name: str, key: str) -> Artifact | None:
        if self.problem():
            return None
        data = self.read(name, key)
        return None if data is None else decode(data, name, key)

    def headers(self):
        """(path, header) of every entry file whose header reads (for listings)."""
        for path in self.files():
            try:
                with open_regular(path, allow_root=True) as fh:
                    yield path, read_header(fh)
            except (OSError, CorruptEntry):
                continue

    def verify(self) -> list[tuple[str, str]]:
        """(file name, problem) for every entry file that fails a complete check."""
        out = []
        for path in self.files():
            stem = path.name[:-len(ENTRY_SUFFIX)]
            try:
                with open_regular(path, allow_root=True) as fh:
                    hdr = read_header(fh)
                if entry_name(hdr.name, hdr.key) != stem:
                    raise CorruptEntry(f"file name does not match its header "
                                       f"({shorten(entry_name(hdr.name, hdr.key))})")
                check_name_key(hdr.name, hdr.key)
                if self.get(hdr.name, hdr.key) is None:
                    raise CorruptEntry("vanished while checking")
            except (OSError, CorruptEntry, ValueError) as exc:
                out.append((shorten(path.name, quote=False), str(exc)))
        return out

    def files(self) -> list[Path]:
        """Every entry file (for listings and verify; not on the lookup path)."""
        d = self.root / ENTRIES_DIR
        try:
            return sorted(p for p in d.iterdir() if p.name.endswith(ENTRY_SUFFIX))
        except OSError:
            return []
