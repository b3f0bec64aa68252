"""Tables and the JSON report of ``moegen bench``.

The JSON report (``--json``) is one object::

    {"schema": "moegen-bench/1", "created": ISO-8601 UTC, "command": "moegen bench ...",
     "machine": {...machine_info()...}, "ceilings": {"cpu"|"cuda": Ceilings.as_dict()},
     "points": [point, ...], "notes": [str, ...], "startup": [row, ...] (optional),
     "instructions": [{"shape", "tokens", "contender", "instructions"}, ...] (optional, CPU)}

and each point::

    {"shape": "seed-small", "spec": "moe_e8_k2_...", "E", "k", "H", "F", "dtype", "backend",
     "tokens", "floor_ms", "floor_bound", "moegen": profile dict (moegen.profiling.profile) or None,
     "moegen_err": rel. error vs the float64 reference (first rows) or None,
     "baselines": {name: {"ms", "min_ms", "repeats", "err", "note", "graph_ms" (contenders on
                          CUDA: a CUDA-graph replay, or None)}}, "skipped": None or why}

The baselines include the ``--contender`` plugins' columns, under the names they return.

Times are milliseconds.  `validate` checks a report against this shape (tests and the lead's
GPU run both use it).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
from typing import Any

from .. import __version__
from ..backends.cuda_nvrtc import nvrtc_version
from ..console import table

SCHEMA = "moegen-bench/1"

PROFILE_KEYS = ("spec", "backend", "target", "dtype", "tokens", "stages", "stage_ms",
                "stage_sum_ms", "total_ms", "total_min_ms", "total_p90_ms", "repeats",
                "throughput_ms", "graph_ms", "tokens_per_s", "experts_touched", "bytes",
                "flops", "gbps", "tflops", "floor_ms", "floor_bound", "frac_of_floor",
                "ceilings", "memory")
POINT_KEYS = ("shape", "spec", "E", "k", "H", "F", "dtype", "backend", "tokens", "floor_ms",
              "floor_bound", "moegen", "moegen_err", "baselines", "skipped")
BASELINE_KEYS = ("ms", "min_ms", "repeats", "err", "note")
TOP_KEYS = ("schema", "created", "command", "machine", "ceilings", "points", "notes")


# -- machine ----------------------------------------------------------------------------------
def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
    except Exception:  # noqa: BLE001 - absent or broken: no version
        return None
    return str(getattr(m, "__version__", "?"))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        r = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None


def machine_info(device: str) -> dict:
    """Machine, library and (for "cuda") card, driver and CUDA versions."""
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(),
        "cpu": _cpu_model(), "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "moegen": __version__, "git": _git_commit(), "numpy": _version("numpy"),
        "torch": _version("torch"), "cupy": _version("cupy"), "device": device,
        "threads": {k: os.environ.get(k) for k in ("MOEGEN_NUM_THREADS", "OMP_NUM_THREADS",
                                                   "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
    }
    try:
        import torch
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    if device == "cuda":
        try:
            import cupy
            rt = cupy.cuda.runtime
            props = rt.getDeviceProperties(cupy.cuda.Device().id)
            name = props["name"]
            info.update(card=name.decode() if isinstance(name, bytes) else str(name),
                        card_memory_bytes=int(props["totalGlobalMem"]),
                        sms=int(props["multiProcessorCount"]),
                        compute_capability=f"{props['major']}{props['minor']}",
                        driver=_fmt_cuda_version(rt.driverGetVersion()),
                        cuda_runtime=_fmt_cuda_version(rt.runtimeGetVersion()))
        except Exception as exc:  # noqa: BLE001 - keep the report, say what failed
            info["card_error"] = f"{type(exc).__name__}: {exc}"
        try:
            info["nvrtc"] = ".".join(map(str, nvrtc_version()))
        except Exception:  # noqa: BLE001
            pass
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=10)
            if r.returncode == 0 and r.stdout.strip():
                info["driver_release"] = r.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def _fmt_cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


# -- JSON -------------------------------------------------------------------------------------
def make_report(command: str, machine: dict, ceilings: dict, points: list, notes: list,
                startup: list | None = None) -> dict:
    """The JSON report object (see the module docstring)."""
    rep = {"schema": SCHEMA,
           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "command": command, "machine": machine, "ceilings": ceilings,
           "points": points, "notes": list(notes)}
    if startup is not None:
        rep["startup"] = startup
    return rep


def _clean(v):
    """JSON-safe: NaN/inf -> the strings "nan"/"inf" (an error of inf must stay visible),
    NumPy scalars/arrays -> Python."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "tolist"):
        return _clean(v.tolist())
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def dumps(report: dict) -> str:
    """The report as JSON text (strict: no NaN; numbers as plain JSON)."""
    return json.dumps(_clean(report), indent=1, allow_nan=False)


