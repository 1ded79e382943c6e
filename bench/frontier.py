"""The frontier: decode tokens/s by batch for ar, sd and lvspec, as far as memory goes, and each mode's peak.

    # on a GPU (bench/gpu_frontier.sh), one pair a call, results under $OUT
    python -m bench.realsize frontier --pair llava_onevision:7b:0.5b --memory-gib 80 --json $OUT/llava.json
    # here: the pairs' JSONs into bench/frontier.json and BENCHMARKS.md ("Bulk throughput")
    python -m bench.frontier report --json llava.json qwen.json --out bench/frontier.json --markdown BENCHMARKS.md

A bulk job runs at the batch that gives it the most tokens per second per GPU, so what decides
whether speculation pays is *peak lvspec / peak ar*: each mode at its own best batch. Per mode the
batch climbs (1, 8, 32, 64, 128, 256) until one runs out of GPU memory, which is recorded and ends
that mode's climb. Each point is one Engine with `batch` slots over random-weight models of real
shapes (`bench.shapes`, bf16), a warm-up and `--repeats` timed runs with replayed acceptance
(bench/replay_patterns.json), every row `--new-tokens` long, k=auto (each engine measures its own
cost table, at its batch). The rows repeat `--videos` videos, each prefilled for real once in the
sitting; every other row gets that prefill's keys copied into its slot (`PromptsOnce`), so the
prefill, which no decoding method speeds up, costs the sitting little and stays out of the figure.
A run is one call of `batch` rows, or with `--stream N`, N x batch rows streamed through the slots
(a freed slot takes the next row at once). Per point: decode tokens/s (median, spread); steady
tokens/s, the same until the stream's rows ran out (a free slot found none): what a bulk job's
replica runs at, whose slots never drain (a short stream's end is only slots emptying, and
lvspec's rows, whose lengths in cycles vary, leave many idle there); tau, the cycles' K, slot
use (decoding rows per cycle over slots), the verify's
TFLOP/s against the chip's bf16 peak, the bytes the forwards must read over HBM bandwidth, peak GPU
memory. `--memory-gib` caps the process's GPU memory (an 80 GB card's, on an H200); `--auto` adds an
lvspec engine with slots="auto", streaming twice as many rows as it chose slots.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import time
import weakref
from pathlib import Path

import torch

from bench.floor import BF16_PEAK, known
from bench.floor import table as floor_table
from bench.realsize import _pairs, build, hbm_bytes_per_s, kv_bytes, regroup, release, video_rows
from bench.report import run_info, write_markdown_section
from bench.shapes import real_processor, relevance_layers
from bench.timing import median_spread
from lvspec import Engine, Replay, SpecConfig
from lvspec.adapter import draft_row, text_config, with_draft_video
from lvspec.decoder import TextDecoder

MODES = ("ar", "sd", "lvspec")
BATCHES = (1, 8, 32, 64, 128, 256)


SOURCE = "frontier_source"  # a benchmark row's source video: rows repeat a few videos


class PromptsOnce:
    """Stands in for engines' `prompt_group` so that each source video is prefilled for real once.

    Rows name their source video (`SOURCE`). The first group holding a source not seen yet runs
    for real, and each new source's keys (both caches, the prompt's width) are kept aside with
    what its prefill gave (first token, the prompt's shape, positions and video mask); every later
    row of a kept source, in any slot of any engine over the same models, gets those keys copied
    in. Copies cost a few milliseconds where a prefill costs seconds: a benchmark's time goes to
    decoding, also when rows stream through freed slots."""

    def __init__(self):
        self.kept: dict[tuple, tuple] = {}
        self.prefills = 0

    def attach(self, engine: Engine) -> PromptsOnce:
        real = engine.prompt_group
        stride = engine.cfg.draft_frame_stride  # the draft's prompt (keys) depends on it
        engine.prompt_group = lambda st, rows, slots: self(real, st, rows, slots, stride)
        return self

    def __call__(self, real, st, rows: list[dict], slots: torch.Tensor, stride: int = 1):
        drafted = st.D is not None
        keys = [(row[SOURCE], drafted, stride if drafted else 1) for row in rows]
        index = slots.tolist()
        if any(key not in self.kept for key in keys):
            prompt, draft_prompt, first = real(st, rows, slots)
            self.prefills += 1
            for j, (key, slot) in enumerate(zip(keys, index)):
                if key not in self.kept:
                    saved = [(c.k[:, slot, :, :p.embeds.shape[1]].clone(), c.v[:, slot, :, :p.embeds.shape[1]].clone())
                             for c, p in ((st.T, prompt), (st.D, draft_prompt)) if c is not None]
                    self.kept[key] = (_row(prompt, j), _row(draft_prompt, j), first[j:j + 1].clone(), saved)
            return prompt, draft_prompt, first
        for key, slot in zip(keys, index):
            caches = [c for c in (st.T, st.D) if c is not None]
            for cache, (k, v) in zip(caches, self.kept[key][3]):
                cache.k[:, slot, :, :k.shape[-2]] = k
                cache.v[:, slot, :, :v.shape[-2]] = v
        got = [self.kept[key] for key in keys]
        return _cat([g[0] for g in got]), _cat([g[1] for g in got]), torch.cat([g[2] for g in got])


def _batch_dim(name: str, t: torch.Tensor) -> int:
    return 1 if name == "position_ids" and t.ndim == 3 else 0  # M-RoPE positions: [3, rows, width]


def _row(prompt, j: int):
    """Row j of a prompt batch, without its embeddings (only their shape is read when rows are placed)."""
    if prompt is None:
        return None
    fields = {}
    for f in dataclasses.fields(prompt):
        v = getattr(prompt, f.name)
        if isinstance(v, torch.Tensor):
            v = v.narrow(_batch_dim(f.name, v), j, 1).clone() if f.name != "embeds" else v.new_empty(1, v.shape[1], 0)
        fields[f.name] = v
    return type(prompt)(**fields)


def _cat(rows: list):
    if rows[0] is None:
        return None
    first = rows[0]
    return type(first)(**{f.name: torch.cat([getattr(r, f.name) for r in rows], _batch_dim(f.name, getattr(first, f.name)))
                          if isinstance(getattr(first, f.name), torch.Tensor) else getattr(first, f.name)
                          for f in dataclasses.fields(first)})


def point(engine: Engine, bs: int, rows: list[dict], once: PromptsOnce, replay: Replay | None, repeats: int,
          T: TextDecoder, D: TextDecoder | None, ctx: int) -> dict:
    """One (mode, batch): a warm-up run (state, cost table, the graphs of every shape the stream
    visits: packed verifies are captured at their first (K, width)), then timed runs of all `rows`
    through the engine's `bs` slots (as many rows, or more: streamed through them)."""
    cuda = engine.device.type == "cuda"
    once.attach(engine)
    prefills = once.prefills
    engine.generate(rows, replay=replay)
    runs, first = [], None
    for _ in range(repeats):
        if cuda:
            torch.cuda.reset_peak_memory_stats(engine.device)
        outs = engine.generate(rows, replay=replay)
        first = first or [o.tokens for o in outs]
        if [o.tokens for o in outs] != first:
            raise RuntimeError("a run decoded other tokens than the first: copied prompt keys differ from prefilled ones")
        t = engine.timing
        tokens = sum(o.stats.num_tokens - 1 for o in outs)  # the prefill's token is no decoding
        steady = t["steady_tokens"] / t["steady_s"] if t.get("steady_s") else None  # until the rows ran out
        runs.append({"tps": tokens / t["decode_s"], "steady": steady, "t": t, "tokens": tokens,
                     "cycles": sum(o.stats.num_cycles for o in outs),
                     "peak_gib": torch.cuda.max_memory_allocated(engine.device) / 2**30 if cuda else None})
    tps = [r["tps"] for r in runs]
    mid = sorted(runs, key=lambda r: r["tps"])[len(runs) // 2]
    t = mid["t"]
    ks = t["k"]
    verify_tokens = t["verify_tokens"]  # packed: each decoding row's own K + 1 (rounded up); else every slot's
    per_token = 2 * T.weight_bytes() / T.dtype.itemsize + 4 * len(T.layers) * T.heads * T.head_dim * ctx
    read = len(ks) * (T.weight_bytes() + kv_bytes(T, ctx, bs)) + t["draft_steps"] * (D.weight_bytes() + kv_bytes(D, ctx, bs) if D else 0)
    median, spread = median_spread(tps)
    stride = engine.cfg.draft_frame_stride
    draft_prompt = (draft_row(with_draft_video(engine.adapter, engine.draft, rows[0], stride))["input_ids"].shape[-1]
                    if D is not None and stride > 1 else rows[0]["input_ids"].shape[-1])
    steady = [r["steady"] for r in runs]
    steady_median, steady_spread = median_spread(steady) if None not in steady else (None, None)
    return {"batch_size": bs, "rows": len(rows), "decode_tokens_per_s": median, "spread": spread,
            "runs_tokens_per_s": tps, "steady_tokens_per_s": steady_median, "steady_spread": steady_spread,
            "tau": mid["tokens"] / max(mid["cycles"], 1), "cycles": len(ks),
            "k_median": statistics.median(ks) if ks else 0, "k_mean": sum(ks) / max(len(ks), 1),
            "slot_use": t["slot_use"], "steady_slot_use": t.get("steady_slot_use"), "ingests": t["ingests"],
            "costs": t["costs"],
            "ms_per_verify": 1e3 * t["verify_s"] / max(t["verifies"], 1),
            "tokens_per_verify": verify_tokens / max(t["verifies"], 1),
            "ms_per_draft_step": 1e3 * t["draft_s"] / t["draft_steps"] if t["draft_steps"] else None,
            "draft_steps": t["draft_steps"], "draft_prompt_tokens": int(draft_prompt),  # bench.floor's counts
            "cycle_ms": 1e3 * t["decode_s"] / max(len(ks), 1),
            "verify_tflops": verify_tokens * per_token / max(t["verify_s"], 1e-12) / 1e12,
            "verify_bf16_share": verify_tokens * per_token / max(t["verify_s"], 1e-12) / BF16_PEAK,
            "achieved_gb_per_s": read / t["decode_s"] / 1e9, "bandwidth_share": read / t["decode_s"] / hbm_bytes_per_s(),
            "peak_gib": max((r["peak_gib"] or 0) for r in runs) if cuda else None,
            "prefills": once.prefills - prefills, "attention": t["attention"],
            "attention_ms": {f"{name}/{size}": {m: round(sec * 1e3, 3) for m, sec in timed.items()}
                             for (name, size), timed in engine.attention_timings.items()},
            "attention_errors": {"/".join(key): why for key, why in engine.attention_errors.items()}}


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def climb(args, family: str, target, draft, processor, patterns: dict, label: tuple[str, str], log=print,
          save=lambda pair: None) -> dict:
    """Every mode up the batch sizes on one pair, until memory runs out; `save(pair)` after each point
    (a call cut short by its time limit keeps what it measured)."""
    device = target.device
    T = TextDecoder(target, text_config(target).vocab_size)
    D = TextDecoder(draft, text_config(draft).vocab_size)
    videos = video_rows(processor, min(args.videos, max(args.batch_sizes)), args.frames, args.side)
    base = [{**row, SOURCE: i} for i, row in enumerate(videos)]  # rows repeat these: speed only
    once = PromptsOnce()  # one pair, one set of prompt keys for every point
    prompt_tokens = int(base[0]["input_ids"].shape[1])
    ctx = prompt_tokens + args.new_tokens // 2  # mean tokens in the cache while decoding
    probe = tuple(relevance_layers(len(T.layers)))
    out = {"target": label[0], "draft": label[1], "family": family, "frames": args.frames, "setting": args.setting,
           "stream": args.stream, "pack_verify": not args.padded, "draft_frame_stride": args.draft_frame_stride,
           "prefill_tokens": args.prefill_tokens, "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
           "prompt_tokens": prompt_tokens, "new_tokens": args.new_tokens, "k": args.k,
           "memory_cap_gib": args.memory_gib, "relevance_layers": list(probe), "runs": [], "out_of_memory": {}}
    for mode in args.modes:
        for bs in args.batch_sizes:
            rows = [base[i % len(base)] for i in range(bs * max(args.stream, 1))]
            cfg = SpecConfig(mode=mode, k=args.k, theta=0.5, max_new_tokens=args.new_tokens, stop_token_ids=(),
                             relevance_layers=probe if mode == "lvspec" else None, pack_verify=not args.padded,
                             draft_frame_stride=args.draft_frame_stride if mode != "ar" else 1,
                             prefill_tokens=args.prefill_tokens)
            replay = Replay(regroup(patterns[mode], bs)) if mode != "ar" else None
            t0 = time.perf_counter()
            try:
                engine = Engine(target, draft if mode != "ar" else None, cfg, slots=bs)
                run = {"mode": mode, **point(engine, bs, rows, once, replay, args.repeats, T,
                                             D if mode != "ar" else None, ctx)}
            except torch.OutOfMemoryError as e:
                run = {"mode": mode, "batch_size": bs, "out_of_memory": True, "error": str(e).splitlines()[0][:800]}
            engine = None
            _free(device)
            out["runs"].append(run)
            save({**out, **peaks(out["runs"])})
            if run.get("out_of_memory"):
                out["out_of_memory"][mode] = bs
                log(f"[{label[0]}/{label[1]}] {mode:6s} bs {bs:3d}: out of GPU memory ({run['error'][:120]}); "
                    f"{mode} stops here")
                break
            log(f"[{label[0]}/{label[1]}] {mode:6s} bs {bs:3d}: {run['decode_tokens_per_s']:9.1f} tok/s "
                f"(spread {run['spread']:.1%}), tau {run['tau']:.2f}, K {run['k_mean']:.1f}, slots busy "
                f"{run['slot_use']:.0%}, verify {run['ms_per_verify']:.2f} ms = {run['verify_tflops']:.0f} TFLOP/s, "
                f"{run['achieved_gb_per_s']:.0f} GB/s, peak {run['peak_gib'] or 0:.1f} GiB, attention "
                f"{_paths(run['attention'])} "
                f"({time.perf_counter() - t0:.0f} s)")
    if args.auto:
        out["auto"] = auto_point(args, target, draft, base, once, patterns, probe, T, D, ctx, log)
    out.update(peaks(out["runs"]))
    return out


def _paths(chosen: dict) -> str:
    """The attention paths a point's engine chose: target step/verify, draft step/verify."""
    return " ".join(f"{who[0].upper()} {paths['step']}/{paths['verify']}" for who, paths in chosen.items() if paths)


def auto_point(args, target, draft, base, once, patterns, probe, T, D, ctx, log) -> dict:
    """lvspec with slots="auto": the slots it chooses for a stream of many rows, and twice that many
    rows streamed through them (as a bulk job's replica would)."""
    cfg = SpecConfig(mode="lvspec", k=args.k, theta=0.5, max_new_tokens=args.new_tokens, stop_token_ids=(),
                     relevance_layers=probe, pack_verify=not args.padded, draft_frame_stride=args.draft_frame_stride,
                     prefill_tokens=args.prefill_tokens)
    engine = Engine(target, draft, cfg, slots="auto", max_slots=max(args.batch_sizes))
    try:
        with torch.inference_mode():
            slots = engine.state_for(None, engine.max_slots, int(base[0]["input_ids"].shape[-1])).slots
        rows = [base[i % len(base)] for i in range(max(2 * slots, engine.max_slots))]
        replay = Replay(regroup(patterns["lvspec"], slots))
        result = {"plan": engine.plan.describe(), "slots": slots, "out_of_memory": False,
                  **point(engine, slots, rows, once, replay, args.repeats, T, D, ctx)}
    except torch.OutOfMemoryError as e:
        result = {"plan": engine.plan.describe() if engine.plan else None, "out_of_memory": True,
                  "error": str(e).splitlines()[0][:300]}
    engine = None
    _free(target.device)
    shown = ("plan", "decode_tokens_per_s", "slot_use", "peak_gib", "error")
    log(f"slots=auto: {({k: v for k, v in result.items() if k in shown})}")
    return result


def peaks(runs: list[dict]) -> dict:
    """Each mode's best batch, and peak over peak against ar."""
    best = {}
    for r in runs:
        if not r.get("out_of_memory") and r["decode_tokens_per_s"] > best.get(r["mode"], {}).get("tokens_per_s", 0):
            best[r["mode"]] = {"batch_size": r["batch_size"], "tokens_per_s": r["decode_tokens_per_s"]}
    ar = best.get("ar", {}).get("tokens_per_s")
    ratio = {f"peak_{m}_over_peak_ar": best[m]["tokens_per_s"] / ar if ar and m in best else None for m in ("sd", "lvspec")}
    by_batch = {}
    for r in runs:
        if not r.get("out_of_memory"):
            by_batch.setdefault(r["batch_size"], {})[r["mode"]] = r["decode_tokens_per_s"]
    over_ar = {bs: {m: v / got["ar"] for m, v in got.items() if m != "ar"} for bs, got in by_batch.items() if "ar" in got}
    # The same over each stream's steady part (until its rows ran out: a bulk job's slots never drain).
    steady = {}
    for r in runs:
        value = None if r.get("out_of_memory") else r.get("steady_tokens_per_s")
        if value is not None and value > steady.get(r["mode"], {}).get("tokens_per_s", 0):
            steady[r["mode"]] = {"batch_size": r["batch_size"], "tokens_per_s": value}
    ar_steady = steady.get("ar", {}).get("tokens_per_s")
    steady_ratio = {f"steady_peak_{m}_over_peak_ar": steady[m]["tokens_per_s"] / ar_steady
                    if ar_steady and m in steady else None for m in ("sd", "lvspec")}
    return {"peak": best, **ratio, "over_ar_by_batch": over_ar, "steady_peak": steady, **steady_ratio}


def run_cmd(args, argv) -> None:
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench.frontier run needs a CUDA GPU (--device cpu --toy: a smoke run of the code)")
        if args.memory_gib:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * 2**30 / total))
    args.k = int(args.k) if str(args.k).isdigit() else args.k
    recorded = json.loads(Path(args.patterns).read_text())
    if recorded.get("draft_frame_stride", 1) != args.draft_frame_stride:
        raise SystemExit(f"{args.patterns} was recorded with draft_frame_stride {recorded.get('draft_frame_stride', 1)}, "
                         f"not {args.draft_frame_stride}: record matching patterns "
                         f"(python -m bench.realsize record --draft-frame-stride {args.draft_frame_stride})")
    report = {**run_info("bench.frontier", argv), "repeats": args.repeats, "pairs": []}
    log = lambda line: print(line, flush=True)  # noqa: E731
    for spec in args.pair:
        family = spec.split(":")[0]
        if args.toy:  # the trained toy pair: the code path on a CPU, no figure of any use
            from toyworld.families import load_pair

            processor, target, draft = load_pair(family)
            for model in (target, draft):
                model.generation_config.eos_token_id = None
            label = (f"{family}-toy-target", f"{family}-toy-draft")
        else:
            _, t, d = _pairs([spec])[0]
            processor, target, draft = real_processor(family), build(family, t, args.device), build(family, d, args.device)
            label = (f"{family}-{t}", f"{family}-{d}")
        built = [weakref.ref(target), weakref.ref(draft)]
        done = len(report["pairs"])

        def save(pair, done=done):
            report["pairs"][done:] = [pair]
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n")

        pair = climb(args, family, target, draft, processor, recorded["families"][family], label, log, save)
        target = draft = None
        save({**pair, "release": release(*built)})
    print(markdown(report))
    print(f"wrote {args.json}")


