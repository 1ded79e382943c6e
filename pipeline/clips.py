"""A video as clips: the whole video, fixed windows, or shots (PySceneDetect), each with its own
sampled frames. No Ray here.

    for clip in read_clips(file, {"kind": "window", "window_s": 60, ...}, num_frames=8):
        clip.index, clip.start_s, clip.end_s, clip.frames   # (T, H, W, 3) uint8 RGB

`whole` is `frames.read_frames` (decord's seeking, PyAV where decord cannot read a file). Windows
and shots come from one forward pass over the file with PyAV, read as it decodes (a file object,
never the whole video in memory). Windows of a video whose length the container states know their
sample times in advance and seek past the stretches between them (`_windows`, in containers that
seek right: `SEEKABLE`); shots, and other windows, decode every frame, each open clip keeping at most twice the frames
it samples (`_Samples`). Either way memory holds a few clips' samples whatever the video's length.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np

from pipeline.frames import VideoError, _message, _scaled_size, read_frames

# decode.clips' scenes detectors: PySceneDetect's class and the name of its cut threshold argument.
DETECTORS = {"content": ("ContentDetector", "threshold"), "adaptive": ("AdaptiveDetector", "adaptive_threshold")}
# Containers whose index seeks to the right frames (checked for each of toyworld's CONTAINERS by the
# frame number drawn into each frame): MPEG-TS loses its end, MPEG-PS lands on other frames, so those
# and the rest decode every frame.
SEEKABLE = {"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi", "flv", "asf"}
DETECT_WIDTH = 256  # shots are detected on frames at most this wide (PySceneDetect's own downscale)


# decode.clips (pipeline.config): what one row captions.
WHOLE = {"kind": "whole"}
CLIP_KEYS = {"window": {"window_s", "stride_s", "min_s", "allow_gaps"}, "scenes": {"scenes", "threshold", "min_s", "max_s"}}


def clip_spec(value) -> dict:
    """decode.clips as read_clips takes it: {kind: whole}, {kind: window, window_s, stride_s, min_s,
    allow_gaps} or {kind: scenes, scenes, threshold, min_s, max_s}, every key set. A bad value raises
    ValueError naming the key (pipeline.config reports it as a config error)."""
    if value == "whole" or value == WHOLE:
        return dict(WHOLE)
    if not isinstance(value, dict) or ("window_s" in value) == ("scenes" in value):
        raise ValueError(f"config key 'decode.clips' must be whole, {{window_s: S}} or {{scenes: "
                         f"{'|'.join(DETECTORS)}}}, got {value!r}")
    kind = "window" if "window_s" in value else "scenes"
    extra = set(value) - CLIP_KEYS[kind] - {"kind"}
    if extra:
        raise ValueError(f"config key 'decode.clips.{sorted(extra)[0]}' is not a {kind} setting "
                         f"(those are {', '.join(sorted(CLIP_KEYS[kind]))})")

    def number(key: str, default, allow_zero: bool = False):
        got = value.get(key, default)
        if got is not None and (isinstance(got, bool) or not isinstance(got, (int, float))):
            raise ValueError(f"config key 'decode.clips.{key}' must be a number of seconds, got {got!r}")
        if got is not None and (got < 0 or (got == 0 and not allow_zero)):
            raise ValueError(f"config key 'decode.clips.{key}' must be {'>= 0' if allow_zero else '> 0'}, got {got!r}")
        return None if got is None else float(got)

    min_s = number("min_s", 0.0 if kind == "window" else None, allow_zero=True)
    if kind == "scenes":
        if value["scenes"] not in DETECTORS:
            raise ValueError(f"config key 'decode.clips.scenes' must be a detector of {tuple(DETECTORS)}, "
                             f"got {value['scenes']!r}")
        return {"kind": kind, "scenes": value["scenes"], "threshold": number("threshold", None), "min_s": min_s,
                "max_s": number("max_s", None)}
    window = number("window_s", None)
    stride = number("stride_s", window)
    gaps = value.get("allow_gaps", False)
    if not isinstance(gaps, bool):
        raise ValueError(f"config key 'decode.clips.allow_gaps' must be true or false, got {gaps!r}")
    if stride > window and not gaps:
        raise ValueError(f"config key 'decode.clips.stride_s' ({stride:g}) exceeds window_s ({window:g}): the "
                         f"video between windows would not be captioned; set allow_gaps: true if that is meant")
    return {"kind": kind, "window_s": window, "stride_s": stride, "min_s": min_s, "allow_gaps": gaps}


@dataclass
class Clip:
    index: int
    start_s: float
    end_s: float
    frames: np.ndarray
    meta: dict
    last: bool = False  # the video's last clip: a resumed job knows from it that the video is complete


def figures(rows: list[dict]) -> dict:
    """Clip figures of caption rows (job summary and report alike): videos, clips captioned, clips per
    video, hours of video captioned, prompts. Rows from before clips count as whole videos."""
    ok = {(r["video_id"], r.get("clip_index") or 0): r for r in rows if r.get("error") is None}
    videos = {v for v, _ in ok}
    return {"videos": len({r["video_id"] for r in rows}), "clips": len(ok),
            "clips_per_video": len(ok) / max(len(videos), 1),
            "video_hours": sum((r.get("end_s") or 0.0) - (r.get("start_s") or 0.0) for r in ok.values()) / 3600,
            "prompts": sorted({r.get("prompt_name") or "default" for r in rows})}


def sample_count(duration_s: float, num_frames: int | None, fps: float | None, max_frames: int) -> int:
    """Frames sampled from a clip: `num_frames`, or `fps` a second of it (1 to `max_frames`)."""
    return int(np.clip(round(duration_s * fps), 1, max_frames)) if fps else num_frames


class _Samples:
    """The frames kept for one open clip: every `stride`-th from its first, the stride doubling
    whenever `capacity` are held, so any length of clip holds at most `capacity` frames spread
    evenly over it."""

    def __init__(self, start_s: float, first: int, capacity: int, end_s: float | None = None):
        self.start_s, self.end_s, self.first = start_s, end_s, first
        self.capacity, self.stride = capacity, 1
        self.kept: list[tuple[int, float, np.ndarray]] = []  # (frame number, time, image)

    def wants(self, n: int) -> bool:
        return (n - self.first) % self.stride == 0

    def add(self, n: int, t: float, image: np.ndarray) -> None:
        self.kept.append((n, t, image))
        if len(self.kept) >= self.capacity:
            self.stride *= 2
            self.kept = [k for k in self.kept if (k[0] - self.first) % self.stride == 0]

    def split(self, n: int, t: float) -> _Samples:
        """End this clip before frame `n` (time `t`); the clip from there on keeps the frames held past it."""
        after = _Samples(t, n, self.capacity)
        after.kept = [k for k in self.kept if k[0] >= n]
        self.kept = [k for k in self.kept if k[0] < n]
        self.end_s = t
        return after

    def clip(self, index: int, sampling: dict, meta: dict, last: bool = False) -> Clip:
        count = sample_count(self.end_s - self.start_s, **sampling)
        pick = np.linspace(0, len(self.kept) - 1, count).round().astype(int)
        frames = np.stack([self.kept[i][2] for i in pick])
        total = max(1, round((self.end_s - self.start_s) * meta["video_fps"]))
        return Clip(index, self.start_s, self.end_s, frames,
                    meta | {"total_frames": total, "times": [self.kept[i][1] for i in pick]}, last)


def _detector(kind: str, threshold: float | None, min_s: float | None):
    import scenedetect

    name, argument = DETECTORS[kind]
    options = ({argument: threshold} if threshold is not None else {}) | (
        {"min_scene_len": float(min_s)} if min_s is not None else {})
    return getattr(scenedetect, name)(**options)


def read_clips(source, clips: dict, num_frames: int | None = 8, fps: float | None = None, max_frames: int = 64,
               max_side: int | None = None):
    """The clips of a video (bytes or a seekable file object) as `decode.clips` (checked by
    pipeline.config) cuts it, in order, the last one marked; frames sampled per clip as
    `num_frames` or `fps` say. Raises `VideoError` where the file holds no readable video."""
    sampling = {"num_frames": num_frames, "fps": fps, "max_frames": max_frames}
    if clips["kind"] == "whole":
        data = source if isinstance(source, (bytes, bytearray)) else source.read()
        frames, meta = read_frames(data, max_side=max_side, **sampling)
        yield Clip(0, 0.0, meta["total_frames"] / max(meta["video_fps"], 1e-6), frames, meta, last=True)
        return
    import io

    import av

    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise VideoError("empty file (0 bytes)")
        source = io.BytesIO(source)
    try:
        container = av.open(source)
    except Exception as e:  # PyAV raises InvalidDataError and friends for non-videos
        raise VideoError(f"not a readable video: {_message(e)}") from e
    with container:
        if not container.streams.video:
            raise VideoError("no video frames: the file has no video stream with frames")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        duration = _duration(container, stream)
        if clips["kind"] == "window" and duration and container.format.name in SEEKABLE:
            yield from _windows(container, stream, clips, sampling, max_side, duration)
        else:
            yield from _stream(container, stream, clips, sampling, max_side)


def _duration(container, stream) -> float | None:
    """The video stream's length in seconds as the container states it, or None."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return float(container.duration) / 1e6 if container.duration else None


