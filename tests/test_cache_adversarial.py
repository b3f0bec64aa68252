"""The kernel cache against someone who can write to it (issue 9, items 12-17).

Each test plants what an attacker (or a full disk) leaves behind and checks that it is a miss,
a refusal or a one-line warning: never a crash, a hang, a load, or a deletion outside the cache.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import sqlite3
import stat
import struct
import tarfile
import threading
import time
import tracemalloc
from pathlib import Path

import diskcache
import filelock
import pytest
from click.testing import CliRunner

from cache_rows import plant  # tests/cache_rows.py
import moegen
import moegen.cache as cache_mod
from moegen import signing
from moegen.archive import export_archive, extract_archive, import_archive
from moegen.backends import get_backend
from moegen.backends.base import Artifact
from moegen.cache import CacheWarning, KernelCache, digest, is_bad_binary
from moegen.cache_format import ENTRIES_DIR, MAGIC, encode, entry_filename
from moegen.cli import main as cli_main
from moegen.errors import CacheError
from moegen.jit import clear_memo

NAME = "moe_e8_k2_h512_f2048_f32_swiglu"
KEY = digest({"adversarial": 1})
BIG = 100_000                    # > diskcache's 32 KiB: the value lives in a .val file


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    cache_mod._warned.clear()
    for var in ("MOEGEN_OFFLINE", "MOEGEN_ALWAYS_COMPILE", "MOEGEN_PREBUILT_DIR",
                signing.TRUSTED_KEYS_ENV):
        monkeypatch.delenv(var, raising=False)


def art(fill=b"a", size=BIG, created=None) -> Artifact:
    return Artifact(fill * size, {"backend": "c", "target": "x86-64-v3",
                                  "created": time.time() if created is None else created})


def new_cache(tmp_path, name="cache") -> KernelCache:
    kc = KernelCache(tmp_path / name, prebuilt=[])
    kc.put("moe_ok", digest({"ok": 1}), art(b"o", size=10))      # inline: no .val file
    return kc


def outside_file(tmp_path, data=b"precious") -> Path:
    """A file alone in two folders outside the cache: deleting it would also delete them."""
    f = tmp_path / "victim" / "deep" / "secret.val"
    f.parent.mkdir(parents=True)
    f.write_bytes(data)
    return f


def frame_with_header(header: bytes, binary: bytes = b"x") -> bytes:
    body = MAGIC + struct.pack(">I", len(header)) + header + binary
    return body + hashlib.sha256(body).digest()


# -- 12: row file names that leave the cache --------------------------------------------------

@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_planted_filename_outside_the_cache_is_never_read_or_deleted(tmp_path, how):
    victim = outside_file(tmp_path, encode(NAME, KEY, art(b"v", created=1.0)))
    kc = new_cache(tmp_path)
    name = str(victim) if how == "absolute" else os.path.relpath(victim, kc.directory)
    plant(kc.directory, key=f"{NAME}.{KEY}", filename=name)
    with pytest.warns(CacheWarning, match="refused"):
        assert kc.get(NAME, KEY) is None                       # read: refused, a miss
    plant(kc.directory, key=f"{NAME}.{KEY}", filename=name)
    assert all(e.name != NAME for e in kc.entries())           # listing does not follow it
    assert kc.prune(older_than=0) >= 0                         # prune: never reaches it
    assert any("refused" in p.message for p in kc.verify())
    kc.verify(repair=True)                                     # verify --repair: row only
    plant(kc.directory, key=f"{NAME}.{KEY}", filename=name)
    assert kc.get_or_build(NAME, KEY, lambda: art(b"n"))[1]    # a compile replaces the entry
    plant(kc.directory, key="moe_other." + KEY, filename=name)
    kc.clear()                                                 # clear
    assert victim.read_bytes()[:8] == MAGIC and victim.parent.parent.is_dir()


# -- 13: a resource error while loading is not a bad binary -----------------------------------

class CUDADriverError(RuntimeError):
    pass


@pytest.mark.parametrize("exc, bad", [
    (OSError(errno.ENOSPC, "No space left on device"), False),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), False),
    (OSError(errno.EMFILE, "Too many open files"), False),
    (OSError(errno.ENFILE, "Too many open files in system"), False),
    (OSError(errno.ENOMEM, "Cannot allocate memory"), False),
    (OSError(errno.EACCES, "Permission denied"), False),
    (OSError(errno.EROFS, "Read-only file system"), False),
    (MemoryError(), False),
    (OSError("/tmp/x.so: failed to map segment from shared object"), False),
    (CUDADriverError("cudaErrorNoDevice: no CUDA-capable device is detected"), False),
    (CUDADriverError("CUDA_ERROR_NO_DEVICE: no CUDA-capable device is detected"), False),
    (CUDADriverError("cudaErrorInsufficientDriver: CUDA driver version is insufficient"), False),
    (CUDADriverError("CUDA_ERROR_INVALID_IMAGE: device kernel image is invalid"), True),
    (CUDADriverError("CUDA_ERROR_NO_BINARY_FOR_GPU: no kernel image is available"), True),
    (OSError("/tmp/x.so: invalid ELF header"), True),
    (OSError("/tmp/x.so: wrong ELF class: ELFCLASS32"), True),
    (OSError(errno.ENOEXEC, "Exec format error"), True),
    (AttributeError("undefined symbol: moe_route"), True),
])
def test_is_bad_binary_tells_the_machine_from_the_binary(exc, bad):
    assert is_bad_binary(exc) is bad


def test_is_bad_binary_follows_the_cause():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("could not load the module") from inner
    except RuntimeError as outer:
        assert not is_bad_binary(outer)


def test_drop_if_bad_keeps_an_entry_for_enospc_and_drops_a_bad_image(tmp_path, caplog):
    kc = new_cache(tmp_path)
    kc.put(NAME, KEY, art())
    assert not kc.drop_if_bad(NAME, KEY, OSError(errno.ENOSPC, "No space left on device"))
    assert kc.get(NAME, KEY) is not None
    assert "entry is kept" in caplog.text and len(caplog.records[-1].getMessage().splitlines()) == 1
    with pytest.warns(CacheWarning, match="dropping"):
        assert kc.drop_if_bad(NAME, KEY, OSError("x.so: invalid ELF header"))
    assert kc.get(NAME, KEY) is None


def test_compile_keeps_a_good_kernel_when_tmpdir_is_full(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEGEN_CACHE_DIR", str(tmp_path / "cache"))
    spec = moegen.MoESpec(num_experts=4, top_k=2, hidden_dim=64, ffn_dim=128, backend="c")
    info = moegen.build(spec)
    created = cache_mod.default_cache().get(info.name, info.key).meta["created"]
    clear_memo()

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(type(get_backend("c")), "load", full)
    with pytest.raises(Exception) as err:
        moegen.compile(spec)
    assert len(str(err.value).splitlines()) == 1
    assert cache_mod.default_cache().get(info.name, info.key).meta["created"] == created


# -- 14: archive bombs and early mismatches ---------------------------------------------------

def one_entry_archive(tmp_path, size: int) -> Path:
    kc = KernelCache(tmp_path / "src", prebuilt=[])
    kc.put(NAME, KEY, Artifact(b"\0" * size, {"backend": "c"}))
    return Path(export_archive(kc, tmp_path / "k.tar.gz") and tmp_path / "k.tar.gz")


def test_archive_bomb_is_refused_from_its_declared_size_before_reading(tmp_path):
    path = one_entry_archive(tmp_path, 8 << 20)               # 8 MiB of zeros: ~8 KiB gzipped
    assert path.stat().st_size < 100_000
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])                     # the body could not even be read
    dst = KernelCache(tmp_path / "dst", prebuilt=[])
    with pytest.raises(CacheError, match="limit of 1048576 per entry"):
        import_archive(path, dst, max_entry=1 << 20)
    with pytest.raises(CacheError, match="limit of 4096 per entry"):
        extract_archive(path, tmp_path / "layer", max_entry=4096)
    assert dst.entries() == [] and not (tmp_path / "layer").exists()


def test_archive_total_limit(tmp_path):
    kc = KernelCache(tmp_path / "src", prebuilt=[])
    for i in range(3):
        kc.put(NAME, digest({"i": i}), Artifact(bytes([i]) * 5000, {"backend": "c"}))
    export_archive(kc, tmp_path / "k.tar.gz")
    with pytest.raises(CacheError, match="in all, more than the limit of 10000"):
        import_archive(tmp_path / "k.tar.gz", KernelCache(tmp_path / "d", prebuilt=[]),
                       max_total=10_000)


def rewrite(src: Path, dst: Path, edit) -> None:
    with tarfile.open(src) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(dst, "w:gz") as tar:
        for info, data in edit(members):
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_wrong_digest_stops_at_that_member(tmp_path):
    path = one_entry_archive(tmp_path, 1000)

    def wrong_sha(members):
        manifest = json.loads(members[0][1])
        for rec in manifest["entries"].values():
            rec["sha256"] = "0" * 64
        return [(members[0][0], json.dumps(manifest).encode())] + members[1:]
    rewrite(path, tmp_path / "bad.tar.gz", wrong_sha)
    with pytest.raises(CacheError, match="does not match its sha256"):
        import_archive(tmp_path / "bad.tar.gz", KernelCache(tmp_path / "d", prebuilt=[]))


def test_member_whose_header_names_another_entry_stops_before_its_body(tmp_path):
    path = one_entry_archive(tmp_path, 1000)
    other = encode(NAME, digest({"other": 1}), Artifact(b"\0" * 1000, {"backend": "c"}))

    def swap(members):
        n = len(members[1][1])
        return [members[0], (members[1][0], (other + b"\0" * n)[:n])]
    rewrite(path, tmp_path / "bad.tar.gz", swap)
    with pytest.raises(CacheError, match="header does not name the listed spec"):
        import_archive(tmp_path / "bad.tar.gz", KernelCache(tmp_path / "d", prebuilt=[]))


def test_import_holds_about_one_copy_of_an_entry(tmp_path):
    size = 48 << 20
    path = one_entry_archive(tmp_path, size)
    dst = KernelCache(tmp_path / "dst", prebuilt=[])
    dst.directory
    tracemalloc.start()
    try:
        import_archive(path, dst)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2.5 * size, f"peak {peak / size:.1f}x the entry"


# -- 15: FIFOs, hostile headers, planted settings, huge names ---------------------------------

def run_briefly(fn, seconds=10.0):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it does not return."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} hung"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _unblock(path: Path) -> None:
    """Open a FIFO for writing without blocking, to release a reader stuck on it."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def test_fifo_in_place_of_a_value_file_is_a_miss(tmp_path):
    kc = new_cache(tmp_path)
    kc.put(NAME, KEY, art())
    (val,) = kc.directory.rglob("*.val")
    val.unlink()
    os.mkfifo(val, 0o600)
    try:
        assert [e.name for e in run_briefly(kc.entries)] == ["moe_ok"]
        assert any("not a regular file" in p.message for p in run_briefly(kc.verify))
        with pytest.warns(CacheWarning, match="not a regular file"):
            assert run_briefly(lambda: kc.get(NAME, KEY)) is None
    finally:
        _unblock(val)


