"""benchmarks/train_step.py without a GPU: its arguments are checked in one line, and it says
plainly when there is no GPU."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SCRIPT = os.path.join(ROOT, "benchmarks", "train_step.py")


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@pytest.mark.parametrize("args, words", [
    (("--shapes", "nope"), "--shapes: 'nope' is not one of"),
    (("--tokens", "4k"), "--tokens must be comma-separated integers, got '4k'"),
    (("--reps", "0"), "--reps must be >= 1, got 0"),
])
def test_bad_arguments_are_one_line(args, words):
    r = run(*args)
    assert r.returncode == 2
    assert words in r.stderr
    assert "Traceback" not in r.stderr


def test_without_a_gpu_it_says_so(monkeypatch):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = run("--shapes", "seed-small", "--tokens", "64")
    assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr

