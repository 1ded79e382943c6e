"""One decoding cycle of a batch, as stages over a `DecodeState`:

    prefill  a group of rows into free slots: both models' prompt forwards through the HF modules
             (`prompt_keys`: keys into the caches), then the slots' state (`place`)
    ingest   the draft reads the tokens it missed in cycles where no row drafted (K = 0)
    draft    K greedy draft tokens per slot, from the row's two newest tokens [prev, last]
    verify   the target's forward over [last, drafts] and its verdict; a loosened row keeps at
             most its own K drafts, so its caption never depends on the batch's K; the forward's
             weights run over the rows' own [last, drafts] only, packed (idle slots and a
             loosened row's drafts past its own K cost no FLOPs)
    commit   emit what each row kept plus one target token, roll both caches back to it, count,
             choose each row's next K (`draft_length`), write the status the host reads

Rolling back is moving lengths: a cycle writes its keys at each slot's length, keys past a length
are never read and the next cycle overwrites them, so commit advances each length by what was
kept. The four decoding stages have fixed shapes and never wait on the host: on a GPU each is
captured as a CUDA graph per K and replayed (`graphs.Stages`); on a CPU they simply run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lvspec.adapter import Prompt, draft_row, shared_vocab, text_config
from lvspec.config import SpecConfig
from lvspec.decoder import TextDecoder, packed_tokens
from lvspec.draft_length import choose, choose_batch
from lvspec.families import adapter_for
from lvspec.relevance import RelevanceProbe, relevance_heads, relevance_weights
from lvspec.replay import Replay
from lvspec.state import CATCH_UP, C, DecodeState, margin
from lvspec.stats import KINDS
from lvspec.verify import BONUS, Verdict, verify


class Cycle:
    """The stages of one engine's decoding: its target and draft, their decoders, and the rules."""

    def __init__(self, target, draft, cfg: SpecConfig):
        tc = text_config(target)
        self.adapter, self.cfg = adapter_for(target), cfg
        self.target_model, self.draft_model = target, draft  # (`draft` names the stage)
        vocab = shared_vocab(target, draft) if draft is not None else tc.vocab_size
        self.T = TextDecoder(target, vocab)
        self.D = TextDecoder(draft, vocab) if draft is not None else None
        self.tp = self.T.tp  # the target sharded over ranks (parallel.py); the draft is whole on each
        self.k_max = cfg.longest_draft if draft is not None else 0
        self.auto = draft is not None and cfg.k == "auto"
        self.batch_k = self.auto and cfg.mode == "sd"  # exact: the batch chooses one K (draft_length.choose_batch)
        self.probing = cfg.loosened and cfg.gate
        self.heads = relevance_heads(cfg, tc.num_hidden_layers, tc.num_attention_heads, target.device)
        self.head_weights = relevance_weights(cfg, target.device)
        ids = cfg.stop_token_ids
        if ids is None:
            eos = target.generation_config.eos_token_id
            ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.stop = torch.tensor(sorted(set(ids)), dtype=torch.long, device=target.device)

    def new_state(self, slots: int, capacity: int, draft_capacity: int | None = None) -> DecodeState:
        probed = len(self.heads) * text_config(self.target_model).num_attention_heads if self.probing else 0
        return DecodeState(self.T, self.D, slots, capacity, self.k_max, self.cfg.max_new_tokens, probed,
                           self.target_model.device, draft_capacity)

    # ---- prefill (eager, HF modules) -------------------------------------------------------------
    def prompt_group(self, st: DecodeState, rows: list[dict], slots: torch.Tensor):
        """Both models' prompts of a group (rows on the device), their keys into the caches' `slots`
        and nothing else of the state (it may run beside a cycle on another stream, the slots
        `reserve`d): (target prompt, draft prompt, the target's first tokens), the prompts `light`
        (a group waiting to be placed holds no embeddings)."""
        prompt = self.adapter.prompt(self.target_model, rows)
        draft_prompt = None if self.D is None else self.adapter.prompt(self.draft_model, [draft_row(r) for r in rows])
        first = self.prompt_keys(st, prompt, draft_prompt, slots)
        return prompt.light(), draft_prompt.light() if draft_prompt is not None else None, first

    def prompt_keys(self, st: DecodeState, prompt: Prompt, draft_prompt: Prompt | None, slots: torch.Tensor):
        if self.tp is not None:  # rank 0's video features on every rank: one prompt, one verdict
            self.tp.broadcast(prompt.embeds)
        first = self._prompt_forward(self.target_model, self.T, st.T, prompt, slots).argmax(-1)
        if self.D is not None:
            self._prompt_forward(self.draft_model, self.D, st.D, draft_prompt, slots)
        return first

    @staticmethod
    def _prompt_forward(model, decoder: TextDecoder, cache, prompt: Prompt, slots: torch.Tensor) -> torch.Tensor:
        """The prompts through the HF modules, their keys into the cache's `slots`; logits of their end [B, V]."""
        width = prompt.embeds.shape[1]
        view = cache.prefill_view(slots, prompt.pad, prompt.padded)
        hidden = model.model.language_model(
            inputs_embeds=prompt.embeds, attention_mask=view.mask(width), position_ids=prompt.position_ids,
            past_key_values=view, use_cache=True).last_hidden_state
        return F.linear(hidden[:, -1], decoder.head)

    def reserve(self, st: DecodeState, slots: torch.Tensor) -> None:
        """Idle `slots` about to be prefilled beside decoding: cycles write every slot's keys at its
        length, so park these at the caches' tails, past any prompt (the capacity holds a margin)."""
        for cache in (st.T, st.D):
            if cache is not None:
                cache.length[slots] = cache.capacity - margin(self.k_max)

    def place(self, st: DecodeState, first: torch.Tensor, prompt: Prompt, draft_prompt: Prompt | None,
              slots: torch.Tensor, budget: torch.Tensor | None = None, exact_only: torch.Tensor | None = None) -> None:
        """The slots' state after `prompt_keys`: cache lengths, first token, budget (default
        max_new_tokens), flags (`exact_only`: rows verified strictly), a fresh history."""
        width = prompt.embeds.shape[1]
        for cache, p in ((st.T, prompt), (st.D, draft_prompt)):
            if cache is not None:
                cache.length[slots] = p.embeds.shape[1]
                cache.pad[slots] = p.pad
                cache.offset[slots] = p.next_position - p.embeds.shape[1]  # position id of slot s >= width: s + offset
        st.video[slots] = False
        st.video[slots, :width] = prompt.video_mask
        st.exact_only[slots] = False if exact_only is None else exact_only
        st.seq0[slots] = st.prev[slots] = prompt.last_token
        st.last[slots] = first
        st.tokens[slots, 0] = first
        st.length[slots] = 1
        st.count[:, slots] = 0
        st.reached[slots] = st.kept[slots] = 0
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
            st.lag[slots] = 2
            st.count[C["draft_forwards"], slots] = 1
        self.next_k(st)
        st.publish(self.own_k)

    # ---- the decoding stages (fixed shapes, no host sync) ----------------------------------------
    def ingest(self, st: DecodeState) -> None:
        """The draft reads the tokens before [prev, last] that it missed (up to CATCH_UP a row, in
        one forward; the oldest first, so forwards in a row catch up any lag): rows caught up
        start drafting from their two newest tokens again."""
        D = st.D
        pending = (st.lag - 2).clamp(0, CATCH_UP) * st.active
        at = (st.length + 1 - st.lag)[:, None] + torch.arange(CATCH_UP, device=st.lag.device)  # 0: seq0
        emitted = st.tokens.gather(1, (at - 1).clamp(0, st.tokens.shape[1] - 1))
        self.D.forward(D, torch.where(at == 0, st.seq0[:, None], emitted), logits=False,
                       live=pending > 0)  # keys past `pending` unread
        D.length += pending
        st.lag -= pending
        for name in ("draft_forwards", "catch_ups"):
            st.count[C[name]] += (pending > 0).long()

    def own_k(self, st: DecodeState, k: int | torch.Tensor) -> torch.Tensor:
        """The drafts each row may keep in a cycle drafting k: a loosened row its own K (so its
        caption never depends on the batch's K), an exact row all k (the same tokens either way)."""
        loosened = ~st.exact_only if self.cfg.loosened else torch.zeros_like(st.exact_only)
        return torch.where(loosened, st.k_row, k)

    def draft(self, st: DecodeState, k: int) -> None:
        """k greedy draft tokens per slot into st.drafted[:, :k], after re-reading [prev, last].
        Step j only for rows that keep more than j drafts: the others' attention reads nothing
        (their later drafts are never kept, and the keys a cycle commits come from steps before
        the row's own K)."""
        D = st.D
        own = self.own_k(st, k)
        token = self.D.forward(D, torch.stack([st.prev, st.last], 1), last_only=True,
                               live=st.active)[:, -1].argmax(-1)
        D.length += 2
        st.drafted[:, 0] = token
        for j in range(1, k):
            token = self.D.forward(D, token[:, None], live=st.active & (own > j))[:, -1].argmax(-1)
            D.length += 1
            st.drafted[:, j] = token
        D.length -= k + 1  # back to the cycle's start: commit moves it by what was kept
        if self.tp is not None:  # every rank verifies rank 0's drafts (the draft runs whole on each)
            self.tp.broadcast(st.drafted[:, :k])

    def verify(self, st: DecodeState, k: int, width: int | None = None) -> None:
        """The target's forward over [last, drafts] (keys written, not committed) and its verdict.
        `width` (`Status.tokens` rounded up, `packed_width`): the forward's weights run over only
        each decoding row's [last, own drafts], packed into that many tokens, not every slot's k + 1."""
        drafted = st.drafted[:, :k]
        st.limit.copy_(self.own_k(st, k))
        probe = RelevanceProbe(self.heads, st.video, self.tp, self.head_weights) if self.probing and k else None
        want = st.active[:, None] & (torch.arange(k + 1, device=st.limit.device) <= st.limit[:, None])
        pack = packed_tokens(want, width) if width is not None else None
        logits = self.T.forward(st.T, torch.cat([st.last[:, None], drafted], 1), probe=probe, live=st.active,
                                pack=pack)
        relevance = probe.result() if probe is not None else None
        v = verify(drafted, logits, relevance, self.cfg, st.exact_only, st.limit, pack)
        st.keep(k, v)
        st.target_tokens[:, :k + 1].copy_(v.target_tokens)
        if probe is not None:
            st.relevance[:, :k + 1].copy_(relevance)
            st.relevance_by_head[..., :k + 1].copy_(probe.all_heads())

    def replay(self, st: DecodeState, k: int, replay: Replay) -> None:
        """Keep the recorded number of drafts instead of the verdict's (speed measurement)."""
        v = Verdict(st.accepted, st.kind[:, :k], st.next_token, None, st.anchor_rejected, st.target_tokens[:, :k + 1])
        st.keep(k, replay.apply(v, st.active, st.drafted[:, :k], st.limit))

    def commit(self, st: DecodeState, k: int) -> None:
        """Emit each active slot's kept drafts and target token (cut at a stop token or the budget),
        advance both caches by what was kept, count, choose the next K, write the status."""
        n, active, budget = st.accepted, st.active, st.budget
        live = active.long()
        slot = torch.arange(k + 1, device=n.device)
        drafted = st.drafted[:, :k]
        tokens = torch.cat([drafted, st.next_token[:, None]], 1).scatter(1, n[:, None], st.next_token[:, None])
        last_kind = BONUS - (n < st.limit).long()  # after all of the row's K drafts: a bonus
        kinds = torch.cat([st.kind[:, :k], st.kind[:, :1]], 1).scatter(1, n[:, None], last_kind[:, None])
        is_stop = (tokens[..., None] == self.stop).any(-1) & (slot <= n[:, None])
        has_stop = is_stop.any(1)
        upto = torch.where(has_stop, is_stop.long().argmax(1) + 1, n + 1)
        room = budget - st.length
        keep = torch.minimum(upto, room) * live
        kept = slot < keep[:, None]
        # All k + 1 tokens go in; those past `keep` are overwritten by the next cycle or never read.
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
        if st.D is not None and k:
            offered = st.limit * live
            st.count[C["draft_forwards"]] += offered
            st.count[C["drafted"]] += offered
            st.D.length += (n + 1) * live
            st.lag.masked_fill_(active, 2)
            before = drafted.gather(1, (n - 1).clamp(min=0)[:, None])[:, 0]
            st.prev.copy_(torch.where(n > 0, before, st.last))
            j = torch.arange(k, device=n.device)
            walked = (j < st.limit[:, None]) & active[:, None]
            st.reached[:, :k] += (n[:, None] >= j) & walked
            st.kept[:, :k] += (n[:, None] > j) & walked
        elif st.D is not None:  # no drafts: the draft falls one token further behind (ingest reads it)
            st.lag += live
            st.prev.copy_(st.last)
        st.last.copy_(st.next_token)
        st.active &= ~finished
        self.next_k(st)
        st.publish(self.own_k)

    def next_k(self, st: DecodeState) -> None:
        """Each decoding row's K for the next cycle, within the tokens it may still emit (less the
        target's own): k=auto's choice (lvspec: from the row's own history; sd: the batch's), or
        the fixed k."""
        if not self.k_max:
            return
        limit = (st.budget - st.length - 1).clamp(0, self.k_max)
        if not self.auto:
            k = limit.clamp(max=self.cfg.k)
        elif self.batch_k:  # exact: any K gives the same tokens, so the batch chooses one together
            k = choose_batch(st.reached, st.kept, st.cycle_ms, limit, st.active)
        else:
            k = choose(st.reached, st.kept, st.cycle_ms, limit)
        st.k_row.copy_(k * st.active)