def test_fifo_in_a_prebuilt_layer_is_a_miss(tmp_path):
    layer = tmp_path / "layer"
    (layer / ENTRIES_DIR).mkdir(parents=True)
    fifo = layer / ENTRIES_DIR / entry_filename(NAME, KEY)
    os.mkfifo(fifo, 0o644)
    kc = KernelCache(tmp_path / "cache", prebuilt=[layer])
    try:
        with pytest.warns(CacheWarning, match="not a regular file"):
            assert run_briefly(lambda: kc.get(NAME, KEY)) is None
        assert run_briefly(kc.entries) == []
        assert run_briefly(kc.verify)
    finally:
        _unblock(fifo)


HOSTILE_HEADERS = {
    "deep": b'{"format":1,"meta":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "huge size": (b'{"format":1,"key":"' + KEY.encode() + b'","meta":{},"name":"' + NAME.encode()
                  + b'","sha256":"' + b"0" * 64 + b'","size":1e400}'),
    "wrong types": b'{"format":1,"key":1,"meta":[],"name":null,"sha256":2,"size":"x"}',
}


@pytest.mark.parametrize("which", sorted(HOSTILE_HEADERS))
def test_hostile_header_is_a_miss_everywhere(tmp_path, which):
    frame = frame_with_header(HOSTILE_HEADERS[which], b"\0" * BIG)
    kc = new_cache(tmp_path)
    kc._open().set(f"{NAME}.{KEY}", frame)
    with pytest.warns(CacheWarning):
        assert kc.get(NAME, KEY) is None
    kc._open().set(f"{NAME}.{KEY}", frame)
    assert [e.name for e in kc.entries()] == ["moe_ok"]
    assert any(NAME in p.entry for p in kc.verify())
    kc.prune(older_than=0)
    kc._open().set(f"{NAME}.{KEY}", frame)
    assert kc.get_or_build(NAME, KEY, lambda: art(b"r"))[1]
    layer = tmp_path / "layer"
    (layer / ENTRIES_DIR).mkdir(parents=True)
    (layer / ENTRIES_DIR / entry_filename(NAME, KEY)).write_bytes(frame)
    with_layer = KernelCache(tmp_path / "c2", prebuilt=[layer])
    with pytest.warns(CacheWarning, match="not usable"):
        assert with_layer.get(NAME, KEY) is None
    assert with_layer.entries() == [] and with_layer.verify()


