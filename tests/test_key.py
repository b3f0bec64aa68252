"""The cache key, in pairs: each input changes it, a no-op leaves it alone; the key is pure;
finding and loading a cached kernel needs no compiler; a missing GPU never evicts a kernel."""

from __future__ import annotations

import builtins
import dataclasses
import subprocess

import pytest

import moegen
from moegen import jit, render as render_mod, settings
from moegen.cache import default_cache, digest
from moegen.errors import BackendUnavailable, DeviceError
from moegen.plan import make_plan
from moegen.render import render
from moegen.spec import MoESpec

C = MoESpec(4, 2, 40, 24, backend="c")
CUDA = MoESpec(8, 2, 256, 512, dtype="bfloat16", backend="cuda", arch="sm_90")
TOOLCHAIN = {"cc": "/usr/bin/gcc", "version": "gcc (Debian 12.2.0-14) 12.2.0"}
OPTIONS = ["-O3", "-march=x86-64-v3"]
SETTINGS = {"MOEGEN_CC": "", "MOEGEN_CUDA_ARCH": "", "MOEGEN_ISA": ""}


def key(spec=C, target="x86-64-v3", tuning=None, toolchain=TOOLCHAIN, options=OPTIONS,
        code_settings=SETTINGS) -> str:
    plan = make_plan(spec, target, tuning)
    return digest(jit.key_parts_of(plan, render(plan), toolchain, options, code_settings))


BASE = key()


# -- each input changes the key ----------------------------------------------------------------
def test_compiler_version_changes_the_key():
    assert key(toolchain={**TOOLCHAIN, "version": "gcc (Debian 13.1.0) 13.1.0"}) != BASE
    assert key(toolchain={**TOOLCHAIN, "cc": "/usr/bin/clang"}) != BASE


def test_isa_tier_and_cuda_arch_change_the_key():
    assert key(target="avx512") != BASE
    cuda = dict(toolchain={"nvrtc": "13.0", "cupy": "14.0"}, options=[])
    assert (key(CUDA, "sm_90", **cuda) != key(CUDA.replace(arch="sm_90a"), "sm_90a", **cuda)
            != key(CUDA.replace(arch="sm_80"), "sm_80", **cuda))


def test_options_change_the_key():
    assert key(options=OPTIONS + ["-fno-tree-vectorize"]) != BASE


def test_a_template_edit_changes_the_key(monkeypatch):
    files = dict(render_mod._template_files())
    files["c/moe.c.jinja"] = "// edited\n" + files["c/moe.c.jinja"]
    monkeypatch.setattr(render_mod, "_template_files", lambda: files)
    render_mod.environment.cache_clear()
    try:
        assert key() != BASE
    finally:
        render_mod.environment.cache_clear()


def test_version_changes_the_key(monkeypatch):
    monkeypatch.setattr(jit, "__version__", "9.9.9")
    assert key() != BASE


@pytest.mark.parametrize("name", settings.CODE_SETTINGS)
def test_each_code_setting_changes_the_key(name, monkeypatch):
    for n in settings.CODE_SETTINGS:
        monkeypatch.delenv(n, raising=False)
    before = key(code_settings=settings.code_settings())
    monkeypatch.setenv(name, "sm_80" if name == "MOEGEN_CUDA_ARCH" else "x86-64-v2"
                       if name == "MOEGEN_ISA" else "/usr/bin/clang")
    assert key(code_settings=settings.code_settings()) != before


def test_a_tuning_record_changes_the_key():
    assert key(tuning={"kc": 256}) != BASE
    assert key(tuning={"kc": 256}) != key(tuning={"par_min_work": 1 << 16})


# Another valid value of every spec field (backend and arch are covered by the target tests).
OTHER = {"num_experts": 8, "top_k": 1, "hidden_dim": 48, "ffn_dim": 32, "dtype": "bfloat16",
         "activation": "gelu", "routing": "sigmoid_topk", "renormalize": False, "bias": True,
         "n_group": 2, "topk_group": 2, "routed_scaling_factor": 2.5, "num_shared_experts": 1,
         "capacity_factor": 1.25, "capacity_drop": "weight",
         "save_activations": True, "router_dtype": "float32",
         "swiglu_alpha": 1.5, "swiglu_limit": 5.0, "shared_expert_gate": True,
         "batch_invariant": True}
# Fields that apply only beside another setting: the key is compared with and without them.
NEEDS = {"router_dtype": {"dtype": "bfloat16"}, "swiglu_alpha": {"activation": "swiglu_clamped"},
         "swiglu_limit": {"activation": "swiglu_clamped"},
         "shared_expert_gate": {"num_shared_experts": 1}}


def test_the_field_table_covers_every_spec_field():
    fields = {f.name for f in dataclasses.fields(MoESpec)} - {"backend", "arch"}
    assert fields == set(OTHER)


@pytest.mark.parametrize("field", sorted(OTHER))
def test_each_spec_field_changes_the_key(field):
    changes = {field: OTHER[field]}
    if field in ("n_group", "topk_group"):
        changes.update(routing="sigmoid_topk", n_group=2)
    base = key(C.replace(**NEEDS[field])) if field in NEEDS else BASE
    assert key(C.replace(**changes, **NEEDS.get(field, {}))) != base


# -- no-ops leave it alone ---------------------------------------------------------------------
def test_rerender_and_replan_leave_the_key_alone():
    assert key() == BASE == key(MoESpec.from_dict(C.to_dict()))


