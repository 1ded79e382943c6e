"""Procedural toy videos: coloured shapes moving over a plain background, encoded as H.264 mp4.

A `Scene` is the ground truth of one clip. Everything is deterministic from a seed.

Two editions. Edition 1: one event (the shapes move one way). Edition 2 adds clips with two
consecutive events, half-way through the clip: the shapes turn (`then_direction`) or change colour
(`then_colour`); their captions must state the events in order (the `order` attribute).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 85, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 205),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"black": (18, 18, 18), "white": (238, 238, 238), "gray": (125, 125, 125)}
COUNTS = (1, 2, 3)
SIZES = {"small": 0.085, "large": 0.125}  # radius as a fraction of the frame side
DIRECTIONS = {"leftward": (-1, 0), "rightward": (1, 0), "upward": (0, -1), "downward": (0, 1)}

ATTRIBUTES = ("count", "size", "colour", "shape", "direction", "background")
# Edition 2: colour and direction are the sets shown ("blue+red"), `order` the change in order
# ("red>blue", "leftward>upward") or "none".
ATTRIBUTES_V2 = (*ATTRIBUTES, "order")
EDITIONS = (1, 2)
CHANGES = (None, "direction", "colour")  # edition 2 draws each with equal chance

# Default clip geometry: small enough to train and run on CPU, big enough to see shapes.
FRAME_SIZE = 64
NUM_FRAMES = 16
FPS = 8
TURN_S = NUM_FRAMES / FPS / 2  # edition 2: when the second event starts (half-way through a default clip)


@dataclass(frozen=True)
class Scene:
    """Ground truth for one clip: the attributes a caption must get right, plus layout."""

    count: int
    size: str
    colour: str
    shape: str
    direction: str
    background: str
    starts: tuple[tuple[float, float], ...]  # shape centres at frame 0, in [0, 1] frame units
    speed: float  # frame sides per second
    edition: int = 1
    then_direction: str | None = None  # edition 2: the direction taken half-way through
    then_colour: str | None = None  # edition 2: the colour taken half-way through

    def attributes(self) -> dict[str, str | int]:
        if self.edition == 1:
            return {name: getattr(self, name) for name in ATTRIBUTES}
        directions = [self.direction] + [self.then_direction] * bool(self.then_direction)
        colours = [self.colour] + [self.then_colour] * bool(self.then_colour)
        changed = directions if len(directions) == 2 else colours if len(colours) == 2 else None
        return {"count": self.count, "size": self.size, "colour": "+".join(sorted(colours)), "shape": self.shape,
                "direction": "+".join(sorted(directions)), "background": self.background,
                "order": ">".join(changed) if changed else "none"}

    def colour_at(self, frame: int, fps: int = FPS) -> str:
        """The shapes' colour in frame `frame`: a change, if any, happens at TURN_S."""
        return self.then_colour if self.then_colour and frame / fps >= TURN_S else self.colour

    def offset(self, frame: int, fps: int = FPS) -> tuple[float, float]:
        """How far (frame units) the shapes have moved by frame `frame`."""
        vx, vy = DIRECTIONS[self.direction]
        if not self.then_direction or frame / fps <= TURN_S:
            shift = self.speed * frame / fps
            return vx * shift, vy * shift
        wx, wy = DIRECTIONS[self.then_direction]
        before, after = self.speed * TURN_S, self.speed * (frame / fps - TURN_S)
        return vx * before + wx * after, vy * before + wy * after


    def to_json(self) -> dict:
        d = asdict(self)
        d["starts"] = [list(p) for p in self.starts]
        return d

    @classmethod
    def from_json(cls, d: dict) -> Scene:
        d = dict(d)
        d["starts"] = tuple(tuple(p) for p in d["starts"])
        return cls(**d)


