"""Scorer: parse captions back into attributes and report accuracy per attribute and overall.

Tolerant by construction: an attribute is read as the one value of its vocabulary that the caption
names. Missing, contradictory (two different values) or garbled mentions read as None, which
scores as wrong. Nothing here raises on bad text.

Edition 2 (truths with an `order` key): colour and direction are the sets named ("blue+red"), and
`order` is the change the caption states, in the order it states it ("red>blue",
"leftward>upward"), or "none". A caption that swaps two events keeps colour and direction right
and gets `order` wrong.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from toyworld.grammar import ANCHOR_VOCAB
from toyworld.scene import ATTRIBUTES, ATTRIBUTES_V2

_WORD = re.compile(r"[a-z]+")


def parse_caption(text: str | None, edition: int = 1) -> dict[str, str | int | None]:
    """Attributes named by a caption; None for each attribute it misses or contradicts."""
    words = _WORD.findall(text.lower()) if isinstance(text, str) else []
    parsed: dict[str, str | int | None] = {}
    for attribute in ATTRIBUTES:
        vocab = ANCHOR_VOCAB[attribute]
        values = {vocab[w] for w in words if w in vocab}
        parsed[attribute] = values.pop() if len(values) == 1 else None
    if edition == 2:
        said = {a: list(dict.fromkeys(ANCHOR_VOCAB[a][w] for w in words if w in ANCHOR_VOCAB[a]))
                for a in ("colour", "direction")}  # distinct values, in the order first named
        for a, values in said.items():
            parsed[a] = "+".join(sorted(values)) if 1 <= len(values) <= 2 else None
        changes = [values for values in said.values() if len(values) == 2]
        if any(len(values) > 2 for values in said.values()) or len(changes) > 1 or not all(said.values()):
            parsed["order"] = None
        else:
            parsed["order"] = ">".join(changes[0]) if changes else "none"
    return parsed


def score(captions: Iterable[str | None], truths: Iterable[Mapping]) -> dict:
    """Accuracy per attribute, overall (mean over attributes) and share of fully correct captions.
    Truths with an `order` key (edition 2 scenes) are scored on edition 2's attributes."""
    captions, truths = list(captions), list(truths)
    edition = 2 if truths and "order" in truths[0] else 1
    attributes = ATTRIBUTES_V2 if edition == 2 else ATTRIBUTES
    correct = {a: 0 for a in attributes}
    exact = n = 0
    for caption, truth in zip(captions, truths, strict=True):
        parsed = parse_caption(caption, edition)
        hits = [parsed[a] == truth[a] for a in attributes]
        for a, hit in zip(attributes, hits):
            correct[a] += hit
        exact += all(hits)
        n += 1
    per = {a: correct[a] / n if n else 0.0 for a in attributes}
    return {
        "attr_acc": sum(per.values()) / len(per) if n else 0.0,
        "per_attribute": per,
        "exact": exact / n if n else 0.0,
        "videos": n,
    }


def attribute_agreement(caption: str | None, reference: str | None, edition: int = 1) -> float:
    """Share of the attributes `reference` states that `caption` states the same way (1.0 when the
    reference states none): on the toy world, facts kept regardless of wording."""
    a, b = parse_caption(caption, edition), parse_caption(reference, edition)
    stated = [k for k, v in b.items() if v is not None]
    return sum(a[k] == b[k] for k in stated) / len(stated) if stated else 1.0


def attribute_agreement_v2(caption: str | None, reference: str | None) -> float:
    """`attribute_agreement` on edition 2's attributes (event order included): the
    `--measure toyworld.score:attribute_agreement_v2` of jobs.calibrate on toy world v2."""
    return attribute_agreement(caption, reference, edition=2)


def job_quality(table) -> dict:
    """A caption job's attribute accuracy against the toy ground truth its rows carry (the
    `--quality toyworld.score:job_quality` hook of jobs.caption and jobs.nightly)."""
    import json

    from toyworld.scene import Scene

    pairs = [(r["caption"], Scene.from_json(json.loads(r["truth"])["scene"]).attributes()) for r in table.to_pylist()
             if r["truth"] and r["error"] is None and "scene" in json.loads(r["truth"])]
    if not pairs:
        return {}
    result = score([c for c, _ in pairs], [t for _, t in pairs])
    return {"attr_acc": result["attr_acc"], "attr_acc_per_attribute": result["per_attribute"],
            "scored_videos": result["videos"]}
