"""Write a toy dataset as WebDataset-style tar shards (`<key>.mp4` + `<key>.json`) to any fsspec URI.

    python -m toyworld.shards --uri s3://bucket/toy --videos 64 --seed 7 --shard-size 16
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time

import fsspec

from toyworld.scene import clip_seed, make_clip


def video_key(seed: int, index: int) -> str:
    return f"toy{seed}_{index:06d}"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0  # fixed mtime: same seed, same bytes
    tar.addfile(info, io.BytesIO(data))


def write_shards(uri: str, videos: int, seed: int, shard_size: int = 16, storage_options: dict | None = None,
                 progress: bool = False, edition: int = 1) -> list[str]:
    """Render `videos` clips from `seed` into tar shards under `uri`; returns the shard URIs."""
    if videos < 0 or shard_size < 1:
        raise ValueError("videos must be >= 0 and shard_size >= 1")
    uri = uri.rstrip("/")
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    written = []
    t0 = time.time()
    for shard, lo in enumerate(range(0, videos, shard_size)):
        path = f"{root}/shard-{shard:06d}.tar"
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(lo, min(lo + shard_size, videos)):
                scene, mp4 = make_clip(clip_seed(seed, i), edition=edition)
                key = video_key(seed, i)
                _add(tar, f"{key}.mp4", mp4)
                meta = {"video_id": key, "seed": seed, "index": i, "scene": scene.to_json()}
                _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        with fs.open(path, "wb") as f:
            f.write(buf.getvalue())
        written.append(fs.unstrip_protocol(path))
        if progress:
            done = min(lo + shard_size, videos)
            print(f"\rrendered {done}/{videos} videos into {len(written)} shards ({time.time() - t0:.1f}s)",
                  end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uri", required=True)
    ap.add_argument("--videos", type=int, default=64)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--edition", type=int, choices=(1, 2), default=1, help="toy world edition (2: two-event clips)")
    args = ap.parse_args(argv)
    shards = write_shards(args.uri, args.videos, args.seed, args.shard_size, progress=True, edition=args.edition)
    print(f"wrote {args.videos} videos in {len(shards)} shards under {args.uri}")


if __name__ == "__main__":
    main()
