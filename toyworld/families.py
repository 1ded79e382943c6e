"""The toy model pairs: tokenizer, processor and small configs in the real HF architectures.

Everything here builds *new* models for training; inference code loads the saved checkpoints
through AutoProcessor / AutoModelForImageTextToText like any real checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toyworld import grammar
from toyworld.scene import FRAME_SIZE

FAMILIES = ("qwen2_5_vl", "llava_onevision")
ROLES = ("target", "draft")
MODELS_DIR = Path(__file__).parent / "models"  # edition 1: the embedded default of `make run` and the tests
MODELS_V2_DIR = Path(__file__).parent / "models_v2"  # edition 2 (multi-token fillers, two-event clips)


def models_dir(edition: int = 1) -> Path:
    """Where the shipped toy pairs of `edition` live."""
    if edition not in (1, 2):
        raise ValueError(f"edition must be 1 or 2, got {edition!r}")
    return MODELS_DIR if edition == 1 else MODELS_V2_DIR

BASE_VOCAB_SIZE = 768  # bytes + merges; every grammar word ends up one token
PATCH = 8  # vision patch side in pixels, for 64 x 64 toy frames

SPECIAL_TOKENS = {
    "qwen2_5_vl": ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>"],
    "llava_onevision": ["<|im_start|>", "<|im_end|>", "<image>", "<video>"],
}

# Chat templates in the shape of each family's real one (system prompt left out: the toy world has none).
_QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_LLAVA_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'video' %}<video>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_TEMPLATES = {"qwen2_5_vl": _QWEN_TEMPLATE, "llava_onevision": _LLAVA_TEMPLATE}


@dataclass(frozen=True)
class Size:
    """A toy model's shape. The draft is smaller, and sees less: that is what makes it weaker on anchors."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vocab_multiple: int  # embedding rows are padded to a multiple of this, as real checkpoints are


SIZES = {
    ("qwen2_5_vl", "target"): Size(192, 4, 6, 2, 512, 96, 3, 3, 64),
    ("qwen2_5_vl", "draft"): Size(96, 2, 3, 1, 256, 48, 1, 2, 64),
    ("llava_onevision", "target"): Size(192, 4, 6, 2, 512, 96, 3, 3, 64),
    # LLaVA-OneVision sizes differ in embedding padding; the toy pair does too.
    ("llava_onevision", "draft"): Size(96, 2, 3, 1, 256, 48, 1, 2, 128),
}


def model_dir(family: str, role: str, edition: int = 1) -> Path:
    return models_dir(edition) / f"{family}-{role}"