def test_hostile_header_in_an_archive_is_refused(tmp_path):
    path = one_entry_archive(tmp_path, 1000)
    for header in HOSTILE_HEADERS.values():
        frame = frame_with_header(header)

        def plant_frame(members):
            manifest = json.loads(members[0][1])
            (rec,) = manifest["entries"].values()
            rec.update(size=len(frame), sha256=hashlib.sha256(frame).hexdigest())
            return [(members[0][0], json.dumps(manifest).encode()), (members[1][0], frame)]
        rewrite(path, tmp_path / "entry.tar.gz", plant_frame)
        rewrite(path, tmp_path / "manifest.tar.gz", lambda m: [(m[0][0], header)] + m[1:])
        for bad in ("entry.tar.gz", "manifest.tar.gz"):
            with pytest.raises(CacheError, match="rejected"):
                import_archive(tmp_path / bad, KernelCache(tmp_path / "d", prebuilt=[]))


def test_planted_settings_row_refuses_the_cache_in_one_line(tmp_path):
    kc = new_cache(tmp_path)
    kc.close()
    con = sqlite3.connect(str(kc.directory / "cache.db"))
    with con:
        con.execute("INSERT INTO Settings VALUES ('disk_evil', 1)")
    con.close()
    again = KernelCache(kc.directory, prebuilt=[])
    with pytest.warns(CacheWarning, match="Settings row") as rec:
        assert not again.trusted
    assert "disk_evil" in again.untrusted_reason and len(str(rec[0].message).splitlines()) == 1


