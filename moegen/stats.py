"""Load-balancing statistics of a call, read lazily from the workspace.

The group stage already has per-expert slot counts; the route stage also sums, per expert, the
router probabilities and, in one extra slot, logsumexp² of the logits.  `LayerStats` keeps
device copies of those two small vectors and computes the statistics on first read, so asking
for stats costs no host synchronisation until a value is used.
"""

from __future__ import annotations

import functools

import numpy as np

from . import arrays
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


class BalanceTracker:
    """Accumulates `LayerStats` over steps, for serving dashboards and training loops.

        tracker = BalanceTracker(spec)             # or BalanceTracker(num_experts=E)
        y, st = kernel(x, weights, return_stats=True); tracker.update(st)
        tracker.summary()      # totals, usage, exponential moving averages, cold/hot experts

    ``decay`` weights the moving average of usage (0.99: about the last 100 steps).
    An expert is *cold* when its moving-average usage is below ``cold`` × the uniform share
    1/E, *hot* above ``hot`` × 1/E.
    """

    def __init__(self, spec: MoESpec | None = None, *, num_experts: int | None = None,
                 decay: float = 0.99, cold: float = 0.25, hot: float = 2.0,
                 base_coeff: float = 0.01):
        E = spec.num_experts if spec is not None else num_experts
        if not isinstance(E, int) or E < 1:
            raise ValueError(f"BalanceTracker needs a spec or num_experts >= 1, got {E!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if not 0.0 <= cold < 1.0 < hot:
            raise ValueError(f"need 0 <= cold < 1 < hot, got cold={cold}, hot={hot}")
        self.num_experts, self.decay, self.cold, self.hot = E, decay, cold, hot
        self.base_coeff = base_coeff
        self.steps = 0
        self.tokens = 0
        self.dropped = 0
        self.counts = np.zeros(E, dtype=np.int64)
        self.ema_usage = np.full(E, 1.0 / E)
        self.aux_losses: list[float] = []

    def update(self, stats) -> None:
        """Add one step's `LayerStats` (or a dict with tokens_per_expert/aux_loss/tokens)."""
        d = stats.as_dict() if hasattr(stats, "as_dict") else dict(stats)
        counts = np.asarray(d["tokens_per_expert"], dtype=np.int64)
        if counts.shape != (self.num_experts,):
            raise ValueError(f"stats.tokens_per_expert must have shape ({self.num_experts},), "
                             f"got {counts.shape}")
        self.steps += 1
        self.tokens += int(d.get("tokens", 0))
        self.dropped += int(d.get("dropped", 0))
        self.counts += counts
        total = counts.sum()
        if total > 0:
            usage = counts / total
            self.ema_usage = self.decay * self.ema_usage + (1.0 - self.decay) * usage
        if "aux_loss" in d:
            self.aux_losses.append(float(d["aux_loss"]))

    @property
    def usage(self) -> np.ndarray:
        total = self.counts.sum()
        return self.counts / total if total else np.zeros(self.num_experts)

    def cold_experts(self) -> list[int]:
        return [int(e) for e in np.nonzero(self.ema_usage < self.cold / self.num_experts)[0]]

    def hot_experts(self) -> list[int]:
        return [int(e) for e in np.nonzero(self.ema_usage > self.hot / self.num_experts)[0]]

    def summary(self) -> dict:
        usage = self.usage
        var = float(np.var(usage))
        mean = float(np.mean(usage))
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "dropped": self.dropped,
            "tokens_per_expert": self.counts.copy(),
            "usage": usage,
            "usage_variance": var,
            "usage_cv": float(np.sqrt(var) / mean) if mean > 0 else 0.0,
            "ema_usage": self.ema_usage.copy(),
            "mean_aux_loss": float(np.mean(self.aux_losses)) if self.aux_losses else None,
            "adaptive_coeff": self.base_coeff * (1.0 + float(np.var(self.ema_usage))),
            "cold_experts": self.cold_experts(),
            "hot_experts": self.hot_experts(),
        }
