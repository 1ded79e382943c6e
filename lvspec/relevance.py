"""Visual relevance: the attention mass a target query puts on the video keys.

Computed inside the target's own attention call, through a registered attention function that
runs SDPA for the output and, for the K+1 verification queries of the chosen layers only, scores
those queries against the cached keys ([B, H, K+1, L], never L x L) and sums the softmax mass
that falls on the video span.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTENTION = "lvspec_sdpa"


class RelevanceProbe:
    """Collects per-query video attention mass of the chosen heads during one forward.

    `heads` maps each probed layer to the indices of the heads averaged into relevance (None: all).
    """

    def __init__(self, heads: dict[int, torch.Tensor | None], video_keys: torch.Tensor):
        self.heads = heads
        self.layers = set(heads)
        self.video_keys = video_keys  # [B, span] bool: which cache slots hold video tokens
        self.by_head: dict[int, torch.Tensor] = {}  # layer -> [B, H, q] video mass of every head

    def add(self, module, query, key, attention_mask, scaling) -> None:
        key = repeat_kv(key, query.shape[1] // key.shape[1])
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
        if attention_mask is not None:
            mask = attention_mask[..., : key.shape[-2]]
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        probs = scores.softmax(-1)  # [B, H, q, L]
        video = self.video_keys[:, None, None, : key.shape[-2]].to(probs.dtype)
        self.by_head[module.layer_idx] = (probs * video).sum(-1)

    def result(self) -> torch.Tensor:
        """Relevance [B, q]: video mass averaged over the chosen heads of the chosen layers."""
        chosen = [h if self.heads[i] is None else h.index_select(1, self.heads[i]) for i, h in self.by_head.items()]
        return torch.cat(chosen, 1).mean(1)


def relevance_sdpa(module, query, key, value, attention_mask, *args, relevance_probe=None, **kwargs):
    """SDPA for the output, plus the relevance side result when a probe rides along."""
    if relevance_probe is not None and module.layer_idx in relevance_probe.layers:
        relevance_probe.add(module, query, key, attention_mask, kwargs.get("scaling") or module.scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


AttentionInterface.register(ATTENTION, relevance_sdpa)
# The same masks as sdpa: a model left routed through `relevance_sdpa` keeps generating exactly as
# with sdpa (HF's own `generate`, assisted generation included, builds its masks by this name).
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def install(text_model: torch.nn.Module) -> None:
    """Route the target's text attention through `relevance_sdpa` (identical output to sdpa)."""
    text_model.config._attn_implementation = ATTENTION
