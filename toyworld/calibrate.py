"""Choose LVSpec's relevance heads and threshold for a toy target, on calibration videos.

    python -m toyworld.calibrate --family qwen2_5_vl [--videos 128 --seed 4242] [--edition 2]

Runs LVSpec with every target layer probed and labels each verified slot by whether the target's
token there is an anchor (grammar vocabulary). Three candidate relevance definitions are searched,
each with its best theta by min(precision, recall):
- whole layers (every head of a layer subset, DESIGN's "averaged over heads"), exhaustively;
- single heads, chosen by greedy forward selection (add the head that raises min(P, R) most, stop
  when no head adds at least `MIN_GAIN`);
- a weighted mean of every head (weights >= 0 summing to 1, so relevance stays a video attention
  mass), fitted as a logistic model of the anchor labels; heads under `MIN_WEIGHT` are dropped.
Each later candidate wins only if strictly better. Writes `lvspec.json` beside the target
checkpoint: the settings the benchmark and the pipeline use. Calibration seeds are never
evaluation seeds.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from lvspec import SpecConfig, generate
from lvspec.config import SETTINGS_FILE
from toyworld import families, grammar
from toyworld.families import engine_rows, load_pair, render_videos

CALIBRATION_SEED = 4242
THETAS = np.round(np.arange(0.01, 1.0, 0.005), 3)
MIN_GAIN = 0.002  # a head must raise min(P, R) by this much to join
MIN_WEIGHT = 0.01  # weighted mean: lighter heads are dropped (the rest renormalised)
WEIGHT_DECAY = 1e-3  # on the weights' logits: keeps the fit near equal weights where the labels allow


def collect(family: str, videos: int, seed: int, k: int = 10, edition: int = 1):
    """Per verified slot: relevance of every (layer, head) of the target, and whether its token is an anchor."""
    processor, target, draft = load_pair(family, families.models_dir(edition))
    _, _, frames = render_videos(videos, seed, edition=edition)
    rows = engine_rows(processor, frames, grammar.PROMPT)
    cfg = SpecConfig(mode="lvspec", k=k, theta=1.0, max_new_tokens=48)  # probe everything, gate nothing
    anchors = grammar.anchor_token_ids(processor.tokenizer)
    slots = [s for r in generate(target, draft, rows, cfg, trace=True) for s in r.trace]
    heads = sorted(slots[0]["relevance_by_head"])
    rel = np.array([[s["relevance_by_head"][h] for h in heads] for s in slots])
    is_anchor = np.array([s["target_token"] in anchors for s in slots])
    return heads, rel, is_anchor


def precision_recall(flagged: np.ndarray, is_anchor: np.ndarray) -> tuple[float, float]:
    hits = float((flagged & is_anchor).sum())
    return hits / max(int(flagged.sum()), 1), hits / max(int(is_anchor.sum()), 1)


def best_theta(score: np.ndarray, is_anchor: np.ndarray) -> tuple[float, float, float, float]:
    """(min(P, R), theta, P, R) at the theta with the best min(P, R); ties go to the lower theta."""
    flagged = score[None, :] >= THETAS[:, None]  # [thetas, slots]
    hits = (flagged & is_anchor).sum(1)
    p, r = hits / np.maximum(flagged.sum(1), 1), hits / max(int(is_anchor.sum()), 1)
    i = int(np.argmax(np.minimum(p, r)))
    return float(min(p[i], r[i])), float(THETAS[i]), float(p[i]), float(r[i])


def by_layers(heads, rel, is_anchor):
    """Best subset of whole layers (all their heads averaged)."""
    layers = sorted({layer for layer, _ in heads})
    best = None
    for n in range(1, len(layers) + 1):
        for combo in itertools.combinations(layers, n):
            cols = [j for j, (layer, _) in enumerate(heads) if layer in combo]
            found = best_theta(rel[:, cols].mean(1), is_anchor)
            if best is None or found[0] > best[0][0]:
                best = (found, {"relevance_layers": list(combo)})
    return best


def by_heads(heads, rel, is_anchor):
    """Greedy forward selection of single heads."""
    chosen, best = [], None
    while len(chosen) < len(heads):
        found, j = max((best_theta(rel[:, chosen + [j]].mean(1), is_anchor), j)
                       for j in range(len(heads)) if j not in chosen)
        if best is not None and found[0] < best[0][0] + MIN_GAIN:
            break
        chosen.append(j)
        best = (found, {"relevance_heads": sorted([list(heads[i]) for i in chosen])})
    return best


def by_weights(heads, rel, is_anchor):
    """A weighted mean of all heads: softmax weights (so >= 0, summing to 1) fitted with a scale and
    bias as a logistic model of `is_anchor`; then theta as for the other candidates."""
    x, y = torch.tensor(rel, dtype=torch.float64), torch.tensor(is_anchor, dtype=torch.float64)
    logits = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([logits, scale, bias], max_iter=2000, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        z = scale * (x @ torch.softmax(logits, 0)) + bias
        value = torch.nn.functional.binary_cross_entropy_with_logits(z, y) + WEIGHT_DECAY * logits.square().sum()
        value.backward()
        return value

    opt.step(loss)
    weights = torch.softmax(logits.detach(), 0).numpy()
    keep = np.flatnonzero(weights >= MIN_WEIGHT)
    weights = np.round(weights[keep] / weights[keep].sum(), 4)
    found = best_theta(rel[:, keep] @ weights / weights.sum(), is_anchor)
    return found, {"relevance_heads": [list(heads[j]) for j in keep], "relevance_weights": weights.tolist()}


def choose(heads, rel, is_anchor) -> dict:
    layers, single = by_layers(heads, rel, is_anchor), by_heads(heads, rel, is_anchor)
    best = single if single[0][0] > layers[0][0] else layers
    weighted = by_weights(heads, rel, is_anchor)
    (score, theta, p, r), chosen = weighted if weighted[0][0] > best[0][0] else best
    return chosen | {"theta": theta, "precision": round(p, 4), "recall": round(r, 4),
                     "whole_layers": {**layers[1], "theta": layers[0][1], "min_pr": round(layers[0][0], 4)}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=families.FAMILIES, required=True)
    ap.add_argument("--videos", type=int, default=128)
    ap.add_argument("--seed", type=int, default=CALIBRATION_SEED)
    ap.add_argument("--edition", type=int, choices=(1, 2), default=1, help="toy world edition (videos, models)")
    args = ap.parse_args(argv)
    heads, rel, is_anchor = collect(args.family, args.videos, args.seed, edition=args.edition)
    settings = choose(heads, rel, is_anchor) | {"calibration": {"videos": args.videos, "seed": args.seed,
                                                                 "slots": int(len(is_anchor))}}
    path = Path(families.model_dir(args.family, "target", args.edition)) / SETTINGS_FILE
    path.write_text(json.dumps(settings, indent=1) + "\n")
    if "relevance_weights" in settings:
        which = f"a weighted mean of {len(settings['relevance_heads'])} heads"
    else:
        which = f"heads {settings['relevance_heads']}" if "relevance_heads" in settings else f"layers {settings['relevance_layers']}"
    print(f"{args.family}: {which}, theta {settings['theta']} "
          f"-> anchor precision {settings['precision']:.3f} recall {settings['recall']:.3f} on {len(is_anchor)} "
          f"slots (best whole layers: min(P, R) {settings['whole_layers']['min_pr']:.3f}); wrote {path}")


if __name__ == "__main__":
    main()
