"""Caption a video dataset with LVSpec on Ray Data.

    python -m jobs.caption --config jobs/configs/local.yaml [key=value ...]
    ray job submit --working-dir . -- python -m jobs.caption --config jobs/configs/cluster.yaml

Re-running a job with the same job_id captions only what its output lacks. Exit codes: 0 done;
2 a bad config; 4 the audit's agreement estimate fell below `audit.min_agreement`.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.config import ConfigError, load_config


def toy_quality(table) -> dict:
    """Attribute accuracy against ground truth, when the rows carry toy-world truth."""
    from toyworld.score import score

    pairs = [(r["caption"], json.loads(r["truth"])["scene"]) for r in table.to_pylist()
             if r["truth"] and r["error"] is None and "scene" in json.loads(r["truth"])]
    if not pairs:
        return {}
    result = score([c for c, _ in pairs], [t for _, t in pairs])
    return {"attr_acc": result["attr_acc"], "attr_acc_per_attribute": result["per_attribute"],
            "scored_videos": result["videos"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML file (see jobs/configs/)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. generation.k=8")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from pipeline.job import human_summary, run

        summary = run(cfg, quality=toy_quality)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(human_summary(summary))
    from pipeline.audit import below

    if (why := below(summary, cfg.audit.min_agreement)) is not None:
        print(f"  ALERT  : {why}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
