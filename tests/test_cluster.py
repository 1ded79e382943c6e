"""Operations against real Ray clusters started with the `ray` CLI: the README's `ray job submit`
path, and autoscaling on Ray's fake multi-node provider (simulated nodes on this machine).

`ray stop` ends every local Ray process, so this module runs before any test that starts the
session's in-process cluster (see conftest.py).
"""

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import BIN, ROOT, free_port
from toyworld.shards import write_shards

RAY = str(BIN / "ray")
# `python` on the PATH is this venv's, as for a user who activated it before `ray start`.
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
       "RAY_AUTH_MODE": "disabled"}
SMALL = ["generation.max_new_tokens=24", "caption.batch_size=2", "decode.batch_size=2", "decode.max_side=256"]


@pytest.fixture
def ray_cli():
    """Runs `ray ...`; stops every local Ray process before and after the test."""
    subprocess.run([RAY, "stop", "--force"], env=ENV, capture_output=True, timeout=120)

    def ray(*args, check=True, timeout=300, env=None):
        out = subprocess.run([RAY, *args], env=env or ENV, capture_output=True, text=True, timeout=timeout)
        if check:
            assert out.returncode == 0, f"ray {' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out

    yield ray
    subprocess.run([RAY, "stop", "--force"], env=ENV, capture_output=True, timeout=120)


