"""KernelCache: round trips, integrity, settings, prebuilt layers, maintenance."""

from __future__ import annotations

import errno
import hashlib
import os
import sqlite3
import time
from pathlib import Path

import diskcache
import pytest

import moegen.cache as cache_mod
from moegen.backends.base import Artifact
from moegen.cache import CacheWarning, KernelCache, default_cache, digest
from moegen.cache_format import encode, entry_filename, ENTRIES_DIR
from moegen.errors import CacheError, MissingKernelError

NAME = "moe_e8_k2_h512_f2048_f32_swiglu"


def key_of(i) -> str:
    return digest({"test": i})


def art(i=0, size=64, **meta) -> Artifact:
    payload = hashlib.sha256(str(i).encode()).digest() * (size // 32 + 1)
    return Artifact(payload[:size], {"backend": "c", "target": "x86-64-v3",
                                     "created": time.time(), **meta})


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    cache_mod._warned.clear()
    for var in ("MOEGEN_OFFLINE", "MOEGEN_ALWAYS_COMPILE", "MOEGEN_PREBUILT_DIR"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def kc(tmp_path):
    c = KernelCache(tmp_path / "cache", prebuilt=[])
    yield c
    c.close()


def db_rows(directory: Path):
    con = sqlite3.connect(str(directory / "cache.db"))
    try:
        return con.execute("SELECT key, mode, filename, value FROM Cache").fetchall()
    finally:
        con.close()


def rewrite_stored(directory: Path, skey: str, transform) -> None:
    """Replace the stored frame of ``skey`` by ``transform(frame)``, wherever diskcache keeps it."""
    con = sqlite3.connect(str(directory / "cache.db"))
    try:
        (mode, filename, value), = con.execute(
            "SELECT mode, filename, value FROM Cache WHERE key = ?", (skey,)).fetchall()
        if filename:
            path = directory / filename
            path.write_bytes(transform(path.read_bytes()))
        else:
            with con:
                con.execute("UPDATE Cache SET value = ? WHERE key = ?",
                            (sqlite3.Binary(transform(bytes(value))), skey))
    finally:
        con.close()


# -- digest -----------------------------------------------------------------------------------

def test_digest_is_canonical_json_sha256():
    a = digest({"b": 1, "a": [1, 2], "c": {"y": 1, "x": 2}})
    b = digest({"c": {"x": 2, "y": 1}, "a": [1, 2], "b": 1})
    assert a == b and len(a) == 64
    assert a == hashlib.sha256(b'{"a":[1,2],"b":1,"c":{"x":2,"y":1}}').hexdigest()


def test_digest_changes_with_any_part_and_rejects_non_json():
    assert digest({"a": 1}) != digest({"a": 2}) != digest({"a": 1, "b": None})
    with pytest.raises(TypeError):
        digest({"a": object()})


# -- basics -----------------------------------------------------------------------------------

def test_init_does_no_io(tmp_path):
    KernelCache(tmp_path / "never", prebuilt=[tmp_path / "also-never"])
    assert not (tmp_path / "never").exists()


def test_directory_created_private(kc, tmp_path):
    assert kc.directory == tmp_path / "cache"
    assert kc.trusted
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("size", [10, 100_000], ids=["inline", "file"])
def test_put_get_roundtrip(kc, size):
    k = key_of(1)
    assert kc.get(NAME, k) is None
    a = art(1, size)
    assert kc.put(NAME, k, a) is True
    got = kc.get(NAME, k)
    assert got.binary == a.binary
    assert got.meta["key"] == k and got.meta["spec_name"] == NAME
    assert got.meta["target"] == "x86-64-v3"


def test_entries_listing(kc):
    for i in range(3):
        kc.put(NAME, key_of(i), art(i, 50_000 if i else 10))
    infos = sorted(kc.entries(), key=lambda e: e.key)
    assert {e.key for e in infos} == {key_of(i) for i in range(3)}
    e = infos[0]
    assert e.name == NAME and e.backend == "c" and e.target == "x86-64-v3"
    assert e.layer == "cache" and e.writable and e.entry == f"{NAME}.{e.key[:16]}"
    assert e.size > 10


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", "x" * 300])
def test_rejects_unsafe_names(kc, bad):
    with pytest.raises(ValueError, match="entry name"):
        kc.get(bad, key_of(0))


@pytest.mark.parametrize("bad", ["abc", "G" * 64, key_of(0).upper()])
def test_rejects_malformed_keys(kc, bad):
    with pytest.raises(ValueError, match="64 lowercase hex"):
        kc.put(NAME, bad, art())


# -- integrity --------------------------------------------------------------------------------

CORRUPTIONS = {
    "truncated": lambda b: b[: len(b) // 2],
    "zero-length": lambda b: b"",
    "flip-binary": lambda b: b[:-40] + bytes([b[-40] ^ 1]) + b[-39:],
    "flip-header": lambda b: b.replace(b"x86-64-v3", b"x86-64-v4", 1),
    "padded": lambda b: b + b"\0",
    "garbage": lambda b: os.urandom(len(b)),
    "foreign": lambda b: encode(NAME, key_of(99), art(99, 100_000)),
}


@pytest.mark.parametrize("size", [10, 100_000], ids=["inline", "file"])
@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_corrupt_entry_is_a_miss_warned_once_and_dropped(kc, how, size):
    k = key_of(1)
    kc.put(NAME, k, art(1, size))
    rewrite_stored(kc.directory, f"{NAME}.{k}", CORRUPTIONS[how])
    with pytest.warns(CacheWarning, match="dropping"):
        assert kc.get(NAME, k) is None
    assert kc.entries() == []            # dropped from the store
    # rebuilt on the next request, and no further warning
    a, built = kc.get_or_build(NAME, k, lambda: art(1, size))
    assert built and kc.get(NAME, k).binary == a.binary


def test_bad_entry_never_crash_loops(kc):
    k = key_of(1)
    builds = []

    def build():
        builds.append(1)
        return art(1, 100)

    kc.put(NAME, k, art(1, 100))
    for _ in range(3):
        rewrite_stored(kc.directory, f"{NAME}.{k}", CORRUPTIONS["truncated"])
        with pytest.warns(CacheWarning) if not builds else _nowarn():
            a, built = kc.get_or_build(NAME, k, build)
        assert built
    assert len(builds) == 3


class _nowarn:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# -- get_or_build -----------------------------------------------------------------------------

def test_get_or_build_builds_once(kc):
    calls = []

    def build():
        calls.append(1)
        return art(5)

    a1, b1 = kc.get_or_build(NAME, key_of(5), build)
    a2, b2 = kc.get_or_build(NAME, key_of(5), build)
    assert (b1, b2) == (True, False) and len(calls) == 1
    assert a1.binary == a2.binary and a1.meta["key"] == key_of(5)
    assert KernelCache(kc.directory, prebuilt=[]).get(NAME, key_of(5)).binary == a1.binary


def test_always_compile_rebuilds_and_stores(kc, monkeypatch):
    kc.put(NAME, key_of(5), art(5))
    monkeypatch.setenv("MOEGEN_ALWAYS_COMPILE", "1")
    new = art(6)
    a, built = kc.get_or_build(NAME, key_of(5), lambda: new)
    assert built and a.binary == new.binary
    assert kc.get(NAME, key_of(5)).binary == new.binary


def test_offline_miss_raises_with_name_and_command(kc, monkeypatch):
    monkeypatch.setenv("MOEGEN_OFFLINE", "1")
    with pytest.raises(MissingKernelError) as err:
        kc.get_or_build(NAME, key_of(7), lambda: pytest.fail("must not build"),
                        hint="--experts 8 --top-k 2 --hidden 512")
    msg = str(err.value)
    assert NAME in msg and "moegen build --experts 8 --top-k 2 --hidden 512" in msg
    assert "MOEGEN_OFFLINE" in msg and key_of(7)[:16] in msg


def test_offline_hit_is_served(kc, monkeypatch):
    kc.put(NAME, key_of(7), art(7))
    monkeypatch.setenv("MOEGEN_OFFLINE", "1")
    a, built = kc.get_or_build(NAME, key_of(7), lambda: pytest.fail("must not build"))
    assert not built and a.binary == art(7).binary


@pytest.mark.parametrize("bad", [b"raw bytes", Artifact(b"", {}), Artifact(b"x", {"f": object()}),
                                 Artifact(b"x", {"key": "0" * 64})],
                         ids=["not-artifact", "empty", "meta-not-json", "wrong-key"])
def test_build_returning_garbage_is_a_cache_error(kc, bad):
    with pytest.raises(CacheError, match=NAME):
        kc.get_or_build(NAME, key_of(8), lambda: bad)
    assert kc.get(NAME, key_of(8)) is None


def test_build_exception_propagates_and_stores_nothing(kc):
    def build():
        raise RuntimeError("compiler exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        kc.get_or_build(NAME, key_of(9), build)
    assert kc.get(NAME, key_of(9)) is None
    assert kc.get_or_build(NAME, key_of(9), lambda: art(9))[1]   # the lock was released


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"),
                                 sqlite3.OperationalError("database or disk is full")],
                         ids=["ENOSPC", "sqlite-full"])
def test_full_disk_warns_and_returns_artifact(kc, monkeypatch, exc):
    kc.directory  # open first

    def full(*args, **kwargs):
        raise exc

    monkeypatch.setattr(diskcache.Cache, "set", full)
    with pytest.warns(CacheWarning, match="disk is full"):
        a, built = kc.get_or_build(NAME, key_of(10), lambda: art(10))
    assert built and a.binary == art(10).binary
    monkeypatch.undo()
    assert kc.get(NAME, key_of(10)) is None


# -- drop -------------------------------------------------------------------------------------

def test_drop_then_rebuild(kc):
    kc.put(NAME, key_of(1), art(1))
    with pytest.warns(CacheWarning, match="failed to load"):
        kc.drop(NAME, key_of(1), "the binary failed to load")
    assert kc.get(NAME, key_of(1)) is None
    assert kc.get_or_build(NAME, key_of(1), lambda: art(2))[1]


# -- prebuilt layers --------------------------------------------------------------------------

def make_layer(root: Path, items) -> Path:
    (root / ENTRIES_DIR).mkdir(parents=True)
    for name, key, a in items:
        (root / ENTRIES_DIR / entry_filename(name, key)).write_bytes(encode(name, key, a))
    (root / "manifest.json").write_text("{}")
    return root


def snapshot(root: Path):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_prebuilt_searched_first_and_never_modified(tmp_path):
    layer = make_layer(tmp_path / "pre", [(NAME, key_of(1), art(100))])
    before = snapshot(layer)
    kc = KernelCache(tmp_path / "cache", prebuilt=[layer])
    kc.put(NAME, key_of(1), art(200))
    assert kc.get(NAME, key_of(1)).binary == art(100).binary
    a, built = kc.get_or_build(NAME, key_of(1), lambda: pytest.fail("must not build"))
    assert not built and a.binary == art(100).binary
    layers = {e.layer for e in kc.entries()}
    assert layers == {"cache", str(layer)}
    kc.clear()
    kc.prune(older_than=0, max_size=0)
    kc.verify(repair=True)
    assert snapshot(layer) == before


def test_prebuilt_via_environment(tmp_path, monkeypatch):
    a_layer = make_layer(tmp_path / "a", [])
    b_layer = make_layer(tmp_path / "b", [(NAME, key_of(1), art(1))])
    monkeypatch.setenv("MOEGEN_PREBUILT_DIR", os.pathsep.join([str(a_layer), str(b_layer)]))
    monkeypatch.setenv("MOEGEN_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("MOEGEN_OFFLINE", "1")
    a, built = default_cache().get_or_build(NAME, key_of(1), lambda: pytest.fail("no build"))
    assert a.binary == art(1).binary and not built


def test_corrupt_prebuilt_entry_is_skipped_not_deleted(tmp_path):
    layer = make_layer(tmp_path / "pre", [(NAME, key_of(1), art(1))])
    f = layer / ENTRIES_DIR / entry_filename(NAME, key_of(1))
    f.write_bytes(f.read_bytes()[:-5])
    kc = KernelCache(tmp_path / "cache", prebuilt=[layer])
    with pytest.warns(CacheWarning, match="left in place"):
        a, built = kc.get_or_build(NAME, key_of(1), lambda: art(2))
    assert built and f.exists()
    assert kc.get(NAME, key_of(1)).binary == art(2).binary
    assert any(p.entry == f.name for p in kc.verify())


def test_drop_shadows_prebuilt_copy_for_this_process(tmp_path):
    layer = make_layer(tmp_path / "pre", [(NAME, key_of(1), art(1))])
    kc = KernelCache(tmp_path / "cache", prebuilt=[layer])
    with pytest.warns(CacheWarning):
        kc.drop(NAME, key_of(1), "CUDA_ERROR_NO_BINARY_FOR_GPU")
    a, built = kc.get_or_build(NAME, key_of(1), lambda: art(2))
    assert built and kc.get(NAME, key_of(1)).binary == art(2).binary
    assert (layer / ENTRIES_DIR / entry_filename(NAME, key_of(1))).exists()


# -- maintenance ------------------------------------------------------------------------------

def test_clear(kc):
    for i in range(4):
        kc.put(NAME, key_of(i), art(i))
    assert kc.clear() == 4
    assert kc.entries() == []


def test_prune_by_age_and_size(kc):
    now = time.time()
    for i, age_days in enumerate([10, 5, 1, 0]):
        kc.put(NAME, key_of(i), art(i, 1000, created=now - age_days * 86400))
    assert kc.prune(older_than=7 * 86400) == 1
    assert {e.key for e in kc.entries()} == {key_of(1), key_of(2), key_of(3)}
    size = kc.entries()[0].size
    assert kc.prune(max_size=size * 2) == 1          # the oldest left goes
    assert {e.key for e in kc.entries()} == {key_of(2), key_of(3)}


def test_verify_clean_and_dirty(kc):
    kc.put(NAME, key_of(1), art(1))
    kc.put(NAME, key_of(2), art(2, 100_000))
    assert kc.verify() == []
    rewrite_stored(kc.directory, f"{NAME}.{key_of(2)}", CORRUPTIONS["flip-binary"])
    problems = kc.verify()
    assert len(problems) == 1 and key_of(2)[:16] in str(problems[0])
    assert "sha256" in problems[0].message
    kc.verify(repair=True)
    assert kc.verify() == [] and len(kc.entries()) == 1


# -- default cache ----------------------------------------------------------------------------

def test_default_cache_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEGEN_CACHE_DIR", str(tmp_path / "one"))
    a = default_cache()
    assert default_cache() is a and a.requested_directory == tmp_path / "one"
    monkeypatch.setenv("MOEGEN_CACHE_DIR", str(tmp_path / "two"))
    b = default_cache()
    assert b is not a and b.requested_directory == tmp_path / "two"