def markdown(report: dict) -> str:
    lines = [f"Command: `{report['command']}`  ", f"Machine: {report['machine']}  ", f"Date: {report['date']}  ",
             f"Each point: median of {report.get('repeats', 3)} decodes of the same prefilled rows (spread = "
             "(max - min) / median), replayed acceptance, k=auto; decode tokens/s leaves the prefill out; steady "
             "tok/s: until the stream's rows ran out (a free slot found none; after it slots only empty); slots "
             "busy = decoding rows per cycle over slots (whole stream / its steady part, where measured); verify TFLOP/s against 989 (bf16 dense peak); GB/s: "
             f"bytes the forwards must read, against {hbm_bytes_per_s(report['machine']) / 1e12:.2f} TB/s; "
             "OOM = out of GPU memory, where that mode's climb ends.", ""]
    hbm = hbm_bytes_per_s(report["machine"])  # the share of the card's own bandwidth
    for p in report["pairs"]:
        cap = f", memory capped at {p['memory_cap_gib']} GiB" if p.get("memory_cap_gib") else ""
        flow = (f"{p['stream']} x batch rows streamed through the slots" if p.get("stream")
                else "one call of batch rows")
        flow += {True: "; verifies packed", False: "; verifies padded to the cycle's K"}.get(p.get("pack_verify"), "")
        if p.get("draft_frame_stride", 1) > 1:
            flow += f"; draft_frame_stride {p['draft_frame_stride']} (the draft's prompts: frames / stride)"
        lines += [f"#### {p['target']} / {p['draft']}, {p['frames']} frames ({p['prompt_tokens']}-token prompts), "
                  f"{p['new_tokens']} new tokens, {p.get('setting', 'default')} setting{cap}; {flow}", "",
                  "| batch | mode | decode tok/s | spread | x ar | steady tok/s | tau | K (mean) | slots busy | "
                  "ms per verify | tokens a verify | verify TFLOP/s (share) | GB/s (share) | peak GiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        over = p.get("over_ar_by_batch", {})
        for r in sorted(p["runs"], key=lambda r: (r["batch_size"], MODES.index(r["mode"]))):
            if r.get("out_of_memory"):
                lines.append(f"| {r['batch_size']} | {r['mode']} | OOM | | | | | | | | | | | |")
                continue
            x = over.get(r["batch_size"], over.get(str(r["batch_size"]), {})).get(r["mode"])  # JSON keys are strings
            cells = [r["batch_size"], r["mode"], f"{r['decode_tokens_per_s']:.1f}", f"{r['spread']:.1%}", _ratio(x),
                     _ratio(r.get("steady_tokens_per_s"), "{:.1f}"), f"{r['tau']:.2f}",
                     f"{r['k_mean']:.1f}", f"{r['slot_use']:.0%}" + (f" / {r['steady_slot_use']:.0%}" if
                                                                    r.get("steady_slot_use") else ""),
                     f"{r['ms_per_verify']:.2f}", _ratio(r.get("tokens_per_verify"), "{:.0f}"),
                     f"{r['verify_tflops']:.0f} ({r['verify_bf16_share']:.0%})",
                     f"{r['achieved_gb_per_s']:.0f} ({r['achieved_gb_per_s'] * 1e9 / hbm:.0%})",
                     _ratio(r.get("peak_gib"), "{:.1f}")]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        best = p.get("peak", {})
        lines += ["", "Peaks: " + ", ".join(f"{m} {b['tokens_per_s']:.1f} tok/s at batch {b['batch_size']}"
                                            for m, b in best.items())
                  + "; **peak lvspec / peak ar = " + _ratio(p.get("peak_lvspec_over_peak_ar"))
                  + "**, peak sd / peak ar = " + _ratio(p.get("peak_sd_over_peak_ar")), ""]
        if p.get("steady_peak"):
            lines += ["Steady state (each stream until its rows ran out): " + ", ".join(
                f"{m} {b['tokens_per_s']:.1f} tok/s at batch {b['batch_size']}" for m, b in p["steady_peak"].items())
                + "; peak lvspec / peak ar = " + _ratio(p.get("steady_peak_lvspec_over_peak_ar"))
                + ", peak sd / peak ar = " + _ratio(p.get("steady_peak_sd_over_peak_ar")), ""]
        a = p.get("auto")
        if a:
            lines += [f"slots=auto (lvspec): {a['plan']}; " + (
                f"out of GPU memory ({a['error']})" if a["out_of_memory"] else
                f"{a['rows']} rows streamed at {a['decode_tokens_per_s']:.1f} decode tok/s, slots busy "
                f"{a['slot_use']:.0%}, peak {_ratio(a.get('peak_gib'), '{:.1f}')} GiB"), ""]
        lines += chart(p)
        if known(p):
            lines += [""] + floor_table(p, report["machine"])
    return "\n".join(lines)


def _ratio(x, form: str = "{:.2f}") -> str:
    return form.format(x) if x is not None else "-"


def chart(p: dict) -> list[str]:
    """A Mermaid line chart of tokens/s against batch, one line a mode run (ar, sd, lvspec in that order;
    0: out of memory)."""
    batches = sorted({r["batch_size"] for r in p["runs"]})
    tps = {(r["mode"], r["batch_size"]): (0 if r.get("out_of_memory") else r["decode_tokens_per_s"]) for r in p["runs"]}
    top = max(tps.values(), default=1)
    ran = [m for m in MODES if any(r["mode"] == m for r in p["runs"])]
    lines = ["```mermaid", "xychart-beta", f'    title "{p["target"]} / {p["draft"]}: decode tokens/s by batch '
             f'(lines: {", ".join(ran)})"', f"    x-axis \"batch\" [{', '.join(map(str, batches))}]",
             f'    y-axis "tokens/s" 0 --> {int(top * 1.1) + 1}']
    for mode in ran:
        lines.append(f"    line [{', '.join(f'{tps.get((mode, b), 0):.0f}' for b in batches)}]")
    return lines + ["```", ""]


def merged(pairs: list[dict]) -> list[dict]:
    """One entry a (pair, shape, verify packing): runs of the same pair made in several calls (modes
    split over calls to fit a call's time) joined, and its peaks taken over all of them."""
    out: dict[tuple, dict] = {}
    for p in pairs:
        key = (p["target"], p["draft"], p["frames"], p["new_tokens"], p.get("setting"), p.get("memory_cap_gib"),
               p.get("stream"), p.get("pack_verify"), p.get("draft_frame_stride", 1))
        if key not in out:
            out[key] = {**p, "runs": [], "out_of_memory": {}}
        into = out[key]
        into["runs"] += p["runs"]
        into["out_of_memory"].update(p.get("out_of_memory", {}))
        if p.get("auto"):
            into["auto"] = p["auto"]
    for p in out.values():
        p.update(peaks(p["runs"]))
    return list(out.values())


def report_cmd(args) -> None:
    runs = [json.loads(Path(p).read_text()) for p in args.json]
    report = {"command": " ; ".join(r["command"] for r in runs), "machine": runs[0]["machine"],
              "date": runs[0]["date"], "repeats": runs[0].get("repeats", 3),
              "pairs": merged([p for r in runs for p in r["pairs"]])}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        write_markdown_section(Path(args.markdown), markdown(report), tag=args.tag, title=args.title)
    print(markdown(report))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="climb the batch sizes for a pair (GPU; --device cpu --toy: the code on a CPU)")
    run.add_argument("--pair", action="append", required=True, help="family:target_size:draft_size")
    run.add_argument("--patterns", default="bench/replay_patterns.json")
    run.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCHES))
    run.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    run.add_argument("--new-tokens", type=int, default=128)
    run.add_argument("--frames", type=int, default=16)
    run.add_argument("--side", type=int, default=336)
    run.add_argument("--k", default="auto")
    run.add_argument("--repeats", type=int, default=3)
    run.add_argument("--setting", default="default", help="a label for the shape (e.g. paper)")
    run.add_argument("--stream", type=int, default=0,
                     help="N > 0: N x batch rows streamed through each point's slots (a bulk job's steady state); "
                          "0: one call of batch rows")
    run.add_argument("--videos", type=int, default=8, help="distinct videos the rows repeat")
    run.add_argument("--memory-gib", type=float, default=None, help="cap the GPU memory this process may use")
    run.add_argument("--auto", action="store_true", help="also an lvspec engine with slots=auto")
    run.add_argument("--padded", action="store_true",
                     help="verify every slot at the cycle's K (pack_verify off), to compare with packed verifies")
    run.add_argument("--draft-frame-stride", type=int, default=1,
                     help="sd and lvspec drafts watch every n-th frame (replay patterns recorded so: --patterns)")
    run.add_argument("--prefill-tokens", type=int, default=SpecConfig.prefill_tokens,
                     help="generation.prefill_tokens: prompt tokens a prefill group takes (its activations)")
    run.add_argument("--device", default="cuda")
    run.add_argument("--toy", action="store_true", help="the toy pairs instead of real shapes (smoke runs)")
    run.add_argument("--json", required=True)
    rep = sub.add_parser("report", help="merge run JSONs into bench/frontier.json and BENCHMARKS.md")
    rep.add_argument("--json", nargs="+", required=True)
    rep.add_argument("--out", default="bench/frontier.json")
    rep.add_argument("--markdown")
    rep.add_argument("--tag", default="frontier-bench", help="the generated block of the markdown file to replace")
    rep.add_argument("--title", default="Bulk throughput", help="its section's title, the first time")
    args = ap.parse_args(argv)
    if args.command == "report":
        return report_cmd(args)
    return run_cmd(args, argv)


if __name__ == "__main__":
    main()
