"""The online audit: proof, per job, that loosened captions kept their meaning.

A deterministic sample of videos (`audit.fraction`, chosen by a hash of the video_id, so a re-run
or a resumed job audits the same videos) is captioned twice in the same replica: the job's lvspec
caption and an exact twin (the target's own greedy caption, which `sd` gives; lvspec decodes the
twin in a slot verified strictly, see lvspec.engine.EXACT). Each audited row carries
`audit_caption` and `audit_agreement`; the summary estimates the job's agreement with a
confidence interval, and `audit.min_agreement` turns a low estimate into a non-zero exit.

Agreement is a word-sequence similarity: difflib's Ratcliff/Obershelp ratio over the two
captions' whitespace-separated words, 2 x matched words / total words, 1.0 for identical captions
and 0.0 for captions sharing no word. It sees reworded fillers ("slid smoothly" for "drifted
slowly") as partial disagreement, the same way it sees a changed fact: a conservative lower bound
on meaning kept, comparable across jobs.
"""

from __future__ import annotations

import difflib
import hashlib

import numpy as np


def selected(video_id: str, fraction: float) -> bool:
    """Whether `video_id` is in the audited sample (the same answer on every run and node)."""
    if fraction <= 0.0:
        return False
    h = int.from_bytes(hashlib.sha256(video_id.encode()).digest()[:8], "big")
    return h < fraction * 2**64


def agreement(caption: str, exact: str) -> float:
    a, b = caption.split(), exact.split()
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def estimate(values: list[float], confidence: float = 0.95, resamples: int = 4000, seed: int = 0) -> dict:
    """Mean agreement with a percentile-bootstrap confidence interval (deterministic; none for
    fewer than two videos)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return {"videos": 0, "agreement": None, "low": None, "high": None, "identical": None}
    if x.size == 1:
        return {"videos": 1, "agreement": float(x[0]), "low": None, "high": None, "confidence": confidence,
                "identical": float(x[0] == 1.0)}
    means = np.random.default_rng(seed).choice(x, size=(resamples, x.size), replace=True).mean(1)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return {"videos": int(x.size), "agreement": float(x.mean()), "low": float(low), "high": float(high),
            "confidence": confidence, "identical": float((x == 1.0).mean())}


def interval(a: dict) -> str:
    """An estimate as text: '0.9512 (95% CI 0.9301-0.9688, 40 videos)'."""
    if a["low"] is None:
        return f"{a['agreement']:.4f} ({a['videos']} video: no interval)"
    return f"{a['agreement']:.4f} ({a['confidence']:.0%} CI {a['low']:.4f}-{a['high']:.4f}, {a['videos']} videos)"


def below(summary: dict, min_agreement: float | None) -> str | None:
    """Why a job's audit fails `min_agreement` (None: it passes, or no minimum is set)."""
    a = summary.get("audit") or {}
    if min_agreement is None or not a.get("videos"):
        return None
    if a["agreement"] < min_agreement:
        return f"audit agreement {interval(a)} is below audit.min_agreement {min_agreement}"
    return None
