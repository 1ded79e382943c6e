"""Does `jobs.calibrate`'s choice hold on videos it never saw? Toy world, CPU.

    python -m bench.calibration --family llava_onevision --sample 64 --heldout 200 \\
        --target-agreement 0.995 --json bench/calibration.json
    python -m bench.calibration --edition 2 --family llava_onevision --json bench/calibration_v2.json

Runs `jobs.calibrate` (attributes kept as the agreement measure: the toy world can check facts)
on `--sample` videos of one seed, then captions `--heldout` videos of another seed with the target
alone (sd: exact) and with lvspec at the chosen setting, and scores both against the ground truth:
retention = lvspec attribute accuracy / sd attribute accuracy, plus the held-out agreement of the
chosen setting and its tau.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from bench.report import run_info
from lvspec import Engine
from lvspec.config import SpecConfig
from pipeline.calibrate import settings_of
from toyworld import score
from toyworld.families import engine_rows, load_pair, models_dir, render_videos
from toyworld.grammar import PROMPT
from toyworld.shards import write_shards

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="llava_onevision", choices=["llava_onevision", "qwen2_5_vl"])
    ap.add_argument("--sample", type=int, default=64)
    ap.add_argument("--sample-seed", type=int, default=4243)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--heldout-seed", type=int, default=1234)
    ap.add_argument("--target-agreement", type=float, default=0.995)
    ap.add_argument("--edition", type=int, choices=(1, 2), default=1, help="toy world edition (videos, models)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    models = models_dir(args.edition)
    measure = "toyworld.score:attribute_agreement" + ("_v2" if args.edition == 2 else "")
    agreement = score.attribute_agreement_v2 if args.edition == 2 else score.attribute_agreement

    from jobs.calibrate import main as calibrate

    tmp = Path(tempfile.mkdtemp(prefix="lvspec-calibration-"))
    write_shards(str(tmp / "videos"), videos=args.sample, seed=args.sample_seed, shard_size=16, edition=args.edition)
    grid_json = tmp / "grid.json"
    code = calibrate(["--config", str(ROOT / "jobs/configs/local.yaml"), "--videos", str(args.sample),
                      "--target-agreement", str(args.target_agreement), "--measure", measure,
                      "--json", str(grid_json), f"source.uri={tmp / 'videos'}", "generation.k=4",
                      f"model.target={models / f'{args.family}-target'}",
                      f"model.draft={models / f'{args.family}-draft'}"])
    assert code == 0, code
    grid = json.loads(grid_json.read_text())
    chosen = grid["chosen"]

    processor, target, draft = load_pair(args.family, models)
    scenes, _, frames = render_videos(args.heldout, seed=args.heldout_seed, edition=args.edition)
    rows = engine_rows(processor, frames, PROMPT)
    base = SpecConfig(mode="sd", k=4, max_new_tokens=48)
    out = {}
    with torch.inference_mode():
        for name, cfg in (("sd", base), ("lvspec", dataclasses.replace(base, mode="lvspec", **settings_of(chosen)))):
            results = Engine(target, draft, cfg, slots=32).generate(rows, tokenizer=processor.tokenizer)
            tokens = sum(r.stats.num_tokens - 1 for r in results)
            out[name] = {"captions": [r.text for r in results],
                         "tau": tokens / max(sum(r.stats.num_cycles for r in results), 1),
                         "attr_acc": score.score([r.text for r in results], [s.attributes() for s in scenes])["attr_acc"]}
    kept = [agreement(a, b) for a, b in zip(out["lvspec"]["captions"], out["sd"]["captions"])]
    report = {**run_info("bench.calibration", argv), "family": args.family, "edition": args.edition,
              "sample": {"videos": args.sample, "seed": args.sample_seed},
              "heldout": {"videos": args.heldout, "seed": args.heldout_seed},
              "target_agreement": args.target_agreement, "measure": measure,
              "chosen": chosen, "grid": grid["points"], "sd_tau_sample": grid["sd_tau"],
              "heldout_attr_acc": {k: v["attr_acc"] for k, v in out.items()},
              "heldout_retention": out["lvspec"]["attr_acc"] / out["sd"]["attr_acc"],
              "heldout_agreement": sum(kept) / len(kept),
              "heldout_tau": {k: v["tau"] for k, v in out.items()}}
    report["meets_target_heldout"] = report["heldout_retention"] >= args.target_agreement
    print(json.dumps({k: v for k, v in report.items() if k != "grid"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
