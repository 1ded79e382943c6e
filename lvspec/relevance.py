"""Visual relevance: the attention mass a target query puts on the video keys.

Measured inside the verify forward, for the K+1 verification queries of the chosen layers only:
their attention probabilities over the cached keys ([S, kv heads, group x q, capacity], never
L x L) times the slot's video-key mask, averaged over the chosen heads (optionally weighted: a
calibrated weighted mean separates anchors better than any equal-weight subset of heads).
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


def relevance_weights(cfg, device) -> torch.Tensor | None:
    """The weight of each chosen head in the order `RelevanceProbe.result` lists them (layers, then
    heads, ascending), normalised to sum to 1; None: the plain mean."""
    if cfg.relevance_weights is None:
        return None
    weight = dict(zip(cfg.relevance_heads, cfg.relevance_weights))
    ordered = torch.tensor([weight[pair] for pair in sorted(weight)], dtype=torch.float32, device=device)
    return ordered / ordered.sum()


class RelevanceProbe:
    """Collects, during one forward, every head's video attention mass at each query of the
    probed layers; `result` averages the chosen heads. Under tensor parallelism each rank sees
    its own heads; the first read gathers all of them (one all-gather per forward), so heads keep
    their global numbers and every rank gets the same relevance."""

    def __init__(self, heads: dict[int, torch.Tensor | None], video: torch.Tensor, tp=None,
                 weights: torch.Tensor | None = None):
        self.heads = heads
        self.weights = weights  # [chosen heads] summing to 1, or None: the plain mean
        self.layers = set(heads)
        self.tp = tp
        self.video_keys = video  # [S, capacity]: where a slot holds a video token
        self.video = video[:, None, :, None]  # [S, 1, capacity, 1]
        self.by_head: dict[int, torch.Tensor] = {}  # layer -> [S, this rank's heads, q]
        self._all: dict[int, torch.Tensor] | None = None  # layer -> [S, all heads, q]

    def add(self, layer: int, probs: torch.Tensor, group: int, q: int) -> None:
        """probs: [S, kv heads, group * q, capacity] (float32 or wider), folded as the decoder runs attention."""
        S, kvh = probs.shape[:2]
        self.by_head[layer] = torch.matmul(probs, self.video.to(probs.dtype)).view(S, kvh * group, q)
        self._all = None

    def add_mass(self, layer: int, mass: torch.Tensor) -> None:
        """mass: [S, this rank's heads, q], each head's attention on the video keys (summed by the
        attention kernel itself: `attention.split_attention`)."""
        self.by_head[layer] = mass
        self._all = None

    def _every_head(self) -> dict[int, torch.Tensor]:
        if self._all is None:
            layers = sorted(self.by_head)
            mass = torch.stack([self.by_head[i] for i in layers], 1)  # [S, layers, heads here, q]
            if self.tp is not None:  # rank r holds heads [r * n, (r + 1) * n)
                mass = self.tp.gather(mass).permute(1, 2, 0, 3, 4).flatten(2, 3)
            self._all = {layer: mass[:, j] for j, layer in enumerate(layers)}
        return self._all

    def result(self) -> torch.Tensor:
        """Relevance [S, q]: video mass averaged over the chosen heads of the chosen layers (weighted
        where weights are set: still a mass in [0, 1])."""
        every = self._every_head()
        chosen = torch.cat([h if self.heads[i] is None else h.index_select(1, self.heads[i])
                            for i, h in sorted(every.items())], 1)
        if self.weights is None:
            return chosen.mean(1)
        return (chosen * self.weights.to(chosen.dtype)[:, None]).sum(1)

    def all_heads(self) -> torch.Tensor:
        """[S, probed layers x heads, q], layers in ascending order."""
        every = self._every_head()
        return torch.cat([every[i] for i in sorted(every)], 1)
