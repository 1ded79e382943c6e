"""What the engine needs from a model family, and the check that a target and draft belong together.

Everything family-specific (prompt embedding with the video spliced in, position ids, vocab
padding) lives in one module per family: `qwen2_5_vl.py`, `llava_onevision.py`; `families.py`
finds a model's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Prompt:
    """A left-padded batch of prompts, embedded, ready for the decoder stack."""

    embeds: torch.Tensor  # [B, P, H]
    pad: torch.Tensor  # [B] left-padding slots
    position_ids: torch.Tensor  # [B, P] or [3, B, P] (M-RoPE)
    video_mask: torch.Tensor  # [B, P] bool: slots holding video tokens
    next_position: torch.Tensor  # [B] position id of the first generated token
    last_token: torch.Tensor  # [B] id of the prompt's last token (text, never padding: prompts are left-padded)
    padded: bool = True  # any row left-padded (known on the host: prompts of one width need no mask)

    def light(self) -> Prompt:
        """The prompt without its embeddings (once its keys are in a cache, only their shape is read)."""
        b, p, _ = self.embeds.shape
        return dataclasses.replace(self, embeds=self.embeds.new_empty(b, p, 0))


class Adapter(Protocol):
    family: str
    capturable: bool  # prompt() reads nothing back to the host (it can be captured as a CUDA graph)

    def prompt(self, model, rows: list[dict]) -> Prompt: ...

    def vision(self, model) -> torch.nn.Module: ...  # the vision encoder (Engine.compile_prefill)

    # The fields of a one-video row (processor output, on the host) that change when its video keeps
    # every `stride`-th frame: what the draft reads with SpecConfig.draft_frame_stride.
    def fewer_frames(self, model, row: dict, stride: int) -> dict: ...


def _left_pad(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
    width = max(t.shape[-1] for t in tensors)
    return torch.stack([torch.nn.functional.pad(t, (width - t.shape[-1], 0), value=value) for t in tensors])


DRAFT_FIELD = "draft:"  # a row's fields that the draft reads instead of the plain ones (`draft_row`)


def draft_row(row: dict) -> dict:
    """The row as the draft sees it: its "draft:" fields (a thinned video) in place of the plain ones."""
    own = {k[len(DRAFT_FIELD):]: v for k, v in row.items() if k.startswith(DRAFT_FIELD)}
    if not own:
        return row
    return {**{k: v for k, v in row.items() if not k.startswith(DRAFT_FIELD)}, **own}


def with_draft_video(adapter: Adapter, draft, row: dict, stride: int) -> dict:
    """The row plus the draft's own video ("draft:" fields): every `stride`-th frame (1: the row)."""
    if stride == 1:
        return row
    return {**row, **{DRAFT_FIELD + k: v for k, v in adapter.fewer_frames(draft, row, stride).items()}}


def without_video_tokens(row: dict, video_token_id: int, drop: int, fields: tuple[str, ...]) -> dict:
    """The row's per-token `fields` ([1, L]) without the last `drop` of its video tokens (a video's
    tokens are one run of one id; which of them go does not matter, only how many)."""
    ids = row["input_ids"].reshape(-1)
    video = ids == video_token_id
    keep = ~video | (video.cumsum(0) <= int(video.sum()) - drop)
    return {f: row[f].reshape(1, -1)[:, keep] for f in fields if f in row}


def video_tokens(row: dict, video_token_id: int) -> int:
    return int((row["input_ids"] == video_token_id).sum())


def rows_on(rows: list[dict], device, dtype) -> list[dict]:
    """Rows with their tensors moved to `device` once, pixels in `dtype`, for both models' prompts
    (the adapters' own `.to` are then no-ops). Done before any model work is queued: a copy from
    pageable host memory waits for everything queued before it on its stream."""
    def on(key, v):
        if not isinstance(v, torch.Tensor):
            return v
        return v.to(device, dtype) if key.removeprefix(DRAFT_FIELD).startswith("pixel_values") else v.to(device)
    return [{k: on(k, v) for k, v in row.items()} for row in rows]


def padded(rows: list[dict]) -> bool:
    """Whether a group's prompts differ in length (left padding), from the host's shapes."""
    return len({r["input_ids"].shape[-1] for r in rows}) > 1


def left_pad_rows(rows: list[dict], key: str, value: int = 0) -> torch.Tensor:
    """Stack a per-row [1, L] field of processor outputs into [B, P], padded on the left."""
    return _left_pad([r[key].reshape(-1) for r in rows], value)


def check_video_rows(model, rows: list[dict], family: str | None = None) -> None:
    """Every row holds a video (pixels and video tokens); on the host's copies of the ids (on the
    GPU, looking would wait for the stream)."""
    for i, row in enumerate(rows):
        if "pixel_values_videos" not in row or not bool((row["input_ids"] == model.config.video_token_id).any()):
            raise ValueError(f"row {i} has no video: {family or model.config.model_type} rows need "
                             "pixel_values_videos and video tokens")


def video_prompt_ids(model, rows: list[dict], family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input_ids and attention_mask [B, P] on the model's device; every row must hold a video."""
    cfg = model.config
    check_video_rows(model, [r for r in rows if r["input_ids"].device.type == "cpu"], family)
    ids = left_pad_rows(rows, "input_ids", cfg.get_text_config().pad_token_id or 0).to(model.device)
    return ids, left_pad_rows(rows, "attention_mask", 0).to(model.device)


def text_config(model):
    return model.config.get_text_config()


def check_pair(target, draft, target_tokenizer=None, draft_tokenizer=None) -> None:
    """Fail clearly unless target and draft share a family and a tokenizer."""
    t_family, d_family = target.config.model_type, draft.config.model_type
    if t_family != d_family:
        raise ValueError(f"target and draft must be one model family: target is {t_family!r}, draft {d_family!r}")
    same_ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    for name in same_ids:
        a, b = getattr(text_config(target), name, None), getattr(text_config(draft), name, None)
        if a != b:
            raise ValueError(f"target and draft tokenizers differ: {name} is {a} vs {b}")
    for name in ("video_token_id", "video_token_index"):
        a, b = getattr(target.config, name, None), getattr(draft.config, name, None)
        if a != b:
            raise ValueError(f"target and draft tokenizers differ: {name} is {a} vs {b}")
    if target_tokenizer is not None and draft_tokenizer is not None:
        if target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
            raise ValueError("target and draft tokenizers differ (vocabularies are not identical)")


def shared_vocab(target, draft) -> int:
    """Ids below this mean the same token to both models (larger embeddings are padding rows)."""
    return min(text_config(target).vocab_size, text_config(draft).vocab_size)
