"""A static KV cache: fixed batch slots and a fixed capacity, every slot at its own length.

Allocated once per (slots, capacity) and reused batch after batch, so that decoding forwards have
the same shapes every time (what CUDA graphs need). A forward writes its new keys at
`length + j`; a rejected draft slot is simply overwritten by the next forward. Keys of a slot are
valid on [pad, length), so the attention mask is a per-slot band built on the device.
"""

from __future__ import annotations

import torch


class StaticCache:
    """Keys and values of every layer, [layers, slots, kv_heads, capacity, head_dim] each."""

    def __init__(self, layers: int, slots: int, kv_heads: int, capacity: int, head_dim: int, dtype, device):
        shape = (layers, slots, kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = torch.zeros(slots, dtype=torch.long, device=device)  # committed slots, padding included
        self.pad = torch.zeros(slots, dtype=torch.long, device=device)  # left padding before the prompt
        self.offset = torch.zeros(slots, dtype=torch.long, device=device)  # position id of slot s is s + offset
        self.capacity = capacity

    def prefill_view(self, slots: torch.Tensor, pad: torch.Tensor, padded: bool = True) -> PrefillView:
        """What HF's modules write the prompts of rows placed in `slots` through (`padded`: any
        row is left-padded by `pad`)."""
        return PrefillView(self, slots, pad, padded)


class PrefillView:
    """Duck-types what HF's modules call on a cache in the prompt forward: `update` (the prompt's
    keys go into the static cache, at the given slots; attention runs over the prompt alone) and
    the sizes mask creation asks for (a fresh prompt: no offset, keys as long as the queries), so
    that a forward without an explicit mask takes SDPA's causal path (flash)."""

    def __init__(self, cache: StaticCache, slots: torch.Tensor, pad: torch.Tensor, padded: bool = True):
        self.cache, self.slots, self.pad, self.padded = cache, slots, pad, padded

    def mask(self, width: int) -> torch.Tensor | None:
        """What the forward attends with: None when no row is padded (the usual case, prompts of one
        width: HF then takes SDPA's causal path, flash attention), else the band."""
        return self.band(width) if self.padded else None

    def band(self, width: int) -> torch.Tensor:
        """Causal band over the left-padded prompt, [rows, 1, width, width]; padding sees itself."""
        slots = torch.arange(width, device=self.pad.device)
        causal = slots[None, :] <= slots[:, None]  # [query, key]
        visible = causal[None] & (slots[None, None, :] >= self.pad[:, None, None])
        visible |= torch.eye(width, dtype=torch.bool, device=self.pad.device)
        return visible[:, None]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        width = key.shape[2]
        self.cache.k[layer_idx][self.slots, :, :width] = key
        self.cache.v[layer_idx][self.slots, :, :width] = value
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0
