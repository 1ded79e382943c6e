"""Long videos as clips (fixed windows, or shots found by PySceneDetect), several prompts a clip, and
exactly-once per (video_id, clip_index, prompt_name): the clips cover the video, shots fall on the
cuts, memory stays bounded, and through the job each clip is a row per prompt from one decode."""

import io
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, kill_job
from pipeline.clips import read_clips
from pipeline.config import ConfigError, load_config
from toyworld.scene import encode_video, render, sample_scene

FPS = 4
CUTS = [0.0, 95.0, 400.25, 777.0, 1200.0, 1650.5]  # shot starts of the 30-minute video, in seconds


@pytest.fixture(scope="module")
def half_hour() -> bytes:
    """30 minutes at 4 fps of flat-coloured shots starting at CUTS, a bar sliding within each."""
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 255, (len(CUTS), 3)).astype(np.uint8)
    frames = np.zeros((30 * 60 * FPS, 48, 64, 3), np.uint8)
    shot = np.searchsorted(CUTS, np.arange(len(frames)) / FPS, side="right") - 1
    for i in range(len(frames)):
        frames[i] = colours[shot[i]]
        x = (2 * i) % 54
        frames[i, 20:30, x:x + 10] = 255 - colours[shot[i]]
    return encode_video(frames, "mp4", fps=FPS)


def window(window_s: float, stride_s: float | None = None, min_s: float = 0.0) -> dict:
    return {"kind": "window", "window_s": window_s, "stride_s": stride_s or window_s, "min_s": min_s,
            "allow_gaps": False}


def test_a_half_hour_video_in_one_minute_windows_is_thirty_clips_that_tile_it(half_hour):
    clips = list(read_clips(io.BytesIO(half_hour), window(60.0), num_frames=8))
    assert [c.index for c in clips] == list(range(30))
    assert [(c.start_s, c.end_s) for c in clips] == [(60.0 * i, 60.0 * (i + 1)) for i in range(30)]
    assert [c.last for c in clips] == [False] * 29 + [True]
    for c in clips:  # each clip's frames come from inside it, spread over it
        times = c.meta["times"]
        assert c.frames.shape == (8, 48, 64, 3) and c.start_s <= min(times) and max(times) < c.end_s
        assert max(times) - min(times) > 0.8 * 60


def test_the_last_window_is_shorter_and_a_sliver_under_min_s_is_dropped(half_hour):
    clips = list(read_clips(io.BytesIO(half_hour), window(420.0), num_frames=4))
    assert [(c.start_s, c.end_s) for c in clips][-1] == (1680.0, 1800.0) and len(clips) == 5
    trimmed = list(read_clips(io.BytesIO(half_hour), window(420.0, min_s=150.0), num_frames=4))
    assert [(c.start_s, c.end_s) for c in trimmed] == [(420.0 * i, 420.0 * (i + 1)) for i in range(4)]
    assert trimmed[-1].last
    overlapping = list(read_clips(io.BytesIO(half_hour), window(600.0, stride_s=300.0), num_frames=4))
    assert [c.start_s for c in overlapping] == [300.0 * i for i in range(6)]
    assert [c.end_s for c in overlapping] == [600.0, 900.0, 1200.0, 1500.0, 1800.0, 1800.0]


