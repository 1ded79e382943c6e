"""Generation settings, validated up front so that bad values fail before any model work."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from lvspec.draft_length import Costs

MODES = ("ar", "sd", "lvspec")
SETTINGS_FILE = "lvspec.json"  # LVSpec settings a target checkpoint may ship (theta, relevance probe)
RELEVANCE_KEYS = ("relevance_layers", "relevance_heads", "relevance_weights")  # the relevance probe, set together
SHIPPED_KEYS = ("theta", *RELEVANCE_KEYS)  # what lvspec.json may set


def shipped_settings(model_dir: str | Path) -> dict:
    """The SpecConfig fields of the `lvspec.json` beside a local checkpoint ({} if it ships none)."""
    path = Path(model_dir) / SETTINGS_FILE
    found = json.loads(path.read_text()) if path.exists() else {}
    return {key: found[key] for key in SHIPPED_KEYS if found.get(key) is not None}


@dataclass(frozen=True)
class SpecConfig:
    """How to decode. `sd` is exact greedy speculative decoding; `lvspec` loosens it on fillers."""

    mode: str = "lvspec"
    k: int | str = "auto"  # draft tokens proposed per cycle, or "auto": each row its own, every cycle (draft_length)
    k_max: int = 10  # the longest draft "auto" may choose
    # k=auto's cost table (draft_length.Costs, or a mapping of its fields in ms): None measures it once
    # per engine; pinned, the same video gets the same caption on any machine (see draft_length).
    k_costs: Costs | None = None
    theta: float = 0.2  # relevance >= theta marks a visual anchor: verified strictly
    alpha: float = 0.25  # loose rule: accept a filler d if p(d) >= alpha * p(target's choice)
    top_k: int = 0  # loose rule, alternative: accept a filler d in the target's top-k (0: off)
    shift_window: int = 1  # position-shift tolerance: d may match the target's choice this many slots away
    gate: bool = True  # relevance gate on; off = loose acceptance everywhere (ablation)
    loose: bool = True  # loose and shift acceptance on; off = strict verification
    relevance_layers: tuple[int, ...] | None = None  # target layers averaged into relevance; None: all
    relevance_heads: tuple[tuple[int, int], ...] | None = None  # or exactly these (layer, head) pairs
    relevance_weights: tuple[float, ...] | None = None  # per relevance_heads pair; None: equal weights
    max_new_tokens: int = 64
    # The draft watches every n-th frame of each video (the first kept; Qwen2.5-VL: every n-th frame
    # pair): its prompt, and so every draft step's read of its cache, is about n times shorter. The
    # target sees every frame and verifies as before (exact modes stay exact); acceptance may drop.
    draft_frame_stride: int = 1
    stop_token_ids: tuple[int, ...] | None = None  # None: the target's generation_config eos ids
    cuda_graphs: bool = True  # on CUDA, capture each decoding stage once and replay it (off: run eagerly)
    # Continuous batching: prefill rows entering freed slots on a second CUDA stream while the
    # other slots keep decoding (compute-bound prefill beside memory-bound decoding); off: decoding
    # waits for each prefill. Not under tensor parallelism (its collectives keep one order).
    overlap_prefill: bool = True
    # Capture a group's prompt forwards as CUDA graphs (per input shapes, groups of up to 4 rows), so
    # that launching them costs the decoding loop no host time. Off: on an H200 the engine gained 4 %
    # and the job nothing (BENCHMARKS, third sitting).
    prompt_graphs: bool = False
    # Compile the prefill's modules (both models' vision encoders and prompt forwards) with
    # torch.compile (inductor; batch dimensions dynamic): fused kernels where eager HF spends a
    # fifth of the prefill's GPU time on elementwise ops. The first rows wait for the compile
    # (about a minute); its numerics are float rounding away from eager.
    compile_prefill: bool = False
    # Rows enter free slots in groups of at most this many prompt tokens (left-padded), so that a
    # prefill's activations stay bounded whatever the batch (a 7B's MLP at 128 rows x 3.2k tokens
    # alone would want 15 GB).
    prefill_tokens: int = 32768
    # A verify's weights run over each decoding row's own [last, drafts] only, packed (rounded up to
    # a few sizes, one CUDA graph each), not over every slot's K + 1 tokens: idle slots and a
    # loosened row's drafts past its own K cost no FLOPs where the verify is compute-bound (large
    # batch). Off: every slot at the cycle's K (the same tokens up to float rounding).
    pack_verify: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.k, str) and self.k.strip().isdigit():
            object.__setattr__(self, "k", int(self.k))
        if self.k != "auto" and (not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1):
            raise ValueError(f"k (draft length) must be 'auto' or an integer >= 1, got {self.k!r}")
        if self.k_costs is not None:
            object.__setattr__(self, "k_costs", Costs.of(self.k_costs))
        if isinstance(self.prefill_tokens, bool) or not isinstance(self.prefill_tokens, int) or self.prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be an integer >= 1, got {self.prefill_tokens!r}")
        if isinstance(self.draft_frame_stride, bool) or not isinstance(self.draft_frame_stride, int) \
                or self.draft_frame_stride < 1:
            raise ValueError(f"draft_frame_stride must be an integer >= 1, got {self.draft_frame_stride!r}")
        if not isinstance(self.k_max, int) or self.k_max < 1:
            raise ValueError(f"k_max (longest automatic draft) must be an integer >= 1, got {self.k_max!r}")
        if not 0.0 <= self.theta <= 1.0:
            raise ValueError(f"theta (relevance threshold) must be in [0, 1], got {self.theta!r}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha (loose ratio) must be in (0, 1], got {self.alpha!r}")
        if self.top_k < 0 or self.shift_window < 0:
            raise ValueError("top_k and shift_window must be >= 0")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.relevance_layers is not None:
            object.__setattr__(self, "relevance_layers", tuple(int(i) for i in self.relevance_layers))
        if self.relevance_heads is not None:
            if self.relevance_layers is not None:
                raise ValueError("relevance_heads and relevance_layers exclude each other: set one")
            try:
                pairs = tuple((int(layer), int(head)) for layer, head in self.relevance_heads)
            except (TypeError, ValueError):
                raise ValueError(f"relevance_heads must be (layer, head) pairs, got {self.relevance_heads!r}") from None
            if len(set(pairs)) != len(pairs):
                raise ValueError(f"relevance_heads names a (layer, head) pair twice: {self.relevance_heads!r}")
            object.__setattr__(self, "relevance_heads", pairs)
        if self.relevance_weights is not None:
            try:
                weights = tuple(float(w) for w in self.relevance_weights)
            except (TypeError, ValueError):
                raise ValueError(f"relevance_weights must be numbers, got {self.relevance_weights!r}") from None
            if self.relevance_heads is None or len(weights) != len(self.relevance_heads):
                raise ValueError("relevance_weights needs relevance_heads, one weight per (layer, head) pair")
            if min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(f"relevance_weights must be >= 0 and not all 0, got {self.relevance_weights!r}")
            object.__setattr__(self, "relevance_weights", weights)

    @property
    def longest_draft(self) -> int:
        """The largest K any cycle may draft."""
        return self.k_max if self.k == "auto" else self.k

    @property
    def loosened(self) -> bool:
        """Whether any non-exact acceptance can happen (theta = 0 gates every slot)."""
        return self.mode == "lvspec" and self.loose and not (self.gate and self.theta == 0.0)

    def as_dict(self) -> dict:
        return {f.name: v.as_dict() if isinstance(v := getattr(self, f.name), Costs) else v for f in fields(self)}
