"""The job's one configuration schema (omegaconf structured dataclasses), validated before any Ray work.

    cfg = load_config("jobs/configs/local.yaml", ["generation.k=8", "source.limit=16"])

Unknown keys, wrong types and bad values fail here with a message naming the key. What needs storage
to check (the target's config.json, the source, the output) is pipeline.preflight's; what decode.clips
may say is pipeline.clips'. At ~400 lines: one section's fields, their comments and their checks are
read together here.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lvspec.config import MODES, RELEVANCE_KEYS, SpecConfig
from lvspec.loading import LOAD_FORMATS
from lvspec.replay import LENGTHS
from pipeline.clips import WHOLE, clip_spec

SOURCE_FORMATS = ("auto", "webdataset", "files", "manifest")
DTYPES = ("auto", "float32", "bfloat16", "float16")
BATCHING = ("continuous", "static")
# The containers users have (decord reads most, PyAV the rest: pipeline.frames); other files under a
# prefix are counted in the summary as not taken.
VIDEO_EXTENSIONS = ["mp4", "m4v", "mov", "mkv", "webm", "avi", "ts", "m2ts", "mts", "mpg", "mpeg", "3gp", "flv", "wmv",
                    "ogv", "gif"]


@dataclass
class SourceConfig:
    uri: str = MISSING  # s3://bucket/prefix, file:///dir, a local path, or a manifest (.parquet / .jsonl)
    format: str = "auto"  # auto: manifest by extension, webdataset if the prefix holds .tar files, else files
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options (endpoint_url, key, ...)
    video_extensions: list[str] = field(default_factory=lambda: list(VIDEO_EXTENSIONS))
    limit: int | None = None  # caption at most this many videos (smoke runs)
    num_cpus: float = 0.25  # per read task


@dataclass
class DecodeConfig:
    num_frames: int = 8  # frames sampled uniformly per video ...
    fps: float | None = None  # ... or at this rate (then at most max_frames)
    max_frames: int = 32
    max_side: int = 1024  # frames are scaled down while decoding, so huge videos stay small in memory
    max_bytes: int = 2 * 1024**3  # larger files fail as rows instead of filling memory
    # What one row captions: "whole" (the video), {window_s: 60, stride_s: 60, min_s: 0, allow_gaps: false}
    # (fixed windows, the last one shorter; a last one under min_s is dropped) or {scenes: content, threshold:
    # 27, min_s: 0.6, max_s: 120} (shots, PySceneDetect's content or adaptive detector; a shot longer than
    # max_s goes on as a new clip). Frames are sampled per clip.
    clips: Any = "whole"
    actors: Any = 1  # decode actors: N, or {min: N, max: M} for a pool that grows with the backlog
    num_cpus: float = 1.0
    batch_size: int = 8


@dataclass
class ModelConfig:
    target: str = MISSING  # HF id, local dir, or s3:// URI (synced to local disk once per node)
    draft: str | None = None  # needed for sd and lvspec
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    # auto: read the weights; dummy (benchmarks): random weights of config.json's shapes, built on the
    # replica's GPU (real-shape directories without weights: bench/models/); captions are noise
    load_format: str = "auto"
    prompt: str = "Describe the video."
    # Several instructions, one row each per clip ({short: "...", detailed: "..."}; the name is the rows'
    # prompt_name), from one decode of the video. None: `prompt`, named "default".
    prompts: dict[str, str] | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    cache_dir: str = "~/.cache/lvspec/models"


@dataclass
class GenerationConfig:
    mode: str = "lvspec"
    k: str = "auto"  # draft tokens per cycle: "auto" (each row its own, from one cost table and its acceptance) or N
    k_max: int = 10  # the longest draft "auto" may choose
    # k=auto's cost table in ms ({draft_step_ms, verify_0_ms, verify_1_ms, verify_max_ms}: the one a job's
    # summary records). None: each replica measures its own, so captions can differ between kinds of
    # GPU and between runs; pinned, a video gets the same caption on any replica, rank count or batch.
    k_costs: dict[str, float] | None = None
    theta: float | None = None  # None: the target's lvspec.json if it ships one, else lvspec's default
    alpha: float = 0.25
    top_k: int = 0
    shift_window: int = 1
    relevance_layers: list[int] | None = None  # None: from lvspec.json, else all layers
    relevance_heads: list[list[int]] | None = None  # [[layer, head], ...] instead of whole layers
    relevance_weights: list[float] | None = None  # one per relevance_heads pair (None: equal weights)
    max_new_tokens: int = 64
    # The draft watches every n-th frame (Qwen2.5-VL: frame pair) of each video: shorter draft
    # prompts, so cheaper draft steps at large batch and a cheaper draft prefill; the target sees
    # every frame (sd stays exact; lvspec's loose acceptance may keep other fillers).
    draft_frame_stride: int = 1
    cuda_graphs: bool = True  # on GPUs, capture the decoding stages as CUDA graphs (off: eager, for debugging)
    # Continuous batching: prefill new rows beside the other slots' decoding (a second CUDA stream).
    overlap_prefill: bool = True
    # Capture prompt forwards (groups of up to 4 rows, per input shapes) as CUDA graphs, so launching
    # them stops holding up decoding (LLaVA-OneVision). Off: 1.04x the engine on an H200, the job
    # no faster (BENCHMARKS, third sitting).
    prompt_graphs: bool = False
    # Compile the prefill's modules (vision encoders, prompt forwards; torch.compile): a faster
    # prefill; the first rows wait about a minute for it. Float rounding away from eager, so
    # operational (not in config_hash).
    compile_prefill: bool = False
    # Rows enter a replica's free slots in prefill groups of at most this many prompt tokens, so
    # that activation memory does not grow with the batch (what lets slots reach the KV limit).
    prefill_tokens: int = 32768
    # A verify runs the weights over each decoding row's own drafts only, packed; off: every slot at
    # the cycle's longest K (the same captions up to float rounding; operational).
    pack_verify: bool = True
    # Benchmarks only: keep the recorded number of drafts per cycle (lvspec.Replay) from this patterns
    # file (bench/replay_patterns.json), so that a dummy pair does a trained pair's work. Rows and the
    # summary say so. Rows end at replayed lengths (stop tokens off), drawn per video_id as
    # replay_lengths says: lognormal (median 150 tokens, sigma 0.6, [16, 512]) or recorded (the toy rows').
    replay: str | None = None
    replay_lengths: str = "lognormal"


@dataclass
class CaptionConfig:
    replicas: Any = 1  # GPU actors, each one target + draft: N, or {min: N, max: M} (autoscaling)
    num_gpus: float = 0.0  # per replica; 0 runs on CPU
    num_cpus: float = 1.0
    batch_size: int = 8  # rows per Ray Data call; a replica keeps two calls in flight
    # Rows a replica decodes at once (continuous batching): N; None: batch_size; auto: as many as the
    # GPU's memory holds after the weights (keys and values, a verify's transients; 10 % and one
    # prefill group kept free), at most the rows a replica holds (2 x batch_size, x 2 with audits).
    slots: Any = None
    tensor_parallel: int = 1  # processes (GPUs) one replica's target is sharded over; num_gpus is then N (or 0: CPU)
    batching: str = "continuous"  # continuous: a finished row's slot takes the next row; static: whole batches


@dataclass
class AuditConfig:
    """The online audit (pipeline/audit.py): a sample of videos also captioned exactly."""

    fraction: float = 0.02  # of videos (chosen by video_id hash); lvspec jobs only (ar and sd are exact)
    min_agreement: float | None = None  # exit non-zero when the job's estimated agreement falls below it


@dataclass
class OutputConfig:
    uri: str = MISSING  # rows go to <uri>/<job_id>/*.parquet, the summary to <uri>/<job_id>/_summary.json
    storage_options: dict[str, Any] = field(default_factory=dict)
    rows_per_file: int = 256  # rows are committed a file at a time: a crash redoes at most this many


@dataclass
class NightlyConfig:
    """What only `jobs.nightly` reads (see pipeline/nightly.py)."""

    dataset: str | None = None  # the dataset's name in the output store; None: the source URI's last path part
    run_date: str | None = None  # YYYY-MM-DD of this run's partition; None: today (UTC)
    max_failed_fraction: float = 0.05  # exit non-zero when more of this night's videos failed (alerting)
    retry_failed: bool = False  # caption again the videos whose earlier row carries an error
    heartbeat_s: float = 30.0  # a running night refreshes its lease this often
    stale_after_s: float = 600.0  # a lease older than this marks its night as crashed


@dataclass
class RayConfig:
    address: str | None = None  # None: join RAY_ADDRESS (ray job submit) or start a local cluster
    num_cpus: int | None = None  # for a local cluster


@dataclass
class JobConfig:
    job_id: str = MISSING
    source: SourceConfig = field(default_factory=SourceConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    nightly: NightlyConfig = field(default_factory=NightlyConfig)
    ray: RayConfig = field(default_factory=RayConfig)


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""


def load_config(path: str | Path | None, overrides: list[str] = ()) -> JobConfig:
    """Schema <- YAML file <- key=value overrides, then checked; returns a typed JobConfig."""
    try:
        cfg = OmegaConf.structured(JobConfig)
        if path is not None:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        OmegaConf.to_container(cfg, throw_on_missing=True)  # every required key set
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"config key {key!r}: {e.msg if hasattr(e, 'msg') else e}".splitlines()[0]
                          if key else f"config: {e}".splitlines()[0]) from None
    job: JobConfig = OmegaConf.to_object(cfg)
    check(job)
    # Data paths are the driver's; model paths stay relative (each worker resolves them in its
    # working dir, which `ray job submit --working-dir` ships to every node).
    job.source.uri, job.output.uri = local_path(job.source.uri), local_path(job.output.uri)
    return job


def _positive(value, key: str, allow_zero: bool = False) -> None:
    if value is None or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"config key {key!r} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def check(job: JobConfig) -> None:
    """Value checks the types alone cannot express."""
    if not job.job_id or "/" in job.job_id:
        raise ConfigError(f"config key 'job_id' must be a non-empty name without '/', got {job.job_id!r}")
    if job.source.format not in SOURCE_FORMATS:
        raise ConfigError(f"config key 'source.format' must be one of {SOURCE_FORMATS}, got {job.source.format!r}")
    if job.source.limit is not None:
        _positive(job.source.limit, "source.limit")
    extensions = job.source.video_extensions
    if not extensions or any(not re.fullmatch(r"\.?[A-Za-z0-9]+", str(e)) for e in extensions):
        raise ConfigError(f"config key 'source.video_extensions' must be a non-empty list of file extensions "
                          f"(mp4, ts, ...), got {list(extensions)!r}")
    if not (job.model.prompt or "").strip():
        raise ConfigError(f"config key 'model.prompt' must be a non-empty instruction, got {job.model.prompt!r}")
    _check_prompts(job.model.prompts)
    try:
        job.decode.clips = clip_spec(job.decode.clips)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key in ("num_frames", "max_frames", "max_side", "max_bytes", "batch_size", "num_cpus"):
        _positive(getattr(job.decode, key), f"decode.{key}")
    job.decode.actors = pool_size(job.decode.actors, "decode.actors")
    job.caption.replicas = pool_size(job.caption.replicas, "caption.replicas")
    if job.decode.fps is not None:
        _positive(job.decode.fps, "decode.fps")
    if job.model.dtype not in DTYPES:
        raise ConfigError(f"config key 'model.dtype' must be one of {DTYPES}, got {job.model.dtype!r}")
    if job.generation.mode not in MODES:
        raise ConfigError(f"config key 'generation.mode' must be one of {MODES}, got {job.generation.mode!r}")
    if job.model.load_format not in LOAD_FORMATS:
        raise ConfigError(f"config key 'model.load_format' must be one of {LOAD_FORMATS}, got {job.model.load_format!r}")
    if job.caption.batching not in BATCHING:
        raise ConfigError(f"config key 'caption.batching' must be one of {BATCHING}, got {job.caption.batching!r}")
    if job.generation.replay_lengths not in LENGTHS:
        raise ConfigError(f"config key 'generation.replay_lengths' must be one of {LENGTHS}, "
                          f"got {job.generation.replay_lengths!r}")
    if job.generation.replay is not None:
        _check_replay(job.generation.replay)
    if job.generation.mode != "ar" and not job.model.draft:
        raise ConfigError(f"config key 'model.draft' is required for generation.mode={job.generation.mode}")
    try:
        spec_config(job.generation)
    except ValueError as e:
        raise ConfigError(f"config key 'generation.{str(e).split()[0]}': {e}") from None
    _positive(job.caption.batch_size, "caption.batch_size")
    slots = job.caption.slots
    if slots is not None and slots != "auto" and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
        raise ConfigError(f"config key 'caption.slots' must be an integer >= 1, auto, or null (batch_size), "
                          f"got {slots!r}")
    n = job.nightly
    if n.dataset is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", n.dataset):
        raise ConfigError(f"config key 'nightly.dataset' must be a plain name (letters, digits, . _ -), got {n.dataset!r}")
    if n.run_date is not None:
        try:
            datetime.date.fromisoformat(n.run_date)
        except ValueError:
            raise ConfigError(f"config key 'nightly.run_date' must be YYYY-MM-DD, got {n.run_date!r}") from None
    if not 0.0 <= n.max_failed_fraction <= 1.0:
        raise ConfigError(f"config key 'nightly.max_failed_fraction' must be in [0, 1], got {n.max_failed_fraction!r}")
    _positive(n.heartbeat_s, "nightly.heartbeat_s")
    if n.stale_after_s <= n.heartbeat_s:
        raise ConfigError(f"config key 'nightly.stale_after_s' must exceed nightly.heartbeat_s ({n.heartbeat_s}), "
                          f"got {n.stale_after_s!r}")
    _positive(job.output.rows_per_file, "output.rows_per_file")
    if not 0.0 <= job.audit.fraction <= 1.0:
        raise ConfigError(f"config key 'audit.fraction' must be in [0, 1], got {job.audit.fraction!r}")
    if job.audit.min_agreement is not None and not 0.0 <= job.audit.min_agreement <= 1.0:
        raise ConfigError(f"config key 'audit.min_agreement' must be in [0, 1], got {job.audit.min_agreement!r}")
    _positive(job.caption.num_gpus, "caption.num_gpus", allow_zero=True)
    _positive(job.caption.num_cpus, "caption.num_cpus", allow_zero=True)
    tp = job.caption.tensor_parallel
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ConfigError(f"config key 'caption.tensor_parallel' must be an integer >= 1, got {tp!r}")
    if tp > 1:
        if job.caption.num_gpus not in (0, tp):
            raise ConfigError(f"config key 'caption.num_gpus' must be 0 (CPU) or caption.tensor_parallel ({tp}): one "
                              f"GPU per rank, got {job.caption.num_gpus!r}")
        # Whether N ranks split the target's heads needs its config.json: pipeline.preflight.


def prompts(model: ModelConfig) -> dict[str, str]:
    """The instructions a clip is captioned with, by prompt_name."""
    return {"default": model.prompt} if model.prompts is None else dict(model.prompts)


def _check_prompts(found) -> None:
    if found is None:
        return
    if not found:
        raise ConfigError("config key 'model.prompts' must name at least one instruction ({short: '...'}), or be null")
    for name, text in found.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", str(name)):
            raise ConfigError(f"config key 'model.prompts.{name}': a prompt's name must be a plain name "
                              f"(letters, digits, . _ -)")
        if not (text or "").strip():
            raise ConfigError(f"config key 'model.prompts.{name}' must be a non-empty instruction, got {text!r}")


def _check_replay(path: str) -> None:
    """A replay patterns file that can be read (whose family's records: pipeline.preflight)."""
    from lvspec.replay import families_of

    try:
        families_of(path)
    except ValueError as e:
        raise ConfigError(f"config key 'generation.replay': {e}") from None


def load_function(spec: str, key: str):
    """The function a MODULE:FUNCTION option names (a hook such as --quality or --measure)."""
    import importlib

    module, _, function = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module), function) if module and function else None
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key} {spec!r}: cannot import it ({type(e).__name__}: {e})") from None
    if not callable(found):
        raise ConfigError(f"{key} {spec!r}: not a MODULE:FUNCTION that can be called")
    return found


