"""How many tokens to draft: the K that maximises tokens per second of a cycle.

A cycle with K drafts costs K draft steps plus one verify forward over K + 1 tokens, and yields
1 + S(1) + ... + S(K) tokens, where S(j) is the chance that the first j drafts are all kept
(acceptance is a prefix walk). S comes from the batch's running counts: for every draft slot j,
how many cycles reached it (drafted it with all earlier slots kept) and how many kept it. Slots
never reached yet borrow the pooled rate of those that were.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Costs:
    """Measured seconds: one draft step, and a verify forward at K = 1 and K = k_max (linear between)."""

    draft_step: float
    verify_1: float
    verify_max: float


class DraftLength:
    """Chooses K in [1, k_max] per cycle from measured costs and running acceptance."""

    def __init__(self, k_max: int, costs: Costs, prior: float = 0.7, prior_weight: float = 2.0):
        self.k_max, self.costs = k_max, costs
        self.prior, self.prior_weight = prior, prior_weight

    def cycle_cost(self, k: int) -> float:
        c = self.costs
        share = (k - 1) / (self.k_max - 1) if self.k_max > 1 else 0.0
        return k * c.draft_step + c.verify_1 + share * (c.verify_max - c.verify_1)

    def survival(self, reached: Sequence[int], kept: Sequence[int]) -> list[float]:
        """S(1..k_max): chance that the first j drafts are all kept."""
        pooled = sum(kept) / sum(reached) if sum(reached) else self.prior
        out, s = [], 1.0
        for j in range(self.k_max):
            n, a = (reached[j], kept[j]) if j < len(reached) else (0, 0)
            s *= (a + self.prior_weight * pooled) / (n + self.prior_weight)
            out.append(s)
        return out

    def expected_tokens(self, k: int, survival: Sequence[float]) -> float:
        return 1.0 + sum(survival[:k])

    def choose(self, reached: Sequence[int], kept: Sequence[int], budget: int | None = None) -> int:
        """The K with the most expected tokens per second; never more than `budget` (tokens still
        wanted by the hungriest row, less the one the target adds)."""
        s = self.survival(reached, kept)
        top = self.k_max if budget is None else max(1, min(self.k_max, budget))
        return max(range(1, top + 1), key=lambda k: self.expected_tokens(k, s) / self.cycle_cost(k))
