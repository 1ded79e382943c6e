"""The Ray job on a GPU, measured end to end against the engine alone (bench/gpu_pipeline.sh runs it).

    # on the GPU machine (a Ray head started there, the rows' shards written by bench.videos):
    python -m bench.pipeline_gpu engine --rows 192 --json $OUT/engine.json
    python -m bench.pipeline_gpu job --shards /tmp/shards --rows 192 --json $OUT/jobs.json
    # here: the acceptance figures into bench/pipeline_gpu.json and BENCHMARKS.md
    python -m bench.pipeline_gpu report --json engine.json jobs.json --out bench/pipeline_gpu.json \\
        --markdown BENCHMARKS.md

Both sides run jobs/configs/gpu-bench.yaml's replica: LLaVA-OneVision 7B / 0.5B built with random
weights by the product's loader (`model.load_format: dummy`), acceptance replayed per video_id
(`generation.replay`, heavy-tailed caption lengths), the same slots. `job` submits the captioning
job through `ray job submit` (decode actors, the caption replica, Parquet) and samples the GPU's
utilisation (nvidia-smi) while it runs; `engine` streams the same video_ids through `load_engine`'s
Engine in-process (prompts from random frames of the same size: with random weights and replayed
acceptance, pixels change no work). Throughput is compared over the steady state: the rows that
finish between the 10th and 90th percentile of finish times, tokens over that time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import faulthandler
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.timing import measure, median_spread, timed

CONFIG = "jobs/configs/gpu-bench.yaml"
DASHBOARD = "http://127.0.0.1:8265"  # the head `ray start --head` started on this machine
# continuous: the product's (prefill beside decoding); serial (engine only): continuous, each
# prefill waiting for decoding (overlap_prefill off); eager (engine only): continuous, prompt
# forwards launched eagerly (prompt_graphs off); static: new rows only once all slots are free.
BATCHINGS = ("continuous", "serial", "eager", "static")
WINDOW = (0.1, 0.9)  # steady state: rows finishing between these quantiles of finish time
EXCLUDES = [".site", ".gpu-a", ".gpu-b", ".whl", ".whl-job", ".venv", ".scratch", "data", "out", ".git"]


def steady(finished: list[tuple[float, int]], window=WINDOW) -> dict:
    """Tokens/s and rows/s over the steady state of (finish time, tokens) pairs: the rows finishing
    between the window's quantiles of finish time, over the time between them."""
    times = sorted(t for t, _ in finished)
    lo, hi = times[int(window[0] * (len(times) - 1))], times[int(window[1] * (len(times) - 1))]
    inside = [(t, n) for t, n in finished if lo < t <= hi]
    span = max(hi - lo, 1e-9)
    return {"start": lo, "end": hi, "seconds": span, "rows": len(inside),
            "tokens_per_s": sum(n for _, n in inside) / span, "rows_per_s": len(inside) / span}


def _finish_times(outputs) -> tuple[list[tuple[float, int]], int]:
    """Drain an engine's stream: each row's finish time (perf_counter) and tokens, and the cycles."""
    finished, cycles = [], 0
    for _, result in outputs:
        finished.append((time.perf_counter(), result.stats.num_tokens))
        cycles += result.stats.num_cycles
    return finished, cycles


def stats(values: list[float]) -> dict:
    """Median and spread ((max - min) / median) of repeated measurements."""
    mid, spread = median_spread(values)
    return {"median": mid, "spread": spread, "runs": values}


def _config(overrides: list[str]):
    from pipeline.config import load_config

    return load_config(CONFIG, ["job_id=bench", "source.uri=/tmp", "output.uri=/tmp", *overrides])


def ids(rows: int, seed: int = 0) -> list[str]:
    from bench.videos import video_id

    return [video_id(seed, i) for i in range(rows)]