def validate(report: dict) -> list[str]:
    """Problems with a report's shape (empty list when it conforms)."""
    bad = [f"missing top-level key {k!r}" for k in TOP_KEYS if k not in report]
    if report.get("schema") != SCHEMA:
        bad.append(f"schema must be {SCHEMA!r}, got {report.get('schema')!r}")
    for i, p in enumerate(report.get("points", [])):
        bad += [f"points[{i}] missing {k!r}" for k in POINT_KEYS if k not in p]
        if not isinstance(p.get("tokens"), int) or p.get("tokens", -1) < 0:
            bad.append(f"points[{i}].tokens must be an int >= 0, got {p.get('tokens')!r}")
        m = p.get("moegen")
        if m is not None:
            bad += [f"points[{i}].moegen missing {k!r}" for k in PROFILE_KEYS if k not in m]
            if not isinstance(m.get("total_ms"), (int, float)) or not m["total_ms"] > 0:
                bad.append(f"points[{i}].moegen.total_ms must be a positive number")
        elif not p.get("skipped"):
            bad.append(f"points[{i}] has no moegen result and no 'skipped' reason")
        for name, b in (p.get("baselines") or {}).items():
            bad += [f"points[{i}].baselines.{name} missing {k!r}" for k in BASELINE_KEYS if k not in b]
    return bad


