"""`moegen tune`: choose a backend's tunable constants for one spec by measuring them.

A backend names what may be tuned (``Backend.tunables(spec)``: constant -> allowed values, the
first the default).  `tune` compiles each candidate, times whole calls at a few token counts on
this machine, and stores the winner as a tuning record in the kernel cache: canonical JSON bytes
under ``tune_<spec name>``, keyed by the spec, backend, target (ISA tier or sm arch), toolchain
and the allowed values.  The record applies to every machine of that target, so a build machine
can tune, ``moegen cache export`` and ship it beside the kernels.  `moegen.jit` looks the record
up before rendering; without one the backend's defaults are used.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import dataclass, field

from .backends import get_backend
from .backends.base import Artifact
from .spec import MoESpec

log = logging.getLogger("moegen.tuning")

RECORD_FORMAT = 1


def _resolve(spec: MoESpec) -> MoESpec:
    from .jit import resolve
    return resolve(spec)


def record_identity(spec: MoESpec) -> tuple[str, str]:
    """(entry name, key) of the tuning record of ``spec`` (resolved)."""
    from .cache import digest
    spec = _resolve(spec)
    be = get_backend(spec.backend)
    parts = {"kind": "tuning", "format": RECORD_FORMAT, "spec": spec.to_dict(),
             "backend": be.name, "target": be.target(spec), "toolchain": be.toolchain(),
             "tunables": {k: list(v) for k, v in sorted(be.tunables(spec).items())}}
    return f"tune_{spec.name}", digest(parts)


def _valid(spec: MoESpec, choice) -> bool:
    allowed = get_backend(spec.backend).tunables(spec)
    return isinstance(choice, dict) and all(k in allowed and v in allowed[k]
                                            for k, v in choice.items())


def lookup(spec: MoESpec, cache=None) -> dict:
    """The stored choice for ``spec`` ({} when untuned).  A record that does not parse or
    names values the backend no longer allows is ignored with a warning."""
    from .cache import default_cache
    spec = _resolve(spec)
    if not get_backend(spec.backend).tunables(spec):
        return {}
    name, key = record_identity(spec)
    art = (cache or default_cache()).get(name, key)
    if art is None:
        return {}
    try:
        choice = json.loads(art.binary.decode())["choice"]
    except (ValueError, KeyError, UnicodeDecodeError, TypeError):
        choice = None
    if not _valid(spec, choice):
        log.warning("ignoring an unreadable tuning record %s.%s", name, key[:16])
        return {}
    return choice


def store(spec: MoESpec, choice: dict, measurements: list | None = None, cache=None) -> None:
    """Store ``choice`` as the tuning record of ``spec``."""
    from .cache import default_cache
    spec = _resolve(spec)
    if not _valid(spec, choice):
        raise ValueError(f"tuning {choice!r} is not allowed for {spec.name}; choices: "
                         f"{get_backend(spec.backend).tunables(spec)}")
    name, key = record_identity(spec)
    body = json.dumps({"format": RECORD_FORMAT, "choice": choice,
                       "measurements": measurements or []}, sort_keys=True).encode()
    be = get_backend(spec.backend)
    (cache or default_cache()).put(name, key, Artifact(body, {
        "kind": "tuning", "key": key, "spec_name": name, "spec": spec.to_dict(),
        "backend": be.name, "target": be.target(spec), "choice": choice}))


def candidates(spec: MoESpec) -> list[dict]:
    """Every combination of the backend's tunable values; the defaults first."""
    allowed = get_backend(_resolve(spec).backend).tunables(spec)
    names = sorted(allowed)
    return [dict(zip(names, values)) for values in itertools.product(*(allowed[n] for n in names))]


@dataclass
class TuneResult:
    spec: MoESpec
    tokens: tuple[int, ...]
    rows: list[dict] = field(default_factory=list)     # {"choice", "ms": [per T], "score"}
    best: dict = field(default_factory=dict)

    def table(self) -> str:
        head = f"{'candidate':<40}" + "".join(f"{'T=' + str(t):>12}" for t in self.tokens) + f"{'score':>9}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            mark = "  <- best" if r["choice"] == self.best else ""
            label = ", ".join(f"{k}={v}" for k, v in r["choice"].items()) or "(defaults)"
            lines.append(f"{label:<40}" + "".join(f"{m:>12.4f}" for m in r["ms"])
                         + f"{r['score']:>9.3f}{mark}")
        return "\n".join(lines)


def tune(spec: MoESpec, tokens=(1, 64, 1024), budget_s: float = 0.5, save: bool = True,
         progress=None) -> TuneResult:
    """Time every candidate of ``spec`` at ``tokens`` (whole calls, median, rotated random
    inputs) and keep the one with the lowest geometric-mean time relative to the defaults.

    Stores the winner (``save``) so later `moegen.compile` calls of this spec use it.
    Raises the usual compile errors; ValueError when the backend has nothing to tune.
    """
    from .bench.problems import make_inputs, make_weights
    from .bench.profile import profile_kernel
    from .jit import compile_tuned
    spec = _resolve(spec)
    cands = candidates(spec)
    if len(cands) <= 1:
        raise ValueError(f"the {spec.backend} backend has nothing to tune for {spec.name}")
    result = TuneResult(spec, tuple(tokens))
    base = None
    for i, choice in enumerate(cands):
        kernel = compile_tuned(spec, choice)
        weights = make_weights(kernel, keep_logical=False)
        ms = []
        for T in tokens:
            xs = make_inputs(kernel, T, count=2, seed=T)
            prof = profile_kernel(kernel, xs, weights.packed, budget_s=budget_s, memory=False,
                                  graph=False)
            ms.append(float(prof["total_ms"]))
        base = base or ms
        score = math.exp(sum(math.log(m / b) for m, b in zip(ms, base) if m > 0 and b > 0) / len(ms))
        result.rows.append({"choice": choice, "ms": ms, "score": score})
        if progress:
            progress(i + 1, len(cands), choice, ms)
    result.best = min(result.rows, key=lambda r: r["score"])["choice"]
    if save:
        from .jit import clear_memo
        store(spec, result.best, [{"choice": r["choice"], "tokens": list(tokens), "ms": r["ms"]}
                                  for r in result.rows])
        clear_memo()            # compile(spec) must now pick the record up
    return result
