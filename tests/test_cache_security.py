"""KernelCache against planted rows (pickles) and untrusted directories/files."""

from __future__ import annotations

import os
import pickle
import shutil
import sqlite3
from pathlib import Path

import diskcache
import pytest

import moegen.cache as cache_mod
import moegen.trust as trust
from cache_rows import plant  # tests/cache_rows.py
from moegen.backends.base import Artifact
from moegen.cache import CacheWarning, KernelCache, digest
from moegen.cache_format import ENTRIES_DIR, encode, entry_filename

NAME = "moe_e8_k2_h512_f2048_f32_swiglu"
KEY = digest({"security": 1})


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    cache_mod._warned.clear()
    for var in ("MOEGEN_OFFLINE", "MOEGEN_ALWAYS_COMPILE", "MOEGEN_PREBUILT_DIR"):
        monkeypatch.delenv(var, raising=False)


class Evil:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def new_cache(tmp_path, name="cache") -> KernelCache:
    kc = KernelCache(tmp_path / name, prebuilt=[])
    kc.put("moe_ok", digest({"ok": 1}), Artifact(b"fine", {"backend": "c"}))   # tables exist
    return kc


def evil_bytes(marker: Path) -> bytes:
    return pickle.dumps(Evil(marker), protocol=pickle.HIGHEST_PROTOCOL)


# -- planted pickles --------------------------------------------------------------------------

def test_planted_rows_really_run_code_in_stock_diskcache(tmp_path):
    """Control: the same planted row does run code through a plain diskcache.Cache, so the
    tests below would notice if moegen's Disk stopped refusing it."""
    marker = tmp_path / "pwned"
    kc = new_cache(tmp_path)
    plant(kc.directory, key=f"{NAME}.{KEY}", raw=1, mode=diskcache.core.MODE_PICKLE,
          value=sqlite3.Binary(evil_bytes(marker)))
    kc.close()
    stock = diskcache.Cache(str(kc.directory))
    stock.get(f"{NAME}.{KEY}")
    stock.close()
    assert marker.exists()


def test_planted_pickled_value_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    kc = new_cache(tmp_path)
    plant(kc.directory, key=f"{NAME}.{KEY}", raw=1, mode=diskcache.core.MODE_PICKLE,
          value=sqlite3.Binary(evil_bytes(marker)))
    with pytest.warns(CacheWarning, match="pickle"):
        assert kc.get(NAME, KEY) is None
    assert not marker.exists()
    assert kc.get_or_build(NAME, KEY, lambda: Artifact(b"real", {}))[1]
    assert kc.get(NAME, KEY).binary == b"real"
    assert not marker.exists()


def test_planted_pickled_value_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    kc = new_cache(tmp_path)
    (kc.directory / "ab").mkdir()
    (kc.directory / "ab" / "evil.val").write_bytes(evil_bytes(marker))
    plant(kc.directory, key=f"{NAME}.{KEY}", raw=1, mode=diskcache.core.MODE_PICKLE,
          filename="ab/evil.val")
    with pytest.warns(CacheWarning):
        assert kc.get(NAME, KEY) is None
    assert not marker.exists()


def test_planted_pickled_key_is_skipped_when_listing(tmp_path):
    marker = tmp_path / "pwned"
    kc = new_cache(tmp_path)
    plant(kc.directory, key=sqlite3.Binary(evil_bytes(marker)), raw=0,
          mode=diskcache.core.MODE_RAW, value=sqlite3.Binary(b"x"))
    names = [e.name for e in kc.entries()]
    assert names == ["moe_ok"]
    problems = kc.verify()
    assert any("planted row" in p.message for p in problems)
    assert kc.prune(older_than=0) == 1
    assert not marker.exists()


def test_verify_repair_removes_planted_rows(tmp_path):
    marker = tmp_path / "pwned"
    kc = new_cache(tmp_path)
    plant(kc.directory, key=sqlite3.Binary(evil_bytes(marker)), raw=0,
          mode=diskcache.core.MODE_RAW, value=sqlite3.Binary(b"x"))
    plant(kc.directory, key=f"{NAME}.{KEY}", raw=1, mode=diskcache.core.MODE_PICKLE,
          value=sqlite3.Binary(evil_bytes(marker)))
    assert len([p for p in kc.verify() if "planted" in p.message]) == 2
    kc.verify(repair=True)
    assert kc.verify() == []
    assert kc.clear() == 1 and not marker.exists()


def test_store_refuses_non_bytes(tmp_path):
    kc = new_cache(tmp_path)
    store = kc._open()
    for value in ({"a": 1}, "text", 3):
        with pytest.raises(TypeError):
            store.set("k", value)
    with pytest.raises(TypeError):
        store.set(("tuple", "key"), b"x")


# -- untrusted directories --------------------------------------------------------------------

def _assert_fallback(kc: KernelCache, refused: Path, why: str):
    with pytest.warns(CacheWarning, match=why):
        assert not kc.trusted
    assert kc.directory != refused
    assert kc.directory.stat().st_mode & 0o777 == 0o700
    assert why in kc.untrusted_reason
    a, built = kc.get_or_build(NAME, KEY, lambda: Artifact(b"bin", {}))
    assert built and kc.get(NAME, KEY).binary == b"bin"


def test_world_writable_dir_is_refused(tmp_path):
    d = tmp_path / "cache"
    d.mkdir()
    d.chmod(0o777)
    kc = KernelCache(d, prebuilt=[])
    _assert_fallback(kc, d, "world-writable")
    assert list(d.iterdir()) == []          # nothing written there