def pool_size(value, key: str) -> dict:
    """An actor pool's size as {min, max}: from N (fixed) or a {min, max} mapping (autoscaling)."""
    if isinstance(value, bool):
        raise ConfigError(f"config key {key!r} must be an integer or {{min: N, max: M}}, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"config key {key!r} must be >= 1, got {value!r}")
        value = {"min": value, "max": value}
    if not isinstance(value, dict) or set(value) != {"min", "max"}:
        raise ConfigError(f"config key {key!r} must be an integer or {{min: N, max: M}}, got {value!r}")
    lo, hi = value["min"], value["max"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)) or lo < 1:
        raise ConfigError(f"config key {key!r}: min and max must be integers >= 1, got {value!r}")
    if lo > hi:
        raise ConfigError(f"config key {key!r}: min ({lo}) must not exceed max ({hi})")
    return {"min": lo, "max": hi}


def replica_dtype(model: ModelConfig, on_gpu: bool) -> str:
    """The dtype a replica computes in: model.dtype, where auto is bfloat16 on GPUs, float32 on CPUs.
    The decode stage hands pixels over in it (the replica would cast them anyway: same values)."""
    if model.dtype != "auto":
        return model.dtype
    return "bfloat16" if on_gpu else "float32"


def spec_config(gen: GenerationConfig, shipped: dict | None = None) -> SpecConfig:
    """The lvspec SpecConfig of a generation section.

    theta and the relevance probe (layers, or heads and weights) come from the config where it sets it, else from the
    target's shipped `lvspec.json` settings (`shipped`), else lvspec's defaults.
    """
    shipped = shipped or {}
    relevance = {key: getattr(gen, key) for key in RELEVANCE_KEYS}
    if all(v is None for v in relevance.values()):
        relevance = {key: shipped.get(key) for key in relevance}
    theta = gen.theta if gen.theta is not None else shipped.get("theta", SpecConfig.theta)
    k = int(gen.k) if str(gen.k).strip().isdigit() else gen.k
    return SpecConfig(mode=gen.mode, k=k, k_max=gen.k_max, k_costs=gen.k_costs, theta=theta, alpha=gen.alpha,
                      top_k=gen.top_k, shift_window=gen.shift_window, max_new_tokens=gen.max_new_tokens,
                      cuda_graphs=gen.cuda_graphs, overlap_prefill=gen.overlap_prefill,
                      prompt_graphs=gen.prompt_graphs, compile_prefill=gen.compile_prefill,
                      prefill_tokens=gen.prefill_tokens, pack_verify=gen.pack_verify,
                      draft_frame_stride=gen.draft_frame_stride,
                      stop_token_ids=() if gen.replay is not None else None,  # replayed rows end at replayed lengths
                      **relevance)


