"""Does the online audit's estimate hold? A toy job audited on a 10 % sample against the same job
audited on every video.

    python -m bench.audit --videos 256 --fraction 0.1 --json bench/audit.json

Renders `--videos` toy clips, runs the caption job twice on a local Ray cluster (CPU): once with
`audit.fraction=1.0` (the agreement over all videos: the quantity the audit estimates) and once
with `--fraction` (the estimate and its confidence interval, as a user's job reports it). Checks
that the truth lies inside the interval and that the sampled run audited the same videos'
twins as the full run (selection is by video_id). On the toy world it also reports attribute
agreement: the share of captions naming the same attributes as their exact twin.
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from bench.report import machine
from bench.timing import measure
from pipeline.audit import estimate, selected
from pipeline.config import load_config
from toyworld.score import parse_caption
from toyworld.shards import write_shards

ROOT = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> dict[str, dict]:
    return {r["video_id"]: r for f in sorted(path.glob("*.parquet")) for r in pq.read_table(f).to_pylist()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=256)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--family", default="llava_onevision", choices=["llava_onevision", "qwen2_5_vl"])
    ap.add_argument("--theta", type=float, default=None, help="override the checkpoint's theta (None: shipped)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from pipeline.job import run

    tmp = Path(tempfile.mkdtemp(prefix="lvspec-audit-"))
    print(f"rendering {args.videos} toy clips (seed {args.seed}) ...", flush=True)
    write_shards(str(tmp / "videos"), videos=args.videos, seed=args.seed, shard_size=16)
    common = [f"source.uri={tmp / 'videos'}", f"output.uri={tmp / 'out'}", "generation.k=4",
              f"model.target=toyworld/models/{args.family}-target", f"model.draft=toyworld/models/{args.family}-draft",
              *([f"generation.theta={args.theta}"] if args.theta is not None else [])]
    runs = {}
    for name, fraction in (("all", 1.0), ("sample", args.fraction)):
        print(f"== job {name}: audit.fraction={fraction} ==", flush=True)
        job = measure(lambda: run(load_config(ROOT / "jobs/configs/local.yaml", [*common, f"job_id={name}",
                                                                                 f"audit.fraction={fraction}"])))
        runs[name] = job.result
        runs[name]["bench_wall_s"] = job.seconds
    every, sample = _rows(tmp / "out" / "all"), _rows(tmp / "out" / "sample")
    truth = estimate([r["audit_agreement"] for r in every.values() if r["audit_agreement"] is not None])
    est = runs["sample"]["audit"]
    chosen = sorted(v for v, r in sample.items() if r["audit_caption"] is not None)
    same_twins = all(sample[v]["audit_caption"] == every[v]["audit_caption"] for v in chosen)
    attrs = [parse_caption(r["caption"]) == parse_caption(r["audit_caption"]) for r in every.values()
             if r["audit_caption"] is not None]
    report = {
        "command": f"python -m bench.audit --videos {args.videos} --fraction {args.fraction} --seed {args.seed} "
                   f"--family {args.family}" + (f" --theta {args.theta}" if args.theta is not None else ""),
        "machine": machine(), "date": datetime.date.today().isoformat(),
        "videos": len(every), "audited_in_sample": len(chosen),
        "selection_matches_hash": chosen == sorted(v for v in every if selected(v, args.fraction)),
        "sample_twins_equal_full_run_twins": same_twins,
        "agreement_all_videos": truth["agreement"], "identical_all_videos": truth["identical"],
        "estimate": est, "truth_within_interval": est["low"] <= truth["agreement"] <= est["high"],
        "attribute_agreement_all_videos": sum(attrs) / max(len(attrs), 1),
        "wall_s": {k: round(r["bench_wall_s"], 1) for k, r in runs.items()},
        "mean_accepted_length": {k: r["caption"]["mean_accepted_length"] for k, r in runs.items()},
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
