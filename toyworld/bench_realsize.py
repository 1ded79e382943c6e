"""Real-size speed with replayed acceptance (DESIGN.md, "Speed at real scale"). Figures are "replay".

    # on this machine: record what the toy pairs accept per cycle (sd and lvspec, K=10)
    python -m toyworld.bench_realsize record --videos 64 --seed 1234 --out bench/replay_patterns.json
    # on a GPU: random-weight models of real shapes, bf16, each cycle keeping the recorded count
    python -m toyworld.bench_realsize run --pair qwen2_5_vl:32b:7b --batch-sizes 1 8 \\
        --json bench/realsize.json --markdown BENCHMARKS.md

Real checkpoints can't be fetched, so the target and draft are built from the real configs'
shapes with random weights, the toy tokenizer (its special-token ids go into the configs) and the
family's real video processor at its default resolution. Their own accept/reject decisions would
mean nothing, so every cycle keeps the number of drafts that the toy pair kept on the same cycle
of a traced toy run (`lvspec.Replay`): the engine drafts, verifies, probes relevance and rolls back
exactly as it would. Stop tokens are off; each row generates `--new-tokens` tokens. Per mode and
batch size: prefill time, decode tokens/s (a run of `--new-tokens` minus a run of 16, so that
prefills and fixed costs cancel), speedup over ar, and achieved weight bandwidth (weight bytes
read per forward x forwards/s, as gpt-fast reports it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

from lvspec import Replay, SpecConfig, generate
from toyworld import families

# Text shapes of the real checkpoints' configs (hidden, intermediate, layers, heads, kv heads, vocab).
TEXT = {
    "qwen2_5_vl": {"72b": (8192, 29568, 80, 64, 8, 152064), "32b": (5120, 27648, 64, 40, 8, 152064),
                   "7b": (3584, 18944, 28, 28, 4, 152064), "3b": (2048, 11008, 36, 16, 2, 151936)},
    "llava_onevision": {"72b": (8192, 29568, 80, 64, 8, 152064), "7b": (3584, 18944, 28, 28, 4, 152064),
                        "0.5b": (896, 4864, 24, 14, 2, 151936)},
}
TIED = {("qwen2_5_vl", "3b"), ("llava_onevision", "0.5b")}
VISION = {
    "qwen2_5_vl": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
                   "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "tokens_per_second": 2,
                   "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu"},
    "llava_onevision": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 26,
                        "num_attention_heads": 16, "image_size": 384, "patch_size": 14},
}
PROMPT = "Describe this video in detail."
SHORT = 16  # new tokens of the short run whose time is subtracted (prefill and fixed costs)


def real_config(family: str, size: str):
    """The toy target's config (token ids, family settings) with the real size's shapes."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(families.model_dir(family, "target"), local_files_only=True)
    hidden, inter, layers, heads, kv, vocab = TEXT[family][size]
    text = cfg.get_text_config()
    for key, value in {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
                       "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
                       "head_dim": hidden // heads, "max_position_embeddings": 32768}.items():
        setattr(text, key, value)
    if hasattr(text, "layer_types"):
        text.layer_types = ["full_attention"] * layers
    tied = (family, size) in TIED
    cfg.tie_word_embeddings = text.tie_word_embeddings = tied
    for key, value in VISION[family].items():
        setattr(cfg.vision_config, key, value)
    if family == "qwen2_5_vl":
        cfg.vision_config.out_hidden_size = hidden
        text.rope_parameters = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
    return cfg


def build(family: str, size: str, device: str, dtype=torch.bfloat16):
    from transformers import AutoModelForImageTextToText

    cfg = real_config(family, size)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype)
    model.generation_config.eos_token_id = None
    return model.eval()


