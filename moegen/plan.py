"""`KernelPlan`: every constant of one kernel build, decided in one pure function.

    make_plan(spec, target, tuning)  ->  KernelPlan(spec, target, tuning, detail)

``detail`` is the backend's own frozen plan (`moegen.backends.cuda_plan.CudaPlan` for cuda,
the C backend's ``CPlan``): every token-count bucket, tile, thread count, shared-memory size,
split-K count, kernel name and workspace size.  Templates render from the plan alone, and the
loaded module's launches and workspaces read their constants from it alone, so a constant is
written once.  `moegen tune` varies the ``tuning`` input; the cache key hashes the plan.

`make_plan` does no I/O: the spec must already be resolved (`moegen.jit.resolve`), and the
facts of the machine (the stored tuning record, the GPU's multiprocessor count) are looked up
by the caller and passed in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .backends import get_backend
from .errors import SpecError
from .spec import MoESpec


@dataclass(frozen=True)
class KernelPlan:
    """One build: the resolved spec, its target, the tuning applied and the backend's plan."""
    spec: MoESpec           # resolved: backend concrete (and arch, for cuda)
    target: str             # "sm_90a", "x86-64-v3", "avx512" ...
    tuning: tuple           # sorted (name, value) pairs that were applied
    detail: Any             # the backend's frozen plan (CudaPlan, CPlan)

    @property
    def backend(self) -> str:
        return self.spec.backend

    def to_dict(self) -> dict:
        """The plan as canonical JSON-able data (what the cache key hashes)."""
        return {"spec": self.spec.to_dict(), "target": self.target,
                "tuning": [list(p) for p in self.tuning], "detail": _plain(self.detail)}

    def __str__(self) -> str:
        return plan_text(self)


def make_plan(spec: MoESpec, target: str | None = None, tuning: dict | None = None,
              sms: int | None = None) -> KernelPlan:
    """The plan of ``spec`` (resolved: backend "c" or "cuda") for ``target`` (None: the
    backend's target for the spec) with ``tuning`` (constants `moegen tune` chose; None or {}:
    the backend's defaults).  ``sms``: the multiprocessor count of the CUDA device the plan is
    for (cuda only; None: the count of the arch's reference GPU, see `cuda_plan.ARCH_SMS`).

    Pure apart from asking the backend for its default target when ``target`` is None.
    Raises SpecError for an unresolved spec, ValueError for a tuning the backend refuses.
    """
    if spec.backend == "auto":
        raise SpecError("make_plan needs a resolved spec (backend 'c' or 'cuda', see "
                        "moegen.jit.resolve), got backend='auto'")
    be = get_backend(spec.backend)
    target = target or be.target(spec)
    tuning = dict(tuning or {})
    extra = {} if sms is None else {"sms": sms}
    detail = be.plan(spec, target, tuning, **extra)
    return KernelPlan(spec, target, tuple(sorted(tuning.items())), detail)


# -- printing ---------------------------------------------------------------------------------
def _plain(obj):
    """Dataclasses -> dicts, tuples -> lists, recursively (JSON-able)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    return obj


def _rows(value, prefix: str, out: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _rows(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, list) and value and all(isinstance(v, (dict, list)) for v in value):
        for i, v in enumerate(value):
            label = v.get("name", i) if isinstance(v, dict) else i
            _rows(v, f"{prefix}[{label}]", out)
    elif isinstance(value, list):
        out.append((prefix, ", ".join(map(str, value))))
    else:
        out.append((prefix, str(value)))


def plan_text(plan: KernelPlan) -> str:
    """A readable multi-line table of every constant of the plan (``moegen plan``)."""
    rows: list[tuple[str, str]] = [("spec", plan.spec.name), ("backend", plan.backend),
                                   ("target", plan.target),
                                   ("tuning", ", ".join(f"{k}={v}" for k, v in plan.tuning)
                                    or "(defaults)")]
    _rows(_plain(plan.detail), "", rows)
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
