"""Timers and repeat planning shared by the profiler and the baselines.

GPU work is timed with CUDA events on the current stream (the device's own clock, no host
noise); CPU work with ``time.perf_counter``.  Repeats are planned from a time budget: one timed
run after warm-up says how long a call takes, then as many repeats as fit the budget, within
[min_repeats, max_repeats].
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def plan_repeats(first_ms: float, budget_s: float, min_repeats: int = 3,
                 max_repeats: int = 200) -> int:
    """How many timed repeats fit ``budget_s`` when one call takes ``first_ms``."""
    if min_repeats < 1 or max_repeats < min_repeats:
        raise ValueError(f"need 1 <= min_repeats <= max_repeats, got {min_repeats}, {max_repeats}")
    if not first_ms > 0:
        return max_repeats
    return int(min(max_repeats, max(min_repeats, budget_s * 1e3 // first_ms)))


def summarize(times_ms: list[float]) -> dict:
    """median, min, p90 and count of a list of times (ms); empty dict for no times."""
    if not times_ms:
        return {}
    s = sorted(times_ms)
    return {"median": statistics.median(s), "min": s[0],
            "p90": s[min(len(s) - 1, int(0.9 * len(s)))], "n": len(s)}


class CpuClock:
    """perf_counter marks; ``elapsed(a, b)`` in ms."""
    device = "cpu"

    def mark(self):
        return time.perf_counter()

    def elapsed(self, a, b) -> float:
        return (b - a) * 1e3

    def sync(self) -> None:
        pass


class CupyClock:
    """CUDA events (CuPy) recorded on the current stream; ``elapsed`` syncs on the later one."""
    device = "cuda"

    def __init__(self):
        import cupy
        self._cp = cupy

    def mark(self):
        ev = self._cp.cuda.Event()
        ev.record()
        return ev

    def elapsed(self, a, b) -> float:
        b.synchronize()
        return self._cp.cuda.get_elapsed_time(a, b)

    def sync(self) -> None:
        self._cp.cuda.get_current_stream().synchronize()


class TorchClock:
    """CUDA events (torch) on torch's current stream, for torch baselines."""
    device = "cuda"

    def __init__(self):
        import torch
        self._torch = torch

    def mark(self):
        ev = self._torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def elapsed(self, a, b) -> float:
        b.synchronize()
        return a.elapsed_time(b)

    def sync(self) -> None:
        self._torch.cuda.synchronize()


def clock_for(device: str, prefer_torch: bool = False):
    """A clock for ``device`` ("cpu" or "cuda")."""
    if device == "cpu":
        return CpuClock()
    return TorchClock() if prefer_torch else CupyClock()


def time_calls(fn: Callable[[int], object], clock, *, warmup: int = 2, repeats: int | None = None,
               budget_s: float = 1.0, min_repeats: int = 3, max_repeats: int = 200) -> dict:
    """Time ``fn(i)`` (``i`` = repeat index, for rotating buffers) with ``clock``.

    Warm-up calls first (at least one), then ``repeats`` timed calls, or as many as fit
    ``budget_s`` when ``repeats`` is None.  Each call is timed alone (synchronised), so on a GPU
    a launch-bound call shows its launch latency.  Returns `summarize` of the times plus the
    list under ``times``.
    """
    for i in range(max(1, warmup)):
        fn(i)
    clock.sync()
    times = []
    a = clock.mark()
    fn(0)
    b = clock.mark()
    times.append(clock.elapsed(a, b))
    if repeats is None:
        repeats = plan_repeats(times[0], budget_s, min_repeats, max_repeats)
    for i in range(1, repeats):
        a = clock.mark()
        fn(i)
        b = clock.mark()
        times.append(clock.elapsed(a, b))
    out = summarize(times)
    out["times"] = times
    return out
