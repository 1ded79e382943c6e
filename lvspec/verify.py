"""The acceptance rule: one vectorised walk over the K draft slots of every row.

Slot i (0-based) holds draft token d[i]; the target's greedy choice there is t[i], and t[K] is
the bonus choice after all K drafts. A slot is accepted when
    d == t                                               (exact), or, in lvspec mode,
    relevance < theta  and  p(d) >= alpha * p(t)         (loose: a plausible filler), or
    relevance < theta  and  d == t[i +- o], o <= window  (shift: said one slot early or late).
Rows keep their leading run of accepted slots, at most `limit` of them (a row's own K: the walk
over a wider batch's drafts is the walk of its own width, cut there), then the target's own token
at the first rejected slot (a correction) or after the last slot kept (a bonus). K = 0 is plain
greedy decoding.
Fixed shapes and no host synchronisation: the rule runs inside the captured verify forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lvspec.config import SpecConfig
from lvspec.decoder import unpacked

# A token's kind: its index in `lvspec.stats.KINDS` (the verifier decides the first three; a cycle's
# commit the correction or bonus after them).
EXACT, LOOSE, SHIFT, CORRECTION, BONUS = range(5)


@dataclass
class Verdict:
    accepted: torch.Tensor  # [S] leading draft tokens kept
    kind: torch.Tensor  # [S, K] EXACT / LOOSE / SHIFT of each slot (meaningful where accepted)
    next_token: torch.Tensor  # [S] the target's token after the kept drafts
    gated: torch.Tensor  # [S, K] slots the relevance gate marked as anchors
    anchor_rejected: torch.Tensor  # [S] the first rejection was a gated (anchor) slot
    target_tokens: torch.Tensor  # [S, K + 1] the target's greedy choices


@dataclass
class Scores:
    """What the rule reads of the target's logits over [last, drafts], per slot: [S, K + 1] each (a
    draft's entries at its own slot; the last slot's are unused)."""

    choice: torch.Tensor  # the target's greedy choice
    best: torch.Tensor  # its logit (the largest)
    drafted: torch.Tensor  # the draft token's logit
    above: torch.Tensor | None  # vocabulary entries scoring above the draft token (the top_k rule)


def scores(logits: torch.Tensor, draft: torch.Tensor, top_k: int = 0, pack: torch.Tensor | None = None) -> Scores:
    """`Scores` of logits [S, K + 1, V], or of packed logits [N, V] for the flat slots `pack` names
    (`decoder.packed_tokens`; fillers dropped): reduced where they were computed, so no [S, K + 1, V]
    tensor is made; slots not computed score as all-zero logits would (choice 0)."""
    S, k = draft.shape
    n = S * (k + 1)
    ids = torch.cat([draft, draft.new_zeros(S, 1)], 1).flatten()  # the last slot drafts nothing: any id
    flat = logits.flatten(0, 1) if pack is None else logits
    d = ids if pack is None else ids[pack.clamp(max=n - 1)]
    drafted = flat.gather(-1, d[:, None])[:, 0]  # in the logits' own dtype: exact, no float32 copy
    best, choice = flat.max(-1)
    above = (flat > drafted[:, None]).sum(-1) if top_k else None

    def laid_out(x: torch.Tensor) -> torch.Tensor:
        return (x if pack is None else unpacked(x, pack, n)).view(S, k + 1)

    return Scores(laid_out(choice), laid_out(best), laid_out(drafted), laid_out(above) if top_k else None)


def verify(draft: torch.Tensor, logits: torch.Tensor, relevance: torch.Tensor | None, cfg: SpecConfig,
           exact_only: torch.Tensor | None = None, limit: torch.Tensor | None = None,
           pack: torch.Tensor | None = None) -> Verdict:
    """Decide, for each row, how many of its K draft tokens to keep. logits: [S, K + 1, V], or a
    packed verify's [N, V] at `pack` (read through `scores`). `exact_only` [S]: rows verified
    strictly whatever the mode (audit twins: exact greedy output); `limit` [S]: the most drafts each
    row may keep (default K)."""
    k = draft.shape[1]
    sc = scores(logits, draft, cfg.top_k if cfg.loosened else 0, pack)
    t = sc.choice
    exact = draft == t[:, :k]
    kind = torch.zeros_like(draft)
    gated = torch.zeros_like(exact)
    ok = exact
    if cfg.loosened and k:
        if cfg.gate:
            gated = relevance[:, :k] >= cfg.theta
        # p(d) >= alpha * max p  <=>  logit(d) - max logit >= log(alpha): no softmax over the vocabulary.
        loose = sc.drafted[:, :k].float() - sc.best[:, :k].float() >= math.log(cfg.alpha)
        if cfg.top_k:
            loose |= sc.above[:, :k] < cfg.top_k
        shift = torch.zeros_like(exact)
        # The target's choices past a row's own K + 1 slots answer drafts the row does not keep (and
        # a packed verify does not compute them): no draft matches them.
        seen = t if limit is None else t.masked_fill(torch.arange(k + 1, device=t.device) > limit[:, None], -1)
        for o in range(1, min(cfg.shift_window, k) + 1):
            shift[:, : k - o + 1] |= draft[:, : k - o + 1] == seen[:, o:]  # target says it o slots later
            shift[:, o:] |= draft[:, o:] == seen[:, : k - o]  # target said it o slots earlier
        lenient = ~gated if exact_only is None else ~gated & ~exact_only[:, None]
        ok = exact | (lenient & (loose | shift))
        kind = torch.where(exact, EXACT, torch.where(loose, LOOSE, SHIFT))
    if limit is not None:
        ok = ok & (torch.arange(k, device=draft.device) < limit[:, None])
    accepted = ok.long().cumprod(-1).sum(-1)
    next_token = t.gather(1, accepted[:, None])[:, 0]
    if k:
        cut = k if limit is None else limit  # a walk that ends at its limit ends on no rejection
        anchor_rejected = (accepted < cut) & gated.gather(1, accepted.clamp(max=k - 1)[:, None])[:, 0]
    else:
        anchor_rejected = torch.zeros_like(accepted, dtype=torch.bool)
    return Verdict(accepted, kind, next_token, gated, anchor_rejected, t)
