"""The Ray Data graph of a captioning job, its exactly-once bookkeeping, and its summary.

    source shards -> admit (skip done / duplicate ids) -> decode actors (a row per clip and prompt)
        -> (drop rows a killed run wrote) -> caption replicas -> Parquet

A row is one (video_id, clip_index, prompt_name); a video is the unit of work (decoded once for all
its clips and prompts), so a resumed run skips the videos written whole and decodes the others again,
keeping only their rows not yet written.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lvspec.stats import totals
from pipeline import sources
from pipeline.audit import estimate, interval
from pipeline.caption import CaptionStage
from pipeline.clips import figures
from pipeline.config import JobConfig, config_hash, prompts, replica_dtype
from pipeline.decode import DecodeStage
from pipeline.preflight import output_dir, preflight


def _parquet_files(fs, out: str) -> list[str]:
    fs.invalidate_cache(out)  # workers wrote there; this process's listing cache knows nothing of it
    return sorted(p for p in fs.find(out) if p.endswith(".parquet"))


@dataclass
class Written:
    """What an output already holds: the videos with every clip written for every prompt (`complete`),
    and of the others the (clip_index, prompt_name) rows written (`partial`)."""

    complete: np.ndarray = field(default_factory=lambda: np.array([], dtype=object))
    partial: dict[str, set[tuple[int, str]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.complete)


def written_of(table: pa.Table | None, names) -> Written:
    """`Written` of caption rows, for prompts `names`. A video is complete when, for each prompt, its
    clips 0..n are there and clip n is its last (`last_clip`). Rows from before clips (no clip_index,
    prompt_name, last_clip) are a whole video's only clip, prompted "default"."""
    if table is None or table.num_rows == 0:
        return Written()

    def column(name: str, default) -> list:
        values = table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows
        return [default if v is None else v for v in values]

    got: dict[str, set[tuple[int, str]]] = {}
    ends: dict[tuple[str, str], int] = {}
    for vid, clip, name, last in zip(column("video_id", None), column("clip_index", 0),
                                     column("prompt_name", "default"), column("last_clip", True)):
        got.setdefault(vid, set()).add((clip, name))
        if last:
            ends[vid, name] = max(clip, ends.get((vid, name), clip))
    complete, partial = [], {}
    for vid, rows in got.items():
        if all((vid, p) in ends and all((i, p) in rows for i in range(ends[vid, p] + 1)) for p in names):
            complete.append(vid)
        else:
            partial[vid] = rows
    return Written(np.array(sorted(complete), dtype=object), partial)


def written(cfg: JobConfig, log=print) -> Written:
    """What this job's output already holds (see `committed_rows`)."""
    fs, out = output_dir(cfg)
    columns = ["video_id", "clip_index", "prompt_name", "last_clip"]
    return written_of(committed_rows(fs, _parquet_files(fs, out), columns, log), prompts(cfg.model))


def committed_rows(fs, paths: list[str], columns: list[str] | None = None, log=print) -> pa.Table | None:
    """The rows of these Parquet files. Unreadable (partly written) files are removed: their rows
    were never committed, so this run redoes them."""
    tables = []
    for path in paths:
        try:
            with fs.open(path, "rb") as f:
                file = pq.ParquetFile(f)
                # Files from before a column existed lack it (clips' and prompts' keys): read what they have.
                names = file.schema_arrow.names
                tables.append(file.read(columns=None if columns is None else [c for c in columns if c in names]))
        except Exception as e:
            log(f"removing unreadable partial output {path} ({type(e).__name__}); its rows will be redone")
            fs.rm(path)
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def _admission_actor():
    import ray

    @ray.remote(num_cpus=0)
    class Admission:
        """One place that decides which video_ids this run captions: each id once, none already written
        whole; of a video written in part, only its rows not written."""

        def __init__(self, done: Written):
            self.claimed = {str(i): "(earlier run)" for i in done.complete.tolist()}
            self.partial = done.partial
            self.skipped_done = 0
            self.resumed: set[str] = set()
            self.duplicates: list[dict] = []

        def claim(self, ids: list[str], uris: list[str]) -> list[bool]:
            keep = []
            for vid, uri in zip(ids, uris):
                first = self.claimed.get(vid)
                if first is None:
                    self.claimed[vid] = uri
                elif first == "(earlier run)":
                    self.skipped_done += 1
                else:
                    self.duplicates.append({"video_id": vid, "skipped": uri, "kept": first})
                keep.append(first is None)
            return keep

        def unwritten(self, ids: list[str], clips: list[int], names: list[str]) -> list[bool]:
            keep = []
            for vid, clip, name in zip(ids, clips, names):
                written = (clip, name) in self.partial.get(vid, ())
                if vid in self.partial:
                    self.resumed.add(vid)
                keep.append(not written)
            return keep

        def report(self) -> dict:
            return {"skipped_already_written": self.skipped_done, "resumed_partly_written": len(self.resumed),
                    "duplicates_skipped": self.duplicates}

    return Admission


