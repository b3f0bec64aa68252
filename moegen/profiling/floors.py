"""The performance floor of one call (docs/PERF.md, "floors"): pure arithmetic, no device.

A call of the layer on ``T`` tokens must at least

* move its bytes: the weights of every expert it touches (read once), the router weight, and
  the activations (x read, y written), over the measured copy bandwidth;
* do its FLOPs: ``2·T·(k + shared)·(3 or 2)·H·F`` (the expert GEMMs) over the measured matrix
  peak.

The floor is the larger of the two.  Under uniform routing the expected number of distinct
experts touched by ``T`` tokens picking ``k`` of ``E`` each is ``E·(1 − (1 − k/E)^T)``.
All times here are in milliseconds, bandwidths in bytes/s, peaks in FLOP/s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..spec import MoESpec


def expected_experts_touched(num_experts: int, top_k: int, tokens: int) -> float:
    """E·(1 − (1 − k/E)^T): distinct experts hit by T tokens under uniform top-k routing.

    Raises ValueError for k outside [1, E] or T < 0.
    """
    if num_experts < 1 or not 1 <= top_k <= num_experts:
        raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def expert_weight_bytes(spec: MoESpec) -> int:
    """Bytes of one expert's FFN weights (W1, W3 when gated, W2, biases) in the spec dtype."""
    mats = 3 if spec.gated else 2
    n = mats * spec.hidden_dim * spec.ffn_dim
    if spec.bias:
        n += (mats - 1) * spec.ffn_dim + spec.hidden_dim
    return n * spec.dt.itemsize


def router_bytes(spec: MoESpec) -> int:
    """Bytes of the router weight [E, H]."""
    return spec.num_experts * spec.hidden_dim * spec.dt.itemsize


def activation_bytes(spec: MoESpec, tokens: int) -> int:
    """x read once and y written once: 2·T·H·itemsize."""
    return 2 * tokens * spec.hidden_dim * spec.dt.itemsize


def bytes_moved(spec: MoESpec, tokens: int, experts_touched: float | None = None) -> float:
    """Minimum bytes of a call: touched experts' weights (plus shared experts when T > 0), the
    router weight, the activations.  ``experts_touched`` defaults to the uniform expectation;
    pass the measured count of non-empty experts for achieved bandwidth."""
    if experts_touched is None:
        experts_touched = expected_experts_touched(spec.num_experts, spec.top_k, tokens)
    shared = spec.num_shared_experts if tokens > 0 else 0
    return ((experts_touched + shared) * expert_weight_bytes(spec) + router_bytes(spec)
            + activation_bytes(spec, tokens))


def flops(spec: MoESpec, tokens: int) -> int:
    """Expert-GEMM FLOPs: 2·T·(k + shared)·(3 if gated else 2)·H·F (router excluded)."""
    return spec.flops(tokens)


@dataclass(frozen=True)
class Floor:
    """The floor of one point.  Times in ms."""
    tokens: int
    experts_touched: float
    bytes: float
    flops: int
    bytes_ms: float
    flops_ms: float
    floor_ms: float
    bound: str              # "memory" or "compute"
    bandwidth: float        # bytes/s used
    peak: float             # FLOP/s used

    def as_dict(self) -> dict:
        return asdict(self)


def floor(spec: MoESpec, tokens: int, bandwidth: float, peak: float,
          experts_touched: float | None = None) -> Floor:
    """The floor of ``spec`` at ``tokens`` for a copy ``bandwidth`` (bytes/s, bytes read +
    written as a device copy counts them) and a matrix ``peak`` (FLOP/s).

    Raises ValueError when bandwidth or peak is not positive.
    """
    if not bandwidth > 0 or not peak > 0:
        raise ValueError(f"bandwidth and peak must be > 0, got bandwidth={bandwidth}, peak={peak}")
    if experts_touched is None:
        experts_touched = expected_experts_touched(spec.num_experts, spec.top_k, tokens)
    nbytes = bytes_moved(spec, tokens, experts_touched)
    nflops = flops(spec, tokens)
    bytes_ms = nbytes / bandwidth * 1e3
    flops_ms = nflops / peak * 1e3
    return Floor(tokens, experts_touched, nbytes, nflops, bytes_ms, flops_ms,
                 max(bytes_ms, flops_ms), "memory" if bytes_ms >= flops_ms else "compute",
                 bandwidth, peak)


def fraction_of_floor(floor_ms: float, measured_ms: float | None) -> float | None:
    """floor / measured (1.0 = at the floor); None when nothing was measured."""
    if measured_ms is None or not measured_ms > 0:
        return None
    return floor_ms / measured_ms
