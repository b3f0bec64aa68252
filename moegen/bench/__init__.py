"""Benchmarks of moegen kernels beside baselines (``moegen bench``).  The per-kernel profiling
core (floors, ceilings, timing, problems, profile_kernel) is `moegen.profiling`.

    shapes      the named benchmark shapes and token counts
    baselines   HF-style loop, torch._grouped_mm, NumPy loop, vLLM Triton (when importable)
    contenders  plugin files (``--contender FILE``) timed as extra columns
    matrix      the benchmark matrix runner (and custom grids) under a time budget
    startup     import / warm-start / cold-compile times in fresh processes
    instructions  instruction counts per call under callgrind (CPU)
    report      tables and the JSON report schema
    plot        time vs tokens per shape (matplotlib, optional)
"""
