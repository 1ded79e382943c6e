"""Random-weight models of a checkpoint's shapes: the load format `dummy` (vLLM's name and meaning).

    model = dummy.model("bench/models/llava_onevision-7b", torch.bfloat16, "cuda:0")
    tokenizer = dummy.tokenizer("bench/models/llava_onevision-7b")

Real-size speed is measured without weights that can be fetched: the model is built from its
`config.json` directly on its device, every weight drawn from N(0, 0.02), and run by exactly the
code that runs a real checkpoint. Over several ranks each rank builds only its shard, with the
plan `loading.load` loads checkpoints with. Its captions are noise; the tokenizer beside such a
config (the toy one) is padded so that every id the model can emit reads back as a word.
"""

from __future__ import annotations

import copy
import fnmatch
import json
from pathlib import Path

import torch

from lvspec import parallel

SEED = 0  # the same config gives the same weights on every build


def model(path: str | Path, dtype: torch.dtype, device: str | torch.device, world: int = 1, seed: int = SEED):
    """The model of `path`'s config.json with random weights on `device`: whole when `world` is 1,
    else this rank's shard (a started `world`-rank group: `parallel.start`)."""
    from transformers import AutoConfig

    return from_config(AutoConfig.from_pretrained(path), dtype, device, world, seed)


def from_config(cfg, dtype: torch.dtype, device: str | torch.device, world: int = 1, seed: int = SEED):
    """As `model`, from a config object."""
    from transformers import AutoModelForImageTextToText

    device = torch.device(device)
    torch.manual_seed(seed)
    if world == 1:
        with torch.device(device):
            built = AutoModelForImageTextToText.from_config(cfg, dtype=dtype)
        return built.eval()
    parallel.check_shardable(cfg.get_text_config(), world)
    with torch.device("meta"):
        built = AutoModelForImageTextToText.from_config(cfg, dtype=dtype)
    _shard(built, cfg, device, world)
    built.to_empty(device=device)
    with torch.no_grad():
        for p in built.parameters():
            (p.to_local() if hasattr(p, "to_local") else p).normal_(0.0, 0.02)
        # Buffers computed at construction (rotary frequencies) are lost on meta: take them from a
        # one-layer model of the same config.
        ref = _buffers(cfg, dtype, device)
        for name, buf in built.named_buffers():
            if name in ref and ref[name].shape == buf.shape:
                buf.copy_(ref[name])
    if parallel.of(built) is None:
        raise RuntimeError(f"transformers did not shard this {cfg.model_type} model over {world} ranks")
    return built.eval()


def _shard(built, cfg, device: torch.device, world: int) -> None:
    """Lay `built` (on meta) out as this rank's shard: transformers' tensor-parallel styles for the
    language model, with `parallel.PLAN`'s overrides (embeddings and LM head whole)."""
    from torch.distributed.device_mesh import init_device_mesh
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    prefix = "model.language_model."
    styles = {prefix + k: v for k, v in cfg.get_text_config().base_model_tp_plan.items()
              if not k.startswith("embed_tokens")}
    styles.update(parallel.PLAN)
    plan = {}
    for name, module in built.named_modules():
        style = next((s for pattern, s in styles.items() if fnmatch.fnmatchcase(name, pattern)), None)
        if style is None or style == "replicate":
            continue
        plan[name] = style
        plan.update({f"{name}.{p}": style for p, _ in module.named_parameters(recurse=False)})
    apply_tensor_parallelism(built, init_device_mesh(device.type, (world,)), plan)


def _buffers(cfg, dtype, device) -> dict:
    """The buffers of a one-layer model of `cfg` (what construction computes, e.g. rotary frequencies)."""
    from transformers import AutoModelForImageTextToText

    small = copy.deepcopy(cfg)
    text = small.get_text_config()
    text.num_hidden_layers, text.layer_types = 1, ["full_attention"]
    vision = small.vision_config
    for name in ("depth", "num_hidden_layers"):
        if hasattr(vision, name):
            setattr(vision, name, 1)
    if hasattr(vision, "fullatt_block_indexes"):
        vision.fullatt_block_indexes = [0]
    with torch.device(device):
        return dict(AutoModelForImageTextToText.from_config(small, dtype=dtype).named_buffers())


NOISE = "\u0120~{}"  # a padding word: byte-level " ~<id>"


def tokenizer(path: str | Path, vocab_size: int | None = None):
    """The tokenizer beside `path`'s config, its vocabulary padded with words " ~<id>" up to the
    model's `vocab_size` (default: the config's), so every id a random model emits decodes. Special
    tokens keep their ids (the tokenizer is built from tokenizer.json as it stands)."""
    from tokenizers import Tokenizer
    from transformers import AutoConfig, PreTrainedTokenizerFast

    path = Path(path)
    if vocab_size is None:
        vocab_size = AutoConfig.from_pretrained(path).get_text_config().vocab_size
    spec = json.loads((path / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    # Added tokens not in the model's vocabulary are numbered after it when loaded: put them in it
    # at their ids, so that padding the vocabulary moves none of them.
    vocab.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
    used = set(vocab.values())
    vocab.update({NOISE.format(i): i for i in range(vocab_size) if i not in used})
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
