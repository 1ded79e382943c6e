"""The split-KV attention kernel's launch configuration, swept at the real models' decode shapes.

    python -m bench.attention --json $OUT/attention.json     # on a GPU

Per shape (a model's heads, a batch, a capacity, 1 or 5 new tokens a row): the kernel's time
(triton.testing.do_bench, median) for each (block of keys, pipeline stages, stretches a row), the
bytes of keys and values it must read (each row's band), and the share of HBM bandwidth reached.
Random keys (never zeros), rows at capacity less 128 tokens.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from bench.report import run_info
from lvspec.attention import _sms, split_attention, splits_for

SHAPES = {  # name: heads, kv heads, head size, capacity (3.2k-token LLaVA prompts, 1.2k Qwen ones)
    "llava-0.5b": (14, 2, 64, 3328), "llava-7b": (28, 4, 128, 3328), "qwen-32b": (40, 8, 128, 1408),
    "qwen-7b": (28, 4, 128, 1408)}


def sweep(batches, queries, hbm: float) -> list[dict]:
    from triton.testing import do_bench

    g = torch.Generator("cuda").manual_seed(0)
    out = []
    for (name, (heads, kvh, hd, capacity)), S, q in itertools.product(SHAPES.items(), batches, queries):
        query = torch.randn(S, q, heads, hd, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(S, kvh, capacity, hd, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn_like(k)
        pad = torch.zeros(S, dtype=torch.long, device="cuda")
        length = torch.full((S,), capacity - 128, dtype=torch.long, device="cuda")
        nbytes = 2 * S * kvh * (capacity - 128 + q) * hd * 2
        base = splits_for(S, kvh, capacity, _sms(0))
        runs = []
        for block_n, stages, scale in itertools.product((32, 64, 128), (2, 3), (1, 2)):
            splits = min(base * scale, 32)
            try:
                ms = do_bench(lambda: split_attention(query, k, v, pad, length, hd ** -0.5, None, splits=splits,
                                                      block_n=block_n, stages=stages), warmup=10, rep=40,
                              return_mode="median")
            except Exception as e:  # noqa: BLE001 - a configuration this GPU cannot launch (resources)
                runs.append({"block_n": block_n, "stages": stages, "splits": splits, "error": str(e)[:200]})
                continue
            runs.append({"block_n": block_n, "stages": stages, "splits": splits, "ms": ms,
                         "gb_per_s": nbytes / ms / 1e6, "hbm_share": nbytes / ms / 1e-3 / hbm})
        ok = [r for r in runs if "ms" in r]
        best = min(ok, key=lambda r: r["ms"])
        default = next(r for r in ok if r["block_n"] == 64 and r["stages"] == 2 and r["splits"] == base)
        out.append({"shape": name, "batch": S, "q": q, "capacity": capacity, "bytes": nbytes, "default": default,
                    "best": best, "runs": runs})
        print(f"{name:10s} bs {S:3d} q {q}: default {default['ms']:.3f} ms ({default['hbm_share']:.0%} of HBM), best "
              f"{best['ms']:.3f} ms ({best['hbm_share']:.0%}) at block_n {best['block_n']} stages {best['stages']} "
              f"splits {best['splits']} (default splits {base})", flush=True)
    return out


def markdown(report: dict) -> str:
    lines = [f"Command: `{report['command']}`  ", f"Machine: {report['machine']}  ", f"Date: {report['date']}  ",
             "Each row: the kernel alone (bf16, random keys, rows at capacity - 128), median of do_bench; "
             "bytes = each row's band of keys and values; default = what the engine launches "
             "(block of 64 keys, 2 stages, `splits_for`).", "",
             "| model heads | batch | new tokens | capacity | default ms | default HBM share | best ms | best HBM share "
             "| best (block, stages, stretches) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["shapes"]:
        d, b = r["default"], r["best"]
        lines.append(f"| {r['shape']} | {r['batch']} | {r['q']} | {r['capacity']} | {d['ms']:.3f} | {d['hbm_share']:.0%} "
                     f"| {b['ms']:.3f} | {b['hbm_share']:.0%} | {b['block_n']}, {b['stages']}, {b['splits']} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--hbm-tb-per-s", type=float, default=3.35, help="the card's HBM bandwidth (H100 SXM: 3.35)")
    ap.add_argument("--json", required=True)
    ap.add_argument("--markdown", help="with --report: write the table into this markdown file")
    ap.add_argument("--report", action="store_true", help="no sweep: the table of an earlier sweep's --json")
    args = ap.parse_args(argv)
    if args.report:
        from bench.report import write_markdown_section

        text = markdown(json.loads(Path(args.json).read_text()))
        if args.markdown:
            write_markdown_section(Path(args.markdown), text, tag="attention-sweep",
                                   title="Split-KV attention: the kernel alone")
        return print(text)
    shapes = sweep(args.batches, args.queries, args.hbm_tb_per_s * 1e12)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({**run_info("bench.attention", argv), "shapes": shapes}, indent=1) + "\n")


if __name__ == "__main__":
    main()
