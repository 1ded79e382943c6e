"""Choose theta for a fidelity target on a sample of the job's own videos.

    python -m jobs.calibrate --config PATH --videos 64 --target-agreement 0.995 [--write] [key=value ...]

Captions the first N videos of the job's source exactly (sd) and in lvspec over a grid of theta
and relevance probes, prints each point's tau and agreement with the exact captions, and picks
the fastest point that meets the target (see pipeline/calibrate.py). `--write` stores it in the
target's lvspec.json (a local checkpoint directory), where jobs read it unless their config sets
theta; otherwise the settings to put in the config are printed. Exit codes: 0 done; 2 a bad
config or argument.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_config, load_function


def _measure(name: str):
    """The agreement function `--measure` names."""
    if name == "words":
        from pipeline.audit import agreement

        return agreement
    return load_function(name, "--measure")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the job's YAML file (see jobs/configs/)")
    ap.add_argument("--videos", type=int, default=64, help="videos of the source to calibrate on")
    ap.add_argument("--target-agreement", type=float, default=0.995,
                    help="mean agreement with exact captions that the chosen setting must reach")
    ap.add_argument("--thetas", default=None, help="comma-separated grid (default: 0,0.1,...,0.6,0.8,1)")
    ap.add_argument("--measure", default="words",
                    help="agreement: 'words' (the audit's word-sequence similarity) or MODULE:FUNCTION, a "
                         "function (caption, exact caption) -> [0, 1], e.g. toyworld.score:attribute_agreement")
    ap.add_argument("--write", action="store_true", help="write the choice into the target's lvspec.json")
    ap.add_argument("--json", type=Path, default=None, help="write every grid point here")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. generation.k=4")
    args = ap.parse_args(argv)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    try:
        if args.videos < 1:
            raise ConfigError(f"--videos must be >= 1, got {args.videos}")
        if not 0.0 < args.target_agreement <= 1.0:
            raise ConfigError(f"--target-agreement must be in (0, 1], got {args.target_agreement}")
        try:
            thetas = sorted({0.0, *(float(t) for t in args.thetas.split(","))}) if args.thetas else None
        except ValueError:
            raise ConfigError(f"--thetas must be comma-separated numbers, got {args.thetas!r}") from None
        if thetas and not all(0.0 <= t <= 1.0 for t in thetas):
            raise ConfigError(f"--thetas must lie in [0, 1], got {args.thetas!r}")
        measure = _measure(args.measure)
        cfg = load_config(args.config, ["job_id=calibrate", *args.overrides])
        target_dir = Path(cfg.model.target)
        if args.write and not target_dir.is_dir():
            raise ConfigError(f"config key 'model.target': --write needs a local checkpoint directory, got "
                              f"{cfg.model.target!r}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from lvspec import Engine
    from pipeline import calibrate
    from pipeline.replica import load_engine

    rows = calibrate.sample(cfg, args.videos, log)
    base, tokenizer = load_engine(cfg.model, cfg.generation, num_cpus=cfg.caption.num_cpus,
                                  slots=cfg.caption.slots or cfg.caption.batch_size)
    if base.draft is None:
        print("error: config key 'model.draft': calibration compares lvspec with sd and needs a draft", file=sys.stderr)
        return 2
    result = calibrate.grid(lambda spec: Engine(base.target, base.draft, spec, slots=base.slots), base.cfg, rows,
                            tokenizer, **({"thetas": thetas} if thetas else {}), measure=measure, log=log)
    chosen = calibrate.choose(result["points"], args.target_agreement)
    result.update(target_agreement=args.target_agreement, measure=args.measure, chosen=chosen)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"calibrated on {result['videos']} videos (sd tau {result['sd_tau']:.2f}); target agreement "
          f"{args.target_agreement}")
    print(f"  {'probe':10s} {'theta':>5s} {'tau':>6s} {'agreement':>9s}  95% CI")
    for p in result["points"]:
        mark = "  <- chosen" if p is chosen else ""
        print(f"  {p['probe']:10s} {p['theta']:5.2f} {p['tau']:6.2f} {p['agreement']:9.4f}  "
              f"[{p['low']:.4f}, {p['high']:.4f}]{mark}")
    settings = calibrate.settings_of(chosen)
    if args.write:
        path = calibrate.write_settings(target_dir, chosen, args.target_agreement, result["videos"])
        print(f"  wrote {settings} to {path}")
    else:
        print(f"  settings: generation.theta={chosen['theta']} (probe: {chosen['probe']}); "
              f"--write stores them in the target's lvspec.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