def spans(duration_s: float, clips: dict) -> list[tuple[float, float]]:
    """The (start, end) seconds of the windows `clips` cuts a video of `duration_s` into."""
    window, stride = clips["window_s"], clips["stride_s"]
    out, k = [], 0
    while k * stride < duration_s:
        out.append((k * stride, min(k * stride + window, duration_s)))
        k += 1
    while len(out) > 1 and out[-1][1] - out[-1][0] < clips["min_s"]:  # slivers, unless one is the video
        out.pop()
    return out


def _windows(container, stream, clips: dict, sampling: dict, max_side: int | None, duration: float):
    """Windows of a video whose length is known: each window's sample times are set in advance and the
    pass only decodes up to them, seeking past stretches longer than the keyframe spacing seen so far
    (forward only: no frame is decoded twice but the few before a keyframe landed on), so a sparse
    sampling of a long video decodes a small part of it, as decord's seeking does."""
    codec = stream.codec_context
    rate = float(stream.average_rate or stream.guessed_rate or 25.0)
    size = _scaled_size(codec.height, codec.width, max_side)
    meta = {"video_fps": rate, "height": codec.height, "width": codec.width, "codec": codec.name, "decoder": "pyav"}
    start_pts = stream.start_time or 0
    windows = spans(duration, clips)
    wanted = []  # (time, window) in time order
    for w, (lo, hi) in enumerate(windows):
        n = sample_count(hi - lo, **sampling)
        last = max(lo, hi - 1.0 / rate)  # the window's last frame starts a frame before its end
        wanted += [(lo + (last - lo) * (j / (n - 1) if n > 1 else 0.5), w) for j in range(n)]
    order = sorted(range(len(wanted)), key=lambda i: wanted[i][0])
    counts = [sample_count(hi - lo, **sampling) for lo, hi in windows]
    picked: list[list] = [[] for _ in windows]
    frames = container.decode(stream)
    frame = image = None
    t, gap = 0.0, 0.0  # the time of `frame`; the longest keyframe spacing seen (a seek lands up to that far back)
    last = None  # (time, image) of the latest frame taken: a stream ending early ends its clip there
    decoded, done, end = 0, 0, duration

    def time_of(f) -> float:
        return float(f.pts - start_pts) * float(stream.time_base) if f.pts is not None else t + 1.0 / rate

    def clip(w: int, hi: float, got: list) -> Clip:
        got = got + [got[-1]] * (counts[w] - len(got))  # a window cut short by the stream's end: its last frame
        return Clip(w, windows[w][0], hi, np.stack([im for _, im in got]),
                    meta | {"total_frames": max(1, round((hi - windows[w][0]) * rate)), "times": [x for x, _ in got],
                            "decoded": decoded})

    held = None  # the latest complete window, yielded once the next one is (the last one is marked)
    try:
        for i in order:
            target, w = wanted[i]
            seeked = target - t > max(2.0, gap)  # else decoding on is cheaper than a seek's landing short
            if seeked:
                container.seek(start_pts + int(target / float(stream.time_base)), stream=stream, backward=True)
                frames, frame = container.decode(stream), None
            while frame is None or time_of(frame) + 0.5 / rate <= target:
                nxt = next(frames, None)
                if nxt is None:
                    break
                frame, image, decoded = nxt, None, decoded + 1
                t = time_of(frame)
                if seeked:  # the keyframe it landed on: the spacing is at least this long
                    gap, seeked = max(gap, target - t), False
            if frame is None or time_of(frame) + 1.5 / rate <= target:  # the stream ends before the container says
                end = last[0] + 1.0 / rate if last is not None else 0.0
                break
            if image is None:
                image = frame.to_ndarray(format="rgb24", **size)
            last = (t, image)
            picked[w].append(last)
            while done < len(windows) and len(picked[done]) == counts[done]:
                if held is not None:
                    yield held
                held, picked[done] = clip(done, windows[done][1], picked[done]), []
                done += 1
    except Exception as e:  # a stream that breaks off mid-way: what came before it was yielded
        raise VideoError(f"video stream breaks off after {decoded} frames: {_message(e)}") from e
    if last is None:
        raise VideoError("no video frames: no frame of the video stream decodes")
    # A stream that ends early (truncated, or a stated length that overshoots): the windows it reached
    # end there, later ones are none.
    rest = [clip(w, min(windows[w][1], end), picked[w]) for w in range(done, len(windows))
            if picked[w] and windows[w][0] < end]
    for c in ([held] if held is not None else []) + rest:
        c.last = c is rest[-1] if rest else c is held
        yield c


