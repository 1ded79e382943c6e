"""Real-size videos for the job's GPU measurement: 640x360 H.264 at 30 fps, 8-20 s, as WebDataset shards.

    python -m bench.videos --out /tmp/shards --rows 192 --distinct 48 --seed 0

Content: a textured background panning slowly, with coloured shapes moving across it, so that the
encoder and decoder meet motion and texture at a web video's bitrate rather than flat colour. A
dataset of `rows` videos is made of `distinct` renders, each appearing under several keys (the
decode stage decodes every row afresh, so repeats cost what new videos would; rendering them all
would only spend the lent machine's time).
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

WIDTH, HEIGHT, FPS = 640, 360, 30
SECONDS = (8.0, 20.0)


def video_id(seed: int, index: int) -> str:
    return f"gpu{seed}_{index:06d}"


def render(seed: int) -> bytes:
    """One video: H.264 in MP4, 640x360, 30 fps, 8-20 s."""
    import av

    rng = np.random.default_rng(seed)
    frames = int(rng.uniform(*SECONDS) * FPS)
    # A texture larger than the frame, panned: smooth colour plus fine grain.
    th, tw = HEIGHT + 200, WIDTH + 400
    yy, xx = np.mgrid[0:th, 0:tw].astype(np.float32)
    base = np.stack([np.sin(xx / rng.uniform(40, 120) + c) * np.cos(yy / rng.uniform(40, 120) - c)
                     for c in rng.uniform(0, 6.28, 3)], -1)
    texture = (110 + 60 * base + rng.normal(0, 12, (th, tw, 3))).clip(0, 255).astype(np.uint8)
    shapes = [(rng.integers(20, 90, 2), rng.integers(0, 255, 3), rng.uniform(-4, 4, 2), rng.uniform(0, 1, 2))
              for _ in range(rng.integers(2, 6))]
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS, options={"crf": "23", "preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for t in range(frames):
            y0, x0 = int(100 + 90 * np.sin(t / 150)), int(200 + 190 * np.sin(t / 230))
            frame = texture[y0:y0 + HEIGHT, x0:x0 + WIDTH].copy()
            for (h, w), colour, velocity, start in shapes:
                cy = int((start[0] * HEIGHT + velocity[0] * t) % (HEIGHT - h))
                cx = int((start[1] * WIDTH + velocity[1] * t) % (WIDTH - w))
                frame[cy:cy + h, cx:cx + w] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write_shards(out: str | Path, rows: int, distinct: int, seed: int = 0, shard_size: int = 16,
                 workers: int | None = None, log=print) -> dict:
    """Render `distinct` videos (in parallel) and write `rows` samples over them as tar shards."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        mp4s = list(pool.map(render, [seed * 100_003 + i for i in range(distinct)]))
    rendered_s = time.perf_counter() - t0
    for shard, lo in enumerate(range(0, rows, shard_size)):
        with tarfile.open(out / f"shard-{shard:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(lo, min(lo + shard_size, rows)):
                key = video_id(seed, i)
                _add(tar, f"{key}.mp4", mp4s[i % distinct])
                _add(tar, f"{key}.json", json.dumps({"video_id": key, "render": i % distinct}).encode())
    sizes = [len(m) for m in mp4s]
    facts = {"rows": rows, "distinct": distinct, "width": WIDTH, "height": HEIGHT, "fps": FPS,
             "seconds": list(SECONDS), "codec": "h264", "mean_kb": sum(sizes) / len(sizes) / 1e3,
             "render_s": round(rendered_s, 1)}
    log(f"rendered {distinct} videos ({facts['mean_kb']:.0f} kB mean) in {rendered_s:.1f} s; "
        f"{rows} rows in {-(-rows // shard_size)} shards under {out}")
    return facts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", type=int, default=192)
    ap.add_argument("--distinct", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args(argv)
    facts = write_shards(args.out, args.rows, args.distinct, args.seed, workers=args.workers)
    (Path(args.out) / "_videos.json").write_text(json.dumps(facts, indent=1) + "\n")


if __name__ == "__main__":
    main()