def parquet_rows(path) -> list[dict]:
    return [r for f in sorted(path.rglob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def test_the_readme_submit_path_captions_through_a_ray_head(ray_cli, tmp_path):
    """`ray start --head`, then `ray job submit --working-dir . -- python -m jobs.caption ...` as the
    README says, then `ray stop`: the job's own summary comes back and every video is captioned."""
    write_shards(str(tmp_path / "videos"), videos=4, seed=33, shard_size=2)
    dashboard = free_port()
    ray_cli("start", "--head", f"--port={free_port()}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
            "--num-cpus=4", "--include-dashboard=true", "--disable-usage-stats")
    out = ray_cli("job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", ".", "--",
                  "python", "-m", "jobs.caption", "--config", "jobs/configs/local.yaml", "job_id=submitted",
                  f"source.uri={tmp_path / 'videos'}", f"output.uri={tmp_path / 'out'}", *SMALL, timeout=900)
    assert "4 videos captioned this run (4 ok, 0 failed)" in out.stdout
    assert "succeeded" in out.stdout.lower()
    rows = parquet_rows(tmp_path / "out" / "submitted")
    assert sorted(r["video_id"] for r in rows) == [f"toy33_{i:06d}" for i in range(4)]
    assert all(r["caption"] and r["error"] is None for r in rows)


def test_a_token_auth_head_runs_only_jobs_submitted_with_its_token_and_never_logs_it(ray_cli, tmp_path):
    """A head started with `RAY_AUTH_MODE=token` as the README says for a shared machine refuses a
    submitter without a token, with auth off or with a wrong token (no job, nothing written) and runs
    the job of one whose RAY_AUTH_TOKEN_PATH names the token; the token is in no output, log, row or file."""
    home = tmp_path / "home"  # the user's ~/.ray is never read or written
    home.mkdir()
    secret, wrong = secrets.token_hex(32), secrets.token_hex(32)
    token, wrong_token = tmp_path / "auth_token", tmp_path / "wrong_token"
    for path, value in ((token, secret), (wrong_token, wrong)):
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(value)

    def env(**auth):
        base = {k: v for k, v in ENV.items() if not k.startswith("RAY_AUTH_") and k != "RAY_ADDRESS"}
        return {**base, "HOME": str(home), "RAY_AUTH_MODE": "token", **auth}

    # Ray's own short temp dir (its socket paths must stay under 108 bytes): every file this head writes.
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    dashboard = free_port()
    address = f"http://127.0.0.1:{dashboard}"
    submit = ["job", "submit", "--address", address, "--working-dir", ".", "--", "python", "-m", "jobs.caption",
              "--config", "jobs/configs/local.yaml", "job_id=guarded", f"source.uri={tmp_path / 'videos'}",
              f"output.uri={tmp_path / 'out'}", *SMALL]
    outputs = []  # every CLI answer, stdout and stderr
    try:
        try:
            write_shards(str(tmp_path / "videos"), videos=4, seed=35, shard_size=2)
            outputs.append(ray_cli("start", "--head", f"--port={free_port()}", f"--dashboard-port={dashboard}",
                                   "--dashboard-host=127.0.0.1", "--num-cpus=4", "--include-dashboard=true",
                                   "--disable-usage-stats", f"--temp-dir={temp_dir}",
                                   env=env(RAY_AUTH_TOKEN_PATH=str(token))))

            # No token: the CLI refuses before it sends anything. A client with auth off sends no
            # token: the head answers 401. A wrong token: the head answers 403.
            for auth, refusal in (({}, "Ray couldn't find an authentication token"),
                                  ({"RAY_AUTH_MODE": "disabled"}, "Unauthorized: Missing authentication token"),
                                  ({"RAY_AUTH_TOKEN_PATH": str(wrong_token)}, "Forbidden: Invalid authentication token")):
                out = ray_cli(*submit, check=False, timeout=300, env=env(**auth))
                outputs.append(out)
                assert out.returncode != 0, out.stdout[-3000:]
                assert refusal in out.stdout + out.stderr, (out.stdout[-3000:], out.stderr[-3000:])
                assert not (tmp_path / "out").exists()

            right = env(RAY_AUTH_TOKEN_PATH=str(token))
            out = ray_cli(*submit[:4], "--submission-id=guarded-1", *submit[4:], timeout=900, env=right)
            outputs.append(out)
            assert "4 videos captioned this run (4 ok, 0 failed)" in out.stdout
            assert "succeeded" in out.stdout.lower()
            rows = parquet_rows(tmp_path / "out" / "guarded")
            assert sorted(r["video_id"] for r in rows) == [f"toy35_{i:06d}" for i in range(4)]
            assert all(r["caption"] and r["error"] is None for r in rows)
            jobs = ray_cli("job", "list", "--address", address, env=right)
            outputs.append(jobs)
            assert jobs.stdout.count("submission_id=") == 1, jobs.stdout  # the refused submits left no job
            logs = ray_cli("job", "logs", "--address", address, "guarded-1", env=right)
            outputs.append(logs)
            assert "4 videos captioned this run" in logs.stdout
        finally:
            ray_cli("stop", "--force", check=False, env=env())

        for value in (secret, wrong):
            for out in outputs:
                assert value not in out.stdout and value not in out.stderr, f"token in the output of: {out.args}"
            assert value not in json.dumps(rows, default=str)
            summary = tmp_path / "out" / "guarded" / "_summary.json"
            assert value not in summary.read_text()
            # every file Ray wrote for this head: session logs (raylet, GCS, dashboard, job drivers,
            # workers), the uploaded working dir, session metadata; and the output as bytes
            files = [p for root in (temp_dir, tmp_path / "out") for p in root.rglob("*")
                     if p.is_file() and not p.is_symlink()]
            assert any(p.name.startswith("job-driver-") for p in files)  # the scan saw the job's own log
            leaks = [str(p) for p in files if value.encode() in p.read_bytes()]
            assert not leaks, f"the token is written in: {leaks}"
        assert not (home / ".ray" / "auth_token").exists()  # nothing generated a token behind our back
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


FAKE_CLUSTER = {
    "cluster_name": "lvspec-fake", "max_workers": 3,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "available_node_types": {
        # The head holds one CPU: enough for reads and bookkeeping, not for a decode actor of 2 CPUs.
        "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
        "cpu_worker": {"resources": {"CPU": 2, "object_store_memory": 200 * 2**20}, "node_config": {},
                       "min_workers": 0, "max_workers": 2},
        "gpu_worker": {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 200 * 2**20}, "node_config": {},
                       "min_workers": 0, "max_workers": 1},
    },
    "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1,
    "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
    "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
    "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
}

NODES = """
import json, ray
ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
print("NODES", json.dumps([{"alive": n["Alive"], "resources": n["Resources"]} for n in ray.nodes()]))
"""


def nodes() -> list[dict]:
    out = subprocess.run([sys.executable, "-c", NODES], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # the driver may also print autoscaler events to stdout; the answer is the line marked NODES
    line = next(line for line in out.stdout.splitlines() if line.startswith("NODES "))
    return json.loads(line.removeprefix("NODES "))


def test_pools_and_nodes_scale_with_the_job_on_a_fake_multinode_cluster(ray_cli, tmp_path):
    """The job starts on a head alone; the autoscaler adds a CPU node for the decode pool and a "GPU"
    node for the caption replica as the pools ask; every video is captioned once; idle nodes go."""
    from ray._private.services import get_node_ip_address

    port = free_port()
    config = tmp_path / "fake_cluster.json"
    fake = {**FAKE_CLUSTER, "provider": {**FAKE_CLUSTER["provider"], "gcs_address": f"{get_node_ip_address()}:{port}"}}
    config.write_text(json.dumps(fake))
    env = {**ENV, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    ray_cli("start", "--head", f"--autoscaling-config={config}", "--num-cpus=1", f"--port={port}",
            "--include-dashboard=false", "--disable-usage-stats", env=env)
    assert [n["alive"] for n in nodes()] == [True]  # the head alone

    write_shards(str(tmp_path / "videos"), videos=6, seed=34, shard_size=2)
    log = tmp_path / "job.log"
    with open(log, "w") as out:
        job = subprocess.Popen(
            [sys.executable, "-m", "jobs.caption", "--config", "jobs/configs/local.yaml", "job_id=scaled",
             "ray.address=auto", f"source.uri={tmp_path / 'videos'}", f"output.uri={tmp_path / 'out'}",
             "decode.num_cpus=2", "decode.actors={min: 1, max: 2}", "caption.num_gpus=1", "caption.num_cpus=1",
             "caption.replicas={min: 1, max: 1}", *SMALL], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    seen = []  # the resources of every node alive at some point while the job ran
    deadline = time.time() + 1200
    while job.poll() is None and time.time() < deadline:
        seen += [n["resources"] for n in nodes() if n["alive"]]
        time.sleep(2)
    assert job.wait(timeout=60) == 0, log.read_text()[-3000:]
    rows = parquet_rows(tmp_path / "out" / "scaled")
    assert sorted(r["video_id"] for r in rows) == [f"toy34_{i:06d}" for i in range(6)]
    assert all(r["caption"] for r in rows)
    assert any(r.get("GPU") for r in seen), seen  # a "GPU" node came for the caption replica ...
    assert any(r.get("CPU") == 2 and not r.get("GPU") for r in seen), seen  # ... and a CPU node for decoding

    deadline = time.time() + 180
    while time.time() < deadline and sum(n["alive"] for n in nodes()) > 1:
        time.sleep(3)
    alive = [n for n in nodes() if n["alive"]]
    assert len(alive) == 1 and not alive[0]["resources"].get("GPU"), alive  # idle workers were removed
