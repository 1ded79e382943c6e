"""Caption a video dataset with LVSpec on Ray Data.

    python -m jobs.caption --config jobs/configs/local.yaml [key=value ...]
    ray job submit --working-dir . -- python -m jobs.caption --config jobs/configs/cluster.yaml

Re-running a job with the same job_id captions only what its output lacks. Exit codes: 0 done;
2 a bad config; 4 the audit's agreement estimate fell below `audit.min_agreement`.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, load_config, load_function


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML file (see jobs/configs/)")
    ap.add_argument("--quality", default=None, metavar="MODULE:FUNCTION",
                    help="a function (table of this run's rows) -> dict merged into the summary, e.g. "
                         "toyworld.score:job_quality (accuracy against the toy world's ground truth)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. generation.k=8")
    args = ap.parse_args(argv)
    try:
        quality = load_function(args.quality, "--quality") if args.quality else None
        cfg = load_config(args.config, args.overrides)
        from pipeline.job import human_summary, run

        summary = run(cfg, quality=quality)
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
