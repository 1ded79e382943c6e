"""Render a few toy videos and caption them with a toy target: a quick look at the toy world.

    python -m toyworld.demo --family llava_onevision --videos 8
"""

from __future__ import annotations

import argparse
import time

from toyworld import families, grammar, score
from toyworld.evaluate import greedy_captions, load_pair, render_videos


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=families.FAMILIES, default="llava_onevision")
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args(argv)
    t0 = time.time()
    processor, target, _ = load_pair(args.family)
    scenes, _, frames = render_videos(args.videos, args.seed)
    t1 = time.time()
    captions, ids = greedy_captions(processor, target, frames, grammar.PROMPT)
    t2 = time.time()
    for scene, caption in zip(scenes, captions):
        print(f"- {caption}\n    truth: {scene.attributes()}")
    result = score.score(captions, [s.attributes() for s in scenes])
    tokens = sum(len(i) for i in ids)
    print(f"\n{args.videos} videos: attribute accuracy {result['attr_acc']:.3f}; load+render {t1 - t0:.1f}s, "
          f"captioning {t2 - t1:.1f}s ({tokens / (t2 - t1):.0f} tokens/s on {target.device})")


if __name__ == "__main__":
    main()
