"""What LVSpec counts for each row, and the figures made of the counts: the one vocabulary that the
engine, the job's Parquet rows, its summary and report, calibration and the benchmarks share.

Every emitted token is exactly one of the `KINDS`: a draft token accepted because it equals the
target's (exact), because the loose verifier let it through (loose) or at a shifted position
(shift); the target's own token where a draft was rejected (correction); or the target's token
after every draft of a cycle was kept, and the prefill's first token (bonus). tau, the mean
accepted length, is tokens per draft-verify cycle with each row's prefill token left out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

KINDS = ("accepted_exact", "accepted_loose", "accepted_shift", "corrections", "bonus")
COUNTERS = ("num_tokens", "num_cycles", "target_forwards", "draft_forwards", *KINDS, "rejected_anchor", "drafted",
            "catch_ups")


@dataclass
class RowStats:
    """Counters of one row (`COUNTERS`), and its tau and mean draft length."""

    num_tokens: int = 0
    num_cycles: int = 0  # draft-verify cycles (ar: single-token steps); the prefill is not one
    target_forwards: int = 0  # prefill included
    draft_forwards: int = 0  # prefill included
    accepted_exact: int = 0
    accepted_loose: int = 0
    accepted_shift: int = 0
    corrections: int = 0
    bonus: int = 0  # the prefill's token, and each cycle's token after K accepted drafts
    rejected_anchor: int = 0  # cycles ended by the relevance gate
    drafted: int = 0  # draft tokens proposed, over all cycles
    catch_ups: int = 0  # draft forwards that read tokens emitted in cycles without drafts (k=auto's K = 0)
    mean_accepted_length: float = 0.0  # tau: tokens per cycle, the prefill's token excluded
    mean_draft_length: float = 0.0  # K per cycle (fixed, or as chosen with k="auto")

    @classmethod
    def of(cls, counts: Iterable[int]) -> RowStats:
        """A row's stats from its counters, in `COUNTERS` order."""
        stats = cls(**dict(zip(COUNTERS, counts)))
        if stats.num_cycles:
            stats.mean_accepted_length = tau(stats.num_tokens, 1, stats.num_cycles)
            stats.mean_draft_length = stats.drafted / stats.num_cycles
        return stats

    def as_dict(self) -> dict:
        return asdict(self)


def tau(tokens: int, rows: int, cycles: int) -> float:
    """Tokens per cycle of `rows` rows that emitted `tokens` in `cycles` (each row's prefill token is no
    cycle's)."""
    return (tokens - rows) / max(cycles, 1)


def totals(rows: Iterable[Mapping]) -> dict:
    """Counters summed over rows (mappings with the `COUNTERS`, e.g. Parquet rows or `RowStats.as_dict()`),
    their tau, mean draft length and each kind's share of the tokens."""
    rows = list(rows)
    sums = {name: sum(r.get(name) or 0 for r in rows) for name in COUNTERS}
    tokens, cycles = sums["num_tokens"], sums["num_cycles"]
    return {**sums, "tau": tau(tokens, len(rows), cycles), "mean_draft_length": sums["drafted"] / max(cycles, 1),
            "shares": {k: sums[k] / max(tokens, 1) for k in KINDS}}
