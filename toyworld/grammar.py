"""Caption grammar: anchors (attribute words) fixed by the video, fillers drawn at random.

Filler entropy `h` in [0, 1] is the normalised entropy of every filler slot: a slot with n
phrasings uses the first round(n ** h) of them, uniformly. h = 0 is one fixed phrasing, h = 1 all.
Each caption carries character spans labelled "anchor" or "filler", so labels survive any
tokenizer that reports offsets.

Edition 2 (`make_caption(..., edition=2)`) is harder where LVSpec is weakest:
- filler phrases of one to four tokens, synonyms of different lengths ("drifted" / "slowly
  drifted" / "slowly and steadily drifted");
- phrasing *styles*: each phrase has a weight in the target's style and one in the draft's (the
  draft is trained on its own style, as a real draft phrases differently from its target). Some
  draft favourites are the target's favourite with one word put before it ("slowly drifted" for
  "drifted") where the target, after that word, goes on differently ("slowly and steadily"):
  the draft then says the target's word one slot late, which only position-shift tolerance accepts;
- clips with two events in order ("moved leftward, then upward"; "drifted downward while turning
  blue"), the order being an attribute of its own (`score.parse_caption`).
At h = 0 both styles use each slot's first phrase, the target's favourite.
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


def _noun_phrase(b: _Builder, scene: Scene) -> None:
    """The subject's anchors, as both editions say them: "two large red circles"."""
    b.add(COUNT_WORDS[scene.count], "anchor")
    b.add(scene.size, "anchor")
    b.add(scene.colour, "anchor")
    b.add(scene.shape if scene.count == 1 else PLURALS[scene.shape], "anchor")


def _pick(options: tuple[str, ...], rng: np.random.Generator, h: float) -> str:
    in_use = max(1, round(len(options) ** h))
    return options[int(rng.integers(in_use))]


def make_caption(scene: Scene, rng: np.random.Generator, filler_entropy: float = DEFAULT_FILLER_ENTROPY,
                 edition: int = 1, style: str = "target") -> Caption:
    """A caption for `scene` whose fillers are drawn at `filler_entropy` (edition 2: in `style`)."""
    if not 0.0 <= filler_entropy <= 1.0:
        raise ValueError(f"filler_entropy must be in [0, 1], got {filler_entropy}")
    if edition == 2:
        return _caption_v2(scene, rng, filler_entropy, style)
    if edition != 1:
        raise ValueError(f"edition must be 1 or 2, got {edition!r}")
    h = filler_entropy
    b = _Builder()
    order, opener = _pick(ORDERS, rng, h), _pick(OPENERS, rng, h)
    prep, article, backdrop = _pick(PREPOSITIONS, rng, h), _pick(ARTICLES, rng, h), _pick(BACKDROPS, rng, h)
    verb, manner = _pick(VERBS, rng, h), _pick(MANNERS, rng, h)
    pronoun, link, mood = _pick(PRONOUNS, rng, h), _pick(LINKS, rng, h), _pick(MOODS, rng, h)

    def subject():
        _noun_phrase(b, scene)
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


# Edition 2 slots: (phrase, target-style weight, draft-style weight); the first phrase is the h = 0 one.
Slot = tuple[tuple[str, float, float], ...]
# A draft favourite is a phrasing the target also finds plausible (weight 2 of 6: the loose rule's
# p(d) >= alpha * p(t) holds at alpha 0.25), except the continuations of the shift patterns above.
OPENERS_V2: Slot = (("Here", 6, 1), ("In this clip", 2, 1), ("Onscreen", 2, 6), ("As we can see", 1, 1),
                    ("Look", 1, 1))
VERB_PHRASES_V2: Slot = (("drifted", 6, 1), ("slowly and steadily drifted", 3, 1), ("slowly drifted", 0.5, 6),
                         ("kept on moving", 2, 1), ("moved", 1, 2), ("went", 1, 1))
THEN_DIRECTION_V2: Slot = (("then", 6, 1), ("and later", 3, 1), ("and then", 0.5, 6), ("before turning", 2, 1),
                           ("and afterwards", 1, 1))
