"""moegen.deploy: model configs, build_many, export/import archives."""

from __future__ import annotations

import io
import json
import tarfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

import moegen.cache as cache_mod
import moegen.deploy as deploy
import moegen.jit as jit
from moegen.backends.base import Artifact
from moegen.cache import KernelCache, digest
from moegen.deploy import (BuildResult, ModelConfigWarning, build_many, expand_variants,
                           export_archive, extract_archive, format_summary, import_archive,
                           parse_model_config)
from moegen.errors import CacheError
from moegen.spec import MoESpec

DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    cache_mod._warned.clear()
    for var in ("MOEGEN_OFFLINE", "MOEGEN_ALWAYS_COMPILE", "MOEGEN_PREBUILT_DIR"):
        monkeypatch.delenv(var, raising=False)


# -- model configs ----------------------------------------------------------------------------

EXPECTED = {
    "mixtral_8x7b": dict(num_experts=8, top_k=2, hidden_dim=4096, ffn_dim=14336,
                         routing="softmax_topk", renormalize=True, dtype="bfloat16"),
    "qwen3_moe_30b_a3b": dict(num_experts=128, top_k=8, hidden_dim=2048, ffn_dim=768,
                              routing="softmax_topk", renormalize=True),
    "deepseek_v2_lite": dict(num_experts=64, top_k=6, hidden_dim=2048, ffn_dim=1408,
                             routing="softmax_topk", renormalize=False, num_shared_experts=2,
                             routed_scaling_factor=1.0),
    "deepseek_v3": dict(num_experts=256, top_k=8, hidden_dim=7168, ffn_dim=2048,
                        routing="sigmoid_topk", n_group=8, topk_group=4, renormalize=True,
                        routed_scaling_factor=2.5, num_shared_experts=1),
    "olmoe_1b_7b": dict(num_experts=64, top_k=8, hidden_dim=2048, ffn_dim=1024,
                        renormalize=False, dtype="float32"),
}


@pytest.mark.parametrize("model", sorted(EXPECTED))
def test_parse_model_config(model):
    (fields,) = parse_model_config(DATA / f"{model}.json")
    for k, v in EXPECTED[model].items():
        assert fields[k] == v, k
    spec = MoESpec(**fields)
    assert spec.activation == "swiglu" and spec.backend == "auto"


