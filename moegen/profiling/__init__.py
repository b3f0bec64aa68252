"""Timing a kernel against its floor: the core of ``MoEKernel.profile`` (no benchmark code).

    floors      the floor arithmetic of a call: bytes it must move, FLOPs it must do (pure)
    ceilings    copy bandwidth and matrix peak measured on this machine, in this run
    timing      CUDA-event / perf_counter clocks and repeat planning
    problems    random weights and inputs made and packed on the kernel's device
    profile     profile_kernel: per-stage times, totals, floor fraction, memory
"""

from .profile import profile_kernel

__all__ = ["profile_kernel"]
