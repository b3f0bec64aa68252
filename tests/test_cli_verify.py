"""``moegen verify`` passes correct kernels of every spec kind (issue 9, item 11), and fails a
wrong one."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import moegen
from moegen import verify as verify_mod
from moegen.cli import main
from moegen.spec import MoESpec


pytestmark = pytest.mark.usefixtures("tmp_cache")


@pytest.mark.parametrize("args", [
    ["--experts", "16", "--topk", "2", "--hidden", "16", "--ffn", "24"],           # E == H
    ["--experts", "8", "--topk", "2", "--hidden", "32", "--ffn", "24", "--capacity-factor", "0.5"],
    ["--experts", "8", "--topk", "2", "--hidden", "32", "--ffn", "24", "--capacity-factor", "0.75",
     "--capacity-drop", "weight"],
    ["--experts", "8", "--topk", "2", "--hidden", "32", "--ffn", "24", "--dtype", "bf16"],
])
def test_verify_passes_correct_kernels(args):
    r = CliRunner().invoke(main, ["verify", "--backend", "c", *args, "--tokens", "0,1,7,64"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split() == ["T", "rel_error", "tolerance", "ids", "result"]
    assert [ln.split()[-1] for ln in lines[2:]] == ["ok"] * 4


def test_capacity_is_what_makes_the_difference(monkeypatch):
    """With the capacity left out of the reference (the old check), the same correct capacity
    kernel fails: the check is not vacuous."""
    spec = MoESpec(8, 2, 32, 24, backend="c", capacity_factor=0.5)
    kernel = moegen.compile(spec)
    assert verify_mod.check_tokens(kernel, 64)["ok"]
    monkeypatch.setattr(verify_mod.reference, "apply_capacity",
                        lambda spec, ids, w: (w, np.ones(ids.shape, bool), 0))
    assert not verify_mod.check_tokens(kernel, 64)["ok"]


def test_verify_fails_a_wrong_kernel(monkeypatch):
    real = verify_mod.reference.experts

    def off(spec, x, w, ids, wts):
        return real(spec, x, w, ids, wts) * 1.01
    monkeypatch.setattr(verify_mod.reference, "experts", off)
    r = CliRunner().invoke(main, ["verify", "--backend", "c", "--experts", "8", "--topk", "2",
                                  "--hidden", "32", "--tokens", "7"])
    assert r.exit_code == 1 and "FAIL" in r.output and "verification failed" in r.output
    assert np.isfinite(float(r.output.splitlines()[2].split()[1]))
