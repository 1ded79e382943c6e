"""The acceptance rule: one vectorised walk over the K draft slots of every row.

Slot i (0-based) holds draft token d[i]; the target's greedy choice there is t[i], and t[K] is
the bonus choice after all K drafts. A slot is accepted when
    d == t                                               (exact), or, in lvspec mode,
    relevance < theta  and  p(d) >= alpha * p(t)         (loose: a plausible filler), or
    relevance < theta  and  d == t[i +- o], o <= window  (shift: said one slot early or late).
Rows keep their leading run of accepted slots, then the target's own token at the first
rejected slot (a correction) or after the last slot (a bonus).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lvspec.config import SpecConfig

EXACT, LOOSE, SHIFT = 0, 1, 2


@dataclass
class Verdict:
    accepted: torch.Tensor  # [B] leading draft tokens kept
    kind: torch.Tensor  # [B, K] EXACT / LOOSE / SHIFT of each slot (meaningful where accepted)
    next_token: torch.Tensor  # [B] the target's token after the kept drafts
    gated: torch.Tensor  # [B, K] slots the relevance gate marked as anchors
    anchor_rejected: torch.Tensor  # [B] the first rejection was a gated (anchor) slot
    target_tokens: torch.Tensor  # [B, K + 1] the target's greedy choices


def verify(draft: torch.Tensor, logits: torch.Tensor, relevance: torch.Tensor | None, cfg: SpecConfig) -> Verdict:
    """Decide, for each row, how many of its K draft tokens to keep. logits: [B, K + 1, V]."""
    k = draft.shape[1]
    t = logits.argmax(-1)
    exact = draft == t[:, :k]
    kind = torch.full_like(draft, EXACT)
    gated = torch.zeros_like(exact)
    ok = exact
    if cfg.loosened:
        if cfg.gate:
            gated = relevance[:, :k] >= cfg.theta
        probs = logits[:, :k].float().softmax(-1)
        p_draft = probs.gather(-1, draft[..., None])[..., 0]
        loose = p_draft >= cfg.alpha * probs.max(-1).values
        if cfg.top_k:
            loose |= (probs > p_draft[..., None]).sum(-1) < cfg.top_k
        shift = torch.zeros_like(exact)
        for o in range(1, cfg.shift_window + 1):
            shift[:, : k - o + 1] |= draft[:, : k - o + 1] == t[:, o:]  # target says it o slots later
            shift[:, o:] |= draft[:, o:] == t[:, : k - o]  # target said it o slots earlier
        ok = exact | (~gated & (loose | shift))
        kind = torch.where(exact, EXACT, torch.where(loose, LOOSE, SHIFT))
    accepted = ok.long().cumprod(-1).sum(-1)
    next_token = t.gather(1, accepted[:, None])[:, 0]
    first = accepted.clamp(max=k - 1)[:, None]
    anchor_rejected = (accepted < k) & gated.gather(1, first)[:, 0]
    return Verdict(accepted, kind, next_token, gated, anchor_rejected, t)
