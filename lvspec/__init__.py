"""LVSpec: batched speculative decoding for Video-LLMs, strict on visual anchors, loose on fillers.

Plain PyTorch + transformers; no Ray, no storage. See `engine.Engine` and `engine.generate`.
"""

from lvspec.config import MODES, SpecConfig
from lvspec.engine import Engine, RowOutput, generate
from lvspec.feed import RowFeed
from lvspec.replay import Replay
from lvspec.stats import RowStats

__all__ = ["MODES", "Engine", "Replay", "RowFeed", "RowOutput", "RowStats", "SpecConfig", "generate"]
