"""On a GPU only (CI has none; results go in BENCHMARKS.md): CUDA-graph replay decodes exactly as
eager execution does, on the toy pairs in float32; on two GPUs, the one-shot all-reduce sums as
NCCL does, eager and captured, and a tensor-parallel decode gives the same tokens with either.

    python -m pytest tests/test_gpu.py -q        # on a CUDA machine
"""

import dataclasses
import os
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist

from conftest import spawn_ranks
from lvspec import Engine, SpecConfig, loading, parallel
from lvspec.draft_length import EVIDENCE, Costs
from toyworld import families, grammar
from toyworld.families import MODELS_DIR, load_pair
from toyworld.scene import render, sample_scene

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PAYS = Costs(draft_step_ms=1.0, verify_0_ms=10.0, verify_1_ms=10.5, verify_max_ms=13.0)  # as tests/test_batching.py
NEVER = Costs(draft_step_ms=5.0, verify_0_ms=1.0, verify_1_ms=10.0, verify_max_ms=20.0)


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
    SpecConfig(mode="lvspec", k="auto", k_max=6, theta=0.45, k_costs=PAYS),  # each row its own K, pinned
    SpecConfig(mode="sd", k="auto", k_costs=NEVER),  # the batch's K = 0 from the first cycle, no catch-ups
    SpecConfig(mode="lvspec", k="auto", theta=0.45, k_costs=NEVER),  # K = 0 cycles and the draft's catch-up forwards
], ids=["ar", "sd", "sd-auto", "lvspec", "lvspec-weighted", "lvspec-auto-pinned", "sd-auto-k0", "lvspec-auto-k0"])
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
        if cfg.k != "auto" or cfg.k_costs is not None:  # a measured k=auto table may differ run to run
            assert [r.stats for r in graphed] == [r.stats for r in eager]
    if cfg.k_costs == NEVER and cfg.mode == "sd":  # the batch's choice: K = 0 from the first cycle
        assert engine.timing["ingests"] == 0 and set(engine.timing["k"]) == {0}
    elif cfg.k_costs == NEVER:  # each row's: K = 0 once it has drafted EVIDENCE cycles; the draft catches up
        assert engine.timing["ingests"] > 0 and set(engine.timing["k"][EVIDENCE:]) == {0}
    assert engine._state.stages.graphs, "nothing was captured"
    if cfg.mode == "lvspec":
        assert sum(r.stats.accepted_loose + r.stats.accepted_shift for r in graphed) > 0


@pytest.mark.parametrize("cfg", [SpecConfig(mode="ar"), SpecConfig(mode="sd", k=6),
                                 SpecConfig(mode="lvspec", k="auto", k_max=6, theta=0.45, k_costs=PAYS)],
                         ids=["ar", "sd", "lvspec-auto-pinned"])
def test_packed_verify_graphs_decode_what_padded_eager_verifies_decode(pair, cfg):
    """pack_verify's forwards (index gathers and scatters, fillers into the caches' last slot),
    captured per (K, packed width) and replayed: the same tokens and counters as eager verifies of
    every slot at the cycle's K; twelve slots for six rows, so that packing leaves slots out."""
    processor, target, draft = pair
    rows = rendered_rows(processor, 6, seed=6)
    cfg = dataclasses.replace(cfg, max_new_tokens=48)
    draft = draft if cfg.mode != "ar" else None
    padded = Engine(target, draft, dataclasses.replace(cfg, cuda_graphs=False, pack_verify=False), slots=12)
    expected = padded.generate(rows)
    engine = Engine(target, draft, cfg, slots=12)
    for _ in range(2):
        packed = engine.generate(rows)
        assert [r.tokens for r in packed] == [r.tokens for r in expected]
        assert [r.stats for r in packed] == [r.stats for r in expected]
    assert engine.timing["verify_tokens"] < padded.timing["verify_tokens"]
    assert any(key[0] == "verify" and key[2] is not None for key in engine._state.stages.graphs)


def test_slots_auto_plans_from_the_gpus_free_memory(pair):
    """slots="auto" on a GPU: the plan reads the device's free memory; six slots fit a toy pair with
    room to spare, and the rows decode as with six fixed slots."""
    processor, target, draft = pair
    rows = rendered_rows(processor, 6, seed=4)
    cfg = SpecConfig(mode="sd", k=4, max_new_tokens=48)
    fixed = [r.tokens for r in Engine(target, draft, cfg, slots=6).generate(rows)]
    auto = Engine(target, draft, cfg, slots="auto", max_slots=6)
    assert [r.tokens for r in auto.generate(rows)] == fixed
    assert auto.plan.slots == 6 and auto.plan.free_bytes > auto.plan.reserve_bytes + 6 * auto.plan.slot_bytes


