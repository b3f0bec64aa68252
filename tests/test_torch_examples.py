"""examples/hf_model.py runs on the CPU and its checks pass (logits and greedy tokens); the
CUDA-graph example exits with one clear line where no GPU is present."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="torch is in the test extra: install '.[test]'")
pytest.importorskip("transformers", reason="transformers is in the test extra")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("model", ["mixtral", "deepseek_v3"])
def test_hf_model_example_passes_on_cpu(model, module_cache):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "hf_model.py"), "--model", model],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{model} cpu float32" in proc.stdout and "identical: OK" in proc.stdout


def test_decode_graph_example_says_it_needs_a_gpu():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the example runs (tests/test_torch_gpu.py)")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "decode_graph.py")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if l.strip()]
    assert len(lines) == 1 and "CUDA" in lines[0], lines