def _admit(batch: pa.Table, admission) -> pa.Table:
    import ray

    keep = ray.get(admission.claim.remote(batch.column("video_id").to_pylist(),
                                          batch.column("source_uri").to_pylist()))
    return batch.filter(pa.array(keep, pa.bool_()))


def _unwritten(batch: pa.Table, admission) -> pa.Table:
    import ray

    keep = ray.get(admission.unwritten.remote(*(batch.column(c).to_pylist()
                                                for c in ("video_id", "clip_index", "prompt_name"))))
    return batch.filter(pa.array(keep, pa.bool_()))


def _pool(size: dict, calls_per_actor: int = 1):
    """Ray Data's actor pool for a {min, max} size: fixed when they agree, autoscaling between them."""
    from ray.data import ActorPoolStrategy

    if calls_per_actor == 1:
        return ActorPoolStrategy(min_size=size["min"], max_size=size["max"])
    return ActorPoolStrategy(min_size=size["min"], max_size=size["max"], max_concurrent_calls_per_actor=calls_per_actor,
                             max_tasks_in_flight_per_actor=calls_per_actor, enable_true_multi_threading=True)


def build(cfg: JobConfig, admission, source: sources.Source, resuming: bool = False):
    """The whole graph, source to captions (a lazy Ray Dataset); `resuming`: some videos are written
    in part, so their decoded rows pass the admission once more."""

    ds = source.dataset.map_batches(_admit, fn_kwargs={"admission": admission}, batch_format="pyarrow", num_cpus=0.1)
    ds = ds.map_batches(
        DecodeStage, batch_format="pyarrow", batch_size=cfg.decode.batch_size,
        compute=_pool(cfg.decode.actors), num_cpus=cfg.decode.num_cpus,
        fn_constructor_kwargs=dict(decode=cfg.decode, model=cfg.model, source_storage_options=cfg.source.storage_options,
                                   pixel_dtype=replica_dtype(cfg.model, cfg.caption.num_gpus > 0)))
    if resuming:
        ds = ds.map_batches(_unwritten, fn_kwargs={"admission": admission}, batch_format="pyarrow", num_cpus=0.1)
    return ds.map_batches(
        CaptionStage, batch_format="pyarrow", batch_size=cfg.caption.batch_size,
        # Two calls in flight per replica, on threads: while one batch's last rows decode, the next
        # batch's rows already wait in the replica's feed for the slots they free.
        compute=_pool(cfg.caption.replicas, calls_per_actor=2), num_gpus=cfg.caption.num_gpus,
        num_cpus=cfg.caption.num_cpus,
        fn_constructor_kwargs=dict(model=cfg.model, generation=cfg.generation, caption=cfg.caption, job_id=cfg.job_id,
                                   config_hash=config_hash(cfg), audit_fraction=cfg.audit.fraction))


def start_ray(cfg: JobConfig) -> None:
    import os

    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False)


