"""Batched greedy decoding of video prompts: `ar`, exact speculative `sd`, and `lvspec`.

    repeat: place new rows in free slots (prefill both models: HF modules, eager)
            draft K tokens -> the target verifies K+1 in one forward -> commit the kept run plus
            one target token and roll both caches back -> one small read: which rows are done?

The decode state lives in fixed batch slots and fixed-capacity caches, set up once per
(slots, capacity) and reused call after call; masks and positions are built on the device from
per-slot lengths; a finished row's slot idles until the next row takes it (`Engine.stream`).
Each stage of a cycle (draft loop, verify, commit) reads and writes only that state, so on a GPU
it is captured as a CUDA graph per K when the state is built and replayed after
(`graphs.Stages`); on CPU the same functions simply run. K is fixed, or chosen per cycle from
measured stage costs and the running acceptance (`draft_length`). A row carrying
`EXACT: True` is verified strictly whatever the mode (an audit's exact twin). A target sharded
over ranks (`parallel`) runs the same loop on every rank: rank 0 reads the rows, the others
`follow`.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lvspec.adapter import Prompt, check_pair, check_video_rows, rows_on, shared_vocab, text_config
from lvspec.config import SpecConfig
from lvspec.decoder import ATTENTION, TextDecoder
from lvspec.draft_length import Costs, DraftLength
from lvspec.families import adapter_for
from lvspec.feed import RowFeed
from lvspec.graphs import PromptGraphs, Stages
from lvspec.relevance import RelevanceProbe, relevance_heads, relevance_weights
from lvspec.replay import Replay
from lvspec.stats import COUNTERS, KINDS, RowStats
from lvspec.verify import BONUS, Verdict, verify

EXACT = "lvspec_exact"  # a row carrying EXACT=True is verified strictly in any mode: exact greedy output (audits)
REPLAY_KEY = "lvspec_replay_key"  # a row's int that picks its replayed record and length (default: its index)
IDLE_TICK_S = 10.0  # tensor parallelism: an idle rank 0 tells its peers so this often
C = {name: i for i, name in enumerate(COUNTERS)}


@dataclass
class RowOutput:
    tokens: list[int]
    text: str | None
    stats: RowStats
    finished_by: str  # "stop" or "length"
    trace: list[dict] = field(default_factory=list)  # per verified slot, with trace=True
    accepted_per_cycle: list[int] = field(default_factory=list)  # drafts kept per cycle, with trace=True


# cuDNN's attention rebuilds its execution plan whenever the key length changes (every prefill
# shape, and every step of a growing cache): measured 1.25 ms of CPU per layer call on an H200.
_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class _State:
    """Everything a batch's decoding reads and writes, allocated once per (slots, capacity)."""

    def __init__(self, engine: Engine, slots: int, capacity: int):
        cfg, dev = engine.cfg, engine.device
        self.slots, self.capacity = slots, capacity
        self.T = engine.T.new_cache(slots, capacity)
        self.D = engine.D.new_cache(slots, capacity) if engine.D is not None else None
        k = engine.k_max
        long = dict(dtype=torch.long, device=dev)
        self.video = torch.zeros(slots, capacity, dtype=torch.bool, device=dev)  # target slots holding video
        self.exact_only = torch.zeros(slots, dtype=torch.bool, device=dev)  # rows verified strictly (audit twins)
        self.last = torch.zeros(slots, **long)  # newest emitted token: not in the target's cache yet
        self.prev = torch.zeros(slots, **long)  # the one before: the draft re-reads [prev, last]
        self.active = torch.zeros(slots, dtype=torch.bool, device=dev)
        self.stopped = torch.zeros(slots, dtype=torch.bool, device=dev)
        self.tokens = torch.zeros(slots, cfg.max_new_tokens + k + 1, **long)  # emitted, + room for a cycle
        self.length = torch.zeros(slots, **long)  # emitted tokens
        self.budget = torch.full((slots,), cfg.max_new_tokens, **long)  # tokens a row may emit (replay: its length)
        self.count = torch.zeros(len(COUNTERS), slots, **long)
        self.drafted = torch.zeros(slots, max(k, 1), **long)
        # The verdict of the latest verify forward.
        self.accepted = torch.zeros(slots, **long)
        self.next_token = torch.zeros(slots, **long)
        self.kind = torch.zeros(slots, max(k, 1), **long)
        self.target_tokens = torch.zeros(slots, k + 1, **long)
        self.anchor_rejected = torch.zeros(slots, dtype=torch.bool, device=dev)
        self.relevance = torch.zeros(slots, k + 1, device=dev)
        probed_heads = len(engine.heads) * text_config(engine.target).num_attention_heads if engine.probing else 0
        self.relevance_by_head = torch.zeros(slots, probed_heads, k + 1, device=dev)
        # What the host reads once per cycle: [any row active, largest remaining budget,
        # cycles that reached draft slot j (k_max), cycles that kept it (k_max), each slot's active flag].
        self.status = torch.zeros(2 + 2 * k + slots, **long)
        self.reached, self.kept = self.status[2:2 + k], self.status[2 + k:2 + 2 * k]
        self.slot_active = self.status[2 + 2 * k:]
        self.stages = Stages(engine.graphs, _snapshot(self.small()))
        self.prompts = PromptGraphs(engine.prompt_graphs)  # they write into this state's caches
        self.costs: Costs | None = None

    def small(self) -> list[torch.Tensor]:
        caches = [c for c in (self.T, self.D) if c is not None]
        return [t for c in caches for t in (c.length, c.pad, c.offset)] + [
            self.last, self.prev, self.active, self.stopped, self.tokens, self.length, self.budget, self.count,
            self.drafted,
            self.accepted, self.next_token, self.kind, self.target_tokens, self.anchor_rejected, self.relevance,
            self.relevance_by_head, self.status, self.exact_only]

    def reset(self) -> None:
        for t in self.small():
            t.zero_()


