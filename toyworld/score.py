"""Scorer: parse captions back into attributes and report accuracy per attribute and overall.

Tolerant by construction: an attribute is read as the one value of its vocabulary that the caption
names. Missing, contradictory (two different values) or garbled mentions read as None, which
scores as wrong. Nothing here raises on bad text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from toyworld.grammar import ANCHOR_VOCAB
from toyworld.scene import ATTRIBUTES

_WORD = re.compile(r"[a-z]+")


def parse_caption(text: str | None) -> dict[str, str | int | None]:
    """Attributes named by a caption; None for each attribute it misses or contradicts."""
    words = _WORD.findall(text.lower()) if isinstance(text, str) else []
    parsed: dict[str, str | int | None] = {}
    for attribute in ATTRIBUTES:
        vocab = ANCHOR_VOCAB[attribute]
        values = {vocab[w] for w in words if w in vocab}
        parsed[attribute] = values.pop() if len(values) == 1 else None
    return parsed


def score(captions: Iterable[str | None], truths: Iterable[Mapping]) -> dict:
    """Accuracy per attribute, overall (mean over attributes) and share of fully correct captions."""
    correct = {a: 0 for a in ATTRIBUTES}
    exact = n = 0
    for caption, truth in zip(captions, truths, strict=True):
        parsed = parse_caption(caption)
        hits = [parsed[a] == truth[a] for a in ATTRIBUTES]
        for a, hit in zip(ATTRIBUTES, hits):
            correct[a] += hit
        exact += all(hits)
        n += 1
    per = {a: correct[a] / n if n else 0.0 for a in ATTRIBUTES}
    return {
        "attr_acc": sum(per.values()) / len(per) if n else 0.0,
        "per_attribute": per,
        "exact": exact / n if n else 0.0,
        "videos": n,
    }


def attribute_agreement(caption: str | None, reference: str | None) -> float:
    """Share of the attributes `reference` states that `caption` states the same way (1.0 when the
    reference states none): on the toy world, facts kept regardless of wording."""
    a, b = parse_caption(caption), parse_caption(reference)
    stated = [k for k, v in b.items() if v is not None]
    return sum(a[k] == b[k] for k in stated) / len(stated) if stated else 1.0


def job_quality(table) -> dict:
    """A caption job's attribute accuracy against the toy ground truth its rows carry (the
    `--quality toyworld.score:job_quality` hook of jobs.caption and jobs.nightly)."""
    import json

    pairs = [(r["caption"], json.loads(r["truth"])["scene"]) for r in table.to_pylist()
             if r["truth"] and r["error"] is None and "scene" in json.loads(r["truth"])]
    if not pairs:
        return {}
    result = score([c for c, _ in pairs], [t for _, t in pairs])
    return {"attr_acc": result["attr_acc"], "attr_acc_per_attribute": result["per_attribute"],
            "scored_videos": result["videos"]}