@pytest.mark.parametrize("cfg", [SpecConfig(mode="ar"), SpecConfig(mode="sd", k=6),
                                 SpecConfig(mode="lvspec", k="auto", k_max=6, theta=0.45, k_costs=PAYS)],
                         ids=["ar", "sd", "lvspec-auto-pinned"])
def test_graphs_on_split_attention_decode_what_eager_masked_attention_decodes(pair, cfg, monkeypatch):
    """Every decoding forward on the split-KV kernel (the only path the tuner may pick), captured and
    replayed: the same tokens and counters as eager forwards on the masked matmul path, and
    lvspec's relevance (summed in the kernel) within float32 rounding of the score matrix's."""
    import lvspec.engine

    processor, target, draft = pair
    rows = rendered_rows(processor, 6, seed=5)
    cfg = dataclasses.replace(cfg, max_new_tokens=48)
    eager = Engine(target, draft, dataclasses.replace(cfg, cuda_graphs=False)).generate(rows, trace=True)
    monkeypatch.setattr(lvspec.engine, "attention_paths", lambda device: ("split",))
    engine = Engine(target, draft, cfg, slots=4)  # six rows through four slots: refills beside decoding
    for _ in range(2):
        split = engine.generate(rows, trace=True)
        tuned = [engine.T.attention["step"]] + ([engine.T.attention["verify"], *engine.D.attention.values()]
                                                if engine.D is not None else [])
        assert set(tuned) == {"split"}
        assert [r.tokens for r in split] == [r.tokens for r in eager]
        assert [r.stats for r in split] == [r.stats for r in eager]
    for a, b in zip(eager, split):
        for x, y in zip(a.trace, b.trace):
            if x["relevance"] is not None:
                assert abs(x["relevance"] - y["relevance"]) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_split_attention_at_real_shapes_equals_float64_attention(dtype):
    """The kernel at the real models' decode shapes (LLaVA-OV 7B / 0.5B and Qwen2.5-VL 32B heads,
    3.2k-token caches, 1 to 11 new tokens, 1 to 128 rows): output and video mass against float64
    attention over each row's band; keys outside the band poisoned with NaN (never read)."""
    from lvspec.attention import split_attention

    g = torch.Generator("cuda").manual_seed(0)
    for S, q, heads, kvh, hd, capacity in [(1, 1, 28, 4, 128, 3328), (128, 4, 14, 2, 64, 3328),
                                           (32, 11, 28, 4, 128, 3328), (96, 6, 40, 8, 128, 1408)]:
        query = torch.randn(S, q, heads, hd, device="cuda", generator=g, dtype=dtype)
        k = torch.randn(S, kvh, capacity, hd, device="cuda", generator=g, dtype=dtype)
        v = torch.randn(S, kvh, capacity, hd, device="cuda", generator=g, dtype=dtype)
        pad = torch.randint(0, 64, (S,), device="cuda", generator=g)
        length = torch.randint(capacity // 2, capacity - q, (S,), device="cuda", generator=g)
        keys = torch.arange(capacity, device="cuda")
        band = (keys >= pad[:, None]) & (keys < (length + q)[:, None])  # [S, capacity]
        k.masked_fill_(~band[:, None, :, None], float("nan"))
        v.masked_fill_(~band[:, None, :, None], float("nan"))
        video = torch.rand(S, capacity, device="cuda", generator=g) < 0.7
        out, mass = split_attention(query, k, v, pad, length, hd ** -0.5, video)
        visible = (keys >= pad[:, None, None]) & (keys <= (length[:, None] + torch.arange(q, device="cuda"))[..., None])
        kk, vv = (t.double().nan_to_num(0.0).repeat_interleave(heads // kvh, 1) for t in (k, v))
        p = (torch.einsum("sjhd,shnd->shjn", query.double(), kk) * hd ** -0.5).masked_fill(
            ~visible[:, None], float("-inf")).softmax(-1)
        want = torch.einsum("shjn,shnd->sjhd", p, vv)
        err = ((out.double() - want).norm() / want.norm()).item()
        assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5), (S, q, heads, kvh, hd, err)
        assert (mass.double() - (p * video[:, None, None].double()).sum(-1)).abs().max() < 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotate_and_store_at_real_shapes_writes_what_the_eager_path_writes(dtype):
    """The split path's fused RoPE + cache writes at the real models' shapes (LLaVA-OV 0.5B / 7B,
    Qwen2.5-VL 32B heads; a step, a verify, a packed verify's fillers): in bfloat16 bit for bit what
    `_rotate` and the indexed writes give (it rounds the product where they do), in float32 within
    one rounding."""
    from lvspec.attention import rotate_and_store
    from lvspec.decoder import _rotate

    g = torch.Generator("cuda").manual_seed(0)
    for S, q, heads, kvh, hd, capacity in [(256, 1, 14, 2, 64, 3328), (1, 1, 28, 4, 128, 3328),
                                           (174, 8, 28, 4, 128, 3328), (96, 6, 40, 8, 128, 1408)]:
        N = S * q
        qkv = torch.randn(N, heads + 2 * kvh, hd, device="cuda", generator=g).to(dtype)
        angle = torch.rand(N, hd // 2, device="cuda", generator=g) * 3000
        cos = torch.cat([angle.cos(), angle.cos()], -1).to(dtype)[:, None]
        sin = torch.cat([-angle.sin(), angle.sin()], -1).to(dtype)[:, None]
        row = torch.arange(N, device="cuda") // q
        at = torch.randint(0, capacity - q, (S,), device="cuda", generator=g).repeat_interleave(q)
        at += torch.arange(N, device="cuda") % q
        k = torch.randn(S, kvh, capacity, hd, device="cuda", generator=g).to(dtype)
        v = torch.randn(S, kvh, capacity, hd, device="cuda", generator=g).to(dtype)
        want_k, want_v = k.clone(), v.clone()
        qk = _rotate(qkv[:, : heads + kvh], cos, sin)
        want_k[row, :, at] = qk[:, heads:]
        want_v[row, :, at] = qkv[:, heads + kvh:]
        query = rotate_and_store(qkv, cos, sin, row, at, k, v, heads)
        if dtype == torch.bfloat16:
            assert torch.equal(query, qk[:, :heads]) and torch.equal(k, want_k) and torch.equal(v, want_v)
        else:
            assert torch.allclose(query, qk[:, :heads], rtol=1e-6, atol=1e-5)
            assert torch.allclose(k, want_k, rtol=1e-6, atol=1e-5) and torch.equal(v, want_v)


# ---- two GPUs: the one-shot all-reduce (lvspec/parallel.py) -----------------------------------------

TP_CONFIGS = [SpecConfig(mode="ar", max_new_tokens=48), SpecConfig(mode="lvspec", k=4, max_new_tokens=48)]


def _one_shot_rank(rank: int, world: int, port: int, family: str, rows, out) -> None:
    """One of two ranks: one-shot sums against NCCL's, eager and in a replayed graph; then every
    TP config decoded once with each path (rank 0 reports the tokens)."""
    try:
        os.environ[parallel.ALL_REDUCE_ENV] = "oneshot"  # opt-in (the default is NCCL's)
        torch.backends.cuda.matmul.allow_tf32 = False
        parallel.start(rank, world, port, cuda=True)
        target = loading.load(str(MODELS_DIR / f"{family}-target"), world, torch.float32)
        draft = load_pair(family, dtype=torch.float32)[2].to(target.device)
        tp = parallel.of(target)
        one_shot = tp.symm
        assert one_shot is not None, "no one-shot buffer: symmetric memory could not be set up (see the log)"
        dev, g = target.device, torch.Generator(target.device).manual_seed(rank)  # each rank its own parts

        def nccl_sum(x):
            x = x.clone()
            dist.all_reduce(x, group=tp.group)
            return x

        for dtype in (torch.bfloat16, torch.float32):
            for shape in ((1, 1, 5120), (8, 11, 5120), (3, 896)):
                x = torch.randn(shape, generator=g, device=dev, dtype=dtype)
                part = x.clone()
                summed = tp.reduce(part)
                assert summed is not part, "the one-shot path was not taken"
                assert torch.equal(summed, nccl_sum(x)), (dtype, shape)

        x = torch.zeros(4, 5120, device=dev, dtype=torch.bfloat16)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            tp.reduce(x * 1)  # warm-up, as graphs.Stages does
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            summed = tp.reduce(x * 1)
        for _ in range(5):  # replays with new values: the signal pads are left ready each time
            x.copy_(torch.randn(x.shape, generator=g, device=dev, dtype=x.dtype))
            graph.replay()
            assert torch.equal(summed, nccl_sum(x))

        # The attention path by the default rule, not by timing: the engines compared must differ in
        # their all-reduce alone.
        Engine._tune_attention = lambda self, st: None
        tokens = {}
        for path in ("oneshot", "nccl"):
            tp.symm = one_shot if path == "oneshot" else None
            tokens[path] = []
            for cfg in TP_CONFIGS:
                engine = Engine(target, draft, cfg)
                if rank:
                    engine.follow()
                    continue
                tokens[path].append([r.tokens for r in engine.generate(rows)])
                engine.close()
        out.put((rank, tokens, None))
    except BaseException:
        out.put((rank, None, traceback.format_exc()))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("family", families.FAMILIES)
def test_one_shot_all_reduce_sums_as_nccl_does_and_decodes_the_same_tokens(family):
    processor = load_pair(family)[0]
    rows = rendered_rows(processor, 3, seed=5)
    tokens = spawn_ranks(_one_shot_rank, 2, family, rows)
    assert tokens["oneshot"] == tokens["nccl"]
    assert all(len(t) > 1 for run in tokens["oneshot"] for t in run)
