"""``moegen bench``: time moegen against its floor and the baselines, in one run.

    moegen bench                                  seed-small on this machine's backend
    moegen bench --matrix targets --json out.json --plot out.png     the GPU target matrix
    moegen bench --matrix cpu                     seed-small, T in 1,16,128,1024, fp32 (C)
    moegen bench --experts 8,64 --topk 2 --hidden 1024 --ffn 4096 --tokens 1,64 --dtype bf16
    moegen bench --startup                        import / warm-start / cold-compile times
    moegen bench --contender vllm.py              plus the plugin's kernels as columns

Progress goes to stderr (a bar on a terminal, else a line per finished point), the tables to
stdout when the run is done, and the JSON report has every number (`moegen.bench.report`).  Exits 1 when a point failed or moegen's error vs the float64
reference exceeded its dtype's tolerance.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import click

from ..backends import cuda_usable
from ..bench import contenders as contenders_mod
from ..bench import instructions as ins
from ..bench import matrix as mx
from ..bench import report
from ..bench import startup as st
from ..bench.plot import PlotUnavailable, plot
from ..bench.shapes import CPU_TOKENS, SHAPES, TARGET_TOKENS
from ..distributed.bench import format_table as ep_table, run_ep_bench
from ..console import Progress
from ..dtypes import DTYPES
from ..errors import SpecError
from ..jit import resolve
from ..profiling.ceilings import fixed
from ..spec import MoESpec
from .options import parse_ints, parse_strs, require_gpu

log = logging.getLogger("moegen.bench")

INSTRUCTIONS_MAX_TOKENS = 128


@click.command("bench")
@click.option("--matrix", type=click.Choice(["targets", "cpu"]), default=None,
              help="targets: the benchmark shapes x T in 1,8,64,512,4096,16384 (bf16); "
                   "cpu: seed-small x T in 1,16,128,1024 (fp32).")
@click.option("--shapes", default=None, help="Named shapes (comma-separated): seed-small, "
              "mixtral-8x7b, qwen3-30b-a3b, deepseek-v3.")
@click.option("--experts", default=None, help="Custom grid: E values, e.g. 8,64.")
@click.option("--topk", default=None, help="Custom grid: k values.")
@click.option("--hidden", default=None, help="Custom grid: H values.")
@click.option("--ffn", default=None, help="Custom grid: F values.")
@click.option("--tokens", default=None, help="Token counts, e.g. 1,8,64.")
@click.option("--dtype", default=None, help="Storage dtypes (comma-separated); default bf16 "
              "on cuda, float32 on c.")
@click.option("--activation", default="swiglu", show_default=True)
@click.option("--backend", type=click.Choice(["auto", "c", "cuda"]), default="auto", show_default=True)
@click.option("--baselines", default="naive,grouped_mm,numpy,triton", show_default=True,
              help="Which baselines to run beside moegen.")
@click.option("--no-baselines", is_flag=True, help="moegen only.")
@click.option("--budget", type=float, default=3.0, show_default=True,
              help="Seconds per point (moegen half, baselines the rest).")
@click.option("--time-limit", type=float, default=None,
              help="Seconds for the whole run (default 480 for --matrix targets); later points "
                   "get smaller budgets, and are skipped when it runs out.")
@click.option("--repeats", type=int, default=None, help="Fixed repeats (default: from --budget).")
@click.option("--warmup", type=int, default=3, show_default=True)
@click.option("--rotate", type=int, default=4, show_default=True,
              help="Distinct input buffers cycled through.")
@click.option("--check-rows", type=int, default=16, show_default=True,
              help="Tokens checked against the float64 reference per point.")
@click.option("--bandwidth", type=float, default=None,
              help="Use this copy bandwidth (bytes/s) instead of measuring it.")
@click.option("--peak", type=float, default=None,
              help="Use this matrix peak (FLOP/s) instead of measuring it.")
@click.option("--no-memory", is_flag=True, help="Skip the allocation counting.")
@click.option("--no-graph", is_flag=True, help="Skip the CUDA-graph replay timing.")
@click.option("--threads", type=int, default=None,
              help="CPU threads for moegen's c backend (MOEGEN_NUM_THREADS) and torch; NumPy's "
                   "BLAS follows OPENBLAS_NUM_THREADS/OMP_NUM_THREADS set before starting.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the full report here.")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False), default=None,
              help="Write the tables as Markdown (for docs/PERF.md).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Draw time vs tokens per shape (PNG, needs matplotlib).")
@click.option("--startup", is_flag=True, help="Measure import, warm-start and cold-compile "
              "times in fresh processes (alone unless shapes/grid/matrix are also given).")
@click.option("--instructions", is_flag=True, help="CPU: also count instructions per call of "
              "moegen and the CPU baselines under valgrind's callgrind (one thread; slow).")
@click.option("--no-progress", is_flag=True, help="No progress bar or progress lines.")
@click.option("--contender", "contender_files", multiple=True, type=click.Path(dir_okay=False),
              help="A plugin file defining contenders(E, k, H, F, w13, w2, wg) -> {name: "
                   "fn(x, topk_w, topk_ids, wg) -> y}; each name becomes a column (repeatable; "
                   "see moegen.bench.contenders).")
@click.option("--ep", type=click.IntRange(min=1), default=None,
              help="Expert parallelism: run each shape over N spawned ranks (gloo + c on CPUs, "
                   "NCCL + cuda on GPUs) and print route, pack, exchange, experts, return, combine.")
@click.option("--ep-chunks", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --ep: token chunks per call (one chunk's exchange overlaps another's "
                   "experts).")
def bench(matrix, shapes, experts, topk, hidden, ffn, tokens, dtype, activation, backend,
          baselines, no_baselines, budget, time_limit, repeats, warmup, rotate, check_rows,
          bandwidth, peak, no_memory, no_graph, threads, seed, json_path, md_path, plot_path, startup,
          instructions, no_progress, contender_files, ep, ep_chunks):
    """Benchmark moegen against its floor and baselines (see `moegen.bench`)."""
    if backend == "cuda":
        require_gpu("moegen bench", "--backend c benchmarks the CPU")
    if instructions and ins.available():
        raise click.UsageError(f"--instructions needs callgrind: {ins.available()}")
    grid_given = any(v is not None for v in (experts, topk, hidden, ffn))
    only_startup = startup and not (matrix or shapes or grid_given or tokens)
    try:
        specs, token_list = _plan(matrix, shapes, experts, topk, hidden, ffn, tokens, dtype,
                                  activation, backend, grid_given)
    except (ValueError, SpecError) as exc:
        raise click.UsageError(str(exc)) from None
    try:
        plugins = {f: contenders_mod.load(f) for f in contender_files}
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--contender") from None
    if (bandwidth is None) != (peak is None):
        raise click.UsageError("give both --bandwidth and --peak, or neither")
    for name, v in (("--budget", budget), ("--rotate", rotate), ("--warmup", warmup + 1),
                    ("--check-rows", check_rows + 1)):
        if v <= 0:
            raise click.UsageError(f"{name} must be positive")

    if threads is not None:
        if threads < 1:
            raise click.UsageError(f"--threads must be >= 1, got {threads}")
        _set_threads(threads)

    if ep is not None:
        for _, spec in specs:
            for t in token_list:
                try:
                    res = run_ep_bench(spec, ep, t, warmup=warmup, repeat=repeats or 5,
                                       chunks=ep_chunks)
                except ValueError as exc:
                    raise click.UsageError(str(exc)) from None
                click.echo(ep_table(res))
        return

    startup_rows = None
    if startup:
        startup_rows = st.measure()
        click.echo(report.startup_table(startup_rows))
    if only_startup:
        if json_path:
            machine = report.machine_info("cuda" if cuda_usable() else "cpu")
            _write(json_path, report.make_report(report.command_line(), machine, {}, [], [],
                                                 startup_rows))
        return

    device = mx.device_of(specs[0][1])
    ceil = None
    if bandwidth is not None:
        ceil = fixed(device, bandwidth, peak)
    names = () if no_baselines else tuple(parse_strs(baselines) or ())
    if time_limit is None and matrix == "targets":
        time_limit = 480.0
    cfg = mx.Config(shapes=specs, tokens=token_list, baselines=names, budget_s=budget,
                    time_limit_s=time_limit, warmup=warmup, rotate=rotate, check_rows=check_rows,
                    seed=seed, repeats=repeats, memory=not no_memory,
                    graph=False if no_graph else None, ceilings=ceil, contenders=plugins)
    click.echo(f"moegen bench: {len(specs)} shape(s) x {len(token_list)} token count(s) on "
               f"{device}; 'x' = baseline ms / moegen ms (> 1: moegen faster)")
    t0 = time.perf_counter()
    with Progress(len(specs) * len(token_list), "bench", enabled=not no_progress) as progress:
        points, ceils = mx.run(cfg, on_point=lambda p: progress.advance(report.point_line(p)))
    shown = report.baseline_names(points)
    click.echo(report.matrix_table(points, shown))
    click.echo("")
    click.echo(report.stage_table(points))
    for d, c in ceils.items():
        peaks = ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in c["peak"].items())
        click.echo(f"ceilings ({d}, {'measured' if c['measured'] else 'given'}): copy "
                   f"{c['bandwidth'] / 1e9:.1f} GB/s; matrix {peaks}")
    if any(lbl in SHAPES for lbl, _ in specs):
        summary = report.targets_summary(points)
        if summary:
            click.echo(summary)
    for n in cfg.notes:
        click.echo(f"note: {n}")
    click.echo(f"total {time.perf_counter() - t0:.1f}s")

    rep = report.make_report(report.command_line(), report.machine_info(device), ceils,
                             points, cfg.notes, startup_rows)
    if json_path:
        _write(json_path, rep)
        click.echo(f"wrote {json_path}")
    if md_path:
        with open(md_path, "w") as fh:
            fh.write(report.markdown(points, shown) + "\n")
        click.echo(f"wrote {md_path}")
    if plot_path:
        try:
            plot(points, plot_path, title=f"moegen bench on {device}")
            click.echo(f"wrote {plot_path}")
        except (PlotUnavailable, ValueError) as exc:
            click.echo(f"plot not drawn: {exc}", err=True)

    instr_rows = None
    if instructions:
        instr_rows = _instructions(specs, token_list, names)
    if json_path and instr_rows is not None:
        rep["instructions"] = instr_rows
        _write(json_path, rep)

    bad = _failures(points)
    if bad:
        for line in bad:
            click.echo(f"FAIL: {line}", err=True)
        sys.exit(1)


def _instructions(specs, tokens, names) -> list[dict]:
    """Callgrind instruction counts per c-backend spec (rows gain a ``shape``); a note when
    callgrind cannot run here."""
    contenders = ("moegen",) + tuple(n for n in ("naive", "grouped_mm", "numpy") if n in names)
    # callgrind runs ~100x slower than the CPU: seed-small at T = 128 already takes minutes
    counted = [t for t in tokens if t <= INSTRUCTIONS_MAX_TOKENS]
    if len(counted) < len(tokens):
        click.echo(f"instructions: T > {INSTRUCTIONS_MAX_TOKENS} not counted (callgrind is ~100x slower)")
    rows = []
    for label, spec in specs:
        spec = resolve(spec)
        if spec.backend != "c":
            click.echo(f"instructions: {label} skipped (backend {spec.backend}, not c)")
            continue
        try:
            got = ins.measure(spec, counted, contenders)
        except (RuntimeError, OSError) as exc:
            raise click.ClickException(f"instructions not counted: {exc}") from None
        click.echo(f"instructions per call, {label} (callgrind, one thread, "
                   f"{ins.counted_tier(spec)} build):")
        click.echo(ins.table(got))
        rows += [dict(r, shape=label) for r in got]
    return rows


def _set_threads(n: int) -> None:
    """Same threads for moegen (read per call) and torch; OpenMP/BLAS pools loaded later too."""
    os.environ["MOEGEN_NUM_THREADS"] = str(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    try:
        import torch  # optional and heavy: only to set its thread count
        torch.set_num_threads(n)
    except ImportError:
        pass


def _plan(matrix, shapes, experts, topk, hidden, ffn, tokens, dtype, activation, backend,
          grid_given):
    """(list of (label, spec), token counts) from the options."""
    probe = resolve(MoESpec(num_experts=8, top_k=2, hidden_dim=512, ffn_dim=2048, backend=backend))
    on_gpu = probe.backend == "cuda"
    dtypes = parse_strs(dtype) or (["bfloat16"] if on_gpu or matrix == "targets" else ["float32"])
    if matrix == "cpu" and dtype is None:
        dtypes = ["float32"]
    token_list = parse_ints(tokens, "--tokens", minimum=0)
    if token_list is None:
        token_list = list(TARGET_TOKENS if (matrix == "targets" or (on_gpu and matrix != "cpu"))
                          else CPU_TOKENS)
    specs = []
    names = parse_strs(shapes)
    if names is None and not grid_given:
        names = list(SHAPES) if matrix == "targets" else ["seed-small"]
    for dt in dtypes:
        if names:
            specs += [(lbl if len(dtypes) == 1 else f"{lbl}-{s.dt.short}", s)
                      for lbl, s in mx.shape_specs(names, backend, dt)]
    if grid_given:
        E, k, H, F = SHAPES["seed-small"]
        specs += mx.grid_specs(parse_ints(experts, "--experts") or [E],
                               parse_ints(topk, "--topk") or [k],
                               parse_ints(hidden, "--hidden") or [H],
                               parse_ints(ffn, "--ffn") or [None], dtypes, backend, activation)
    if activation != "swiglu":
        specs = [(lbl, s.replace(activation=activation)) for lbl, s in specs]
    return specs, token_list


def _failures(points) -> list[str]:
    out = []
    for p in points:
        where = f"{p['shape']} T={p['tokens']}"
        skipped = p.get("skipped") or ""
        if skipped.startswith(("failed", "compile failed")):
            out.append(f"{where}: {skipped}")
        err = p.get("moegen_err")
        if p.get("moegen") and err is not None and not err <= DTYPES[p["dtype"]].tolerance:
            out.append(f"{where}: moegen error {err:.3g} > tolerance {DTYPES[p['dtype']].tolerance:g}")
    return out


def _write(path, rep) -> None:
    problems = report.validate(rep)
    if problems:
        log.warning("report does not match its schema: %s", problems[:5])
    with open(path, "w") as fh:
        fh.write(report.dumps(rep))
