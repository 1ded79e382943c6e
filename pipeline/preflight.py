"""Checks of a job that read storage but need no cluster, run before any Ray work
(`preflight`): the target's config.json against caption.tensor_parallel and generation.replay,
the source exists, the output takes writes. The checks that need no storage run when the config
loads (pipeline.config)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from pipeline import sources
from pipeline.config import ConfigError, JobConfig


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


def _target_config(job: JobConfig) -> dict | None:
    """The target's config.json (local dir or fsspec URI); None for a hub id (checked when loaded)."""
    model = job.model
    uri = model.target[len("file://"):] if model.target.startswith("file://") else model.target
    if "://" not in uri and not Path(uri).expanduser().is_dir():
        return None
    import fsspec

    remote = "://" in uri
    path = f"{uri.rstrip('/')}/config.json"
    try:
        with fsspec.open(path if remote else os.path.expanduser(path), "r",
                         **(model.storage_options if remote else {})) as f:
            return json.load(f)
    except Exception as e:
        raise ConfigError(f"config key 'model.target': cannot read {path}: {type(e).__name__}: {e}") from None


def check_replay_family(job: JobConfig) -> None:
    """generation.replay holds records of the target's family in this mode (reads the target's
    config.json: run by the job's preflight)."""
    from lvspec.replay import patterns

    gen = job.generation
    found = _target_config(job) if gen.replay is not None else None
    if found is None:
        return
    try:
        patterns(gen.replay, found.get("model_type"), gen.mode)
    except ValueError as e:
        raise ConfigError(f"config key 'generation.replay': {e}") from None


def check_tensor_parallel(job: JobConfig) -> None:
    """caption.tensor_parallel against the target's own config.json (local dir or fsspec URI; a
    hub id is checked when the replica loads it). Reads storage: run by the job's preflight."""
    from transformers import PretrainedConfig

    from lvspec.parallel import check_shardable

    tp = job.caption.tensor_parallel
    found = _target_config(job) if tp > 1 else None
    if found is None:
        return
    text = found.get("text_config", found)
    try:
        check_shardable(PretrainedConfig(**{k: text[k] for k in ("num_attention_heads", "num_key_value_heads",
                                                                  "intermediate_size") if k in text}),
                        tp, key="caption.tensor_parallel")
    except (ValueError, AttributeError) as e:
        raise ConfigError(f"config key 'caption.tensor_parallel': {e}") from None