def sample_scene(rng: np.random.Generator, duration_s: float = NUM_FRAMES / FPS, edition: int = 1) -> Scene:
    """Draw a scene uniformly over attributes, with shapes laid out in separate lanes."""
    if edition == 2:
        return _sample_scene_v2(rng, duration_s)
    if edition != 1:
        raise ValueError(f"edition must be one of {EDITIONS}, got {edition!r}")
    count = int(rng.choice(COUNTS))
    size = str(rng.choice(list(SIZES)))
    direction = str(rng.choice(list(DIRECTIONS)))
    radius = SIZES[size]
    speed = float(rng.uniform(0.18, 0.26))
    travel = speed * duration_s
    dx, dy = DIRECTIONS[direction]
    # Centres across the motion axis are spaced at least 2.3 radii apart, so shapes never touch;
    # positions along the axis leave room to travel without leaving the frame.
    spacing = rng.uniform(2.3 * radius, (1 - 2 * radius) / (count - 1)) if count > 1 else 0.0
    first = rng.uniform(radius, 1 - radius - spacing * (count - 1))
    starts = []
    for k in range(count):
        across = first + spacing * k
        lo, hi = radius + 0.02, 1.0 - radius - 0.02 - travel
        along = rng.uniform(lo, max(lo, hi))
        if (dx, dy) in ((-1, 0), (0, -1)):
            along = 1.0 - along
        starts.append((along, across) if dx else (across, along))
    return Scene(
        count=count,
        size=size,
        colour=str(rng.choice(list(COLOURS))),
        shape=str(rng.choice(SHAPES)),
        direction=direction,
        background=str(rng.choice(list(BACKGROUNDS))),
        starts=tuple((float(x), float(y)) for x, y in starts),
        speed=speed,
    )


def _sample_scene_v2(rng: np.random.Generator, duration_s: float) -> Scene:
    """Edition 2: a third of the clips as edition 1, a third turn half-way, a third change colour.

    Shapes sit in lanes across the first direction and move as one group; the group's place is
    drawn among those that keep every shape inside the frame along the whole (possibly bent) path.
    """
    change = CHANGES[int(rng.integers(len(CHANGES)))]
    count = int(rng.choice(COUNTS))
    size = str(rng.choice(list(SIZES)))
    names = list(DIRECTIONS)
    direction = str(rng.choice(names))
    then_direction = str(rng.choice([d for d in names if d != direction])) if change == "direction" else None
    colour = str(rng.choice(list(COLOURS)))
    then_colour = str(rng.choice([c for c in COLOURS if c != colour])) if change == "colour" else None
    radius = SIZES[size]
    speed = float(rng.uniform(0.13, 0.17) if then_direction else rng.uniform(0.18, 0.26))
    margin = radius + 0.02
    lanes_room = 1 - 2 * margin - (speed * duration_s / 2 if then_direction else 0.0)
    spacing = float(rng.uniform(2.2 * radius, max(2.2 * radius, lanes_room / (count - 1)))) if count > 1 else 0.0
    dx, dy = DIRECTIONS[direction]
    lanes = [(0.0, spacing * k) if dx else (spacing * k, 0.0) for k in range(count)]
    probe = Scene(count, size, colour, "circle", direction, "black", ((0.0, 0.0),), speed, 2, then_direction)
    path = [probe.offset(frame, 1000) for frame in range(0, int(duration_s * 1000) + 1, 25)]
    group_start = []
    for axis in (0, 1):
        lo = margin - min(p[axis] for p in path) - min(lane[axis] for lane in lanes)
        hi = 1 - margin - max(p[axis] for p in path) - max(lane[axis] for lane in lanes)
        group_start.append(float(rng.uniform(lo, max(lo, hi))))
    starts = tuple((group_start[0] + ax, group_start[1] + ay) for ax, ay in lanes)
    return Scene(count=count, size=size, colour=colour, shape=str(rng.choice(SHAPES)), direction=direction,
                 background=str(rng.choice(list(BACKGROUNDS))), starts=starts, speed=speed, edition=2,
                 then_direction=then_direction, then_colour=then_colour)


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.82 * r
    if shape == "triangle":  # pointing up, base at +0.7r
        return (dy <= 0.7 * r) & (dy >= -r + 1.9 * np.abs(dx))
    if shape == "cross":
        arm = 0.32 * r
        inside = np.maximum(np.abs(dx), np.abs(dy)) <= r
        return inside & ((np.abs(dx) <= arm) | (np.abs(dy) <= arm))
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, num_frames: int = NUM_FRAMES, size: int | tuple[int, int] = FRAME_SIZE,
           fps: int = FPS, rng: np.random.Generator | None = None) -> np.ndarray:
    """Render a clip as uint8 RGB frames of shape (T, H, W, 3), 2x supersampled for soft edges."""
    height, width = (size, size) if isinstance(size, int) else size
    ss = 2
    ys, xs = np.mgrid[0:height * ss, 0:width * ss].astype(np.float32)
    xs = (xs + 0.5) / (width * ss)
    ys = (ys + 0.5) / (height * ss)
    aspect = width / height
    bg = np.array(BACKGROUNDS[scene.background], np.float32)
    radius = SIZES[scene.size]
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        ox, oy = scene.offset(t, fps)
        fg = np.array(COLOURS[scene.colour_at(t, fps)], np.float32)
        mask = np.zeros(xs.shape, bool)
        for cx, cy in scene.starts:
            px, py = cx + ox, cy + oy
            mask |= _shape_mask(scene.shape, (xs - px) * aspect, ys - py, radius)
        cover = mask.reshape(height, ss, width, ss).mean(axis=(1, 3))[..., None]
        img = bg * (1 - cover) + fg * cover
        if rng is not None:  # sensor noise, so the codec sees texture as in real footage
            img = img + rng.normal(0, 3.0, img.shape)
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


