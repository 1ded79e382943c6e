"""Tensor parallelism on CPU: the toy targets sharded over two gloo ranks (two local processes)
decode exactly what one process decodes, in every mode, with the same visual relevance."""

import traceback

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoConfig

from conftest import free_port
from lvspec import Engine, SpecConfig, parallel
from test_lvspec import make_rows
from toyworld import families
from toyworld.families import MODELS_DIR, load_pair

MODES = [SpecConfig(mode="ar"), SpecConfig(mode="sd", k=4), SpecConfig(mode="lvspec", k=5),
         SpecConfig(mode="lvspec", k=3, relevance_layers=(1, 3), theta=0.1)]
# k=auto chooses K from timings, which differ run to run: the ranks share rank 0's choice (the
# stream must finish, in step), but its tokens are not compared with another run's.
AUTO = SpecConfig(mode="lvspec", k="auto", k_max=5)
FRAMES = (4, 8, 6)  # a ragged batch: prompts and videos of different lengths


def _outputs(results):
    return [{"tokens": r.tokens, "stats": r.stats.as_dict(), "finished_by": r.finished_by,
             "relevance": [t["relevance"] for t in r.trace],
             "by_head": [t["relevance_by_head"] for t in r.trace]} for r in results]


def _rank(rank: int, world: int, port: int, family: str, rows, configs, out):
    """One rank: load this rank's shard of the target (and the whole draft), decode every config."""
    try:
        parallel.start(rank, world, port, cuda=False)
        torch.set_num_threads(1)
        target = parallel.load(str(MODELS_DIR / f"{family}-target"), world, torch.float64)
        _, _, draft = load_pair(family, dtype=torch.float64)
        results = []
        for cfg in configs:
            engine = Engine(target, draft, cfg)
            if rank == 0:
                results.append(_outputs(engine.generate(rows, trace=True)))
                engine.close()
            else:
                engine.follow()
        out.put((rank, results, None))
    except BaseException:
        out.put((rank, None, traceback.format_exc()))


def run_sharded(family: str, rows, configs, world: int = 2):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, family, rows, configs, out)) for r in range(world)]
    for p in procs:
        p.start()
    got = dict((rank, (res, err)) for rank, res, err in (out.get(timeout=600) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    errors = [err for _, err in got.values() if err]
    assert not errors, "\n".join(errors)
    return got[0][0]


@pytest.mark.parametrize("family", families.FAMILIES)
def test_two_ranks_decode_exactly_what_one_process_decodes(family):
    processor, target, draft = load_pair(family, dtype=torch.float64)
    rows = make_rows(processor, FRAMES, seed=47)
    whole = [_outputs(Engine(target, draft, cfg).generate(rows, trace=True)) for cfg in MODES]
    *sharded, auto = run_sharded(family, rows, [*MODES, AUTO])
    assert [len(r["tokens"]) > 0 for r in auto] == [True] * len(rows)
    loosened = 0
    for cfg, one, two in zip(MODES, whole, sharded):
        for a, b in zip(one, two):
            assert b["tokens"] == a["tokens"], cfg
            assert b["stats"] == a["stats"] and b["finished_by"] == a["finished_by"], cfg
            assert len(b["relevance"]) == len(a["relevance"])
            for ra, rb in zip(a["relevance"], b["relevance"]):
                assert (ra is None) == (rb is None) and (ra is None or abs(ra - rb) < 1e-5)
            for ha, hb in zip(a["by_head"], b["by_head"]):
                assert ha.keys() == hb.keys() and all(abs(ha[h] - hb[h]) < 1e-5 for h in ha)
            loosened += a["stats"]["accepted_loose"] + a["stats"]["accepted_shift"]
    assert loosened > 0  # the loose rule (and so relevance) decided some tokens


def test_a_tensor_parallel_size_must_split_the_heads():
    cfg = AutoConfig.from_pretrained(MODELS_DIR / "qwen2_5_vl-target").get_text_config()  # 6 heads, 2 KV heads
    parallel.check_shardable(cfg, 2)
    with pytest.raises(ValueError, match=r"tensor_parallel=3 does not divide the target's KV heads \(2\)"):
        parallel.check_shardable(cfg, 3)
    with pytest.raises(ValueError, match="integer >= 1"):
        parallel.check_shardable(cfg, 0)


def test_the_relevance_heads_of_a_rank_keep_their_global_numbers():
    """(layer, head) pairs name heads of the whole model; sharded, head 4 of 6 lives on rank 1."""
    family = "qwen2_5_vl"
    processor, target, draft = load_pair(family, dtype=torch.float64)
    rows = make_rows(processor, (6, 4), seed=48)
    cfg = SpecConfig(mode="lvspec", k=4, relevance_heads=((0, 1), (2, 4), (3, 5)))
    one = _outputs(Engine(target, draft, cfg).generate(rows, trace=True))
    two = run_sharded(family, rows, [cfg])[0]
    for a, b in zip(one, two):
        assert a["tokens"] == b["tokens"]
        assert max(abs(x - y) for x, y in zip(a["relevance"], b["relevance"])) < 1e-5
