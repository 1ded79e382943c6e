"""Real-size benchmarks through the product: random-weight models (`model.load_format: dummy`), replayed
acceptance in the job (`generation.replay`), static batching to measure continuous batching against,
and the real-shape model directories the project ships (bench/models)."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from conftest import ROOT
from pipeline.config import load_config

TOY = ROOT / "toyworld/models"


def test_a_dummy_tokenizer_decodes_every_id_and_keeps_its_special_tokens():
    from transformers import AutoTokenizer

    from lvspec import dummy

    real = AutoTokenizer.from_pretrained(ROOT / "bench/models/llava_onevision-7b")
    padded = dummy.tokenizer(ROOT / "bench/models/llava_onevision-7b")
    assert len(padded) == 152064  # the real config's vocabulary, of which the toy tokenizer has 524
    specials = set(real.all_special_ids)
    for token in ("<video>", "<image>", "<|im_end|>", "<|endoftext|>"):
        assert padded.convert_tokens_to_ids(token) == real.convert_tokens_to_ids(token)
    sample = list(range(0, 152064, 37)) + [152063]
    assert all(padded.decode([i], skip_special_tokens=True) for i in sample if i not in specials)
    text = "a red circle moves left"
    assert padded.decode(real(text)["input_ids"]) == real.decode(real(text)["input_ids"])


def test_a_dummy_model_has_the_checkpoints_shapes_and_reproducible_random_weights():
    from transformers import AutoModelForImageTextToText

    from lvspec import dummy, loading

    path = TOY / "qwen2_5_vl-target"
    trained = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    fake = loading.load(str(path), 1, torch.float32, "cpu", load_format="dummy")
    again = dummy.model(path, torch.float32, "cpu")
    shapes = {n: p.shape for n, p in trained.named_parameters()}
    assert {n: p.shape for n, p in fake.named_parameters()} == shapes
    weight = "model.language_model.layers.0.self_attn.q_proj.weight"
    w = dict(fake.named_parameters())[weight]
    assert not torch.equal(w, dict(trained.named_parameters())[weight])
    assert torch.equal(w, dict(again.named_parameters())[weight])
    assert 0.015 < float(w.std()) < 0.025  # drawn from N(0, 0.02)
    with pytest.raises(ValueError, match="load_format"):
        loading.load(str(path), 1, torch.float32, "cpu", load_format="random")


def test_the_shipped_real_shape_directories_are_what_the_shape_table_generates(tmp_path):
    from transformers import AutoConfig, AutoProcessor

    from bench.shapes import TEXT, write

    shipped = ROOT / "bench/models"
    names = {p.name for p in shipped.iterdir() if p.is_dir()}
    assert names == {f"{family}-{size}" for family, sizes in TEXT.items() for size in sizes}
    assert {"llava_onevision-7b", "llava_onevision-0.5b", "llava_onevision-72b", "qwen2_5_vl-32b",
            "qwen2_5_vl-7b", "qwen2_5_vl-3b", "qwen2_5_vl-72b"} <= names
    for family, sizes in TEXT.items():
        for size, (hidden, inter, layers, heads, kv, vocab) in sizes.items():
            fresh = write(family, size, tmp_path)
            for f in fresh.iterdir():
                assert (shipped / fresh.name / f.name).read_text() == f.read_text(), f"{fresh.name}/{f.name} is stale"
            text = AutoConfig.from_pretrained(shipped / fresh.name).get_text_config()
            assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_attention_heads,
                    text.num_key_value_heads, text.vocab_size) == (hidden, inter, layers, heads, kv, vocab)
            assert sum(f.stat().st_size for f in fresh.iterdir()) < 40_000  # no weights
    processor = AutoProcessor.from_pretrained(shipped / "llava_onevision-7b")
    assert (processor.video_processor.size.height, processor.num_image_tokens) == (384, 729)


def test_static_batches_place_rows_only_into_an_empty_batch_and_decode_the_same_tokens():
    from lvspec import Engine, SpecConfig
    from toyworld import families, grammar

    processor, target, draft = families.load_pair("llava_onevision")
    _, _, frames = families.render_videos(7, seed=3)
    rows = families.engine_rows(processor, frames, grammar.PROMPT)
    engine = Engine(target, draft, SpecConfig(mode="sd", k=4, max_new_tokens=24), slots=3)
    streamed = engine.generate(rows)
    streamed_prefills = engine.timing["prefills"]
    static = engine.generate(rows, static=True)
    assert [o.tokens for o in static] == [o.tokens for o in streamed]
    assert engine.timing["prefills"] == 3  # rows 0-2, 3-5, 6: one prefill per batch
    assert streamed_prefills > 3  # continuous: slots refill as rows finish


def _job(tmp_path, name: str, overrides: list[str]):
    from pipeline.job import run

    cfg = load_config(ROOT / "jobs/configs/local.yaml", [
        f"job_id={name}", f"source.uri={tmp_path / 'videos'}", f"output.uri={tmp_path / 'out'}",
        "model.load_format=dummy", "generation.replay=bench/replay_patterns.json", "generation.max_new_tokens=300",
        "generation.k=6", "caption.batch_size=4", "caption.slots=4", "decode.batch_size=4", "decode.max_side=256",
        *overrides])
    summary = run(cfg)
    rows = [r for f in sorted((tmp_path / "out" / name).glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    return summary, rows


def test_a_job_with_dummy_weights_and_replayed_acceptance_writes_every_row(tmp_path, ray_cluster):
    """Random-weight toy models and replayed acceptance through the whole job: every video is written
    once with a (noise) caption whose length is the replayed one of its video_id, acceptance is the
    recording's, and rows and summary say it was replayed; static batching (here with a compiled
    prefill) writes the same rows."""
    from lvspec.replay import lognormal_lengths
    from pipeline.caption import replay_key
    from pipeline.job import human_summary
    from toyworld.shards import write_shards

    write_shards(str(tmp_path / "videos"), videos=10, seed=5, shard_size=5)
    summary, rows = _job(tmp_path, "dummy", [])
    lengths = lognormal_lengths()
    assert sorted(r["video_id"] for r in rows) == [f"toy5_{i:06d}" for i in range(10)]
    for r in rows:
        assert r["error"] is None and r["caption"] and r["finished_by"] == "length"
        assert r["num_tokens"] == min(lengths[replay_key(r) % len(lengths)], 300)
        assert r["load_format"] == "dummy" and r["acceptance_replayed"] is True and r["audit_caption"] is None
        assert r["accepted_exact"] + r["accepted_loose"] + r["accepted_shift"] + r["corrections"] + r["bonus"] \
            == r["num_tokens"]
    # The toy lvspec recording keeps 6.4 of 10 drafts a cycle; a random pair on its own keeps ~none.
    assert summary["caption"]["mean_accepted_length"] > 3.5
    assert summary["load_format"] == "dummy" and "replay_patterns.json" in summary["acceptance_replayed"]
    assert "BENCHMARK" in human_summary(summary) and "captions are noise" in human_summary(summary)

    # Static batches, and the prefill compiled inside the replica's decoding thread: the same rows.
    _, static = _job(tmp_path, "dummy-static", ["caption.batching=static", "generation.compile_prefill=true"])
    assert {r["video_id"]: r["num_tokens"] for r in static} == {r["video_id"]: r["num_tokens"] for r in rows}
    assert all(r["error"] is None and r["caption"] for r in static)


def test_a_replay_file_without_the_targets_family_fails_before_ray_starts(tmp_path):
    patterns = tmp_path / "qwen_only.json"
    patterns.write_text(json.dumps({"families": {"qwen2_5_vl": {"lvspec": [[3, 4]], "sd": [[1, 2]]}}}))
    out = subprocess.run([sys.executable, "-m", "jobs.caption", "--config", "jobs/configs/local.yaml",
                          f"generation.replay={patterns}", f"source.uri={tmp_path}", f"output.uri={tmp_path / 'o'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "generation.replay" in out.stderr and "llava_onevision" in out.stderr
    assert "Ray" not in out.stderr


def test_the_gpu_benchmark_reads_the_steady_state_of_finish_times():
    from bench.pipeline_gpu import steady

    finished = [(float(t), 100) for t in range(11)]  # one row a second, 100 tokens each
    s = steady(finished)
    assert (s["start"], s["end"], s["rows"]) == (1.0, 9.0, 8)
    assert s["tokens_per_s"] == pytest.approx(100.0) and s["rows_per_s"] == pytest.approx(1.0)
    assert Path(ROOT / "bench/gpu_pipeline.sh").exists()
