"""Tensor-parallel speed with replayed acceptance: a real-size target sharded over N GPUs of one
host, the draft whole on each (issue 9's measurement).

    # 2x H200: LLaVA-OV-72B/0.5B and Qwen2.5-VL-72B/7B, ar / sd / lvspec at batch 1 and 8, TP=2
    python -m bench.tensor_parallel pairs --pair llava_onevision:72b:0.5b --pair qwen2_5_vl:72b:7b \\
        --tp 2 --batch-sizes 1 8 --json $OUT/tp_pairs.json
    # what TP buys: the 32B target's ar step at TP=1 and TP=2
    python -m bench.tensor_parallel step --size qwen2_5_vl:32b --tp 1 2 --json $OUT/tp_step.json
    # CPU smoke of the code path (gloo, tiny shapes): --device cpu --size/--pair with the "tiny" sizes

72B checkpoints can be neither downloaded nor saved on the GPU machine's disk, so each rank
builds its shard directly: the model is laid out on the meta device, transformers' own
tensor-parallel styles shard it (the same plan `lvspec.loading.load` loads checkpoints with:
attention heads and MLP columns split, embeddings and LM head whole), and the local shards are
then allocated on the rank's GPU with random values. Everything after that is the product's
path: `Engine` on rank 0, `Engine.follow` on the others, the same collectives, CUDA graphs and
replayed acceptance as `bench.realsize run`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from bench.realsize import _pairs, _stats, regroup, video_rows
from bench.shapes import TEXT, real_config, real_processor
from bench.report import run_info
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
            rows_all = video_rows(processor, max(args.batch_sizes), args.frames, args.side)
            layers = text_config(target).num_hidden_layers
            probe = tuple(sorted({0, layers // 3, 2 * layers // 3, layers - 1}))
            pair = {"target": f"{family}-{t_size}", "draft": f"{family}-{d_size}", "tp": world, "built_s": built_s,
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
                    tps, spread = _stats([r["tps"] for r in runs])
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
            target = draft = None
            if args.device == "cuda":
                torch.cuda.empty_cache()
        out.put((rank, results, None))
    except BaseException:
        out.put((rank, None, traceback.format_exc()))


def _step_rank(rank: int, world: int, port: int, args, out) -> None:
    """Time the target's ar decoding step (batch 1, the cycle of `--new-tokens` steps) at this TP."""
    try:
        dev = _device(args, rank)
        if world > 1:
            parallel.start(rank, world, port, cuda=args.device == "cuda")
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        results = []
        for spec in args.size:
            family, size = spec.split(":")
            target = build_shard(family, size, dev, world, args.dtype)
            rows = video_rows(real_processor(family), max(args.batch_sizes), args.frames, args.side)
            for bs in args.batch_sizes:
                cfg = SpecConfig(mode="ar", max_new_tokens=args.new_tokens, stop_token_ids=(),
                                 cuda_graphs=not args.eager)
                engine = Engine(target, None, cfg, slots=bs)
                if rank:
                    engine.follow()
                    continue
                runs = _timed(engine, rows[:bs], None, args.repeats, sync)
                engine.close()
                ms = [1e3 / (r["tps"] / bs) for r in runs]  # ms per decoding step of the whole batch
                step, spread = _stats(ms)
                results.append({"model": f"{family}-{size}", "tp": world, "batch_size": bs, "ms_per_step": step,
                                "spread": spread, "runs_ms": ms})
                print(f"[{family}-{size} TP={world}] bs {bs}: {step:.2f} ms per ar step (spread {spread:.1%})",
                      flush=True)
            target = None
        out.put((rank, results, None))
    except BaseException:
        out.put((rank, None, traceback.format_exc()))


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
    else:
        report["steps"] = [row for world in args.tp for row in _spawn(_step_rank, world, args)]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
