"""Tensor-parallel speed with replayed acceptance: a real-size target sharded over N GPUs of one
host, the draft whole on each (issue 9's measurement).

    # 2x H200: LLaVA-OV-72B/0.5B and Qwen2.5-VL-72B/7B, ar / sd / lvspec at batch 1 and 8, TP=2
    python -m bench.tensor_parallel pairs --pair llava_onevision:72b:0.5b --pair qwen2_5_vl:72b:7b \\
        --tp 2 --batch-sizes 1 8 --json $OUT/tp_pairs.json
    # what TP buys: the 32B target's ar step at TP=1, and at TP=2 with each all-reduce path
    python -m bench.tensor_parallel step --size qwen2_5_vl:32b --tp 1 2 --batch-sizes 1 8 \\
        --all-reduce nccl oneshot --json $OUT/tp_step.json
    # CPU smoke of the code path (gloo, tiny shapes): --device cpu --size/--pair with the "tiny" sizes

72B checkpoints can be neither downloaded nor saved on the GPU machine's disk, so each rank
builds its shard directly: the model is laid out on the meta device, transformers' own
tensor-parallel styles shard it (the same plan `lvspec.loading.load` loads checkpoints with:
attention heads and MLP columns split, embeddings and LM head whole), and the local shards are
then allocated on the rank's GPU with random values. Everything after that is the product's
path: `Engine` on rank 0, `Engine.follow` on the others, the same collectives, CUDA graphs and
replayed acceptance as `bench.realsize run`.

`step` reports, per configuration, ms per ar step (the engine's decode time over its steps) and
where it goes: kernels per step and their GPU time, all-reduce kernels and theirs, and the GPU's
idle gap (ms per step minus kernel time), from the profiler over 16 more steps of each held
engine (once every configuration is timed); `tp2_step_over_tp1` is the best TP=2 path's ms at
batch 1 over TP=1's (the first --size). Each configuration ends by dropping its engines and models
(`realsize.release`): the JSON says whether they were freed and the GPU memory still allocated,
and the command fails, after writing it, if any was not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
import weakref
from pathlib import Path

import torch
import torch.multiprocessing as mp

from bench.realsize import _pairs, regroup, release, video_rows
from bench.shapes import TEXT, real_config, real_processor
from bench.report import run_info
from bench.timing import median_spread
from lvspec import Engine, Replay, SpecConfig, dummy, parallel
from lvspec.adapter import text_config

TINY = (256, 512, 2, 2, 2, 151936)  # CPU smoke: hidden, intermediate, layers, heads, kv heads, vocab (head 128)
for _family in TEXT:
    TEXT[_family].setdefault("tiny", TINY)


def _small_vision(cfg) -> None:
    cfg.vision_config.depth = 1
    if hasattr(cfg.vision_config, "fullatt_block_indexes"):
        cfg.vision_config.fullatt_block_indexes = [0]
    if hasattr(cfg.vision_config, "num_hidden_layers"):
        cfg.vision_config.num_hidden_layers = 1


def build_shard(family: str, size: str, device: torch.device, world: int, dtype=torch.bfloat16):
    """This rank's shard of a random-weight real-shape model (a started `world`-rank group): the
    product's load format `dummy`, from the shape table; stop tokens off."""
    cfg = real_config(family, size)
    if size.startswith("tin"):
        _small_vision(cfg)
    model = dummy.from_config(cfg, dtype, device, world)
    model.generation_config.eos_token_id = None
    return model


def _device(args, rank: int) -> torch.device:
    return torch.device(f"cuda:{rank}") if args.device == "cuda" else torch.device("cpu")


def _timed(engine: Engine, rows, replay, repeats: int, sync) -> list[dict]:
    engine.generate(rows, replay=replay)  # warm-up: state, captured stages, K costs
    runs = []
    for _ in range(repeats):
        sync()
        outs = engine.generate(rows, replay=replay)
        t = engine.timing
        tokens = sum(o.stats.num_tokens - 1 for o in outs)
        runs.append({"tps": tokens / t["decode_s"], "tau": tokens / sum(o.stats.num_cycles for o in outs),
                     "ms_verify": 1e3 * t["verify_s"] / t["verifies"],
                     "ms_draft_step": 1e3 * t["draft_s"] / t["draft_steps"] if t["draft_steps"] else None,
                     "k": statistics.median(t["k"]) if t["k"] else 0})
    return runs