def _stream(container, stream, clips: dict, sampling: dict, max_side: int | None):
    codec = stream.codec_context
    rate = float(stream.average_rate or stream.guessed_rate or 25.0)
    size = _scaled_size(codec.height, codec.width, max_side)
    meta = {"video_fps": rate, "height": codec.height, "width": codec.width, "codec": codec.name, "decoder": "pyav"}
    capacity = 2 * max(sampling["num_frames"] or sampling["max_frames"], 2)
    scenes = clips["kind"] == "scenes"
    if scenes:
        from scenedetect import FrameTimecode

        detector = _detector(clips["scenes"], clips.get("threshold"), clips.get("min_s"))
        small = _scaled_size(codec.height, codec.width, DETECT_WIDTH)
        recent = collections.deque(maxlen=detector.event_buffer_length + 2)  # (frame number, time) a cut may name
        opened = [_Samples(0.0, 0, capacity)]
    else:
        window, stride = clips["window_s"], clips["stride_s"]
        opened, starts = [], 0  # windows open as the video reaches their start
    done: collections.deque[_Samples] = collections.deque()  # closed, yielded one behind (the last one is marked)
    t0 = t = None
    n, count = -1, 0  # frames decoded, clips yielded

    def cut(at: int) -> None:
        when = next((time for number, time in recent if number == at), at / rate)
        if opened[0].kept or opened[0].start_s < when:
            after = opened[0].split(at, when)
            done.append(opened[0])
            opened[0] = after

    try:
        for n, frame in enumerate(container.decode(stream)):
            t0 = frame.time if t0 is None and frame.time is not None else t0
            t = frame.time - t0 if frame.time is not None and t0 is not None else n / rate
            if scenes:
                recent.append((n, t))
                for found in detector.process_frame(FrameTimecode(n, fps=rate),
                                                    frame.to_ndarray(format="bgr24", **small)):
                    cut(found.frame_num)
                if clips.get("max_s") and t - opened[0].start_s >= clips["max_s"]:
                    cut(n)  # a shot longer than max_s (a lecture's one camera) goes on as a new clip
            else:
                while starts * stride <= t:
                    opened.append(_Samples(starts * stride, n, capacity, starts * stride + window))
                    starts += 1
                while opened and opened[0].end_s <= t:
                    done.append(opened.pop(0))
            wanted = [s for s in opened if (s.end_s is None or t < s.end_s) and s.wants(n)]
            if wanted:
                image = frame.to_ndarray(format="rgb24", **size)
                for s in wanted:
                    s.add(n, t, image)
            while len(done) > 1:  # a window no frame fell in (shorter than a frame) is no clip
                closed = done.popleft()
                if closed.kept:
                    yield closed.clip(count, sampling, meta)
                    count += 1
    except VideoError:
        raise
    except Exception as e:  # a stream that breaks off mid-way: what came before it was yielded
        raise VideoError(f"video stream breaks off after {max(n, 0)} frames: {_message(e)}") from e
    if n < 0:
        raise VideoError("no video frames: no frame of the video stream decodes")
    end = t + 1.0 / rate
    if scenes:
        for found in detector.post_process(FrameTimecode(n, fps=rate)):
            cut(found.frame_num)
    for s in opened:
        s.end_s = end if s.end_s is None else min(s.end_s, end)
        done.append(s)
    tail = [s for s in done if s.kept]
    # Last windows shorter than min_s are slivers: dropped, unless one is the whole video.
    while not scenes and len(tail) > 1 and tail[-1].end_s - tail[-1].start_s < clips["min_s"]:
        tail.pop()
    for i, s in enumerate(tail):
        yield s.clip(count + i, sampling, meta, last=i == len(tail) - 1)