# Per file extension: the FFmpeg muxer and a video encoder PyAV's wheels carry (a user's files come in
# all of these; the tests make one of each).
CONTAINERS = {"mp4": ("mp4", "libx264"), "m4v": ("mp4", "libx264"), "mov": ("mov", "libx264"),
              "mkv": ("matroska", "libx264"), "webm": ("webm", "libvpx-vp9"), "avi": ("avi", "mpeg4"),
              "ts": ("mpegts", "libx264"), "m2ts": ("mpegts", "libx264"), "mts": ("mpegts", "libx264"),
              "mpg": ("mpeg", "mpeg1video"), "mpeg": ("mpeg", "mpeg2video"), "3gp": ("3gp", "libx264"),
              "flv": ("flv", "flv"), "wmv": ("asf", "wmv2"), "ogv": ("ogg", "libvpx"), "gif": ("gif", "gif")}
MPEG_RATE = 24  # MPEG-1/2 video allows only the broadcast frame rates


def encode_video(frames: np.ndarray, ext: str = "mp4", fps: int = FPS, crf: int = 20,
                 codec: str | None = None) -> bytes:
    """Encode (T, H, W, 3) uint8 RGB frames in the container of file extension `ext` (`CONTAINERS`;
    H.264 in MP4 by default, `codec` to choose another) and return the file's bytes."""
    import av  # imported here: only producers of videos need PyAV

    muxer, default = CONTAINERS[ext]
    codec = codec or default
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=muxer) as container:
        stream = container.add_stream(codec, rate=MPEG_RATE if codec.startswith("mpeg") and codec != "mpeg4" else fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        stream.thread_count = 1  # tiny clips: threads only oversubscribe parallel renderers
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "veryfast", "tune": "zerolatency", "threads": "1"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def encode_mp4(frames: np.ndarray, fps: int = FPS, crf: int = 20, codec: str = "libx264") -> bytes:
    """Encode (T, H, W, 3) uint8 RGB frames as an mp4 (H.264 by default) and return its bytes."""
    return encode_video(frames, "mp4", fps, crf, codec)


def decode_mp4(data: bytes) -> np.ndarray:
    """Decode all frames of an mp4 with PyAV as (T, H, W, 3) uint8 RGB (training-side reader)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        container.streams.video[0].thread_count = 1
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def make_clip(seed: int, num_frames: int = NUM_FRAMES, size: int = FRAME_SIZE, fps: int = FPS,
              edition: int = 1) -> tuple[Scene, bytes]:
    """One deterministic clip from a seed: its scene and its mp4 bytes."""
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng, duration_s=num_frames / fps, edition=edition)
    return scene, encode_mp4(render(scene, num_frames, size, fps, rng=rng), fps=fps)


def clip_seed(seed: int, index: int) -> int:
    """The render seed of clip `index` of a dataset drawn from `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