def local_path(uri: str) -> str:
    """Absolute form of a local path or file:// URI; remote URIs unchanged."""
    if uri.startswith("file://"):
        return "file://" + os.path.abspath(os.path.expanduser(uri[len("file://"):]))
    if "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


# Keys that decide how fast or where a job runs, never what a caption says.
OPERATIONAL = {"decode": ("actors", "num_cpus", "batch_size"), "model": ("storage_options", "cache_dir"),
               "generation": ("cuda_graphs", "overlap_prefill", "prompt_graphs", "compile_prefill", "prefill_tokens",
                              "pack_verify")}


# Keys added after nightly series began, hashed only when set: at their default they change nothing,
# so a series started before them keeps its hash.
LATER = {"generation": {"k_costs": None, "draft_frame_stride": 1}, "decode": {"clips": WHOLE}, "model": {"prompts": None}}


def config_hash(job: JobConfig) -> str:
    """Hash of what decides the captions (not where they go or how fast), for the Parquet rows and
    the nightly series."""
    keep = {k: v for k, v in OmegaConf.to_container(OmegaConf.structured(job)).items()
            if k in ("decode", "model", "generation")}
    for section, keys in OPERATIONAL.items():
        keep[section] = {k: v for k, v in keep[section].items() if k not in keys}
    for section, defaults in LATER.items():
        keep[section] = {k: v for k, v in keep[section].items() if k not in defaults or v != defaults[k]}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]