# -- tables -----------------------------------------------------------------------------------
def fmt(v, spec: str = ".3f") -> str:
    """A table cell: '-' for None/NaN, else ``format(v, spec)``."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, str):
        return v
    return format(v, spec)


def fmt_ms(v) -> str:
    """ms with 3 significant decimals below 10 ms, fewer above."""
    if v is None:
        return "-"
    return fmt(v, ".4f" if v < 0.1 else ".3f" if v < 100 else ".1f")


def baseline_names(points: list[dict]) -> list[str]:
    """The baseline and contender columns of a run, in the order they were measured."""
    return list(dict.fromkeys(b for p in points for b in (p.get("baselines") or {})))


def _matrix_cells(point: dict, baselines: list[str]) -> list[str]:
    """The matrix-table cells of a point, shared by the text and Markdown tables."""
    m = point.get("moegen") or {}
    ms = m.get("total_ms")
    cells = [point["shape"], str(point["tokens"]), fmt_ms(point.get("floor_ms")), fmt_ms(ms),
             fmt(m.get("frac_of_floor"), ".2f"), fmt(point.get("moegen_err"), ".1e")]
    for b in baselines:
        bm = (point.get("baselines") or {}).get(b, {}).get("ms")
        cells += [fmt_ms(bm), fmt(bm / ms if bm and ms else None, ".2f")]
    return cells


def matrix_table(points: list[dict], baselines: list[str] | None = None) -> str:
    """The matrix: floor, moegen, its error, and per baseline its ms and ``x`` = baseline time
    / moegen time (> 1: moegen faster); a skipped point says why in the last column."""
    baselines = baseline_names(points) if baselines is None else baselines
    head = ["shape", "T", "floor ms", "moegen ms", "frac", "err"]
    for b in baselines:
        head += [f"{b} ms", "x"]
    skipped = any(p.get("skipped") for p in points)
    rows = [_matrix_cells(p, baselines) + ([p.get("skipped") or ""] if skipped else [])
            for p in points]
    return table(head + (["skipped"] if skipped else []), rows, right=range(1, len(head)))


def point_line(point: dict) -> str:
    """One progress line for a finished point."""
    m = point.get("moegen") or {}
    if point.get("skipped"):
        return f"{point['shape']} T={point['tokens']}: skipped ({point['skipped']})"
    return f"{point['shape']} T={point['tokens']}: moegen {fmt_ms(m.get('total_ms'))} ms"


def stage_table(points: list[dict]) -> str:
    """Per-stage breakdown of the measured points: ms per stage and the whole call."""
    measured = [p for p in points if p.get("moegen")]
    if not measured:
        return ""
    stages = list(dict.fromkeys(s for p in measured for s in p["moegen"]["stages"]))
    head = ["shape", "T"] + stages + ["sum", "call", "b2b", "graph", "GB/s", "TFLOP/s",
                                      "ws MiB", "alloc/call"]
    rows = []
    for p in measured:
        m = p["moegen"]
        mem = m.get("memory") or {}
        # GPU: device allocations per call (target 0); CPU: peak host bytes a call allocates
        allocs = fmt(mem.get("allocs_per_call"), ".1f")
        if "host_peak_bytes_per_call" in mem:
            allocs = f"{mem['host_peak_bytes_per_call'] / 1024:.1f}KiB"
        cells = [p["shape"], str(p["tokens"])] + [fmt_ms(m["stage_ms"].get(s)) for s in stages] + [
            fmt_ms(m["stage_sum_ms"]), fmt_ms(m["total_ms"]), fmt_ms(m.get("throughput_ms")),
            fmt_ms(m.get("graph_ms")), fmt(m.get("gbps"), ".1f"), fmt(m.get("tflops"), ".2f"),
            fmt(mem["workspace_bytes"] / 2 ** 20 if "workspace_bytes" in mem else None, ".1f"),
            allocs]
        rows.append(cells)
    return table(head, rows, right=range(1, len(head)))


def markdown(points: list[dict], baselines: list[str]) -> str:
    """The matrix and stage tables as Markdown (for docs/PERF.md)."""
    head = ["shape", "T", "floor ms", "moegen ms", "frac", "err"]
    for b in baselines:
        head += [f"{b} ms", f"{b} / moegen"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        cells = _matrix_cells(p, baselines)
        if p.get("skipped"):
            cells[3] = f"skipped: {p['skipped']}"
        lines.append("| " + " | ".join(cells) + " |")
    measured = [p for p in points if p.get("moegen")]
    if measured:
        stages = list(dict.fromkeys(s for p in measured for s in p["moegen"]["stages"]))
        head = ["shape", "T"] + [f"{s} ms" for s in stages] + ["call ms", "GB/s", "TFLOP/s", "ws MiB"]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in measured:
            m = p["moegen"]
            ws = (m.get("memory") or {}).get("workspace_bytes")
            cells = [p["shape"], str(p["tokens"])] + [fmt_ms(m["stage_ms"].get(s)) for s in stages] + [
                fmt_ms(m["total_ms"]), fmt(m.get("gbps"), ".1f"), fmt(m.get("tflops"), ".3f"),
                fmt(ws / 2 ** 20 if ws is not None else None, ".1f")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Loop baselines are references for the CPU targets, not rivals on the GPU.
_NOT_GPU_RIVALS = ("naive", "numpy")


def _target_checks(p: dict) -> list[tuple[str, bool, str]]:
    """(target, met, detail) for one measured GPU point: the GPU speed targets of docs/PERF.md.

    1. faster than every GPU rival (``grouped_mm``, ``triton`` and each ``--contender``),
       eager against eager and, where the rival has a graph time, graph against graph;
    2. weight-bound points (mixtral, deepseek, qwen3 at T <= 64) >= 0.92 of the floor,
       compute-bound ones (mixtral, deepseek at T >= 4096) >= 0.85, qwen3 at T >= 4096 >= 0.75;
    3. launch-bound: seed-small T=1 <= 15 us from a graph and <= 40 us eager, qwen3 T=1 <= 30 us
       from a graph;
    4. no allocation per call.
    """
    m, shape, T = p["moegen"], p["shape"], p["tokens"]
    ms, frac, g = m["total_ms"], m.get("frac_of_floor") or 0.0, m.get("graph_ms")
    out = []
    for name, b in (p.get("baselines") or {}).items():
        if name in _NOT_GPU_RIVALS:
            continue
        if b.get("ms"):
            out.append((f"1 eager faster than {name}", ms < b["ms"], f"{ms:.4g} vs {b['ms']:.4g} ms"))
        if b.get("graph_ms"):
            out.append((f"1 graph faster than {name}", g is not None and g < b["graph_ms"],
                        f"{g if g is not None else float('nan'):.4g} vs {b['graph_ms']:.4g} ms"))
    big = shape in ("mixtral-8x7b", "deepseek-v3")
    if (big or shape == "qwen3-30b-a3b") and T <= 64:
        out.append(("2 weight-bound >= 0.92 of floor", frac >= 0.92, f"{frac:.2f}"))
    if big and T >= 4096:
        out.append(("2 compute-bound >= 0.85 of floor", frac >= 0.85, f"{frac:.2f}"))
    if shape == "qwen3-30b-a3b" and T >= 4096:
        out.append(("2 qwen3 prefill >= 0.75 of floor", frac >= 0.75, f"{frac:.2f}"))
    graph_us = "no graph" if g is None else f"{g * 1e3:.1f} us"
    if shape == "seed-small" and T == 1:
        out.append(("3 seed-small T=1 graph <= 15 us", g is not None and g <= 0.015, graph_us))
        out.append(("3 seed-small T=1 eager <= 40 us", ms <= 0.040, f"{ms * 1e3:.1f} us"))
    if shape == "qwen3-30b-a3b" and T == 1:
        out.append(("3 qwen3 T=1 graph <= 30 us", g is not None and g <= 0.030, graph_us))
    allocs = (m.get("memory") or {}).get("allocs_per_call")
    if allocs is not None:
        out.append(("4 no allocation per call", allocs == 0, f"{allocs:g}"))
    return out


def _cpu_target_checks(p: dict) -> list[tuple[str, bool, str]]:
    """The CPU target (docs/PERF.md) for one point: >= 2x the PyTorch loop at T <= 128, not slower
    at T = 1024 (seed-small and qwen3-30b-a3b shapes)."""
    if p["shape"] not in ("seed-small", "qwen3-30b-a3b"):
        return []
    ms = p["moegen"]["total_ms"]
    naive = (p.get("baselines") or {}).get("naive", {}).get("ms")
    if not naive:
        return []
    x = naive / ms
    if p["tokens"] <= 128:
        return [("cpu-1 >= 2x the torch loop at T <= 128", x >= 2.0, f"{x:.2f}x")]
    if p["tokens"] == 1024:
        return [("cpu-1 not slower than the torch loop at T = 1024", x >= 1.0, f"{x:.2f}x")]
    return []


def targets_summary(points: list[dict]) -> str:
    """How many of the docs/PERF.md targets the measured points meet, with the misses listed: the GPU
    targets for cuda points, the CPU target for c points."""
    tally: dict[str, list] = {}
    for p in points:
        if not p.get("moegen"):
            continue
        checks = _cpu_target_checks(p) if p.get("backend") == "c" else _target_checks(p)
        for target, met, detail in checks:
            t = tally.setdefault(target, [0, 0, []])
            t[0] += met
            t[1] += 1
            if not met:
                t[2].append(f"{p['shape']} T={p['tokens']} ({detail})")
    lines = []
    for target in sorted(tally):
        met, n, misses = tally[target]
        line = f"target {target}: {met}/{n} met"
        if misses:
            line += "; misses: " + ", ".join(misses)
        lines.append(line)
    return "\n".join(lines)


def startup_table(rows: list[dict]) -> str:
    """Table of `moegen.bench.startup` rows."""
    return table(["backend", "spec", "import ms", "warm callable ms", "cold compile s", "note"],
                 [(r["backend"], r["spec"], fmt(r.get("import_ms"), ".1f"),
                   fmt(r.get("warm_callable_ms"), ".1f"), fmt(r.get("cold_compile_s"), ".2f"),
                   r.get("note") or "") for r in rows], right=(2, 3, 4))


def command_line() -> str:
    """The command that produced this report."""
    return " ".join(["moegen", *sys.argv[1:]]) if sys.argv and "moegen" in sys.argv[0] else " ".join(sys.argv)