def _snapshot(tensors: list[torch.Tensor]):
    """A function that saves `tensors` and returns the function restoring them (no reference back
    to the state, so a dropped state frees its caches at once)."""
    def save():
        saved = [(t, t.clone()) for t in tensors]
        return lambda: [t.copy_(s) for t, s in saved]
    return save


class _Clock:
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


class Engine:
    """A target (and draft) ready to decode batches of prepared video prompts with `cfg.mode`.

    Holds the decode state between calls, so that calls of one shape reuse its caches and captured
    graphs. `slots` fixes how many rows decode at once (more rows stream through the slots, fewer
    leave slots idle); None sizes the state to each `generate` call. Note: the models' q/k/v and
    gate/up weights are packed into one tensor each, the modules keeping views (same values, no
    extra memory).
    """

    def __init__(self, target, draft, cfg: SpecConfig = SpecConfig(), slots: int | None = None):
        self.adapter = adapter_for(target)
        if cfg.mode != "ar":
            if draft is None:
                raise ValueError(f"mode {cfg.mode!r} needs a draft model")
            check_pair(target, draft)
        tc = text_config(target)
        self.heads = relevance_heads(cfg, tc.num_hidden_layers, tc.num_attention_heads, target.device)
        self.head_weights = relevance_weights(cfg, target.device)
        self.cfg, self.target, self.draft = cfg, target, draft if cfg.mode != "ar" else None
        self.device = target.device
        vocab = shared_vocab(target, draft) if self.draft is not None else tc.vocab_size
        self.T = TextDecoder(target, vocab)
        self.D = TextDecoder(draft, vocab) if self.draft is not None else None
        self.tp = self.T.tp  # the target sharded over ranks (parallel.py); the draft is whole on each
        if self.D is not None and self.D.tp is not None:
            raise ValueError("the draft must be whole on every rank: load it without tensor parallelism")
        self.k_max = cfg.longest_draft if self.draft is not None else 0
        self.probing = cfg.loosened and cfg.gate
        self.graphs = cfg.cuda_graphs and self.device.type == "cuda"
        self.stop = _stop_ids(target, cfg)
        self.slots = slots
        # Prefill beside decoding (continuous batching): decoding on a high-priority stream, prompts
        # on a low-priority one. CPU: the same steps, run in order.
        self.overlap = cfg.overlap_prefill and self.tp is None
        cuda = self.device.type == "cuda"
        self._decode_stream = torch.cuda.Stream(self.device, priority=-1) if cuda else None
        self._prefill_stream = torch.cuda.Stream(self.device, priority=0) if cuda else None
        capturable = cfg.prompt_graphs and self.tp is None and getattr(self.adapter, "capturable", False)
        self.prompt_graphs = ("cuda" if self.graphs else "static") if capturable else "off"
        if cfg.compile_prefill:
            self.compile_prefill()
        self._state: _State | None = None
        # Acceptance counts of earlier calls (cycles that reached / kept each draft slot), halved at
        # every call: a new batch starts from what this pair accepted lately, not from nothing.
        self._history = ([0.0] * self.k_max, [0.0] * self.k_max)
        self.timing: dict = {}  # of the latest call: prefill and decode seconds, stage costs, K per cycle
        self.attention_timings: dict = {}  # (model, forward size) -> seconds per attention path, when tuned

    # ---- the API ---------------------------------------------------------------------------------
    def compile_prefill(self) -> None:
        """Compile what a prefill runs through HF's modules, in place (torch.compile, inductor): both
        models' vision encoders, and in their language models every part of a layer but its attention
        (the norms and MLPs, where eager HF launches one kernel per elementwise op): attention writes
        the caches, which a compiled graph would copy whole. Decoding runs `TextDecoder`'s own graphs,
        not these. Each module once (engines over the same models share them); compiles on first use."""
        for model in (self.target, self.draft):
            if model is None:
                continue
            lm = model.model.language_model
            sharded = model is self.target and self.tp is not None  # its MLPs all-reduce: left eager (unmeasured)
            parts = [] if sharded else [lm.norm] + [m for layer in lm.layers
                                                    for name, m in layer.named_children() if name != "self_attn"]
            for module in [self.adapter.vision(model), *parts]:
                if getattr(module, "_compiled_call_impl", None) is None:
                    module.compile()

    def generate(self, rows: list[dict], tokenizer=None, trace: bool = False,
                 replay: Replay | None = None, static: bool = False) -> list[RowOutput]:
        """Caption prepared video prompts (one processor output per row); outputs in row order.

        With `tokenizer`, outputs carry decoded text; with `trace`, every verified slot's relevance
        and tokens, and the drafts kept per cycle. With `replay` (speed measurement of
        random-weight models), each cycle keeps the recorded number of drafts instead. More rows
        than slots stream through them (see `stream`).
        """
        out: list[RowOutput | None] = [None] * len(rows)
        for i, result in self.stream(rows, tokenizer, trace, replay, static):
            out[i] = result
        return out

    def stream(self, rows: Iterable[dict], tokenizer=None, trace: bool = False,
               replay: Replay | None = None, static: bool = False) -> Iterator[tuple[int, RowOutput]]:
        """Continuous batching: each slot takes the next row the moment its row finishes (rows are
        prefilled into free slots between cycles). Yields (index among `rows`, output) as rows
        finish. Rows are read from `rows` only when a slot is free for them; `rows` may be a
        `RowFeed` that other threads keep filling (its keys replace the indices). With `static`,
        new rows enter only once every slot is free (static batches: what continuous batching is
        measured against)."""
        if self.tp is not None and not self.tp.leader:
            raise RuntimeError(f"rank {self.tp.rank} of a tensor-parallel target decodes through follow(); "
                               "rows go to rank 0")
        slots = self.slots or (len(rows) if hasattr(rows, "__len__") else None)
        if not slots:
            if slots is None:
                raise ValueError("streaming rows of unknown count needs Engine(..., slots=N)")
            return
        if self.tp is not None:  # the peers start the same stream; its rows reach them as rank 0 reads them
            self.tp.share({"slots": slots, "trace": trace, "replay": replay, "static": static})
        yield from self._run(_Stream(self, rows, slots, tokenizer, trace, replay, static))

    def follow(self) -> None:
        """A peer rank of a tensor-parallel target: decode every stream rank 0 runs, in step with it,
        until rank 0 calls `close`. A stream that fails fails on every rank alike (same rows, same
        state); the peer then waits for the next one, as rank 0 goes on."""
        if self.tp is None or self.tp.leader:
            raise RuntimeError("follow() is for ranks other than 0 of a tensor-parallel target")
        while (call := self.tp.share()) is not None:
            try:
                for _ in self._run(_Stream(self, None, call["slots"], None, call["trace"], call["replay"],
                                           call["static"])):
                    pass
            except Exception as e:  # noqa: BLE001 - rank 0 sees the same error and reports it
                print(f"lvspec rank {self.tp.rank}: stream failed as on rank 0: {type(e).__name__}: {e}", flush=True)

    def close(self) -> None:
        """Rank 0 of a tensor-parallel target: let the peers' `follow` return."""
        if self.tp is not None and self.tp.leader:
            self.tp.share(None)

    def _on(self, stream) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _run(self, run: _Stream) -> Iterator[tuple[int, RowOutput]]:
        if self._decode_stream is not None:  # what the caller queued (e.g. weights) comes first
            self._decode_stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            while True:
                with torch.inference_mode(), sdpa_kernel(_ATTENTION_BACKENDS), self._on(self._decode_stream):
                    finished = run.step()
                if finished is None:
                    break
                yield from finished
        finally:
            run.close()

    def _seen(self, status: list[int]) -> tuple[list[float], list[float]]:
        """Cycles that reached / kept each draft slot: this call's counts plus the decayed history."""
        k = self.k_max
        return ([h + c for h, c in zip(self._history[0], status[2:2 + k])],
                [h + c for h, c in zip(self._history[1], status[2 + k:2 + 2 * k])])

    # ---- state ----------------------------------------------------------------------------------
    def _fits(self, st: _State | None, slots: int, width: int) -> bool:
        return st is not None and st.slots == slots and st.capacity >= width + self.cfg.max_new_tokens + self.k_max + 2

    def _state_for(self, slots: int, width: int) -> _State:
        need = width + self.cfg.max_new_tokens + self.k_max + 2
        st = self._state
        if not self._fits(st, slots, width):
            self._state = st = None  # free the old caches before allocating new ones
            capacity = -(-need // 128) * 128  # similar prompt lengths share a state (and its graphs)
            st = self._state = _State(self, slots, capacity)
            if self.graphs:
                self._tune_attention(st)
            self._capture_all(st)
        return st

    def _tune_attention(self, st: _State) -> None:
        """Per decoder and forward size, keep the attention path that runs fastest on this state's
        shapes (one captured forward each; the fresh state is reset before any prefill)."""
        jobs = [("target", self.T, st.T, "step", 1)]
        if self.D is not None:
            jobs += [("target", self.T, st.T, "verify", self.k_max + 1), ("draft", self.D, st.D, "step", 2)]
        for name, decoder, cache, size, q in jobs:
            tokens = torch.zeros(st.slots, q, dtype=torch.long, device=self.device)
            timed = {}
            for mode in ATTENTION:
                decoder.attention[size] = mode
                try:
                    timed[mode] = Stages.seconds(lambda: decoder.forward(cache, tokens))
                except RuntimeError:  # a path this device or build cannot run: never chosen
                    timed[mode] = float("inf")
            decoder.attention[size] = min(timed, key=timed.get)
            self.attention_timings[(name, size)] = timed
        if self.tp is not None:  # one choice for all ranks (timings differ a little between GPUs)
            chosen = self.tp.share({"T": dict(self.T.attention), "D": dict(self.D.attention) if self.D else None})
            self.T.attention.update(chosen["T"])
            if self.D is not None:
                self.D.attention.update(chosen["D"])

    def _capture_all(self, st: _State) -> None:
        """Capture every stage a cycle may run (each K up to k_max: the budget and k=auto choose
        any), so that no batch stalls mid-decode on a capture."""
        for k in range(1, self.k_max + 1) if self.k_max else [0]:
            if k:
                st.stages.capture(("draft", k), lambda: self._draft(st, k))
            st.stages.capture(("verify", k), lambda: self._verify(st, k))
            st.stages.capture(("commit", k), lambda: self._commit(st, k))

    def _chooser(self, st: _State) -> DraftLength | None:
        if self.D is None or self.cfg.k != "auto":
            return None
        if st.costs is None:
            st.costs = self._measure_costs(st)
        return DraftLength(self.k_max, st.costs)

    def _measure_costs(self, st: _State) -> Costs:
        """Time the draft loop at K = 1 and k_max and the verify forward at both, on the fresh state
        (before any prefill: whatever these runs write is reset). Medians of three."""
        cuda = self.device.type == "cuda"

        def seconds(key, stage) -> float:
            st.stages.run(key, stage)  # capture (or warm up)
            runs = []
            for _ in range(3):
                clock = _Clock(cuda)
                a = clock.mark()
                st.stages.run(key, stage)
                b = clock.mark()
                if cuda:
                    torch.cuda.synchronize()
                runs.append(clock.seconds(a, b))
            return statistics.median(runs)

        km = self.k_max
        d1 = seconds(("draft", 1), lambda: self._draft(st, 1))
        dm = seconds(("draft", km), lambda: self._draft(st, km)) if km > 1 else d1
        v1 = seconds(("verify", 1), lambda: self._verify(st, 1))
        vm = seconds(("verify", km), lambda: self._verify(st, km)) if km > 1 else v1
        step = (dm - d1) / (km - 1) if km > 1 else d1
        costs = Costs(draft_step=max(step, 1e-9), verify_1=v1, verify_max=vm)
        return self.tp.share(costs) if self.tp is not None else costs  # every rank chooses the same K

    # ---- prefill (eager, HF modules) ----------------------------------------------------------
    def _prefill(self, st: _State, prompt: Prompt, draft_prompt: Prompt | None, slots: torch.Tensor,
                 budget: torch.Tensor | None = None, exact_only: torch.Tensor | None = None) -> None:
        """Place new rows in free `slots`: their prompts' keys into both caches, their first token.
        `budget`: tokens each may emit (default max_new_tokens); `exact_only`: rows to verify strictly."""
        self._place(st, self._prompt_keys(st, prompt, draft_prompt, slots), prompt, draft_prompt, slots, budget,
                    exact_only)

    def _prompt_keys(self, st: _State, prompt: Prompt, draft_prompt: Prompt | None, slots: torch.Tensor):
        """The heavy half of a prefill: both models' prompt forwards, keys into the caches' `slots`
        (nothing else of the state: it may run beside a decoding cycle, on another stream, when the
        slots are `_reserve`d). The target's first tokens [B]."""
        if self.tp is not None:  # rank 0's video features on every rank: one prompt, one verdict
            self.tp.broadcast(prompt.embeds)
        first = self._prompt_forward(self.target, self.T, st.T, prompt, slots).argmax(-1)
        if self.D is not None:
            self._prompt_forward(self.draft, self.D, st.D, draft_prompt, slots)
        return first

    def _prompt_group(self, st: _State, rows: list[dict], slots: torch.Tensor):
        """Both models' prompts of a group (rows on the device) through `_prompt_keys`: what
        `PromptGraphs` captures. (target prompt, draft prompt, first tokens)."""
        prompt = self.adapter.prompt(self.target, rows)
        draft_prompt = self.adapter.prompt(self.draft, rows) if self.draft is not None else None
        return prompt, draft_prompt, self._prompt_keys(st, prompt, draft_prompt, slots)

    def _reserve(self, st: _State, slots: torch.Tensor) -> None:
        """Idle `slots` about to be prefilled beside decoding: cycles write every slot's keys at its
        length, so park these at the caches' tails, past any prompt (capacity holds prompt +
        max_new_tokens + k_max + 2)."""
        for cache in (st.T, st.D):
            if cache is not None:
                cache.length[slots] = st.capacity - self.k_max - 2

    def _place(self, st: _State, first: torch.Tensor, prompt: Prompt, draft_prompt: Prompt | None,
               slots: torch.Tensor, budget: torch.Tensor | None, exact_only: torch.Tensor | None) -> None:
        """The light half: the slots' state (cache lengths, first token, budget, flags) after `_prompt_keys`."""
        width = prompt.embeds.shape[1]
        for cache, p in ((st.T, prompt), (st.D, draft_prompt)):
            if cache is not None:
                cache.length[slots] = p.embeds.shape[1]
                cache.pad[slots] = p.pad
                cache.offset[slots] = p.next_position - p.embeds.shape[1]  # position id of slot s >= width: s + offset
        st.video[slots] = False
        st.video[slots, :width] = prompt.video_mask
        st.exact_only[slots] = False if exact_only is None else exact_only
        st.last[slots] = first
        st.tokens[slots, 0] = first
        st.length[slots] = 1
        st.count[:, slots] = 0
        for name in ("num_tokens", "bonus", "target_forwards"):
            st.count[C[name], slots] = 1
        stop = (first[:, None] == self.stop).any(-1)
        st.stopped[slots] = stop
        st.budget[slots] = self.cfg.max_new_tokens if budget is None else budget.clamp(1, self.cfg.max_new_tokens)
        st.active[slots] = ~stop & (st.budget[slots] > 1)
        if self.D is not None:
            # The draft re-reads the prompt's last token with the first generated one: every draft
            # loop then starts from two known tokens, one shape for all slots.
            st.D.length[slots] -= 1
            st.prev[slots] = draft_prompt.last_token
            st.count[C["draft_forwards"], slots] = 1
        self._publish(st)

    @staticmethod
    def _prompt_forward(model, decoder: TextDecoder, cache, prompt: Prompt, slots: torch.Tensor) -> torch.Tensor:
        """The prompts through the HF modules, their keys into the cache's `slots`; logits of their end [B, V]."""
        width = prompt.embeds.shape[1]
        view = cache.prefill_view(slots, prompt.pad, prompt.padded)
        hidden = model.model.language_model(
            inputs_embeds=prompt.embeds, attention_mask=view.mask(width), position_ids=prompt.position_ids,
            past_key_values=view, use_cache=True).last_hidden_state
        return F.linear(hidden[:, -1], decoder.head)

    # ---- the three stages of a cycle (fixed shapes, no host sync: captured as CUDA graphs) -------
    def _draft(self, st: _State, k: int) -> None:
        """k greedy draft tokens per slot into st.drafted[:, :k], after re-reading [prev, last]."""
        D = st.D
        token = self.D.forward(D, torch.stack([st.prev, st.last], 1), last_only=True)[:, -1].argmax(-1)
        D.length += 2
        st.drafted[:, 0] = token
        for j in range(1, k):
            token = self.D.forward(D, token[:, None])[:, -1].argmax(-1)
            D.length += 1
            st.drafted[:, j] = token
        D.length -= k + 1  # back to the cycle's start: commit moves it by what was kept
        if self.tp is not None:  # every rank verifies rank 0's drafts (the draft runs whole on each)
            self.tp.broadcast(st.drafted[:, :k])

    def _verify(self, st: _State, k: int) -> None:
        """The target's forward over [last, drafts] (keys written, not committed) and its verdict."""
        drafted = st.drafted[:, :k]
        probe = RelevanceProbe(self.heads, st.video, self.tp, self.head_weights) if self.probing and k else None
        logits = self.T.forward(st.T, torch.cat([st.last[:, None], drafted], 1), probe=probe)
        relevance = probe.result() if probe is not None else None
        v = verify(drafted, logits, relevance, self.cfg, st.exact_only)
        st.accepted.copy_(v.accepted)
        st.next_token.copy_(v.next_token)
        st.kind[:, :k].copy_(v.kind)
        st.target_tokens[:, :k + 1].copy_(v.target_tokens)
        st.anchor_rejected.copy_(v.anchor_rejected)
        if probe is not None:
            st.relevance[:, :k + 1].copy_(relevance)
            st.relevance_by_head[..., :k + 1].copy_(probe.all_heads())

    def _commit(self, st: _State, k: int) -> None:
        """Emit each active slot's kept drafts and target token (cut at a stop token or the budget),
        advance both caches by what was kept, count, and write the status the host reads."""
        n, active, budget = st.accepted, st.active, st.budget
        live = active.long()
        m = k + 1
        slot = torch.arange(m, device=n.device)
        drafted = st.drafted[:, :k]
        tokens = torch.cat([drafted, st.next_token[:, None]], 1).scatter(1, n[:, None], st.next_token[:, None])
        kinds = torch.cat([st.kind[:, :k], st.kind[:, :1]], 1).scatter(1, n[:, None], (BONUS - (n < k).long())[:, None])
        is_stop = (tokens[..., None] == self.stop).any(-1) & (slot <= n[:, None])
        has_stop = is_stop.any(1)
        upto = torch.where(has_stop, is_stop.long().argmax(1) + 1, n + 1)
        room = budget - st.length
        keep = torch.minimum(upto, room) * live
        kept = slot < keep[:, None]
        # All m tokens go in; those past `keep` are overwritten by the next cycle or never read.
        st.tokens.scatter_(1, st.length[:, None] + slot, tokens)
        codes = torch.arange(len(KINDS), device=n.device)
        st.count[C["accepted_exact"]:C["bonus"] + 1] += ((kinds[..., None] == codes) & kept[..., None]).sum(1).T
        st.length += keep
        st.count[C["num_tokens"]] += keep
        stopped = has_stop & (upto <= room) & active
        st.stopped |= stopped
        finished = (stopped | (st.length >= budget)) & active
        for name in ("num_cycles", "target_forwards"):
            st.count[C[name]] += live
        st.count[C["rejected_anchor"]] += st.anchor_rejected & active
        st.T.length += (n + 1) * live
        if st.D is not None:
            st.count[C["draft_forwards"]] += k * live
            st.count[C["drafted"]] += k * live
            st.D.length += (n + 1) * live
            before = drafted.gather(1, (n - 1).clamp(min=0)[:, None])[:, 0]
            st.prev.copy_(torch.where(n > 0, before, st.last))
            j = torch.arange(k, device=n.device)
            st.reached[:k] += ((n[:, None] >= j) & active[:, None]).sum(0)
            st.kept[:k] += ((n[:, None] > j) & active[:, None]).sum(0)
        st.last.copy_(st.next_token)
        st.active &= ~finished
        self._publish(st)

    def _publish(self, st: _State) -> None:
        """Write what the host reads: any row active, the largest remaining budget, the slots' flags."""
        st.status[0] = st.active.any()
        st.status[1] = (st.budget - st.length).masked_fill(~st.active, 0).max()
        st.slot_active.copy_(st.active)

    def _replay(self, st: _State, k: int, replay: Replay) -> None:
        v = Verdict(st.accepted, st.kind[:, :k], st.next_token, None, st.anchor_rejected, st.target_tokens[:, :k + 1])
        r = replay.apply(v, st.active, st.drafted[:, :k])
        st.accepted.copy_(r.accepted)
        st.kind[:, :k].copy_(r.kind)
        st.next_token.copy_(r.next_token)
        st.anchor_rejected.copy_(r.anchor_rejected)

    # ---- results --------------------------------------------------------------------------------
    def _outputs(self, st: _State, slots: list[int], tokenizer) -> list[RowOutput]:
        """RowOutputs of finished rows in `slots` (traces are filled in by the stream)."""
        index = torch.tensor(slots, device=self.device)
        lengths, stopped = st.length[index].tolist(), st.stopped[index].tolist()
        tokens, counts = st.tokens[index].tolist(), st.count[:, index].T.tolist()
        out = []
        for i in range(len(slots)):
            ids = tokens[i][: lengths[i]]
            stats = RowStats.of(counts[i])
            text = tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else None
            out.append(RowOutput(ids, text, stats, "stop" if stopped[i] else "length"))
        return out


@dataclass
class _Pending:
    """A group of rows being prefilled into `slots`: what `_Stream._launch` queued, for `_land`."""

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


class _Stream:
    """The host's side of one stream: which row each slot holds, rows read but not yet placed,
    traces, and the clock. `step` refills free slots, runs one cycle and returns the rows that
    finished (None when every row is done)."""

    def __init__(self, engine: Engine, rows: Iterable[dict], slots: int, tokenizer, trace: bool,
                 replay: Replay | None, static: bool = False):
        self.engine, self.slots, self.tokenizer, self.trace, self.replay = engine, slots, tokenizer, trace, replay
        self.static = static
        self.feed = rows if isinstance(rows, RowFeed) else None  # rows from other threads, keyed by the feed
        # Rows from an iterable; None: a peer rank's stream (rank 0 reads and shares, see _read).
        self.rows = iter(enumerate(rows)) if self.feed is None and rows is not None else None
        self.waiting: list[tuple[int, dict]] = []
        self.exhausted = self.draining = False
        self.st: _State | None = None
        self.chooser: DraftLength | None = None
        self.slot_row: list[int | None] = [None] * slots
        self.traces: dict[int, list[dict]] = {}
        self.kept: dict[int, list[int]] = {}
        self.status: list[int] = []
        self.cuda = engine.device.type == "cuda"
        self.clock, self.marks, self.ks = _Clock(self.cuda), [], []
        self.start, self.prefill_s, self.prefills, self.placed, self.peak = time.perf_counter(), 0.0, 0, 0, 0
        self.pending: _Pending | None = None  # a group being prefilled, not placed yet
        self.overlapped = 0  # prefills run beside decoding

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _take(self, n: int, in_flight: bool) -> list[tuple[int, dict]]:
        group, self.waiting = self.waiting[:n], self.waiting[n:]
        if len(group) < n and not self.exhausted:
            more, self.exhausted = self._read(n - len(group), wait=not in_flight and not group)
            group += more
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

    def _begin(self, st: _State) -> None:
        """A (new or reused) state starts this stream: every slot free, counts from zero."""
        e = self.engine
        self.st = st
        self.chooser = e._chooser(st)
        st.reset()
        self.slot_row = [None] * self.slots
        if self.replay is not None:
            self.replay.start(self.slots, e.device)

    def _refill(self) -> None:
        """Place rows in free slots: beside the rows in flight when the engine overlaps prefill
        (`_launch` on the prefill stream; `_land` places them at a later step, once done), else
        at once. One group of rows is prefilled at a time."""
        e = self.engine
        self._land(wait=False)
        in_flight = any(row is not None for row in self.slot_row)
        if self.pending is not None or ((self.draining or self.static) and in_flight):
            return
        self.draining = False
        free = [s for s, row in enumerate(self.slot_row) if row is None]
        group = self._take(len(free), in_flight) if free else []
        if not group:
            return
        t0 = time.perf_counter()
        width = max(row["input_ids"].shape[-1] for _, row in group)  # the group's prompts are left-padded to it
        if self.st is None or not e._fits(self.st, self.slots, width):
            if in_flight:  # a longer prompt: finish the rows in flight, then grow the state
                self.waiting, self.draining = group + self.waiting, True
                return
            self._begin(e._state_for(self.slots, width))
            free = list(range(self.slots))
        slots = free[:len(group)]
        self.pending = _Pending(group, slots, torch.tensor(slots, device=e.device))
        if e.overlap and in_flight:
            e._reserve(self.st, self.pending.index)
            if e._prefill_stream is not None:
                e._prefill_stream.wait_stream(torch.cuda.current_stream(e.device))  # after the reservation
            with e._on(e._prefill_stream):
                self._launch(self.pending)
            self.overlapped += 1
        else:
            self._launch(self.pending)
            self._land(wait=True)
        self.prefill_s += time.perf_counter() - t0

    def _launch(self, p: _Pending) -> None:
        """Queue a group's prompt forwards (`Engine._prompt_keys`) on the current stream."""
        e = self.engine
        # Every copy from the host first (each waits for what its stream has queued), then the models.
        check_video_rows(e.target, [row for _, row in p.group])
        rows = rows_on([row for _, row in p.group], e.device, e.target.dtype)
        p.keys = [row.get(REPLAY_KEY, i) for i, row in p.group]  # what each row replays
        budget = self.replay.lengths_of(p.keys) if self.replay is not None else None
        p.budget = budget.to(e.device) if budget is not None else None
        p.exact = torch.tensor([bool(row.get(EXACT, False)) for row in rows], device=e.device)
        st = self.st
        # e.prompt_graphs may be switched "off" between calls (benchmarks: the same state, eager prompts).
        p.prompt, p.draft_prompt, p.first = st.prompts.run(lambda r, i: e._prompt_group(st, r, i), rows, p.index,
                                                           enabled=e.prompt_graphs != "off")
        if self.cuda:
            p.done = torch.cuda.Event()
            p.done.record()

    def _land(self, wait: bool) -> None:
        """Place the pending group's rows (their slots' state, on the decoding stream) if its
        prefill is done, or with `wait`, once it is."""
        p, e = self.pending, self.engine
        if p is None or not (wait or p.done is None or p.done.query()):
            return
        if p.done is not None:
            torch.cuda.current_stream(e.device).wait_event(p.done)
        e._place(self.st, p.first, p.prompt, p.draft_prompt, p.index, p.budget, p.exact)
        if self.replay is not None:
            self.replay.assign(p.index, p.keys)
        for slot, (i, _) in zip(p.slots, p.group):
            self.slot_row[slot] = i
            self.traces[i], self.kept[i] = [], []
        # The host read waits for this stream: past it, nothing reads the group's tensors any more.
        self.status = self.st.status.tolist()
        self.pending = None
        self.prefills += 1
        self.placed += len(p.group)

    def _finished(self) -> list[tuple[int, RowOutput]]:
        """Rows whose slot went idle (at its prefill or in the last cycle); their slots free up."""
        k = self.engine.k_max
        flags = self.status[2 + 2 * k:]
        self.peak = max(self.peak, sum(flags))
        slots = [s for s, row in enumerate(self.slot_row) if row is not None and not flags[s]]
        if not slots:
            return []
        out = []
        for slot, result in zip(slots, self.engine._outputs(self.st, slots, self.tokenizer)):
            i = self.slot_row[slot]
            result.trace, result.accepted_per_cycle = self.traces.pop(i), self.kept.pop(i)
            out.append((i, result))
            self.slot_row[slot] = None
        return out

    def step(self) -> list[tuple[int, RowOutput]] | None:
        e = self.engine
        self._refill()
        if self.st is None:  # no rows yet: none at all, or none so far from a feed
            return None if self.exhausted and not self.waiting else []
        finished = self._finished()
        if finished:
            return finished
        if not self.status[0]:  # nothing decoding: a prefill to land, more rows to place, or done
            if self.pending is not None:
                self._land(wait=True)
                return []
            return None if self.exhausted and not self.waiting else []
        st, status = self.st, self.status
        remaining = status[1] - 1  # the target adds one token of its own
        if e.D is None:
            k = 0
        elif self.chooser is not None:
            k = self.chooser.choose(*e._seen(status), budget=remaining)
        else:
            k = max(1, min(e.k_max, remaining))
        self.ks.append(k)
        a = self.clock.mark()
        if k:
            st.stages.run(("draft", k), lambda: e._draft(st, k))
        b = self.clock.mark()
        st.stages.run(("verify", k), lambda: e._verify(st, k))
        self.marks.append((a, b, self.clock.mark(), k))
        if self.replay is not None and k:
            e._replay(st, k, self.replay)
        if self.trace and k:
            _record(self.traces, self.kept, st, k, self.slot_row, sorted(e.heads), set(e.stop.tolist()))
        st.stages.run(("commit", k), lambda: e._commit(st, k))
        self.status = st.status.tolist()  # the cycle's one host read
        return self._finished()

    def close(self) -> None:
        """Record the stream's timing and fold its acceptance counts into the engine's history."""
        e = self.engine
        self._sync()
        total = time.perf_counter() - self.start
        if e.k_max and self.status:
            e._history = tuple([0.5 * x for x in counts] for counts in e._seen(self.status))
        clock, marks = self.clock, self.marks
        e.timing = {
            "prefill_s": self.prefill_s, "decode_s": total - self.prefill_s, "cycles": len(self.ks), "k": self.ks,
            "draft_s": sum(clock.seconds(a, b) for a, b, _, _ in marks),
            "draft_steps": sum(k for *_, k in marks),
            "verify_s": sum(clock.seconds(b, c) for _, b, c, _ in marks), "verifies": len(marks),
            "prefills": self.prefills, "overlapped_prefills": self.overlapped, "rows": self.placed,
            "peak_active": self.peak,
            "prompt_graphs": self.st.prompts.summary() if self.st is not None else None,
            "costs": asdict(self.st.costs) if self.st is not None and self.st.costs else None,
            "attention": {"target": dict(e.T.attention), "draft": dict(e.D.attention) if e.D else None}}


def generate(target, draft, rows: list[dict], cfg: SpecConfig = SpecConfig(), tokenizer=None,
             trace: bool = False, replay: Replay | None = None) -> list[RowOutput]:
    """One batch with a fresh `Engine` (hold an Engine to reuse its state and graphs across batches)."""
    return Engine(target, draft, cfg).generate(rows, tokenizer=tokenizer, trace=trace, replay=replay)


def _stop_ids(target, cfg: SpecConfig) -> torch.Tensor:
    ids = cfg.stop_token_ids
    if ids is None:
        eos = target.generation_config.eos_token_id
        ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return torch.tensor(sorted(set(ids)), dtype=torch.long, device=target.device)


def _record(traces, kept, st: _State, k: int, slot_row: list[int | None], layers: list[int], stop: set[int]) -> None:
    """Keep, per walked slot that the caption keeps (up to and including the first rejection, a stop
    token or the length budget: the walk goes on past them, the commit cuts there), relevance and
    tokens; and per cycle, how many drafts each row kept. `slot_row`: the row each batch slot holds."""
    active = st.active.tolist()
    n = st.accepted.tolist()
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
        for j in range(min(n[slot] + 1, k, room[slot])):
            traces[row].append({
                "relevance": rel[slot][j] if probed else None,
                "relevance_by_head": dict(zip(names, by_head[slot][j])) if probed else {},
                "target_token": target[slot][j], "draft_token": drafted[slot][j], "accepted": j < n[slot],
                "kind": ("exact", "loose", "shift")[kind[slot][j]],
            })
            if (drafted[slot][j] if j < n[slot] else next_token[slot]) in stop:
                break
