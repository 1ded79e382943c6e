"""The Ray Data job end to end: a real S3 endpoint (moto server), real Ray workers, the toy models.

One job runs over a bucket that mixes good toy shards with every kind of bad input; the tests
below each check one promise against the Parquet it wrote.
"""

import io
import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, kill_job, base_overrides
from pipeline.config import ConfigError, load_config
from toyworld.scene import encode_mp4, make_clip, render, sample_scene
from toyworld.score import parse_caption
from toyworld.shards import write_shards

GOOD = 8  # toy videos in the two good shards


def read_output(options: dict, uri: str) -> list[dict]:
    import s3fs

    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True, use_listings_cache=False)
    rows = []
    for path in sorted(p for p in fs.find(uri.removeprefix("s3://")) if p.endswith(".parquet")):
        with fs.open(path, "rb") as f:
            rows += pq.read_table(f).to_pylist()
    return rows


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def no_frames_mp4() -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        c.start_encoding()
    return buf.getvalue()


def huge_mp4(width=3840, height=2160, frames=4) -> bytes:
    video = np.full((frames, height, width, 3), 30, np.uint8)
    for t in range(frames):
        video[t, height // 3: height // 2, width // 4 + 40 * t: width // 2 + 40 * t] = (220, 40, 40)
    return encode_mp4(video)


BAD = {
    "bad_truncated": lambda good: good[: len(good) // 2],
    "bad_zero": lambda good: b"",
    "bad_random": lambda good: np.random.default_rng(0).bytes(6000),
    "bad_noframes": lambda good: no_frames_mp4(),
}


@pytest.fixture(scope="module")
def e2e(s3, ray_cluster):
    """Two good shards, a shard of bad inputs, a shard repeating a good video_id; one job over all."""
    import s3fs

    from pipeline.job import run

    fs = s3fs.S3FileSystem(**s3)
    write_shards("s3://videos/e2e", videos=GOOD, seed=7, shard_size=4, storage_options=s3)
    _, good = make_clip(123)
    members = [(f"{name}.mp4", make(good)) for name, make in BAD.items()]
    members += [("notes.txt", b"not a video"), ("big_4k.mp4", huge_mp4())]
    # AV1, which decord's FFmpeg lacks: decoded with PyAV's (dav1d)
    members += [("av1.mp4", encode_mp4(render(sample_scene(np.random.default_rng(1)), 8), codec="libsvtav1"))]
    fs.pipe("videos/e2e/shard-000002.tar", _tar(members))
    fs.pipe("videos/e2e/shard-000003.tar", _tar([("toy7_000001.mp4", good)]))  # same id, other shard
    # k=auto with a pinned cost table (drafting pays): each row's K from its own acceptance, not from
    # the timings of a busy two-core CPU (where a verify can measure as dearer than its tokens).
    pinned = "generation.k_costs={draft_step_ms: 1.0, verify_0_ms: 10.0, verify_1_ms: 10.5, verify_max_ms: 13.0}"
    cfg = load_config(ROOT / "jobs/configs/s3.yaml",
                      base_overrides(s3, "s3://videos/e2e", "s3://captions/e2e", "e2e") + [pinned])
    summary = run(cfg)
    rows = read_output(s3, "s3://captions/e2e/e2e")
    return summary, rows, {r["video_id"]: r for r in rows}


def test_every_good_video_is_captioned_once_and_matches_the_ground_truth(e2e):
    _, rows, by_id = e2e
    ids = [r["video_id"] for r in rows]
    assert len(ids) == len(set(ids))
    good = [by_id[f"toy7_{i:06d}"] for i in range(GOOD)]
    assert all(r["error"] is None and r["caption"] for r in good)
    correct = 0
    for r in good:
        truth = json.loads(r["truth"])["scene"]
        parsed = parse_caption(r["caption"])
        correct += all(parsed[a] == truth[a] for a in parsed)
    assert correct >= GOOD - 1  # the toy target reads ~99.5% of attributes right


def test_rows_carry_the_documented_columns_and_consistent_counters(e2e):
    _, rows, _ = e2e
    required = {"video_id", "source_uri", "shard", "caption", "num_tokens", "mode", "target_model", "draft_model",
                "num_cycles", "target_forwards", "draft_forwards", "mean_accepted_length", "accepted_exact",
                "accepted_loose", "accepted_shift", "rejected_anchor", "num_frames", "decode_ms", "generate_ms",
                "error", "config_hash", "job_id", "drafted", "mean_draft_length", "catch_ups", "slots", "k_costs",
                "decoder"}
    for r in rows:
        assert required <= r.keys() and r["job_id"] == "e2e" and r["mode"] == "lvspec"
        if r["error"] is None:
            assert r["num_frames"] == 8 and r["target_forwards"] == r["num_cycles"] + 1
            parts = r["accepted_exact"] + r["accepted_loose"] + r["accepted_shift"] + r["corrections"] + r["bonus"]
            assert parts == r["num_tokens"] > 0
            # k=auto, k_max 10 (K = 0 where a verify costs more than it yields: then the draft catches up)
            assert r["draft_forwards"] == 1 + r["drafted"] + r["catch_ups"] and 1 <= r["mean_draft_length"] <= 10
            assert json.loads(r["k_costs"])["verify_1_ms"] == 10.5 and r["slots"] == 4  # the pinned table, batch_size
            assert r["shard"].startswith("s3://videos/e2e/shard-") and r["source_uri"].startswith(r["shard"] + "#")


@pytest.mark.parametrize("video_id, message", [
    ("bad_truncated", "not a readable video"),
    ("bad_zero", "empty file"),
    ("bad_random", "not a readable video"),
    ("bad_noframes", "no video frames"),
    ("notes", "no video member"),
])
def test_bad_input_becomes_a_row_with_its_error(e2e, video_id, message):
    _, _, by_id = e2e
    assert message in by_id[video_id]["error"] and by_id[video_id]["caption"] is None


def test_a_video_decord_cannot_read_is_decoded_with_pyav_and_captioned(e2e):
    summary, _, by_id = e2e
    row = by_id["av1"]
    assert row["error"] is None and row["caption"] and row["decoder"] == "pyav" and row["num_frames"] == 8
    assert summary["decoded_with_pyav"] == 1 and by_id["toy7_000000"]["decoder"] == "decord"


def test_a_4k_clip_is_decoded_scaled_down_and_captioned(e2e):
    _, _, by_id = e2e
    row = by_id["big_4k"]
    assert row["error"] is None and row["caption"] and (row["width"], row["height"]) == (3840, 2160)


def test_a_video_id_in_two_shards_is_captioned_once(e2e):
    summary, rows, _ = e2e
    assert [r["video_id"] for r in rows].count("toy7_000001") == 1
    assert [d["video_id"] for d in summary["duplicates_skipped"]] == ["toy7_000001"]


def test_the_summary_accounts_for_every_row(e2e):
    summary, rows, _ = e2e
    assert summary["videos"] == len(rows) == GOOD + len(BAD) + 3  # + notes (no video member), 4k, AV1
    assert summary["ok"] == GOOD + 2 and summary["failed"] == len(BAD) + 1  # + the 4k and the AV1 videos
    assert summary["caption"]["tokens"] == sum(r["num_tokens"] or 0 for r in rows)
    assert summary["caption"]["mean_accepted_length"] > 1.5


def test_manifest_and_plain_files_sources_with_a_missing_object(s3, ray_cluster):
    import s3fs

    from pipeline.job import run

    fs = s3fs.S3FileSystem(**s3)
    for i in range(3):
        fs.pipe(f"videos/files/cam{i}/clip.mp4", make_clip(500 + i)[1])
    manifest = [{"video_id": f"m{i}", "uri": f"s3://videos/files/cam{i}/clip.mp4"} for i in range(3)]
    manifest.append({"video_id": "m_missing", "uri": "s3://videos/files/nowhere.mp4"})
    fs.pipe("videos/manifest.jsonl", "\n".join(json.dumps(m) for m in manifest).encode())
    for source, job in (("s3://videos/manifest.jsonl", "manifest"), ("s3://videos/files", "files")):
        cfg = load_config(ROOT / "jobs/configs/s3.yaml", base_overrides(s3, source, "s3://captions/more", job))
        run(cfg)
    by_id = {r["video_id"]: r for r in read_output(s3, "s3://captions/more/manifest")}
    assert sorted(by_id) == ["m0", "m1", "m2", "m_missing"]
    assert "object not found" in by_id["m_missing"]["error"]
    assert all(by_id[f"m{i}"]["caption"] for i in range(3))
    files = {r["video_id"]: r for r in read_output(s3, "s3://captions/more/files")}
    assert sorted(files) == ["cam0/clip", "cam1/clip", "cam2/clip"] and all(r["caption"] for r in files.values())


def test_a_killed_job_resumes_without_duplicates_or_losses(s3, tmp_path):
    import s3fs

    videos = 24
    write_shards("s3://videos/resume", videos=videos, seed=11, shard_size=2, storage_options=s3)
    args = [sys.executable, "-m", "jobs.caption", "--config", str(ROOT / "jobs/configs/s3.yaml"),
            *base_overrides(s3, "s3://videos/resume", "s3://captions/resume", "resume"), "caption.batch_size=2",
            "output.rows_per_file=2"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "first_run.log"
    with open(log, "w") as out:
        job = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True, use_listings_cache=False)
    deadline = time.time() + 600
    while time.time() < deadline and job.poll() is None:
        if any(p.endswith(".parquet") for p in fs.find("captions/resume/resume")):
            break  # the first committed file: kill now, mid-run
        time.sleep(0.1)
    assert job.poll() is None, f"the first run ended by itself (rc {job.returncode}):\n{log.read_text()[-3000:]}"
    kill_job(job)  # the driver and the local Ray cluster it started
    # A Ray worker outside the driver's process group may still finish a write for a moment:
    # take what the output holds once it has stopped changing.
    first, settled = read_output(s3, "s3://captions/resume/resume"), time.time()
    while time.time() - settled < 5 and time.time() < deadline:
        time.sleep(0.5)
        now = read_output(s3, "s3://captions/resume/resume")
        if len(now) != len(first):
            first, settled = now, time.time()
    assert 0 < len(first) < videos, "the kill must land mid-run"

    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    rows = read_output(s3, "s3://captions/resume/resume")
    ids = sorted(r["video_id"] for r in rows)
    assert ids == sorted(f"toy11_{i:06d}" for i in range(videos))  # nothing lost, nothing twice
    assert f"{len(first)} videos already in the output were skipped" in again.stdout


def test_a_replica_streams_across_batches_smaller_than_its_slots(tmp_path, ray_cluster):
    """Caption batches of 1 row into a replica of 3 slots: the replica's feed holds rows of several
    Ray Data calls at once, and every video is written once, with its own counters."""
    from pipeline.job import run

    write_shards(str(tmp_path / "videos"), videos=6, seed=41, shard_size=2)
    cfg = load_config(ROOT / "jobs/configs/local.yaml", [
        "job_id=slots", f"source.uri={tmp_path / 'videos'}", f"output.uri={tmp_path / 'out'}", "caption.batch_size=1",
        "caption.slots=3", "decode.batch_size=2", "generation.max_new_tokens=32", "decode.max_side=256"])
    summary = run(cfg)
    rows = [r for f in sorted((tmp_path / "out" / "slots").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert sorted(r["video_id"] for r in rows) == [f"toy41_{i:06d}" for i in range(6)]
    assert summary["ok"] == 6 and all(r["caption"] and r["error"] is None for r in rows)
    assert all(r["accepted_exact"] + r["accepted_loose"] + r["accepted_shift"] + r["corrections"] + r["bonus"]
               == r["num_tokens"] for r in rows)
    assert all(r["generate_ms"] is not None and r["generate_ms"] >= 0 for r in rows)


def test_partly_written_output_files_are_dropped_and_redone(tmp_path):
    from pipeline.job import written

    out = tmp_path / "out" / "job"
    out.mkdir(parents=True)
    import pyarrow as pa

    pq.write_table(pa.table({"video_id": ["a", "b"]}), out / "part-0.parquet")
    (out / "part-1.parquet").write_bytes(b"PAR1 truncated by a crash")
    cfg = load_config(None, ["job_id=job", f"source.uri={tmp_path}", "model.target=x", "model.draft=y",
                             f"output.uri={tmp_path / 'out'}"])
    assert written(cfg, log=lambda _: None).complete.tolist() == ["a", "b"]
    assert not (out / "part-1.parquet").exists()


@pytest.mark.parametrize("override, key", [
    ("generation.kk=3", "generation.kk"),
    ("decode.num_frames=eight", "decode.num_frames"),
    ("generation.theta=1.5", "generation.theta"),
    ("caption.replicas=0", "caption.replicas"),
    ("generation.relevance_heads=[[0,1,2]]", "generation.relevance_heads"),
    ("generation.relevance_weights=[1.0]", "generation.relevance_weights"),  # weights need heads
    ("generation.k=fast", "generation.k"),
    ("generation.k=0", "generation.k"),
    ("generation.k_max=0", "generation.k_max"),
    ("caption.replicas={min: 4, max: 2}", "caption.replicas"),
    ("decode.actors=-1", "decode.actors"),
    ("decode.actors={min: 1, most: 3}", "decode.actors"),
    ("nightly.every=1", "nightly.every"),
    ("nightly.stale_after_s=1", "nightly.stale_after_s"),
    ("caption.tensor_parallel=4", "caption.tensor_parallel"),  # the toy target has 2 KV heads
    ("caption.tensor_parallel=0", "caption.tensor_parallel"),
    ("model.load_format=random", "model.load_format"),
    ("caption.batching=dynamic", "caption.batching"),
    ("generation.replay=no/such/patterns.json", "generation.replay"),
    ("generation.replay=README.md", "generation.replay"),  # not a patterns file
    ("generation.replay_lengths=uniform", "generation.replay_lengths"),
    ("caption.slots=0", "caption.slots"),
    ("caption.slots=many", "caption.slots"),
    ("generation.prefill_tokens=0", "generation.prefill_tokens"),
    ("generation.draft_frame_stride=0", "generation.draft_frame_stride"),
    ("generation.draft_frame_stride=half", "generation.draft_frame_stride"),
    ("generation.k_costs={draft_step_ms: 1.0}", "generation.k_costs"),  # the table needs all four costs
    ("model.prompt=' '", "model.prompt"),
    ("model.prompts={short: ''}", "model.prompts.short"),
    ("decode.clips={window_s: 0}", "decode.clips.window_s"),
    ("decode.clips={window_s: 10, stride_s: 30}", "decode.clips.stride_s"),
    ("decode.clips={scenes: histogram}", "decode.clips.scenes"),
    ("source.video_extensions=[]", "source.video_extensions"),
    ("source.video_extensions=[mp4,a/b]", "source.video_extensions"),
    ("generation.k_costs={draft_step_ms: 1, verify_0_ms: 2, verify_1_ms: 0, verify_max_ms: 3}",
     "generation.k_costs.verify_1_ms"),
])
def test_a_bad_config_fails_before_ray_starts_naming_the_key(override, key):
    out = subprocess.run([sys.executable, "-m", "jobs.caption", "--config", "jobs/configs/local.yaml", override],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and key in out.stderr
    assert "Ray" not in out.stderr and "ray" not in out.stdout


def test_a_quality_hook_that_cannot_be_imported_fails_before_ray_starts():
    out = subprocess.run([sys.executable, "-m", "jobs.caption", "--config", "jobs/configs/local.yaml",
                          "--quality", "toyworld.score:no_such_function"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "--quality" in out.stderr and "Ray" not in out.stderr


def test_an_unwritable_output_location_fails_before_ray_starts(tmp_path):
    (tmp_path / "a_file").write_text("x")
    out = subprocess.run([sys.executable, "-m", "jobs.caption", "--config", "jobs/configs/local.yaml",
                          f"output.uri={tmp_path / 'a_file' / 'captions'}", f"source.uri={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "output.uri" in out.stderr and "Ray" not in out.stderr


def test_decoding_a_4k_clip_keeps_memory_bounded(tmp_path):
    (tmp_path / "big.mp4").write_bytes(huge_mp4(frames=8))
    # VmHWM (peak resident memory) belongs to the process image, so it starts fresh in the child;
    # ru_maxrss would carry over the (large) pytest parent's peak.
    probe = ("import sys; from pipeline.frames import read_frames; data = open(sys.argv[1], 'rb').read(); "
             "hwm = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]); "
             "base = hwm(); f, _ = read_frames(data, 8, max_side=int(sys.argv[2]) or None); "
             "print(f.shape[1], f.shape[2], hwm() - base)")
    bounded, full = [subprocess.run([sys.executable, "-c", probe, str(tmp_path / "big.mp4"), side], cwd=ROOT,
                                    capture_output=True, text=True, check=True).stdout.split() for side in ("256", "0")]
    assert (int(bounded[0]), int(bounded[1])) == (144, 256) and (int(full[0]), int(full[1])) == (2160, 3840)
    grown_kb, full_kb = int(bounded[2]), int(full[2])
    assert grown_kb < 120_000 and grown_kb < full_kb - 150_000  # 8 full 4K frames alone are 199 MB


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_processor_outputs_cross_to_the_replica_as_views_of_arrow_memory(family):
    """What the decode stage writes comes back in the caption stage with the same values, pixels
    in the replica's dtype, without copies where the bytes are aligned (a row of odd length puts
    the next one off alignment: that one is copied, still right)."""
    import pyarrow as pa
    import torch
    from transformers import AutoProcessor

    from pipeline.decode import chat_prompt, pack, unpack, values
    from toyworld.families import model_dir, render_videos

    processor = AutoProcessor.from_pretrained(model_dir(family, "target"))
    _, _, frames = render_videos(1, seed=5, num_frames=4)
    features = dict(processor(text=[chat_prompt(processor, "Describe the video.")], videos=frames,
                              return_tensors="pt"))
    odd = pack({"x": torch.zeros(3, dtype=torch.uint8)}, "float32")
    rows = [pack(features, "bfloat16"), odd, pack(features, "float32"), pack(features, "bfloat16")]
    chunk = pa.array(rows, pa.binary())
    buffers = values(pa.chunked_array([chunk[:2], chunk[2:]]))  # a batch of two chunks, the second sliced
    data = chunk.buffers()[2]
    views = []
    for i, dtype in ((0, torch.bfloat16), (2, torch.float32), (3, torch.bfloat16)):
        got = unpack(buffers[i])
        assert set(got) == {k for k, v in features.items() if isinstance(v, torch.Tensor)}
        for name, tensor in got.items():
            want = features[name].to(dtype) if name.startswith("pixel_values") else features[name]
            assert tensor.dtype == want.dtype and torch.equal(tensor, want), (i, name)
        views.append(data.address <= got["pixel_values_videos"].data_ptr() < data.address + data.size)
    assert buffers[0].address % 8 == 0 and views[0]  # the buffer's start: a view of the batch
    assert buffers[2].address % 2 == 1 and not views[1]  # after the odd row: copied
    assert values(pa.chunked_array([pa.array([None, rows[1]], pa.binary())]))[0] is None


def test_theta_and_relevance_come_from_the_config_then_the_checkpoint():
    from lvspec.config import SpecConfig, shipped_settings
    from pipeline.config import spec_config

    base = ["job_id=j", "source.uri=/tmp/in", "output.uri=/tmp/out", "model.target=x", "model.draft=y"]
    shipped = {"theta": 0.3, "relevance_heads": [[0, 1], [2, 4]]}
    spec = spec_config(load_config(None, base).generation, shipped)
    assert (spec.theta, spec.relevance_heads, spec.relevance_layers) == (0.3, ((0, 1), (2, 4)), None)
    spec = spec_config(load_config(None, base + ["generation.theta=0.5", "generation.relevance_layers=[2]"]).generation,
                       shipped)
    assert (spec.theta, spec.relevance_heads, spec.relevance_layers) == (0.5, None, (2,))
    spec = spec_config(load_config(None, base).generation, {})
    assert (spec.theta, spec.relevance_heads, spec.relevance_layers) == (SpecConfig.theta, None, None)
    shipped = {"theta": 0.4, "relevance_heads": [[0, 1], [2, 4]], "relevance_weights": [0.75, 0.25]}
    spec = spec_config(load_config(None, base).generation, shipped)
    assert (spec.relevance_heads, spec.relevance_weights) == (((0, 1), (2, 4)), (0.75, 0.25))
    spec = spec_config(load_config(None, base + ["generation.relevance_heads=[[1,1]]"]).generation, shipped)
    assert (spec.relevance_heads, spec.relevance_weights) == (((1, 1),), None)  # shipped weights go with shipped heads
    for models in ("models", "models_v2"):  # what the toy targets ship is a valid setting
        for family in ("qwen2_5_vl", "llava_onevision"):
            spec = spec_config(load_config(None, base).generation, shipped_settings(ROOT / f"toyworld/{models}/{family}-target"))
            assert spec.theta != SpecConfig.theta and (spec.relevance_heads or spec.relevance_layers)


def test_config_files_shipped_with_the_project_are_valid():
    for name in ("local.yaml", "s3.yaml"):
        load_config(ROOT / "jobs/configs" / name)
    with pytest.raises(ConfigError, match="job_id"):  # cluster.yaml asks for a job_id on the command line
        load_config(ROOT / "jobs/configs/cluster.yaml")
    load_config(ROOT / "jobs/configs/cluster.yaml", ["job_id=nightly"])
    big = load_config(ROOT / "jobs/configs/cluster-72b.yaml", ["job_id=nightly"])
    assert big.caption.tensor_parallel == 2 and big.caption.num_gpus == 2
    bench = load_config(ROOT / "jobs/configs/gpu-bench.yaml", ["job_id=b", "source.uri=/tmp/in", "output.uri=/tmp/o"])
    assert bench.model.load_format == "dummy" and bench.generation.replay and bench.caption.num_gpus == 1


def test_a_pinned_cost_table_is_part_of_the_caption_settings_and_speed_settings_are_not():
    """config_hash (the nightly series, the rows): a pinned k=auto table decides captions, so it
    changes the hash; unset, it is left out (series begun before the key existed keep their hash);
    slots and prefill groups decide only speed."""
    from pipeline.config import config_hash

    base = ["job_id=h", "source.uri=/tmp/in", "output.uri=/tmp/o"]
    plain = config_hash(load_config(ROOT / "jobs/configs/local.yaml", base))
    pinned = "generation.k_costs={draft_step_ms: 1, verify_0_ms: 10, verify_1_ms: 11, verify_max_ms: 13}"
    assert config_hash(load_config(ROOT / "jobs/configs/local.yaml", base + [pinned])) != plain
    for speed in ("caption.slots=auto", "generation.prefill_tokens=4096", "generation.k_costs=null"):
        assert config_hash(load_config(ROOT / "jobs/configs/local.yaml", base + [speed])) == plain, speed
