"""Shared by the test modules: the environment, a moto S3 server and one in-process Ray cluster.

Module order matters for one thing: tests/test_cluster.py starts and stops Ray clusters of its own
with the `ray` CLI (`ray stop` ends every local Ray process), so it runs first, before any test
here starts the session's in-process cluster (`pytest_collection_modifyitems` puts it first,
whatever the file names sort as).
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Nothing may come from a hub: every model is a local toy checkpoint.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's console scripts: ray, moto_server


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name != "test_cluster.py")  # stable: the rest keep their order


def kill_job(proc) -> None:
    """SIGKILL a job started with start_new_session=True and the local Ray cluster it started: its
    process group, then the Ray processes of its session (`/tmp/ray/session_..._<driver pid>`, which
    Ray starts in sessions of their own) and all their descendants, so no worker finishes the job
    after the kill."""
    import signal

    os.killpg(proc.pid, signal.SIGKILL)
    parents, marked = {}, set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if f"_{proc.pid}/".encode() in cmdline:
            marked.add(int(entry.name))
    grown = True
    while grown:  # and their descendants (the workers raylet forked)
        more = {pid for pid, parent in parents.items() if parent in marked} - marked
        marked |= more
        grown = bool(more)
    for pid in marked:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(fn, world: int, *args, timeout: float = 600):
    """Run fn(rank, world, port, *args, out) in `world` spawned processes, each putting (rank, result,
    traceback or None) on `out`; fail with every rank's traceback, else return rank 0's result."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=fn, args=(r, world, port, *args, out)) for r in range(world)]
    for p in procs:
        p.start()
    got = dict((rank, (res, err)) for rank, res, err in (out.get(timeout=timeout) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    errors = [err for _, err in got.values() if err]
    assert not errors, "\n".join(errors)
    return got[0][0]


@pytest.fixture(scope="session")
def s3():
    """A real S3 protocol endpoint on 127.0.0.1 (moto server), with buckets `videos` and `captions`."""
    import s3fs

    port = free_port()
    server = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    fs = s3fs.S3FileSystem(**options)
    for _ in range(100):
        try:
            fs.ls("")
            break
        except Exception:
            time.sleep(0.1)
    for bucket in ("videos", "captions"):
        fs.mkdir(bucket)
    yield options
    server.terminate()
    server.wait()


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def base_overrides(options: dict, source: str, output: str, job_id: str) -> list[str]:
    opts = [f"{side}.storage_options.{k}={v}" for side in ("source", "output") for k, v in options.items()]
    return [f"job_id={job_id}", f"source.uri={source}", f"output.uri={output}", *opts,
            "caption.batch_size=4", "decode.batch_size=4", "generation.max_new_tokens=40", "decode.max_side=256"]