def test_planted_value_of_a_known_setting_is_overridden(tmp_path):
    kc = new_cache(tmp_path)
    kc.put(NAME, KEY, art())
    kc.close()
    con = sqlite3.connect(str(kc.directory / "cache.db"))
    with con:
        con.execute("UPDATE Settings SET value = 'x' WHERE key = 'size_limit'")
        con.execute("UPDATE Settings SET value = 5 WHERE key = 'disk_min_file_size'")
    con.close()
    again = KernelCache(kc.directory, prebuilt=[])
    assert again.trusted and again.get(NAME, KEY).binary == art().binary
    assert again.put("moe_new", KEY, art(b"n"))


def test_huge_member_name_is_not_echoed_whole(tmp_path):
    path = one_entry_archive(tmp_path, 100)
    long_name = "entries/" + "a" * (20 << 20) + ".kernel"
    for edit in (lambda m: m + [(tarfile.TarInfo(long_name), b"x")],
                 lambda m: [(tarfile.TarInfo(long_name), b"x")] + m):
        rewrite(path, tmp_path / "bad.tar.gz", edit)
        with pytest.raises(CacheError) as err:
            import_archive(tmp_path / "bad.tar.gz", KernelCache(tmp_path / "d", prebuilt=[]))
        assert len(str(err.value)) < 1000 and "chars)" in str(err.value)


# -- 16: locks, full disks, orphans, modes --------------------------------------------------

