"""Replayed acceptance: make a run do the work of a recorded one.

Real checkpoints can't be fetched here, so real-size speed is measured on random-weight models
of real shapes, whose own accept/reject decisions mean nothing. A `Replay` holds, per row, how
many draft tokens each cycle of a recorded run accepted (a toy run, or any real run, traced);
`generate(..., replay=...)` drafts, verifies and rolls back exactly as usual and then keeps that
many drafts instead of what verification chose. Figures measured so are labelled "replay".
"""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import torch

from lvspec.verify import EXACT, LOOSE, Verdict


# Caption lengths of real detailed captions vary several-fold; recorded toy captions do not. Replayed
# rows take lengths from a lognormal as a stand-in: median 150 tokens, sigma 0.6, clipped to [16, 512].
LENGTHS = ("lognormal", "recorded")
LOGNORMAL = {"median": 150.0, "sigma": 0.6, "low": 16, "high": 512}


def lognormal_lengths(n: int = 4096, median: float = LOGNORMAL["median"], sigma: float = LOGNORMAL["sigma"],
                      low: int = LOGNORMAL["low"], high: int = LOGNORMAL["high"], seed: int = 0) -> list[int]:
    """n caption lengths at the lognormal's n quantiles (i + 0.5) / n, clipped, in a seeded order."""
    normal = statistics.NormalDist()
    lengths = [min(high, max(low, round(median * math.exp(sigma * normal.inv_cdf((i + 0.5) / n)))))
               for i in range(n)]
    random.Random(seed).shuffle(lengths)
    return lengths


class Replay:
    """Per-row sequences of accepted draft counts; row r of a run (its index among the rows given)
    replays record r mod R, and a row that outlives its record starts it over. Acceptance is a
    prefix walk, so a count recorded at a longer draft length replays as min(count, K)."""

    def __init__(self, accepted: list[list[int]], lengths: list[int] | None = None):
        """`lengths` (optional, one per record): tokens each replayed row emits before it stops, so
        that rows finish at a realistic spread of lengths (continuous batching is measured so)."""
        if lengths is not None:
            if len(lengths) != len(accepted) or min(lengths, default=1) < 1:
                raise ValueError("lengths: one count >= 1 per record")
            lengths = [n for a, n in zip(accepted, lengths) if a]
        accepted = [a for a in accepted if a]
        if not accepted:
            raise ValueError("a replay needs at least one recorded cycle")
        if min(min(a) for a in accepted) < 0:
            raise ValueError("accepted counts must be >= 0")
        width = max(len(a) for a in accepted)
        self.table = torch.tensor([a + [0] * (width - len(a)) for a in accepted])  # [R, C]
        self.cycles = torch.tensor([len(a) for a in accepted])  # [R]
        self.lengths = lengths
        self.record: torch.Tensor | None = None  # [slots] the record each slot replays
        self.cursor: torch.Tensor | None = None  # [slots] its next cycle

    @classmethod
    def from_file(cls, path: str | Path, family: str, mode: str, lengths: str = "lognormal") -> Replay:
        """The records of one family and mode in a patterns file (`bench.realsize record`'s JSON:
        {"families": {family: {"sd": [[n, ...], ...], "lvspec": [...]}}}); `ar` replays lengths only
        (lvspec's records). `lengths`: "lognormal" (see LOGNORMAL) or "recorded" (the toy rows' own)."""
        records = patterns(path, family, mode)
        if lengths not in LENGTHS:
            raise ValueError(f"replay lengths must be one of {LENGTHS}, got {lengths!r}")
        counts = lognormal_lengths() if lengths == "lognormal" else [cls.recorded_length(a) for a in records]
        if lengths == "lognormal":  # every length with every record: R records x n lengths, keyed together
            records = [records[i % len(records)] for i in range(len(counts))]
        return cls(records, counts)

    @classmethod
    def from_outputs(cls, outputs) -> Replay:
        """From the RowOutputs of a traced `sd` / `lvspec` run (`generate(..., trace=True)`)."""
        return cls([list(o.accepted_per_cycle) for o in outputs])

    def lengths_of(self, rows: list[int]) -> torch.Tensor | None:
        """The replayed length of each of these rows (None: rows run to max_new_tokens)."""
        if self.lengths is None:
            return None
        return torch.tensor([self.lengths[r % len(self.lengths)] for r in rows])

    @staticmethod
    def recorded_length(accepted: list[int]) -> int:
        """Tokens a recorded row emitted: the prefill's one, then each cycle's kept drafts plus one
        (one or more too many when a stop token or the budget cut its last cycle short)."""
        return 1 + sum(n + 1 for n in accepted)

    def mean_accepted(self) -> float:
        return float(sum(int(self.table[i, :n].sum()) for i, n in enumerate(self.cycles.tolist()))
                     / int(self.cycles.sum()))

    def start(self, slots: int, device) -> None:
        self.table, self.cycles = self.table.to(device), self.cycles.to(device)
        self.record = torch.zeros(slots, dtype=torch.long, device=device)
        self.cursor = torch.zeros(slots, dtype=torch.long, device=device)

    def assign(self, slots: torch.Tensor, rows: list[int]) -> None:
        """Rows `rows` (indices among the rows given) start in `slots`."""
        self.record[slots] = torch.tensor(rows, device=slots.device) % self.table.shape[0]
        self.cursor[slots] = 0

    def apply(self, v: Verdict, active: torch.Tensor, drafted: torch.Tensor, limit: torch.Tensor | None = None) -> Verdict:
        """Keep the recorded number of drafts in every active slot (capped at this cycle's K, or at
        each row's `limit`)."""
        k = drafted.shape[1]
        record = self.record
        n = self.table[record, self.cursor % self.cycles[record]].clamp(max=k)
        if limit is not None:  # a row that drafts nothing this cycle uses no record
            n = torch.minimum(n, limit)
            active = active & (limit > 0)
        self.cursor += active.long()
        exact = drafted == v.target_tokens[:, :k]
        return Verdict(accepted=n, kind=torch.where(exact, EXACT, LOOSE),
                       next_token=v.target_tokens.gather(1, n[:, None])[:, 0], gated=v.gated,
                       anchor_rejected=torch.zeros_like(v.anchor_rejected), target_tokens=v.target_tokens)


def families_of(path: str | Path) -> dict:
    """The {family: {mode: records}} mapping of a patterns file; clear errors."""
    try:
        found = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read replay patterns {str(path)!r}: {type(e).__name__}: {e}") from None
    families = found.get("families") if isinstance(found, dict) else None
    if not isinstance(families, dict):
        raise ValueError(f"{path}: not a replay patterns file (no 'families' mapping; see bench.realsize record)")
    return families


def patterns(path: str | Path, family: str, mode: str) -> list[list[int]]:
    """Recorded accepted-draft counts of `family` in `mode` from a patterns file (`ar`, which
    replays lengths only, takes lvspec's records); clear errors."""
    families = families_of(path)
    mode = "lvspec" if mode == "ar" else mode
    if family not in families or mode not in families[family]:
        have = {f: sorted(m) for f, m in families.items()}
        raise ValueError(f"{path} holds no {mode!r} records of family {family!r} (it has {have})")
    records = families[family][mode]
    if not isinstance(records, list) or not any(records):
        raise ValueError(f"{path}: no recorded cycles for {family} {mode}")
    return records
