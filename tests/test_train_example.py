"""examples/train_tiny_moe.py runs a few steps on the CPU and writes its figure."""

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_tiny_moe.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_tiny_moe", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def check_run(runs, out, capsys, steps):
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(runs) == {"adaptive coefficient", "fixed coefficient", "no balance loss"}
    for hist in runs.values():
        assert len(hist["mse"]) == steps and all(math.isfinite(v) for v in hist["loss"])
        assert hist["mse"][-1] < hist["mse"][0]            # it learns
    assert "wrote" in capsys.readouterr().out


def test_example_trains_and_plots(tmp_path, capsys):
    out = tmp_path / "curves.png"
    runs = load_example().main(["--steps", "12", "--tokens", "64", "--lr", "1e-2", "--device", "cpu",
                                "--out", str(out)])
    check_run(runs, out, capsys, 12)


def test_example_without_a_gpu_refuses_cuda_plainly(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as exc:
        load_example().main(["--device", "cuda"])
    assert exc.value.code == 2
    assert "--device cuda needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.gpu
def test_example_trains_in_bf16_on_the_gpu(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    out = tmp_path / "curves.png"
    runs = load_example().main(["--steps", "12", "--tokens", "64", "--lr", "1e-2", "--device", "cuda",
                                "--out", str(out)])
    check_run(runs, out, capsys, 12)