# ---- the engine alone ------------------------------------------------------------------------
def engine(args, out: dict) -> dict:
    """The replica's Engine in-process: each mode and batching over the same video_ids, three runs."""
    import numpy as np
    import torch
    from transformers import AutoProcessor

    from bench.videos import HEIGHT, WIDTH
    from lvspec import Engine, Replay
    from lvspec.config import shipped_settings
    from lvspec.engine import REPLAY_KEY
    from lvspec.stats import tau
    from pipeline.caption import replay_key
    from pipeline.replica import load_engine
    from pipeline.config import replica_dtype, spec_config
    from pipeline.decode import chat_prompt

    cfg = _config(args.overrides)
    gen, caption = cfg.generation, cfg.caption
    tp = caption.tensor_parallel
    if tp > 1 and {m for m, _ in args.runs} != {gen.mode}:
        raise SystemExit(f"with caption.tensor_parallel={tp} the engine runs the replica's own mode "
                         f"(generation.mode={gen.mode}) only: its peers follow that engine")
    t0 = time.perf_counter()
    load = dict(model=cfg.model, generation=gen, num_cpus=caption.num_cpus, slots=caption.slots or caption.batch_size)
    peers = None
    if tp > 1:  # as the caption stage does: this process is rank 0, the peers its child processes
        from pipeline.peers import Peers

        peers = Peers(tp, load)
    base, tokenizer = load_engine(**load, world=tp)
    built_s = time.perf_counter() - t0
    processor = AutoProcessor.from_pretrained(cfg.model.target)
    text = chat_prompt(processor, cfg.model.prompt)
    rng = np.random.default_rng(0)
    prompts = [dict(processor(text=[text], videos=[rng.integers(0, 256, (cfg.decode.num_frames, HEIGHT, WIDTH, 3),
                                                                dtype=np.uint8)], return_tensors="pt"))
               for _ in range(4)]
    # Pixels in the replica's dtype, as the job's decode stage hands them over.
    pixels = getattr(torch, replica_dtype(cfg.model, torch.cuda.is_available()))
    prompts = [{k: v.to(pixels) if k.startswith("pixel_values") else v for k, v in p.items()} for p in prompts]
    rows = [{**prompts[i % len(prompts)], REPLAY_KEY: replay_key({"video_id": v})} for i, v in enumerate(ids(args.rows))]
    out.update(rows=args.rows, frames=cfg.decode.num_frames, slots=base.slots, built_s=built_s,
               prompt_tokens=int(rows[0]["input_ids"].shape[1]), tensor_parallel=tp, target=cfg.model.target,
               draft=cfg.model.draft, runs=[])
    shipped = shipped_settings(cfg.model.target)
    can_overlap = base.overlap
    for mode in dict.fromkeys(m for m, _ in args.runs):
        spec = spec_config(dataclasses.replace(gen, mode=mode), shipped)
        eng = base if peers else Engine(base.target, base.draft if mode != "ar" else None, spec, slots=base.slots)
        replay = Replay.from_file(gen.replay, eng.adapter.family, mode, gen.replay_lengths)
        graphs = eng.prompt_graphs
        list(eng.stream(rows[:2 * base.slots], tokenizer=tokenizer, replay=replay))  # warm-up: state, graphs, costs
        for repeat in range(args.repeats):
            for batching in [b for m, b in args.runs if m == mode]:
                # Overlap where the engine can (not under tensor parallelism: one NCCL group, two streams).
                eng.overlap = batching in ("continuous", "eager") and can_overlap
                eng.prompt_graphs = "off" if batching == "eager" else graphs
                # A generator: it starts decoding once drained, inside the clock (wall, the GPU synchronised around).
                outputs = eng.stream(rows, tokenizer=tokenizer, replay=replay, static=batching == "static")
                clocked = measure(lambda: _finish_times(outputs), device=_device())
                (finished, cycles), wall = clocked.result, clocked.seconds
                tokens = sum(n for _, n in finished)
                run = {"mode": mode, "batching": batching, "repeat": repeat, "tokens": tokens, "wall_s": wall,
                       "tokens_per_s_whole": tokens / wall, "steady": steady(finished),
                       "prefill_s": eng.timing["prefill_s"], "cycles": eng.timing["cycles"],
                       "overlapped_prefills": eng.timing["overlapped_prefills"], "prefills": eng.timing["prefills"],
                       "tau": tau(tokens, len(finished), cycles),
                       "k_median": statistics.median(eng.timing["k"]) if eng.timing["k"] else 0,
                       "prompt_graphs": eng.timing["prompt_graphs"]}
                out["runs"].append(run)
                print(f"[engine] {mode:6s} {batching:10s} run {repeat}: {run['steady']['tokens_per_s']:8.1f} tok/s "
                      f"steady, {run['tokens_per_s_whole']:8.1f} whole ({tokens} tokens, {wall:.1f} s, prefill "
                      f"{run['prefill_s']:.1f} s, tau {run['tau']:.2f}; prompt graphs {run['prompt_graphs']})", flush=True)
                _write(args.json, out)
        if args.profile:  # where a stream's time goes (rank 0's view under tensor parallelism)
            part = rows[:2 * base.slots]
            _profile(args.profile, f"engine {mode}: {len(part)} rows, {base.slots} slots, TP={tp}",
                     lambda e=eng: list(e.stream(part, tokenizer=tokenizer, replay=replay)), rows=30)
        del eng
    if peers:
        peers.close(base)
    return out


# ---- the job through the front door ---------------------------------------------------------
class GpuSampler:
    """nvidia-smi's utilisation.gpu (percent of time a kernel ran) of every GPU every `ms`, with timestamps."""

    def __init__(self, ms: int = 100):
        self.samples: list[tuple[float, int, float, float]] = []  # (unix time, GPU index, util %, memory MiB)
        self.proc = None
        if shutil.which("nvidia-smi") is None:  # a CPU smoke run: nothing to sample
            return
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=timestamp,index,utilization.gpu,memory.used", "--format=csv,noheader,nounits",
             f"--loop-ms={ms}"], stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                stamp, index, util, mem = (x.strip() for x in line.split(","))
                when = datetime.datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()
                self.samples.append((when, int(index), float(util), float(mem)))
            except ValueError:
                continue

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()

    def between(self, lo: float, hi: float) -> dict:
        """Busy fraction between two times: of each GPU that ran anything, and their mean."""
        per_gpu: dict[int, list[tuple[float, float]]] = {}
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # the GPUs the cluster was started with
        mine = {int(i) for i in visible.split(",") if i.strip().isdigit()} if visible else None
        for t, gpu, util, mem in self.samples:
            if lo <= t <= hi and (mine is None or gpu in mine):
                per_gpu.setdefault(gpu, []).append((util, mem))
        used = {g: v for g, v in per_gpu.items() if max(m for _, m in v) > 1024}  # a model's weights on it
        if not used:
            return {"samples": 0}
        busy = {g: sum(u for u, _ in v) / len(v) / 100 for g, v in sorted(used.items())}
        return {"samples": sum(len(v) for v in used.values()), "busy_fraction": statistics.mean(busy.values()),
                "busy_per_gpu": busy, "memory_mib_max": max(m for v in used.values() for _, m in v)}


