"""Visual relevance: the attention mass a target query puts on the video keys.

Measured inside the verify forward, for the K+1 verification queries of the chosen layers only:
their attention probabilities over the cached keys ([S, kv heads, group x q, capacity], never
L x L) times the slot's video-key mask.
"""

from __future__ import annotations

import torch


def relevance_heads(cfg, n_layers: int, n_heads: int, device) -> dict[int, torch.Tensor | None]:
    """Which heads of which target layers feed relevance: layer -> head indices (None: all heads)."""
    if cfg.relevance_heads is not None:
        pairs = cfg.relevance_heads
        if not pairs or any(not (0 <= layer < n_layers and 0 <= head < n_heads) for layer, head in pairs):
            raise ValueError(f"relevance_heads must be (layer, head) pairs within [0, {n_layers}) x [0, {n_heads}), "
                             f"got {cfg.relevance_heads}")
        return {layer: torch.tensor(sorted({hd for ly, hd in pairs if ly == layer}), device=device)
                for layer in sorted({ly for ly, _ in pairs})}
    layers = set(range(n_layers)) if cfg.relevance_layers is None else set(cfg.relevance_layers)
    if not layers or min(layers) < 0 or max(layers) >= n_layers:
        raise ValueError(f"relevance_layers must name target layers in [0, {n_layers}), got {cfg.relevance_layers}")
    return dict.fromkeys(sorted(layers))


class RelevanceProbe:
    """Collects, during one forward, every head's video attention mass at each query of the
    probed layers; `result` averages the chosen heads."""

    def __init__(self, heads: dict[int, torch.Tensor | None], video: torch.Tensor):
        self.heads = heads
        self.layers = set(heads)
        self.video = video[:, None, :, None]  # [S, 1, capacity, 1]: where a slot holds a video token
        self.by_head: dict[int, torch.Tensor] = {}  # layer -> [S, heads, q]

    def add(self, layer: int, probs: torch.Tensor, group: int, q: int) -> None:
        """probs: [S, kv heads, group * q, capacity] (float32 or wider), folded as the decoder runs attention."""
        S, kvh = probs.shape[:2]
        self.by_head[layer] = torch.matmul(probs, self.video.to(probs.dtype)).view(S, kvh * group, q)

    def result(self) -> torch.Tensor:
        """Relevance [S, q]: video mass averaged over the chosen heads of the chosen layers."""
        chosen = [h if self.heads[i] is None else h.index_select(1, self.heads[i]) for i, h in sorted(self.by_head.items())]
        return torch.cat(chosen, 1).mean(1)

    def all_heads(self) -> torch.Tensor:
        """[S, probed layers x heads, q], layers in ascending order."""
        return torch.cat([self.by_head[i] for i in sorted(self.by_head)], 1)