def test_group_writable_dir_is_refused(tmp_path):
    d = tmp_path / "cache"
    d.mkdir(mode=0o770)
    d.chmod(0o770)
    _assert_fallback(KernelCache(d, prebuilt=[]), d, "group- or world-writable")


def test_symlinked_dir_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "cache"
    link.symlink_to(real)
    _assert_fallback(KernelCache(link, prebuilt=[]), link, "symlink")
    assert list(real.iterdir()) == []


def test_foreign_owned_dir_is_refused(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    d.mkdir(mode=0o700)
    monkeypatch.setattr(trust, "current_uid", lambda: os.geteuid() + 4242)
    kc = KernelCache(d, prebuilt=[])
    with pytest.warns(CacheWarning, match="owned by uid"):
        assert not kc.trusted


def test_world_writable_database_is_refused(tmp_path):
    kc = new_cache(tmp_path)
    kc.close()
    (kc.directory / "cache.db").chmod(0o666)
    again = KernelCache(kc.directory, prebuilt=[])
    with pytest.warns(CacheWarning, match="cache database"):
        assert not again.trusted


@pytest.mark.parametrize("how", ["chmod", "symlink", "foreign"])
def test_untrusted_value_file_is_refused(tmp_path, monkeypatch, how):
    kc = new_cache(tmp_path)
    kc.put(NAME, KEY, Artifact(b"z" * 100_000, {}))          # file-backed
    (filename,), = sqlite3.connect(str(kc.directory / "cache.db")).execute(
        "SELECT filename FROM Cache WHERE key = ?", (f"{NAME}.{KEY}",)).fetchall()
    path = kc.directory / filename
    if how == "chmod":
        path.chmod(0o666)
    elif how == "symlink":
        copy = tmp_path / "elsewhere.val"
        shutil.copy(path, copy)
        path.unlink()
        path.symlink_to(copy)
    else:
        kc.directory  # opened and trusted already; only the file check sees the new uid
        real = os.geteuid()
        monkeypatch.setattr(trust, "current_uid", lambda: real + 4242)
    with pytest.warns(CacheWarning, match="dropping"):
        assert kc.get(NAME, KEY) is None


# -- prebuilt layers --------------------------------------------------------------------------

def make_layer(root: Path) -> Path:
    (root / ENTRIES_DIR).mkdir(parents=True)
    (root / ENTRIES_DIR / entry_filename(NAME, KEY)).write_bytes(
        encode(NAME, KEY, Artifact(b"pre", {})))
    return root


def test_world_writable_prebuilt_layer_is_skipped(tmp_path):
    layer = make_layer(tmp_path / "pre")
    layer.chmod(0o777)
    kc = KernelCache(tmp_path / "cache", prebuilt=[layer])
    with pytest.warns(CacheWarning, match="skipping prebuilt layer"):
        assert kc.get(NAME, KEY) is None


def test_world_writable_prebuilt_file_is_skipped(tmp_path):
    layer = make_layer(tmp_path / "pre")
    (layer / ENTRIES_DIR / entry_filename(NAME, KEY)).chmod(0o666)
    kc = KernelCache(tmp_path / "cache", prebuilt=[layer])
    with pytest.warns(CacheWarning, match="writable"):
        assert kc.get(NAME, KEY) is None


def test_symlinked_prebuilt_file_is_skipped(tmp_path):
    layer = make_layer(tmp_path / "pre")
    f = layer / ENTRIES_DIR / entry_filename(NAME, KEY)
    target = tmp_path / "target.kernel"
    f.rename(target)
    f.symlink_to(target)
    kc = KernelCache(tmp_path / "cache", prebuilt=[layer])
    with pytest.warns(CacheWarning):
        assert kc.get(NAME, KEY) is None


def test_root_owned_prebuilt_layer_is_trusted(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("needs files owned by root")
    layer = make_layer(tmp_path / "pre")
    monkeypatch.setattr(trust, "current_uid", lambda: 4242)       # we are "someone else"
    kc = KernelCache(tmp_path / "cache", prebuilt=[layer])
    assert kc.get(NAME, KEY).binary == b"pre"


def test_permissive_umask_still_gives_a_trusted_private_cache(tmp_path):
    old = os.umask(0o002)
    try:
        kc = KernelCache(tmp_path / "cache", prebuilt=[])
        kc.put(NAME, KEY, Artifact(b"u" * 100_000, {}))              # file-backed
        kc.close()
    finally:
        os.umask(old)
    for p in [tmp_path / "cache" / "cache.db", *(tmp_path / "cache").rglob("*.val")]:
        assert p.stat().st_mode & 0o022 == 0, p
    again = KernelCache(tmp_path / "cache", prebuilt=[])
    assert again.trusted and again.get(NAME, KEY).binary == b"u" * 100_000


def test_corrupt_database_falls_back_without_crashing(tmp_path):
    d = tmp_path / "cache"
    d.mkdir(mode=0o700)
    (d / "cache.db").write_bytes(b"this is not sqlite" * 100)
    (d / "cache.db").chmod(0o600)
    kc = KernelCache(d, prebuilt=[])
    with pytest.warns(CacheWarning, match="cannot be opened"):
        a, built = kc.get_or_build(NAME, KEY, lambda: Artifact(b"ok", {}))
    assert built and not kc.trusted and kc.directory != d
