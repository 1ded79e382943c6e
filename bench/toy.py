"""Benchmark ar / sd / lvspec on fresh toy videos (what `make bench` runs).

    python -m bench.toy --family llava_onevision --videos 200 --seed 1234 --json out.json
    python -m bench.toy --all --json bench/toyworld.json --markdown BENCHMARKS.md
    python -m bench.toy --all --edition 2 --json bench/toyworld_v2.json --markdown BENCHMARKS.md

Per family and mode: tau (tokens per draft-verify cycle), target forwards per token, tokens/s,
attribute accuracy and retention (accuracy / accuracy of ar); for lvspec, anchor precision and
recall of the relevance gate at the verified slots. Plus a filler-entropy sweep, two ablations
(no shift tolerance; loose acceptance without the relevance gate) and a batch-1 comparison of
`sd` with HF assisted generation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from bench.report import merge_previous, run_info, write_markdown_section
from bench.timing import measure
from lvspec import SpecConfig, generate
from lvspec.config import shipped_settings
from lvspec.stats import totals
from toyworld import families, grammar, score
from toyworld.families import engine_rows, load_pair, render_videos


def mode_configs(family: str, k: int, max_new_tokens: int, edition: int = 1,
                 draft_frame_stride: int = 1) -> dict[str, SpecConfig]:
    """ar, sd, lvspec and its ablations; with a `draft_frame_stride` > 1, sd and lvspec whose draft
    watches every n-th frame (SpecConfig.draft_frame_stride) beside them."""
    lv = SpecConfig(mode="lvspec", k=k, max_new_tokens=max_new_tokens,
                    **shipped_settings(families.model_dir(family, "target", edition)))
    sd = SpecConfig(mode="sd", k=k, max_new_tokens=max_new_tokens)
    thinned = {} if draft_frame_stride == 1 else {
        f"{name}_draft_frames/{draft_frame_stride}": dataclasses.replace(cfg, draft_frame_stride=draft_frame_stride)
        for name, cfg in (("sd", sd), ("lvspec", lv))}
    return {
        "ar": SpecConfig(mode="ar", max_new_tokens=max_new_tokens),
        "sd": sd,
        "lvspec": lv,
        **thinned,
        "lvspec_no_shift": dataclasses.replace(lv, shift_window=0),
        "loose_no_gate": dataclasses.replace(lv, gate=False),
        "loose_no_gate_no_shift": dataclasses.replace(lv, gate=False, shift_window=0),
        # A looser rule (anything in the target's top 3) shows what the gate protects when the
        # target's second choices are wrong anchors.
        "lvspec_top3": dataclasses.replace(lv, top_k=3),
        "loose_top3_no_gate": dataclasses.replace(lv, top_k=3, gate=False),
    }


def run_mode(target, draft, rows, cfg: SpecConfig, processor, batch_size: int):
    """Generate for all rows in batches; returns (outputs, seconds: host time, no device sync)."""
    outputs, seconds = [], 0.0
    for lo in range(0, len(rows), batch_size):
        batch = measure(lambda: generate(target, draft, rows[lo:lo + batch_size], cfg, tokenizer=processor.tokenizer,
                                         trace=cfg.mode == "lvspec"))
        outputs += batch.result
        seconds += batch.seconds
    return outputs, seconds


def summarize(outputs, seconds, truths, anchors: set[int], cfg: SpecConfig, ar_acc: float | None) -> dict:
    counted = totals(o.stats.as_dict() for o in outputs)
    tokens, cycles = counted["num_tokens"], counted["num_cycles"]
    acc = score.score([o.text for o in outputs], truths)
    result = {
        "tau": counted["tau"],
        "target_forwards_per_token": counted["target_forwards"] / max(tokens, 1),
        "tokens_per_s": tokens / seconds,
        "attr_acc": acc["attr_acc"],
        "per_attribute": acc["per_attribute"],
        "retention": acc["attr_acc"] / ar_acc if ar_acc else 1.0,
        "tokens": tokens, "cycles": cycles, "seconds": round(seconds, 3),
        "shares": counted["shares"],
        "rejected_anchor": counted["rejected_anchor"],
    }
    slots = [s for o in outputs for s in o.trace if s["relevance"] is not None]
    if slots and cfg.gate:
        flagged = [s["relevance"] >= cfg.theta for s in slots]
        truth = [s["target_token"] in anchors for s in slots]
        hits = sum(f and t for f, t in zip(flagged, truth))
        result["anchor_precision"] = hits / max(sum(flagged), 1)
        result["anchor_recall"] = hits / max(sum(truth), 1)
        result["verified_slots"] = len(slots)
    return result


def peer_batch1(processor, target, draft, rows, k: int, max_new_tokens: int) -> dict:
    """Our `sd` vs HF assisted generation, one video at a time: same tokens? forwards, wall time.
    HF's target forwards are counted by a hook on its language model; ours by the engine's counter."""
    calls = {"n": 0}
    hook = target.model.language_model.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    draft.generation_config.num_assistant_tokens = k
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0
    same, hf_forwards, hf_s, ours_forwards, ours_s, tokens = 0, 0, 0.0, 0, 0.0, 0
    # HF treats embeddings padded to different sizes (the LLaVA-OneVision pair) as different tokenizers and
    # then insists on its universal (re-tokenizing) assisted decoding.
    hf_mode = "assisted"
    if target.config.get_text_config().vocab_size != draft.config.get_text_config().vocab_size:
        hf_mode = "universal assisted (vocab sizes differ)"
    extra = {"tokenizer": tok, "assistant_tokenizer": tok} if hf_mode != "assisted" else {}
    try:
        for row in rows:
            calls["n"] = 0

            def hf():
                with torch.inference_mode():
                    return target.generate(**row, assistant_model=draft, max_new_tokens=max_new_tokens,
                                           do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id, **extra)

            hf_run = measure(hf)  # host time, no device sync (as ours below)
            out, hf_s = hf_run.result, hf_s + hf_run.seconds
            hf_forwards += calls["n"]
            hf_tokens = out[0, row["input_ids"].shape[1]:].tolist()
            ours_run = measure(lambda: generate(target, draft, [row], SpecConfig(mode="sd", k=k,
                                                                                max_new_tokens=max_new_tokens))[0])
            ours, ours_s = ours_run.result, ours_s + ours_run.seconds
            ours_forwards += ours.stats.target_forwards  # our decoding forwards bypass the HF module's hook
            same += ours.tokens == hf_tokens
            tokens += len(ours.tokens)
    finally:
        hook.remove()
    n = len(rows)
    return {"videos": n, "identical_outputs": same / n, "k": k, "hf_mode": hf_mode,
            "hf_assisted": {"target_forwards_per_video": hf_forwards / n, "seconds_per_video": hf_s / n},
            "ours_sd": {"target_forwards_per_video": ours_forwards / n, "seconds_per_video": ours_s / n},
            "tokens_per_video": tokens / n}


def bench_family(family: str, videos: int, seed: int, k: int, batch_size: int, max_new_tokens: int,
                 peer_videos: int, log=print, edition: int = 1, draft_frame_stride: int = 1,
                 sweep: bool = True) -> dict:
    processor, target, draft = load_pair(family, families.models_dir(edition))
    anchors = grammar.anchor_token_ids(processor.tokenizer)
    scenes, _, frames = render_videos(videos, seed, edition=edition)
    truths = [s.attributes() for s in scenes]
    configs = mode_configs(family, k, max_new_tokens, edition, draft_frame_stride)
    result = {"family": family, "edition": edition, "videos": videos, "seed": seed, "k": k, "batch_size": batch_size,
              "lvspec_config": configs["lvspec"].as_dict(), "modes": {}, "filler_entropy_sweep": []}

    rows = engine_rows(processor, frames, grammar.PROMPT)
    ar_acc = None
    for name, cfg in configs.items():
        outputs, seconds = run_mode(target, draft, rows, cfg, processor, batch_size)
        result["modes"][name] = summarize(outputs, seconds, truths, anchors, cfg, ar_acc)
        ar_acc = ar_acc or result["modes"]["ar"]["attr_acc"]
        m = result["modes"][name]
        log(f"[{family}] {name:16s} tau {m['tau']:5.2f}  fwd/token {m['target_forwards_per_token']:.3f}  "
            f"{m['tokens_per_s']:7.1f} tok/s  attr_acc {m['attr_acc']:.4f}  retention {m['retention']:.4f}"
            + (f"  order {m['per_attribute']['order']:.4f}" if "order" in m["per_attribute"] else "")
            + (f"  anchor P/R {m['anchor_precision']:.3f}/{m['anchor_recall']:.3f}" if "anchor_precision" in m else ""))
    for h in grammar.FILLER_LEVELS if sweep else ():
        rows_h = engine_rows(processor, frames, grammar.prompt_for(h))
        entry = {"filler_entropy": h}
        for name in ("ar", "sd", "lvspec"):
            outputs, seconds = run_mode(target, draft, rows_h, configs[name], processor, batch_size)
            entry[name] = summarize(outputs, seconds, truths, anchors, configs[name], entry.get("ar", {}).get("attr_acc"))
        entry["tau_ratio"] = entry["lvspec"]["tau"] / entry["sd"]["tau"]
        result["filler_entropy_sweep"].append(entry)
        log(f"[{family}] filler entropy {h:.2f}: tau sd {entry['sd']['tau']:.2f} lvspec {entry['lvspec']['tau']:.2f} "
            f"(x{entry['tau_ratio']:.2f}), retention lvspec {entry['lvspec']['retention']:.4f}")
    modes = result["modes"]
    result["tau_ratio_lvspec_vs_sd"] = modes["lvspec"]["tau"] / modes["sd"]["tau"]
    result["speedup_lvspec_vs_ar"] = modes["lvspec"]["tokens_per_s"] / modes["ar"]["tokens_per_s"]
    result["speedup_sd_vs_ar"] = modes["sd"]["tokens_per_s"] / modes["ar"]["tokens_per_s"]
    if peer_videos:
        result["peer_batch1"] = peer_batch1(processor, target, draft, rows[:peer_videos], k, max_new_tokens)
        p = result["peer_batch1"]
        log(f"[{family}] batch 1 vs HF assisted generation: identical {p['identical_outputs']:.2f}; target forwards "
            f"{p['ours_sd']['target_forwards_per_video']:.1f} vs {p['hf_assisted']['target_forwards_per_video']:.1f}; "
            f"{p['ours_sd']['seconds_per_video'] * 1e3:.0f} ms vs {p['hf_assisted']['seconds_per_video'] * 1e3:.0f} ms")
    return result


def _relevance(cfg: dict) -> str:
    if cfg.get("relevance_weights"):
        heaviest = sorted(zip(cfg["relevance_weights"], map(tuple, cfg["relevance_heads"])), reverse=True)[:4]
        return (f"weighted mean of {len(cfg['relevance_heads'])} heads, heaviest "
                + ", ".join(f"L{layer}.H{head} {w:.3f}" for w, (layer, head) in heaviest))
    if cfg.get("relevance_heads"):
        return "heads=" + ",".join(f"L{layer}.H{head}" for layer, head in cfg["relevance_heads"])
    return f"layers={cfg['relevance_layers']}"


def markdown(report: dict) -> str:
    lines = []
    for fam, r in report["families"].items():
        lines += [f"Command: `{r['command']}`  ", f"Machine: {r['machine']}  ", f"Date: {r['date']}", "",
                  f"#### {fam} ({r['videos']} videos, seed {r['seed']}, K={r['k']}, batch {r['batch_size']}, "
                  f"lvspec theta={r['lvspec_config']['theta']} {_relevance(r['lvspec_config'])})", "",
                  "| mode | tau | target fwd/token | tokens/s | attr_acc | event order acc | retention | "
                  "exact/loose/shift share | anchor P / R |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, m in r["modes"].items():
            sh = m["shares"]
            pr = f"{m['anchor_precision']:.3f} / {m['anchor_recall']:.3f}" if "anchor_precision" in m else "-"
            order = f"{m['per_attribute']['order']:.4f}" if "order" in m["per_attribute"] else "-"
            lines.append(f"| {name} | {m['tau']:.2f} | {m['target_forwards_per_token']:.3f} | {m['tokens_per_s']:.0f} | "
                         f"{m['attr_acc']:.4f} | {order} | {m['retention']:.4f} | {sh['accepted_exact']:.2f}/"
                         f"{sh['accepted_loose']:.2f}/{sh['accepted_shift']:.2f} | {pr} |")
        lines += ["", f"tau(lvspec)/tau(sd) = **{r['tau_ratio_lvspec_vs_sd']:.2f}**; tokens/s speedup over ar: "
                  f"sd {r['speedup_sd_vs_ar']:.2f}x, lvspec {r['speedup_lvspec_vs_ar']:.2f}x (CPU, toy models).", ""]
        sweep = r["filler_entropy_sweep"]
        lines += ["| filler entropy | tau sd | tau lvspec | ratio | retention lvspec | filler share loose+shift |",
                  "|---|---|---|---|---|---|"] if sweep else []
        for e in sweep:
            sh = e["lvspec"]["shares"]
            lines.append(f"| {e['filler_entropy']:.2f} | {e['sd']['tau']:.2f} | {e['lvspec']['tau']:.2f} | "
                         f"{e['tau_ratio']:.2f} | {e['lvspec']['retention']:.4f} | "
                         f"{sh['accepted_loose'] + sh['accepted_shift']:.2f} |")
        if "peer_batch1" in r:
            p = r["peer_batch1"]
            lines += ["", f"Batch 1, {p['videos']} videos, K={p['k']}: our `sd` vs HF `generate(assistant_model=...)` "
                      f"({p['hf_mode']}): "
                      f"identical outputs {p['identical_outputs']:.0%}; target forwards per video "
                      f"{p['ours_sd']['target_forwards_per_video']:.1f} vs {p['hf_assisted']['target_forwards_per_video']:.1f}; "
                      f"wall time per video {p['ours_sd']['seconds_per_video'] * 1e3:.0f} ms vs "
                      f"{p['hf_assisted']['seconds_per_video'] * 1e3:.0f} ms."]
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=families.FAMILIES, action="append")
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--videos", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--peer-videos", type=int, default=20)
    ap.add_argument("--edition", type=int, choices=(1, 2), default=1, help="toy world edition (videos, models)")
    ap.add_argument("--draft-frame-stride", type=int, default=1,
                    help="also run sd and lvspec with the draft watching every n-th frame")
    ap.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                    help="the filler-entropy sweep (ar, sd, lvspec at each level)")
    ap.add_argument("--tag", help="markdown section tag (default: the edition's)")
    ap.add_argument("--json", required=True)
    ap.add_argument("--markdown", help="update the benchmark section of this file (BENCHMARKS.md)")
    args = ap.parse_args(argv)
    fams = families.FAMILIES if args.all or not args.family else args.family
    run = run_info("bench.toy", argv)
    results = []
    for family in fams:
        log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
        results.append({**bench_family(family, args.videos, args.seed, args.k, args.batch_size,
                                       args.max_new_tokens, args.peer_videos, log, args.edition,
                                       args.draft_frame_stride, args.sweep), **run})
    report = {"families": {r["family"]: r for r in merge_previous(Path(args.json), results)}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    if args.markdown:
        v2 = args.edition == 2
        title = "Toy world: ar / sd / lvspec" + " (edition 2)" * v2
        if args.draft_frame_stride > 1:
            title += f", the draft watching every {args.draft_frame_stride}th frame beside"
        write_markdown_section(Path(args.markdown), markdown(report), tag=args.tag or "toyworld-bench" + "-v2" * v2,
                               title=title)
    print(markdown(report))


if __name__ == "__main__":
    main()