def train_bpe(seed: int = 0, sentences: int = 20000, edition: int = 1):
    """Train the shared byte-level BPE (Qwen2's pre-tokenizer) on the grammar; returns vocab, merges."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"], show_progress=False,
    )
    tok.train_from_iterator(grammar.corpus(np.random.default_rng(seed), sentences, edition), trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def build_tokenizer(family: str, vocab: dict, merges: list):
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[family]})
    return tok


def build_processor(family: str, tokenizer):
    """The family's real HF processor class, configured for 64 x 64 toy frames."""
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        pixels = {"shortest_edge": FRAME_SIZE * FRAME_SIZE, "longest_edge": FRAME_SIZE * FRAME_SIZE}
        common = dict(patch_size=PATCH, temporal_patch_size=2, merge_size=2, size=pixels)
        return Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(**common),
            video_processor=Qwen2VLVideoProcessor(**common, do_sample_frames=False, cap_pixels_per_frame=False),
            tokenizer=tokenizer, chat_template=CHAT_TEMPLATES[family],
        )
    if family == "llava_onevision":
        from transformers import (LlavaOnevisionImageProcessor, LlavaOnevisionProcessor,
                                  LlavaOnevisionVideoProcessor)

        side = {"height": FRAME_SIZE, "width": FRAME_SIZE}
        return LlavaOnevisionProcessor(
            image_processor=LlavaOnevisionImageProcessor(size=side, image_grid_pinpoints=[[FRAME_SIZE, FRAME_SIZE]]),
            video_processor=LlavaOnevisionVideoProcessor(size=side, do_sample_frames=False),
            tokenizer=tokenizer, chat_template=CHAT_TEMPLATES[family],
            num_image_tokens=(FRAME_SIZE // PATCH) ** 2, vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_1",
        )
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def build_config(family: str, role: str, tokenizer):
    """A small config of the family's real architecture for `role` (target or draft)."""
    size = SIZES[(family, role)]
    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=_padded(len(tokenizer), size.vocab_multiple), hidden_size=size.hidden,
        intermediate_size=size.intermediate, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, max_position_embeddings=1024,
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        tie_word_embeddings=False,
    )
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        head_dim = size.hidden // size.heads
        quarter = head_dim // 2 // 4  # M-RoPE splits the rotary half into (t, h, w) sections
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                                   "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter]}
        return Qwen2_5_VLConfig(
            text_config=text,
            vision_config=dict(
                depth=size.vision_layers, hidden_size=size.vision_hidden, intermediate_size=2 * size.vision_hidden,
                num_heads=size.vision_heads, patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2,
                out_hidden_size=size.hidden, window_size=4 * PATCH, fullatt_block_indexes=[size.vision_layers - 1],
            ),
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
            tie_word_embeddings=False,
        )
    if family == "llava_onevision":
        from transformers import LlavaOnevisionConfig

        text["model_type"] = "qwen2"
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
        return LlavaOnevisionConfig(
            text_config=text,
            vision_config=dict(
                model_type="siglip_vision_model", hidden_size=size.vision_hidden,
                intermediate_size=2 * size.vision_hidden, num_hidden_layers=size.vision_layers,
                num_attention_heads=size.vision_heads, image_size=FRAME_SIZE, patch_size=PATCH, vision_use_head=False,
            ),
            image_token_index=ids("<image>"), video_token_index=ids("<video>"),
            vision_feature_select_strategy="full", vision_feature_layer=-1,
            image_grid_pinpoints=[[FRAME_SIZE, FRAME_SIZE]], vision_aspect_ratio="anyres_max_1",
            tie_word_embeddings=False,
        )
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def chat_text(processor, prompt: str, answer: str | None = None) -> str:
    """The chat-formatted text for one video and prompt; with `answer`, the full training text."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text if answer is None else text + answer + "<|im_end|>"


def load_pair(family: str, models_dir: Path | str = MODELS_DIR, dtype=None):
    """(processor, target, draft) of a shipped toy pair, loaded offline like any checkpoint."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = dtype or torch.float32

    def load(role):
        path = Path(models_dir) / f"{family}-{role}"
        return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True).eval()

    processor = AutoProcessor.from_pretrained(Path(models_dir) / f"{family}-target", local_files_only=True)
    return processor, load("target"), load("draft")


def render_videos(n: int, seed: int, num_frames: int = 8, edition: int = 1):
    """n fresh clips from `seed`: scenes, mp4 bytes, and the frames the pipeline would sample."""
    from pipeline.frames import read_frames
    from toyworld.scene import clip_seed, make_clip

    clips = [make_clip(clip_seed(seed, i), edition=edition) for i in range(n)]
    return [s for s, _ in clips], [b for _, b in clips], [read_frames(b, num_frames)[0] for _, b in clips]


def engine_rows(processor, frames, prompt: str) -> list[dict]:
    """One processor output per video: the rows lvspec.generate takes."""
    text = chat_text(processor, prompt)
    return [processor(text=[text], videos=[f], return_tensors="pt") for f in frames]


def greedy_captions(processor, model, frames, prompt: str, batch_size: int = 32, max_new_tokens: int = 48):
    """Greedy captions with HF generate, batched; returns (texts, token id lists incl. EOS)."""
    import torch

    texts, token_ids = [], []
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    for lo in range(0, len(frames), batch_size):
        chunk = frames[lo:lo + batch_size]
        inputs = processor(text=[chat_text(processor, prompt)] * len(chunk), videos=chunk,
                           return_tensors="pt", padding=True, padding_side="left")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=tok.pad_token_id)
        for row in out[:, inputs["input_ids"].shape[1]:].tolist():
            row = row[:row.index(eos) + 1] if eos in row else row
            token_ids.append(row)
            texts.append(tok.decode(row, skip_special_tokens=True))
    return texts, token_ids
