"""generation.draft_frame_stride: the draft watches every n-th frame of each video (Qwen2.5-VL: every
n-th frame pair), so its prompt, and every draft step's read of its cache, is shorter; the target
watches every frame. Toy pairs, float64 where tokens are compared (as test_lvspec.py)."""

import dataclasses

import pytest
import torch

from conftest import ROOT
from lvspec import Engine, SpecConfig, memory
from lvspec.adapter import draft_row, with_draft_video
from lvspec.families import adapter_for
from lvspec.state import margin
from pipeline.config import config_hash, load_config, spec_config
from test_lvspec import FAMILIES, hf_greedy, make_rows
from toyworld import families, grammar
from toyworld.families import load_pair, render_videos


def kept_frames(family: str, video, stride: int):
    """The frames a draft watching every `stride`-th frame sees: single frames (LLaVA-OneVision), or
    Qwen2.5-VL's temporal patches of two frames."""
    if family == "qwen2_5_vl":
        pairs = torch.arange(len(video)).view(-1, 2)[::stride].flatten().numpy()
        return video[pairs]
    return video[::stride]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stride", [2, 3])
def test_a_thinned_row_is_what_the_processor_makes_of_the_kept_frames(family, stride):
    """The draft's fields of a row equal the HF processor's output for the kept frames alone (token
    ids, masks, pixels, the video grid), the kept frame pairs stride times further apart in time."""
    processor, _, draft = load_pair(family)
    _, _, frames = render_videos(1, seed=5, num_frames=12)
    text = families.chat_text(processor, grammar.PROMPT)
    row = processor(text=[text], videos=[frames[0]], return_tensors="pt")
    thin = draft_row(with_draft_video(adapter_for(draft), draft, row, stride))
    expected = processor(text=[text], videos=[kept_frames(family, frames[0], stride)], return_tensors="pt")
    assert thin["input_ids"].shape[-1] < row["input_ids"].shape[-1]
    for key, value in expected.items():
        if key == "second_per_grid_ts":  # the processor has no frame rate here: spacing kept, times stride
            assert torch.equal(torch.as_tensor(thin[key]), torch.as_tensor(row[key]) * stride)
        else:
            assert torch.equal(torch.as_tensor(thin[key]), torch.as_tensor(value)), key
    assert draft_row(row) is row and with_draft_video(adapter_for(draft), draft, row, 1) is row


@pytest.mark.parametrize("family", FAMILIES)
def test_a_draft_watching_every_other_frame_keeps_sd_greedy_and_lvspec_decoding(family):
    """sd with a thinned draft is still the target's greedy output (the draft only proposes), rows
    of different frame counts in one batch and streamed through fewer slots; every draft prompt
    was shorter than its target prompt; lvspec decodes with its loose rule at work."""
    processor, target, draft = load_pair(family, dtype=torch.float64)
    rows = make_rows(processor, [8, 4, 6, 8, 5, 7])
    expected = hf_greedy(processor, target, rows)
    widths = []
    for slots in (6, 3):
        engine = Engine(target, draft, SpecConfig(mode="sd", k=4, max_new_tokens=48, draft_frame_stride=2), slots=slots)
        real = engine.prompt_group

        def prompt_group(st, group, index, real=real):  # the engine's own prefill, its prompts' widths noted
            prompt, draft_prompt, first = real(st, group, index)
            widths.append((prompt.embeds.shape[1], draft_prompt.embeds.shape[1]))
            return prompt, draft_prompt, first

        engine.prompt_group = prompt_group
        assert [r.tokens for r in engine.generate(rows)] == expected, slots
        st = engine._state  # the draft's cache sized for its own (shorter) prompts, in 128-token steps
        room = 48 + margin(engine.k_max)
        assert st.D.capacity == -(-(max(d for _, d in widths) + room) // 128) * 128 <= st.T.capacity
    assert widths and all(d < t for t, d in widths)
    assert memory.slot_bytes(engine.cycle.T, engine.cycle.D, 256, 4, 128) < memory.slot_bytes(
        engine.cycle.T, engine.cycle.D, 256, 4)
    lv = SpecConfig(mode="lvspec", k=4, theta=0.45, max_new_tokens=48, draft_frame_stride=2)
    out = Engine(target, draft, lv, slots=6).generate(rows)
    assert all(len(r.tokens) > 1 for r in out)
    assert sum(r.stats.accepted_loose + r.stats.accepted_shift for r in out) > 0


def test_the_stride_is_a_caption_setting_checked_before_any_work():
    base = ROOT / "jobs/configs/local.yaml"
    default = load_config(base)
    assert spec_config(default.generation).draft_frame_stride == 1
    halved = load_config(base, ["generation.draft_frame_stride=2"])
    assert spec_config(halved.generation).draft_frame_stride == 2
    # It changes what lvspec keeps, so it is hashed; at its default a series begun before it keeps its hash.
    assert config_hash(halved) != config_hash(default)
    assert config_hash(load_config(base, ["generation.draft_frame_stride=1"])) == config_hash(default)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="draft_frame_stride"):
            dataclasses.replace(SpecConfig(), draft_frame_stride=bad)
