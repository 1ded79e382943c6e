"""Batched greedy decoding of video prompts: `ar`, exact speculative `sd`, and `lvspec`.

    prefill both models (HF modules, eager)
    repeat: draft K tokens -> the target verifies K+1 in one forward -> commit the kept run plus
            one target token and roll both caches back -> one small read: done? how did it go?

The decode state lives in fixed batch slots and fixed-capacity caches, set up once per
(slots, capacity) and reused batch after batch; masks and positions are built on the device from
per-slot lengths, and a finished row's slot idles. Each stage of a cycle (draft loop, verify,
commit) reads and writes only that state, so on a GPU it is captured as a CUDA graph per K the
first time it runs and replayed after (`graphs.Stages`); on CPU the same functions simply run.
K is fixed, or chosen per cycle from measured stage costs and the batch's running acceptance
(`draft_length`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lvspec.adapter import Prompt, adapter_for, check_pair, shared_vocab, text_config
from lvspec.config import SpecConfig
from lvspec.decoder import ATTENTION, TextDecoder
from lvspec.draft_length import Costs, DraftLength
from lvspec.graphs import Stages
from lvspec.relevance import RelevanceProbe, relevance_heads
from lvspec.replay import Replay
from lvspec.verify import Verdict, verify

CORRECTION, BONUS = 3, 4
KIND_NAMES = ("accepted_exact", "accepted_loose", "accepted_shift", "corrections", "bonus")
COUNTERS = ("num_tokens", "num_cycles", "target_forwards", "draft_forwards", *KIND_NAMES, "rejected_anchor",
            "drafted")
C = {name: i for i, name in enumerate(COUNTERS)}


@dataclass
class RowStats:
    """Counters of one row. Every emitted token is exactly one of exact/loose/shift/correction/bonus."""

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
    mean_accepted_length: float = 0.0  # tokens per cycle (tau), the prefill's token excluded
    mean_draft_length: float = 0.0  # K per cycle (fixed, or as chosen with k="auto")

    def as_dict(self) -> dict:
        return asdict(self)


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
        self.last = torch.zeros(slots, **long)  # newest emitted token: not in the target's cache yet
        self.prev = torch.zeros(slots, **long)  # the one before: the draft re-reads [prev, last]
        self.active = torch.zeros(slots, dtype=torch.bool, device=dev)
        self.stopped = torch.zeros(slots, dtype=torch.bool, device=dev)
        self.tokens = torch.zeros(slots, cfg.max_new_tokens + k + 1, **long)  # emitted, + room for a cycle
        self.length = torch.zeros(slots, **long)  # emitted tokens
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
        # cycles that reached draft slot j (k_max), cycles that kept it (k_max)].
        self.status = torch.zeros(2 + 2 * k, **long)
        self.reached, self.kept = self.status[2:2 + k], self.status[2 + k:]
        self.stages = Stages(engine.graphs, _snapshot(self.small()))
        self.costs: Costs | None = None

    def small(self) -> list[torch.Tensor]:
        caches = [c for c in (self.T, self.D) if c is not None]
        return [t for c in caches for t in (c.length, c.pad, c.offset)] + [
            self.last, self.prev, self.active, self.stopped, self.tokens, self.length, self.count, self.drafted,
            self.accepted, self.next_token, self.kind, self.target_tokens, self.anchor_rejected, self.relevance,
            self.relevance_by_head, self.status]

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

    Holds the decode state between calls, so that batches of one shape reuse its caches and
    captured graphs. `slots` fixes the batch slots (larger calls run in chunks, smaller ones leave
    slots idle); None sizes the state to each call. Note: the models' q/k/v and gate/up weights are
    packed into one tensor each, the modules keeping views (same values, no extra memory).
    """

    def __init__(self, target, draft, cfg: SpecConfig = SpecConfig(), slots: int | None = None):
        self.adapter = adapter_for(target)
        if cfg.mode != "ar":
            if draft is None:
                raise ValueError(f"mode {cfg.mode!r} needs a draft model")
            check_pair(target, draft)
        tc = text_config(target)
        self.heads = relevance_heads(cfg, tc.num_hidden_layers, tc.num_attention_heads, target.device)
        self.cfg, self.target, self.draft = cfg, target, draft if cfg.mode != "ar" else None
        self.device = target.device
        vocab = shared_vocab(target, draft) if self.draft is not None else tc.vocab_size
        self.T = TextDecoder(target, vocab)
        self.D = TextDecoder(draft, vocab) if self.draft is not None else None
        self.k_max = cfg.longest_draft if self.draft is not None else 0
        self.probing = cfg.loosened and cfg.gate
        self.graphs = cfg.cuda_graphs and self.device.type == "cuda"
        self.stop = _stop_ids(target, cfg)
        self.slots = slots
        self._state: _State | None = None
        # Acceptance counts of earlier calls (cycles that reached / kept each draft slot), halved at
        # every call: a new batch starts from what this pair accepted lately, not from nothing.
        self._history = ([0.0] * self.k_max, [0.0] * self.k_max)
        self.timing: dict = {}  # of the latest call: prefill and decode seconds, stage costs, K per cycle
        self.attention_timings: dict = {}  # (model, forward size) -> seconds per attention path, when tuned

    # ---- the batch API -------------------------------------------------------------------------
    def generate(self, rows: list[dict], tokenizer=None, trace: bool = False,
                 replay: Replay | None = None) -> list[RowOutput]:
        """Caption prepared video prompts (one processor output per row).

        With `tokenizer`, outputs carry decoded text; with `trace`, every verified slot's relevance
        and tokens, and the drafts kept per cycle. With `replay` (speed measurement of
        random-weight models), each cycle keeps the recorded number of drafts instead.
        """
        if not rows:
            return []
        if self.slots and len(rows) > self.slots:
            return [r for lo in range(0, len(rows), self.slots)
                    for r in self.generate(rows[lo:lo + self.slots], tokenizer, trace, replay)]
        with torch.inference_mode(), sdpa_kernel(_ATTENTION_BACKENDS):
            return self._generate(rows, tokenizer, trace, replay)

    def _generate(self, rows, tokenizer, trace, replay) -> list[RowOutput]:
        cuda = self.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        start = time.perf_counter()
        prompt = self.adapter.prompt(self.target, rows)
        draft_prompt = self.adapter.prompt(self.draft, rows) if self.draft is not None else None
        widths = [p.embeds.shape[1] for p in (prompt, draft_prompt) if p is not None]
        st = self._state_for(len(rows), max(widths))
        chooser = self._chooser(st)
        st.reset()
        self._prefill(st, prompt, draft_prompt)
        status = st.status.tolist()
        sync()
        prefilled = time.perf_counter()
        if replay is not None:
            replay.start(st.slots, self.device)

        B = len(rows)
        traces: list[list[dict]] = [[] for _ in range(B)]
        kept: list[list[int]] = [[] for _ in range(B)]
        clock, marks, ks = _Clock(cuda), [], []
        while status[0]:
            remaining = status[1] - 1  # the target adds one token of its own
            if self.D is None:
                k = 0
            elif chooser is not None:
                k = chooser.choose(*self._seen(status), budget=remaining)
            else:
                k = max(1, min(self.k_max, remaining))
            ks.append(k)
            a = clock.mark()
            if k:
                st.stages.run(("draft", k), lambda: self._draft(st, k))
            b = clock.mark()
            st.stages.run(("verify", k), lambda: self._verify(st, k))
            marks.append((a, b, clock.mark(), k))
            if replay is not None and k:
                self._replay(st, k, replay)
            if trace and k:
                _record(traces, kept, st, k, B, sorted(self.heads))
            st.stages.run(("commit", k), lambda: self._commit(st, k))
            status = st.status.tolist()  # the cycle's one host read
        sync()
        done = time.perf_counter()
        if self.k_max:
            self._history = tuple([0.5 * x for x in counts] for counts in self._seen(status))
        self.timing = {
            "prefill_s": prefilled - start, "decode_s": done - prefilled, "cycles": len(ks), "k": ks,
            "draft_s": sum(clock.seconds(a, b) for a, b, _, _ in marks),
            "draft_steps": sum(k for *_, k in marks),
            "verify_s": sum(clock.seconds(b, c) for _, b, c, _ in marks), "verifies": len(marks),
            "costs": asdict(st.costs) if st.costs else None,
            "attention": {"target": dict(self.T.attention), "draft": dict(self.D.attention) if self.D else None}}
        return self._results(st, B, tokenizer, traces, kept)

    def _seen(self, status: list[int]) -> tuple[list[float], list[float]]:
        """Cycles that reached / kept each draft slot: this call's counts plus the decayed history."""
        k = self.k_max
        return ([h + c for h, c in zip(self._history[0], status[2:2 + k])],
                [h + c for h, c in zip(self._history[1], status[2 + k:2 + 2 * k])])

    # ---- state ----------------------------------------------------------------------------------
    def _state_for(self, rows: int, width: int) -> _State:
        slots = self.slots or rows
        need = width + self.cfg.max_new_tokens + self.k_max + 2
        st = self._state
        if st is None or st.slots != slots or st.capacity < need:
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
        return Costs(draft_step=max(step, 1e-9), verify_1=v1, verify_max=vm)

    # ---- prefill (eager, HF modules) ----------------------------------------------------------
    def _prefill(self, st: _State, prompt: Prompt, draft_prompt: Prompt | None) -> None:
        B, width = prompt.embeds.shape[:2]
        first = self._prompt_forward(self.target, self.T, st.T, prompt).argmax(-1)
        st.video[:B, :width] = prompt.video_mask
        st.last[:B] = first
        st.tokens[:B, 0] = first
        st.length[:B] = 1
        for name in ("num_tokens", "bonus", "target_forwards"):
            st.count[C[name], :B] = 1
        stop = (first[:, None] == self.stop).any(-1)
        st.stopped[:B] = stop
        st.active[:B] = ~stop & (self.cfg.max_new_tokens > 1)
        if self.D is not None:
            self._prompt_forward(self.draft, self.D, st.D, draft_prompt)
            # The draft re-reads the prompt's last token with the first generated one: every draft
            # loop then starts from two known tokens, one shape for all slots.
            st.D.length[:B] -= 1
            st.prev[:B] = draft_prompt.last_token
            st.count[C["draft_forwards"], :B] = 1
        st.status[0] = st.active.any()
        st.status[1] = self.cfg.max_new_tokens - 1

    @staticmethod
    def _prompt_forward(model, decoder: TextDecoder, cache, prompt: Prompt) -> torch.Tensor:
        """The prompt through the HF modules, its keys into the static cache; logits of its end [B, V]."""
        B, width = prompt.embeds.shape[:2]
        view = cache.prefill_view(B, prompt.pad)
        hidden = model.model.language_model(
            inputs_embeds=prompt.embeds, attention_mask=view.mask(width), position_ids=prompt.position_ids,
            past_key_values=view, use_cache=True).last_hidden_state
        cache.length[:B] = width
        cache.pad[:B] = prompt.pad
        cache.offset[:B] = prompt.next_position - width  # position id of slot s >= width is s + offset
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

    def _verify(self, st: _State, k: int) -> None:
        """The target's forward over [last, drafts] (keys written, not committed) and its verdict."""
        drafted = st.drafted[:, :k]
        probe = RelevanceProbe(self.heads, st.video) if self.probing and k else None
        logits = self.T.forward(st.T, torch.cat([st.last[:, None], drafted], 1), probe=probe)
        relevance = probe.result() if probe is not None else None
        v = verify(drafted, logits, relevance, self.cfg)
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
        n, active, budget = st.accepted, st.active, self.cfg.max_new_tokens
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
        codes = torch.arange(len(KIND_NAMES), device=n.device)
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
        st.status[0] = st.active.any()
        st.status[1] = (budget - st.length).masked_fill(~st.active, 0).max()

    def _replay(self, st: _State, k: int, replay: Replay) -> None:
        v = Verdict(st.accepted, st.kind[:, :k], st.next_token, None, st.anchor_rejected, st.target_tokens[:, :k + 1])
        r = replay.apply(v, st.active, st.drafted[:, :k])
        st.accepted.copy_(r.accepted)
        st.kind[:, :k].copy_(r.kind)
        st.next_token.copy_(r.next_token)
        st.anchor_rejected.copy_(r.anchor_rejected)

    # ---- results --------------------------------------------------------------------------------
    def _results(self, st: _State, rows: int, tokenizer, traces, kept) -> list[RowOutput]:
        lengths, stopped = st.length[:rows].tolist(), st.stopped[:rows].tolist()
        tokens, counts = st.tokens[:rows].tolist(), st.count[:, :rows].T.tolist()
        out = []
        for i in range(rows):
            ids = tokens[i][: lengths[i]]
            stats = RowStats(**dict(zip(COUNTERS, counts[i])))
            if stats.num_cycles:
                stats.mean_accepted_length = (stats.num_tokens - 1) / stats.num_cycles
                stats.mean_draft_length = stats.drafted / stats.num_cycles
            text = tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else None
            out.append(RowOutput(ids, text, stats, "stop" if stopped[i] else "length", traces[i], kept[i]))
        return out


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


