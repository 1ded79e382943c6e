"""The Ray job on a multi-GPU node (issue 18), from the JSONs of one sitting (bench/gpu_multi.sh runs
the measurements there: `bench.pipeline_gpu job` / `engine` with replica and tensor-parallel
overrides, `bench.tensor_parallel step` / `pairs`):

    python -m bench.pipeline_multi_gpu --json scale-1.json scale-4.json tp-engine.json tp-job.json \\
        tp-kill.json tp_step.json --out bench/pipeline_multi_gpu.json --markdown BENCHMARKS.md

Figures: `scaling_4_over_1` (job tokens/s with four one-GPU replicas over one, medians),
`tp_job_over_engine` (a tensor-parallel replica's tokens/s inside the job, the job's over its
replicas, over the same replica alone in one process: `bench.pipeline_gpu engine` with the same
overrides), `tp2_step_over_tp1` (the 32B ar step, from `bench.tensor_parallel step`) and
`peer_kill` (videos in, rows out, distinct video_ids out, of the job whose peer was SIGKILLed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.pipeline_gpu import stats

NEEDED = {"scaling_4_over_1": ">= 3.6", "tp_job_over_engine": ">= 0.9", "tp2_step_over_tp1": "<= 0.62"}


def _ok(run: dict) -> bool:
    return bool(run.get("steady")) and run.get("exit") == 0


def figures(parts: list[dict]) -> dict:
    jobs = [p for p in parts if p.get("kind") == "job"]
    scaling, res = {}, {}
    for p in jobs:
        if p.get("tensor_parallel", 1) == 1 and p.get("kill_peer_after_s") is None:
            runs = [r for r in p["runs"] if _ok(r)]
            if runs:
                got = scaling.setdefault(p["replicas"], {"rows": p["rows"], "decode_actors": p["decode_actors"],
                                                         "runs": []})
                got["runs"] += runs
    for n, got in sorted(scaling.items()):
        runs = got.pop("runs")
        got.update(tokens_per_s=stats([r["steady"]["tokens_per_s"] for r in runs]),
                   videos_per_s=stats([r["steady"]["rows_per_s"] for r in runs]),
                   gpu_busy_fraction=stats([r["gpu"].get("busy_fraction", 0.0) for r in runs]),
                   decode_headroom=stats([r["decode"]["headroom"] for r in runs]),
                   rows_written=[r["written"] for r in runs], distinct_video_ids=[r["distinct_ids"] for r in runs],
                   object_store=runs[-1].get("object_store"))
    res["scaling"] = {str(n): v for n, v in sorted(scaling.items())}
    if 1 in scaling:
        one = scaling[1]["tokens_per_s"]["median"]
        for n in scaling:
            if n > 1:
                res[f"scaling_{n}_over_1"] = scaling[n]["tokens_per_s"]["median"] / one
    engine = next((p for p in parts if p.get("kind") == "engine" and p.get("tensor_parallel", 1) > 1), None)
    tp_job = next((p for p in jobs if p.get("tensor_parallel", 1) > 1 and p.get("kill_peer_after_s") is None), None)
    if engine and tp_job:
        runs = [r for r in tp_job["runs"] if _ok(r)]
        e = stats([r["steady"]["tokens_per_s"] for r in engine["runs"]])
        j = stats([r["steady"]["tokens_per_s"] for r in runs])
        per_replica = j["median"] / tp_job["replicas"]
        res["tensor_parallel_job"] = {
            "target": tp_job["target"], "draft": tp_job["draft"], "tensor_parallel": tp_job["tensor_parallel"],
            "replicas": tp_job["replicas"], "rows": tp_job["rows"], "engine_tokens_per_s": e, "job_tokens_per_s": j,
            "job_tokens_per_s_per_replica": per_replica,
            "gpu_busy_fraction": stats([r["gpu"].get("busy_fraction", 0.0) for r in runs]),
            "rows_written": [r["written"] for r in runs], "distinct_video_ids": [r["distinct_ids"] for r in runs]}
        res["tp_job_over_engine"] = per_replica / e["median"]
    kill = next((p for p in jobs if p.get("kill_peer_after_s") is not None), None)
    if kill:
        run = kill["runs"][-1]
        res["peer_kill"] = {"videos": kill["rows"], "rows": run["written"], "unique_videos": run["distinct_ids"],
                            "ok_rows": run["ok"], "exit": run["exit"], "wall_s": run["wall_s"],
                            "killed": run.get("peer_killed"), "errors": run["errors"]}
    step = next((p for p in parts if "steps" in p), None)
    if step:
        res["tp_steps"] = step["steps"]
        if "tp2_step_over_tp1" in step:
            res["tp2_step_over_tp1"] = step["tp2_step_over_tp1"]
    pairs = next((p for p in parts if "pairs" in p), None)
    if pairs:
        res["pairs_in_one_call"] = [{k: v for k, v in pair.items() if k != "runs"} for pair in pairs["pairs"]]
    return res


def markdown(res: dict, parts: list[dict]) -> str:
    fmt = lambda s: (f"{s['median']:.1f} (median of {len(s['runs'])}, spread {s['spread']:.1%})"  # noqa: E731
                     if len(s["runs"]) > 1 else f"{s['median']:.1f} (one run)")
    meta = next((p for p in parts if p.get("machine")), {})
    lines = [f"Machine: {meta.get('machine')}  ", f"Date: {meta.get('date')}  ",
             "Commands: " + "; ".join(f"`{p['command']}`" for p in parts if p.get("command")) + "  ", ""]
    if res.get("scaling"):
        lines += ["Data-parallel replicas (one GPU each), LLaVA-OV 7B / 0.5B dummy weights, replayed acceptance, "
                  "16 frames, 192 rows a replica, through `ray job submit`; steady state = rows finishing between "
                  "the 10th and 90th percentile of finish times:", "",
                  "| replicas | rows | decode actors | job tok/s | videos/s | x one replica | GPU busy | decode headroom |",
                  "|---|---|---|---|---|---|---|---|"]
        one = res["scaling"].get("1", {}).get("tokens_per_s", {}).get("median")
        for n, s in res["scaling"].items():
            ratio = f"{s['tokens_per_s']['median'] / one:.2f}" if one else "-"
            lines.append(f"| {n} | {s['rows']} | {s['decode_actors']} | {fmt(s['tokens_per_s'])} | "
                         f"{s['videos_per_s']['median']:.2f} | {ratio} | {s['gpu_busy_fraction']['median']:.2f} | "
                         f"{s['decode_headroom']['median']:.2f} |")
    if res.get("tensor_parallel_job"):
        t = res["tensor_parallel_job"]
        lines += ["", f"Tensor-parallel replicas: {t['target']} / {t['draft']} at TP={t['tensor_parallel']}, "
                  f"{t['replicas']} replica(s): job {fmt(t['job_tokens_per_s'])} tok/s "
                  f"({t['job_tokens_per_s_per_replica']:.1f} a replica), one replica alone in one process "
                  f"{fmt(t['engine_tokens_per_s'])} tok/s; GPU busy {t['gpu_busy_fraction']['median']:.2f}."]
    if res.get("peer_kill"):
        k = res["peer_kill"]
        lines += ["", f"Peer killed (SIGKILL) mid-job: {k['videos']} videos in, {k['rows']} rows out, "
                  f"{k['unique_videos']} distinct video_ids, {k['ok_rows']} captioned, exit {k['exit']}, "
                  f"{k['wall_s']:.0f} s."]
    if res.get("tp_steps"):
        lines += ["", "| model | TP | all-reduce | batch | ms per ar step |", "|---|---|---|---|---|"]
        for s in res["tp_steps"]:
            lines.append(f"| {s['model']} | {s['tp']} | {s.get('all_reduce', '-')} | {s['batch_size']} | "
                         f"{s['ms_per_step']:.2f} (spread {s['spread']:.1%}) |")
    lines += ["", "| figure | value | needed |", "|---|---|---|"]
    for name in ("scaling_2_over_1", "scaling_4_over_1", "tp_job_over_engine", "tp2_step_over_tp1"):
        if name in res:
            lines.append(f"| {name} | {res[name]:.2f} | {NEEDED.get(name, '')} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    from bench.report import write_markdown_section

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", nargs="+", required=True)
    ap.add_argument("--out", default="bench/pipeline_multi_gpu.json")
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    parts = [json.loads(Path(p).read_text()) for p in args.json]
    res = figures(parts)
    meta = next((p for p in parts if p.get("machine")), {})
    Path(args.out).write_text(json.dumps({"machine": meta.get("machine"), "date": meta.get("date"),
                                          "commands": [p.get("command") for p in parts], **res, "parts": parts},
                                         indent=1) + "\n")
    text = markdown(res, parts)
    if args.markdown:
        write_markdown_section(Path(args.markdown), text, tag="pipeline-multi-gpu",
                               title="The Ray job on a multi-GPU node (replicas, tensor-parallel replicas)")
    print(text)
    return res


if __name__ == "__main__":
    main()
