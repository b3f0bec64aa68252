"""`moegen tune`: measure the plans a backend may build for one spec, keep a winner only when
it beats the defaults by more than the run-to-run spread.

Each candidate is one tuning choice (`moegen.tuning.candidates`), that is one `KernelPlan`.
Candidates are compiled into a temporary cache that is removed afterwards (the kernel cache
gets only the record).  Every candidate is timed ``repeats`` times at each token count, the
rounds interleaved (candidate order rotated each round) so a slow spell of a shared machine
hits all of them.  The winner is the lowest geometric mean over token counts of its median
time relative to the defaults'; it is stored only when its gain exceeds the interquartile
spread of the runs (`decide`).  When the defaults win, a stale record is removed.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import jit, tuning
from .backends import get_backend
from .profiling.problems import make_inputs, make_weights
from .profiling import profile_kernel
from .cache import KernelCache
from .spec import MoESpec

MIN_REPEATS = 5


@dataclass
class TuneResult:
    spec: MoESpec
    target: str
    tokens: tuple[int, ...]
    rows: list[dict] = field(default_factory=list)   # {"choice", "ms": [median per T], "spread", "score"}
    best: dict = field(default_factory=dict)         # the measured winner
    stored: dict | None = None                       # what was stored (None: nothing)
    reason: str = ""

    def table(self) -> str:
        """Median ms per token count, spread (IQR / median) and score (1.0 = the defaults)."""
        head = (f"{'candidate':<48}" + "".join(f"{'T=' + str(t):>12}" for t in self.tokens)
                + f"{'spread':>9}{'score':>8}")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            mark = "  <- best" if r["choice"] == self.best else ""
            label = _label(r["choice"])
            lines.append(f"{label:<48}" + "".join(f"{m:>12.4f}" for m in r["ms"])
                         + f"{r['spread']:>8.1%}{r['score']:>8.3f}{mark}")
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: what was stored and why."""
        if self.stored is None:
            return f"nothing stored: {self.reason}"
        return f"stored {_label(self.stored)} for {self.spec.name} on {self.target}: {self.reason}"


def _label(choice: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in choice.items()) or "(defaults)"


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


def decide(samples: list[list[list[float]]]) -> tuple[int, list[dict], str, bool]:
    """Pick a winner from ``samples[candidate][token count] = [ms per repeat]`` (candidate 0 is
    the defaults).  Returns (winner index, rows, reason, significant): the winner has the
    lowest geometric mean of median / default median; it is significant when its gain
    (1 - that mean) exceeds the spread, the geometric mean over token counts of the larger
    interquartile range / median of the winner and the defaults."""
    rows = []
    for cand in samples:
        qs = [_quartiles(xs) for xs in cand]
        rows.append({"ms": [q[1] for q in qs],
                     "spread": _geomean([(q[2] - q[0]) / q[1] if q[1] > 0 else 0.0 for q in qs])})
    base = rows[0]["ms"]
    for r in rows:
        r["score"] = _geomean([m / b for m, b in zip(r["ms"], base) if m > 0 and b > 0])
    win = min(range(len(rows)), key=lambda i: rows[i]["score"])
    if win == 0:
        return 0, rows, "the defaults measured fastest", False
    gain = 1.0 - rows[win]["score"]
    spread = max(rows[win]["spread"], rows[0]["spread"])
    if gain <= spread:
        return win, rows, (f"the best candidate's gain over the defaults ({gain:.1%}) is inside "
                           f"the run-to-run spread ({spread:.1%})"), False
    return win, rows, f"{gain:.1%} faster than the defaults (spread {spread:.1%})", True


def _geomean(xs: list[float]) -> float:
    xs = [x for x in xs if x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else 0.0


def tune(spec: MoESpec, tokens=(1, 64, 1024), budget_s: float = 0.5, repeats: int = MIN_REPEATS,
         save: bool = True, progress=None) -> TuneResult:
    """Time every candidate plan of ``spec`` at ``tokens`` (``repeats`` >= 5 interleaved rounds
    of whole calls, ``budget_s`` seconds per candidate and token count in all) and store the
    winner when it is significant (``save``).  Raises the usual compile errors; ValueError when
    the backend has nothing to tune or ``repeats`` < 5.
    """
    if repeats < MIN_REPEATS:
        raise ValueError(f"repeats must be at least {MIN_REPEATS}, got {repeats}")
    spec = jit.resolve(spec)
    be = get_backend(spec.backend)
    target = be.target(spec)
    allowed = be.tunables(spec)
    cands = tuning.candidates(allowed)
    if len(cands) <= 1:
        raise ValueError(f"the {spec.backend} backend has nothing to tune for {spec.name}")
    result = TuneResult(spec, target, tuple(tokens))
    with tempfile.TemporaryDirectory(prefix="moegen-tune-") as tmp:
        scratch = KernelCache(Path(tmp), prebuilt=[])
        kernels = [jit.compile_tuned(spec, choice, cache=scratch) for choice in cands]
        scratch.close()
    weights = [make_weights(k, keep_logical=False).packed for k in kernels]
    inputs = {T: make_inputs(kernels[0], T, count=2, seed=T) for T in tokens}
    samples = [[[] for _ in tokens] for _ in cands]
    per_run = budget_s / repeats
    for rnd in range(repeats):
        order = [(i + rnd) % len(cands) for i in range(len(cands))]
        for i in order:
            for j, T in enumerate(tokens):
                prof = profile_kernel(kernels[i], inputs[T], weights[i], budget_s=per_run,
                                      memory=False, graph=False)
                samples[i][j].append(float(prof["total_ms"]))
        if progress:
            progress(rnd + 1, repeats, cands, samples)
    win, rows, reason, significant = decide(samples)
    for choice, row in zip(cands, rows):
        result.rows.append({"choice": choice, **row})
    result.best = cands[win]
    result.reason = reason
    if significant and save:
        tuning.store(spec, target, allowed, cands[win],
                     [{"choice": c, "tokens": list(tokens), "ms": s} for c, s in zip(cands, samples)])
        result.stored = cands[win]
    elif save and win == 0:
        tuning.forget(spec, target, allowed)
    if not save:
        result.reason += " (--dry-run: nothing stored)"
    if save:
        jit.clear_memo()            # compile(spec) must now see the record (or its absence)
    return result
