"""Load-balancing statistics of a call (DESIGN §1.6), read lazily from the workspace.

The group stage already has per-expert slot counts; the route stage also sums, per expert, the
router probabilities and, in one extra slot, logsumexp² of the logits.  `LayerStats` keeps
device copies of those two small vectors and computes the statistics on first read, so asking
for stats costs no host synchronisation until a value is used.
"""

from __future__ import annotations

import functools

import numpy as np

from .spec import MoESpec


class LayerStats:
    """Statistics of one forward pass.

    Properties: tokens_per_expert [E], usage [E] (fractions of all slots), usage_variance,
    usage_cv, max_over_mean_load, router_prob_mean [E], aux_loss (E·Σ f_e·P_e), z_loss,
    adaptive_coeff (base·(1 + usage_variance), the seed's adaptive coefficient), dropped.
    """

    def __init__(self, spec: MoESpec, tokens: int, counts, router_sums, dropped=0,
                 base_coeff: float = 0.01):
        self.spec = spec
        self.tokens = int(tokens)
        self._counts = counts
        self._sums = router_sums
        self._dropped = dropped
        self.base_coeff = base_coeff

    @classmethod
    def from_workspace(cls, spec, module, ws) -> "LayerStats":
        dropped = getattr(ws, "dropped", None)
        return cls(spec, ws.tokens, ws.counts.copy(), ws.router_sums.copy(),
                   dropped.copy() if dropped is not None else 0)

    @functools.cached_property
    def _host(self) -> dict:
        from . import arrays
        counts = np.asarray(arrays.host(self._counts), dtype=np.float64)
        sums = np.asarray(arrays.host(self._sums), dtype=np.float64)
        dropped = self._dropped if isinstance(self._dropped, int) else int(np.sum(arrays.host(self._dropped)))
        return {"counts": counts, "sums": sums, "dropped": dropped}

    def as_dict(self) -> dict:
        h = self._host
        E, T = self.spec.num_experts, self.tokens
        counts = h["counts"][:E]
        total = counts.sum()
        usage = counts / total if total > 0 else np.zeros(E)
        var = float(np.var(usage))
        mean = float(np.mean(usage))
        pmean = h["sums"][:E] / T if T else np.zeros(E)
        return {
            "tokens": T,
            "tokens_per_expert": counts.astype(np.int64),
            "usage": usage,
            "usage_variance": var,
            "usage_cv": float(np.sqrt(var) / mean) if mean > 0 else 0.0,
            "max_over_mean_load": float(counts.max() / counts.mean()) if total > 0 else 0.0,
            "router_prob_mean": pmean,
            "aux_loss": float(E * np.sum(usage * pmean)),
            "z_loss": float(h["sums"][E] / T) if T else 0.0,
            "adaptive_coeff": self.base_coeff * (1.0 + var),
            "dropped": h["dropped"],
        }

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        d = self.as_dict()
        if name in d:
            return d[name]
        raise AttributeError(f"LayerStats has no statistic {name!r}; known: {sorted(d)}")

    def __repr__(self) -> str:
        d = self.as_dict()
        return (f"LayerStats(tokens={d['tokens']}, aux_loss={d['aux_loss']:.4f}, "
                f"usage_cv={d['usage_cv']:.3f}, max/mean={d['max_over_mean_load']:.2f}, "
                f"dropped={d['dropped']})")
