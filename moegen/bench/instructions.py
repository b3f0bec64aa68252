"""Instructions per call on the CPU, counted by valgrind's callgrind (the CPU target of docs/PERF.md).

Shared CPUs make wall times drift by several times between runs; instruction counts do not.
One worker process runs under ``valgrind --tool=callgrind --instr-atstart=no``: it builds the
problem and warms every contender up uninstrumented, then for each (T, contender) zeroes the
counters, turns instrumentation on, makes ``calls`` calls, turns it off and dumps the counts
with a label.  The on/off switches are callgrind client requests compiled into a tiny helper
library (``valgrind/callgrind.h``), called through ctypes, so only the calls are counted
(plus a few hundred instructions of ctypes around the switches).  One thread everywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..backends import get_backend
from ..console import table as render_table
from ..spec import MoESpec
from .report import fmt

_MARKS_C = r"""
#include <valgrind/callgrind.h>
void cg_on(void)  { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void cg_off(const char *label) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS_AT(label); }
"""

_WORKER = r"""
import ctypes, json, sys
import numpy as np
import moegen
from moegen import reference as R
from moegen.bench import baselines as B
cfg = json.loads(sys.argv[1])
marks = ctypes.CDLL(cfg["marks"])
marks.cg_off.argtypes = [ctypes.c_char_p]
spec = moegen.MoESpec.from_dict(cfg["spec"])
kernel = moegen.compile(spec)
_, w = R.random_problem(spec, 0, seed=0)
packed = kernel.pack(**R.weight_kwargs(spec, w))
bases, _ = B.build(spec, w, "numpy", "cpu", tuple(c for c in cfg["contenders"] if c != "moegen"))
bases = {b.name: b for b in bases}
for T in cfg["tokens"]:
    x = np.random.default_rng(T).standard_normal((T, spec.hidden_dim), dtype=np.float32).astype(spec.dt.numpy)
    out = kernel(x, packed)
    ids, wts = kernel.route(x, packed)
    for name in cfg["contenders"]:
        if name == "moegen":
            fn = lambda: kernel(x, packed, out=out)
        elif name in bases:
            b = bases[name]
            args = (B.to_torch(x, "cpu"), B.to_torch(ids, "cpu"), B.to_torch(wts, "cpu")) if b.torch else (x, ids, wts)
            fn = lambda: b.timed(*args)
        else:
            continue
        fn()
        marks.cg_on()
        for _ in range(cfg["calls"]):
            fn()
        marks.cg_off(f"{name}@{T}".encode())
"""


# valgrind (3.19 and others) cannot decode AVX-512 ("vex amd64->IR: ... VEX.L=0"), so the
# counted binary is built for the best tier valgrind runs: AVX2 + FMA.
COUNTED_TIER = "x86-64-v3"


def counted_tier(spec: MoESpec) -> str:
    """The ISA tier the counted kernel is built for: this machine's, capped at x86-64-v3."""
    tier = get_backend("c").target(spec)
    return COUNTED_TIER if tier.startswith("avx512") else tier


def available() -> str | None:
    """None when valgrind, callgrind.h and a C compiler are here; else why not."""
    if shutil.which("valgrind") is None:
        return "valgrind is not installed"
    if not Path("/usr/include/valgrind/callgrind.h").exists():
        return "valgrind/callgrind.h is not installed (valgrind's development headers)"
    if shutil.which(os.environ.get("MOEGEN_CC") or "cc") is None:
        return "no C compiler for the callgrind marks helper"
    return None


def _build_marks(tmp: Path) -> Path:
    src, lib = tmp / "marks.c", tmp / "marks.so"
    src.write_text(_MARKS_C)
    cc = os.environ.get("MOEGEN_CC") or "cc"
    subprocess.run([cc, "-O1", "-fPIC", "-shared", str(src), "-o", str(lib)], check=True,
                   capture_output=True, text=True)
    return lib


def parse_dumps(directory: Path) -> dict[str, int]:
    """label -> instructions (Ir) from the callgrind dump files a worker wrote."""
    out = {}
    for f in sorted(directory.glob("callgrind.out*")):
        text = f.read_text(errors="replace")
        m = re.search(r"^desc: Trigger: Client Request: (\S+)", text, re.M)
        # "summary:" in the header can read 0 in a client-request dump; "totals:" at the end
        # holds the count.
        n = re.findall(r"^totals: (\d+)", text, re.M) or re.findall(r"^summary: (\d+)", text, re.M)
        if m and n:
            out[m.group(1)] = int(n[-1])
    return out


def measure(spec: MoESpec, tokens, contenders=("moegen", "naive", "numpy"), calls: int = 1,
            timeout: float = 1800) -> list[dict]:
    """Instructions per call of each contender at each token count (rows of T, contender,
    instructions; the moegen kernel is built for `counted_tier`).  Raises RuntimeError with the reason when callgrind cannot run here or the
    worker fails.  The spec must use the c backend; its kernel is compiled (or found in the
    cache) by the worker."""
    why = available()
    if why:
        raise RuntimeError(why)
    if spec.backend != "c":
        raise RuntimeError(f"instruction counts need the c backend, got backend={spec.backend!r}")
    with tempfile.TemporaryDirectory(prefix="moegen-callgrind-") as tmp:
        tmp = Path(tmp)
        cfg = {"spec": spec.to_dict(), "tokens": list(tokens), "contenders": list(contenders),
               "calls": calls, "marks": str(_build_marks(tmp))}
        env = dict(os.environ, MOEGEN_NUM_THREADS="1", OMP_NUM_THREADS="1",
                   OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", MOEGEN_ISA=counted_tier(spec))
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
               f"--callgrind-out-file={tmp}/callgrind.out.%p", sys.executable, "-c", _WORKER,
               json.dumps(cfg)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if r.returncode != 0:
            # valgrind's own lines start with ==pid==; the worker's traceback is what says why
            tail = [ln for ln in (r.stderr or r.stdout).strip().splitlines()
                    if not ln.startswith("==")][-2:]
            raise RuntimeError(f"callgrind worker failed ({r.returncode}): {' | '.join(tail)}")
        counts = parse_dumps(tmp)
    rows = []
    for T in tokens:
        for name in contenders:
            ir = counts.get(f"{name}@{T}")
            rows.append({"tokens": T, "contender": name,
                         "instructions": ir / calls if ir is not None else None})
    return rows


def table(rows: list[dict]) -> str:
    """T x contender table of instructions per call, with each baseline's ratio to moegen."""
    names = list(dict.fromkeys(r["contender"] for r in rows))
    others = [n for n in names if n != "moegen"]
    by = {(r["tokens"], r["contender"]): r["instructions"] for r in rows}
    out = []
    for T in dict.fromkeys(r["tokens"] for r in rows):
        m = by.get((T, "moegen"))
        out.append([T] + [fmt(by.get((T, n)), ".4g") for n in names]
                   + [fmt(by[(T, n)] / m if m and by.get((T, n)) else None, ".2f") for n in others])
    head = ["T"] + [f"{n} Ir" for n in names] + [f"{n}/moegen" for n in others]
    return render_table(head, out, right=range(len(head)))