def test_clear_keeps_the_lock_a_builder_waits_on(tmp_path):
    kc = new_cache(tmp_path)
    holder = filelock.FileLock(str(kc.directory / "locks" / f"{KEY}.lock"))
    (kc.directory / "locks").mkdir(exist_ok=True)
    holder.acquire()
    other = KernelCache(kc.directory, prebuilt=[])
    box = {}

    def build():
        try:
            box["built"] = other.get_or_build(NAME, KEY, lambda: art(b"w"))[1]
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc
    t = threading.Thread(target=build, daemon=True)
    t.start()
    time.sleep(0.5)
    kc.clear()
    time.sleep(0.5)
    assert (kc.directory / "locks").is_dir() and t.is_alive(), "the waiter got past a held lock"
    holder.release()
    t.join(20)
    assert box == {"built": True}


def test_full_disk_database_is_read_read_only(tmp_path, monkeypatch):
    kc = new_cache(tmp_path)
    kc.put(NAME, KEY, art())
    kc.close()
    real = diskcache.Cache

    def full(directory, *a, **k):
        if Path(directory) == kc.directory:
            raise sqlite3.OperationalError("database or disk is full")
        return real(directory, *a, **k)
    monkeypatch.setattr(diskcache, "Cache", full)
    again = KernelCache(kc.directory, prebuilt=[])
    with pytest.warns(CacheWarning, match="read-only"):
        assert again.get(NAME, KEY).binary == art().binary
    assert again.trusted and [e.name for e in again.entries()].count(NAME) == 1
    with pytest.warns(CacheWarning, match="could not store"):
        assert not again.put("moe_new", KEY, art(b"n"))


def test_orphan_value_files_are_removed_by_clear_and_repair(tmp_path):
    kc = new_cache(tmp_path)
    orphan = kc.directory / "ab" / "cd" / ("e" * 28 + ".val")
    young = kc.directory / "ab" / "cd" / ("f" * 28 + ".val")
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"half a store")
    young.write_bytes(b"being stored right now")
    os.utime(orphan, (time.time() - 3600,) * 2)
    victim = outside_file(tmp_path)
    assert any("orphan" in p.message for p in kc.verify())
    kc.verify(repair=True)
    assert not orphan.exists() and young.exists() and victim.exists()
    orphan.write_bytes(b"again")
    os.utime(orphan, (time.time() - 3600,) * 2)
    kc.clear()
    assert not orphan.exists() and victim.exists()
    assert not any("orphan" in p.message for p in kc.verify())


