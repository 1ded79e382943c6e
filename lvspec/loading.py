"""Loading a target: its checkpoint's weights (whole, or this rank's shard under tensor
parallelism, `parallel.py`) or random weights of its shapes (`dummy.py`).

    target = loading.load(path, world, dtype, device, load_format)
"""

from __future__ import annotations

import torch.distributed as dist

from lvspec import dummy, parallel

LOAD_FORMATS = ("auto", "dummy")  # auto: the checkpoint's weights; dummy: random weights of its shapes (dummy.py)


def load(path: str, world: int, dtype, device: str | None = None, load_format: str = "auto"):
    """A target from `path` (local dir or HF id): whole when `world` is 1, else this rank's shard
    of it (`parallel.start` first). `load_format="dummy"` builds it from its config with random weights on
    `device` (needed then) instead of reading weights."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    if world > 1 and (not dist.is_initialized() or dist.get_world_size() != world):
        raise RuntimeError(f"loading a target over {world} ranks needs a started {world}-rank group (parallel.start)")
    if load_format == "dummy":
        if device is None:
            raise ValueError("load_format='dummy' builds the model on a device: pass device")
        return dummy.model(path, dtype, device, world)
    if world == 1:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
        return (model.to(device) if device else model).eval()
    from transformers.distributed import DistributedConfig

    parallel.check_shardable(AutoConfig.from_pretrained(path).get_text_config(), world)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, distributed_config=DistributedConfig(tp_plan=parallel.PLAN, tp_size=world)).eval()
    tp = parallel.of(model)
    if tp is None or tp.world != world:
        raise RuntimeError(f"{path}: transformers did not shard this model over {world} ranks")
    return model
