"""The split-KV decode attention kernel (lvspec/attention.py), on the CPU through Triton's interpreter.

Triton decides when it is imported whether it interprets, so each check runs in a fresh Python with
TRITON_INTERPRET=1 (this file, run as a script with the check's name). The interpreter computes in
float32: the kernel against float64 attention within float32 rounding, and the toy pairs, in float32,
decoding the same tokens on it as on the masked paths.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _interpreted(check: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    done = subprocess.run([sys.executable, __file__, check], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, f"{check} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    print(done.stdout)


def test_split_attention_equals_masked_softmax_attention_over_each_rows_band():
    """Any shape a decoder runs (1 to 11 new tokens, grouped query heads, head sizes 64 and 128,
    rows left-padded and at their own lengths, keys cut into one or many stretches): the output and
    each head's attention mass on the video keys equal float64 attention over keys pad <= i <=
    length + j, and nothing past a row's band is read (poisoned with NaN there); rows not `live`
    read nothing at all and get zeros, the others the same output."""
    _interpreted("kernel")


def test_rotate_and_store_writes_what_rope_and_the_indexed_cache_writes_write():
    """The split path's fused kernel (RoPE on queries and keys, both caches written, the queries
    returned) against the eager path's `_rotate` and indexed writes: the same queries and caches
    (float32 rounding), for steps, verifies and packed forwards whose fillers all write one slot,
    and no other cache entry touched."""
    _interpreted("rotate")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_an_engine_on_split_attention_decodes_what_it_decodes_on_masked_attention(family):
    """The toy pair with every decoding forward on "split" (target and draft, steps, verifies and
    catch-ups; lvspec's relevance probe summed inside the kernel; idle slots and rows past their
    own K skipped): the same lvspec tokens, counters and relevance as on the masked paths, and
    exact sd still equal to greedy generate."""
    _interpreted(f"engine:{family}")


# ---- the checks, run in the interpreter ----------------------------------------------------------------


def _reference(query, k, v, pad, length, scale, video):
    import torch

    S, q, heads, hd = query.shape
    kvh, capacity = k.shape[1], k.shape[2]
    keys = torch.arange(capacity)
    visible = (keys >= pad[:, None, None]) & (keys <= (length[:, None] + torch.arange(q))[..., None])
    kk, vv = (t.double().nan_to_num(0.0).repeat_interleave(heads // kvh, 1) for t in (k, v))
    scores = torch.einsum("sjhd,shnd->shjn", query.double(), kk) * scale
    p = scores.masked_fill(~visible[:, None], -math.inf).softmax(-1)
    return torch.einsum("shjn,shnd->sjhd", p, vv), (p * video[:, None, None, :].double()).sum(-1)


def check_kernel() -> None:
    import torch

    from lvspec.attention import split_attention

    torch.manual_seed(0)
    shapes = [  # rows, new tokens, heads, kv heads, head size, capacity, stretches
        (3, 1, 14, 2, 64, 300, None), (2, 2, 28, 4, 128, 200, 1), (5, 11, 28, 4, 64, 130, 8),
        (1, 6, 10, 2, 64, 500, 16), (4, 3, 40, 8, 128, 256, 3)]
    for S, q, heads, kvh, hd, capacity, splits in shapes:
        qkv = torch.randn(S, q, heads + 2 * kvh, hd)
        query = qkv[:, :, :heads]  # a strided view, as the decoder passes it
        k, v = torch.randn(S, kvh, capacity, hd), torch.randn(S, kvh, capacity, hd)
        pad = torch.randint(0, 20, (S,))
        length = torch.randint(30, capacity - q, (S,))
        for s in range(S):  # outside each row's band: never read
            k[s, :, :pad[s]] = v[s, :, :pad[s]] = float("nan")
            k[s, :, length[s] + q:] = v[s, :, length[s] + q:] = float("nan")
        video = torch.rand(S, capacity) < 0.5
        out, mass = split_attention(query, k, v, pad, length, hd ** -0.5, video, splits=splits)
        want, want_mass = _reference(query, k, v, pad, length, hd ** -0.5, video)
        assert out.shape == (S, q, heads, hd) and mass.shape == (S, heads, q)
        assert not out.isnan().any() and not mass.isnan().any()
        err = (out.double() - want).norm() / want.norm()
        assert err < 1e-5, (S, q, heads, kvh, hd, capacity, splits, err)
        assert (mass.double() - want_mass).abs().max() < 1e-5
        plain, none = split_attention(query, k, v, pad, length, hd ** -0.5, None, splits=splits)
        assert none is None and torch.equal(plain, out)
        live = torch.arange(S) % 2 == 0  # rows not wanted read nothing: their keys poisoned too
        k[~live], v[~live] = float("nan"), float("nan")
        some, some_mass = split_attention(query, k, v, pad, length, hd ** -0.5, video, live=live, splits=splits)
        assert torch.equal(some[live], out[live]) and torch.equal(some_mass[live], mass[live])
        assert not some[~live].any() and not some_mass[~live].any()
        print(f"rows {S} q {q} heads {heads}/{kvh} hd {hd} capacity {capacity} stretches {splits}: rel err {err:.1e}")


def check_rotate() -> None:
    import torch

    from lvspec.attention import rotate_and_store
    from lvspec.decoder import _rotate

    torch.manual_seed(0)
    shapes = [(3, 1, 14, 2, 64, 40), (2, 11, 28, 4, 128, 30), (4, 3, 40, 8, 128, 20), (1, 2, 4, 4, 8, 9)]
    for S, q, heads, kvh, hd, capacity in shapes:
        N = S * q
        qkv = torch.randn(N, heads + 2 * kvh, hd)
        angle = torch.rand(N, hd // 2) * 100
        cos = torch.cat([angle.cos(), angle.cos()], -1)[:, None]
        sin = torch.cat([-angle.sin(), angle.sin()], -1)[:, None]
        row = torch.arange(N) // q
        at = torch.randint(0, capacity - q, (S,)).repeat_interleave(q) + torch.arange(N) % q
        if S > 2:  # a packed forward's fillers: all to one row's last slot (value: any of theirs)
            row[-2:], at[-2:] = 0, capacity - 1
        k, v = torch.randn(S, kvh, capacity, hd), torch.randn(S, kvh, capacity, hd)
        want_k, want_v = k.clone(), v.clone()
        qk = _rotate(qkv[:, : heads + kvh], cos, sin)
        want_k[row, :, at] = qk[:, heads:]
        want_v[row, :, at] = qkv[:, heads + kvh:]
        query = rotate_and_store(qkv, cos, sin, row, at, k, v, heads)
        assert query.shape == (N, heads, hd)
        assert torch.allclose(query, qk[:, :heads], rtol=1e-6, atol=1e-6)
        real = torch.ones(S, capacity, dtype=torch.bool)
        if S > 2:
            real[0, capacity - 1] = False  # which filler wrote last is not defined
        by_slot = lambda t: t.transpose(1, 2)[real]  # noqa: E731 - [slots written or not, kv heads, hd]
        assert torch.allclose(by_slot(k), by_slot(want_k), rtol=1e-6, atol=1e-6)
        assert torch.equal(by_slot(v), by_slot(want_v))
        print(f"rows {S} q {q} heads {heads}/{kvh} hd {hd}: same queries and caches")


def check_engine(family: str) -> None:
    import torch

    from lvspec import Engine, SpecConfig
    from test_batching import PAYS, PROMPTS
    from test_lvspec import hf_greedy, make_rows
    from toyworld.families import load_pair

    processor, target, draft = load_pair(family, dtype=torch.float32)
    rows = make_rows(processor, [8, 4, 6], prompts=PROMPTS[:3])

    def run(cfg, split: bool):
        engine = Engine(target, draft, cfg, slots=2)  # three rows through two slots: a refill too
        if split:
            for decoder in (engine.T, engine.D):
                decoder.attention.update(step="split", verify="split")
        out = engine.generate(rows, trace=True)
        for decoder in (engine.T, engine.D):
            decoder.attention.update(step=None, verify=None)  # the models' decoders are shared: back to the rule
        return out

    lv = SpecConfig(mode="lvspec", k="auto", k_max=6, k_costs=PAYS, theta=0.45, max_new_tokens=32)
    masked, split = run(lv, False), run(lv, True)
    assert [r.tokens for r in split] == [r.tokens for r in masked]
    assert [r.stats for r in split] == [r.stats for r in masked]
    assert sum(r.stats.accepted_loose + r.stats.accepted_shift for r in split) > 0
    for a, b in zip(masked, split):
        ra = torch.tensor([slot["relevance"] for slot in a.trace], dtype=torch.float64)
        rb = torch.tensor([slot["relevance"] for slot in b.trace], dtype=torch.float64)
        assert ra.shape == rb.shape and (ra - rb).abs().max() < 1e-4
    sd = SpecConfig(mode="sd", k=4, max_new_tokens=32)
    assert [r.tokens for r in run(sd, True)] == hf_greedy(processor, target, rows)
    print(f"{family}: {sum(len(r.tokens) for r in split)} tokens, same on split attention")


if __name__ == "__main__":
    name, _, arg = sys.argv[1].partition(":")
    globals()[f"check_{name}"](*([arg] if arg else []))
