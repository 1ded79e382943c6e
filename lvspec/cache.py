"""A static KV cache in which every batch row writes at its own offset.

Rows of a batch accept different numbers of draft tokens per cycle. Each row keeps its own
committed length; a forward writes its new keys at `length + j`, and a rejected draft slot is
simply overwritten by the next forward. Keys of a row are valid on [pad, length), so the
attention mask is a plain per-row band: no holes, nothing copied on rejection.
"""

from __future__ import annotations

import torch


class RaggedKVCache:
    """Duck-types the one method HF attention layers call on a cache: `update`."""

    def __init__(self, pad: torch.Tensor, length: torch.Tensor, capacity: int):
        self.pad = pad.clone()  # [B] left-padding slots before each row's prompt
        self.length = length.clone()  # [B] committed slots (padding included)
        self.capacity = capacity
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self._write = None  # [B, q] slot of every new query, set by `begin`
        self._span = 0

    def begin(self, q: int) -> torch.Tensor:
        """Prepare a forward of q new tokens per row; returns its boolean mask [B, 1, q, span]."""
        self._write = self.length[:, None] + torch.arange(q, device=self.length.device)
        self._span = int(self.length.max()) + q
        if self._span > self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} exceeded ({self._span})")
        slots = torch.arange(self._span, device=self.length.device)
        visible = (slots <= self._write[..., None]) & (slots >= self.pad[:, None, None])
        visible |= slots == self._write[..., None]  # padding queries see themselves: no empty rows
        return visible[:, None]

    def positions(self) -> torch.Tensor:
        """Cache slot of every query of the current forward, [B, q]."""
        return self._write

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx not in self.keys:
            b, h, _, d = key.shape
            self.keys[layer_idx] = key.new_zeros(b, h, self.capacity, d)
            self.values[layer_idx] = value.new_zeros(b, h, self.capacity, value.shape[-1])
        index = self._write[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[-1])
        self.keys[layer_idx].scatter_(2, index, key)
        self.values[layer_idx].scatter_(2, index.expand(-1, -1, -1, value.shape[-1]), value)
        return self.keys[layer_idx][:, :, :self._span], self.values[layer_idx][:, :, :self._span]

    def advance(self, n: torch.Tensor | int) -> None:
        """Commit n more slots per row (tokens the rows keep from the last forward)."""
        self.length += n

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished rows stop costing work)."""
        self.pad, self.length = self.pad[rows], self.length[rows]
        for store in (self.keys, self.values):
            for i, t in store.items():
                store[i] = t.index_select(0, rows)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.length.max())
