"""LVSpec: batched speculative decoding for Video-LLMs, strict on visual anchors, loose on fillers.

Plain PyTorch + transformers; no Ray, no storage. See `engine.generate`.
"""

from lvspec.config import MODES, SpecConfig
from lvspec.engine import RowOutput, RowStats, generate

__all__ = ["MODES", "RowOutput", "RowStats", "SpecConfig", "generate"]
