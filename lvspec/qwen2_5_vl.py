"""Qwen2.5-VL: video features spliced into the prompt, M-RoPE (3-D) position ids for the prompt."""

from __future__ import annotations

import torch

from lvspec.adapter import Prompt, left_pad_rows, padded, video_prompt_ids, video_tokens, without_video_tokens


class Qwen25VLAdapter:
    family = "qwen2_5_vl"
    capturable = False  # HF's get_rope_index reads the video grid on the host

    @staticmethod
    def vision(model) -> torch.nn.Module:
        return model.model.visual

    @staticmethod
    def fewer_frames(model, row: dict, stride: int) -> dict:
        """Every `stride`-th temporal patch (frame pair; the first kept): the patches are stored time
        first, each time step's tokens one block, and the kept steps lie `stride` times further
        apart in time (M-RoPE's temporal positions follow seconds)."""
        grid = row["video_grid_thw"]
        if grid.shape[0] != 1:
            raise ValueError(f"a row with one video expected, got {grid.shape[0]} video grids")
        t, h, w = (int(x) for x in grid[0])
        pixels = row["pixel_values_videos"]
        kept = pixels.view(t, h * w, -1)[::stride]
        tokens = video_tokens(row, model.config.video_token_id)
        drop = (t - kept.shape[0]) * (tokens // t)
        seconds = torch.as_tensor(row["second_per_grid_ts"]).reshape(-1) * stride
        return {"pixel_values_videos": kept.reshape(-1, pixels.shape[-1]).contiguous(),
                "video_grid_thw": torch.tensor([[kept.shape[0], h, w]], dtype=grid.dtype),
                "second_per_grid_ts": seconds,
                **without_video_tokens(row, model.config.video_token_id, drop,
                                       ("input_ids", "attention_mask", "mm_token_type_ids"))}

    def prompt(self, model, rows: list[dict]) -> Prompt:
        cfg = model.config
        device = model.device
        ids, mask = video_prompt_ids(model, rows, "Qwen2.5-VL")
        mm_types = left_pad_rows(rows, "mm_token_type_ids", 0).to(device)
        grid = torch.cat([r["video_grid_thw"] for r in rows]).to(device)
        pixels = torch.cat([r["pixel_values_videos"] for r in rows]).to(device, model.dtype)
        seconds = torch.cat([torch.as_tensor(r["second_per_grid_ts"]).reshape(-1) for r in rows]).to(device)

        embeds = model.get_input_embeddings()(ids)
        video = torch.cat(model.model.get_video_features(pixels, grid).pooler_output)
        video_mask = ids == cfg.video_token_id
        embeds = embeds.masked_scatter(video_mask[..., None], video.to(embeds.dtype))
        positions, _ = model.model.get_rope_index(
            ids, mm_token_type_ids=mm_types, video_grid_thw=grid, second_per_grid_ts=seconds, attention_mask=mask)
        # Text after the prompt continues at (largest position so far) + 1 on all three axes.
        next_position = positions.masked_fill(~mask.bool()[None], -1).amax(dim=(0, 2)) + 1
        # Generated text has equal positions on all three axes: decoding needs only this 1-D start.
        return Prompt(embeds, (mask == 0).sum(-1), positions, video_mask, next_position, ids[:, -1], padded(rows))


ADAPTER = Qwen25VLAdapter()