def test_dict_order_leaves_the_key_alone():
    a = key(tuning={"kc": 256, "par_min_work": 1 << 16})
    b = key(tuning={"par_min_work": 1 << 16, "kc": 256})
    assert a == b
    assert key(code_settings=dict(reversed(list(SETTINGS.items())))) == BASE


def test_a_non_code_setting_leaves_the_key_alone(monkeypatch, tmp_path):
    before = key(code_settings=settings.code_settings())
    for name, value in (("MOEGEN_CACHE_DIR", str(tmp_path)), ("MOEGEN_LOG_LEVEL", "DEBUG"),
                        ("MOEGEN_NUM_THREADS", "3"), ("MOEGEN_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    assert key(code_settings=settings.code_settings()) == before


# -- purity ------------------------------------------------------------------------------------
def test_plan_render_and_key_do_no_io(monkeypatch):
    render(make_plan(C, "x86-64-v3"))               # the templates are read once, before

    def refuse(*a, **k):
        raise AssertionError("I/O while planning or keying")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    assert key() == BASE
    key(CUDA, "sm_90", toolchain={"nvrtc": "13.0"}, options=[])


def test_tuning_does_not_import_jit():
    out = subprocess.run(["python", "-c", "import sys, moegen.tuning; print('moegen.jit' in sys.modules)"],
                         capture_output=True, text=True, timeout=60, cwd=moegen.__path__[0] + "/..")
    assert out.stdout.strip() == "False", out.stderr


# -- no compiler: a cached kernel still loads --------------------------------------------------
def test_without_a_compiler_a_cached_kernel_loads_and_a_miss_names_moegen_cc(tmp_cache, monkeypatch):
    built = jit.build(C)
    assert built.built
    jit.clear_memo()
    monkeypatch.setenv("MOEGEN_CC", "/nonexistent/cc")
    kernel = moegen.compile(C)                      # found by its plan, not its toolchain
    assert kernel.meta["key"] == built.key
    with pytest.raises(BackendUnavailable) as info:
        moegen.compile(C.replace(hidden_dim=48))
    msg = str(info.value)
    assert "MOEGEN_CC='/nonexistent/cc'" in msg and "\n" not in msg


# -- no GPU: a good cached cuda kernel is kept -------------------------------------------------
def test_no_gpu_raises_device_error_and_keeps_the_entry(tmp_cache):
    from moegen.backends import get_backend
    be = get_backend("cuda")
    if not be.can_compile():
        pytest.skip("CuPy/NVRTC not installed")
    if be.available():
        pytest.skip("a GPU is present")
    spec = MoESpec(4, 2, 64, 64, backend="cuda", arch="sm_90")
    info = jit.build(spec)
    with pytest.raises(DeviceError, match="no usable GPU") as err:
        moegen.compile(spec)
    assert "\n" not in str(err.value)
    assert default_cache().get(info.name, info.key) is not None
    assert not jit.build(spec).built                # not rebuilt either


def test_bad_binary_classification():
    assert jit.is_bad_binary(OSError("invalid ELF header"))
    assert not jit.is_bad_binary(OSError(28, "No space left on device"))
    assert not jit.is_bad_binary(RuntimeError("binary built for ISA tier avx512"))

    class CUDADriverError(Exception):
        pass

    class CUDARuntimeError(Exception):
        pass

    assert jit.is_bad_binary(CUDADriverError("CUDA_ERROR_INVALID_IMAGE: device kernel image is invalid"))
    assert jit.is_bad_binary(CUDADriverError("CUDA_ERROR_NOT_FOUND: named symbol not found"))
    assert not jit.is_bad_binary(CUDADriverError("CUDA_ERROR_NO_DEVICE: no CUDA-capable device"))
    assert not jit.is_bad_binary(CUDARuntimeError("cudaErrorInsufficientDriver"))


def test_without_a_compiler_a_prebuilt_layer_kernel_loads_offline(tmp_path, monkeypatch):
    """An offline server with no cc and a prebuilt layer (an exported cache, unpacked)."""
    from moegen.archive import export_archive, extract_archive
    from moegen.cache import KernelCache
    monkeypatch.setenv("MOEGEN_CACHE_DIR", str(tmp_path / "build"))
    jit.clear_memo()
    built = jit.build(C)
    export_archive(KernelCache(tmp_path / "build", prebuilt=[]), tmp_path / "k.tar.gz")
    layer = extract_archive(tmp_path / "k.tar.gz", tmp_path / "layer")
    monkeypatch.setenv("MOEGEN_CACHE_DIR", str(tmp_path / "server"))
    monkeypatch.setenv("MOEGEN_PREBUILT_DIR", str(layer))
    monkeypatch.setenv("MOEGEN_OFFLINE", "1")
    monkeypatch.setenv("MOEGEN_CC", "/nonexistent/cc")
    jit.clear_memo()
    try:
        kernel = moegen.compile(C)
    finally:
        jit.clear_memo()
    assert kernel.meta["key"] == built.key


def test_enospc_while_loading_keeps_the_entry(tmp_cache, monkeypatch):
    """A full TMPDIR when the cached library is written out to be loaded is not a bad binary."""
    import errno
    from moegen.backends import c as c_backend
    built = jit.build(C)
    jit.clear_memo()

    def full(binary):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(c_backend, "write_library", full)
    with pytest.raises(DeviceError, match="no space left") as info:
        moegen.compile(C)
    assert "\n" not in str(info.value)
    assert default_cache().get(built.name, built.key) is not None
