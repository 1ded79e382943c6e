"""The model families lvspec decodes, by their configs' model_type (one module each)."""

from __future__ import annotations

from lvspec import llava_onevision, qwen2_5_vl
from lvspec.adapter import Adapter

ADAPTERS = {"qwen2_5_vl": qwen2_5_vl.ADAPTER, "llava_onevision": llava_onevision.ADAPTER}


def adapter_for(model) -> Adapter:
    """The adapter of a model's family, by its config's model_type."""
    family = getattr(model.config, "model_type", None)
    if family not in ADAPTERS:
        raise ValueError(f"unsupported model family {family!r}; supported: {sorted(ADAPTERS)}")
    return ADAPTERS[family]
