"""Pipeline efficiency on the toy world: the Ray job's caption tokens/s vs the engine alone.

    python -m bench.pipeline --family llava_onevision --videos 64 --json bench/pipeline.json

Renders toy shards to a local bucket, runs the captioning job on a local Ray cluster (CPU), then
captions the same videos with `lvspec.generate` in-process at the same batch size. Reports both
tokens/s, their ratio, and the decode stage's frames/s per core.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

from bench.report import machine, write_markdown_section
from bench.timing import measure
from lvspec import Engine
from lvspec.config import shipped_settings
from pipeline.config import load_config, spec_config
from pipeline.decode import chat_prompt
from pipeline.frames import read_frames
from toyworld import families
from toyworld.families import load_pair
from toyworld.shards import write_shards


def engine_alone(family: str, mp4s: list[bytes], cfg) -> dict:
    """Decode + process in-process, then generate in batches like one caption replica would."""
    processor, target, draft = load_pair(family)
    text = chat_prompt(processor, cfg.model.prompt)
    decoded = measure(lambda: [read_frames(b, cfg.decode.num_frames, max_side=cfg.decode.max_side)[0] for b in mp4s])
    frames, decode_s = decoded.result, decoded.seconds
    processed = measure(lambda: [processor(text=[text], videos=[f], return_tensors="pt") for f in frames])
    rows, processed_s = processed.result, decode_s + processed.seconds  # decoded, then processed
    spec = spec_config(cfg.generation, shipped_settings(families.model_dir(family, "target")))
    engine = Engine(target, draft, spec, slots=cfg.caption.slots or cfg.caption.batch_size)  # as a replica holds it
    # All rows streamed through the slots.
    generated = measure(lambda: sum(len(r.tokens) for r in engine.generate(rows)))
    tokens, generate_s = generated.result, generated.seconds
    n_frames = sum(len(f) for f in frames)
    return {"tokens": tokens, "generate_s": round(generate_s, 3), "tokens_per_s": tokens / generate_s,
            "decode_frames_per_s": n_frames / decode_s, "decode_and_process_frames_per_s": n_frames / processed_s}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=families.FAMILIES, default="llava_onevision")
    ap.add_argument("--videos", type=int, default=64)
    ap.add_argument("--seed", type=int, default=2027)
    ap.add_argument("--json", required=True)
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    from pipeline.job import human_summary, run

    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/bucket/toy"
        write_shards(src, args.videos, args.seed, shard_size=16)
        overrides = [f"job_id=bench-{args.family}", f"source.uri={src}", f"output.uri={tmp}/out",
                     f"model.target=toyworld/models/{args.family}-target",
                     f"model.draft=toyworld/models/{args.family}-draft"]
        cfg = load_config(Path(__file__).parents[1] / "jobs/configs/local.yaml", overrides)
        summary = run(cfg)
        print(human_summary(summary), file=sys.stderr)
        from toyworld.scene import clip_seed, make_clip

        mp4s = [make_clip(clip_seed(args.seed, i))[1] for i in range(args.videos)]
        alone = engine_alone(args.family, mp4s, cfg)
    c, d = summary["caption"], summary["decode"]
    report = {
        "command": "python -m bench.pipeline " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "date": datetime.date.today().isoformat(), "family": args.family,
        "videos": args.videos, "caption_batch_size": cfg.caption.batch_size, "decode_actors": cfg.decode.actors,
        "pipeline": {"wall_s": summary["wall_s"], "tokens": c["tokens"], "tokens_per_s_end_to_end": c["tokens_per_s_wall"],
                     "tokens_per_s_in_caption_stage": c["tokens_per_s_engine"],
                     "decode_frames_per_s_per_core": d["frames_per_s_per_core"]},
        "engine_alone": alone,
    }
    report["efficiency_end_to_end"] = report["pipeline"]["tokens_per_s_end_to_end"] / alone["tokens_per_s"]
    report["efficiency_caption_stage"] = report["pipeline"]["tokens_per_s_in_caption_stage"] / alone["tokens_per_s"]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    p, a = report["pipeline"], alone
    body = "\n".join([
        f"Command: `{report['command']}`  ", f"Machine: {report['machine']}  ", f"Date: {report['date']}", "",
        f"{args.videos} toy videos, {args.family}, lvspec, caption batch {cfg.caption.batch_size}, "
        f"{cfg.decode.actors} decode actor, 1 caption replica, local Ray on CPU.", "",
        "| | tokens/s | note |", "|---|---|---|",
        f"| engine alone (in-process `lvspec.generate`, same rows and batch size) | {a['tokens_per_s']:.1f} | |",
        f"| pipeline, caption stage busy time | {p['tokens_per_s_in_caption_stage']:.1f} | "
        f"efficiency {report['efficiency_caption_stage']:.2f} |",
        f"| pipeline, end to end (wall clock incl. Ray start, model loads, decode) | {p['tokens_per_s_end_to_end']:.1f} | "
        f"efficiency {report['efficiency_end_to_end']:.2f} |", "",
        f"Decode stage: {p['decode_frames_per_s_per_core']:.0f} frames/s per core (decord + HF processor, in the "
        f"pipeline); decord alone {a['decode_frames_per_s']:.0f} frames/s, decord + processor "
        f"{a['decode_and_process_frames_per_s']:.0f} frames/s on one core.",
    ])
    if args.markdown:
        write_markdown_section(Path(args.markdown), body, tag="pipeline-bench",
                               title="Pipeline efficiency (Ray job vs engine alone)")
    print(body)


if __name__ == "__main__":
    main()
