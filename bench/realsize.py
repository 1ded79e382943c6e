"""Real-size speed with replayed acceptance (DESIGN.md, "Speed at real scale"). Figures are "replay".

    # on this machine: record what the toy pairs accept per cycle (sd and lvspec, K=10)
    python -m bench.realsize record --videos 64 --seed 1234 --out bench/replay_patterns.json
    # on a GPU: random-weight models of real shapes, bf16, each cycle keeping the recorded count
    python -m bench.realsize run --pair qwen2_5_vl:32b:7b --pair qwen2_5_vl:32b:3b --json $OUT/q.json
    python -m bench.realsize steps --size qwen2_5_vl:7b --batch-sizes 1 8 --json $OUT/steps.json
    # here: merge the runs (and the reference probe's JSONs) into bench/realsize.json and BENCHMARKS.md
    python -m bench.realsize report --json q.json l.json --probe probe.json --out bench/realsize.json \\
        --markdown BENCHMARKS.md

Real checkpoints can't be fetched, so the target and draft are built from the real configs'
shapes with random weights, the toy tokenizer (its special-token ids go into the configs) and the
family's real video processor at its default resolution. Their own accept/reject decisions would
mean nothing, so every cycle keeps the number of drafts that the toy pair kept on the same cycle
of a traced toy run (`lvspec.Replay`): the engine drafts, verifies, probes relevance and rolls back
exactly as it would. Stop tokens are off; each row generates `--new-tokens` tokens. Per mode and
batch size, three runs of one held `Engine` after a warm-up (which captures its CUDA graphs):
decode tokens/s (the prefill excluded), speedup over our ar and over HF `generate`, the GPU time
of a verify forward and of a draft step, and the weights + KV read per second against the HBM
floor (as gpt-fast reports it). `steps` times single decoder forwards, eager and captured.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch

from bench.report import run_info, write_markdown_section
from bench.shapes import TEXT, real_config, real_processor
from bench.timing import back_to_back, measure, median_spread, timed
from lvspec import Engine, Replay, SpecConfig, dummy, generate
from lvspec.adapter import left_pad_rows, text_config
from lvspec.decoder import ATTENTION, TextDecoder
from lvspec.graphs import Stages
from toyworld import families

PROMPT = "Describe this video in detail."
SHORT = 16  # new tokens of a warm-up run
HBM_BYTES_PER_S = 4.8e12  # H200 datasheet (the reference probe's floor uses the same)


def hbm_bytes_per_s(machine: str | None = None) -> float:
    """The datasheet HBM bandwidth of the GPU named in `machine` (default: this process's GPU):
    an H100 SXM's 3.35 TB/s, else an H200's 4.8."""
    if machine is None and torch.cuda.is_available():
        machine = torch.cuda.get_device_name()
    return 3.35e12 if machine and "H100" in machine else HBM_BYTES_PER_S


def build(family: str, size: str, device: str, dtype=torch.bfloat16):
    """A random-weight model of a real size (the product's load format `dummy`), stop tokens off."""
    model = dummy.from_config(real_config(family, size), dtype, device)
    model.generation_config.eos_token_id = None
    return model


def release(*models: weakref.ref) -> dict:
    """After a configuration, its engines and models dropped by the caller: collect the reference
    cycles that still hold them (modules' hooks close over their modules), then hand the device
    the cached blocks (the CUDA graphs' pools among them) and cuBLAS's per-stream workspaces. Says
    whether each model is gone and the GPU memory still allocated."""
    gc.collect()
    cuda = torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
        torch._C._cuda_clearCublasWorkspaces()  # one per (handle, stream): every engine makes new streams
        torch.cuda.empty_cache()
    held = [type(ref()).__name__ for ref in models if ref() is not None]
    return {"released": not held, "still_held": held,
            "gpu_allocated_gib": round(torch.cuda.memory_allocated() / 2**30, 3) if cuda else None}


def video_rows(processor, n: int, frames: int, side: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    text = families.chat_text(processor, PROMPT)
    return [processor(text=[text], videos=[torch.randint(0, 256, (frames, side, side, 3), generator=g,
                                                         dtype=torch.uint8).numpy()], return_tensors="pt")
            for _ in range(n)]


def record(args) -> None:
    """Accepted drafts per cycle of the toy pairs (sd and the calibrated lvspec), traced."""
    from lvspec.config import shipped_settings
    from toyworld import grammar
    from toyworld.families import engine_rows, load_pair, render_videos

    out = {"videos": args.videos, "seed": args.seed, "k": args.k, "date": datetime.date.today().isoformat(),
           "draft_frame_stride": args.draft_frame_stride, "families": {}}
    for family in families.FAMILIES:
        processor, target, draft = load_pair(family)
        _, _, frames = render_videos(args.videos, args.seed)
        rows = engine_rows(processor, frames, grammar.PROMPT)
        lv = SpecConfig(mode="lvspec", k=args.k, max_new_tokens=48, draft_frame_stride=args.draft_frame_stride,
                        **shipped_settings(families.model_dir(family, "target")))
        sd = SpecConfig(mode="sd", k=args.k, max_new_tokens=48, draft_frame_stride=args.draft_frame_stride)
        modes = {}
        for mode, cfg in {"sd": sd, "lvspec": lv}.items():
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


def kv_bytes(decoder: TextDecoder, ctx: int, rows: int) -> int:
    """Bytes of keys and values one forward reads for `rows` rows holding `ctx` tokens each."""
    itemsize = torch.finfo(decoder.dtype).bits // 8
    return rows * ctx * len(decoder.layers) * decoder.kv_heads * decoder.head_dim * 2 * itemsize


def floor_ms(decoder: TextDecoder, ctx: int, rows: int) -> float:
    """The fewest milliseconds a decoding forward can take: its weights and KV once through HBM."""
    return (decoder.weight_bytes() + kv_bytes(decoder, ctx, rows)) / HBM_BYTES_PER_S * 1e3


def graph_ms(fn, reps: int = 20) -> float:
    """Milliseconds per replay of `fn` captured as one CUDA graph (after a warm-up run)."""
    return Stages.seconds(fn, reps) * 1e3


def eager_ms(fn, reps: int = 5) -> float:
    """GPU milliseconds per eager call of `fn`: `reps` calls back to back after two warm-ups."""
    return back_to_back(fn, reps, warmup=2) * 1e3


@torch.inference_mode()
def steps(args) -> dict:
    """Per-forward cost of the engine's decoder on random real-size weights: eager and captured,
    1 token (a draft or ar step) and K+1 = 11 (a verify forward, with and without the relevance
    probe on 4 layers), every attention path, against the bandwidth floor."""
    from lvspec.relevance import RelevanceProbe

    out = {"ctx": args.ctx, "rows": []}
    for spec in args.size:
        family, size = spec.split(":")
        model = build(family, size, "cuda")
        built = weakref.ref(model)
        decoder = TextDecoder(model, text_config(model).vocab_size)
        layers = len(decoder.layers)
        for bs in args.batch_sizes:
            cache = decoder.new_cache(bs, -(-(args.ctx + 32) // 128) * 128)
            cache.k.normal_()
            cache.v.normal_()
            cache.length.fill_(args.ctx)
            video = torch.zeros(bs, cache.capacity, dtype=torch.bool, device="cuda")
            video[:, 20:args.ctx - 20] = True
            heads = dict.fromkeys(sorted({0, layers // 3, 2 * layers // 3, layers - 1}))
            for q, probed in ((1, False), (11, False), (11, True)):
                tokens = torch.randint(0, 1000, (bs, q), device="cuda")
                for attention in ATTENTION:
                    decoder.attention = {"step": attention, "verify": attention}

                    def fn():
                        probe = RelevanceProbe(heads, video) if probed else None
                        decoder.forward(cache, tokens, probe=probe)
                        if probe is not None:
                            probe.result()

                    row = {"model": f"{family}-{size}", "batch": bs, "q": q, "probe": probed, "attention": attention,
                           "eager_ms": round(eager_ms(fn), 3), "graph_ms": round(graph_ms(fn), 3),
                           "floor_ms": round(floor_ms(decoder, args.ctx, bs), 3)}
                    out["rows"].append(row)
                    print(row, flush=True)
            decoder.attention = {"step": None, "verify": None}
            cache = None
        decoder = model = None  # free this size before building the next
        out.setdefault("released", []).append({"model": f"{family}-{size}", **release(built)})
    return out


def _hf_rows(processor, rows_all: list[dict], bs: int, device) -> dict:
    """The first `bs` videos as one left-padded HF batch."""
    pad = processor.tokenizer.pad_token_id or 0
    batch = {"input_ids": left_pad_rows(rows_all[:bs], "input_ids", pad),
             "attention_mask": left_pad_rows(rows_all[:bs], "attention_mask", 0)}
    if "mm_token_type_ids" in rows_all[0]:
        batch["mm_token_type_ids"] = left_pad_rows(rows_all[:bs], "mm_token_type_ids", 0)
    for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        if key in rows_all[0]:
            values = [torch.as_tensor(r[key]) for r in rows_all[:bs]]
            batch[key] = torch.cat([v.reshape(-1) if v.ndim == 0 else v for v in values])
    return {k: v.to(device) for k, v in batch.items()}


@torch.inference_mode()
def hf_generate(target, processor, rows_all, bs: int, new_tokens: int, repeats: int, log) -> dict:
    """`transformers` generate, greedy, its defaults: what a user gets today. Decode tokens/s from
    a run of `new_tokens` minus a run of 1 (the prefill), each repeated."""
    inputs = _hf_rows(processor, rows_all, bs, target.device)

    def seconds(n: int) -> float:  # wall time, the device synchronised before and after
        return measure(lambda: target.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False),
                       device=target.device).seconds

    seconds(new_tokens)  # warm-up at full length: cuDNN attention plans every key length once
    runs = []
    for _ in range(repeats):
        runs.append(bs * (new_tokens - 1) / (seconds(new_tokens) - seconds(1)))
        log(f"    hf generate bs {bs}: {runs[-1]:.1f} tok/s")
    tps, spread = median_spread(runs)
    return {"batch_size": bs, "mode": "hf_generate", "decode_tokens_per_s": tps, "spread": spread,
            "runs_tokens_per_s": runs}


_HF_DONE: dict[tuple, dict] = {}


@torch.inference_mode()
def run_pair(args, family: str, target_size: str, draft_size: str, patterns: dict, target=None, log=print) -> dict:
    """Our ar / sd / lvspec (replayed acceptance) and HF generate for one pair, every batch size."""
    processor = real_processor(family)
    t0 = time.perf_counter()
    target = target if target is not None else build(family, target_size, args.device)
    draft = build(family, draft_size, args.device)
    built = weakref.ref(draft)
    log(f"[{family} {target_size}/{draft_size}] built in {time.perf_counter() - t0:.0f} s"
        + (f"; GPU memory {torch.cuda.memory_allocated() / 2**30:.1f} GiB" if args.device == "cuda" else ""))
    T = TextDecoder(target, text_config(target).vocab_size)
    D = TextDecoder(draft, text_config(draft).vocab_size)
    layers = len(T.layers)
    probe = tuple(sorted({0, layers // 3, 2 * layers // 3, layers - 1}))  # a calibrated gate reads a few layers
    rows_all = video_rows(processor, max(args.batch_sizes), args.frames, args.side)
    prompt_tokens = int(rows_all[0]["input_ids"].shape[1])
    ctx = prompt_tokens + args.new_tokens // 2  # mean tokens in the cache while decoding
    result = {"target": f"{family}-{target_size}", "draft": f"{family}-{draft_size}", "setting": args.setting,
              "frames": args.frames, "video_tokens": int((rows_all[0]["input_ids"] == target.config.video_token_id).sum()),
              "prompt_tokens": prompt_tokens, "new_tokens": args.new_tokens, "k": args.k,
              "target_weight_gb": T.weight_bytes() / 1e9, "draft_weight_gb": D.weight_bytes() / 1e9,
              "relevance_layers": list(probe), "runs": []}
    for bs in args.batch_sizes:
        rows = rows_all[:bs]
        ar_tps = None
        for mode in ("ar", "sd", "lvspec"):
            cfg = SpecConfig(mode=mode, k=args.k, theta=0.5, max_new_tokens=args.new_tokens, stop_token_ids=(),
                             relevance_layers=probe if mode == "lvspec" else None, cuda_graphs=not args.eager)
            engine = Engine(target, draft if mode != "ar" else None, cfg, slots=bs)
            replay = Replay(regroup(patterns[mode], bs)) if mode != "ar" else None
            engine.generate(rows, replay=replay)  # warm-up: captures the stages (and measures costs for k=auto)
            runs = []
            for _ in range(args.repeats):
                outs = engine.generate(rows, replay=replay)
                t = engine.timing
                tokens = sum(o.stats.num_tokens - 1 for o in outs)  # the prefill's token is not decoding
                runs.append({"tps": tokens / t["decode_s"], "prefill_s": t["prefill_s"],
                             "tau": tokens / sum(o.stats.num_cycles for o in outs),
                             "ms_draft_step": 1e3 * t["draft_s"] / t["draft_steps"] if t["draft_steps"] else None,
                             "ms_verify": 1e3 * t["verify_s"] / t["verifies"], "k": statistics.median(t["k"]),
                             "cycles": t["cycles"], "draft_steps": t["draft_steps"], "decode_s": t["decode_s"]})
            tps, spread = median_spread([r["tps"] for r in runs])
            mid = sorted(runs, key=lambda r: r["tps"])[len(runs) // 2]
            ar_tps = tps if mode == "ar" else ar_tps
            # Weights and KV that the batch's forwards must read, over the decode time (gpt-fast's figure).
            read = mid["cycles"] * (T.weight_bytes() + kv_bytes(T, ctx, bs)) \
                + mid["draft_steps"] * (D.weight_bytes() + kv_bytes(D, ctx, bs))
            run = {"batch_size": bs, "mode": mode, "k": mid["k"] if mode != "ar" else 0, "decode_tokens_per_s": tps,
                   "spread": spread, "runs_tokens_per_s": [r["tps"] for r in runs],
                   "speedup_over_ar": tps / ar_tps, "tau": mid["tau"], "prefill_s": mid["prefill_s"],
                   "ms_per_verify": mid["ms_verify"], "ms_per_draft_step": mid["ms_draft_step"],
                   "verify_floor_ms": floor_ms(T, ctx, bs), "draft_step_floor_ms": floor_ms(D, ctx, bs),
                   "cycle_ms": 1e3 * mid["decode_s"] / mid["cycles"], "achieved_gb_per_s": read / mid["decode_s"] / 1e9,
                   "attention": engine.timing.get("attention"),
                   "attention_ms": {f"{m}/{size}": {k: round(v * 1e3, 3) for k, v in t.items()}
                                    for (m, size), t in engine.attention_timings.items()}}
            run["bandwidth_fraction"] = run["achieved_gb_per_s"] * 1e9 / HBM_BYTES_PER_S
            result["runs"].append(run)
            ms_d = f"{run['ms_per_draft_step']:.2f}" if run["ms_per_draft_step"] else "-"
            log(f"[{family} {target_size}/{draft_size}] bs {bs:3d} {mode:6s}: {tps:8.1f} tok/s (spread {spread:.1%}, "
                f"x{run['speedup_over_ar']:.2f} vs ar), tau {run['tau']:.2f}, K {run['k']}, verify "
                f"{run['ms_per_verify']:.2f} ms (floor {run['verify_floor_ms']:.2f}), draft step {ms_d} ms, "
                f"{run['achieved_gb_per_s']:.0f} GB/s; attention {run['attention']}")
            del engine
            gc.collect()
            torch.cuda.empty_cache()
        if bs in args.hf_batch_sizes:
            key = (family, target_size, bs, args.frames, args.side, args.new_tokens)
            if key not in _HF_DONE:  # pairs that share a target share its HF figure
                _HF_DONE[key] = hf_generate(target, processor, rows_all, bs, args.new_tokens, args.repeats, log)
            hf = dict(_HF_DONE[key])
            result["runs"].append(hf)
            for run in result["runs"]:
                if run["batch_size"] == bs and run["mode"] != "hf_generate":
                    run["speedup_over_hf_generate"] = run["decode_tokens_per_s"] / hf["decode_tokens_per_s"]
            log(f"[{family} {target_size}/{draft_size}] bs {bs:3d} hf generate: {hf['decode_tokens_per_s']:.1f} tok/s")
    del draft, D
    result["draft_release"] = release(built)  # the target stays for the next pair that shares it
    return result


@torch.inference_mode()
def continuous(args, patterns: dict, log=print) -> dict:
    """Continuous vs static batching on replay with lengths: the same rows (each with the accepted
    counts and the caption length of a recorded toy row, lengths scaled to `--mean-length`) through
    `--slots` slots, streamed (a finished row's slot takes the next row at once) or in static
    batches of `--slots` rows (each batch runs until its longest row ends)."""
    family, t_size, d_size = _pairs(args.pair)[0]
    processor = real_processor(family)
    target, draft = build(family, t_size, args.device), build(family, d_size, args.device)
    records = patterns[args.mode][: args.rows]
    raw = [Replay.recorded_length(r) for r in records]
    scale = args.mean_length / (sum(raw) / len(raw))
    lengths = [max(2, round(n * scale)) for n in raw]
    rows = video_rows(processor, len(records), args.frames, args.side)
    cfg = SpecConfig(mode=args.mode, k=args.k, theta=0.5, max_new_tokens=max(lengths), stop_token_ids=(),
                     relevance_layers=(0,) if args.mode == "lvspec" else None)
    engine = Engine(target, draft, cfg, slots=args.slots)

    def static() -> int:
        tokens = 0
        for lo in range(0, len(rows), args.slots):
            replay = Replay(records[lo:lo + args.slots], lengths[lo:lo + args.slots])
            tokens += sum(o.stats.num_tokens for o in engine.generate(rows[lo:lo + args.slots], replay=replay))
        return tokens

    def streamed() -> int:
        return sum(o.stats.num_tokens for o in engine.generate(rows, replay=Replay(records, lengths)))

    result = {"pair": f"{family}-{t_size}/{d_size}", "mode": args.mode, "slots": args.slots, "rows": len(rows),
              "mean_length": sum(lengths) / len(lengths), "min_length": min(lengths), "max_length": max(lengths)}
    for name, fn in (("static", static), ("continuous", streamed)):
        # One warm-up (builds the state, captures the stages), then wall time with the device synchronised.
        runs = [t.result / t.seconds for t in timed(fn, args.repeats, warmup=1, device=args.device)]
        tps, spread = median_spread(runs)
        result[name] = {"tokens_per_s": tps, "spread": spread, "runs": runs}
        log(f"{name:10s}: {result[name]['tokens_per_s']:.1f} tokens/s (spread {result[name]['spread']:.1%})")
    result["continuous_vs_static"] = result["continuous"]["tokens_per_s"] / result["static"]["tokens_per_s"]
    log(f"continuous / static = {result['continuous_vs_static']:.2f} ({len(rows)} rows, {args.slots} slots, "
        f"lengths {min(lengths)}-{max(lengths)}, mean {result['mean_length']:.0f})")
    return result


def _probe_ms(probe: dict | None, model: str, bs: int, q: int, ctx: int) -> float | None:
    """The reference probe's graph figure for a model size (e.g. '7B') at batch bs and q tokens,
    from the probe run whose context is nearest `ctx`."""
    runs = [shape for shape in (probe or {}).get("shapes", []) if f"{model}_bs{bs}" in shape]
    if not runs:
        return None
    nearest = min(runs, key=lambda shape: abs(shape["ctx"] - ctx))
    return nearest[f"{model}_bs{bs}"].get(f"graph_q{q}_ms")


def markdown(report: dict) -> str:
    lines = ([f"{report['note']}", ""] if report.get("note") else []) + [
             f"Command: `{report['command']}`  ", f"Machine: {report['machine']}  ", f"Date: {report['date']}  ",
             f"Replayed acceptance: {report['patterns']}  ",
             f"Each row: median of {report.get('repeats', 3)} runs (spread = (max - min) / median); decode tokens/s excludes the "
             "prefill; ms per verify / draft step are the captured stages' GPU times (a verify forward runs "
             "K+1 tokens, an ar step 1); floor = weights + KV at 4.8 TB/s; probe = "
             "`../shared/probes/gpu_steps.py` graph replay (1 token; 11 for a verify), same machine and "
             "sitting, at the context nearest the prompt.", ""]
    for r in report["pairs"]:
        size = lambda name: name.split("-")[1].upper()  # noqa: E731
        lines += [f"#### {r['target']} target / {r['draft']} draft, {r['setting']} setting (random weights, bf16; "
                  f"{r['frames']} frames = {r['video_tokens']} video tokens, prompt {r['prompt_tokens']} tokens, "
                  f"{r['new_tokens']} new tokens per row, K={r['k']}; weights {r['target_weight_gb']:.1f} GB + "
                  f"{r['draft_weight_gb']:.1f} GB)", "",
                  "| batch | mode | K (median) | tau (replay) | decode tokens/s | spread | x our ar | x HF generate | "
                  "ms per verify (floor / probe) | ms per draft step (floor / probe) | GB/s (share of 4.8 TB/s) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        probe = report.get("probe")
        for x in r["runs"]:
            bs = x["batch_size"]
            if x["mode"] == "hf_generate":
                lines.append(f"| {bs} | HF generate | - | 1.00 | {x['decode_tokens_per_s']:.1f} | {x['spread']:.1%} | "
                             f"- | 1.00 | - | - | - |")
                continue
            q = 1 if x["mode"] == "ar" else 11
            pv = _probe_ms(probe, size(r["target"]), bs, q, r["prompt_tokens"])
            pd = _probe_ms(probe, size(r["draft"]), bs, 1, r["prompt_tokens"])
            verify = f"{x['ms_per_verify']:.2f} ({x['verify_floor_ms']:.2f} / {pv if pv else '-'})"
            draft = (f"{x['ms_per_draft_step']:.2f} ({x['draft_step_floor_ms']:.2f} / {pd if pd else '-'})"
                     if x.get("ms_per_draft_step") else "-")
            hf = f"{x['speedup_over_hf_generate']:.2f}" if "speedup_over_hf_generate" in x else "-"
            lines.append(f"| {bs} | {x['mode']} | {x['k']:g} | {x['tau']:.2f} | {x['decode_tokens_per_s']:.1f} | "
                         f"{x['spread']:.1%} | {x['speedup_over_ar']:.2f} | {hf} | {verify} | {draft} | "
                         f"{x['achieved_gb_per_s']:.0f} ({x['bandwidth_fraction']:.0%}) |")
        lines.append("")
    return "\n".join(lines)


def _pairs(specs: list[str]) -> list[tuple[str, str, str]]:
    pairs = []
    for spec in specs:  # check every pair before building anything
        family, t, d = (spec.split(":") + ["", ""])[:3]
        if family not in TEXT or t not in TEXT[family] or d not in TEXT[family]:
            raise SystemExit(f"--pair {spec!r}: want family:target:draft with family in {list(TEXT)} and sizes in "
                             f"{ {f: list(s) for f, s in TEXT.items()} }")
        pairs.append((family, t, d))
    return pairs


def main(argv=None):
    args = list(argv) if argv is not None else sys.argv[1:]
    if args[:1] == ["frontier"]:  # the bulk-throughput climb lives in bench/frontier.py
        from bench import frontier

        return frontier.main(["run", *args[1:]])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="record toy acceptance patterns (CPU is fine)")
    rec.add_argument("--videos", type=int, default=64)
    rec.add_argument("--seed", type=int, default=1234)
    rec.add_argument("--k", type=int, default=10)
    rec.add_argument("--out", default="bench/replay_patterns.json")
    rec.add_argument("--draft-frame-stride", type=int, default=1, help="the draft watches every n-th frame")
    st = sub.add_parser("steps", help="per-forward cost of the decoder, eager and captured (GPU)")
    st.add_argument("--size", action="append", required=True, help="family:size, e.g. qwen2_5_vl:7b")
    st.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    st.add_argument("--ctx", type=int, default=1200)
    st.add_argument("--json", required=True)
    run = sub.add_parser("run", help="time random-weight real-size pairs with replayed acceptance (GPU)")
    run.add_argument("--pair", action="append", required=True, help="family:target_size:draft_size, e.g. qwen2_5_vl:32b:7b")
    run.add_argument("--patterns", default="bench/replay_patterns.json")
    run.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    run.add_argument("--hf-batch-sizes", type=int, nargs="*", default=[1, 8], help="also time HF generate at these")
    run.add_argument("--new-tokens", type=int, default=128)
    run.add_argument("--frames", type=int, default=16)
    run.add_argument("--side", type=int, default=336)
    run.add_argument("--k", default="auto", help="draft length: auto or an integer")
    run.add_argument("--repeats", type=int, default=3)
    run.add_argument("--setting", default="default", help="a label for this run's shape (e.g. paper)")
    run.add_argument("--eager", action="store_true", help="no CUDA graphs (to measure what they buy)")
    run.add_argument("--probe", help="the reference probe's JSON from the same sitting (gpu_steps.py output)")
    run.add_argument("--device", default="cuda", help="cpu: a smoke run of the benchmark code only")
    run.add_argument("--json", required=True)
    con = sub.add_parser("continuous", help="continuous vs static batching on replay with lengths (GPU)")
    con.add_argument("--pair", action="append", required=True, help="family:target_size:draft_size (the first one)")
    con.add_argument("--patterns", default="bench/replay_patterns.json")
    con.add_argument("--mode", default="lvspec", choices=["sd", "lvspec"])
    con.add_argument("--slots", type=int, default=16)
    con.add_argument("--rows", type=int, default=64)
    con.add_argument("--mean-length", type=float, default=120.0)
    con.add_argument("--frames", type=int, default=16)
    con.add_argument("--side", type=int, default=336)
    con.add_argument("--k", default="auto")
    con.add_argument("--repeats", type=int, default=3)
    con.add_argument("--device", default="cuda", help="cpu: a smoke run of the benchmark code only")
    con.add_argument("--json", required=True)
    rep = sub.add_parser("report", help="merge run JSONs (and probe JSONs) into one report and its markdown")
    rep.add_argument("--json", nargs="+", required=True, help="run JSONs, in order")
    rep.add_argument("--probe", nargs="*", default=[], help="gpu_steps.py JSONs of the same sitting")
    rep.add_argument("--out", required=True)
    rep.add_argument("--markdown")
    rep.add_argument("--tag", default="realsize-bench", help="the generated block of the markdown file to rewrite")
    rep.add_argument("--title", default="Real size: random-weight models, replayed acceptance")
    rep.add_argument("--note", default="", help="a line about this sitting (what code, what it shows)")
    args = ap.parse_args(argv)
    if args.command == "record":
        return record(args)
    if args.command == "report":
        return report_cmd(args)
    if getattr(args, "device", "cuda") == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"bench.realsize {args.command} needs a CUDA GPU")
    if args.command == "steps":
        result = {**steps(args), **run_info("bench.realsize", argv)}
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        return
    if args.command == "continuous":
        args.k = int(args.k) if str(args.k).isdigit() else args.k
        family = _pairs(args.pair)[0][0]
        recorded = json.loads(Path(args.patterns).read_text())["families"][family]
        result = {**continuous(args, recorded), **run_info("bench.realsize", argv)}
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        return

    args.k = int(args.k) if str(args.k).isdigit() else args.k
    pairs = _pairs(args.pair)
    recorded = json.loads(Path(args.patterns).read_text())
    report = {**run_info("bench.realsize", argv), "repeats": args.repeats,
              "patterns": f"{args.patterns} (toy pairs, {recorded['videos']} videos of seed {recorded['seed']}, "
                          f"K={recorded['k']}, recorded {recorded['date']})", "pairs": []}
    log = lambda line: print(line, flush=True)  # noqa: E731
    target, target_key = None, None
    for family, t, d in pairs:
        if target_key != (family, t):  # pairs that share a target build it once
            if target is not None:  # free the last one before building this one
                gone, target = weakref.ref(target), None
                report["pairs"][-1]["target_release"] = release(gone)
            target, target_key = build(family, t, args.device), (family, t)
        report["pairs"].append(run_pair(args, family, t, d, recorded["families"][family], target=target, log=log))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))
    print(f"wrote {args.json}")


def report_cmd(args) -> None:
    runs = [json.loads(Path(p).read_text()) for p in args.json]
    report = {"command": " ; ".join(r["command"] for r in runs), "machine": runs[0]["machine"],
              "repeats": runs[0].get("repeats", 3), "note": args.note,
              "date": runs[0]["date"], "patterns": runs[0]["patterns"],
              "probe": {"shapes": [json.loads(Path(p).read_text()) for p in args.probe]} if args.probe else None,
              "pairs": [p for r in runs for p in r["pairs"]]}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        write_markdown_section(Path(args.markdown), markdown(report), tag=args.tag, title=args.title)
    print(markdown(report))


if __name__ == "__main__":
    main()
