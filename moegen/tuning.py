"""Tuning records: the constants `moegen tune` chose for one spec and target, in the cache.

A backend names what may be tuned (``Backend.tunables(spec)``: constant -> allowed values, the
first the default).  A record is canonical JSON bytes under ``tune_<spec name>``, keyed by the
spec, backend, target (ISA tier or sm arch) and the allowed values (not the compiler: a record
must be found where no compiler is installed).  It applies to every machine of that target, so a
build machine can tune, ``moegen cache export`` and ship it beside the kernels.  `moegen.jit`
looks the record up before planning; without one the backend's defaults are used.  Measuring
candidates is `moegen.tuner`'s job; nothing here compiles.
"""

from __future__ import annotations

import itertools
import json
import logging

from .backends.base import Artifact
from .cache import default_cache, digest
from .spec import MoESpec

log = logging.getLogger("moegen.tuning")

RECORD_FORMAT = 2


def record_identity(spec: MoESpec, target: str, allowed: dict) -> tuple[str, str]:
    """(entry name, key) of the tuning record of ``spec`` (resolved) for ``target``, whose
    backend allows the tunables ``allowed``."""
    parts = {"kind": "tuning", "format": RECORD_FORMAT, "spec": spec.to_dict(),
             "backend": spec.backend, "target": target,
             "tunables": {k: list(v) for k, v in sorted(allowed.items())}}
    return f"tune_{spec.name}", digest(parts)


def _valid(allowed: dict, choice) -> bool:
    return isinstance(choice, dict) and all(k in allowed and v in allowed[k]
                                            for k, v in choice.items())


def lookup(spec: MoESpec, target: str, allowed: dict, cache=None) -> dict:
    """The stored choice for ``spec`` on ``target`` ({} when untuned or nothing is tunable).
    A record that does not parse or names values no longer allowed is ignored with a warning."""
    if not allowed:
        return {}
    name, key = record_identity(spec, target, allowed)
    art = (cache or default_cache()).get(name, key)
    if art is None:
        return {}
    try:
        choice = json.loads(art.binary.decode())["choice"]
    except (ValueError, KeyError, UnicodeDecodeError, TypeError):
        choice = None
    if not _valid(allowed, choice):
        log.warning("ignoring an unreadable tuning record %s.%s", name, key[:16])
        return {}
    return choice


def store(spec: MoESpec, target: str, allowed: dict, choice: dict,
          measurements: list | None = None, cache=None) -> None:
    """Store ``choice`` as the tuning record of ``spec`` on ``target``."""
    if not _valid(allowed, choice):
        raise ValueError(f"tuning {choice!r} is not allowed for {spec.name}; choices: {allowed}")
    name, key = record_identity(spec, target, allowed)
    body = json.dumps({"format": RECORD_FORMAT, "choice": choice,
                       "measurements": measurements or []}, sort_keys=True).encode()
    (cache or default_cache()).put(name, key, Artifact(body, {
        "kind": "tuning", "key": key, "spec_name": name, "spec": spec.to_dict(),
        "backend": spec.backend, "target": target, "choice": choice}))


def forget(spec: MoESpec, target: str, allowed: dict, cache=None) -> None:
    """Remove the tuning record of ``spec`` on ``target`` (the defaults apply again)."""
    name, key = record_identity(spec, target, allowed)
    cache = cache or default_cache()
    if cache.get(name, key) is not None:
        cache.drop(name, key, "the defaults measured best")


def candidates(allowed: dict) -> list[dict]:
    """Every combination of the allowed tunable values; the defaults first."""
    names = sorted(allowed)
    return [dict(zip(names, values)) for values in itertools.product(*(allowed[n] for n in names))]