def _record(traces, kept, st: _State, k: int, rows: int, layers: list[int]) -> None:
    """Keep, per walked slot (up to and including the first rejection), relevance and tokens; and
    per cycle, how many drafts each row kept."""
    active = st.active[:rows].tolist()
    n = st.accepted[:rows].tolist()
    kind = st.kind[:rows, :k].tolist()
    target, drafted = st.target_tokens[:rows, :k].tolist(), st.drafted[:rows, :k].tolist()
    probed = st.relevance_by_head.shape[1] > 0
    rel = st.relevance[:rows, :k].tolist() if probed else None
    by_head = st.relevance_by_head[:rows, :, :k].transpose(1, 2).tolist() if probed else None
    heads = st.relevance_by_head.shape[1] // max(len(layers), 1)
    names = [(i, h) for i in layers for h in range(heads)] if probed else []
    for row in range(rows):
        if not active[row]:
            continue
        kept[row].append(n[row])
        for j in range(min(n[row] + 1, k)):
            traces[row].append({
                "relevance": rel[row][j] if probed else None,
                "relevance_by_head": dict(zip(names, by_head[row][j])) if probed else {},
                "target_token": target[row][j], "draft_token": drafted[row][j], "accepted": j < n[row],
                "kind": ("exact", "loose", "shift")[kind[row][j]],
            })