def run(cfg: JobConfig, log=None, quality=None, out: str | None = None, done: Written | None = None) -> dict:
    """Caption what is missing from the job's output; returns the run summary (also written as JSON).

    `quality(table)`, if given, adds its dict to the summary (e.g. accuracy against known truth).
    `out` (a path on the output filesystem) and `done` (what not to caption again: `Written`) default
    to the job's own directory `<output.uri>/<job_id>` and what it already holds; `jobs.nightly` passes
    its run partition and what its series holds.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    preflight(cfg, out)
    start_ray(cfg)
    fs, default = output_dir(cfg)
    out = out or default
    done = written(cfg, log) if done is None else done
    before = set(_parquet_files(fs, out))
    admission = _admission_actor().remote(done)
    t0 = time.perf_counter()
    source = sources.read(cfg.source, cfg.decode.max_bytes)
    if source.not_taken["count"]:
        log(f"source: {not_taken_line(source.not_taken)}")
    build(cfg, admission, source, resuming=bool(done.partial)).write_parquet(
        out, filesystem=sources.arrow_filesystem(fs), min_rows_per_file=cfg.output.rows_per_file,
        max_rows_per_file=cfg.output.rows_per_file, ray_remote_args={"num_cpus": 0.1})
    wall = time.perf_counter() - t0
    new = [p for p in _parquet_files(fs, out) if p not in before]
    import ray

    table = committed_rows(fs, new, log=log)
    summary = summarize(table, wall) | ray.get(admission.report.remote()) | {"not_taken": source.not_taken}
    if quality is not None and table is not None:
        summary |= quality(table)
    summary.update(job_id=cfg.job_id, output=fs.unstrip_protocol(out), files_written=len(new),
                   clips_setting=cfg.decode.clips, config_hash=config_hash(cfg), load_format=cfg.model.load_format,
                   acceptance_replayed=(f"{cfg.generation.replay} ({cfg.generation.replay_lengths} lengths)"
                                        if cfg.generation.replay else None))
    with fs.open(f"{out}/_summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def summarize(table: pa.Table | None, wall_s: float) -> dict:
    """Machine-readable summary of the rows one run wrote."""
    if table is None or table.num_rows == 0:
        return {"videos": 0, "rows": 0, "ok": 0, "failed": 0, "failed_videos": 0, "wall_s": round(wall_s, 2)}
    rows = table.to_pylist()
    ok = [r for r in rows if r["error"] is None]
    failed = [r for r in rows if r["error"] is not None]
    counted = totals(ok)
    tokens = counted["num_tokens"]
    frames = sum(r.get("decoded_frames", r.get("num_frames")) or 0 for r in rows)  # rows from before clips: num_frames
    decode_s = sum(r["decode_ms"] for r in rows) / 1e3
    generate_s = sum(r["generate_ms"] or 0.0 for r in ok) / 1e3
    errors: dict[str, int] = {}
    for r in failed:
        kind = r["error"].split(":", 1)[0]
        errors[kind] = errors.get(kind, 0) + 1
    return {
        **figures(rows), "rows": len(rows), "ok": len(ok), "failed": len(failed),
        "failed_videos": len({r["video_id"] for r in failed}), "errors_by_stage": errors,
        "failures": [{"video_id": r["video_id"], "clip_index": r.get("clip_index"),
                      "prompt_name": r.get("prompt_name"), "error": r["error"]} for r in failed[:50]],
        "wall_s": round(wall_s, 2), "videos_per_s": len(rows) / wall_s,
        "decode": {"frames": frames, "busy_s": round(decode_s, 3), "frames_per_s_per_core": frames / max(decode_s, 1e-9)},
        "caption": {"tokens": tokens, "busy_s": round(generate_s, 3), "tokens_per_s_wall": tokens / wall_s,
                    "tokens_per_s_engine": tokens / max(generate_s, 1e-9),
                    "mean_accepted_length": counted["tau"], "mean_draft_length": counted["mean_draft_length"],
                    "shares": counted["shares"]},
        "mode": rows[0]["mode"],
        "decoded_with_pyav": len({r["video_id"] for r in rows if r.get("decoder") == "pyav"}),
        "slots": sorted({r["slots"] for r in ok if r.get("slots")}),
        # k=auto's cost tables (one per kind of replica): pinned with generation.k_costs, they give the same captions
        "k_costs": [json.loads(t) for t in sorted({r["k_costs"] for r in ok if r.get("k_costs")})],
        "audit": estimate([r["audit_agreement"] for r in ok if r.get("audit_agreement") is not None]),
    }


def not_taken_line(n: dict) -> str:
    kinds = ", ".join(f".{ext} {count}" if ext != "(none)" else f"no extension {count}"
                      for ext, count in n["by_extension"].items())
    return (f"{n['count']} files under the prefix are not taken as videos ({kinds}), e.g. {', '.join(n['examples'])}; "
            "add an extension to source.video_extensions to take it")


def human_summary(s: dict) -> str:
    lines = [f"job {s.get('job_id')}: {s['videos']} videos captioned this run ({s['ok']} ok, {s['failed']} failed) "
             f"in {s['wall_s']:.1f}s"]
    if s["videos"] and s["rows"] != s["videos"]:  # clips or several prompts: a row per (video, clip, prompt)
        lines[0] = (f"job {s.get('job_id')}: {s['rows']} rows this run ({s['ok']} ok, {s['failed']} failed) from "
                    f"{s['videos']} videos in {s['wall_s']:.1f}s")
    if s["videos"]:
        lines.append(f"  clips  : {s['clips']} clips captioned ({s['clips_per_video']:.1f} a video, "
                     f"{s['video_hours']:.2f} hours of video), prompts {', '.join(s['prompts'])}")
    if s.get("load_format") == "dummy" or s.get("acceptance_replayed"):
        lines.append("  BENCHMARK: " + "; ".join(
            (["random weights (model.load_format=dummy): captions are noise"] if s.get("load_format") == "dummy" else [])
            + ([f"acceptance replayed from {s['acceptance_replayed']}"] if s.get("acceptance_replayed") else [])))
    if s["videos"]:
        c, d = s["caption"], s["decode"]
        sh = c["shares"]
        lines += [
            f"  decode : {d['frames']} frames, {d['frames_per_s_per_core']:.0f} frames/s per core",
            f"  caption: {c['tokens']} tokens, {c['tokens_per_s_wall']:.1f} tokens/s end to end "
            f"({c['tokens_per_s_engine']:.1f} in the engine), mode {s['mode']}, mean accepted length "
            f"{c['mean_accepted_length']:.2f} of {c['mean_draft_length']:.1f} drafted",
            f"  tokens : {sh['accepted_exact']:.0%} exact, {sh['accepted_loose']:.0%} loose, "
            f"{sh['accepted_shift']:.0%} shift, {sh['corrections']:.0%} corrections, {sh['bonus']:.0%} bonus",
        ]
    for table in s.get("k_costs") or []:
        pin = ", ".join(f"{k}: {v:g}" for k, v in table.items())
        lines.append(f"  k=auto : cost table in ms {{{pin}}}; pin it for the same captions on any replica: "
                     f"'generation.k_costs={{{pin}}}'")
    if s.get("errors_by_stage"):
        lines.append("  failed : " + ", ".join(f"{k} {v}" for k, v in s["errors_by_stage"].items())
                     + "".join(f"\n           {f['video_id']}: {f['error']}" for f in s["failures"][:5]))
    if (s.get("not_taken") or {}).get("count"):
        lines.append(f"  source : {not_taken_line(s['not_taken'])}")
    if s.get("decoded_with_pyav") and (s.get("clips_setting") or {}).get("kind", "whole") == "whole":
        # (clips of windows and shots always stream through PyAV: no fallback to count)
        lines.append(f"  decode : {s['decoded_with_pyav']} videos decord cannot read were decoded with PyAV")
    if s.get("skipped_already_written"):
        lines.append(f"  resumed: {s['skipped_already_written']} videos already in the output were skipped")
    if s.get("resumed_partly_written"):
        lines.append(f"  resumed: {s['resumed_partly_written']} videos written in part were decoded again; only "
                     "their clips not yet written were captioned")
    if s.get("duplicates_skipped"):
        lines.append(f"  {len(s['duplicates_skipped'])} duplicate video_ids skipped (first copy kept), e.g. "
                     f"{s['duplicates_skipped'][0]['video_id']}")
    a = s.get("audit") or {}
    if a.get("videos"):
        lines.append(f"  audit  : agreement with exact captions {interval(a)}, {a['identical']:.0%} identical")
    if "attr_acc" in s:
        lines.append(f"  quality: attribute accuracy {s['attr_acc']:.3f} against the toy ground truth")
    lines.append(f"  output : {s['output']} ({s['files_written']} Parquet files; summary in _summary.json)")
    return "\n".join(lines)
