"""The host's side of decoding: which row each slot holds, rows read but not placed yet, traces, and
the clock. `Stream.step` refills free slots, runs one cycle and returns the rows that finished.

Rows enter free slots in groups of at most `SpecConfig.prefill_tokens` prompt tokens (so that a
prefill's activations do not grow with the batch): into an empty batch group after group before
the first cycle; beside decoding rows on a second CUDA stream, where groups run one after another,
each placed at a later step once done (continuous batching), as many groups queued as there are
free slots, so that a wide batch whose rows end a few a cycle refills as fast as they end (one
group at a time where prompt forwards are CUDA graphs: a replay overwrites the last one's
outputs). The cycle's K is the longest any decoding row takes
(`Status.k`); each row keeps at most its own.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from lvspec.adapter import Prompt, check_video_rows, draft_row, rows_on, with_draft_video
from lvspec.decoder import packed_width
from lvspec.feed import RowFeed
from lvspec.replay import Replay
from lvspec.state import DecodeState, Status, catch_ups
from lvspec.stats import RowStats

EXACT = "lvspec_exact"  # a row carrying EXACT=True is verified strictly in any mode: exact greedy output (audits)
REPLAY_KEY = "lvspec_replay_key"  # a row's int that picks its replayed record and length (default: its index)
IDLE_TICK_S = 10.0  # tensor parallelism: an idle rank 0 tells its peers so this often


@dataclass
class RowOutput:
    tokens: list[int]
    text: str | None
    stats: RowStats
    finished_by: str  # "stop" or "length"
    trace: list[dict] = field(default_factory=list)  # per verified slot, with trace=True
    accepted_per_cycle: list[int] = field(default_factory=list)  # drafts kept per cycle, with trace=True


class Clock:
    """Marks on the device's timeline (CUDA events) or the host's (CPU runs synchronously)."""

    def __init__(self, cuda: bool):
        self.cuda, self.marks = cuda, []

    def mark(self) -> int:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        return len(self.marks) - 1

    def seconds(self, a: int, b: int) -> float:
        if self.cuda:
            return self.marks[a].elapsed_time(self.marks[b]) / 1e3
        return self.marks[b] - self.marks[a]


@dataclass
class _Pending:
    """A group of rows being prefilled into `slots`: what `Stream._launch` queued, for `_land`."""

    group: list[tuple[int, dict]]
    slots: list[int]
    index: torch.Tensor  # the slots on the device (made on the decoding stream, before the prefill's)
    prompt: Prompt | None = None
    draft_prompt: Prompt | None = None
    first: torch.Tensor | None = None
    keys: list[int] = field(default_factory=list)
    budget: torch.Tensor | None = None
    exact: torch.Tensor | None = None
    done: torch.cuda.Event | None = None  # recorded after the prompt forwards (CUDA)


class Stream:
    """One stream of rows through an engine's slots: `slots` of them, or (None) as many as the
    engine's memory plan gives, at most `cap`."""

    def __init__(self, engine, rows: Iterable[dict] | None, slots: int | None, cap: int | None, tokenizer,
                 trace: bool, replay: Replay | None, static: bool = False):
        self.engine, self.slots, self.cap = engine, slots, cap
        self.tokenizer, self.trace, self.replay, self.static = tokenizer, trace, replay, static
        self.feed = rows if isinstance(rows, RowFeed) else None  # rows from other threads, keyed by the feed
        # Rows from an iterable; None: a peer rank's stream (rank 0 reads and shares, see _read).
        self.rows = iter(enumerate(rows)) if self.feed is None and rows is not None else None
        self.waiting: list[tuple[int, dict]] = []
        self.exhausted = self.draining = False
        self.st: DecodeState | None = None
        self.slot_row: list[int | None] = []
        self.traces: dict[int, list[dict]] = {}
        self.kept: dict[int, list[int]] = {}
        self.status: Status | None = None
        self.cuda = engine.device.type == "cuda"
        self.clock, self.marks, self.ks = Clock(self.cuda), [], []
        self.start, self.prefill_s, self.prefills, self.placed, self.peak = time.perf_counter(), 0.0, 0, 0, 0
        self.pending: list[_Pending] = []  # groups being prefilled, not placed yet, in launch order
        self.overlapped = self.ingests = self.busy = 0  # prefills run beside decoding; draft catch-ups; rows x cycles
        self.verified = 0  # tokens the verify forwards ran (packed: the decoding rows' own K + 1, rounded up)
        # The steady part of a stream, until a free slot first finds no row (from then on slots only
        # empty): decoded tokens of the rows finished so far; (seconds, prefill s, decoded tokens, cycles,
        # rows x cycles) then.
        self.decoded, self.dry = 0, None

    def _free(self) -> list[int]:
        if self.st is None:  # before the first state: as many rows as it may get slots
            return list(range(self.slots or self.cap))
        taken = {s for p in self.pending for s in p.slots}
        return [s for s, row in enumerate(self.slot_row) if row is None and s not in taken]

    def _take(self, n: int, in_flight: bool) -> list[tuple[int, dict]]:
        group, self.waiting = self.waiting[:n], self.waiting[n:]
        if len(group) < n and not self.exhausted:
            more, self.exhausted = self._read(n - len(group), wait=not in_flight and not group)
            e = self.engine
            check_video_rows(e.target, [row for _, row in more])
            stride = e.cfg.draft_frame_stride if e.draft is not None else 1  # the draft's own video, once a row
            group += [(i, with_draft_video(e.adapter, e.draft, row, stride)) for i, row in more]
        return group

    def _read(self, n: int, wait: bool) -> tuple[list[tuple[int, dict]], bool]:
        """Up to n new rows, and whether the source is exhausted. A feed (rows from other threads)
        is waited on only with `wait` (nothing to decode). Under tensor parallelism rank 0 reads
        and every rank gets what it read; rank 0 then waits in ticks, so that idle peers hear
        from it (empty reads) within their collectives' timeout."""
        tp = self.engine.tp
        if tp is not None and not tp.leader:
            return tp.share()
        if self.feed is not None:
            more = self.feed.take(n, wait=wait, timeout=IDLE_TICK_S if tp is not None else None)
            read = ([], True) if more is None else (more, False)
        else:
            more = list(itertools.islice(self.rows, n))
            read = (more, len(more) < n)
        return tp.share(read) if tp is not None else read

    def _begin(self, st: DecodeState) -> None:
        """A (new or reused) state starts this stream: every slot free, counts from zero."""
        self.st = st
        st.reset()
        self.slot_row = [None] * st.slots
        if self.replay is not None:
            self.replay.start(st.slots, self.engine.device)

    def _bounded(self, group: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
        """The group's leading rows that one prefill takes: at most prefill_tokens prompt tokens
        (left-padded to the widest), at least one row."""
        width, n = 0, 0
        for _, row in group:
            width = max(width, row["input_ids"].shape[-1])
            if n and (n + 1) * width > self.engine.cfg.prefill_tokens:
                break
            n += 1
        return group[:n]

    def _refill(self) -> None:
        """Place rows in free slots (see the module's docstring)."""
        e = self.engine
        self._land(wait=False)
        in_flight = any(row is not None for row in self.slot_row) or bool(self.pending)
        one_at_a_time = e.prompt_graphs != "off"
        if (self.pending and one_at_a_time) or ((self.draining or self.static) and in_flight):
            return
        self.draining = False
        beside = e.overlap and in_flight
        t0 = time.perf_counter()
        while free := self._free():
            group = self._take(len(free), in_flight)
            if not group:
                break
            width = max(row["input_ids"].shape[-1] for _, row in group)  # the group's prompts are left-padded to it
            draft_width = max(draft_row(row)["input_ids"].shape[-1] for _, row in group)
            if self.st is None or not e.fits(self.st, self.slots, self.cap, width, draft_width):
                if in_flight:  # a longer prompt: finish the rows in flight, then grow the state
                    self.waiting, self.draining = group + self.waiting, True
                    break
                self.st = None  # its memory is free for the new state
                self._begin(e.state_for(self.slots, self.cap, width, draft_width))
                free = self._free()
            placed = self._bounded(group[:len(free)])
            self.waiting = group[len(placed):] + self.waiting
            slots = free[:len(placed)]
            p = _Pending(placed, slots, torch.tensor(slots, device=e.device))
            self.pending.append(p)
            if beside:
                e.cycle.reserve(self.st, p.index)
                if e.prefill_stream is not None:
                    e.prefill_stream.wait_stream(torch.cuda.current_stream(e.device))  # after the reservation
                with e.on(e.prefill_stream):
                    self._launch(p)
                self.overlapped += 1
                if one_at_a_time:
                    break
                continue
            self._launch(p)
            self._land(wait=True)
            in_flight = True
        self.prefill_s += time.perf_counter() - t0

    def _launch(self, p: _Pending) -> None:
        """Queue a group's prompt forwards on the current stream."""
        e = self.engine
        # Every copy from the host first (each waits for what its stream has queued), then the models.
        rows = rows_on([row for _, row in p.group], e.device, e.target.dtype)
        p.keys = [row.get(REPLAY_KEY, i) for i, row in p.group]  # what each row replays
        budget = self.replay.lengths_of(p.keys) if self.replay is not None else None
        p.budget = budget.to(e.device) if budget is not None else None
        p.exact = torch.tensor([bool(row.get(EXACT, False)) for row in rows], device=e.device)
        st = self.st
        # e.prompt_graphs may be switched "off" between calls (benchmarks: the same state, eager prompts).
        p.prompt, p.draft_prompt, p.first = st.prompts.run(lambda r, i: e.prompt_group(st, r, i), rows, p.index,
                                                           enabled=e.prompt_graphs != "off")
        if self.cuda:
            p.done = torch.cuda.Event()
            p.done.record()

    def _land(self, wait: bool) -> None:
        """Place the pending groups' rows (their slots' state, on the decoding stream), in launch
        order, those whose prefill is done, or with `wait`, all once they are."""
        e, landed = self.engine, False
        while self.pending:
            p = self.pending[0]
            if not (wait or p.done is None or p.done.query()):
                break
            if p.done is not None:
                torch.cuda.current_stream(e.device).wait_event(p.done)
            e.cycle.place(self.st, p.first, p.prompt, p.draft_prompt, p.index, p.budget, p.exact)
            if self.replay is not None:
                self.replay.assign(p.index, p.keys)
            for slot, (i, _) in zip(p.slots, p.group):
                self.slot_row[slot] = i
                self.traces[i], self.kept[i] = [], []
            self.pending.pop(0)
            self.prefills += 1
            self.placed += len(p.group)
            landed = True
        if landed:  # the host read waits for this stream: past it, nothing reads the groups' tensors any more
            self.status = self.st.read()

    def _finished(self) -> list[tuple[int, RowOutput]]:
        """Rows whose slot went idle (at its prefill or in the last cycle); their slots free up."""
        if self.status is None:
            return []
        flags = self.status.slots
        self.peak = max(self.peak, sum(flags))
        slots = [s for s, row in enumerate(self.slot_row) if row is not None and not flags[s]]
        out = []
        for slot, result in zip(slots, self._outputs(slots)):
            self.decoded += max(len(result.tokens) - 1, 0)  # the first token is the prefill's
            i = self.slot_row[slot]
            result.trace, result.accepted_per_cycle = self.traces.pop(i), self.kept.pop(i)
            out.append((i, result))
            self.slot_row[slot] = None
        return out

    def _outputs(self, slots: list[int]) -> list[RowOutput]:
        """RowOutputs of finished rows in `slots` (traces are filled in by `_finished`)."""
        if not slots:
            return []
        st = self.st
        index = torch.tensor(slots, device=self.engine.device)
        lengths, stopped = st.length[index].tolist(), st.stopped[index].tolist()
        tokens, counts = st.tokens[index].tolist(), st.count[:, index].T.tolist()
        out = []
        for i in range(len(slots)):
            ids = tokens[i][: lengths[i]]
            text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else None
            out.append(RowOutput(ids, text, RowStats.of(counts[i]), "stop" if stopped[i] else "length"))
        return out

    def step(self) -> list[tuple[int, RowOutput]] | None:
        """Refill, run one cycle, return the rows that finished (None: every row is done)."""
        self._refill()
        if self.st is None:  # no rows yet: none at all, or none so far from a feed
            return None if self.exhausted and not self.waiting else []
        if self.dry is None and self.exhausted and not self.waiting and not self.pending:
            self._mark_dry()
        finished = self._finished()
        if finished:
            return finished
        if not self.status.decoding:  # nothing decoding: a prefill to land, more rows to place, or done
            if self.pending:
                self._land(wait=True)
                return []
            return None if self.exhausted and not self.waiting else []
        st, cycle, k, lag = self.st, self.engine.cycle, self.status.k, self.status.lag
        self.ks.append(k)
        self.busy += sum(self.status.slots)
        a = self.clock.mark()
        for _ in range(catch_ups(k, lag, lazy=cycle.batch_k) if st.D is not None else 0):  # the draft catches up first
            st.stages.run(("ingest",), lambda: cycle.ingest(st))
            self.ingests += 1
        if k:
            st.stages.run(("draft", k), lambda: cycle.draft(st, k))
        b = self.clock.mark()
        width = packed_width(self.status.tokens, st.slots * (k + 1)) if self.engine.cfg.pack_verify else None
        self.verified += width or st.slots * (k + 1)
        st.stages.run(("verify", k, width), lambda: cycle.verify(st, k, width))
        self.marks.append((a, b, self.clock.mark(), k))
        if self.replay is not None and k:
            cycle.replay(st, k, self.replay)
        if self.trace:
            _record(self.traces, self.kept, st, k, self.slot_row, sorted(cycle.heads), set(cycle.stop.tolist()))
        st.stages.run(("commit", k), lambda: cycle.commit(st, k))
        self.status = st.read()  # the cycle's one host read
        return self._finished()

    def _mark_dry(self) -> None:
        """The rows have run out (every one placed, and a read found no more): what the stream
        decoded until now is its steady state (a bulk job's slots never run dry; a finite stream's
        end is only its drain). One host read."""
        held = [s for s, row in enumerate(self.slot_row) if row is not None]
        lengths = self.st.length[torch.tensor(held, device=self.engine.device)].tolist() if held else []
        tokens = self.decoded + sum(max(n - 1, 0) for n in lengths)
        self.dry = (time.perf_counter() - self.start, self.prefill_s, tokens, len(self.ks), self.busy)

    def timing(self) -> dict:
        """What this stream did, and how long it took (waits for the device)."""
        if self.cuda:
            torch.cuda.synchronize()
        total = time.perf_counter() - self.start
        e, clock, marks = self.engine, self.clock, self.marks
        return {
            "prefill_s": self.prefill_s, "decode_s": total - self.prefill_s, "cycles": len(self.ks), "k": self.ks,
            "draft_s": sum(clock.seconds(a, b) for a, b, _, _ in marks), "draft_steps": sum(k for *_, k in marks),
            "verify_s": sum(clock.seconds(b, c) for _, b, c, _ in marks), "verifies": len(marks),
            "verify_tokens": self.verified,
            "ingests": self.ingests, "prefills": self.prefills, "overlapped_prefills": self.overlapped,
            "rows": self.placed, "peak_active": self.peak, "slots": self.st.slots if self.st is not None else None,
            "slot_use": self.busy / (len(self.ks) * self.st.slots) if self.ks else 0.0,  # decoding rows per cycle over slots
            "prompt_graphs": self.st.prompts.summary() if self.st is not None else None,
            "costs": e.costs.as_dict() if e.costs is not None else None,
            "attention": {"target": dict(e.T.attention), "draft": dict(e.D.attention) if e.D else None},
            **self._steady()}

    def _steady(self) -> dict:
        """Decoding until the rows ran out (None where no cycle ran before it)."""
        if self.dry is None or not self.dry[3]:
            return {"steady_s": None, "steady_tokens": None, "steady_cycles": None, "steady_slot_use": None}
        seconds, prefill_s, tokens, cycles, busy = self.dry
        return {"steady_s": seconds - prefill_s, "steady_tokens": tokens, "steady_cycles": cycles,
                "steady_slot_use": busy / (cycles * self.st.slots)}


def _record(traces, kept, st: DecodeState, k: int, slot_row: list[int | None], layers: list[int], stop: set[int]) -> None:
    """Keep, per walked slot that the caption keeps (up to and including the first rejection, a stop
    token or the length budget: the walk goes on past them, the commit cuts there), relevance and
    tokens; and per cycle, how many drafts each row kept. `slot_row`: the row each batch slot holds."""
    active, n, limit = st.active.tolist(), st.accepted.tolist(), st.limit.tolist()
    room = (st.budget - st.length).tolist()
    next_token = st.next_token.tolist()
    kind = st.kind[:, :k].tolist()
    target, drafted = st.target_tokens[:, :k].tolist(), st.drafted[:, :k].tolist()
    probed = st.relevance_by_head.shape[1] > 0
    rel = st.relevance[:, :k].tolist() if probed else None
    by_head = st.relevance_by_head[:, :, :k].transpose(1, 2).tolist() if probed else None
    heads = st.relevance_by_head.shape[1] // max(len(layers), 1)
    names = [(i, h) for i in layers for h in range(heads)] if probed else []
    for slot, row in enumerate(slot_row):
        if row is None or not active[slot]:
            continue
        kept[row].append(n[slot])
        for j in range(min(n[slot] + 1, limit[slot], room[slot])):
            traces[row].append({
                "relevance": rel[slot][j] if probed else None,
                "relevance_by_head": dict(zip(names, by_head[slot][j])) if probed else {},
                "target_token": target[slot][j], "draft_token": drafted[slot][j], "accepted": j < n[slot],
                "kind": ("exact", "loose", "shift")[kind[slot][j]],
            })
            if (drafted[slot][j] if j < n[slot] else next_token[slot]) in stop:
                break
