"""Startup costs, each measured in a fresh Python process (the startup target of docs/PERF.md):

* ``import_ms``: ``import moegen, moegen.jit`` (what ``moegen.compile`` needs);
* ``warm_callable_ms``: ``moegen.compile(spec)`` after imports, with the spec already in the
  cache (needs a backend that can run here);
* ``cold_compile_s``: ``moegen.build(spec)`` into an empty private cache directory (render,
  compile, store; no load, so the cuda backend measures it without a GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from ..backends import cuda_usable, get_backend
from ..jit import build
from ..spec import MoESpec

_IMPORT = """
import json, time
t = time.perf_counter()
import moegen, moegen.jit
print(json.dumps({"ms": (time.perf_counter() - t) * 1e3}))
"""

_WARM = """
import json, sys, time
import moegen, moegen.jit
spec = moegen.MoESpec.from_dict(json.loads(sys.argv[1]))
t = time.perf_counter()
k = moegen.compile(spec)
print(json.dumps({"ms": (time.perf_counter() - t) * 1e3, "key": k.key}))
"""

_COLD = """
import json, sys, time
import moegen, moegen.jit
spec = moegen.MoESpec.from_dict(json.loads(sys.argv[1]))
t = time.perf_counter()
info = moegen.build(spec)
print(json.dumps({"s": time.perf_counter() - t, "built": info.built}))
"""


def _run(code: str, *args: str, env: dict | None = None, timeout: float = 300) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       env=env, timeout=timeout)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"subprocess failed ({r.returncode}): {tail[0][:300]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def default_spec(backend: str) -> MoESpec:
    """seed-small: fp32 for c, bf16 for cuda (sm_90 when no GPU is visible to say)."""
    if backend == "cuda":
        arch = None if cuda_usable() else "sm_90"
        return MoESpec(num_experts=8, top_k=2, hidden_dim=512, ffn_dim=2048, dtype="bfloat16",
                       backend="cuda", arch=arch)
    return MoESpec(num_experts=8, top_k=2, hidden_dim=512, ffn_dim=2048, backend="c")


def backends_here() -> list[tuple[str, bool]]:
    """(backend, can run here) for each backend that can at least compile here."""
    out = []
    for name in ("c", "cuda"):
        try:
            be = get_backend(name)
            if be.can_compile():
                out.append((name, bool(be.available())))
        except Exception:  # noqa: BLE001 - a backend whose toolchain is missing is skipped
            continue
    return out


def measure(backends: list[str] | None = None, repeats: int = 3, timeout: float = 300) -> list[dict]:
    """One row per backend: import_ms (best of ``repeats``), warm_callable_ms (best of
    ``repeats``), cold_compile_s (one fresh cache), and a note for what could not run."""
    rows = []
    for name, runs in backends_here():
        if backends and name not in backends:
            continue
        spec = default_spec(name)
        row = {"backend": name, "spec": spec.name, "import_ms": None, "warm_callable_ms": None,
               "cold_compile_s": None, "note": ""}
        try:
            row["import_ms"] = min(_run(_IMPORT, timeout=timeout)["ms"] for _ in range(repeats))
            with tempfile.TemporaryDirectory(prefix="moegen-cold-") as tmp:
                env = dict(os.environ, MOEGEN_CACHE_DIR=os.path.join(tmp, "cache"))
                env.pop("MOEGEN_PREBUILT_DIR", None)
                row["cold_compile_s"] = _run(_COLD, json.dumps(spec.to_dict()), env=env,
                                             timeout=timeout)["s"]
            if runs:
                build(spec)                 # make sure the user's cache holds it
                row["warm_callable_ms"] = min(_run(_WARM, json.dumps(spec.to_dict()),
                                                   timeout=timeout)["ms"] for _ in range(repeats))
            else:
                row["note"] = "cannot run here (no device): warm start not measured"
        except (RuntimeError, subprocess.SubprocessError, ValueError) as exc:
            row["note"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    return rows
