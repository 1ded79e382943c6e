"""Nightly incremental labeling: caption only what earlier runs of this dataset and these caption
settings have not, into `<output.uri>/<dataset>/series=<config_hash>/run_date=<YYYY-MM-DD>/`.

    python -m jobs.nightly --config jobs/configs/cluster.yaml [--recaption] [key=value ...]
    ray job submit --working-dir . -- python -m jobs.nightly --config jobs/configs/cluster.yaml

Takes the same configs and overrides as jobs.caption (job ids come from the dataset and the date);
the `nightly` section holds what only it needs. Exit codes: 0 done; 1 the run failed, or more
than `nightly.max_failed_fraction` of its videos failed (so a scheduler alerts); 2 a bad config
or changed caption settings without --recaption; 3 another run of the dataset is in progress;
4 the audit's agreement estimate fell below `audit.min_agreement`.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, load_config, load_function


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML file (see jobs/configs/)")
    ap.add_argument("--recaption", action="store_true",
                    help="the caption settings changed: start a new series and caption every video again")
    ap.add_argument("--quality", default=None, metavar="MODULE:FUNCTION",
                    help="a function (table of this run's rows) -> dict merged into the summary")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. nightly.run_date=2026-11-24")
    args = ap.parse_args(argv)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    try:
        quality = load_function(args.quality, "--quality") if args.quality else None
        cfg = load_config(args.config, ["job_id=nightly", *args.overrides])
        from pipeline.job import human_summary, run
        from pipeline.nightly import Busy, Night, SettingsChanged
        from pipeline.preflight import preflight

        night = Night.plan(cfg)
        cfg.job_id = night.job_id
        _, base, _, series, partition = night.paths()
        preflight(cfg, base)  # the source is there and the dataset's directory takes writes
        night.acquire(args.recaption, log)  # only an admitted run creates its partition
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SettingsChanged as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Busy as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    try:
        done = night.done(log)
        summary = run(cfg, log=log, quality=quality, out=partition, done=done)
        latest = night.write_latest(log)
        failed_share = summary["failed_videos"] / max(summary["videos"], 1)
        over = failed_share > cfg.nightly.max_failed_fraction
        status = "too_many_failures" if over else "succeeded"
        message = (f"{failed_share:.0%} of this night's videos failed (limit {cfg.nightly.max_failed_fraction:.0%})"
                   if over else "")
        night.record("end", status, message, summary)
    except BaseException as e:  # the ledger says how the night ended, whatever stopped it
        night.record("end", "failed", f"{type(e).__name__}: {str(e)[:500]}")
        night.release()
        raise
    night.release()
    print(human_summary(summary))
    print(f"  nightly: dataset {night.dataset}, series {night.config_hash}, run {night.run_id}; "
          f"{len(done)} videos were already captioned; latest view holds {latest} rows ({series}/latest.parquet)")
    if over:
        print(f"  ALERT  : {message}", file=sys.stderr)
        return 1
    from pipeline.audit import below

    if (why := below(summary, cfg.audit.min_agreement)) is not None:
        print(f"  ALERT  : {why}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
