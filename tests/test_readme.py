"""Every code block of README.md runs as written on a CPU machine.

Python blocks run alone in a fresh interpreter; bash blocks run line by line through the real
CLI (``python -m moegen.cli`` for ``moegen``) in a scratch directory that sees the repository's
``tests/`` and ``examples/``, with a private MOEGEN_CACHE_DIR.  Installing (``pip install``) and
the test suite itself are left to test_wheel.py and CI; the lines that take minutes (``moegen
bench``, ``moegen tune``) are run by their own tests with smaller budgets.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
NOT_RUN_HERE = ("pip install", "python -m pytest", "moegen bench", "moegen tune")


def blocks(lang: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def test_every_block_says_its_language():
    fences = re.findall(r"^```(\S*)$", README.read_text(encoding="utf-8"), flags=re.M)
    openers = fences[0::2]
    assert all(openers), "a README code block has no language"
    assert set(openers) <= {"python", "bash", "text"}, openers


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    for name in ("tests", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOEGEN_")}
    env.update(PYTHONPATH=str(ROOT), MOEGEN_CACHE_DIR=str(tmp_path / "cache"))
    return tmp_path, env


@pytest.mark.parametrize("i", range(len(blocks("python"))))
def test_python_block_runs(i, scratch):
    cwd, env = scratch
    r = subprocess.run([sys.executable, "-c", blocks("python")[i]], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def _commands(block: str):
    for line in block.splitlines():
        line = line.split("  #")[0].strip()
        if not line or line.startswith("#"):
            continue
        for part in line.split("&&"):
            yield part.strip()


@pytest.mark.parametrize("i", range(len(blocks("bash"))))
def test_bash_block_runs(i, scratch):
    cwd, env = scratch
    ran = 0
    for cmd in _commands(blocks("bash")[i]):
        if cmd.startswith(NOT_RUN_HERE):
            continue
        argv = shlex.split(cmd)
        if argv[0] == "export":
            for assignment in argv[1:]:
                k, v = assignment.split("=", 1)
                env[k] = v.replace("$PWD", str(cwd))
            continue
        if argv[0] == "moegen":
            argv = [sys.executable, "-m", "moegen.cli", *argv[1:]]
        elif argv[0] == "python":
            argv[0] = sys.executable
        else:
            pytest.fail(f"README bash line the test does not know how to run: {cmd}")
        r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{cmd}\n{r.stdout}\n{r.stderr}"
        assert "Traceback" not in r.stderr, r.stderr
        ran += 1
    assert ran or all(c.startswith(NOT_RUN_HERE) for c in _commands(blocks("bash")[i]))


def test_the_skipped_lines_are_runnable_options():
    """The bench and tune lines are not run here, but their options exist."""
    from click.testing import CliRunner
    from moegen.cli import main
    for block in blocks("bash"):
        for cmd in _commands(block):
            if cmd.startswith(("moegen bench", "moegen tune")):
                argv = shlex.split(cmd)[1:]
                r = CliRunner().invoke(main, [argv[0], "--help"])
                assert r.exit_code == 0
                for opt in (a for a in argv if a.startswith("--")):
                    assert opt in r.output, (cmd, opt)


def test_quickstart_times_cuda_calls_with_events_on_the_launch_stream():
    """A CUDA call returns before the GPU is done: the example's clock must be CUDA events
    (recorded on CuPy's current stream, where the call launches), never host time."""
    import importlib.util
    from types import SimpleNamespace

    from moegen.profiling.timing import CpuClock, CupyClock
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    assert isinstance(quickstart.clock_of(SimpleNamespace(spec=SimpleNamespace(backend="c"))), CpuClock)
    pytest.importorskip("cupy")
    clock = quickstart.clock_of(SimpleNamespace(spec=SimpleNamespace(backend="cuda")))
    assert isinstance(clock, CupyClock)
