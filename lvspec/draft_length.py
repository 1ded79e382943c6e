"""How many tokens a row drafts: the K that gives the row the most expected tokens per millisecond.

A cycle with K drafts costs K draft steps and one verify forward over K + 1 tokens; K = 0 is a
plain target step (what ar runs), so that drafting is chosen only where it pays, and only once the
row's own drafts have shown it (EVIDENCE). A cycle yields 1 + S(1) + ... + S(K) tokens, where S(j)
is the chance that the first j drafts are all kept (acceptance is a prefix walk). S comes from the row's own counts: for every draft slot j, how many
of its cycles reached it (drafted it with all earlier slots kept) and how many kept it, each slot's
rate drawn towards the row's pooled rate over all slots, and that towards a fixed prior (a new row
starts from the prior alone).

So a row's K follows from the config, the cost table and the row's own history alone, never from
its batch neighbours, its slot or the rank count: the same video gets the same caption wherever it
runs with the same table. A cycle drafts the longest K any row asks for, and every row pays for
it: at large batch almost every cycle holds a row that wants to draft. Exact decoding (sd) emits
the same tokens at any K, so there the batch chooses one K together (`choose_batch`): the most
expected tokens of all its decoding rows per millisecond, K = 0 where drafting does not pay the
batch. The table is measured once per engine (the first state's shapes) or
pinned (`SpecConfig.k_costs`, e.g. the table a job's summary recorded on the same kind of GPU).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch

PRIOR, PRIOR_WEIGHT = 0.7, 2.0  # a new row's acceptance rate, worth two observed cycles
# Cycles a row drafts (K >= 1) before it may choose K = 0: a row that drafts nothing learns nothing
# more, so K = 0 is chosen for good, on the row's own evidence, never on the prior alone.
EVIDENCE = 4


@dataclass(frozen=True)
class Costs:
    """Milliseconds: one draft step, a target step (K = 0), and a verify forward at K = 1 and at
    K = k_max (linear between)."""

    draft_step_ms: float
    verify_0_ms: float
    verify_1_ms: float
    verify_max_ms: float

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"k_costs.{f.name} must be a positive number of milliseconds, got {value!r}")

    @classmethod
    def of(cls, table) -> Costs:
        """From a mapping with exactly these keys (a config's `k_costs`, a summary's record)."""
        if isinstance(table, Costs):
            return table
        names = [f.name for f in fields(cls)]
        if not hasattr(table, "keys") or set(table.keys()) != set(names):
            raise ValueError(f"k_costs must map exactly {names} to milliseconds, got {table!r}")
        return cls(**{name: float(table[name]) for name in names})

    def rounded(self) -> Costs:
        """To three significant digits: the table a summary records is exactly the one decoded with,
        so pinning it reproduces the captions."""
        return Costs(**{k: float(f"{v:.3g}") for k, v in asdict(self).items()})

    def cycle_ms(self, k_max: int) -> list[float]:
        """The cost of a cycle drafting K = 0 .. k_max tokens."""
        span = self.verify_max_ms - self.verify_1_ms
        return [self.verify_0_ms] + [k * self.draft_step_ms + self.verify_1_ms + span * (k - 1) / max(k_max - 1, 1)
                                     for k in range(1, k_max + 1)]

    def as_dict(self) -> dict:
        return asdict(self)


def expected_tokens(reached: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """[rows, k_max + 1]: tokens a cycle drafting K = 0 .. k_max is expected to emit, from each row's
    counts [rows, k_max] (float64: the choice must not depend on where it is computed)."""
    reached, kept = reached.double(), kept.double()
    pooled = (kept.sum(1, keepdim=True) + PRIOR_WEIGHT * PRIOR) / (reached.sum(1, keepdim=True) + PRIOR_WEIGHT)
    survival = ((kept + PRIOR_WEIGHT * pooled) / (reached + PRIOR_WEIGHT)).cumprod(1)
    return torch.cat([torch.ones_like(survival[:, :1]), 1 + survival.cumsum(1)], 1)


def choose(reached: torch.Tensor, kept: torch.Tensor, cycle_ms: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """Each row's K in [0, limit]: the most expected tokens per millisecond (the shortest on a tie),
    at least 1 until the row has drafted EVIDENCE cycles. `cycle_ms` [k_max + 1] (`Costs.cycle_ms`),
    `limit` [rows]. On the device, no host sync."""
    rate = expected_tokens(reached, kept) / cycle_ms
    k = torch.arange(cycle_ms.numel(), device=rate.device)
    least = torch.minimum((reached[:, 0] < EVIDENCE).long(), limit)
    return rate.masked_fill((k > limit[:, None]) | (k < least[:, None]), -math.inf).argmax(1)


def choose_batch(reached: torch.Tensor, kept: torch.Tensor, cycle_ms: torch.Tensor, limit: torch.Tensor,
                 active: torch.Tensor) -> torch.Tensor:
    """Exact decoding's K: one for every decoding row (each capped by its `limit`), the one whose
    cycle yields the batch the most expected tokens per millisecond (the shortest on a tie). Rows
    new to the batch count at the prior, so a batch where drafting pays starts drafting; no row
    needs evidence of its own (the choice is the batch's). On the device, no host sync."""
    k = torch.arange(cycle_ms.numel(), device=limit.device)
    per_row = expected_tokens(reached, kept).gather(1, torch.minimum(k[None, :], limit[:, None]))
    best = ((per_row * active[:, None]).sum(0) / cycle_ms).argmax()
    return torch.minimum(best, limit)