def test_a_store_never_writes_through_a_planted_folder_link(tmp_path, monkeypatch):
    kc = new_cache(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir(mode=0o755)
    for i in range(256):
        (kc.directory / f"{i:02x}").symlink_to(outside)
    with pytest.warns(CacheWarning, match="could not store"):
        assert not kc.put(NAME, KEY, art())
    assert list(outside.iterdir()) == [] and stat.S_IMODE(outside.stat().st_mode) == 0o755


def test_orphan_sweep_does_not_follow_a_linked_folder_outside(tmp_path):
    kc = new_cache(tmp_path)
    outside = tmp_path / "elsewhere" / "cd"
    outside.mkdir(parents=True)
    victim = outside / ("e" * 28 + ".val")
    victim.write_bytes(b"not the cache's")
    os.utime(victim, (time.time() - 3600,) * 2)
    (kc.directory / "ab").symlink_to(outside.parent)
    assert not any("orphan" in p.message for p in kc.verify(repair=True))
    kc.clear()
    assert victim.exists()


def test_umask_002_and_a_0755_folder_give_private_subfolders(tmp_path):
    d = tmp_path / "mine"
    d.mkdir(mode=0o755)
    old = os.umask(0o002)
    try:
        kc = KernelCache(d, prebuilt=[])
        for i in range(4):
            assert kc.get_or_build(NAME, digest({"u": i}), lambda: art(bytes([65 + i])))[1]
    finally:
        os.umask(old)
    made = [p for p in d.rglob("*") if p.is_dir()]
    assert made and all(stat.S_IMODE(p.stat().st_mode) == 0o700 for p in made)
    assert all(not p.stat().st_mode & 0o077 for p in d.rglob("*") if p.is_file())


# -- 17: signed archives and layers ------------------------------------------------------------

@pytest.fixture()
def keys(tmp_path):
    (tmp_path / "keys").mkdir()
    return signing.keygen(tmp_path / "keys" / "k")


def test_keygen_writes_a_private_key_0600_and_never_overwrites(keys):
    private, public = keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and public.exists()
    assert signing.key_id(signing.load_public_key(public)) == \
        signing.key_id(signing.load_private_key(private).public_key())
    with pytest.raises(signing.SigningError, match="never overwritten"):
        signing.keygen(private)


def signed_archive(tmp_path, private) -> Path:
    kc = KernelCache(tmp_path / "src", prebuilt=[])
    kc.put(NAME, KEY, art())
    export_archive(kc, tmp_path / "s.tar.gz", sign_key=private)
    return tmp_path / "s.tar.gz"


def test_import_verify_accepts_signed_and_refuses_unsigned_or_wrongly_signed(tmp_path, keys):
    private, public = keys
    pub = [signing.load_public_key(public)]
    path = signed_archive(tmp_path, private)
    assert import_archive(path, KernelCache(tmp_path / "a", prebuilt=[]), keys=pub)
    rewrite(path, tmp_path / "unsigned.tar.gz", lambda m: [m[0]] + m[2:])
    with pytest.raises(CacheError, match="not signed"):
        import_archive(tmp_path / "unsigned.tar.gz", KernelCache(tmp_path / "b", prebuilt=[]),
                       keys=pub)
    other_private, _ = signing.keygen(tmp_path / "other")
    export_archive(KernelCache(tmp_path / "src", prebuilt=[]), tmp_path / "o.tar.gz",
                   sign_key=other_private)
    with pytest.raises(CacheError, match="does not verify"):
        import_archive(tmp_path / "o.tar.gz", KernelCache(tmp_path / "c", prebuilt=[]), keys=pub)


def forge(frame_name: str, key: str) -> bytes:
    """A self-consistent entry with a different binary: every digest recomputed."""
    return encode(frame_name, key, Artifact(b"evil" * 1000, {"backend": "c"}))


def test_forged_self_consistent_archive_is_refused_when_signing_is_on(tmp_path, keys, monkeypatch):
    private, public = keys
    path = signed_archive(tmp_path, private)
    evil = forge(NAME, KEY)

    def forge_all(members):
        manifest = json.loads(members[0][1])
        (rec,) = manifest["entries"].values()
        rec.update(size=len(evil), sha256=hashlib.sha256(evil).hexdigest())
        return [(members[0][0], json.dumps(manifest).encode()), members[1], (members[2][0], evil)]
    rewrite(path, tmp_path / "forged.tar.gz", forge_all)
    dst = KernelCache(tmp_path / "dst", prebuilt=[])
    assert import_archive(tmp_path / "forged.tar.gz", dst, keys=[])   # digests alone: accepted
    monkeypatch.setenv(signing.TRUSTED_KEYS_ENV, str(public))
    with pytest.raises(CacheError, match="does not verify"):
        import_archive(tmp_path / "forged.tar.gz", KernelCache(tmp_path / "d2", prebuilt=[]))


def test_trusted_keys_make_layers_load_only_signed_entries(tmp_path, keys, monkeypatch):
    private, public = keys
    path = signed_archive(tmp_path, private)
    layer = extract_archive(path, tmp_path / "layer")
    monkeypatch.setenv(signing.TRUSTED_KEYS_ENV, str(public))
    assert KernelCache(tmp_path / "c1", prebuilt=[layer]).get(NAME, KEY).binary == art().binary
    # a forged, self-consistent entry file in a signed layer: refused, rebuilt
    entry = layer / ENTRIES_DIR / entry_filename(NAME, KEY)
    os.chmod(entry, 0o644)
    entry.write_bytes(forge(NAME, KEY))
    kc = KernelCache(tmp_path / "c2", prebuilt=[layer])
    with pytest.warns(CacheWarning, match="signed manifest"):
        assert kc.get(NAME, KEY) is None
    # ... and with the manifest rewritten to match, the signature fails: the layer is skipped
    manifest = json.loads((layer / "manifest.json").read_bytes())
    (rec,) = manifest["entries"].values()
    rec.update(sha256=hashlib.sha256(entry.read_bytes()).hexdigest(), size=entry.stat().st_size)
    (layer / "manifest.json").write_text(json.dumps(manifest))
    kc = KernelCache(tmp_path / "c3", prebuilt=[layer])
    with pytest.warns(CacheWarning, match="does not verify"):
        assert kc.get(NAME, KEY) is None
    assert any("does not verify" in p.message for p in kc.verify())
    # an unsigned layer is skipped too; without trusted keys it is used
    (layer / signing.SIGNATURE).unlink()
    cache_mod._warned.clear()
    with pytest.warns(CacheWarning, match="not signed"):
        assert KernelCache(tmp_path / "c4", prebuilt=[layer]).get(NAME, KEY) is None
    monkeypatch.delenv(signing.TRUSTED_KEYS_ENV)
    assert KernelCache(tmp_path / "c5", prebuilt=[layer]).get(NAME, KEY) is not None


def test_unreadable_trusted_key_skips_layers_instead_of_trusting_them(tmp_path, keys, monkeypatch):
    private, _ = keys
    layer = extract_archive(signed_archive(tmp_path, private), tmp_path / "layer")
    monkeypatch.setenv(signing.TRUSTED_KEYS_ENV, str(tmp_path / "typo.pub"))
    with pytest.warns(CacheWarning, match="MOEGEN_TRUSTED_KEYS"):
        assert KernelCache(tmp_path / "c", prebuilt=[layer]).get(NAME, KEY) is None


def test_cli_keygen_sign_and_verify(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEGEN_CACHE_DIR", str(tmp_path / "cache"))
    KernelCache(tmp_path / "cache", prebuilt=[]).put(NAME, KEY, art())
    run = CliRunner().invoke
    r = run(cli_main, ["keygen", str(tmp_path / "k")])
    assert r.exit_code == 0 and (tmp_path / "k.pub").exists(), r.output
    r = run(cli_main, ["cache", "export", str(tmp_path / "a.tar.gz"), "--sign", str(tmp_path / "k")])
    assert r.exit_code == 0 and "signed" in r.output, r.output
    r = run(cli_main, ["cache", "export", str(tmp_path / "u.tar.gz")])
    monkeypatch.setenv("MOEGEN_CACHE_DIR", str(tmp_path / "other"))
    r = run(cli_main, ["cache", "import", str(tmp_path / "a.tar.gz"), "--verify",
                       str(tmp_path / "k.pub")])
    assert r.exit_code == 0 and "imported 1" in r.output, r.output
    r = run(cli_main, ["cache", "import", str(tmp_path / "u.tar.gz"), "--verify",
                       str(tmp_path / "k.pub")])
    assert r.exit_code == 1 and "not signed" in r.output and "Traceback" not in r.output
    r = run(cli_main, ["cache", "import", str(tmp_path / "a.tar.gz"), "--max-entry-size", "1K"])
    assert r.exit_code == 1 and "per entry" in r.output


def test_cli_commands_survive_hostile_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEGEN_CACHE_DIR", str(tmp_path / "cache"))
    kc = new_cache(tmp_path)
    kc._open().set(f"{NAME}.{KEY}", frame_with_header(HOSTILE_HEADERS["deep"], b"\0" * BIG))
    kc._open().set(f"moe_big.{KEY}", frame_with_header(HOSTILE_HEADERS["huge size"]))
    plant(kc.directory, key="moe_out." + KEY, filename=str(outside_file(tmp_path)))
    kc.close()
    run = CliRunner().invoke
    for args, code in ((["ls"], 0), (["info"], 0), (["verify"], 1),
                       (["prune", "--older-than", "0"], 0), (["verify", "--repair"], 0),
                       (["clear", "--yes"], 0)):
        r = run(cli_main, ["cache", *args])
        assert r.exit_code == code, (args, r.output, r.exception)
        assert r.exception is None or isinstance(r.exception, SystemExit), (args, r.exception)
    assert (tmp_path / "victim" / "deep" / "secret.val").exists()