def _peer_pids() -> list[int]:
    """Processes running a tensor-parallel peer rank (`python -m pipeline.peers`) on this machine."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"pipeline.peers" in cmd:
            pids.append(int(entry.name))
    return sorted(pids)


def _kill_a_peer(out_dir: Path, after_s: float, done: threading.Event, record: dict) -> None:
    """Once the job has written its first Parquet file, wait `after_s` and SIGKILL one peer rank."""
    while not done.is_set() and not list(out_dir.rglob("*.parquet")):
        time.sleep(0.5)
    record["first_file_at"] = time.time()
    if done.wait(after_s):
        return
    pids = _peer_pids()
    record["peers_seen"] = len(pids)
    if pids:
        os.kill(pids[0], signal.SIGKILL)
        record.update(pid=pids[0], at=time.time(), peers_before=len(pids))
        print(f"[job] killed tensor-parallel peer pid {pids[0]} (SIGKILL; {len(pids)} peers were running)", flush=True)


def _rows(out_dir: Path) -> list[dict]:
    import pyarrow.parquet as pq

    files = sorted(out_dir.rglob("*.parquet"))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def job(args, out: dict) -> dict:
    """Submit the captioning job per mode, batching and repeat; read its rows; sample the GPU."""
    cfg = _config(args.overrides)
    actors = cfg.decode.actors["max"]
    out.update(rows=args.rows, shards=args.shards, decode_actors=actors, frames=cfg.decode.num_frames,
               replicas=cfg.caption.replicas["max"], tensor_parallel=cfg.caption.tensor_parallel,
               target=cfg.model.target, draft=cfg.model.draft, kill_peer_after_s=args.kill_peer_after, runs=[])
    root = Path(args.work)
    for repeat in range(args.repeats):
        for mode, batching in args.runs:
            job_id = f"bench-{mode}-{batching}-{repeat}-{int(time.time())}"
            overrides = [f"job_id={job_id}", f"source.uri={args.shards}", f"output.uri={root}",
                         f"generation.mode={mode}", f"caption.batching={batching}", *args.overrides]
            command = ["ray", "job", "submit", "--address", DASHBOARD, "--runtime-env-json",
                       json.dumps({"working_dir": ".", "excludes": EXCLUDES}), "--",
                       sys.executable, "-m", "jobs.caption", "--config", CONFIG, *overrides]
            sampler, killed, finished = GpuSampler(), {}, threading.Event()
            if args.kill_peer_after is not None:
                threading.Thread(target=_kill_a_peer, args=(root / job_id, args.kill_peer_after, finished, killed),
                                 daemon=True).start()
            start = time.time()
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
                code, log = done.returncode, done.stdout + done.stderr
            except subprocess.TimeoutExpired as e:
                code, log = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) \
                    else (e.stdout or "")
                subprocess.run(["ray", "job", "stop", "--address", DASHBOARD, job_id], capture_output=True)
            wall = time.time() - start
            finished.set()
            sampler.stop()
            run = {"mode": mode, "batching": batching, "repeat": repeat, "job_id": job_id, "exit": code,
                   "wall_s": wall, "log_tail": log[-3000:]}
            if args.kill_peer_after is not None:
                run["peer_killed"] = {**killed, "at_s": killed["at"] - start} if "at" in killed else killed
            rows = _rows(root / job_id) if (root / job_id).exists() else []
            ok = [r for r in rows if r["error"] is None and r["captioned_at"] is not None]
            run.update(written=len(rows), ok=len(ok), distinct_ids=len({r["video_id"] for r in rows}),
                       errors=sorted({r["error"] for r in rows if r["error"]})[:5])
            if ok:
                s = steady([(r["captioned_at"], r["num_tokens"]) for r in ok])
                frames = sum(r["num_frames"] for r in ok)
                decode_s = sum(r["decode_ms"] for r in rows) / 1e3
                inside = [r for r in ok if s["start"] < r["captioned_at"] <= s["end"]]
                consumed = sum(r["num_frames"] for r in inside) / s["seconds"]
                per_core = frames / max(decode_s, 1e-9)  # one CPU per decode actor
                run.update(steady=s, gpu=sampler.between(s["start"], s["end"]),
                           first_caption_s=min(r["captioned_at"] for r in ok) - start,
                           tokens=sum(r["num_tokens"] for r in ok),
                           tau=statistics.mean(r["mean_accepted_length"] for r in ok),
                           replayed=all(r["acceptance_replayed"] for r in ok),
                           decode={"frames_per_s_per_core": per_core, "capacity_frames_per_s": per_core * actors,
                                   "consumed_frames_per_s": consumed,
                                   "headroom": per_core * actors / max(consumed, 1e-9),
                                   "ms_per_video": decode_s * 1e3 / len(rows)})
            summary = root / job_id / "_summary.json"
            if summary.exists():
                run["summary"] = json.loads(summary.read_text())
            spill = subprocess.run(["ray", "memory", "--stats-only"], capture_output=True, text=True)
            run["object_store"] = [line for line in spill.stdout.splitlines() if "pill" in line or "Plasma" in line]
            out["runs"].append(run)
            s, g = run.get("steady", {}), run.get("gpu", {})
            print(f"[job] {mode:6s} {batching:10s} run {repeat}: exit {code}, {run['ok']}/{args.rows} rows, "
                  f"{s.get('tokens_per_s', 0):8.1f} tok/s steady, GPU busy {g.get('busy_fraction', 0):.2f}, "
                  f"decode headroom {run.get('decode', {}).get('headroom', 0):.2f}, wall {wall:.0f} s "
                  f"(first caption at {run.get('first_caption_s', 0):.0f} s)", flush=True)
            if code != 0:
                print(log[-2000:], flush=True)
            _write(args.json, out)
    return out


def decode_rate(args, out: dict) -> dict:
    """Frames/s one core decodes (decord + the processor, as a decode actor) at each frame count."""
    import tarfile

    import pyarrow as pa

    from pipeline.decode import DecodeStage

    cfg = _config(args.overrides)
    videos = []
    with tarfile.open(sorted(Path(args.shards).glob("*.tar"))[0]) as tar:
        for m in tar.getmembers():
            if m.name.endswith(".mp4"):
                videos.append((m.name[:-4], tar.extractfile(m).read()))
    out["rates"] = rates = {}
    for frames in args.frames:
        stage = DecodeStage(dataclasses.replace(cfg.decode, num_frames=frames, fps=None), cfg.model, {})
        batch = pa.Table.from_pylist([{"video_id": k, "source_uri": k, "shard": "", "video": v, "truth": None,
                                       "error": None} for k, v in videos[:args.videos]])
        t0 = time.perf_counter()
        rows = [r for table in stage(batch) for r in table.to_pylist()]
        seconds = time.perf_counter() - t0
        rates[str(frames)] = {"videos": len(rows), "frames_per_s_per_core": len(rows) * frames / seconds,
                              "errors": [r["error"] for r in rows if r["error"]]}
        print(f"[decode] {frames} frames: {rates[str(frames)]['frames_per_s_per_core']:.1f} frames/s on one core",
              flush=True)
    _write(args.json, out)
    return out


def prefill(args, out: dict) -> dict:
    """Where a row's prefill goes (GPU ms, median of 3 after a warm-up) for groups of 1 and 4 rows:
    each model's vision tower + splice (`adapter.prompt`) and its language model over the prompt,
    with the engine's explicit mask and cache (as prefilled) and HF's causal path without a cache,
    against the FLOP floor (2 x parameters x tokens at 700 TFLOP/s)."""
    import numpy as np
    import torch
    from transformers import AutoProcessor

    from bench.videos import HEIGHT, WIDTH
    from pipeline.replica import load_engine
    from pipeline.decode import chat_prompt

    from lvspec.adapter import rows_on

    # Eager first (the shipped config compiles the prefill); --compile then compiles the same engine's.
    cfg = _config(["generation.compile_prefill=false", *args.overrides])
    eng, _ = load_engine(cfg.model, cfg.generation, cfg.caption.num_cpus, cfg.caption.slots)
    processor = AutoProcessor.from_pretrained(cfg.model.target)
    frames = np.random.default_rng(0).integers(0, 256, (cfg.decode.num_frames, HEIGHT, WIDTH, 3), dtype=np.uint8)
    row = dict(processor(text=[chat_prompt(processor, cfg.model.prompt)], videos=[frames], return_tensors="pt"))

    clock = "cuda" if eng.device.type == "cuda" else "wall"  # GPU ms by CUDA events; host ms on a CPU smoke run

    def ms(fn) -> float:  # median of 3 after a warm-up
        return statistics.median(t.ms for t in timed(fn, 3, warmup=1, clock=clock))

    out["rows"] = []
    with torch.inference_mode():
        for group in args.groups:
            rows = [row] * group
            for name, model, decoder in (("target", eng.target, eng.T), ("draft", eng.draft, eng.D)):
                prompt = eng.adapter.prompt(model, rows)
                width = prompt.embeds.shape[1]
                cache = decoder.new_cache(group, -(-width // 128) * 128)
                slots = torch.arange(group, device=eng.device)
                lm = model.model.language_model
                ready = rows_on(rows, eng.device, eng.target.dtype)  # as the engine hands them: vision work alone
                pixels = torch.cat([r["pixel_values_videos"] for r in ready])
                pixels = pixels.flatten(0, 1) if pixels.dim() == 5 else pixels

                def forward(how: str):
                    if how == "nocache":  # HF's own causal path, no cache
                        lm(inputs_embeds=prompt.embeds, position_ids=prompt.position_ids, use_cache=False)
                        return
                    view = cache.prefill_view(slots, prompt.pad, prompt.padded)
                    mask = view.band(width) if how == "band" else view.mask(width)
                    lm(inputs_embeds=prompt.embeds, attention_mask=mask, position_ids=prompt.position_ids,
                       past_key_values=view, use_cache=True)

                params = sum(p.numel() for p in lm.parameters())
                vision = model.model.visual if hasattr(model.model, "visual") else model.model.vision_tower
                vparams = sum(p.numel() for p in vision.parameters())
                patches = pixels.shape[0] * (729 if pixels.dim() == 4 else 1)  # SigLIP 384/14: 27^2 a frame
                result = {"model": name, "rows": group, "prompt_tokens": width,
                          "vision_and_splice_ms": ms(lambda: eng.adapter.prompt(model, rows)),
                          "vision_and_splice_on_device_ms": ms(lambda: eng.adapter.prompt(model, ready)),
                          "lm_band_ms": ms(lambda: forward("band")),
                          "lm_engine_ms": ms(lambda: forward("engine")),
                          "lm_floor_ms": 2 * params * width * group / 700e12 * 1e3,
                          "vision_floor_ms": 2 * vparams * patches / 700e12 * 1e3}
                if hasattr(model.model, "vision_tower"):
                    result["vision_tower_ms"] = ms(lambda: model.model.vision_tower(pixels))
                try:
                    result["lm_nocache_ms"] = ms(lambda: forward("nocache"))
                except Exception as e:  # noqa: BLE001 - report what failed
                    result["lm_nocache_ms"] = f"{type(e).__name__}: {e}"[:200]
                out["rows"].append(result)
                print(f"[prefill] {result}", flush=True)
                if args.profile and group == 1:
                    _profile(args.profile, f"{name}: prompt (pixels from the host)",
                             lambda: eng.adapter.prompt(model, rows))
                    _profile(args.profile, f"{name}: vision on device", lambda: eng.adapter.prompt(model, ready))
                    _profile(args.profile, f"{name}: language model (engine path)", lambda: forward("engine"))
                del cache
        out["prompt_graphs"] = [_prompt_graph_check(eng, row, group) for group in (1, 4)]
        if args.compile:  # the engine's prefill eager and compiled (generation.compile_prefill)
            out["compiled"] = _compiled_prefill(eng, row, args.groups, ms, args.profile)
        if args.profile:  # the engine's whole loop: where the GPU waits
            from lvspec import Replay
            from lvspec.engine import REPLAY_KEY
            from pipeline.caption import replay_key

            replay = Replay.from_file(cfg.generation.replay, eng.adapter.family, cfg.generation.mode,
                                      cfg.generation.replay_lengths)
            stream = [{**row, REPLAY_KEY: replay_key({"video_id": v})} for v in ids(args.rows)]
            list(eng.stream(stream[:8], replay=replay))  # state, graphs
            _profile(args.profile, f"engine: {args.rows} rows, continuous, {eng.slots} slots",
                     lambda: list(eng.stream(stream, replay=replay)), rows=25)
    return out


def _group(eng, row: dict, group: int):
    """`group` copies of `row` as the engine prefills them: (state, rows on the device, slot index,
    prompt width), and a reader of the keys both caches hold for them."""
    import torch

    from lvspec.adapter import rows_on

    width = int(row["input_ids"].shape[-1])
    auto = eng.slots == "auto"
    st = eng.state_for(None if auto else eng.slots, eng.max_slots if auto else None, width)

    def keys() -> list:
        return [c.k[:, :group, :, :width].to(torch.float32, copy=True) for c in (st.T, st.D) if c is not None]

    return st, rows_on([row] * group, eng.device, eng.target.dtype), torch.arange(group, device=eng.device), keys


def _keys_diff(got: list, expect: list) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(got, expect))


def _compiled_prefill(eng, row: dict, groups: list[int], ms, profile: str | None) -> list[dict]:
    """A group's prefill as the engine runs it (`Engine.prompt_group`: both models' vision and
    prompt forwards, keys into the caches) eagerly and compiled (`Engine.compile_prefill`): GPU ms
    of the whole and of each model's vision + splice, the first compiled call's seconds (a compile or
    recompile), and whether the compiled prefill wrote what the eager one did (first tokens, keys'
    max abs difference over their largest magnitude, bf16)."""
    import torch

    def run(group: int) -> dict:
        st, ready, index, keys = _group(eng, row, group)
        first = measure(lambda: eng.prompt_group(st, ready, index), device=_device())  # wall, GPU synchronised
        return {"first_call_s": first.seconds, "first": first.result[2].clone(), "keys": keys(),
                "prefill_ms": ms(lambda: eng.prompt_group(st, ready, index)),
                **{f"{name}_vision_ms": ms(lambda: eng.adapter.prompt(model, ready))
                   for name, model in (("target", eng.target), ("draft", eng.draft))}}

    eager = {group: run(group) for group in groups}
    eng.compile_prefill()
    results = []
    for group in groups:
        got, before = run(group), eager[group]
        result = {"rows": group, "first_call_s": got["first_call_s"],
                  "first_tokens_equal": bool(torch.equal(got["first"], before["first"])),
                  "keys_max_abs_diff": _keys_diff(got["keys"], before["keys"]),
                  "keys_scale": max(float(b.abs().max()) for b in before["keys"])}
        for key in ("prefill_ms", "target_vision_ms", "draft_vision_ms"):
            result[key] = {"eager": before[key], "compiled": got[key], "gain": before[key] / got[key]}
        results.append(result)
        print(f"[prefill] compiled {result}", flush=True)
        if profile and group == 1:
            st, ready, index, _ = _group(eng, row, 1)
            _profile(profile, "a row's prefill (both models), compiled", lambda: eng.prompt_group(st, ready, index))
    return results


def _prompt_graph_check(eng, row: dict, group: int) -> dict:
    """A group's prompt forwards (`Engine.prompt_group`: both models, keys into the caches) eagerly
    and as a replayed `PromptGraphs` capture: host ms to queue each (what the decoding loop waits
    for), GPU ms, and whether the replay wrote what the eager run did (first tokens, both caches' keys)."""
    import torch

    from lvspec.graphs import PromptGraphs

    st, rows, index, keys = _group(eng, row, group)
    graphs = PromptGraphs("cuda" if eng.device.type == "cuda" else "static")

    def fn(r, i):
        return eng.prompt_group(st, r, i)

    # Host time to queue a call (host_seconds) and wall time to its end on the GPU (synchronised before and after).
    eager = timed(lambda: fn(rows, index), 3, warmup=1, device=_device())
    first, expect = eager[-1].result[2].clone(), keys()
    graphs.run(fn, rows, index)  # capture
    for c in (st.T, st.D):
        if c is not None:
            c.k[:, :group].zero_()
    replayed = timed(lambda: graphs.run(fn, rows, index), 3, warmup=0, device=_device())
    result = {"rows": group, "graphs": graphs.summary(),
              "eager_host_ms": statistics.median(t.host_seconds * 1e3 for t in eager),
              "eager_wall_ms": statistics.median(t.ms for t in eager),
              "replay_host_ms": statistics.median(t.host_seconds * 1e3 for t in replayed),
              "replay_wall_ms": statistics.median(t.ms for t in replayed),
              "first_tokens_equal": bool(torch.equal(first, replayed[-1].result[2])),
              "keys_max_abs_diff": _keys_diff(keys(), expect)}
    print(f"[prompt graphs] {result}", flush=True)
    return result


def _profile(path: str, title: str, fn, rows: int = 15) -> None:
    """Append the top kernels (device time) and host ops (own CPU time) of one call of `fn` to `path`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    fn()
    _sync()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        fn()
        _sync()
    wall = (time.perf_counter() - t0) * 1e3
    events = prof.key_averages()
    device_ms = sum(e.self_device_time_total for e in events) / 1e3
    with open(path, "a") as f:
        f.write(f"\n==== {title}: wall {wall:.1f} ms (profiled), kernels {device_ms:.1f} ms\n")
        if cuda:
            f.write(events.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70))
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=70))
    print(f"[profile] {title}: wall {wall:.1f} ms, kernels {device_ms:.1f} ms", flush=True)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _device() -> str:
    """The device a wall-clock timing synchronises: CUDA wherever there is one (as `_sync`)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _write(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")


# ---- the report (here) ---------------------------------------------------------------------
def report(args) -> dict:
    """The acceptance figures from the GPU sitting's JSONs, medians of three with spread."""
    from bench.report import write_markdown_section

    parts = [json.loads(Path(p).read_text()) for p in args.json]
    engine_runs = [r for p in parts if p.get("kind") == "engine" for r in p["runs"]]
    job_runs = [r for p in parts if p.get("kind") == "job" for r in p["runs"] if r.get("steady")]
    decode = next((p["rates"] for p in parts if p.get("kind") == "decode"), {})
    prefill_rows = next((p["rows"] for p in parts if p.get("kind") == "prefill"), [])
    prompt_graphs = next((p["prompt_graphs"] for p in parts if p.get("kind") == "prefill" and "prompt_graphs" in p), [])
    compiled = next((p["compiled"] for p in parts if p.get("kind") == "prefill" and "compiled" in p), [])
    meta = next((p for p in parts if p.get("kind") == "job"), None) or next(p for p in parts if p.get("kind") == "engine")

    def engine_tps(mode, batching):
        return stats([r["steady"]["tokens_per_s"] for r in engine_runs if (r["mode"], r["batching"]) == (mode, batching)])

    def job_field(mode, batching, get):
        return stats([get(r) for r in job_runs if (r["mode"], r["batching"]) == (mode, batching)])

    res = {"machine": meta.get("machine"), "date": meta.get("date"), "commands": [p.get("command") for p in parts],
           "rows": meta["rows"], "frames": meta["frames"],
           "slots": next((p["slots"] for p in parts if p.get("slots")), None),
           "decode_actors": meta.get("decode_actors"), "engine": {}, "job": {}}
    for mode in ("lvspec", "ar"):
        for batching in BATCHINGS:
            key = f"{mode}/{batching}"
            if any((r["mode"], r["batching"]) == (mode, batching) for r in engine_runs):
                res["engine"][key] = engine_tps(mode, batching)
                mine = [r for r in engine_runs if (r["mode"], r["batching"]) == (mode, batching)]
                res["engine"][key]["prefill_share"] = statistics.median(r["prefill_s"] / r["wall_s"] for r in mine)
            if any((r["mode"], r["batching"]) == (mode, batching) for r in job_runs):
                res["job"][key] = {
                    "tokens_per_s": job_field(mode, batching, lambda r: r["steady"]["tokens_per_s"]),
                    "gpu_busy_fraction": job_field(mode, batching, lambda r: r["gpu"].get("busy_fraction", 0.0)),
                    "decode_headroom": job_field(mode, batching, lambda r: r["decode"]["headroom"]),
                    "frames_per_s_per_core": job_field(mode, batching, lambda r: r["decode"]["frames_per_s_per_core"]),
                    "consumed_frames_per_s": job_field(mode, batching, lambda r: r["decode"]["consumed_frames_per_s"]),
                    "rows_written": [r["written"] for r in job_runs if (r["mode"], r["batching"]) == (mode, batching)],
                    "distinct_video_ids": [r["distinct_ids"] for r in job_runs
                                           if (r["mode"], r["batching"]) == (mode, batching)]}
    j, e = res["job"], res["engine"]
    figures = {}
    if "lvspec/continuous" in j and "lvspec/continuous" in e:
        figures["pipeline_efficiency"] = j["lvspec/continuous"]["tokens_per_s"]["median"] / e["lvspec/continuous"]["median"]
        figures["gpu_busy_fraction"] = j["lvspec/continuous"]["gpu_busy_fraction"]["median"]
        figures["decode_headroom"] = j["lvspec/continuous"]["decode_headroom"]["median"]
    # The replica's own figure (engine, medians of three); the job's beside it.
    if "lvspec/static" in e:
        figures["continuous_vs_static"] = e["lvspec/continuous"]["median"] / e["lvspec/static"]["median"]
    if "lvspec/serial" in e:
        figures["overlap_gain"] = e["lvspec/continuous"]["median"] / e["lvspec/serial"]["median"]
        if "lvspec/static" in e:
            figures["serial_vs_static"] = e["lvspec/serial"]["median"] / e["lvspec/static"]["median"]
    if "lvspec/eager" in e:
        figures["prompt_graph_gain"] = e["lvspec/continuous"]["median"] / e["lvspec/eager"]["median"]
    if "lvspec/static" in j:
        figures["job_continuous_vs_static"] = (j["lvspec/continuous"]["tokens_per_s"]["median"]
                                               / j["lvspec/static"]["tokens_per_s"]["median"])
    if "ar/continuous" in j:
        figures["job_lvspec_over_ar"] = j["lvspec/continuous"]["tokens_per_s"]["median"] / j["ar/continuous"]["tokens_per_s"]["median"]
    if "ar/continuous" in e:
        figures["engine_lvspec_over_ar"] = e["lvspec/continuous"]["median"] / e["ar/continuous"]["median"]
        if "ar/continuous" in j:
            figures["pipeline_efficiency_ar"] = j["ar/continuous"]["tokens_per_s"]["median"] / e["ar/continuous"]["median"]
    if "lvspec/continuous" in j:
        consumed = j["lvspec/continuous"]["consumed_frames_per_s"]["median"]
        per_core = {f: d["frames_per_s_per_core"] for f, d in decode.items()} or \
            {str(res["frames"]): j["lvspec/continuous"]["frames_per_s_per_core"]["median"]}
        # Cores for 1.2x headroom: at the measured frame count from what the replica consumed; at other
        # counts as if it took rows as fast (an upper bound: longer prompts take longer to prefill).
        figures["cores_per_gpu"] = {(f if int(f) == res["frames"] else f"{f} (upper bound)"):
                                    round(1.2 * consumed * (int(f) / res["frames"]) / rate, 1)
                                    for f, rate in per_core.items()}
    res["prefill"] = prefill_rows
    res["prompt_graphs"] = prompt_graphs
    res["compiled"] = compiled
    res["figures"] = figures
    Path(args.out).write_text(json.dumps({"parts": parts, **res}, indent=1) + "\n")
    if args.markdown:
        write_markdown_section(Path(args.markdown), markdown(res), tag=args.tag, title=args.title)
    print(markdown(res))
    return res


def markdown(res: dict) -> str:
    f = res["figures"]
    fmt = lambda s: (f"{s['median']:.1f} (median of {len(s['runs'])}, spread {s['spread']:.1%})"  # noqa: E731
                     if len(s["runs"]) > 1 else f"{s['median']:.1f} (one run)")
    lines = [f"Machine: {res['machine']}  ", f"Date: {res['date']}  ",
             "Commands: " + "; ".join(f"`{c}`" for c in res["commands"] if c) + "  ",
             f"LLaVA-OV 7B / 0.5B (random weights, `model.load_format: dummy`), acceptance replayed per video "
             f"(lognormal lengths, median 150 tokens), {res['frames']} frames a video, {res['rows']} rows a run, "
             f"{res['slots']} slots, {res['decode_actors']} decode actors. Steady state = rows finishing between "
             f"the 10th and 90th percentile of finish times; spread = (max - min) / median.", "",
             "| | engine alone tok/s (host time queuing prefills, share of its time) | job tok/s | job / engine | job GPU busy | decode headroom |",
             "|---|---|---|---|---|---|"]
    for key in ("lvspec/continuous", "lvspec/eager", "lvspec/serial", "lvspec/static", "ar/continuous"):
        e, j = res["engine"].get(key), res["job"].get(key)
        if not (e or j):
            continue
        ratio = f"{j['tokens_per_s']['median'] / e['median']:.2f}" if e and j else "-"
        shown = f"{fmt(e)}, prefill {e['prefill_share']:.0%}" if e else "-"
        lines.append(f"| {key} | {shown} | {fmt(j['tokens_per_s']) if j else '-'} | {ratio} | "
                     f"{j['gpu_busy_fraction']['median']:.2f} | {j['decode_headroom']['median']:.2f} |" if j else
                     f"| {key} | {shown} | - | - | - | - |")
    lines += ["", "| figure | value | needed |", "|---|---|---|"]
    needed = {"pipeline_efficiency": ">= 0.9", "gpu_busy_fraction": ">= 0.9", "continuous_vs_static": ">= 1.3",
              "decode_headroom": ">= 1.2"}
    for name, value in f.items():
        shown = ", ".join(f"{k} frames: {v}" for k, v in value.items()) if isinstance(value, dict) else f"{value:.2f}"
        lines.append(f"| {name} | {shown} | {needed.get(name, '')} |")
    if res.get("prefill"):
        lines += ["", "Where a row's prefill goes (GPU ms per call, median of 3; floors = 2 x parameters x tokens "
                  "at 700 TFLOP/s; band = the explicit mask the engine used before; no cache = HF's own forward):",
                  "", "| model | rows | vision + splice (pixels from the host) | on device | vision tower alone | "
                  "vision floor | LM, as prefilled | LM with the band | LM, no cache | LM floor |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        num = lambda v: f"{v:.1f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
        for r in res["prefill"]:
            lines.append(" | ".join([f"| {r['model']}", str(r["rows"])] + [num(r.get(k)) for k in (
                "vision_and_splice_ms", "vision_and_splice_on_device_ms", "vision_tower_ms", "vision_floor_ms",
                "lm_engine_ms", "lm_band_ms", "lm_nocache_ms", "lm_floor_ms")]) + " |")
    if res.get("prompt_graphs"):
        lines += ["", "A group's prompt forwards (both models, keys into the caches), queued eagerly and replayed "
                  "as a CUDA graph (`PromptGraphs`): ms the host spends queuing them (what the decoding loop, "
                  "same thread, waits) and wall ms to done, median of 3; the replay's first tokens and keys "
                  "against the eager run's:", "",
                  "| rows | eager: host / wall | replayed: host / wall | first tokens equal | keys max abs diff |",
                  "|---|---|---|---|---|"]
        for r in res["prompt_graphs"]:
            lines.append(f"| {r['rows']} | {r['eager_host_ms']:.1f} / {r['eager_wall_ms']:.1f} | "
                         f"{r['replay_host_ms']:.1f} / {r['replay_wall_ms']:.1f} | {r['first_tokens_equal']} | "
                         f"{r['keys_max_abs_diff']:g} |")
    if res.get("compiled"):
        lines += ["", "A group's prefill as the engine runs it (both models' vision and prompt forwards, keys into "
                  "the caches), eager and compiled (`generation.compile_prefill`): GPU ms, median of 3, and the "
                  "vision + splice part of each model; the first compiled call's seconds (compile or recompile); "
                  "the compiled run's first tokens and keys against the eager run's (bf16):", "",
                  "| rows | prefill eager / compiled (gain) | target vision | draft vision | first call s | "
                  "first tokens equal | keys max abs diff / max |", "|---|---|---|---|---|---|---|"]
        part = lambda d: f"{d['eager']:.1f} / {d['compiled']:.1f} ({d['gain']:.2f}x)"  # noqa: E731
        for r in res["compiled"]:
            lines.append(f"| {r['rows']} | {part(r['prefill_ms'])} | {part(r['target_vision_ms'])} | "
                         f"{part(r['draft_vision_ms'])} | {r['first_call_s']:.1f} | {r['first_tokens_equal']} | "
                         f"{r['keys_max_abs_diff']:.3g} / {r['keys_scale']:.3g} |")
    return "\n".join(lines)


def _run(text: str) -> tuple[str, str]:
    mode, _, batching = text.partition("/")
    if mode not in ("ar", "sd", "lvspec") or batching not in BATCHINGS:
        raise argparse.ArgumentTypeError(f"{text!r}: want MODE/BATCHING, BATCHING one of {BATCHINGS}, "
                                         "e.g. lvspec/static")
    return mode, batching


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    en = sub.add_parser("engine", help="the replica's Engine in-process (GPU)")
    jo = sub.add_parser("job", help="the job through ray job submit (a Ray head running here)")
    de = sub.add_parser("decode", help="one core's decode rate at each frame count")
    pf = sub.add_parser("prefill", help="where a row's prefill time goes (GPU)")
    for p in (en, jo, de, pf):
        p.add_argument("--rows", type=int, default=192)
        p.add_argument("--json", required=True)
        p.add_argument("overrides", nargs="*", help="config overrides (key=value) for every run")
    for p, what in ((pf, "the engine's loop over --rows"), (en, "a stream of 2 x slots rows after the runs")):
        p.add_argument("--profile", help=f"also append torch.profiler tables to this file ({what})")
    pf.add_argument("--groups", type=int, nargs="+", default=[1, 4], help="rows prefilled together")
    pf.add_argument("--compile", action="store_true", help="then the prefill eager vs compiled (generation.compile_prefill)")
    for p in (en, jo):
        p.add_argument("--runs", nargs="+", type=_run, default=[("lvspec", "continuous")],
                       help="MODE/BATCHING pairs, e.g. lvspec/continuous lvspec/static ar/continuous")
        p.add_argument("--repeats", type=int, default=3)
    jo.add_argument("--shards", required=True)
    jo.add_argument("--work", default="/tmp/lvspec-bench-out")
    jo.add_argument("--timeout", type=float, default=300)
    jo.add_argument("--kill-peer-after", type=float, metavar="S",
                    help="SIGKILL one tensor-parallel peer rank S seconds after the first Parquet file")
    de.add_argument("--shards", required=True)
    de.add_argument("--frames", type=int, nargs="+", default=[16, 64])
    de.add_argument("--videos", type=int, default=8)
    rep = sub.add_parser("report", help="merge the sitting's JSONs into the acceptance figures (here)")
    rep.add_argument("--json", nargs="+", required=True)
    rep.add_argument("--out", default="bench/pipeline_gpu.json")
    rep.add_argument("--markdown")
    rep.add_argument("--tag", default="pipeline-gpu", help="the generated block of --markdown to rewrite")
    rep.add_argument("--title", default="The Ray job on a GPU (real size, random weights, replayed acceptance)",
                     help="its heading, the first time")
    args = ap.parse_args(argv)
    if args.command == "report":
        return report(args)
    from bench.report import run_info

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: every thread's stack, for a hang
    result = {**run_info("bench.pipeline_gpu", argv), "kind": args.command}
    {"engine": engine, "job": job, "decode": decode_rate, "prefill": prefill}[args.command](args, result)
    _write(args.json, result)
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
