"""The c backend on a hostile machine: no C compiler, a full TMPDIR while loading, and a
thread count far above the CPU count."""

import errno
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import moegen
from moegen import MoESpec
from moegen import reference as R
from moegen.backends import c as cbackend
from moegen.backends import c_module
from moegen.backends.c import CBackend
from moegen.errors import BackendUnavailable, CompileError
from moegen.kernel import MoEKernel

BE = CBackend()
SPEC = MoESpec(8, 2, 64, 48, backend="c")
ROOT = Path(__file__).resolve().parent.parent
NO_CC = "/nonexistent/cc"


@pytest.fixture(scope="module")
def artifact():
    return BE.compile(BE.render(BE.plan(SPEC)), SPEC, BE.target(SPEC), "test")


def run_layer(module):
    kernel = MoEKernel(SPEC, module, {})
    x, w = R.random_problem(SPEC, 37, seed=2)
    y = kernel(x, kernel.pack(**R.weight_kwargs(SPEC, w)))
    return R.rel_error(y, R.moe(SPEC, x, w)[0])


# -- no C compiler ---------------------------------------------------------------------------
def test_toolchain_without_a_compiler_is_marked_missing(monkeypatch):
    monkeypatch.setenv("MOEGEN_CC", NO_CC)
    tc = BE.toolchain()                                   # never raises
    assert tc["cc"] == NO_CC and tc["version"] == ""
    assert NO_CC in tc["missing"] and "MOEGEN_CC" in tc["missing"]
    assert not BE.can_compile() and not BE.available()


def test_compile_without_a_compiler_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("MOEGEN_CC", NO_CC)
    with pytest.raises(CompileError) as info:
        BE.compile(BE.render(BE.plan(SPEC)), SPEC, BE.target(SPEC), "k" * 64)
    msg = str(info.value)
    assert "\n" not in msg and NO_CC in msg and "MOEGEN_CC" in msg and "not found" in msg


def test_moegen_compile_without_a_compiler_is_one_line_naming_moegen_cc(tmp_cache, monkeypatch):
    """A kernel in no cache, and no compiler to build it: jit says so in one line."""
    monkeypatch.setenv("MOEGEN_CC", NO_CC)
    with pytest.raises(BackendUnavailable, match="MOEGEN_CC") as err:
        moegen.compile(SPEC.replace(hidden_dim=72))
    assert "\n" not in str(err.value)


def test_loading_a_built_kernel_needs_no_compiler(artifact, monkeypatch):
    monkeypatch.setenv("MOEGEN_CC", NO_CC)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert run_layer(BE.load(artifact, SPEC)) <= 1e-5


# -- a full TMPDIR while loading -------------------------------------------------------------
_FDOPEN = os.fdopen


class _FullDisk:
    """A file object whose write fails as on a full disk, after writing part of the bytes."""

    def __init__(self, fd):
        self.fh = _FDOPEN(fd, "wb")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def write(self, data):
        self.fh.write(data[:100])
        self.fh.flush()
        raise OSError(errno.ENOSPC, "No space left on device")


def test_enospc_while_loading_is_an_oserror_and_leaves_no_partial_file(artifact, tmp_path,
                                                                       monkeypatch):
    """The binary is fine and the disk is not: the OSError reaches the caller unchanged (so
    the cache can tell it from a bad binary and keep the entry), no partial file is left, and
    the next load, with space again, works."""
    monkeypatch.setattr(cbackend, "_library_dir", lambda: tmp_path)
    monkeypatch.setattr(cbackend.os, "fdopen", lambda fd, mode: _FullDisk(fd))
    with pytest.raises(OSError) as info:
        BE.load(artifact, SPEC)
    assert info.value.errno == errno.ENOSPC and type(info.value) is OSError
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(cbackend, "_library_dir", lambda: tmp_path)
    module = BE.load(artifact, SPEC)
    assert [p.name for p in tmp_path.iterdir()] == [module.path.name]
    assert module.path.read_bytes() == artifact.binary
    assert run_layer(module) <= 1e-5


def test_library_is_renamed_into_place(artifact, tmp_path):
    """The loaded path only ever holds the whole binary: it appears by rename."""
    path = cbackend.write_library(artifact.binary, tmp_path)
    assert path.read_bytes() == artifact.binary and path.stat().st_mode & 0o077 == 0
    assert cbackend.write_library(artifact.binary, tmp_path) == path
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


# -- too many threads ------------------------------------------------------------------------
def test_thread_count_is_clamped_to_the_cpus_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(c_module, "cpu_count", lambda: 3)
    monkeypatch.setattr(c_module, "_clamp_warned", set())
    monkeypatch.setenv("MOEGEN_NUM_THREADS", "2")
    assert c_module.thread_count() == 2
    monkeypatch.setenv("MOEGEN_NUM_THREADS", "100000")
    with caplog.at_level(logging.WARNING, logger="moegen.backends.c"):
        assert c_module.thread_count() == 3
        assert c_module.thread_count() == 3
    warnings = [r for r in caplog.records if "MOEGEN_NUM_THREADS=100000" in r.getMessage()]
    assert len(warnings) == 1 and "3 CPUs" in warnings[0].getMessage()


_HUGE_THREADS = """
import numpy as np, moegen
from moegen import reference as R
spec = moegen.MoESpec(8, 2, 512, 1024, backend="c")
kernel = moegen.compile(spec)
x, w = R.random_problem(spec, 256, seed=1)
packed = kernel.pack(**R.weight_kwargs(spec, w))
for _ in range(2):
    y = kernel(x, packed)
print(R.rel_error(y, R.moe(spec, x, w)[0]))
"""


def test_a_huge_thread_count_runs(tmp_path):
    """MOEGEN_NUM_THREADS=100000 used to die in the OpenMP runtime (SIGSEGV)."""
    env = dict(os.environ, MOEGEN_NUM_THREADS="100000", MOEGEN_CACHE_DIR=str(tmp_path),
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _HUGE_THREADS], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.split()[-1]) <= 1e-5
    assert proc.stderr.count("MOEGEN_NUM_THREADS=100000") == 1, proc.stderr
