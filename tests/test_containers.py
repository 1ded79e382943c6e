"""Every container a user has: each decodes to the frames it holds (decord, or PyAV where decord
cannot read a file or seeks wrongly in it), and through the job each is a captioned row, while the
files under the prefix that are no videos are counted in the summary, never dropped unsaid."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from pipeline.config import VIDEO_EXTENSIONS, load_config
from pipeline.frames import VideoError, read_frames
from toyworld.scene import CONTAINERS, decode_mp4, encode_video, render, sample_scene

FRAMES = 20


def ramp(height: int = 48, width: int = 64) -> np.ndarray:
    """Frames that tell each other apart: red rises 12 a frame; a green corner marks the orientation."""
    frames = np.zeros((FRAMES, height, width, 3), np.uint8)
    for t in range(FRAMES):
        frames[t, ..., 0] = 12 * t
        frames[t, : height // 2, : width // 2, 1] = 200
    return frames


def assert_holds(frames: np.ndarray, meta: dict, data: bytes) -> None:
    """The sampled frames are the file's own frames at the sampled indices (decoded whole, in order,
    by PyAV), each nearer its own index than any other frame of the file."""
    every = decode_mp4(data)  # PyAV, any container
    assert meta["total_frames"] == len(every) == FRAMES
    idx = meta["indices"]
    assert idx == [0, 6, 13, 19]
    for got, i in zip(frames.astype(np.int16), idx):
        off = [np.abs(got - f.astype(np.int16)).mean() for f in every]
        assert off[i] < 3.0 and int(np.argmin(off)) == i, (meta["decoder"], i, off[i], int(np.argmin(off)))


def test_the_default_extensions_are_every_container_the_tests_make():
    assert sorted(VIDEO_EXTENSIONS) == sorted(CONTAINERS)


@pytest.mark.parametrize("ext", sorted(CONTAINERS))
def test_every_container_decodes_to_the_frames_it_holds(ext):
    data = encode_video(ramp(), ext)
    frames, meta = read_frames(data, 4)
    assert frames.shape == (4, 48, 64, 3)
    assert_holds(frames, meta, data)
    # decord opens MPEG program streams but returns other frames than asked for: those go to PyAV.
    if ext in ("mpg", "mpeg", "ogv", "gif"):
        assert meta["decoder"] == "pyav"


@pytest.mark.parametrize("height, width", [(16, 16), (96, 48)])
def test_sizes_decord_rejects_decode_with_pyav(height, width):
    """decord's converter fails on a 16x16 and on this portrait H.264 video ("Check failed: from_size")."""
    data = encode_video(ramp(height, width), "mp4")
    frames, meta = read_frames(data, 4)
    assert frames.shape == (4, height, width, 3) and meta["decoder"] == "pyav"
    assert_holds(frames, meta, data)


def test_pyav_scales_while_decoding_and_samples_at_fps():
    data = encode_video(np.repeat(ramp(180, 320), 2, axis=0)[:FRAMES], "ogv", fps=10)
    frames, meta = read_frames(data, fps=2.0, max_frames=64, max_side=64)
    # 20 frames at 10 fps: 2 s, so 4 samples at 2 frames a second; 320x180 scaled to 64x36.
    assert meta["decoder"] == "pyav" and frames.shape == (4, 36, 64, 3) and (meta["width"], meta["height"]) == (320, 180)


def test_a_file_neither_decoder_reads_is_a_video_error():
    good = encode_video(ramp(), "ts")
    with pytest.raises(VideoError, match="not a readable video"):
        read_frames(np.random.default_rng(3).bytes(5000))
    with pytest.raises(VideoError):
        read_frames(good[:200])


def test_a_folder_of_every_container_is_captioned_and_other_files_counted(tmp_path, ray_cluster):
    """Each container of toy videos, a 16x16 and a portrait video, beside a .txt and a .jpg: every
    video a captioned row (its decoder named), the two other files counted in the summary."""
    from pipeline.job import human_summary, run

    folder = tmp_path / "videos"
    folder.mkdir()
    rng = np.random.default_rng(20)
    videos = {f"clip_{ext}.{ext.upper() if ext == 'mov' else ext}": (ext, (64, 64)) for ext in CONTAINERS}
    videos |= {"tiny.mp4": ("mp4", (16, 16)), "portrait.mp4": ("mp4", (96, 48))}
    for name, (ext, size) in videos.items():
        (folder / name).write_bytes(encode_video(render(sample_scene(rng), 12, size), ext))
    (folder / "notes.txt").write_text("not a video")
    (folder / "cover.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cfg = load_config(ROOT / "jobs/configs/local.yaml", [
        f"source.uri={folder}", f"output.uri={tmp_path / 'out'}", "job_id=containers", "decode.batch_size=4",
        "caption.batch_size=6", "generation.max_new_tokens=24", "generation.k=4"])
    summary = run(cfg)
    rows = {r["video_id"]: r for f in sorted((tmp_path / "out" / "containers").glob("*.parquet"))
            for r in pq.read_table(f).to_pylist()}
    assert sorted(rows) == sorted(name.rsplit(".", 1)[0] for name in videos)
    for vid, r in rows.items():
        assert r["error"] is None and r["caption"] and r["decoder"] in ("decord", "pyav"), (vid, r["error"])
    assert (rows["tiny"]["width"], rows["tiny"]["height"]) == (16, 16) and rows["tiny"]["decoder"] == "pyav"
    assert (rows["portrait"]["width"], rows["portrait"]["height"]) == (48, 96)
    assert summary["decoded_with_pyav"] == sum(r["decoder"] == "pyav" for r in rows.values()) >= 5
    taken = summary["not_taken"]
    assert taken["count"] == 2 and taken["by_extension"] == {"jpg": 1, "txt": 1}
    assert [e.rsplit("/", 1)[-1] for e in taken["examples"]] == ["cover.jpg", "notes.txt"]
    printed = human_summary(summary)
    assert "2 files under the prefix are not taken as videos (.jpg 1, .txt 1)" in printed
    assert f"{summary['decoded_with_pyav']} videos decord cannot read were decoded with PyAV" in printed
