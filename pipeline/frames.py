"""Frame reading and sampling with decord. No Ray here: the decode stage and the toy world share it."""

from __future__ import annotations

import io

import numpy as np


class VideoError(ValueError):
    """A video that cannot be decoded into frames (corrupt, unsupported codec, empty)."""


def uniform_indices(total: int, n: int) -> np.ndarray:
    """n frame indices spread evenly over [0, total), first and last frame included."""
    if total < 1:
        raise VideoError("no video frames: the video stream is empty")
    return np.linspace(0, total - 1, n).round().astype(np.int64)


def fps_indices(total: int, video_fps: float, fps: float, max_frames: int) -> np.ndarray:
    """Indices sampled at `fps` frames per second of video time, at most `max_frames` of them."""
    if total < 1:
        raise VideoError("no video frames: the video stream is empty")
    n = int(np.clip(round(total / max(video_fps, 1e-6) * fps), 1, max_frames))
    return uniform_indices(total, n)


def probe(data: bytes) -> dict:
    """Container facts from PyAV without decoding a frame: codec, size, frame count (0 if unknown)."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise VideoError("no video frames: the file has no video stream with frames")
            stream = container.streams.video[0]
            return {"codec": stream.codec_context.name, "width": stream.codec_context.width,
                    "height": stream.codec_context.height, "frames": stream.frames}
    except VideoError:
        raise
    except Exception as e:  # PyAV raises InvalidDataError and friends for non-videos
        raise VideoError(f"not a readable video: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e


DECORD_CODECS_MISSING = {"av1", "libdav1d", "libaom-av1"}


def read_frames(data: bytes, num_frames: int | None = 8, fps: float | None = None, max_frames: int = 64,
                max_side: int | None = None) -> tuple[np.ndarray, dict]:
    """Decode sampled frames of an encoded video with decord: (T, H, W, 3) uint8 RGB, plus metadata.

    Sample `num_frames` uniformly, or at `fps` (at most `max_frames`). With `max_side`, decord scales
    frames down while decoding, so a huge video never sits in memory at full size.
    """
    import decord

    if not data:
        raise VideoError("empty file (0 bytes)")
    info = probe(data)
    if info["codec"] in DECORD_CODECS_MISSING:
        raise VideoError(f"unsupported codec {info['codec']!r}: decord cannot decode it")
    height, width = info["height"], info["width"]
    size = {}
    if max_side and max(height, width) > max_side:
        scale = max_side / max(height, width)
        size = {"width": max(2, round(width * scale / 2) * 2), "height": max(2, round(height * scale / 2) * 2)}
    try:
        reader = decord.VideoReader(io.BytesIO(data), num_threads=1, **size)
        total, video_fps = len(reader), float(reader.get_avg_fps())
    except Exception as e:  # decord raises DECORDError, RuntimeError... on bad input
        if info["frames"] == 0:
            raise VideoError("no video frames: the video stream is empty") from e
        raise VideoError(f"cannot decode video: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    if total < 1:
        raise VideoError("no video frames: the video stream is empty")
    idx = fps_indices(total, video_fps, fps, max_frames) if fps else uniform_indices(total, num_frames)
    try:
        frames = reader.get_batch(idx.tolist()).asnumpy()
    except Exception as e:  # truncated streams fail here, past the header
        raise VideoError(f"cannot decode frames: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    meta = {"total_frames": total, "video_fps": video_fps, "height": height, "width": width,
            "codec": info["codec"], "indices": idx.tolist()}
    return frames, meta