def real_processor(family: str):
    """The toy tokenizer with the family's real video processor at its default resolution."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(families.model_dir(family, "target"), local_files_only=True)
    vp = type(processor.video_processor)
    if family == "qwen2_5_vl":
        processor.video_processor = vp(patch_size=14, merge_size=2, temporal_patch_size=2, cap_pixels_per_frame=True,
                                       size={"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28})
    else:
        processor.video_processor = vp(size={"height": 384, "width": 384})
        processor.num_image_tokens = (384 // 14) ** 2
    return processor


def video_rows(processor, n: int, frames: int, side: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    text = families.chat_text(processor, PROMPT)
    return [processor(text=[text], videos=[torch.randint(0, 256, (frames, side, side, 3), generator=g,
                                                         dtype=torch.uint8).numpy()], return_tensors="pt")
            for _ in range(n)]


def weight_bytes(model) -> int:
    """Bytes one decoding forward reads: the language model and its head (not the vision tower)."""
    lm = sum(p.numel() * p.element_size() for p in model.model.language_model.parameters())
    head = 0 if model.config.tie_word_embeddings else model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    return lm + head


def record(args) -> None:
    """Accepted drafts per cycle of the toy pairs (sd and the calibrated lvspec), traced."""
    from lvspec.config import shipped_settings
    from toyworld import grammar
    from toyworld.evaluate import engine_rows, load_pair, render_videos

    out = {"videos": args.videos, "seed": args.seed, "k": args.k, "date": datetime.date.today().isoformat(),
           "families": {}}
    for family in families.FAMILIES:
        processor, target, draft = load_pair(family)
        _, _, frames = render_videos(args.videos, args.seed)
        rows = engine_rows(processor, frames, grammar.PROMPT)
        lv = SpecConfig(mode="lvspec", k=args.k, max_new_tokens=48, **shipped_settings(families.model_dir(family, "target")))
        modes = {}
        for mode, cfg in {"sd": SpecConfig(mode="sd", k=args.k, max_new_tokens=48), "lvspec": lv}.items():
            res = [r for lo in range(0, len(rows), 25) for r in generate(target, draft, rows[lo:lo + 25], cfg, trace=True)]
            modes[mode] = [r.accepted_per_cycle for r in res]
            print(f"[{family}] {mode}: mean accepted drafts per cycle {Replay(modes[mode]).mean_accepted():.2f}")
        out["families"][family] = modes
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out) + "\n")
    print(f"wrote {args.out}")


def regroup(records: list[list[int]], rows: int) -> list[list[int]]:
    """All recorded cycles dealt out to `rows` rows, so every batch size replays the same cycles."""
    groups = [[] for _ in range(rows)]
    for i, record in enumerate(records):
        groups[i % rows].extend(record)
    return groups


def total(outs, name: str) -> int:
    return sum(getattr(o.stats, name) for o in outs)


def timed(fn) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def run_pair(args, family: str, target_size: str, draft_size: str, patterns: dict) -> dict:
    device = args.device
    processor = real_processor(family)
    t0 = time.perf_counter()
    target, draft = build(family, target_size, device), build(family, draft_size, device)
    print(f"[{family} {target_size}/{draft_size}] built in {time.perf_counter() - t0:.0f} s; "
          f"GPU memory {torch.cuda.memory_allocated() / 2**30:.1f} GiB" if device == "cuda" else "", flush=True)
    tb, db = weight_bytes(target), weight_bytes(draft)
    layers = target.config.get_text_config().num_hidden_layers
    probe = tuple(sorted({0, layers // 3, 2 * layers // 3, layers - 1}))  # a calibrated gate reads a few layers
    rows_all = video_rows(processor, max(args.batch_sizes), args.frames, args.side)
    video_tokens = int((rows_all[0]["input_ids"] == target.config.video_token_id).sum())
    result = {"target": f"{family}-{target_size}", "draft": f"{family}-{draft_size}", "video_tokens": video_tokens,
              "prompt_tokens": int(rows_all[0]["input_ids"].shape[1]), "target_weight_gb": tb / 1e9,
              "draft_weight_gb": db / 1e9, "new_tokens": args.new_tokens, "k": args.k, "relevance_layers": list(probe),
              "runs": []}
    for bs in args.batch_sizes:
        rows = rows_all[:bs]
        ar_tps = None
        for mode in ("ar", "sd", "lvspec"):
            drafts = draft if mode != "ar" else None

            def run_for(n: int):
                cfg = SpecConfig(mode=mode, k=args.k, theta=0.5, max_new_tokens=n, stop_token_ids=(),
                                 relevance_layers=probe if mode == "lvspec" else None)
                replay = Replay(regroup(patterns[mode], bs)) if mode != "ar" else None
                outs = []
                return timed(lambda: outs.extend(generate(target, drafts, rows, cfg, replay=replay))), outs

            run_for(SHORT)  # warm-up
            prefill = SpecConfig(mode="ar", max_new_tokens=1, stop_token_ids=())
            t_prefill = timed(lambda: generate(target, None, rows, prefill))
            if mode != "ar":  # the draft's prefill too
                t_prefill += timed(lambda: generate(draft, None, rows, prefill))
            # Decoding alone: a long run minus a short one (same replayed cycles first), so the
            # prefills and every fixed cost cancel.
            (t_short, short), (t_long, long) = run_for(SHORT), run_for(args.new_tokens)
            decode_s = t_long - t_short
            tokens = total(long, "num_tokens") - total(short, "num_tokens")
            cycles = (total(long, "num_cycles") - total(short, "num_cycles")) / bs  # the batch runs them together
            t_fwd = (total(long, "target_forwards") - total(short, "target_forwards")) / bs
            d_fwd = (total(long, "draft_forwards") - total(short, "draft_forwards")) / bs
            tps = tokens / decode_s
            ar_tps = tps if mode == "ar" else ar_tps
            run = {"batch_size": bs, "mode": mode, "prefill_s": t_prefill, "decode_s": decode_s,
                   "decode_tokens_per_s": tps, "speedup_over_ar": tps / ar_tps, "tau": tokens / bs / cycles,
                   "target_forwards_per_s": t_fwd / decode_s, "draft_forwards_per_s": d_fwd / decode_s,
                   "ms_per_target_forward_plus_drafts": 1e3 * decode_s / cycles,
                   "weight_gb_per_s": (tb * t_fwd + db * d_fwd) / decode_s / 1e9}
            result["runs"].append(run)
            print(f"[{family} {target_size}/{draft_size}] bs {bs:3d} {mode:6s}: prefill {t_prefill:6.2f} s, decode "
                  f"{tps:8.1f} tok/s (x{run['speedup_over_ar']:.2f} vs ar), tau {run['tau']:.2f}, "
                  f"{run['ms_per_target_forward_plus_drafts']:.1f} ms per cycle, {run['weight_gb_per_s']:.0f} GB/s",
                  flush=True)
    del target, draft
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def markdown(report: dict) -> str:
    lines = [f"Command: `{report['command']}`  ", f"Machine: {report['machine']}  ", f"Date: {report['date']}  ",
             f"Replayed acceptance: {report['patterns']}", ""]
    for r in report["pairs"]:
        lines += [f"#### {r['target']} target / {r['draft']} draft (random weights, bf16; {r['video_tokens']} video "
                  f"tokens, prompt {r['prompt_tokens']} tokens, {r['new_tokens']} new tokens per row, K={r['k']}; "
                  f"weights {r['target_weight_gb']:.1f} GB + {r['draft_weight_gb']:.1f} GB)", "",
                  "| batch | mode | tau (replay) | decode tokens/s | speedup vs ar | ms per row cycle | weight GB/s | prefill s |",
                  "|---|---|---|---|---|---|---|---|"]
        for x in r["runs"]:
            lines.append(f"| {x['batch_size']} | {x['mode']} | {x['tau']:.2f} | {x['decode_tokens_per_s']:.1f} | "
                         f"{x['speedup_over_ar']:.2f} | {x['ms_per_target_forward_plus_drafts']:.1f} | "
                         f"{x['weight_gb_per_s']:.0f} | {x['prefill_s']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="record toy acceptance patterns (CPU is fine)")
    rec.add_argument("--videos", type=int, default=64)
    rec.add_argument("--seed", type=int, default=1234)
    rec.add_argument("--k", type=int, default=10)
    rec.add_argument("--out", default="bench/replay_patterns.json")
    run = sub.add_parser("run", help="time random-weight real-size pairs with replayed acceptance (GPU)")
    run.add_argument("--pair", action="append", required=True, help="family:target_size:draft_size, e.g. qwen2_5_vl:32b:7b")
    run.add_argument("--patterns", default="bench/replay_patterns.json")
    run.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    run.add_argument("--new-tokens", type=int, default=128)
    run.add_argument("--frames", type=int, default=16)
    run.add_argument("--side", type=int, default=336)
    run.add_argument("--k", type=int, default=10)
    run.add_argument("--device", default="cuda", help="cpu only for smoke runs of small pairs")
    run.add_argument("--json", required=True)
    run.add_argument("--markdown")
    rep = sub.add_parser("report", help="write the markdown block of a run's JSON")
    rep.add_argument("--json", required=True)
    rep.add_argument("--markdown", required=True)
    args = ap.parse_args(argv)
    if args.command == "record":
        return record(args)
    if args.command == "report":
        return write_report(json.loads(Path(args.json).read_text()), args.markdown)

    pairs = []
    for spec in args.pair:  # check every pair before building anything
        family, t, d = (spec.split(":") + ["", ""])[:3]
        if family not in TEXT or t not in TEXT[family] or d not in TEXT[family]:
            raise SystemExit(f"--pair {spec!r}: want family:target:draft with family in {list(TEXT)} and sizes in "
                             f"{ {f: list(s) for f, s in TEXT.items()} }")
        pairs.append((family, t, d))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_realsize run needs a CUDA GPU (or --device cpu for a smoke run)")
    recorded = json.loads(Path(args.patterns).read_text())
    report = {"command": "python -m toyworld.bench_realsize " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}, torch {torch.__version__}, "
                         f"transformers {transformers.__version__}, {platform.machine()}",
              "date": datetime.date.today().isoformat(),
              "patterns": f"{args.patterns} (toy pairs, {recorded['videos']} videos of seed {recorded['seed']}, "
                          f"K={recorded['k']}, recorded {recorded['date']})",
              "pairs": []}
    for family, t, d in pairs:
        report["pairs"].append(run_pair(args, family, t, d, recorded["families"][family]))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        write_report(report, args.markdown)
    print(f"wrote {args.json}")


def write_report(report: dict, path: str) -> None:
    from toyworld.bench import write_markdown_section

    write_markdown_section(Path(path), markdown(report), tag="realsize-bench",
                           title="Real size: random-weight models, replayed acceptance")


if __name__ == "__main__":
    main()
