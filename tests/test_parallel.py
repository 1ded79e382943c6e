"""Tensor parallelism on CPU: the toy targets sharded over two gloo ranks (two local processes)
decode exactly what one process decodes, in every mode, with the same visual relevance."""

import threading
import time
import traceback

import psutil
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoConfig

from conftest import ROOT, spawn_ranks
from lvspec import Engine, SpecConfig, loading, parallel
from test_lvspec import make_rows
from toyworld import families
from toyworld.families import MODELS_DIR, load_pair
from toyworld.shards import write_shards

COSTS = {"draft_step_ms": 1.0, "verify_0_ms": 10.0, "verify_1_ms": 10.5, "verify_max_ms": 13.0}  # drafting pays
MODES = [SpecConfig(mode="ar"), SpecConfig(mode="sd", k=4), SpecConfig(mode="lvspec", k=5),
         SpecConfig(mode="lvspec", k=3, relevance_layers=(1, 3), theta=0.1),
         SpecConfig(mode="lvspec", k="auto", k_max=5, k_costs=COSTS)]  # each row's K from its history: the same
# k=auto with its cost table measured: rank 0 measures, every rank decodes with its table (the
# stream must finish, in step), but the tokens are not compared with another run's.
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
        target = loading.load(str(MODELS_DIR / f"{family}-target"), world, torch.float64)
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
    return spawn_ranks(_rank, world, family, rows, configs)


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


def test_the_decoding_all_reduce_switch_takes_oneshot_or_nccl(monkeypatch):
    tp = parallel.TensorParallel(None, None, 0, 2)  # not reached: the switch is read first
    monkeypatch.setenv(parallel.ALL_REDUCE_ENV, "nccl")
    assert parallel.one_shot_buffer(tp, torch.device("cuda")) is None  # no buffer: NCCL carries every reduce
    monkeypatch.setenv(parallel.ALL_REDUCE_ENV, "fast")
    with pytest.raises(ValueError, match="LVSPEC_TP_ALLREDUCE must be 'oneshot' or 'nccl', got 'fast'"):
        parallel.one_shot_buffer(tp, torch.device("cpu"))


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


# ---- the Ray job with tensor-parallel replicas (CPU: gloo ranks) ----------------------------------

def _job(tmp_path, job_id: str, seed: int, videos: int, *overrides):
    from pipeline.config import load_config

    src = tmp_path / f"videos{seed}"
    if not src.exists():
        write_shards(str(src), videos=videos, seed=seed, shard_size=2)
    return load_config(ROOT / "jobs/configs/local.yaml", [
        f"job_id={job_id}", f"source.uri={src}", f"output.uri={tmp_path / 'out'}", "decode.batch_size=2",
        "generation.max_new_tokens=32", "decode.max_side=256", "generation.k=4", *overrides])  # fixed K: timing-free


def _rows(tmp_path, job_id: str) -> list[dict]:
    return [r for f in sorted((tmp_path / "out" / job_id).glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def test_the_job_with_two_rank_replicas_writes_the_captions_of_one_rank_replicas(tmp_path, ray_cluster):
    """k=auto with a pinned cost table: one rank, batches of 2, slots from memory (at most the rows
    a replica holds); two ranks, batches of 3 through 5 slots: the same lvspec captions."""
    from pipeline.job import run

    pinned = "generation.k_costs={" + ", ".join(f"{k}: {v}" for k, v in COSTS.items()) + "}"
    runs = {1: ("caption.batch_size=2", "caption.slots=auto"), 2: ("caption.batch_size=3", "caption.slots=5")}
    for tp, batching in runs.items():
        summary = run(_job(tmp_path, f"tp{tp}", 51, 6, f"caption.tensor_parallel={tp}", "generation.k=auto", pinned,
                           *batching))
        assert summary["ok"] == 6 and summary["k_costs"] == [COSTS], summary
    one, two = ({r["video_id"]: r for r in _rows(tmp_path, f"tp{tp}")} for tp in (1, 2))
    assert sorted(two) == sorted(one) == [f"toy51_{i:06d}" for i in range(6)]
    assert {r["slots"] for r in one.values()} == {8} and {r["slots"] for r in two.values()} == {5}  # 2 x 2, x 2 audits
    for vid, row in one.items():
        assert two[vid]["error"] is None and two[vid]["caption"] == row["caption"], vid
        assert two[vid]["num_tokens"] == row["num_tokens"] and two[vid]["num_cycles"] == row["num_cycles"]
    assert len({r["mean_draft_length"] for r in one.values()}) > 1  # rows drafted lengths of their own


def _peers() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "pipeline.peers" in cmd:
            found.append(p)
    return found


def test_a_killed_peer_ends_its_replica_quickly_and_the_job_still_writes_every_video_once(tmp_path, ray_cluster):
    """Kill rank 1 of the replica mid-job: rank 0 (the actor) exits within seconds instead of
    hanging in a collective, Ray restarts it with new peers, and every video is written once."""
    from pipeline.job import run

    cfg = _job(tmp_path, "kill", 52, 8, "caption.tensor_parallel=2", "caption.batch_size=1", "caption.slots=2",
               "output.rows_per_file=1")
    seen: dict = {}

    def kill_a_peer_mid_job():
        deadline = time.time() + 600
        while time.time() < deadline:
            peers = _peers()
            if peers and list((tmp_path / "out" / "kill").glob("*.parquet")):  # captioning is under way
                victim = peers[0]
                leader = victim.parent()
                seen["killed_at"], seen["leader"], seen["victim"] = time.time(), leader, victim.pid
                victim.kill()
                try:
                    leader.wait(timeout=60)
                    seen["leader_gone_s"] = time.time() - seen["killed_at"]
                except psutil.TimeoutExpired:
                    seen["leader_gone_s"] = None
                break
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_peer_mid_job)
    killer.start()
    summary = run(cfg)
    killer.join()
    print(f"peer {seen.get('victim')} killed; its replica's actor was gone {seen.get('leader_gone_s')} s later")
    assert "victim" in seen, "no peer was seen while the job ran"
    assert seen["leader_gone_s"] is not None and seen["leader_gone_s"] < 15, seen  # loud and quick, no hang
    rows = _rows(tmp_path, "kill")
    assert sorted(r["video_id"] for r in rows) == [f"toy52_{i:06d}" for i in range(8)]  # each once
    assert all(r["error"] is None and r["caption"] for r in rows), [r["error"] for r in rows]
    assert summary["ok"] == 8