def numbered(total: int) -> np.ndarray:
    """`total` 64x48 frames, each showing its own number in binary (14 blocks, white for a 1)."""
    frames = np.zeros((total, 48, 64, 3), np.uint8)
    for i in range(total):
        for b in range(14):
            if i >> b & 1:
                frames[i, (b // 7) * 16:(b // 7) * 16 + 16, (b % 7) * 8:(b % 7) * 8 + 8] = 255
    return frames


def shown(image: np.ndarray) -> int:
    """The number a `numbered` frame shows."""
    return sum(1 << b for b in range(14)
               if image[(b // 7) * 16 + 4:(b // 7) * 16 + 12, (b % 7) * 8 + 2:(b % 7) * 8 + 6].mean() > 128)


def test_sparse_windows_of_a_long_video_seek_and_sample_the_right_frames():
    """Ten minutes at 24 fps with a keyframe every 2 s, 8 frames a minute: the pass seeks past what no
    window samples (a fraction of the frames decoded), and every sampled frame is the video's frame at
    its reported time."""
    import av

    fps, total = 24, 24 * 600
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"preset": "ultrafast", "g": "48", "crf": "18", "threads": "1"}
        for frame in numbered(total):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    clips = list(read_clips(io.BytesIO(buf.getvalue()), window(60.0), num_frames=8))
    assert [(c.start_s, c.end_s) for c in clips] == [(60.0 * i, 60.0 * (i + 1)) for i in range(10)]
    assert clips[-1].meta["decoded"] < total / 4
    for c in clips:
        for t, image in zip(c.meta["times"], c.frames):
            assert shown(image) == round(t * fps) and c.start_s <= t < c.end_s


def test_a_stream_shorter_than_its_container_says_ends_its_clips_where_it_ends():
    """Half of a two-minute Matroska file (its header still says 120 s): the windows it reaches end
    where its frames end, the last marked; none is made of frames the file does not hold."""
    data = encode_video(numbered(24 * 120), "mkv", fps=24)
    clips = list(read_clips(io.BytesIO(data[:len(data) // 2]), window(20.0), num_frames=4))
    assert [c.last for c in clips] == [False] * (len(clips) - 1) + [True] and 2 <= len(clips) <= 3
    assert [c.end_s for c in clips[:-1]] == [c.start_s for c in clips[1:]] and clips[-1].end_s < 60.0
    for c in clips:
        assert all(shown(image) == round(t * 24) and c.start_s <= t < c.end_s
                   for t, image in zip(c.meta["times"], c.frames))


@pytest.mark.parametrize("detector", ["content", "adaptive"])
def test_shots_start_within_a_second_of_the_generated_cuts(half_hour, detector):
    clips = list(read_clips(io.BytesIO(half_hour), {"kind": "scenes", "scenes": detector, "threshold": None,
                                                    "min_s": None}, num_frames=8))
    assert len(clips) == len(CUTS) and clips[-1].last and not any(c.last for c in clips[:-1])
    for clip, cut, following in zip(clips, CUTS, CUTS[1:] + [1800.0]):
        assert abs(clip.start_s - cut) <= 1.0 and abs(clip.end_s - following) <= 1.0
        assert clip.frames.shape[0] == 8 and clip.start_s <= min(clip.meta["times"])
    assert [c.end_s for c in clips[:-1]] == [c.start_s for c in clips[1:]]


def test_a_shot_longer_than_max_s_goes_on_as_new_clips(half_hour):
    clips = list(read_clips(io.BytesIO(half_hour), {"kind": "scenes", "scenes": "content", "threshold": None,
                                                    "min_s": None, "max_s": 300.0}, num_frames=4))
    lengths = [c.end_s - c.start_s for c in clips]
    assert max(lengths) <= 300.0 + 1.0 and clips[-1].end_s == 1800.0
    assert [c.end_s for c in clips[:-1]] == [c.start_s for c in clips[1:]]
    starts = {c.start_s for c in clips}
    assert all(any(abs(s - cut) <= 1.0 for s in starts) for cut in CUTS)  # every real cut still a boundary
    assert len(clips) == 10  # shots of 95, 305, 377, 423, 451 and 150 s: 1 + 2 + 2 + 2 + 2 + 1 clips


def test_clips_of_a_long_video_are_decoded_with_bounded_memory(tmp_path):
    """Ten minutes of 640x360 (830 MB of frames) streamed from a file, in windows (seeking) and in
    shots (every frame decoded): memory grows by a few clips' samples, not the video."""
    import av

    rng = np.random.default_rng(1)
    base = rng.integers(0, 255, (360, 640, 3), dtype=np.uint8)
    path = tmp_path / "long.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=2)
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        stream.options = {"crf": "35", "preset": "ultrafast", "threads": "1"}
        for i in range(1200):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.roll(base, 3 * i, axis=1), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    # VmHWM (peak resident memory) starts fresh in the child; PyAV is loaded before the baseline.
    probe = ("import sys, av, scenedetect; from pipeline.clips import read_clips; "
             "hwm = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]); "
             "base = hwm(); spec = eval(sys.argv[2]); "
             "f = open(sys.argv[1], 'rb'); n = sum(c.frames.shape[0] for c in read_clips(f, spec, num_frames=8)); "
             "print(n, hwm() - base)")
    for spec in (window(60.0), {"kind": "scenes", "scenes": "content", "threshold": None, "min_s": None}):
        out = subprocess.run([sys.executable, "-c", probe, str(path), repr(spec)], cwd=ROOT, capture_output=True,
                             text=True, check=True)
        frames, grown_kb = map(int, out.stdout.split())
        assert frames >= 8 and frames % 8 == 0
        assert grown_kb < 150_000, spec  # every decoded frame held would be 830 MB


@pytest.mark.parametrize("value, key", [
    ("{window_s: 0}", "decode.clips.window_s"),
    ("{window_s: 10, stride_s: 20}", "decode.clips.stride_s"),
    ("{scenes: histogram}", "decode.clips.scenes"),
    ("{window_s: 10, scenes: content}", "decode.clips"),
    ("{window_s: 10, threshold: 3}", "decode.clips.threshold"),
    ("{scenes: content, min_s: -1}", "decode.clips.min_s"),
    ("{scenes: content, max_s: 0}", "decode.clips.max_s"),
    ("{window_s: 10, allow_gaps: sometimes}", "decode.clips.allow_gaps"),
])
def test_bad_clip_settings_name_the_key(value, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(ROOT / "jobs/configs/local.yaml", [f"decode.clips={value}"])


def test_clip_and_prompt_settings_are_caption_settings_and_their_defaults_change_no_hash():
    from pipeline.config import config_hash

    base = ROOT / "jobs/configs/local.yaml"
    default = config_hash(load_config(base))
    assert config_hash(load_config(base, ["decode.clips=whole"])) == default
    windows = config_hash(load_config(base, ["decode.clips={window_s: 60}"]))
    assert windows == config_hash(load_config(base, ["decode.clips={window_s: 60, stride_s: 60}"])) != default
    assert config_hash(load_config(base, ["model.prompts={short: Describe the video.}"])) != default
    gaps = load_config(base, ["decode.clips={window_s: 10, stride_s: 20, allow_gaps: true}"]).decode.clips
    assert gaps["stride_s"] == 20.0 and gaps["allow_gaps"]


def test_a_video_is_complete_when_every_prompt_has_its_clips_up_to_the_last():
    from pipeline.job import written_of

    rows = [("a", 0, "short", False), ("a", 1, "short", True), ("a", 0, "long", False), ("a", 1, "long", True),
            ("b", 0, "short", False), ("b", 2, "short", True), ("b", 0, "long", False), ("b", 1, "long", False),
            ("b", 2, "long", True),  # b's clip 1 of "short" is missing
            ("c", 0, "short", True)]  # c has no "long" row
    table = pa.table({k: list(v) for k, v in zip(("video_id", "clip_index", "prompt_name", "last_clip"), zip(*rows))})
    done = written_of(table, ["short", "long"])
    assert done.complete.tolist() == ["a"] and sorted(done.partial) == ["b", "c"]
    assert (1, "short") not in done.partial["b"] and (2, "short") in done.partial["b"]
    # Rows from before clips: a whole video's one row, prompted "default".
    assert written_of(pa.table({"video_id": ["x", "y"]}), ["default"]).complete.tolist() == ["x", "y"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A 150 s video of three 50 s shots at 2 fps, a 1.5 s clip and a file that is no video."""
    folder = tmp_path_factory.mktemp("clips") / "videos"
    folder.mkdir()
    rng = np.random.default_rng(3)
    shots = [render(sample_scene(rng), 100, 64) for _ in range(3)]
    (folder / "long.mp4").write_bytes(encode_video(np.concatenate(shots), "mp4", fps=2))
    (folder / "short.mp4").write_bytes(encode_video(render(sample_scene(rng), 12, 64), "mp4"))
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    return folder


PROMPTS = "model.prompts={short: Describe the video briefly., detailed: Describe the video in detail.}"


def test_two_prompts_give_two_rows_a_clip_from_one_decode(videos, tmp_path, ray_cluster):
    from pipeline.job import human_summary, run

    cfg = load_config(ROOT / "jobs/configs/local.yaml", [
        f"source.uri={videos}", f"output.uri={tmp_path / 'out'}", "job_id=clips", "decode.clips={window_s: 60}",
        PROMPTS, "generation.max_new_tokens=12", "decode.batch_size=2", "caption.batch_size=4"])
    summary = run(cfg)
    rows = [r for f in sorted((tmp_path / "out" / "clips").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    keys = sorted((r["video_id"], r["clip_index"], r["prompt_name"]) for r in rows)
    assert keys == sorted((v, i, p) for v, n in (("long", 3), ("short", 1), ("broken", 1)) for i in range(n)
                          for p in ("short", "detailed"))
    ok = [r for r in rows if r["error"] is None]
    assert len(ok) == 8 and all(r["caption"] and r["num_frames"] == 8 for r in ok)
    spans = sorted({(r["clip_index"], r["start_s"], r["end_s"], r["last_clip"]) for r in ok if r["video_id"] == "long"})
    assert spans == [(0, 0.0, 60.0, False), (1, 60.0, 120.0, False), (2, 120.0, 150.0, True)]
    # Frames decoded once a clip: one prompt's row carries them, the other's none.
    for clip in {(r["video_id"], r["clip_index"]) for r in ok}:
        assert sorted(r["decoded_frames"] for r in ok if (r["video_id"], r["clip_index"]) == clip) == [0, 8]
    broken = [r for r in rows if r["video_id"] == "broken"]
    assert all("not a readable video" in r["error"] and r["last_clip"] for r in broken)
    assert summary["videos"] == 3 and summary["rows"] == 10 and summary["clips"] == 4 and summary["ok"] == 8
    assert summary["decode"]["frames"] == 4 * 8 and summary["failed_videos"] == 1
    assert summary["video_hours"] == pytest.approx(151.5 / 3600) and summary["clips_per_video"] == 2.0
    printed = human_summary(summary)
    assert "10 rows this run (8 ok, 2 failed) from 3 videos" in printed
    assert "4 clips captioned (2.0 a video, 0.04 hours of video), prompts detailed, short" in printed
    # The report shows the same clip figures, and names each sample's clip and prompt.
    from pipeline.report import write

    facts = write(str(tmp_path / "out" / "clips"))
    assert (facts["videos"], facts["clips"], facts["rows"], facts["prompts"]) == (3, 4, 10, ["detailed", "short"])
    assert facts["video_hours"] == pytest.approx(summary["video_hours"])
    html = (tmp_path / "out" / "clips" / "_report" / "index.html").read_text()
    assert '<b id="clips">4</b>' in html and "clip 1 (60-120 s), detailed" in html


def keys_in(out) -> list[tuple]:
    """(video_id, clip_index, prompt_name) of every committed row under `out` (files being written skipped)."""
    keys = []
    for f in sorted(out.glob("*.parquet")):
        try:
            keys += [(r["video_id"], r["clip_index"], r["prompt_name"]) for r in pq.read_table(f).to_pylist()]
        except Exception:
            pass
    return keys


def test_a_video_written_in_part_is_decoded_again_for_its_missing_rows_only(videos, tmp_path, ray_cluster):
    """What a crash leaves between the files of one video's rows: the resumed run writes its missing
    (clip, prompt) rows, once, and nothing else."""
    from pipeline.job import human_summary, run

    cfg = load_config(ROOT / "jobs/configs/local.yaml", [
        f"source.uri={videos}", f"output.uri={tmp_path / 'out'}", "job_id=part", "decode.clips={window_s: 30}",
        PROMPTS, "generation.max_new_tokens=8", "output.rows_per_file=3"])
    run(cfg)
    out = tmp_path / "out" / "part"
    everything = sorted(keys_in(out))
    lost = [f for f in sorted(out.glob("*.parquet"))
            if any(r["video_id"] == "long" and r["clip_index"] > 0 for r in pq.read_table(f).to_pylist())][:2]
    assert lost
    missing = [(r["video_id"], r["clip_index"], r["prompt_name"]) for f in lost for r in pq.read_table(f).to_pylist()]
    for f in lost:
        f.unlink()
    again = run(cfg)
    assert sorted(keys_in(out)) == everything  # each (video, clip, prompt) once
    hit = {k[0] for k in missing}  # long, and any video whose rows shared a lost file
    assert again["rows"] == len(missing) and again["resumed_partly_written"] == len(hit)
    assert again["skipped_already_written"] == 3 - len(hit)  # the others: written whole
    assert f"{len(hit)} videos written in part were decoded again" in human_summary(again)


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """Eight 20 s videos of two shots at 2 fps: with 5 s windows and two prompts, 64 rows."""
    folder = tmp_path_factory.mktemp("many") / "videos"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for i in range(8):
        shots = [render(sample_scene(rng), 20, 48) for _ in range(2)]
        (folder / f"v{i}.mp4").write_bytes(encode_video(np.concatenate(shots), "mp4", fps=2))
    return folder


def test_a_killed_job_resumes_with_every_clip_and_prompt_once(many, tmp_path):
    import os
    import time

    out = tmp_path / "out" / "resume"
    args = [sys.executable, "-m", "jobs.caption", "--config", str(ROOT / "jobs/configs/local.yaml"),
            f"source.uri={many}", f"output.uri={tmp_path / 'out'}", "job_id=resume", "decode.clips={window_s: 5}",
            PROMPTS, "generation.max_new_tokens=12", "caption.batch_size=4", "decode.batch_size=1",
            "output.rows_per_file=2"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    expected = sorted((f"v{v}", i, p) for v in range(8) for i in range(4) for p in ("short", "detailed"))
    with open(tmp_path / "first.log", "w") as log:
        job = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and job.poll() is None and not keys_in(out):
        time.sleep(0.1)
    assert job.poll() is None, f"the first run ended by itself:\n{(tmp_path / 'first.log').read_text()[-3000:]}"
    kill_job(job)  # the driver and the local Ray cluster it started
    # A Ray worker outside the driver's process group may still finish a write for a moment.
    first, settled = keys_in(out), time.time()
    while time.time() - settled < 5:
        time.sleep(0.5)
        if len(now := keys_in(out)) != len(first):
            first, settled = now, time.time()
    assert 0 < len(first) < len(expected), "the kill must land mid-run"

    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(keys_in(out)) == expected  # every (video, clip, prompt) once: none lost, none twice


def test_nightly_keeps_each_clip_and_prompt_once_across_nights(videos, tmp_path, ray_cluster):
    from jobs import nightly
    from pipeline.nightly import read_ledger

    def night(date: str) -> int:
        return nightly.main(["--config", str(ROOT / "jobs/configs/local.yaml"), f"source.uri={videos}",
                             f"output.uri={tmp_path / 'captions'}", "nightly.dataset=talks", f"nightly.run_date={date}",
                             "decode.clips={window_s: 60}", PROMPTS, "generation.max_new_tokens=8",
                             "nightly.max_failed_fraction=0.5"])

    assert night("2026-12-01") == 0 and night("2026-12-02") == 0  # the second night finds nothing new
    (series,) = (tmp_path / "captions" / "talks").glob("series=*")
    latest = pq.read_table(series / "latest.parquet").to_pylist()
    keys = [(r["video_id"], r["clip_index"], r["prompt_name"]) for r in latest]
    assert len(keys) == len(set(keys)) == 10  # long: 3 clips, short and broken: 1; two prompts each
    import fsspec

    runs = read_ledger(fsspec.filesystem("file"), str(tmp_path / "captions" / "talks" / "_ledger"))
    # The ledger's videos are videos, its ok and failed rows; one video in three failing stays under 0.5.
    assert [(r["status"], r["videos"], r["ok"], r["failed"]) for r in runs] == [
        ("succeeded", 3, 8, 2), ("succeeded", 0, 0, 0)]
