"""Which experts live on which rank: contiguous blocks of E/R routed experts per rank, the shared
experts replicated on every rank (each computes them for its own tokens)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    num_experts: int
    ranks: int
    shared: int = 0

    def __post_init__(self):
        if self.ranks < 1 or self.num_experts % self.ranks:
            raise ValueError(f"the process group's size must divide num_experts={self.num_experts} "
                             f"(each rank owns a whole block of experts), got {self.ranks} ranks")

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.ranks

    def experts_of(self, rank: int) -> range:
        """The global ids of the routed experts ``rank`` owns."""
        n = self.experts_per_rank
        return range(rank * n, (rank + 1) * n)

    def owner(self, expert: int) -> int:
        """The rank that owns routed expert ``expert``."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert must be in [0, {self.num_experts}), got {expert}")
        return expert // self.experts_per_rank

    def describe(self, rank: int) -> str:
        ex = self.experts_of(rank)
        text = f"rank {rank}: experts {ex.start}-{ex.stop - 1}"
        if self.shared:
            text += f" + {self.shared} shared (replicated)"
        return text

    def __str__(self) -> str:
        return "\n".join(self.describe(r) for r in range(self.ranks))
