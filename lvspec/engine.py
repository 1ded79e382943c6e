"""Batched greedy decoding of video prompts: `ar`, exact speculative `sd`, and `lvspec`.

    prefill both models -> repeat: draft proposes K -> target verifies K+1 in one forward
                                   -> keep the accepted run + one target token -> roll back

Rows of a batch keep their own cache lengths and positions, so they accept different numbers of
tokens per cycle without waiting for each other; a finished row leaves the batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lvspec.adapter import Prompt, adapter_for, check_pair, shared_vocab, text_config
from lvspec.cache import RaggedKVCache
from lvspec.config import SpecConfig
from lvspec.relevance import RelevanceProbe, install
from lvspec.replay import Replay
from lvspec.verify import EXACT, LOOSE, SHIFT, verify

CORRECTION, BONUS = 3, 4
KIND_NAMES = ("accepted_exact", "accepted_loose", "accepted_shift", "corrections", "bonus")


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
    mean_accepted_length: float = 0.0  # tokens per cycle (tau), the prefill's token excluded

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


class _Decoder:
    """One model's decoding state over the active rows: its ragged cache and its positions."""

    def __init__(self, model, adapter, prompt: Prompt, capacity: int, vocab: int):
        self.model, self.adapter, self.vocab = model, adapter, vocab
        self.lm = model.model.language_model
        self.embed = model.get_input_embeddings()
        width = prompt.embeds.shape[1]
        self.cache = RaggedKVCache(prompt.pad, torch.zeros_like(prompt.pad), capacity)
        self.offset = prompt.next_position - width  # position id of cache slot s >= width is s + offset
        self._prompt = prompt

    def _run(self, embeds, positions, mask, probe=None):
        kwargs = {"relevance_probe": probe} if probe is not None else {}
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                      past_key_values=self.cache, use_cache=True, **kwargs)
        return out.last_hidden_state

    def logits(self, hidden):
        return self.model.lm_head(hidden)[..., : self.vocab].float()

    def prefill(self) -> torch.Tensor:
        """Run the prompt; returns the logits of its last position [B, V]."""
        p = self._prompt
        mask = self.cache.begin(p.embeds.shape[1])
        hidden = self._run(p.embeds, p.position_ids, mask)
        self.cache.advance(p.embeds.shape[1])
        self._prompt = None
        return self.logits(hidden[:, -1])

    def forward(self, tokens: torch.Tensor, probe: RelevanceProbe | None = None) -> torch.Tensor:
        """Run q new tokens per row at each row's own offset (not committed); returns logits [B, q, V]."""
        mask = self.cache.begin(tokens.shape[1])
        positions = self.adapter.positions(self.cache.positions() + self.offset[:, None])
        return self.logits(self._run(self.embed(tokens), positions, mask, probe))

    def select(self, rows: torch.Tensor) -> None:
        self.cache.select(rows)
        self.offset = self.offset[rows]


def _stop_ids(target, cfg: SpecConfig) -> torch.Tensor:
    ids = cfg.stop_token_ids
    if ids is None:
        eos = target.generation_config.eos_token_id
        ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return torch.tensor(sorted(set(ids)), dtype=torch.long, device=target.device)


def _relevance_heads(target, cfg: SpecConfig) -> dict[int, torch.Tensor | None]:
    """Which heads of which target layers feed relevance: layer -> head indices (None: all heads),
    on the target's device, built once per call rather than once per cycle."""
    n, h = text_config(target).num_hidden_layers, text_config(target).num_attention_heads
    if cfg.relevance_heads is not None:
        pairs = cfg.relevance_heads
        if not pairs or any(not (0 <= layer < n and 0 <= head < h) for layer, head in pairs):
            raise ValueError(f"relevance_heads must be (layer, head) pairs within [0, {n}) x [0, {h}), "
                             f"got {cfg.relevance_heads}")
        return {layer: torch.tensor(sorted({hd for ly, hd in pairs if ly == layer}), device=target.device)
                for layer in sorted({ly for ly, _ in pairs})}
    layers = set(range(n)) if cfg.relevance_layers is None else set(cfg.relevance_layers)
    if not layers or min(layers) < 0 or max(layers) >= n:
        raise ValueError(f"relevance_layers must name target layers in [0, {n}), got {cfg.relevance_layers}")
    return dict.fromkeys(sorted(layers))


