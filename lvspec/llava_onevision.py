"""LLaVA-OneVision: pooled video features spliced into the prompt, 1-D positions.

Its sizes ship embeddings padded to different lengths; the engine compares ids only in the range
both share (`adapter.shared_vocab`).
"""

from __future__ import annotations

import torch

from lvspec.adapter import Prompt, video_prompt_ids


class LlavaOnevisionAdapter:
    family = "llava_onevision"

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
            out = model.model.get_video_features(
                pixels, vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy).pooler_output
            for i, feats in zip(members, out):
                features[i] = feats
        embeds = embeds.masked_scatter(video_mask[..., None], torch.cat(features).to(embeds.dtype))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return Prompt(embeds, (mask == 0).sum(-1), positions, video_mask, mask.sum(-1), ids[:, -1])


ADAPTER = LlavaOnevisionAdapter()
