"""How many slots fit: what a decode state takes per slot at a capacity, against what is free.

`Engine(slots="auto")` sizes each new state so: the memory free now (the device's, plus what
torch's allocator holds unused; on a CPU, the RAM available) less a reserve (RESERVE_FRACTION of
the device, and one bounded prefill's activations), over the bytes a slot takes: both models'
keys and values at the state's capacity, and the transients of the widest decoding forward (a
verify over k_max + 1 tokens: logits, one layer's attention scores, activations), counted from
the shapes. Under tensor parallelism each rank plans its own shard and the fewest slots win.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lvspec.state import CATCH_UP

RESERVE_FRACTION = 0.10  # of the device's memory, kept free for what is not counted (allocator slack, graphs)
GIB = 2**30


@dataclass(frozen=True)
class Plan:
    slots: int
    capacity: int
    slot_bytes: int
    free_bytes: int
    reserve_bytes: int
    cap: int  # the most slots asked for

    @property
    def memory_bound(self) -> bool:
        """Fewer slots than asked for: memory was the limit."""
        return self.slots < self.cap

    def describe(self) -> str:
        limit = "memory-bound" if self.memory_bound else f"capped at {self.cap}"
        return (f"{self.slots} slots of {self.slot_bytes / GIB:.3f} GiB at capacity {self.capacity} tokens "
                f"({self.free_bytes / GIB:.1f} GiB free, {self.reserve_bytes / GIB:.1f} GiB kept free; {limit})")


def device_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes for this process on `device`: within its memory fraction on a GPU."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        free += torch.cuda.memory_reserved(device) - allocated
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        if fraction is not None:
            total = min(total, int(fraction(device) * total))
            free = min(free, total - allocated)
        return max(free, 0), total
    info = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, value = line.split(":", 1)
                info[name] = int(value.split()[0]) * 1024
    except OSError:
        pass
    page = os.sysconf("SC_PAGE_SIZE")
    total = info.get("MemTotal") or os.sysconf("SC_PHYS_PAGES") * page
    return info.get("MemAvailable") or os.sysconf("SC_AVPHYS_PAGES") * page, total


def _shapes(decoder) -> tuple[int, int, int, int, int, int, int]:
    layer = decoder.layers[0]
    intermediate = layer.gate_up.shape[0] // 2
    return (len(decoder.layers), decoder.heads, decoder.kv_heads, decoder.head_dim, decoder.hidden, intermediate,
            decoder.head.shape[0])


def cache_bytes(decoder, capacity: int) -> int:
    """One slot's keys and values at `capacity`."""
    layers, _, kv, hd, *_ = _shapes(decoder)
    return 2 * layers * kv * capacity * hd * decoder.dtype.itemsize


def forward_bytes(decoder, capacity: int, q: int) -> int:
    """One slot's transients in a decoding forward of q tokens: its logits (and the verifier's float32
    copy), one layer's attention scores and probabilities (float32), masks, activations."""
    _, heads, kv, _, hidden, intermediate, vocab = _shapes(decoder)
    item = decoder.dtype.itemsize
    return (q * vocab * (item + 4) + 2 * heads * q * capacity * 4 + q * capacity * (1 + heads // kv) * item
            + q * (6 * hidden + 3 * intermediate) * item)


def slot_bytes(T, D, capacity: int, k_max: int, draft_capacity: int | None = None) -> int:
    """What one slot of a state takes: both caches (the draft's at `draft_capacity`, default the
    target's), and the widest forward's transients."""
    widest = forward_bytes(T, capacity, k_max + 1)
    if D is None:
        return cache_bytes(T, capacity) + widest
    draft_capacity = draft_capacity or capacity
    widest = max(widest, forward_bytes(D, draft_capacity, max(2, CATCH_UP)))
    return cache_bytes(T, capacity) + cache_bytes(D, draft_capacity) + widest


def prefill_bytes(T, D, tokens: int) -> int:
    """Activations of one bounded prefill (`prefill_tokens` prompt tokens through the larger model)."""
    def one(decoder):
        _, _, _, _, hidden, intermediate, _ = _shapes(decoder)
        return tokens * (8 * hidden + 3 * intermediate) * decoder.dtype.itemsize
    return max(one(T), one(D) if D is not None else 0)


def plan(T, D, capacity: int, k_max: int, prefill_tokens: int, cap: int, device, tp=None,
         free: tuple[int, int] | None = None, draft_capacity: int | None = None) -> Plan:
    """The slots a state of `capacity` gets: as many as fit, at most `cap`, at least one (a state
    that cannot hold one row fails loudly when it is allocated). `free`: (free, total) bytes, else
    measured."""
    free_bytes, total = free if free is not None else device_memory(device)
    reserve = int(RESERVE_FRACTION * total) + prefill_bytes(T, D, prefill_tokens)
    per = slot_bytes(T, D, capacity, k_max, draft_capacity)
    slots = max(1, min(cap, (free_bytes - reserve) // per))
    if tp is not None:
        slots = tp.smallest(slots)
    return Plan(int(slots), capacity, per, free_bytes, reserve, cap)
