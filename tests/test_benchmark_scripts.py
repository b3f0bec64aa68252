"""The benchmark scripts build their kernels through the current backend API (a script that
compiles and loads by hand goes stale when that API moves; two did)."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np

from moegen import reference
from moegen.spec import MoESpec

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_c_backend_speed_builds_a_kernel_that_matches_the_reference():
    spec = MoESpec(4, 2, 32, 48, dtype="float32")
    kernel = _script("c_backend_speed").make_kernel(spec)
    x, w = reference.random_problem(spec, 5, seed=3)
    out = kernel(x, kernel.pack(**reference.weight_kwargs(spec, w)))
    ref, _ = reference.moe(spec, x, w)
    assert reference.rel_error(np.asarray(out), ref) <= spec.dt.tolerance
