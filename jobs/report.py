"""A job's report: a self-contained HTML page and its charts as PNGs.

    python -m jobs.report OUTPUT_DIR [--out DIR] [--storage-option key=value ...]

OUTPUT_DIR holds a job's caption rows (`<output.uri>/<job_id>`, or a nightly run partition);
the report goes to OUTPUT_DIR/_report/ unless --out says where (local or fsspec URIs). See
pipeline/report.py for what the page shows. Exit codes: 0 written; 2 no caption rows there.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", help="the job's output directory")
    ap.add_argument("--out", default=None, help="where to write the report (default OUTPUT/_report)")
    ap.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                    help="fsspec option for remote URIs, e.g. endpoint_url=http://localhost:9000")
    args = ap.parse_args(argv)
    options = dict(o.split("=", 1) for o in args.storage_option)
    from pipeline.report import write

    try:
        f = write(args.output, args.out, options)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    a = f["audit"]
    print(f"report: {f['report']}\n  {f['videos']} videos, {f['clips']} clips ({f['video_hours']:.2f} hours), "
          f"{f['rows']} rows ({f['ok']} ok, {f['failed']} failed), {f['tokens']} caption "
          f"tokens, {f['draft_wording']:.1%} of them the draft's wording"
          + (f"; audit agreement {a['agreement']:.4f} on {a['videos']} videos" if a["videos"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
