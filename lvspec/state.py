"""The decode state: every tensor a batch's decoding reads and writes, allocated once per (slots,
capacity) and reused call after call, and `Status`, the one small vector the host reads back a cycle.

Per slot it holds the row's caches (target `T`, draft `D`), its emitted tokens and counters, its
own acceptance history and draft length (`k_row`, chosen on the device: `draft_length`), and how
many of its newest tokens the draft has not read yet (`lag`: 2, `prev` and `last`, after a cycle
that drafted; one more for each cycle that did not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lvspec.stats import COUNTERS

C = {name: i for i, name in enumerate(COUNTERS)}  # a counter's row in `DecodeState.count`
CATCH_UP = 6  # tokens the draft reads in one catch-up forward (`Cycle.ingest`) after cycles without drafts


def margin(k_max: int) -> int:
    """Cache slots past a row's length that one cycle may write (a verify's k_max + 1 keys, a draft
    loop's k_max + 1, a catch-up's CATCH_UP), plus one: the last, which no row writes or reads, takes
    the keys of a packed forward's fillers (`decoder.packed_tokens`)."""
    return max(k_max, CATCH_UP) + 2


def catch_ups(k: int, lag: int, lazy: bool = False) -> int:
    """How many catch-up forwards (`Cycle.ingest`, up to CATCH_UP tokens a row each) a cycle
    drafting k tokens runs first, from the status's largest lag: enough to catch up where it
    drafts now; else one where the draft would fall further behind than one forward reads, unless
    `lazy` (exact sd, whose batch may stop drafting for good: it catches up only when it drafts)."""
    if lag <= 2:
        return 0
    if k > 0:
        return -(-(lag - 2) // CATCH_UP)
    return int(not lazy and lag >= CATCH_UP + 2)


@dataclass(frozen=True)
class Status:
    """What the host reads once a cycle: whether any row decodes, the next cycle's K (the longest
    draft any decoding row takes), the draft's largest lag, the tokens its verify must run (each
    decoding row's own K + 1), and each slot's decoding flag."""

    values: tuple[int, ...]
    HEAD = 4  # values before the slots' flags

    @property
    def decoding(self) -> bool:
        return bool(self.values[0])

    @property
    def k(self) -> int:
        return self.values[1]

    @property
    def lag(self) -> int:
        return self.values[2]

    @property
    def tokens(self) -> int:
        return self.values[3]

    @property
    def slots(self) -> tuple[int, ...]:
        return self.values[self.HEAD:]


class DecodeState:
    """Everything a batch's decoding reads and writes, allocated once per (slots, capacity)."""

    def __init__(self, T, D, slots: int, capacity: int, k_max: int, max_new_tokens: int, probed_heads: int,
                 device, draft_capacity: int | None = None):
        self.slots, self.capacity, self.k_max = slots, capacity, k_max
        self.T = T.new_cache(slots, capacity)
        # The draft's prompts may be shorter (SpecConfig.draft_frame_stride): its cache then is too.
        self.D = D.new_cache(slots, draft_capacity or capacity) if D is not None else None
        k = max(k_max, 1)
        long = dict(dtype=torch.long, device=device)
        flag = dict(dtype=torch.bool, device=device)
        self.video = torch.zeros(slots, capacity, **flag)  # target slots holding video
        self.exact_only = torch.zeros(slots, **flag)  # rows verified strictly (audit twins)
        self.seq0 = torch.zeros(slots, **long)  # the prompt's last token: a row's sequence starts there
        self.prev = torch.zeros(slots, **long)  # the sequence's second newest token
        self.last = torch.zeros(slots, **long)  # its newest: not in the target's cache yet
        self.lag = torch.zeros(slots, **long)  # newest sequence tokens the draft has not read (>= 2)
        self.active = torch.zeros(slots, **flag)
        self.stopped = torch.zeros(slots, **flag)
        self.tokens = torch.zeros(slots, max_new_tokens + k + 1, **long)  # emitted, + room for a cycle
        self.length = torch.zeros(slots, **long)  # emitted tokens
        self.budget = torch.full((slots,), max_new_tokens, **long)  # tokens a row may emit (replay: its length)
        self.count = torch.zeros(len(COUNTERS), slots, **long)
        # The row's own history, which alone chooses its draft length: cycles that reached / kept draft slot j.
        self.reached = torch.zeros(slots, k, **long)
        self.kept = torch.zeros(slots, k, **long)
        self.k_row = torch.zeros(slots, **long)  # drafts the row takes in the next cycle
        self.cycle_ms = torch.ones(k_max + 1, dtype=torch.float64, device=device)  # k=auto's cost table by K
        self.drafted = torch.zeros(slots, k, **long)
        # The verdict of the latest verify forward.
        self.limit = torch.zeros(slots, **long)  # drafts a row may keep this cycle (its own K where loosened)
        self.accepted = torch.zeros(slots, **long)
        self.next_token = torch.zeros(slots, **long)
        self.kind = torch.zeros(slots, k, **long)
        self.target_tokens = torch.zeros(slots, k + 1, **long)
        self.anchor_rejected = torch.zeros(slots, **flag)
        self.relevance = torch.zeros(slots, k + 1, device=device)
        self.relevance_by_head = torch.zeros(slots, probed_heads, k + 1, device=device)
        self.status = torch.zeros(Status.HEAD + slots, **long)
        # Set by the engine that builds the state: its captured stages, its captured prompt forwards
        # (they write into these caches), and whether memory chose its slot count (slots="auto").
        self.stages = self.prompts = None
        self.memory_bound = False

    def small(self) -> list[torch.Tensor]:
        """The tensors a cycle rewrites (the caches' keys aside): what a warm-up run must restore."""
        caches = [c for c in (self.T, self.D) if c is not None]
        return [t for c in caches for t in (c.length, c.pad, c.offset)] + [
            self.seq0, self.prev, self.last, self.lag, self.active, self.stopped, self.tokens, self.length,
            self.budget, self.count, self.reached, self.kept, self.k_row, self.drafted, self.limit, self.accepted,
            self.next_token, self.kind, self.target_tokens, self.anchor_rejected, self.relevance,
            self.relevance_by_head, self.status, self.exact_only]

    def reset(self) -> None:
        for t in self.small():
            t.zero_()

    def keep(self, k: int, v) -> None:
        """The verdict (`verify.Verdict`) of a cycle drafting k, into the state."""
        self.accepted.copy_(v.accepted)
        self.kind[:, :k].copy_(v.kind)
        self.next_token.copy_(v.next_token)
        self.anchor_rejected.copy_(v.anchor_rejected)

    def publish(self, own_k) -> None:
        """Write the `Status` the host reads (on the device); `own_k(k)`: the drafts each row keeps in
        a cycle drafting k (`Cycle.own_k`)."""
        decoding = self.active.long()
        k = (self.k_row * decoding).max()
        self.status[0] = self.active.any()
        self.status[1] = k
        self.status[2] = (self.lag * decoding).max()
        self.status[3] = ((own_k(self, k) + 1) * decoding).sum()
        self.status[Status.HEAD:].copy_(self.active)

    def read(self) -> Status:
        """The host's one read of a cycle (it waits for the queued work)."""
        return Status(tuple(self.status.tolist()))

    def cache_bytes(self) -> int:
        """Bytes of both models' keys and values."""
        return sum(c.k.numel() * c.k.element_size() * 2 for c in (self.T, self.D) if c is not None)
