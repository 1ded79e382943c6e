"""On a GPU only (CI has none; results go in BENCHMARKS.md): CUDA-graph replay decodes exactly as
eager execution does, on the toy pairs in float32.

    python -m pytest tests/test_gpu.py -q        # on a CUDA machine
"""

import dataclasses

import numpy as np
import pytest
import torch

from lvspec import Engine, SpecConfig
from toyworld import families, grammar
from toyworld.scene import render, sample_scene

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rendered_rows(processor, n: int, seed: int) -> list[dict]:
    """Rendered clips straight from the scene generator (no codec needed on the GPU machine)."""
    rng = np.random.default_rng(seed)
    text = families.chat_text(processor, grammar.PROMPT)
    return [processor(text=[text], videos=[render(sample_scene(rng))[::2]], return_tensors="pt") for _ in range(n)]


@pytest.fixture(scope="module", params=families.FAMILIES)
def pair(request):
    torch.backends.cuda.matmul.allow_tf32 = False
    processor, target, draft = families.load_pair(request.param, dtype=torch.float32)
    return processor, target.cuda(), draft.cuda()


@pytest.mark.parametrize("cfg", [
    SpecConfig(mode="ar"),
    SpecConfig(mode="sd", k=6),
    SpecConfig(mode="sd", k="auto"),
    SpecConfig(mode="lvspec", k=6, theta=0.45),
    SpecConfig(mode="lvspec", k=6, theta=0.45, relevance_heads=((0, 0), (0, 1), (1, 0)), relevance_weights=(0.5, 0.3, 0.2)),
], ids=["ar", "sd", "sd-auto", "lvspec", "lvspec-weighted"])
def test_graph_replay_decodes_exactly_like_eager(pair, cfg):
    processor, target, draft = pair
    rows = rendered_rows(processor, 6, seed=3)
    cfg = dataclasses.replace(cfg, max_new_tokens=48)
    eager = Engine(target, draft, dataclasses.replace(cfg, cuda_graphs=False)).generate(rows)
    engine = Engine(target, draft, cfg, slots=6)
    assert engine.graphs
    for _ in range(2):  # the first call captures, the second replays the captured graphs
        graphed = engine.generate(rows)
        assert [r.tokens for r in graphed] == [r.tokens for r in eager]
        if cfg.k != "auto":  # with k=auto, K follows measured timings and so may differ run to run
            assert [r.stats for r in graphed] == [r.stats for r in eager]
    assert engine._state.stages.graphs, "nothing was captured"
    if cfg.mode == "lvspec":
        assert sum(r.stats.accepted_loose + r.stats.accepted_shift for r in graphed) > 0
