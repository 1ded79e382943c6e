"""Pick theta (and the relevance probe) for a fidelity a user chooses, on the job's own videos.

A sample of the job's source is decoded as the job decodes it, captioned once exactly (`sd`: the
target's greedy captions) and once per grid point in `lvspec`. Each point reports its tau (tokens
per target forward: the speed that loosening buys, independent of the machine) and its agreement
with the exact captions (pipeline/audit.py: the measure the job's online audit reports). The
chosen setting is the grid point with the highest tau among those whose mean agreement reaches
the target; theta = 0 (every slot an anchor: exact) is always in the grid, so a target can
always be met.

Relevance probes tried: the one the config (or the target's lvspec.json) names, and every layer
averaged. The toy calibration's head search needs anchor labels (toyworld/calibrate.py); a
user's videos have none, so here the probe is chosen by the same tau-at-agreement rule.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pyarrow as pa

from lvspec.config import RELEVANCE_KEYS, SETTINGS_FILE, SpecConfig
from lvspec.stats import totals
from pipeline.audit import agreement, estimate
from pipeline.config import JobConfig

THETAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)


def sample(cfg: JobConfig, videos: int, log=print) -> list[dict]:
    """The first `videos` decodable videos of the job's source, as the caption stage receives them."""
    from pipeline import sources
    from pipeline.decode import DecodeStage, unpack, values
    from pipeline.job import start_ray

    start_ray(cfg)
    rows = sources.read(cfg.source, cfg.decode.max_bytes).dataset.limit(videos * 2).take(videos * 2)
    stage = DecodeStage(cfg.decode, cfg.model, cfg.source.storage_options)
    table = pa.concat_tables(stage(pa.Table.from_pylist(rows)))
    decoded = [{**r, "inputs": v} for r, v in zip(table.drop_columns(["inputs"]).to_pylist(),
                                                   values(table.column("inputs")))]
    good = [r for r in decoded if r["error"] is None][:videos]
    log(f"calibrate: {len(good)} videos decoded ({len(decoded) - len(good)} skipped or failed)")
    return [{"video_id": r["video_id"], "inputs": unpack(r["inputs"])} for r in good]


def _caption(engine, rows: list[dict], tokenizer) -> tuple[list[str], float]:
    out = engine.generate([r["inputs"] for r in rows], tokenizer=tokenizer)
    return [o.text for o in out], totals(o.stats.as_dict() for o in out)["tau"]


def grid(engine_for, base: SpecConfig, rows: list[dict], tokenizer, thetas=THETAS, measure=agreement,
         log=print) -> dict:
    """Caption `rows` exactly, then at every (probe, theta); `engine_for(spec)` builds an Engine and
    `measure(caption, exact)` scores agreement (default: the audit's word-sequence similarity)."""
    exact, sd_tau = _caption(engine_for(dataclasses.replace(base, mode="sd")), rows, tokenizer)
    probes = {"configured": {key: getattr(base, key) for key in RELEVANCE_KEYS}}
    if any(v is not None for v in probes["configured"].values()):
        probes["all_layers"] = dict.fromkeys(RELEVANCE_KEYS)
    points = []
    for probe, relevance in probes.items():
        for theta in thetas:
            t0 = time.perf_counter()
            spec = dataclasses.replace(base, mode="lvspec", theta=theta, **relevance)
            captions, tau = _caption(engine_for(spec), rows, tokenizer)
            est = estimate([measure(c, e) for c, e in zip(captions, exact)])
            points.append({"probe": probe, "theta": theta, **{k: _plain(v) for k, v in relevance.items()},
                           "tau": tau, "agreement": est["agreement"], "low": est["low"], "high": est["high"],
                           "identical": est["identical"]})
            log(f"calibrate: {probe:10s} theta {theta:4.2f}: tau {tau:5.2f} ({tau / sd_tau:4.2f}x sd), agreement "
                f"{est['agreement']:.4f} [{est['low']:.4f}, {est['high']:.4f}], {est['identical']:.0%} identical "
                f"({time.perf_counter() - t0:.1f} s)")
    return {"videos": len(rows), "sd_tau": sd_tau, "points": points}


def choose(points: list[dict], target_agreement: float) -> dict | None:
    """The fastest (highest tau) point whose mean agreement reaches the target; ties: lower theta."""
    ok = [p for p in points if p["agreement"] >= target_agreement]
    return max(ok, key=lambda p: (p["tau"], -p["theta"])) if ok else None


def settings_of(point: dict) -> dict:
    """The SpecConfig fields a grid point stands for: its theta and relevance probe."""
    return {"theta": point["theta"], **{key: point[key] for key in RELEVANCE_KEYS}}


def write_settings(target_dir: str | Path, chosen: dict, target_agreement: float, videos: int) -> Path:
    """Put the chosen theta and probe into the target's lvspec.json, keeping its other keys."""
    path = Path(target_dir) / SETTINGS_FILE
    settings = json.loads(path.read_text()) if path.exists() else {}
    settings.update(settings_of(chosen))
    settings["agreement_calibration"] = {"target_agreement": target_agreement, "videos": videos,
                                         "agreement": chosen["agreement"], "tau": chosen["tau"],
                                         "probe": chosen["probe"]}
    path.write_text(json.dumps(settings, indent=1) + "\n")
    return path


def _plain(value):
    return [list(v) if isinstance(v, tuple) else v for v in value] if value is not None else None
