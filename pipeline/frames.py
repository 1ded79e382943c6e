"""Frame reading and sampling with decord, or PyAV where decord cannot read a file. No Ray here: the decode
stage and the toy world share it."""

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


def _message(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def probe(data: bytes) -> dict:
    """Container facts from PyAV without decoding a frame: codec, size, frame count (0 if unknown)."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise VideoError("no video frames: the file has no video stream with frames")
            stream = container.streams.video[0]
            return {"codec": stream.codec_context.name, "width": stream.codec_context.width,
                    "height": stream.codec_context.height, "frames": stream.frames, "format": container.format.name}
    except VideoError:
        raise
    except Exception as e:  # PyAV raises InvalidDataError and friends for non-videos
        raise VideoError(f"not a readable video: {_message(e)}") from e


DECORD_CODECS_MISSING = {"av1", "libdav1d", "libaom-av1"}  # decord's FFmpeg lacks them: PyAV's decodes them
# Containers decord opens but seeks in wrongly (other frames than asked for, no error): MPEG program
# streams (.mpg, .mpeg).
DECORD_FORMATS_MISSEEK = {"mpeg"}


def _scaled_size(height: int, width: int, max_side: int | None) -> dict:
    """The decoded frame size for `max_side` (even sides, aspect kept), or {} to keep the video's."""
    if not max_side or max(height, width) <= max_side:
        return {}
    scale = max_side / max(height, width)
    return {"width": max(2, round(width * scale / 2) * 2), "height": max(2, round(height * scale / 2) * 2)}


def _indices(total: int, video_fps: float, num_frames: int | None, fps: float | None, max_frames: int) -> np.ndarray:
    return fps_indices(total, video_fps, fps, max_frames) if fps else uniform_indices(total, num_frames)


def _with_decord(data: bytes, size: dict, sampling: dict) -> tuple[np.ndarray, int, float, np.ndarray]:
    import decord

    reader = decord.VideoReader(io.BytesIO(data), num_threads=1, **size)
    total, video_fps = len(reader), float(reader.get_avg_fps())
    idx = _indices(total, video_fps, **sampling)
    return reader.get_batch(idx.tolist()).asnumpy(), total, video_fps, idx


def _with_pyav(data: bytes, size: dict, sampling: dict) -> tuple[np.ndarray, int, float, np.ndarray]:
    """Frames through PyAV's FFmpeg: one demux pass counts the frames (no decoding), one decoding
    pass keeps the sampled ones only (scaled as they are converted), so memory holds the samples."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        total = sum(1 for packet in container.demux(stream) if packet.size)
        rate = stream.average_rate or stream.guessed_rate
        seconds = float(container.duration) / 1e6 if container.duration else 0.0
        video_fps = float(rate) if rate else (total / seconds if seconds else 25.0)
    idx = _indices(total, video_fps, **sampling)
    wanted, kept, last = set(idx.tolist()), {}, int(idx[-1])
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                kept[i] = frame.to_ndarray(format="rgb24", **size)
            if i >= last:
                break
    if not kept:
        raise VideoError("no video frames: no frame of the video stream decodes")
    # A stream with fewer decodable frames than packets ends early: samples past its end take its last kept one.
    idx = np.minimum(idx, max(kept))
    return np.stack([kept[i] for i in idx.tolist()]), total, video_fps, idx


def read_frames(data: bytes, num_frames: int | None = 8, fps: float | None = None, max_frames: int = 64,
                max_side: int | None = None) -> tuple[np.ndarray, dict]:
    """Decode sampled frames of an encoded video: (T, H, W, 3) uint8 RGB, plus metadata.

    Sample `num_frames` uniformly, or at `fps` (at most `max_frames`). With `max_side`, frames are
    scaled down while decoding, so a huge video never sits in memory at full size. decord decodes
    what it can (its seeking is fast); a file it cannot read (MPEG-TS, Ogg, GIF, AV1, sizes its
    converter rejects such as 16x16) is decoded with PyAV instead; `meta["decoder"]` says which.
    Only a file neither can read raises `VideoError`.
    """
    if not data:
        raise VideoError("empty file (0 bytes)")
    info = probe(data)
    size = _scaled_size(info["height"], info["width"], max_side)
    sampling = {"num_frames": num_frames, "fps": fps, "max_frames": max_frames}
    if info["codec"] in DECORD_CODECS_MISSING:
        why = f"codec {info['codec']!r} is not in decord's build"
    elif info["format"] in DECORD_FORMATS_MISSEEK:
        why = f"decord seeks {info['format']!r} containers to the wrong frames"
    else:
        try:
            return _meta(info, "decord", *_with_decord(data, size, sampling))
        except VideoError:
            raise
        except Exception as e:  # decord raises DECORDError, RuntimeError... on input it cannot read
            why = _message(e)
    try:
        return _meta(info, "pyav", *_with_pyav(data, size, sampling))
    except VideoError:
        raise
    except Exception as e:
        raise VideoError(f"cannot decode video ({info['codec']}): decord: {why}; PyAV: {_message(e)}") from e


def _meta(info: dict, decoder: str, frames: np.ndarray, total: int, video_fps: float,
          idx: np.ndarray) -> tuple[np.ndarray, dict]:
    return frames, {"total_frames": total, "video_fps": video_fps, "height": info["height"], "width": info["width"],
                    "codec": info["codec"], "indices": idx.tolist(), "decoder": decoder}
