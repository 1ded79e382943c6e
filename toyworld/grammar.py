"""Caption grammar: anchors (attribute words) fixed by the video, fillers drawn at random.

Filler entropy `h` in [0, 1] is the normalised entropy of every filler slot: a slot with n
phrasings uses the first round(n ** h) of them, uniformly. h = 0 is one fixed phrasing, h = 1 all.
Each caption carries character spans labelled "anchor" or "filler", so labels survive any
tokenizer that reports offsets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from toyworld.scene import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, SIZES, Scene

DEFAULT_FILLER_ENTROPY = 1.0
FILLER_LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)

COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}

# Filler slots, nearly all one token each, so that almost every filler token is a real choice.
# The first option of each is the fixed phrasing used at h = 0.
ORDERS = ("subject_first", "background_first")
OPENERS = ("Here", "Now", "Onscreen", "Today", "Clearly", "Look")
VERBS = ("moved", "drifted", "slid", "glided", "travelled", "floated")
MANNERS = ("", "slowly", "steadily", "smoothly", "gently", "calmly")  # optional word
PREPOSITIONS = ("across", "over", "against", "on")
ARTICLES = ("a", "the")
BACKDROPS = ("background", "backdrop", "canvas", "field")
PRONOUNS = ("It", "This", "Everything", "All")
LINKS = ("looks", "seems", "appears", "feels")
MOODS = ("calm", "simple", "tidy", "plain", "quiet", "neat")

ANCHOR_VOCAB = {
    "count": {w: n for n, w in COUNT_WORDS.items()},
    "size": {w: w for w in SIZES},
    "colour": {w: w for w in COLOURS},
    "shape": {**{w: w for w in SHAPES}, **{p: s for s, p in PLURALS.items()}},
    "direction": {w: w for w in DIRECTIONS},
    "background": {w: w for w in BACKGROUNDS},
}
ANCHOR_WORDS = frozenset(w for vocab in ANCHOR_VOCAB.values() for w in vocab)

PROMPT = "Describe the video."


def prompt_for(filler_entropy: float | None = None) -> str:
    """The user prompt; naming a filler entropy asks the toy models for that phrasing variety."""
    if filler_entropy is None:
        return PROMPT
    return f"{PROMPT} Filler entropy: {filler_entropy:.2f}"


@dataclass(frozen=True)
class Caption:
    text: str
    spans: tuple[tuple[int, int, str], ...]  # (start, end, "anchor" | "filler") over text

    def anchor_words(self) -> list[str]:
        return [self.text[a:b] for a, b, label in self.spans if label == "anchor"]


class _Builder:
    def __init__(self):
        self.parts: list[tuple[str, str]] = []

    def add(self, text: str, label: str = "filler") -> None:
        """Append a word, or a phrase of words and punctuation, all with one label."""
        for piece in re.findall(r"[A-Za-z]+|[.,]", text):
            self.parts.append((piece, label))

    def build(self) -> Caption:
        text, spans = "", []
        for piece, label in self.parts:
            # A space before every word; none before punctuation.
            if text and piece[0] not in ".,":
                text += " "
                if spans and spans[-1][2] == "filler":  # the space belongs to the filler run
                    spans[-1] = (spans[-1][0], len(text), "filler")
                else:
                    spans.append((len(text) - 1, len(text), "filler"))
            start = len(text)
            text += piece
            if spans and spans[-1][2] == label == "filler" and spans[-1][1] == start:
                spans[-1] = (spans[-1][0], len(text), label)
            else:
                spans.append((start, len(text), label))
        return Caption(text, tuple(spans))


def _pick(options: tuple[str, ...], rng: np.random.Generator, h: float) -> str:
    in_use = max(1, round(len(options) ** h))
    return options[int(rng.integers(in_use))]


def make_caption(scene: Scene, rng: np.random.Generator, filler_entropy: float = DEFAULT_FILLER_ENTROPY) -> Caption:
    """A caption for `scene` whose fillers are drawn at `filler_entropy`."""
    if not 0.0 <= filler_entropy <= 1.0:
        raise ValueError(f"filler_entropy must be in [0, 1], got {filler_entropy}")
    h = filler_entropy
    b = _Builder()
    order, opener = _pick(ORDERS, rng, h), _pick(OPENERS, rng, h)
    prep, article, backdrop = _pick(PREPOSITIONS, rng, h), _pick(ARTICLES, rng, h), _pick(BACKDROPS, rng, h)
    verb, manner = _pick(VERBS, rng, h), _pick(MANNERS, rng, h)
    pronoun, link, mood = _pick(PRONOUNS, rng, h), _pick(LINKS, rng, h), _pick(MOODS, rng, h)

    def subject():
        b.add(COUNT_WORDS[scene.count], "anchor")
        b.add(scene.size, "anchor")
        b.add(scene.colour, "anchor")
        b.add(scene.shape if scene.count == 1 else PLURALS[scene.shape], "anchor")
        b.add(verb)
        b.add(manner)
        b.add(scene.direction, "anchor")

    def background(capital: bool):
        b.add(prep.capitalize() if capital else prep)
        b.add(article)
        b.add(scene.background, "anchor")
        b.add(backdrop)

    if order == "subject_first":  # "Here, two large red circles moved leftward across a black background."
        b.add(opener + ",")
        subject()
        background(capital=False)
    else:  # "Against the black canvas, two large red circles moved leftward."
        background(capital=True)
        b.add(",")
        subject()
    b.add(".")
    b.add(f"{pronoun} {link} {mood}.")  # "It looks calm."
    return b.build()


def labelled(text: str) -> Caption:
    """Label any text (a model's caption, say) by the grammar: words of attribute vocabularies are anchors."""
    spans, pos = [], 0
    for m in re.finditer(r"[A-Za-z]+", text):
        if m.group().lower() in ANCHOR_WORDS:
            if m.start() > pos:
                spans.append((pos, m.start(), "filler"))
            spans.append((m.start(), m.end(), "anchor"))
            pos = m.end()
    if pos < len(text):
        spans.append((pos, len(text), "filler"))
    return Caption(text, tuple(spans))


def token_labels(caption: Caption, offsets: list[tuple[int, int]]) -> list[str]:
    """Label each token (given its character offsets into caption.text) anchor or filler."""
    labels = []
    for start, end in offsets:
        label = "filler"
        for a, b, span_label in caption.spans:
            if span_label == "anchor" and start < b and end > a:
                label = "anchor"
        labels.append(label)
    return labels


def corpus(rng: np.random.Generator, n: int) -> list[str]:
    """Sentences covering the grammar, for training the tokenizer."""
    from toyworld.scene import sample_scene

    out = ([prompt_for(h) for h in FILLER_LEVELS] + [PROMPT, "user", "assistant", "system"]) * 200
    for _ in range(n):
        out.append(make_caption(sample_scene(rng), rng, float(rng.choice(FILLER_LEVELS))).text)
    return out


def anchor_token_ids(tokenizer) -> set[int]:
    """Ids of the tokens that spell an attribute word (the grammar's anchors) in this tokenizer."""
    return {i for w, i in tokenizer.get_vocab().items()
            if tokenizer.convert_tokens_to_string([w]).strip().lower() in ANCHOR_WORDS}
