"""Whether two benchmark JSONs agree on everything but speed: the check that a refactor left the
decoding unchanged (tau, retention, anchor P/R, token and cycle counts, shares, every config value).

    python -m bench.toy --all --videos 200 --seed 1234 --json /tmp/toy.json
    python -m bench.compare bench/toyworld.json /tmp/toy.json

Values under keys naming a speed or a run (tokens_per_s, seconds, speedup, command, machine, date)
are skipped; a key only one side has is reported (a setting added since is one). Exit status 1 when
a compared value differs.
"""

from __future__ import annotations

import argparse
import json
import sys

SPEED = ("tokens_per_s", "seconds", "speedup", "command", "machine", "date")


def leaves(value, path: str = ""):
    """(path, value) of every scalar (or list of scalars) in a JSON document."""
    if isinstance(value, dict):
        for key, v in value.items():
            yield from leaves(v, f"{path}/{key}")
    elif isinstance(value, list) and value and all(isinstance(v, (dict, list)) for v in value):
        for i, v in enumerate(value):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, value


def differences(a, b) -> tuple[int, list[tuple[str, object, object]]]:
    """(values equal, [(path, a's, b's)] that differ or one side lacks), speed keys skipped."""
    left, right = dict(leaves(a)), dict(leaves(b))
    compared = [p for p in sorted(set(left) | set(right)) if not any(s in p.rsplit("/", 1)[-1] for s in SPEED)]
    missing = "<absent>"
    diff = [(p, left.get(p, missing), right.get(p, missing)) for p in compared
            if left.get(p, missing) != right.get(p, missing)]
    return len(compared) - len(diff), diff


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recorded")
    ap.add_argument("new")
    args = ap.parse_args(argv)
    with open(args.recorded) as f, open(args.new) as g:
        equal, diff = differences(json.load(f), json.load(g))
    changed = [d for d in diff if "<absent>" not in (d[1], d[2])]
    print(f"{equal} values equal, {len(changed)} differ, {len(diff) - len(changed)} on one side only")
    for path, a, b in diff:
        print(f"  {path}: {a!r} -> {b!r}")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