def _pairs_rank(rank: int, world: int, port: int, args, patterns: dict, out) -> None:
    try:
        dev = _device(args, rank)
        parallel.start(rank, world, port, cuda=args.device == "cuda")
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        results = []
        for family, t_size, d_size in _pairs(args.pair):
            processor = real_processor(family)
            t0 = time.perf_counter()
            target = build_shard(family, t_size, dev, world, args.dtype)
            draft = build_shard(family, d_size, dev, 1, args.dtype)
            built_s = time.perf_counter() - t0
            models = weakref.ref(target), weakref.ref(draft)
            rows_all = video_rows(processor, max(args.batch_sizes), args.frames, args.side)
            layers = text_config(target).num_hidden_layers
            probe = tuple(sorted({0, layers // 3, 2 * layers // 3, layers - 1}))
            pair = {"target": f"{family}-{t_size}", "draft": f"{family}-{d_size}", "tp": world, "built_s": built_s,
                    "all_reduce": _path(parallel.of(target)),
                    "prompt_tokens": int(rows_all[0]["input_ids"].shape[1]), "runs": []}
            for bs in args.batch_sizes:
                ar = None
                for mode in ("ar", "sd", "lvspec"):
                    cfg = SpecConfig(mode=mode, k=args.k, theta=0.5, max_new_tokens=args.new_tokens,
                                     stop_token_ids=(), relevance_layers=probe if mode == "lvspec" else None,
                                     cuda_graphs=not args.eager)
                    engine = Engine(target, draft if mode != "ar" else None, cfg, slots=bs)
                    if rank:
                        engine.follow()
                        continue
                    replay = Replay(regroup(patterns[family][mode], bs)) if mode != "ar" else None
                    runs = _timed(engine, rows_all[:bs], replay, args.repeats, sync)
                    engine.close()
                    tps, spread = median_spread([r["tps"] for r in runs])
                    mid = sorted(runs, key=lambda r: r["tps"])[len(runs) // 2]
                    ar = tps if mode == "ar" else ar
                    run = {"batch_size": bs, "mode": mode, "decode_tokens_per_s": tps, "spread": spread,
                           "runs_tokens_per_s": [r["tps"] for r in runs], "speedup_over_ar": tps / ar,
                           "tau": mid["tau"], "k": mid["k"], "ms_per_verify": mid["ms_verify"],
                           "ms_per_draft_step": mid["ms_draft_step"]}
                    pair["runs"].append(run)
                    print(f"[{pair['target']}/{d_size} TP={world}] bs {bs} {mode:6s}: {tps:8.1f} tok/s (spread "
                          f"{spread:.1%}, x{run['speedup_over_ar']:.2f} vs ar), tau {mid['tau']:.2f}, K {mid['k']}, "
                          f"verify {mid['ms_verify']:.2f} ms", flush=True)
            results.append(pair)
            target = draft = engine = None  # the last engine holds both models, its state and graphs
            pair["release"] = release(*models)
            _say_released(rank, f"{pair['target']}/{d_size} TP={world}", pair["release"])
        out.put((rank, results, None))
    except BaseException:
        out.put((rank, None, traceback.format_exc()))


def _step_rank(rank: int, world: int, port: int, args, out) -> None:
    """Time the target's ar decoding step (the cycle of `--new-tokens` steps) at this TP, with each
    `--all-reduce` path, per batch size; then profile each held engine once (after every timing:
    the profiler, once loaded, stays)."""
    try:
        dev = _device(args, rank)
        if "oneshot" in args.all_reduce:  # its buffer is set up with the group (opt-in in the product)
            os.environ[parallel.ALL_REDUCE_ENV] = "oneshot"
        if world > 1:
            parallel.start(rank, world, port, cuda=args.device == "cuda")
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        steps, released = [], []
        for spec in args.size:
            family, size = spec.split(":")
            target = build_shard(family, size, dev, world, args.dtype)
            built = weakref.ref(target)
            tp = parallel.of(target)
            one_shot = tp.symm if tp is not None else None
            rows = video_rows(real_processor(family), max(args.batch_sizes), args.frames, args.side)
            held = []  # (row, engine) per configuration timed
            for path in args.all_reduce if tp is not None else [None]:
                if path == "oneshot" and one_shot is None:
                    if not rank:
                        print(f"[{family}-{size} TP={world}] no one-shot all-reduce here (needs CUDA ranks with "
                              "symmetric memory): its runs are skipped", flush=True)
                    continue
                for bs in args.batch_sizes:
                    if tp is not None:  # "nccl": the group's own all-reduce; captured into this engine's graphs
                        tp.symm = one_shot if path == "oneshot" else None
                    cfg = SpecConfig(mode="ar", max_new_tokens=args.new_tokens, stop_token_ids=(),
                                     cuda_graphs=not args.eager)
                    engine = Engine(target, None, cfg, slots=bs)
                    row = {"model": f"{family}-{size}", "tp": world, "all_reduce": path, "batch_size": bs}
                    held.append((row, engine))
                    if rank:
                        engine.follow()
                        continue
                    runs = _timed(engine, rows[:bs], None, args.repeats, sync)
                    engine.close()
                    ms = [1e3 / (r["tps"] / bs) for r in runs]  # ms per decoding step of the whole batch
                    row["ms_per_step"], row["spread"] = median_spread(ms)
                    row["runs_ms"] = ms
                    print(f"[{_label(row)}] bs {bs}: {row['ms_per_step']:.2f} ms per ar step (spread "
                          f"{row['spread']:.1%})", flush=True)
            for row, engine in held:  # each configuration's steps through the profiler
                if tp is not None:  # as when it was timed (its graphs hold the path already; eager runs read it)
                    tp.symm = one_shot if row["all_reduce"] == "oneshot" else None
                if rank:
                    engine.follow()
                    continue
                row["breakdown"] = _breakdown(engine, rows[:row["batch_size"]], row["ms_per_step"],
                                              args.device == "cuda")
                engine.close()
                b = row["breakdown"]
                if "error" not in b:
                    print(f"[{_label(row)}] bs {row['batch_size']}: per step {b['kernels']:.0f} kernels "
                          f"{b['kernel_ms']} ms, {b['all_reduce_kernels']:.0f} all-reduces {b['all_reduce_ms']} ms, "
                          f"GPU idle {b['idle_ms']} ms", flush=True)
                steps.append(row)
            target = tp = one_shot = engine = held = None
            released.append({"model": f"{family}-{size}", "tp": world, **release(built)})
            _say_released(rank, f"{family}-{size} TP={world}", released[-1])
        out.put((rank, {"steps": steps, "released": released}, None))
    except BaseException:
        out.put((rank, None, traceback.format_exc()))


def _breakdown(engine: Engine, rows, ms_per_step: float, cuda: bool, steps: int = 16) -> dict:
    """Where an ar step's time goes, per step: kernels and their GPU time (copies and sets counted
    too), all-reduce kernels and theirs, and the GPU's idle gap (`ms_per_step` minus the kernel
    time). One profiling session holds a prefill-only call (each row's budget 1 token), then a call
    of `steps` steps (budget steps + 1): the second call's first kernels, as many as the first call
    ran, are its prefill (same rows, and no step starts before the prefill is done); the rest are
    the steps' (an ar step costs the same at any cache length: its shapes are fixed). On CPU the
    collectives' ops stand in for kernels (their count means something, their times are host times)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    try:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            engine.generate(rows, replay=Replay([[0]] * len(rows), [1] * len(rows)))
            with record_function("whole call"):
                engine.generate(rows, replay=Replay([[0]] * len(rows), [steps + 1] * len(rows)))
        cycles = engine.timing["cycles"]
        events = prof.events()
        split = next(e.time_range.start for e in events if e.name == "whole call" and e.device_type == DeviceType.CPU)
        if cuda:
            work = [e for e in events if e.device_type == DeviceType.CUDA and e.name != "whole call"
                    and not getattr(e, "is_user_annotation", False)]
        else:
            work = [e for e in events if e.name.startswith("c10d::")]
        work.sort(key=lambda e: e.time_range.start)
        prefill = sum(e.time_range.start < split for e in work)
        stepped = [e for e in work if e.time_range.start >= split][prefill:]
        reduces = [e for e in stepped if "allreduce" in e.name.lower().replace("_", "")]
        kernel_ms = sum(e.time_range.elapsed_us() for e in stepped) / cycles / 1e3
        return {"cycles": cycles, "kernels": round(len(stepped) / cycles, 2), "kernel_ms": round(kernel_ms, 4),
                "all_reduce_kernels": round(len(reduces) / cycles, 2),
                "all_reduce_ms": round(sum(e.time_range.elapsed_us() for e in reduces) / cycles / 1e3, 4),
                "idle_ms": round(ms_per_step - kernel_ms, 4) if cuda else None}
    except Exception as e:  # noqa: BLE001 - the timings stand without it
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def _path(tp: parallel.TensorParallel | None) -> str | None:
    """The decoding all-reduce a target's engines capture now (None: not sharded)."""
    return None if tp is None else "oneshot" if tp.symm is not None else "nccl"


def _label(row: dict) -> str:
    return f"{row['model']} TP={row['tp']}" + (f" {row['all_reduce']}" if row["all_reduce"] else "")


def _say_released(rank: int, name: str, released: dict) -> None:
    if not rank:
        gib = released["gpu_allocated_gib"]
        memory = f", {gib} GiB still allocated" if gib is not None else ""
        state = "released" if released["released"] else f"NOT RELEASED: {released['still_held']} still referenced"
        print(f"[{name}] {state}{memory}", flush=True)


def _over_tp1(steps: list[dict]) -> dict:
    """Each row's ms over TP=1's at the same model and batch size; the headline: the first model's
    best TP=2 path at batch 1."""
    one = {(r["model"], r["batch_size"]): r["ms_per_step"] for r in steps if r["tp"] == 1}
    for r in steps:
        base = one.get((r["model"], r["batch_size"]))
        r["over_tp1"] = r["ms_per_step"] / base if base else None
    first = [r for r in steps if r["model"] == steps[0]["model"] and r["tp"] == 2 and r["batch_size"] == 1
             and r["over_tp1"]] if steps else []
    best = min(first, key=lambda r: r["over_tp1"], default=None)
    return {"tp2_step_over_tp1": best["over_tp1"] if best else None,
            "tp2_best_all_reduce": best["all_reduce"] if best else None}


def _spawn(fn, world: int, *args):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=fn, args=(r, world, port, *args, out)) for r in range(world)]
    for p in procs:
        p.start()
    got = {rank: (res, err) for rank, res, err in (out.get() for _ in procs)}
    for p in procs:
        p.join()
    errors = [err for _, err in got.values() if err]
    if errors:
        raise RuntimeError("a rank failed:\n" + "\n".join(errors))
    return got[0][0]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    pairs = sub.add_parser("pairs", help="ar / sd / lvspec of sharded pairs")
    pairs.add_argument("--pair", action="append", required=True, help="family:target:draft, e.g. qwen2_5_vl:72b:7b")
    pairs.add_argument("--tp", type=int, default=2)
    pairs.add_argument("--patterns", default="bench/replay_patterns.json")
    pairs.add_argument("--k", default="auto")
    step = sub.add_parser("step", help="a target's ar step at several TP sizes")
    step.add_argument("--size", action="append", required=True, help="family:size, e.g. qwen2_5_vl:32b")
    step.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    step.add_argument("--all-reduce", nargs="+", default=["nccl", "oneshot"], choices=["nccl", "oneshot"],
                      help="decoding all-reduce paths timed at TP > 1 (nccl: the group's own; gloo on CPU)")
    for p in (pairs, step):
        p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
        p.add_argument("--new-tokens", type=int, default=128)
        p.add_argument("--frames", type=int, default=16)
        p.add_argument("--side", type=int, default=336)
        p.add_argument("--repeats", type=int, default=3)
        p.add_argument("--eager", action="store_true")
        p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a gloo smoke run")
        p.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.tensor_parallel needs CUDA GPUs (or --device cpu for a smoke run)")
    report = run_info("bench.tensor_parallel", argv)
    if args.command == "pairs":
        args.k = int(args.k) if str(args.k).isdigit() else args.k
        patterns = json.loads(Path(args.patterns).read_text())["families"]
        report["pairs"] = _spawn(_pairs_rank, args.tp, args, patterns)
        released = [p["release"] for p in report["pairs"]]
    else:
        got = [_spawn(_step_rank, world, args) for world in args.tp]
        report["steps"] = [row for g in got for row in g["steps"]]
        report["released"] = released = [r for g in got for r in g["released"]]
        report.update(_over_tp1(report["steps"]))
        if report["tp2_step_over_tp1"] is not None:
            print(f"TP=2 step / TP=1 step at batch 1: {report['tp2_step_over_tp1']:.3f} "
                  f"({report['tp2_best_all_reduce']})")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.json}")
    if not all(r["released"] for r in released):
        raise SystemExit("a configuration's models were not freed when it ended (see 'released' in the JSON)")
    return report


if __name__ == "__main__":
    main()
