"""Ed25519 signatures over kernel archive manifests (``moegen keygen``, ``cache export --sign``,
``cache import --verify``, ``MOEGEN_TRUSTED_KEYS``).

The digests inside entries and manifests detect accidents only: whoever can write an archive or
a prebuilt layer can recompute them.  A signature cannot be recomputed without the private key.
What is signed is the exact bytes of ``manifest.json``, which lists the sha256 of every entry
file, so one signature covers the whole archive or layer.  It travels next to the manifest as
``manifest.sig``::

    {"algorithm": "ed25519", "key_id": "<sha256 of the raw public key, 16 hex>",
     "signature": "<128 hex>"}

Keys are PEM files: the private key PKCS#8 (written 0600), the public key SubjectPublicKeyInfo.
``MOEGEN_TRUSTED_KEYS`` is a list of public key files separated by ``os.pathsep``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .cache_layers import MAX_SIGNATURE, SIGNATURE, TRUSTED_KEYS_ENV
from . import settings
from .errors import CacheError

__all__ = ["ALGORITHM", "MAX_SIGNATURE", "SIGNATURE", "TRUSTED_KEYS_ENV", "SigningError",
           "key_id", "keygen", "load_private_key", "load_public_key", "public_path", "sign",
           "trusted_keys", "verify"]

ALGORITHM = "ed25519"
MAX_KEY_FILE = 64 << 10


class SigningError(CacheError):
    """A key cannot be read or written, or a signature does not verify."""


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public: Ed25519PublicKey) -> str:
    """A short name for a public key: 16 hex digits of the sha256 of its raw bytes."""
    return hashlib.sha256(_raw(public)).hexdigest()[:16]


def public_path(private_path: str | Path) -> Path:
    """Where `keygen` writes the public key of ``private_path``: the same name + ``.pub``."""
    return Path(f"{private_path}.pub")


def keygen(out: str | Path) -> tuple[Path, Path]:
    """Write a new Ed25519 private key to ``out`` (mode 0600, never over an existing file) and
    its public key to ``out.pub``; returns both paths.  Raises SigningError."""
    out = Path(out)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    pub = public_path(out)
    for path, data, mode in ((out, private, 0o600), (pub, public, 0o644)):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        except OSError as exc:
            raise SigningError(f"keygen: cannot create {path}: {exc.strerror or exc} (an "
                               f"existing key is never overwritten)") from None
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
    return out, pub


def _read_key_file(path: str | Path, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise SigningError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE:
        raise SigningError(f"the {what} {path} is larger than {MAX_KEY_FILE} bytes")
    return data


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    data = _read_key_file(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"the private key {path} is not an unencrypted PEM key "
                           f"({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"the private key {path} is {type(key).__name__}, expected Ed25519 "
                           f"(make one with `moegen keygen`)")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    data = _read_key_file(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"the public key {path} is not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"the public key {path} is {type(key).__name__}, expected Ed25519 "
                           f"(the .pub file `moegen keygen` writes)")
    return key


def trusted_keys() -> list[Ed25519PublicKey]:
    """The public keys named by ``MOEGEN_TRUSTED_KEYS`` (empty when unset): signing is then
    required of every prebuilt layer and imported archive.  Raises SigningError for a key file
    that cannot be read, so a typo never silently turns the check off."""
    return [load_public_key(p) for p in settings.trusted_key_files()]


def sign(manifest: bytes, key: Ed25519PrivateKey) -> bytes:
    """The ``manifest.sig`` contents for the exact ``manifest`` bytes."""
    record = {"algorithm": ALGORITHM, "key_id": key_id(key.public_key()),
              "signature": key.sign(manifest).hex()}
    return json.dumps(record, sort_keys=True).encode()


def verify(manifest: bytes, signature: bytes | None, keys: list[Ed25519PublicKey]) -> str | None:
    """None when ``signature`` is a valid ``manifest.sig`` for ``manifest`` by one of ``keys``,
    else why not (one line)."""
    if signature is None:
        return f"it is not signed (no {SIGNATURE}) and signing is required"
    try:
        record = json.loads(signature[:MAX_SIGNATURE].decode("utf-8"))
        sig = bytes.fromhex(record["signature"])
        algorithm = record["algorithm"]
    except (ValueError, KeyError, TypeError, RecursionError, AttributeError):
        return f"its {SIGNATURE} is unreadable"
    if algorithm != ALGORITHM:
        return f"its {SIGNATURE} uses {algorithm!r:.40}, expected {ALGORITHM!r}"
    for key in keys:
        try:
            key.verify(sig, manifest)
            return None
        except InvalidSignature:
            continue
    return (f"its signature (key {str(record.get('key_id'))[:16]}) does not verify with any "
            f"trusted key ({', '.join(key_id(k) for k in keys) or 'none'})")