class _Outputs:
    """Emitted tokens and counters of all rows, updated a whole batch at a time."""

    def __init__(self, rows: int, cfg: SpecConfig, stop: torch.Tensor, device):
        self.cfg, self.stop = cfg, stop
        self.tokens = torch.zeros(rows, cfg.max_new_tokens, dtype=torch.long, device=device)
        self.length = torch.zeros(rows, dtype=torch.long, device=device)
        self.stopped = torch.zeros(rows, dtype=torch.bool, device=device)
        names = [f.name for f in RowStats.__dataclass_fields__.values() if f.name != "mean_accepted_length"]
        self.count = {n: torch.zeros(rows, dtype=torch.long, device=device) for n in names}

    def emit(self, rows: torch.Tensor, tokens: torch.Tensor, kinds: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """Append the first n of `tokens` [b, m] to `rows`, cut at a stop token or the budget.

        Returns which of `rows` are finished.
        """
        m = tokens.shape[1]
        slot = torch.arange(m, device=tokens.device)
        valid = slot < n[:, None]
        is_stop = torch.isin(tokens, self.stop) & valid
        has_stop = is_stop.any(1)
        upto = torch.where(has_stop, is_stop.long().argmax(1) + 1, n)
        room = self.cfg.max_new_tokens - self.length[rows]
        keep = torch.minimum(upto, room)
        kept = slot < keep[:, None]
        row_index = rows[:, None].expand_as(tokens)[kept]
        self.tokens[row_index, (self.length[rows, None] + slot)[kept]] = tokens[kept]
        for code, name in enumerate(KIND_NAMES):
            self.count[name][rows] += ((kinds == code) & kept).sum(1)
        self.length[rows] += keep
        self.count["num_tokens"][rows] += keep
        stopped = has_stop & (upto <= room)
        self.stopped[rows] |= stopped
        return stopped | (self.length[rows] >= self.cfg.max_new_tokens)

    def results(self, tokenizer, traces, kept) -> list[RowOutput]:
        out = []
        for i in range(self.tokens.shape[0]):
            ids = self.tokens[i, : self.length[i]].tolist()
            stats = RowStats(**{k: int(v[i]) for k, v in self.count.items()})
            cycles = stats.num_cycles
            stats.mean_accepted_length = (stats.num_tokens - 1) / cycles if cycles else 0.0
            text = tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else None
            out.append(RowOutput(ids, text, stats, "stop" if bool(self.stopped[i]) else "length", traces[i], kept[i]))
        return out


# cuDNN's attention rebuilds its execution plan whenever the key length changes, i.e. at every
# decoding step: measured 1.25 ms of CPU per layer call on an H200 (a 7B step: 57 ms, mostly that).
# Flash / memory-efficient attention have no such set-up cost.
_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@torch.inference_mode()
def generate(target, draft, rows: list[dict], cfg: SpecConfig = SpecConfig(), tokenizer=None,
             trace: bool = False, replay: Replay | None = None) -> list[RowOutput]:
    """Caption a batch of prepared video prompts (one processor output per row) with `cfg.mode`.

    `draft` may be None in `ar` mode. With `tokenizer`, outputs carry decoded text; with `trace`,
    every verified slot's relevance and tokens (for measuring anchor identification) and the
    drafts kept per cycle. With `replay` (speed measurement of random-weight models), each cycle
    keeps the recorded number of drafts instead of what verification chose.
    """
    with sdpa_kernel(_ATTENTION_BACKENDS):
        return _generate(target, draft, rows, cfg, tokenizer, trace, replay)


def _generate(target, draft, rows, cfg, tokenizer, trace, replay) -> list[RowOutput]:
    adapter = adapter_for(target)
    if cfg.mode != "ar":
        if draft is None:
            raise ValueError(f"mode {cfg.mode!r} needs a draft model")
        check_pair(target, draft)
    heads = _relevance_heads(target, cfg)
    if not rows:
        return []
    device = target.device
    stop = _stop_ids(target, cfg)
    vocab = shared_vocab(target, draft) if cfg.mode != "ar" else text_config(target).vocab_size
    n_rows = len(rows)
    out = _Outputs(n_rows, cfg, stop, device)
    traces: list[list[dict]] = [[] for _ in range(n_rows)]
    kept: list[list[int]] = [[] for _ in range(n_rows)]  # drafts kept per cycle, with trace
    if replay is not None:
        replay.start(n_rows, device)
    active = torch.arange(n_rows, device=device)

    prompt = adapter.prompt(target, rows)
    capacity = prompt.embeds.shape[1] + cfg.max_new_tokens + cfg.k + 2
    probing = cfg.loosened and cfg.gate
    video_keys = None
    if probing:
        install(target.model.language_model)
        video_keys = torch.nn.functional.pad(prompt.video_mask, (0, capacity - prompt.video_mask.shape[1]))
    T = _Decoder(target, adapter, prompt, capacity, vocab)
    last = T.prefill().argmax(-1)
    out.count["target_forwards"] += 1
    one = torch.ones_like(active)
    finished = out.emit(active, last[:, None], torch.full_like(last[:, None], BONUS), one)

    D = pending = n_pending = None
    if cfg.mode != "ar":
        D = _Decoder(draft, adapter, adapter.prompt(draft, rows), capacity, vocab)
        D.prefill()
        out.count["draft_forwards"] += 1
        pending = torch.stack([last, last], 1)  # tokens the draft has not seen yet: 1 or 2 per row
        n_pending = one.clone()

    def keep_rows(done: torch.Tensor):
        nonlocal active, last, pending, n_pending, video_keys
        if not bool(done.any()):
            return
        left = (~done).nonzero()[:, 0]
        active, last = active[left], last[left]
        T.select(left)
        if D is not None:
            D.select(left)
            pending, n_pending = pending[left], n_pending[left]
        if video_keys is not None:
            video_keys = video_keys[left]

    keep_rows(finished)

    while active.numel():
        if cfg.mode == "ar":
            nxt = T.forward(last[:, None])[:, -1].argmax(-1)
            T.cache.advance(1)
            out.count["target_forwards"][active] += 1
            out.count["num_cycles"][active] += 1
            finished = out.emit(active, nxt[:, None], torch.full_like(nxt[:, None], BONUS), torch.ones_like(nxt))
            last = nxt
            keep_rows(finished)
            continue

        # Never draft past the longest remaining budget.
        k = max(1, min(cfg.k, int((cfg.max_new_tokens - out.length[active]).max()) - 1))
        drafted = _propose(D, pending, n_pending, k)
        out.count["draft_forwards"][active] += k

        probe = RelevanceProbe(heads, video_keys) if probing else None
        logits = T.forward(torch.cat([last[:, None], drafted], 1), probe)
        v = verify(drafted, logits, probe.result() if probe else None, cfg)
        if replay is not None:
            v = replay.apply(v, active, drafted)
        out.count["target_forwards"][active] += 1
        out.count["num_cycles"][active] += 1
        out.count["rejected_anchor"][active] += v.anchor_rejected.long()
        if trace:
            _record(traces, kept, active, v, probe, drafted)

        n = v.accepted
        tokens = torch.cat([drafted, torch.zeros_like(drafted[:, :1])], 1)
        tokens.scatter_(1, n[:, None], v.next_token[:, None])
        kinds = torch.cat([v.kind, torch.zeros_like(v.kind[:, :1])], 1)
        kinds.scatter_(1, n[:, None], torch.where(n < k, CORRECTION, BONUS)[:, None])
        finished = out.emit(active, tokens, kinds, n + 1)

        # Roll back: the target keeps [last, accepted drafts]; the draft keeps what it has seen of them.
        T.cache.advance(n + 1)
        D.cache.advance(-(k - 1 - torch.clamp(n, max=k - 1)))
        all_in = n == k
        pending = torch.stack([torch.where(all_in, drafted[:, -1], v.next_token), v.next_token], 1)
        n_pending = torch.where(all_in, 2, 1)
        last = v.next_token
        keep_rows(finished)

    return out.results(tokenizer, traces, kept)


def _propose(D: _Decoder, pending: torch.Tensor, n_pending: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy draft of k tokens per row, after feeding each row its 1 or 2 unseen tokens."""
    q = int(n_pending.max())
    logits = D.forward(pending[:, :q])
    token = logits.gather(1, (n_pending - 1)[:, None, None].expand(-1, 1, logits.shape[-1]))[:, 0].argmax(-1)
    D.cache.advance(n_pending)
    drafted = [token]
    for _ in range(k - 1):
        token = D.forward(token[:, None])[:, -1].argmax(-1)
        D.cache.advance(1)
        drafted.append(token)
    return torch.stack(drafted, 1)


def _record(traces, kept, active, v, probe, drafted) -> None:
    """Keep, per walked slot (up to and including the first rejection), relevance and tokens; and
    per cycle, how many drafts each row kept."""
    k = drafted.shape[1]
    walked = torch.minimum(v.accepted + 1, torch.tensor(k, device=drafted.device))
    rel = probe.result()[:, :k] if probe is not None else None
    layers = sorted(probe.by_head) if probe is not None else []
    by_head = torch.cat([probe.by_head[i][..., :k] for i in layers], 1).transpose(1, 2) if layers else None
    names = [(i, h) for i in layers for h in range(probe.by_head[i].shape[1])] if layers else []
    for i, row in enumerate(active.tolist()):
        kept[row].append(int(v.accepted[i]))
        for j in range(int(walked[i])):
            traces[row].append({
                "relevance": float(rel[i, j]) if rel is not None else None,
                "relevance_by_head": dict(zip(names, by_head[i, j].tolist())) if layers else {},
                "target_token": int(v.target_tokens[i, j]), "draft_token": int(drafted[i, j]),
                "accepted": j < int(v.accepted[i]), "kind": ("exact", "loose", "shift")[int(v.kind[i, j])],
            })
