"""Evaluate a toy target/draft pair on fresh videos.

    python -m bench.evaluate --family qwen2_5_vl --videos 200 --seed 1234 --json out.json
    python -m bench.evaluate --all --edition 2 --json bench/toyworld_v2_eval.json   # the second edition

Renders N clips from the seed, decodes them like the pipeline does, captions them greedily with
the target and with the draft, scores both, and measures teacher-forced agreement: how often the
draft's greedy next token equals the target's along the target's own captions, split by the
grammar's anchor/filler labels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench.report import merge_previous, run_info, write_markdown_section
from toyworld import families, grammar, score
from toyworld.families import greedy_captions, load_pair, render_videos


@torch.inference_mode()
def teacher_forced_agreement(processor, target, draft, frames, prompt: str, captions: list[list[int]]):
    """Share of caption positions where draft and target greedy next tokens agree, by label."""
    tok = processor.tokenizer
    shared = min(target.config.get_text_config().vocab_size, draft.config.get_text_config().vocab_size)
    hits = {"anchor": [0, 0], "filler": [0, 0]}
    for video, ids in zip(frames, captions):
        text = families.chat_text(processor, prompt)
        inputs = processor(text=[text], videos=[video], return_tensors="pt")
        caption_ids = torch.tensor([ids])
        full = {**inputs, "input_ids": torch.cat([inputs["input_ids"], caption_ids], 1),
                "attention_mask": torch.ones(1, inputs["input_ids"].shape[1] + len(ids), dtype=torch.long)}
        if "mm_token_type_ids" in inputs:
            full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(caption_ids)], 1)
        n_prompt = inputs["input_ids"].shape[1]
        # Position n_prompt - 1 + j predicts caption token j.
        sl = slice(n_prompt - 1, n_prompt - 1 + len(ids))
        t_pred = target(**full).logits[0, sl, :shared].argmax(-1)
        d_pred = draft(**full).logits[0, sl, :shared].argmax(-1)
        text_ids = ids[:-1] if ids and ids[-1] == tok.convert_tokens_to_ids("<|im_end|>") else ids
        enc = tok(tok.decode(text_ids), return_offsets_mapping=True)
        labels = grammar.token_labels(grammar.labelled(tok.decode(text_ids)), enc["offset_mapping"])
        if enc["input_ids"] != text_ids:  # a caption that does not re-tokenize the same: label by token
            labels = ["anchor" if tok.decode([i]).strip().lower() in grammar.ANCHOR_WORDS else "filler"
                      for i in text_ids]
        labels = labels + ["filler"] * (len(ids) - len(labels))  # EOS is filler
        for j, label in enumerate(labels):
            hits[label][0] += int(t_pred[j] == d_pred[j])
            hits[label][1] += 1
    return {f"{k}_agreement": v[0] / max(v[1], 1) for k, v in hits.items()} | {
        f"{k}_positions": v[1] for k, v in hits.items()}


def evaluate(family: str, videos: int, seed: int, filler_entropy: float | None = None,
             models_dir: Path | str | None = None, edition: int = 1) -> dict:
    processor, target, draft = load_pair(family, models_dir or families.models_dir(edition))
    scenes, _, frames = render_videos(videos, seed, edition=edition)
    truths = [s.attributes() for s in scenes]
    prompt = grammar.prompt_for(filler_entropy)
    result = {"family": family, "videos": videos, "seed": seed, "edition": edition,
              "filler_entropy": grammar.DEFAULT_FILLER_ENTROPY if filler_entropy is None else filler_entropy,
              "prompt": prompt}
    t0 = time.time()
    target_texts, target_ids = greedy_captions(processor, target, frames, prompt)
    draft_texts, _ = greedy_captions(processor, draft, frames, prompt)
    result["target"] = score.score(target_texts, truths)
    result["draft"] = score.score(draft_texts, truths)
    result["teacher_forced"] = teacher_forced_agreement(processor, target, draft, frames, prompt, target_ids)
    result["examples"] = [{"truth": t, "target": a, "draft": b} for t, a, b in
                          zip(truths[:5], target_texts[:5], draft_texts[:5])]
    result["seconds"] = round(time.time() - t0, 1)
    return result


def markdown(results: list[dict]) -> str:
    lines = ["| family | filler entropy | videos (seed) | target attr_acc | draft attr_acc | "
             "teacher-forced anchor agreement | teacher-forced filler agreement |", "|---|---|---|---|---|---|---|"]
    for r in results:
        tf = r["teacher_forced"]
        # Edition 2: the event-order attribute's accuracy, target / draft, beside the overall figure.
        order = lambda who: (f" (order {r[who]['per_attribute']['order']:.3f})"  # noqa: E731
                             if "order" in r[who]["per_attribute"] else "")
        lines.append(f"| {r['family']} | {r['filler_entropy']:.2f} | {r['videos']} ({r['seed']}) | "
                     f"{r['target']['attr_acc']:.4f}{order('target')} | {r['draft']['attr_acc']:.4f}{order('draft')} | "
                     f"{tf['anchor_agreement']:.3f} | {tf['filler_agreement']:.3f} |")
    lines.append("")
    for run in dict.fromkeys((r["command"], r["machine"], r["date"]) for r in results):
        lines.append("Command: `{}` on {}, {}  ".format(*run))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=families.FAMILIES, action="append")
    ap.add_argument("--all", action="store_true", help="both families")
    ap.add_argument("--videos", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--filler-entropy", nargs="*", default=["default"],
                    help="filler entropies to name in the prompt; 'default' names none")
    ap.add_argument("--edition", type=int, choices=(1, 2), default=1, help="toy world edition (videos, models)")
    ap.add_argument("--models-dir", help="default: the edition's shipped models")
    ap.add_argument("--json", help="write the result here (one object, or a list for several runs)")
    ap.add_argument("--markdown", help="update the toy-world evaluation section of this file (BENCHMARKS.md)")
    args = ap.parse_args(argv)
    if not (args.all or args.family):
        ap.error("name --family or --all")
    run = run_info("bench.evaluate", argv)
    results = []
    for family in families.FAMILIES if args.all else args.family:
        for level in args.filler_entropy:
            h = None if level == "default" else float(level)
            r = {**evaluate(family, args.videos, args.seed, h, args.models_dir, args.edition), **run}
            results.append(r)
            t, d, tf = r["target"], r["draft"], r["teacher_forced"]
            print(f"{family} h={r['filler_entropy']}: target attr_acc {t['attr_acc']:.3f}, draft attr_acc "
                  f"{d['attr_acc']:.3f}; teacher-forced agreement anchor {tf['anchor_agreement']:.3f} filler "
                  f"{tf['filler_agreement']:.3f} ({r['videos']} videos, {r['seconds']}s)", file=sys.stderr)
    if args.json:
        results = merge_previous(Path(args.json), results)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results[0] if len(results) == 1 else results, indent=1))
    if args.markdown:
        v2 = args.edition == 2
        write_markdown_section(Path(args.markdown), markdown(results), tag="toyworld-eval" + "-v2" * v2,
                               title="Toy world models: accuracy and draft/target agreement" + " (edition 2)" * v2)


if __name__ == "__main__":
    main()
