"""The multi-GPU measurement's own parts on CPU (issue 18): the GPU sampler over several GPUs, the
peer it kills, the engine alone with tensor-parallel peers, and the figures the report derives."""

import json
import subprocess
import sys
import time

import pytest

from conftest import ROOT


def test_the_gpu_sampler_averages_the_gpus_in_use_and_only_the_clusters(monkeypatch):
    from bench.pipeline_gpu import GpuSampler

    sampler = GpuSampler.__new__(GpuSampler)
    # GPUs 0 and 1 hold models (busy 90 % and 70 %), GPU 2 holds nothing, GPU 3 another process's model.
    sampler.samples = [(t, g, u, m) for t in (1.0, 2.0) for g, u, m in
                       ((0, 90.0, 40000.0), (1, 70.0, 40000.0), (2, 0.0, 300.0), (3, 100.0, 60000.0))]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    got = sampler.between(0.0, 3.0)
    assert got["busy_per_gpu"] == {0: 0.9, 1: 0.7} and got["busy_fraction"] == pytest.approx(0.8)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert sampler.between(0.0, 3.0)["busy_fraction"] == pytest.approx((0.9 + 0.7 + 1.0) / 3)
    assert sampler.between(5.0, 6.0) == {"samples": 0}


def test_the_peer_finder_sees_a_peer_rank_process_and_nothing_else():
    from bench.pipeline_gpu import _peer_pids

    before = set(_peer_pids())
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "pipeline.peers"])
    try:
        deadline = time.time() + 10
        while proc.pid not in _peer_pids() and time.time() < deadline:
            time.sleep(0.1)
        assert set(_peer_pids()) - before == {proc.pid}
    finally:
        proc.kill()
        proc.wait()
    assert proc.pid not in _peer_pids()


def test_the_engine_alone_runs_a_tensor_parallel_replica_with_its_peers_and_ends_them_cleanly(tmp_path):
    """`bench.pipeline_gpu engine` with caption.tensor_parallel=2 on CPU (gloo): this process is rank 0,
    a peer follows it, and when the runs are done the peer ends without ending the benchmark."""
    out = tmp_path / "engine.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.pipeline_gpu", "engine", "--rows", "6", "--repeats", "1", "--json", str(out),
         "model.target=toyworld/models/llava_onevision-target", "model.draft=toyworld/models/llava_onevision-draft",
         "caption.tensor_parallel=2", "caption.num_gpus=0", "caption.slots=2", "caption.batch_size=2",
         "generation.compile_prefill=false", "decode.num_frames=4", "generation.max_new_tokens=40"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "peer" not in done.stderr  # no "tensor-parallel peer ... exited" alarm
    got = json.loads(out.read_text())
    assert got["tensor_parallel"] == 2 and len(got["runs"]) == 1 and got["runs"][0]["tokens"] > 6


def test_the_multi_gpu_report_derives_scaling_the_tensor_parallel_ratio_and_the_peer_kill():
    from bench.pipeline_multi_gpu import figures

    def job(replicas, tps, tp=1, kill=None, written=None):
        rows = 192 * replicas
        runs = [{"exit": 0, "steady": {"tokens_per_s": t, "rows_per_s": t / 150}, "gpu": {"busy_fraction": 0.95},
                 "decode": {"headroom": 3.0}, "written": written or rows, "ok": written or rows,
                 "distinct_ids": written or rows, "wall_s": 100.0, "errors": []} for t in tps]
        return {"kind": "job", "replicas": replicas, "tensor_parallel": tp, "rows": rows, "decode_actors": 8 * replicas,
                "kill_peer_after_s": kill, "target": "t", "draft": "d", "runs": runs}

    parts = [job(1, [800.0, 810.0, 790.0]), job(4, [3000.0, 2900.0, 3100.0]), job(2, [1500.0]),
             job(2, [1100.0], tp=2), job(2, [900.0], tp=2, kill=20.0, written=384),
             {"kind": "engine", "tensor_parallel": 2, "runs": [{"steady": {"tokens_per_s": v}} for v in (600, 610, 590)]},
             {"steps": [], "tp2_step_over_tp1": 0.6}]
    res = figures(parts)
    assert res["scaling_4_over_1"] == pytest.approx(3000 / 800) and res["scaling_2_over_1"] == pytest.approx(1500 / 800)
    assert res["tp_job_over_engine"] == pytest.approx(550 / 600)  # the job's tokens/s a replica over one alone
    assert res["peer_kill"]["videos"] == 384 and res["peer_kill"]["unique_videos"] == 384
    assert res["tp2_step_over_tp1"] == 0.6
    # A failed run is not a measurement.
    parts[0]["runs"][0]["exit"] = 1
    assert figures(parts)["scaling"]["1"]["tokens_per_s"]["runs"] == [810.0, 790.0]
