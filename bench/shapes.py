"""Real checkpoints' shapes: one table, and model directories generated from it (no weights).

    python -m bench.shapes --out bench/models          # rewrite the shipped directories

Real checkpoints can't be fetched here, so real-size speed is measured on random-weight models
of real shapes (`model.load_format: dummy`). Each directory holds what such a model needs and no
weights: the real size's config.json, with the toy tokenizer's special-token ids (the toy
tokenizer, chat template and lvspec.json beside it), and the family's real video processor at
its default resolution, so that the job decodes and prompts exactly as for the real checkpoint.
`bench.realsize` and `bench.tensor_parallel` build their models from the same table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from toyworld import families

# Text shapes of the real checkpoints' configs (hidden, intermediate, layers, heads, kv heads, vocab).
TEXT = {
    "qwen2_5_vl": {"72b": (8192, 29568, 80, 64, 8, 152064), "32b": (5120, 27648, 64, 40, 8, 152064),
                   "7b": (3584, 18944, 28, 28, 4, 152064), "3b": (2048, 11008, 36, 16, 2, 151936)},
    "llava_onevision": {"72b": (8192, 29568, 80, 64, 8, 152064), "7b": (3584, 18944, 28, 28, 4, 152064),
                        "0.5b": (896, 4864, 24, 14, 2, 151936)},
}
TIED = {("qwen2_5_vl", "3b"), ("llava_onevision", "0.5b")}
VISION = {
    "qwen2_5_vl": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
                   "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "tokens_per_second": 2,
                   "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu"},
    "llava_onevision": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 26,
                        "num_attention_heads": 16, "image_size": 384, "patch_size": 14},
}


def real_config(family: str, size: str):
    """The toy target's config (token ids, family settings) with the real size's shapes."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(families.model_dir(family, "target"), local_files_only=True)
    hidden, inter, layers, heads, kv, vocab = TEXT[family][size]
    text = cfg.get_text_config()
    for key, value in {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
                       "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
                       "head_dim": hidden // heads, "max_position_embeddings": 32768}.items():
        setattr(text, key, value)
    if hasattr(text, "layer_types"):
        text.layer_types = ["full_attention"] * layers
    tied = (family, size) in TIED
    cfg.tie_word_embeddings = text.tie_word_embeddings = tied
    for key, value in VISION[family].items():
        setattr(cfg.vision_config, key, value)
    if family == "qwen2_5_vl":
        cfg.vision_config.out_hidden_size = hidden
        text.rope_parameters = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
    return cfg


def real_processor(family: str):
    """The toy tokenizer with the family's real video processor at its default resolution."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(families.model_dir(family, "target"), local_files_only=True)
    vp = type(processor.video_processor)
    if family == "qwen2_5_vl":
        processor.video_processor = vp(patch_size=14, merge_size=2, temporal_patch_size=2, cap_pixels_per_frame=True,
                                       size={"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28})
    else:
        processor.video_processor = vp(size={"height": 384, "width": 384})
        processor.num_image_tokens = (384 // 14) ** 2
    return processor


def relevance_layers(layers: int) -> list[int]:
    """A probe of four layers spread over the stack, as a calibrated gate reads a few."""
    return sorted({0, layers // 3, 2 * layers // 3, layers - 1})


def write(family: str, size: str, out: str | Path) -> Path:
    """The directory of one real size (config, tokenizer, processor, lvspec.json; no weights)."""
    path = Path(out) / f"{family}-{size}"
    path.mkdir(parents=True, exist_ok=True)
    cfg = real_config(family, size)
    cfg.save_pretrained(path)
    # The stamp of the transformers that wrote it is not part of a shape: without it the shipped
    # directories stay what any supported transformers release generates.
    config = json.loads((path / "config.json").read_text())
    config.pop("transformers_version", None)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    real_processor(family).save_pretrained(path)
    layers = cfg.get_text_config().num_hidden_layers
    settings = {"theta": 0.5, "relevance_layers": relevance_layers(layers),
                "note": "random-weight benchmark model: theta and probe only set the relevance probe's cost"}
    (path / "lvspec.json").write_text(json.dumps(settings, indent=1) + "\n")
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/models")
    args = ap.parse_args(argv)
    for family, sizes in TEXT.items():
        for size in sizes:
            print(f"wrote {write(family, size, args.out)}")


if __name__ == "__main__":
    main()
