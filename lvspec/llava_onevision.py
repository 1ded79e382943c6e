"""LLaVA-OneVision: pooled video features spliced into the prompt, 1-D positions.

Its sizes ship embeddings padded to different lengths; the engine compares ids only in the range
both share (`adapter.shared_vocab`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lvspec.adapter import Prompt, padded, video_prompt_ids, video_tokens, without_video_tokens


class LlavaOnevisionAdapter:
    family = "llava_onevision"
    capturable = True  # its prompt needs no host read: a CUDA graph can hold it (engine prompt_graphs)

    @staticmethod
    def vision(model) -> torch.nn.Module:
        return model.model.vision_tower

    @staticmethod
    def fewer_frames(model, row: dict, stride: int) -> dict:
        """Every `stride`-th frame (the first kept): a video's tokens are frames x pooled patches
        + one newline, so the frames dropped take their patches' tokens with them."""
        pixels = row["pixel_values_videos"]  # [1, frames, C, H, W]
        frames, kept = pixels.shape[1], pixels[:, ::stride]
        tokens = video_tokens(row, model.config.video_token_id)
        if pixels.shape[0] != 1 or (tokens - 1) % frames:
            raise ValueError(f"a row with one video expected ({tokens} video tokens, pixels {tuple(pixels.shape)})")
        drop = (frames - kept.shape[1]) * ((tokens - 1) // frames)
        return {"pixel_values_videos": kept.contiguous(),
                **without_video_tokens(row, model.config.video_token_id, drop, ("input_ids", "attention_mask"))}

    def prompt(self, model, rows: list[dict]) -> Prompt:
        cfg = model.config
        device = model.device
        ids, mask = video_prompt_ids(model, rows, "LLaVA-OneVision")
        embeds = model.get_input_embeddings()(ids)
        video_mask = ids == cfg.video_token_id
        # Videos of one frame count share one vision call; rows may differ in frame count.
        features: list[torch.Tensor | None] = [None] * len(rows)
        by_frames: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_frames.setdefault(row["pixel_values_videos"].shape[1], []).append(i)
        for members in by_frames.values():
            pixels = torch.cat([rows[i]["pixel_values_videos"] for i in members]).to(device, model.dtype)
            for i, feats in zip(members, video_features(model, pixels)):
                features[i] = feats
        embeds = embeds.masked_scatter(video_mask[..., None], torch.cat(features).to(embeds.dtype))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return Prompt(embeds, (mask == 0).sum(-1), positions, video_mask, mask.sum(-1), ids[:, -1], padded(rows))


def video_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """HF's `get_video_features(...).pooler_output` ([videos, frames x pooled patches + 1, H]: the
    vision tower's chosen layer(s), the projector, 2x2 bilinear pooling per frame, the newline
    embedding), with the pooling run on a channels-last view: the same interpolation, but HF's
    contiguous NCHW copy takes a CUDA kernel parallel over the 14x14 output positions alone (22 ms
    a 16-frame row at the 7B's 3584 channels, on an H200), channels-last one over every output."""
    cfg, m = model.config, model.model
    videos, frames = pixels.shape[:2]
    flat = pixels.flatten(0, 1)
    torch._dynamo.maybe_mark_dynamic(flat, 0)  # a compiled tower (compile_prefill): one graph for any group size
    states = m.vision_tower(flat, output_hidden_states=True).hidden_states
    layers = cfg.vision_feature_layer
    hidden = states[layers] if isinstance(layers, int) else torch.cat([states[i] for i in layers], -1)
    if cfg.vision_feature_select_strategy == "default":
        hidden = hidden[:, 1:]
    feats = m.multi_modal_projector(hidden)
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    grid = feats.view(videos * frames, side, side, -1).permute(0, 3, 1, 2)  # NCHW shape, channels-last memory
    pooled = F.interpolate(grid, size=[math.ceil(side / 2)] * 2, mode="bilinear")
    feats = pooled.permute(0, 2, 3, 1).reshape(videos, -1, feats.shape[-1])
    return torch.cat([feats, m.image_newline[None, None].expand(videos, 1, -1).to(feats.dtype)], 1)


ADAPTER = LlavaOnevisionAdapter()
