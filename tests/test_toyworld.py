"""The toy world: deterministic videos, labelled captions, a faithful scorer, working checkpoints."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from toyworld import families, grammar, score
from toyworld.scene import ATTRIBUTES, clip_seed, make_clip, sample_scene
from toyworld.shards import write_shards


def test_same_seed_gives_the_same_video_and_ground_truth():
    scene_a, mp4_a = make_clip(123)
    scene_b, mp4_b = make_clip(123)
    scene_c, mp4_c = make_clip(124)
    assert mp4_a == mp4_b and scene_a == scene_b
    assert mp4_a != mp4_c
    assert mp4_a[4:8] == b"ftyp"  # a real mp4 container


def test_clips_decode_to_the_requested_frames_with_decord():
    from pipeline.frames import read_frames

    _, mp4 = make_clip(5)
    frames, meta = read_frames(mp4, num_frames=8)
    assert frames.shape == (8, 64, 64, 3) and frames.dtype == np.uint8
    assert meta["total_frames"] == 16 and meta["indices"][0] == 0 and meta["indices"][-1] == 15


def test_shards_hold_video_and_truth_pairs_and_are_deterministic(tmp_path):
    uri = f"file://{tmp_path}/bucket/toy"
    shards = write_shards(uri, videos=5, seed=9, shard_size=2)
    assert [s.rsplit("/", 1)[-1] for s in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    first = (tmp_path / "bucket/toy/shard-000000.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        names = tar.getnames()
        assert names == ["toy9_000000.mp4", "toy9_000000.json", "toy9_000001.mp4", "toy9_000001.json"]
        meta = json.loads(tar.extractfile("toy9_000001.json").read())
        mp4 = tar.extractfile("toy9_000001.mp4").read()
    scene, expected = make_clip(clip_seed(9, 1))
    assert mp4 == expected and meta["scene"] == scene.to_json()
    write_shards(f"file://{tmp_path}/again", videos=5, seed=9, shard_size=2)
    assert (tmp_path / "again/shard-000000.tar").read_bytes() == first


@pytest.mark.parametrize("family", families.FAMILIES)
def test_caption_labels_line_up_with_tokens(family):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(families.model_dir(family, "target"))
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sample_scene(rng)
        caption = grammar.make_caption(scene, rng, float(rng.choice(grammar.FILLER_LEVELS)))
        enc = tok(caption.text, return_offsets_mapping=True)
        labels = grammar.token_labels(caption, enc["offset_mapping"])
        pieces = [tok.decode([i]).strip() for i in enc["input_ids"]]
        anchors = [p for p, lab in zip(pieces, labels) if lab == "anchor"]
        assert anchors == caption.anchor_words()  # every anchor word is exactly one anchor token
        assert not {p.lower() for p, lab in zip(pieces, labels) if lab == "filler"} & grammar.ANCHOR_WORDS
        assert grammar.labelled(caption.text).spans == caption.spans


def test_filler_entropy_dials_phrasing_variety_and_never_touches_anchors():
    rng = np.random.default_rng(1)
    scene = sample_scene(rng)
    fixed = {grammar.make_caption(scene, rng, 0.0).text for _ in range(50)}
    loose = {grammar.make_caption(scene, rng, 1.0).text for _ in range(50)}
    middle = {grammar.make_caption(scene, rng, 0.5).text for _ in range(50)}
    assert len(fixed) == 1 and len(loose) > len(middle) > 1
    for text in fixed | loose | middle:
        assert score.parse_caption(text) == scene.attributes()
    with pytest.raises(ValueError, match="filler_entropy"):
        grammar.make_caption(scene, rng, 1.5)


def test_scorer_round_trips_ground_truth_captions_to_full_accuracy():
    rng = np.random.default_rng(2)
    scenes = [sample_scene(rng) for _ in range(300)]
    captions = [grammar.make_caption(s, rng, float(rng.choice(grammar.FILLER_LEVELS))).text for s in scenes]
    result = score.score(captions, [s.attributes() for s in scenes])
    assert result["attr_acc"] == 1.0 and result["exact"] == 1.0


def test_scorer_counts_malformed_truncated_and_contradictory_captions_as_wrong():
    rng = np.random.default_rng(3)
    scene = sample_scene(rng)
    text = grammar.make_caption(scene, rng, 0.0).text
    truth = scene.attributes()
    truncated = text[: text.index(scene.size)]  # count survives, the rest is cut
    other_dir = next(d for d in grammar.ANCHOR_VOCAB["direction"] if d != scene.direction)
    contradictory = f"{text} It moved {other_dir}."
    bad = [None, "", "\x00\xff garbage", truncated, contradictory, 42]
    parsed = [score.parse_caption(t) for t in bad]
    assert all(p[a] is None for p in parsed[:3] for a in ATTRIBUTES)
    assert parsed[3]["count"] == truth["count"] and parsed[3]["shape"] is None
    assert parsed[4]["direction"] is None and parsed[4]["colour"] == truth["colour"]
    assert score.score(bad, [truth] * len(bad))["attr_acc"] < 0.3


@pytest.mark.parametrize("family", families.FAMILIES)
def test_shipped_checkpoints_load_offline_and_caption_held_out_videos(family, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from toyworld.families import greedy_captions, render_videos

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = families.model_dir(family, "target")
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    assert type(model).__name__ == {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                                    "llava_onevision": "LlavaOnevisionForConditionalGeneration"}[family]
    scenes, _, frames = render_videos(12, seed=77_001)  # a seed no training run draws from
    captions, _ = greedy_captions(processor, model, frames, grammar.PROMPT)
    assert score.score(captions, [s.attributes() for s in scenes])["attr_acc"] >= 0.9


def test_shipped_checkpoints_fit_the_size_budget():
    total = sum(f.stat().st_size for f in families.MODELS_DIR.rglob("*") if f.is_file())
    assert total < 20 * 2**20
    for family in families.FAMILIES:
        for role in families.ROLES:
            assert (families.model_dir(family, role) / "model.safetensors").exists()


def test_packed_vision_attention_matches_the_stock_forward():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from toyworld.families import render_videos
    from toyworld.train import packed_qwen_vision_attention

    path = families.model_dir("qwen2_5_vl", "draft")
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    _, _, frames = render_videos(3, seed=5)
    inputs = processor(text=[families.chat_text(processor, grammar.PROMPT)] * 3, videos=frames, return_tensors="pt")
    with torch.no_grad():
        stock = model(**inputs).logits
        with packed_qwen_vision_attention():
            packed = model(**inputs).logits
    torch.testing.assert_close(packed, stock, rtol=1e-5, atol=1e-5)


def test_evaluation_cli_writes_the_documented_json(tmp_path):
    from bench import evaluate

    out = tmp_path / "eval.json"
    evaluate.main(["--family", "llava_onevision", "--videos", "4", "--seed", "3", "--json", str(out)])
    result = json.loads(out.read_text())
    assert {"family", "videos", "seed", "target", "draft", "teacher_forced"} <= result.keys()
    assert 0 <= result["target"]["attr_acc"] <= 1 and 0 <= result["draft"]["attr_acc"] <= 1
    assert {"anchor_agreement", "filler_agreement"} <= result["teacher_forced"].keys()


@pytest.mark.parametrize("family, size, billions", [
    ("qwen2_5_vl", "32b", 33.45), ("qwen2_5_vl", "7b", 8.29), ("qwen2_5_vl", "3b", 3.75),
    ("llava_onevision", "7b", 8.03), ("llava_onevision", "0.5b", 0.894),
])
def test_real_size_speed_models_have_the_real_checkpoints_parameter_counts(family, size, billions):
    """The random-weight models of `bench.shapes` (built on the meta device here) must be the
    published sizes, vision tower and projector included, or their speed says nothing."""
    from transformers import AutoModelForImageTextToText

    from bench.shapes import real_config

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(real_config(family, size))
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, rel=0.005)