def test_parse_accepts_dict_directory_and_overrides(tmp_path):
    cfg = json.loads((DATA / "mixtral_8x7b.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert parse_model_config(cfg) == parse_model_config(tmp_path)
    (f,) = parse_model_config(cfg, dtype="float16", backend="c")
    assert f["dtype"] == "float16" and f["backend"] == "c"


def test_qwen2_gated_shared_expert():
    (f,) = parse_model_config(DATA / "qwen2_moe_a2_7b.json")
    assert f["num_experts"] == 60 and f["top_k"] == 4 and f["ffn_dim"] == 1408
    assert f["num_shared_experts"] == 4 and f["shared_expert_gate"] is True   # 5632 = 4 x 1408
    assert f["renormalize"] is False
    cfg = json.loads((DATA / "qwen2_moe_a2_7b.json").read_text())
    cfg["shared_expert_intermediate_size"] = 2000
    with pytest.raises(ValueError, match=r"must be a multiple of moe_intermediate_size=1408 .*, got 2000"):
        parse_model_config(cfg)


def test_gpt_oss_maps_exactly():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (f,) = parse_model_config(DATA / "gpt_oss_20b.json")
    assert (f["num_experts"], f["top_k"], f["hidden_dim"], f["ffn_dim"]) == (32, 4, 2880, 2880)
    assert f["routing"] == "topk_softmax" and f["bias"] is True
    assert (f["activation"], f["swiglu_alpha"], f["swiglu_limit"]) == ("swiglu_clamped", 1.702, 7.0)


def test_nested_text_config_and_architectures_fallback():
    inner = json.loads((DATA / "deepseek_v3.json").read_text())
    inner.pop("model_type")
    (f,) = parse_model_config({"model_type": "some_vlm", "text_config": inner})
    assert f["routing"] == "sigmoid_topk" and f["num_experts"] == 256


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported architecture.*llama.*mixtral"):
        parse_model_config(DATA / "llama_dense.json")


def test_grouped_softmax_and_the_float32_router():
    """DeepSeek-V2's group_limited_greedy is softmax_topk with groups; DeepSeek keeps its router
    in float32, and so does the spec on every backend."""
    (f,) = parse_model_config(DATA / "deepseek_v2_grouped.json", backend="c")
    assert (f["routing"], f["n_group"], f["topk_group"]) == ("softmax_topk", 8, 3)
    assert f["router_dtype"] == "float32" and f["dtype"] == "bfloat16"
    assert MoESpec(**f).router_dtype == "float32"
    for backend in ("cuda", "auto"):
        (f,) = parse_model_config(DATA / "deepseek_v3.json", backend=backend)
        assert f["router_dtype"] == "float32" and f["dtype"] == "bfloat16"
    (f,) = parse_model_config(DATA / "deepseek_v3.json", backend="c", dtype="float32")
    assert "router_dtype" not in f


def test_training_time_router_jitter_is_warned_about():
    cfg = json.loads((DATA / "mixtral_8x7b.json").read_text())
    (plain,) = parse_model_config(cfg)
    cfg["router_jitter_noise"] = 0.01
    with pytest.warns(ModelConfigWarning, match="router_jitter_noise=0.01 perturbs the router only while training"):
        (f,) = parse_model_config(cfg)
    assert f == plain


def test_missing_field_is_named():
    cfg = json.loads((DATA / "mixtral_8x7b.json").read_text())
    del cfg["num_local_experts"]
    with pytest.raises(ValueError, match="num_local_experts"):
        parse_model_config(cfg)


# -- build_many -------------------------------------------------------------------------------

@dataclass(frozen=True)
class FakeInfo:
    name: str
    key: str
    backend: str
    target: str
    seconds: float
    built: bool
    entry: str


def fake_build(spec: MoESpec) -> FakeInfo:
    """Stands in for moegen.jit.build (module-level: picklable for the process pool)."""
    if spec.hidden_dim == 13:
        raise RuntimeError("compiler exploded\nsecond line")
    key = digest(spec.to_dict())
    target = spec.arch or "x86-64-v3"
    return FakeInfo(spec.name, key, spec.backend, target, 0.01, spec.hidden_dim != 64,
                    f"{spec.name}.{key[:16]}")


SPECS = [MoESpec(num_experts=8, top_k=2, hidden_dim=h, backend="c") for h in (32, 64, 13)]


def test_expand_variants_crosses_cuda_specs_with_archs():
    cuda = MoESpec(num_experts=8, top_k=2, hidden_dim=32, backend="cuda")
    auto = MoESpec(num_experts=8, top_k=2, hidden_dim=64)
    pinned = MoESpec(num_experts=8, top_k=2, hidden_dim=16, backend="cuda", arch="sm_80")
    out = expand_variants([SPECS[0], cuda, auto, pinned, SPECS[0]], ["sm_90", "sm_90a"])
    assert out[0] == SPECS[0] and out.count(SPECS[0]) == 1
    assert [s.arch for s in out[1:5]] == ["sm_90", "sm_90a"] * 2
    assert all(s.backend == "cuda" for s in out[1:])
    assert out[-1] == pinned
    assert expand_variants([cuda]) == [cuda]


@pytest.mark.parametrize("jobs", [1, 2])
def test_build_many_collects_failures(jobs, capsys):
    results = build_many(SPECS, jobs=jobs, progress=True, build=fake_build)
    assert [r.ok for r in results] == [True, True, False]
    assert [r.built for r in results[:2]] == [True, False]
    assert results[2].error == "RuntimeError: compiler exploded"
    assert results[0].entry.startswith(SPECS[0].name)
    err = capsys.readouterr().err
    assert "3 variants: 1 built, 1 cached, 1 failed" in err
    assert "FAILED moe_e8_k2_h13" in err


def test_build_many_quiet_and_archs(capsys):
    cuda = MoESpec(num_experts=8, top_k=2, hidden_dim=32, backend="cuda")
    results = build_many([cuda], archs=["sm_80", "sm_90"], jobs=1, progress=False,
                         build=fake_build)
    assert [r.target for r in results] == ["sm_80", "sm_90"]
    assert capsys.readouterr().err == ""


def test_build_many_counter_without_tqdm(monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name.startswith("tqdm"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    build_many(SPECS[:2], progress=True, build=fake_build)
    err = capsys.readouterr().err
    assert "[1/2] built" in err and "[2/2] cached" in err


def test_build_many_defaults_to_jit_build(monkeypatch):
    assert deploy.jit_build is jit.build
    monkeypatch.setattr(deploy, "jit_build", fake_build)
    results = build_many(SPECS[:1], progress=False)
    assert results[0].ok and results[0].key == digest(SPECS[0].to_dict())


def test_format_summary_table():
    r = [BuildResult(SPECS[0], SPECS[0].name, True, True, 1.5, "a" * 64,
                     f"{SPECS[0].name}.{'a' * 16}", "c", "x86-64-v3")]
    text = format_summary(r, 2.0)
    assert "status" in text and "aaaaaaaaaaaaaaaa" in text and "1 variants: 1 built" in text


# -- archives ---------------------------------------------------------------------------------

NAME = "moe_e8_k2_h512_f2048_f32_swiglu"


def filled_cache(root: Path, n=3) -> KernelCache:
    kc = KernelCache(root, prebuilt=[])
    for i in range(n):
        kc.put(NAME if i < 2 else "moe_other", digest({"i": i}),
               Artifact(bytes([i]) * (50_000 if i else 100),
                        {"backend": "c", "target": "x86-64-v3", "created": time.time(),
                         "toolchain": {"cc": "gcc 13"}}))
    return kc


def test_export_import_roundtrip(tmp_path):
    src = filled_cache(tmp_path / "src")
    manifest = export_archive(src, tmp_path / "k.tar.gz")
    assert len(manifest["entries"]) == 3
    assert manifest["toolchains"] == [{"backend": "c", "target": "x86-64-v3",
                                       "toolchain": {"cc": "gcc 13"}}]
    with tarfile.open(tmp_path / "k.tar.gz") as tar:
        names = tar.getnames()
    assert names[0] == "manifest.json" and all(n.startswith("entries/") for n in names[1:])
    dst = KernelCache(tmp_path / "dst", prebuilt=[])
    imported = import_archive(tmp_path / "k.tar.gz", dst)
    assert len(imported) == 3
    for i in range(3):
        name = NAME if i < 2 else "moe_other"
        assert dst.get(name, digest({"i": i})).binary == src.get(name, digest({"i": i})).binary


def test_export_filters_by_name(tmp_path):
    src = filled_cache(tmp_path / "src")
    m = export_archive(src, tmp_path / "k.tar.gz", names=["moe_other"])
    assert [r["name"] for r in m["entries"].values()] == ["moe_other"]
    with pytest.raises(CacheError, match="nope"):
        export_archive(src, tmp_path / "k2.tar.gz", names=["nope"])
    with pytest.raises(CacheError, match="no entries"):
        export_archive(KernelCache(tmp_path / "empty", prebuilt=[]), tmp_path / "k3.tar.gz")


def rewrite_archive(src: Path, dst: Path, edit) -> None:
    """Copy an archive member by member through ``edit(list of (TarInfo, bytes))``."""
    with tarfile.open(src) as tar:
        members = [(m, tar.extractfile(m).read() if m.isreg() else b"") for m in tar]
    members = edit(members)
    with tarfile.open(dst, "w:gz") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)


def _member(name, data=b"", kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info, data


def _flip_entry(members):
    info, data = members[1]
    return [members[0], (info, data[:-40] + bytes([data[-40] ^ 1]) + data[-39:])] + members[2:]


def _manifest_edit(fn):
    def edit(members):
        info, data = members[0]
        m = json.loads(data)
        fn(m, members)
        return [(info, json.dumps(m).encode())] + members[1:]
    return edit


def _traversal_listed(m, members):
    rel = next(iter(m["entries"]))
    m["entries"]["entries/../../evil.kernel"] = m["entries"][rel]


TAMPERING = {
    "digest-mismatch": (_flip_entry, "sha256"),
    "traversal": (lambda ms: ms + [_member("../evil.kernel", b"x")], "unexpected member"),
    "traversal-in-entries": (lambda ms: ms + [_member("entries/../../evil.kernel", b"x")],
                             "unexpected member"),
    "absolute": (lambda ms: ms + [_member("/tmp/evil.kernel", b"x")], "unexpected member"),
    "symlink": (lambda ms: ms + [_member("entries/moe_x.0000000000000000.kernel",
                                         kind=tarfile.SYMTYPE, link="/etc/passwd")],
                "not a regular file"),
    "hardlink": (lambda ms: ms + [_member("entries/moe_x.0000000000000000.kernel",
                                          kind=tarfile.LNKTYPE, link="manifest.json")],
                 "not a regular file"),
    "directory": (lambda ms: ms + [_member("entries/moe_x.0000000000000000.kernel",
                                           kind=tarfile.DIRTYPE)], "not a regular file"),
    "unknown-member": (lambda ms: ms + [_member("README", b"hi")], "unexpected member"),
    "unlisted-entry": (lambda ms: ms + [_member("entries/moe_x.0000000000000000.kernel", b"x")],
                       "not listed"),
    "duplicate": (lambda ms: ms + [ms[1]], "twice"),
    "missing-entry": (lambda ms: ms[:-1], "missing"),
    "manifest-not-first": (lambda ms: ms[1:] + ms[:1], "first member"),
    "no-manifest": (lambda ms: ms[1:], "first member"),
    "manifest-traversal": (_manifest_edit(_traversal_listed), "malformed entry"),
    "wrong-format": (_manifest_edit(lambda m, ms: m.update(format="zip")), "not a moegen"),
}


@pytest.mark.parametrize("how", list(TAMPERING))
def test_tampered_archive_is_rejected_before_anything_is_imported(tmp_path, how):
    edit, match = TAMPERING[how]
    export_archive(filled_cache(tmp_path / "src"), tmp_path / "good.tar.gz")
    rewrite_archive(tmp_path / "good.tar.gz", tmp_path / "bad.tar.gz", edit)
    dst = KernelCache(tmp_path / "dst", prebuilt=[])
    with pytest.raises(CacheError, match=match):
        import_archive(tmp_path / "bad.tar.gz", dst)
    assert dst.entries() == []
    with pytest.raises(CacheError, match=match):
        extract_archive(tmp_path / "bad.tar.gz", tmp_path / "layer")
    assert not (tmp_path / "layer").exists()
    assert not (tmp_path / "evil.kernel").exists()


def test_not_an_archive(tmp_path):
    (tmp_path / "x.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(CacheError, match="not a readable tar"):
        import_archive(tmp_path / "x.tar.gz", KernelCache(tmp_path / "c", prebuilt=[]))


def test_extract_archive_makes_a_prebuilt_layer(tmp_path, monkeypatch):
    src = filled_cache(tmp_path / "src")
    export_archive(src, tmp_path / "k.tar.gz")
    layer = extract_archive(tmp_path / "k.tar.gz", tmp_path / "layer")
    assert layer.stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in (layer / "entries").iterdir())
    monkeypatch.setenv("MOEGEN_OFFLINE", "1")
    kc = KernelCache(tmp_path / "other", prebuilt=[layer])
    a, built = kc.get_or_build(NAME, digest({"i": 1}), lambda: pytest.fail("no build offline"))
    assert not built and a.binary == bytes([1]) * 50_000
    assert {e.layer for e in kc.entries()} == {str(layer)}
    assert kc.verify() == []
    with pytest.raises(CacheError, match="not empty"):
        extract_archive(tmp_path / "k.tar.gz", layer)
    assert extract_archive(tmp_path / "k.tar.gz", layer, replace=True) == layer
    assert not list(tmp_path.glob(".layer.*"))


def test_import_into_untrusted_cache_is_refused(tmp_path):
    export_archive(filled_cache(tmp_path / "src"), tmp_path / "k.tar.gz")
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    with pytest.warns(cache_mod.CacheWarning):
        with pytest.raises(CacheError, match="not used"):
            import_archive(tmp_path / "k.tar.gz", KernelCache(d, prebuilt=[]))
