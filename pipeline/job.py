"""The Ray Data graph of a captioning job, its exactly-once bookkeeping, and its summary.

    source shards -> admit (skip done / duplicate ids) -> decode actors -> caption replicas -> Parquet
"""

from __future__ import annotations

import json
import sys
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lvspec.stats import totals
from pipeline import sources
from pipeline.audit import estimate, interval
from pipeline.caption import CaptionStage
from pipeline.config import (ConfigError, JobConfig, check_replay_family, check_tensor_parallel, config_hash,
                             replica_dtype)
from pipeline.decode import DecodeStage


def output_dir(cfg: JobConfig):
    fs, root = sources.filesystem(cfg.output.uri, cfg.output.storage_options)
    return fs, f"{root.rstrip('/')}/{cfg.job_id}"


def preflight(cfg: JobConfig, out: str | None = None) -> None:
    """Checks that need storage but no cluster: the target splits over caption.tensor_parallel
    ranks, a replay file holds its family, the source exists, the output takes writes."""
    check_tensor_parallel(cfg)
    check_replay_family(cfg)
    fs, root = sources.filesystem(cfg.source.uri, cfg.source.storage_options)
    try:
        exists = fs.exists(root)
    except Exception as e:
        raise ConfigError(f"config key 'source.uri': cannot read {cfg.source.uri!r}: {e}") from None
    if not exists:
        raise ConfigError(f"config key 'source.uri': {cfg.source.uri!r} does not exist")
    fs, default = output_dir(cfg)
    out = out or default
    probe = f"{out}/_write_probe_{uuid.uuid4().hex}"
    try:
        fs.makedirs(out, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as e:
        raise ConfigError(f"config key 'output.uri': cannot write under {cfg.output.uri!r}: "
                          f"{type(e).__name__}: {e}") from None


def _parquet_files(fs, out: str) -> list[str]:
    fs.invalidate_cache(out)  # workers wrote there; this process's listing cache knows nothing of it
    return sorted(p for p in fs.find(out) if p.endswith(".parquet"))


def written_ids(cfg: JobConfig, log=print) -> np.ndarray:
    """video_ids already in this job's output (see `committed_rows`)."""
    fs, out = output_dir(cfg)
    table = committed_rows(fs, _parquet_files(fs, out), ["video_id"], log)
    return np.unique(table.column("video_id").to_numpy(zero_copy_only=False)) if table is not None \
        else np.array([], dtype=object)


def committed_rows(fs, paths: list[str], columns: list[str] | None = None, log=print) -> pa.Table | None:
    """The rows of these Parquet files. Unreadable (partly written) files are removed: their rows
    were never committed, so this run redoes them."""
    tables = []
    for path in paths:
        try:
            with fs.open(path, "rb") as f:
                tables.append(pq.read_table(f, columns=columns))
        except Exception as e:
            log(f"removing unreadable partial output {path} ({type(e).__name__}); its rows will be redone")
            fs.rm(path)
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def _admission_actor():
    import ray

    @ray.remote(num_cpus=0)
    class Admission:
        """One place that decides which video_ids this run captions: each id once, none already written."""

        def __init__(self, done: np.ndarray):
            self.claimed = {str(i): "(earlier run)" for i in done.tolist()}
            self.skipped_done = 0
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

        def report(self) -> dict:
            return {"skipped_already_written": self.skipped_done, "duplicates_skipped": self.duplicates}

    return Admission


def _admit(batch: pa.Table, admission) -> pa.Table:
    import ray

    keep = ray.get(admission.claim.remote(batch.column("video_id").to_pylist(),
                                          batch.column("source_uri").to_pylist()))
    return batch.filter(pa.array(keep, pa.bool_()))


def _pool(size: dict, calls_per_actor: int = 1):
    """Ray Data's actor pool for a {min, max} size: fixed when they agree, autoscaling between them."""
    from ray.data import ActorPoolStrategy

    if calls_per_actor == 1:
        return ActorPoolStrategy(min_size=size["min"], max_size=size["max"])
    return ActorPoolStrategy(min_size=size["min"], max_size=size["max"], max_concurrent_calls_per_actor=calls_per_actor,
                             max_tasks_in_flight_per_actor=calls_per_actor, enable_true_multi_threading=True)


def build(cfg: JobConfig, admission, source: sources.Source):
    """The whole graph, source to captions (a lazy Ray Dataset)."""

    ds = source.dataset.map_batches(_admit, fn_kwargs={"admission": admission}, batch_format="pyarrow", num_cpus=0.1)
    ds = ds.map_batches(
        DecodeStage, batch_format="pyarrow", batch_size=cfg.decode.batch_size,
        compute=_pool(cfg.decode.actors), num_cpus=cfg.decode.num_cpus,
        fn_constructor_kwargs=dict(decode=cfg.decode, model=cfg.model, source_storage_options=cfg.source.storage_options,
                                   pixel_dtype=replica_dtype(cfg.model, cfg.caption.num_gpus > 0)))
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


def run(cfg: JobConfig, log=None, quality=None, out: str | None = None, done: np.ndarray | None = None) -> dict:
    """Caption what is missing from the job's output; returns the run summary (also written as JSON).

    `quality(table)`, if given, adds its dict to the summary (e.g. accuracy against known truth).
    `out` (a path on the output filesystem) and `done` (video_ids to skip) default to the job's own
    directory `<output.uri>/<job_id>` and what it already holds; `jobs.nightly` passes its run
    partition and what its series holds.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    preflight(cfg, out)
    start_ray(cfg)
    fs, default = output_dir(cfg)
    out = out or default
    done = written_ids(cfg, log) if done is None else done
    before = set(_parquet_files(fs, out))
    admission = _admission_actor().remote(done)
    t0 = time.perf_counter()
    source = sources.read(cfg.source, cfg.decode.max_bytes)
    if source.not_taken["count"]:
        log(f"source: {not_taken_line(source.not_taken)}")
    build(cfg, admission, source).write_parquet(out, filesystem=sources.arrow_filesystem(fs),
                                        min_rows_per_file=cfg.output.rows_per_file,
                                        max_rows_per_file=cfg.output.rows_per_file,
                                        ray_remote_args={"num_cpus": 0.1})
    wall = time.perf_counter() - t0
    new = [p for p in _parquet_files(fs, out) if p not in before]
    import ray

    table = committed_rows(fs, new, log=log)
    summary = summarize(table, wall) | ray.get(admission.report.remote()) | {"not_taken": source.not_taken}
    if quality is not None and table is not None:
        summary |= quality(table)
    summary.update(job_id=cfg.job_id, output=fs.unstrip_protocol(out), files_written=len(new),
                   config_hash=config_hash(cfg), load_format=cfg.model.load_format,
                   acceptance_replayed=(f"{cfg.generation.replay} ({cfg.generation.replay_lengths} lengths)"
                                        if cfg.generation.replay else None))
    with fs.open(f"{out}/_summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def summarize(table: pa.Table | None, wall_s: float) -> dict:
    """Machine-readable summary of the rows one run wrote."""
    if table is None or table.num_rows == 0:
        return {"videos": 0, "ok": 0, "failed": 0, "wall_s": round(wall_s, 2)}
    rows = table.to_pylist()
    ok = [r for r in rows if r["error"] is None]
    failed = [r for r in rows if r["error"] is not None]
    counted = totals(ok)
    tokens = counted["num_tokens"]
    frames = sum(r["num_frames"] or 0 for r in rows)
    decode_s = sum(r["decode_ms"] for r in rows) / 1e3
    generate_s = sum(r["generate_ms"] or 0.0 for r in ok) / 1e3
    errors: dict[str, int] = {}
    for r in failed:
        kind = r["error"].split(":", 1)[0]
        errors[kind] = errors.get(kind, 0) + 1
    return {
        "videos": len(rows), "ok": len(ok), "failed": len(failed), "errors_by_stage": errors,
        "failures": [{"video_id": r["video_id"], "error": r["error"]} for r in failed[:50]],
        "wall_s": round(wall_s, 2), "videos_per_s": len(rows) / wall_s,
        "decode": {"frames": frames, "busy_s": round(decode_s, 3), "frames_per_s_per_core": frames / max(decode_s, 1e-9)},
        "caption": {"tokens": tokens, "busy_s": round(generate_s, 3), "tokens_per_s_wall": tokens / wall_s,
                    "tokens_per_s_engine": tokens / max(generate_s, 1e-9),
                    "mean_accepted_length": counted["tau"], "mean_draft_length": counted["mean_draft_length"],
                    "shares": counted["shares"]},
        "mode": rows[0]["mode"],
        "decoded_with_pyav": sum(r.get("decoder") == "pyav" for r in rows),
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
    if s.get("decoded_with_pyav"):
        lines.append(f"  decode : {s['decoded_with_pyav']} videos decord cannot read were decoded with PyAV")
    if s.get("skipped_already_written"):
        lines.append(f"  resumed: {s['skipped_already_written']} videos already in the output were skipped")
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