THEN_COLOUR_V2: Slot = (("turning", 6, 1), ("while gradually turning", 3, 1), ("while turning", 0.5, 6),
                        ("and becoming", 2, 1), ("before changing to", 1, 1))
PREPOSITIONS_V2: Slot = (("across", 6, 1), ("over", 2, 1), ("in front of", 2, 6), ("on top of", 1, 1))
ARTICLES_V2: Slot = (("a", 1, 1), ("the", 1, 1))
BACKDROPS_V2: Slot = (("background", 6, 1), ("backdrop", 2, 1), ("plain backdrop", 1, 1), ("empty field", 2, 6))
PRONOUNS_V2: Slot = (("It", 6, 1), ("The whole scene", 2, 1), ("This", 2, 6), ("All of it", 1, 1))
LINKS_V2: Slot = (("looks", 6, 1), ("really does look", 3, 1), ("really looks", 0.5, 6), ("seems", 1, 1),
                  ("appears to be", 1, 1))
MOODS_V2: Slot = (("calm", 6, 1), ("simple", 2, 1), ("quiet", 2, 6), ("very tidy", 1, 1), ("rather plain", 1, 1))
ORDERS_V2: Slot = (("subject_first", 3, 1), ("background_first", 1, 1))
STYLES = ("target", "draft")


def _pick_v2(slot: Slot, rng: np.random.Generator, h: float, style: str) -> str:
    in_use = slot[:max(1, round(len(slot) ** h))]
    weights = np.array([w[1 + STYLES.index(style)] for w in in_use], float)
    return in_use[int(rng.choice(len(in_use), p=weights / weights.sum()))][0]


def _caption_v2(scene: Scene, rng: np.random.Generator, h: float, style: str) -> Caption:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    pick = lambda slot: _pick_v2(slot, rng, h, style)  # noqa: E731
    b = _Builder()
    order, opener, verb = pick(ORDERS_V2), pick(OPENERS_V2), pick(VERB_PHRASES_V2)
    then_direction, then_colour = pick(THEN_DIRECTION_V2), pick(THEN_COLOUR_V2)
    prep, article, backdrop = pick(PREPOSITIONS_V2), pick(ARTICLES_V2), pick(BACKDROPS_V2)
    pronoun, link, mood = pick(PRONOUNS_V2), pick(LINKS_V2), pick(MOODS_V2)

    def subject():
        _noun_phrase(b, scene)
        b.add(verb)
        b.add(scene.direction, "anchor")
        if scene.then_direction:  # "... drifted leftward, then upward"
            b.add(f", {then_direction}")
            b.add(scene.then_direction, "anchor")
        if scene.then_colour:  # "... drifted leftward, turning blue"
            b.add(f", {then_colour}")
            b.add(scene.then_colour, "anchor")

    def background(capital: bool):
        b.add(prep[0].upper() + prep[1:] if capital else prep)
        b.add(article)
        b.add(scene.background, "anchor")
        b.add(backdrop)

    if order == "subject_first":
        b.add(opener + ",")
        subject()
        b.add(",")
        background(capital=False)
    else:
        background(capital=True)
        b.add(",")
        subject()
    b.add(".")
    b.add(f"{pronoun} {link} {mood}.")
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


def corpus(rng: np.random.Generator, n: int, edition: int = 1) -> list[str]:
    """Sentences covering the grammar, for training the tokenizer."""
    from toyworld.scene import sample_scene

    out = ([prompt_for(h) for h in FILLER_LEVELS] + [PROMPT, "user", "assistant", "system"]) * 200
    for i in range(n):
        style = STYLES[i % 2] if edition == 2 else "target"
        scene = sample_scene(rng, edition=edition)
        out.append(make_caption(scene, rng, float(rng.choice(FILLER_LEVELS)), edition, style).text)
    return out


def anchor_token_ids(tokenizer) -> set[int]:
    """Ids of the tokens that spell an attribute word (the grammar's anchors) in this tokenizer."""
    return {i for w, i in tokenizer.get_vocab().items()
            if tokenizer.convert_tokens_to_string([w]).strip().lower() in ANCHOR_WORDS}
