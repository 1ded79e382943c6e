"""One rank of a caption replica: its models loaded and the Engine over them. The caption stage
(rank 0, `pipeline/caption.py`) and its tensor-parallel peers (`pipeline/peers.py`) both load
through here; nothing here knows Ray.
"""

from __future__ import annotations

from lvspec.config import shipped_settings
from pipeline.config import GenerationConfig, ModelConfig, replica_dtype, spec_config


def load_engine(model: ModelConfig, generation: GenerationConfig, num_cpus: float, slots: int | str,
                max_slots: int | None = None, rank: int = 0, world: int = 1):
    """One rank of a replica: its part of the target (all of it when `world` is 1; a started
    tensor-parallel group otherwise), the whole draft, and the Engine over them (`slots`: N or
    "auto", at most `max_slots`); with the tokenizer. With `model.load_format: dummy` both are
    random-weight models of their configs' shapes."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from lvspec import Engine, dummy, loading
    from pipeline.models import resolve

    torch.set_num_threads(max(1, int(num_cpus) // world))
    cuda = torch.cuda.is_available()
    device = f"cuda:{rank}" if cuda else "cpu"
    torch_dtype = getattr(torch, replica_dtype(model, cuda))
    fake = model.load_format == "dummy"
    target_dir = resolve(model.target, model.cache_dir, model.storage_options)
    target = loading.load(target_dir, world, torch_dtype, device if world == 1 or fake else None, model.load_format)
    small = None
    if model.draft and generation.mode != "ar":
        draft_dir = resolve(model.draft, model.cache_dir, model.storage_options)
        small = (dummy.model(draft_dir, torch_dtype, device) if fake else
                 AutoModelForImageTextToText.from_pretrained(draft_dir, dtype=torch_dtype).to(device).eval())
    spec = spec_config(generation, shipped_settings(target_dir))
    tokenizer = dummy.tokenizer(target_dir) if fake else AutoTokenizer.from_pretrained(target_dir)
    return Engine(target, small, spec, slots=slots, max_slots=max_slots), tokenizer
