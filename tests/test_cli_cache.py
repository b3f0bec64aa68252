"""``moegen cache ...`` through click's CliRunner."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest
from click.testing import CliRunner

import moegen.cache as cache_mod
from moegen.backends.base import Artifact
from moegen.cache import KernelCache, digest
from moegen.cli.cache import cache, parse_size
from moegen.spec import MoESpec

SPEC = MoESpec(num_experts=8, top_k=2, hidden_dim=64, backend="c")


def fake_key_parts(spec: MoESpec) -> dict:
    return {"format": 1, "backend": spec.backend, "target": "x86-64-v3",
            "templates": {"a.jinja": "0" * 64}, "spec": spec.to_dict(),
            "toolchain": {"cc": "gcc"}}


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    cache_mod._warned.clear()
    for var in ("MOEGEN_OFFLINE", "MOEGEN_ALWAYS_COMPILE", "MOEGEN_PREBUILT_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MOEGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("moegen.jit.key_parts", fake_key_parts)


def run(*args, input=None):
    return CliRunner().invoke(cache, list(args), input=input, catch_exceptions=False)


def put(i=0, name=None, created=None, **meta):
    spec_name = name or SPEC.name
    key = digest(fake_key_parts(SPEC)) if i == 0 else digest({"i": i})
    cache_mod.default_cache().put(spec_name, key, Artifact(
        bytes([i]) * 100, {"backend": "c", "target": "x86-64-v3",
                           "created": created or time.time(), **meta}))
    return key


def test_ls_empty_and_filled():
    r = run("ls")
    assert r.exit_code == 0 and "no entries" in r.output
    key = put()
    r = run("ls")
    assert r.exit_code == 0 and f"{SPEC.name}.{key[:16]}" in r.output and "x86-64-v3" in r.output
    data = json.loads(run("ls", "--json").output)
    assert data[0]["key"] == key and data[0]["layer"] == "cache"


def test_info(tmp_path):
    put()
    r = run("info")
    assert r.exit_code == 0 and str(tmp_path / "cache") in r.output
    assert "entries:         1" in r.output
    data = json.loads(run("info", "--json").output)
    assert data["trusted"] and data["entries"] == 1 and data["prebuilt"] == []


def test_info_reports_refused_directory(tmp_path, monkeypatch):
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    monkeypatch.setenv("MOEGEN_CACHE_DIR", str(d))
    with pytest.warns(cache_mod.CacheWarning):
        r = run("info")
    assert r.exit_code == 0 and "refused" in r.output and "world-writable" in r.output


def test_explain_shows_parts_and_match():
    r = run("explain", "--experts", "8", "--topk", "2", "--hidden", "64", "--backend", "c")
    assert r.exit_code == 0, r.output
    key = digest(fake_key_parts(SPEC))
    assert key in r.output and "cached: no" in r.output and "1 files, digest" in r.output
    put()
    put(7, target="sm_90")                       # another key under the same name
    r = run("explain", "--experts", "8", "--topk", "2", "--hidden", "64", "--backend", "c")
    assert "cached: yes, in cache" in r.output
    assert f"other entry {SPEC.name}.{digest({'i': 7})[:16]}" in r.output
    data = json.loads(run("explain", "--json", "-e", "8", "-k", "2", "--hidden", "64",
                          "--backend", "c").output)
    assert data["key"] == key and data["cached_in"] == ["cache"] and len(data["other_keys"]) == 1


def test_explain_bad_spec_exits_non_zero():
    r = CliRunner().invoke(cache, ["explain", "--experts", "8", "--topk", "9", "--hidden", "64"])
    assert r.exit_code != 0 and "top_k" in r.output
    r = CliRunner().invoke(cache, ["explain", "--experts", "8"])
    assert r.exit_code != 0 and "--topk" in r.output


def test_verify_clean_dirty_repair():
    key = put()
    assert run("verify").exit_code == 0
    directory = cache_mod.default_cache().directory
    con = sqlite3.connect(str(directory / "cache.db"))
    with con:
        con.execute("UPDATE Cache SET value = ? WHERE key = ?",
                    (sqlite3.Binary(b"MOEGENK1 broken"), f"{SPEC.name}.{key}"))
    con.close()
    r = CliRunner().invoke(cache, ["verify"])
    assert r.exit_code == 1 and "--repair" in r.output
    r = CliRunner().invoke(cache, ["verify", "--repair"])
    assert r.exit_code == 0 and "repaired 1 of 1" in r.output
    assert run("verify").exit_code == 0


def test_clear_confirms():
    put()
    r = CliRunner().invoke(cache, ["clear"], input="n\n")
    assert r.exit_code == 1 and len(cache_mod.default_cache().entries()) == 1
    r = run("clear", "--yes")
    assert r.exit_code == 0 and "removed 1 entries" in r.output
    assert cache_mod.default_cache().entries() == []


def test_prune():
    put(1, created=time.time() - 30 * 86400)
    put(2)
    r = CliRunner().invoke(cache, ["prune"])
    assert r.exit_code == 2 and "--older-than" in r.output
    r = run("prune", "--older-than", "7")
    assert r.exit_code == 0 and "removed 1 entries" in r.output
    r = run("prune", "--max-size", "0")
    assert r.exit_code == 0 and "removed 1 entries" in r.output
    assert CliRunner().invoke(cache, ["prune", "--max-size", "lots"]).exit_code == 2


@pytest.mark.parametrize("text,n", [("1024", 1024), ("2k", 2048), ("1.5M", 1572864),
                                    ("2GiB", 2 << 30), ("3 gb", 3 << 30)])
def test_parse_size(text, n):
    assert parse_size(text) == n


def test_export_import(tmp_path, monkeypatch):
    put(1)
    put(2, name="moe_other")
    r = run("export", str(tmp_path / "k.tar.gz"))
    assert r.exit_code == 0 and "exported 2 entries" in r.output
    r = run("export", str(tmp_path / "one.tar.gz"), "--name", "moe_other")
    assert "exported 1 entries" in r.output
    r = CliRunner().invoke(cache, ["export", str(tmp_path / "x.tar.gz"), "--name", "nope"])
    assert r.exit_code == 1 and "nope" in r.output

    monkeypatch.setenv("MOEGEN_CACHE_DIR", str(tmp_path / "other"))
    r = run("import", str(tmp_path / "k.tar.gz"))
    assert r.exit_code == 0 and "imported 2 entries" in r.output
    assert len(KernelCache(tmp_path / "other", prebuilt=[]).entries()) == 2
    r = run("import", str(tmp_path / "k.tar.gz"), "--prebuilt", str(tmp_path / "layer"))
    assert r.exit_code == 0 and "MOEGEN_PREBUILT_DIR" in r.output
    assert CliRunner().invoke(cache, ["import", str(tmp_path / "k.tar.gz"), "--prebuilt",
                                      str(tmp_path / "layer")]).exit_code == 1
    assert run("import", str(tmp_path / "k.tar.gz"), "--prebuilt", str(tmp_path / "layer"),
               "--replace").exit_code == 0


def test_import_rejects_bad_archive(tmp_path):
    (tmp_path / "bad.tar.gz").write_bytes(b"\x1f\x8b garbage")
    r = CliRunner().invoke(cache, ["import", str(tmp_path / "bad.tar.gz")])
    assert r.exit_code == 1 and "rejected" in r.output


def test_registered_on_main_cli():
    from moegen.cli import main
    r = CliRunner().invoke(main, ["cache", "ls"])
    assert r.exit_code == 0 and "no entries" in r.output
