"""Benchmarks and profiling of moegen kernels (``moegen bench``, ``MoEKernel.profile``).

    floors      the DESIGN §7 / TARGETS.md floor arithmetic (pure)
    ceilings    copy bandwidth and matrix peak measured on this machine, in this run
    timing      CUDA-event / perf_counter clocks and repeat planning
    problems    random weights and inputs made and packed on the kernel's device
    profile     profile_kernel: per-stage times, totals, floor fraction, memory
    baselines   HF-style loop, torch._grouped_mm, NumPy loop, vLLM Triton (when importable)
    matrix      the TARGETS.md matrix runner (and custom grids) under a time budget
    startup     import / warm-start / cold-compile times in fresh processes
    report      tables and the JSON report schema
    plot        time vs tokens per shape (matplotlib, optional)
"""
