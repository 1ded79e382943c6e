"""jobs.nightly: three nights, a crashed night, overlapping runs and changed settings, on local
storage and on a moto S3 server, with real Ray and the toy models; every check reads back the
Parquet the runs wrote (latest view, partitions, ledger) row by row.
"""

import io
import os
import signal
import subprocess
import sys
import tarfile
import time

import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from jobs import nightly
from toyworld.scene import make_clip
from toyworld.shards import video_key, write_shards

SEED = 21


def storage(kind, s3, tmp_path):
    """(fsspec filesystem, root URI, storage override list) of a fresh place on local disk or S3."""
    import fsspec

    if kind == "local":
        return fsspec.filesystem("file"), str(tmp_path), []
    import s3fs

    name = tmp_path.name.replace("_", "-")[-40:]
    opts = [f"{side}.storage_options.{k}={v}" for side in ("source", "output") for k, v in s3.items()]
    return s3fs.S3FileSystem(**s3, skip_instance_cache=True, use_listings_cache=False), f"s3://videos/{name}", opts


def overrides(root: str, opts: list[str], date: str, *more: str) -> list[str]:
    return [f"source.uri={root}/videos", f"output.uri={root}/captions", f"nightly.run_date={date}", *opts,
            "nightly.dataset=cams", "caption.batch_size=2", "decode.batch_size=2", "generation.max_new_tokens=24",
            "generation.k=6", "decode.max_side=256", *more]


def add_shards(root: str, first: int, count: int, opts: dict | None) -> list[str]:
    """Shards `first..first+count-1` of the toy dataset (2 videos each); returns their video ids."""
    write_shards(f"{root}/videos", videos=2 * (first + count), seed=SEED, shard_size=2, storage_options=opts)
    return [video_key(SEED, i) for i in range(2 * first, 2 * (first + count))]


def add_corrupt_shard(fs, root: str, index: int) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("cam9_broken.mp4")
        data = make_clip(5)[1][:300]  # a truncated mp4
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with fs.open(f"{bare(root)}/videos/shard-{index:06d}.tar", "wb") as f:
        f.write(buf.getvalue())
    return "cam9_broken"


def bare(root: str) -> str:
    """A root URI as its filesystem's path."""
    return root.removeprefix("s3://")


def read_parquet(fs, path: str) -> list[dict]:
    with fs.open(path, "rb") as f:
        return pq.read_table(f).to_pylist()


def ledger(fs, root: str) -> list[dict]:
    from pipeline.nightly import read_ledger

    return read_ledger(fs, f"{bare(root)}/captions/cams/_ledger")


def series_dirs(fs, root: str) -> list[str]:
    base = f"{bare(root)}/captions/cams"
    fs.invalidate_cache(base)
    return sorted(p for p in fs.ls(base, detail=False) if "series=" in p)


def latest(fs, root: str) -> list[dict]:
    (series,) = series_dirs(fs, root)[-1:]
    fs.invalidate_cache(series)
    return read_parquet(fs, f"{series}/latest.parquet")


def partition_ids(fs, series: str, date: str) -> list[str]:
    fs.invalidate_cache(series)
    files = [p for p in fs.find(f"{series}/run_date={date}") if p.endswith(".parquet")]
    return sorted(r["video_id"] for p in files for r in read_parquet(fs, p))


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_three_nights_caption_each_video_once_and_keep_a_ledger(kind, s3, ray_cluster, tmp_path, capsys):
    fs, root, opts = storage(kind, s3, tmp_path)
    s3opts = s3 if kind == "s3" else None
    night1 = add_shards(root, 0, 2, s3opts)
    assert nightly.main(["--config", str(ROOT / "jobs/configs/local.yaml"), *overrides(root, opts, "2026-11-20")]) == 0
    (series,) = series_dirs(fs, root)
    assert partition_ids(fs, series, "2026-11-20") == sorted(night1)

    # The same night again: nothing new, nothing twice.
    assert nightly.main(["--config", str(ROOT / "jobs/configs/local.yaml"), *overrides(root, opts, "2026-11-20")]) == 0
    assert partition_ids(fs, series, "2026-11-20") == sorted(night1)

    night2 = add_shards(root, 2, 1, s3opts)
    assert nightly.main(["--config", str(ROOT / "jobs/configs/local.yaml"), *overrides(root, opts, "2026-11-21")]) == 0
    assert partition_ids(fs, series, "2026-11-21") == sorted(night2)

    # Night 3: no new video but one corrupt new file; all of the night failed: exit 1 to alert.
    broken = add_corrupt_shard(fs, root, 3)
    assert nightly.main(["--config", str(ROOT / "jobs/configs/local.yaml"), *overrides(root, opts, "2026-11-22")]) == 1
    assert "ALERT" in capsys.readouterr().err

    rows = latest(fs, root)
    by_id = {r["video_id"]: r for r in rows}
    assert len(rows) == len(by_id) == len(night1) + len(night2) + 1
    assert all(by_id[v]["caption"] and by_id[v]["error"] is None for v in night1 + night2)
    assert by_id[broken]["error"] and by_id[broken]["job_id"] == "cams-2026-11-22"
    assert {by_id[v]["job_id"] for v in night2} == {"cams-2026-11-21"}

    runs = ledger(fs, root)
    assert [(r["run_date"], r["status"], r["videos"], r["failed"]) for r in runs] == [
        ("2026-11-20", "succeeded", 4, 0), ("2026-11-20", "succeeded", 0, 0), ("2026-11-21", "succeeded", 2, 0),
        ("2026-11-22", "too_many_failures", 1, 1)]
    assert len({r["config_hash"] for r in runs}) == 1 and all(r["end"] for r in runs)


def _start(args: list[str], log) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "jobs.nightly", "--config", str(ROOT / "jobs/configs/local.yaml"),
                             *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(predicate, proc: subprocess.Popen, log_path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"the run ended early (rc {proc.returncode}):\n{log_path.read_text()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


def test_a_crashed_night_is_recorded_and_the_next_night_picks_up_what_it_missed(tmp_path, ray_cluster):
    import fsspec

    fs, root = fsspec.filesystem("file"), str(tmp_path)
    # Enough videos that the kill lands mid-run: with a few, the night could commit them all between
    # the first file's appearance and the kill (seen: 2 runs in 3 at 6 videos).
    videos = add_shards(root, 0, 10, None)
    quick = ["nightly.heartbeat_s=1", "nightly.stale_after_s=4", "output.rows_per_file=1", "caption.batch_size=1"]
    log_path = tmp_path / "crashed.log"
    with open(log_path, "w") as log:
        proc = _start(overrides(root, [], "2026-11-20", *quick), log)
    captions = tmp_path / "captions" / "cams"
    _wait_for(lambda: any(captions.glob("series=*/run_date=2026-11-20/*.parquet")), proc, log_path)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray cluster it started: no end record, a stale lease
    proc.wait()
    time.sleep(5)
    assert [r["status"] for r in ledger(fs, root)] == ["running"]

    assert nightly.main(["--config", str(ROOT / "jobs/configs/local.yaml"),
                         *overrides(root, [], "2026-11-21", *quick)]) == 0
    rows = latest(fs, root)
    assert sorted(r["video_id"] for r in rows) == sorted(videos)  # every video once, across both nights
    runs = ledger(fs, root)
    assert [(r["run_date"], r["status"]) for r in runs] == [("2026-11-20", "crashed"), ("2026-11-21", "succeeded")]
    assert "recorded by run" in runs[0]["message"]
    assert 0 < runs[1]["videos"] < len(videos)  # the second night captioned only what the first had not committed


def test_overlapping_runs_the_second_refuses_and_nothing_is_captioned_twice(tmp_path, ray_cluster, capsys):
    import fsspec

    fs, root = fsspec.filesystem("file"), str(tmp_path)
    videos = add_shards(root, 0, 2, None)
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        first = _start(overrides(root, [], "2026-11-20", "nightly.heartbeat_s=1"), log)
    _wait_for(lambda: any(r["status"] == "running" for r in ledger(fs, root)), first, log_path)
    second = nightly.main(["--config", str(ROOT / "jobs/configs/local.yaml"), *overrides(root, [], "2026-11-20")])
    assert second == 3 and "in progress" in capsys.readouterr().err
    assert first.wait(timeout=600) == 0, log_path.read_text()[-3000:]
    assert sorted(r["video_id"] for r in latest(fs, root)) == sorted(videos)
    runs = ledger(fs, root)
    assert sorted(r["status"] for r in runs) == ["refused", "succeeded"]


def test_changed_caption_settings_refuse_unless_a_new_series_is_asked_for(tmp_path, ray_cluster, capsys):
    import fsspec

    fs, root = fsspec.filesystem("file"), str(tmp_path)
    videos = add_shards(root, 0, 1, None)
    config = ["--config", str(ROOT / "jobs/configs/local.yaml")]
    assert nightly.main([*config, *overrides(root, [], "2026-11-20")]) == 0
    changed = overrides(root, [], "2026-11-21", "generation.max_new_tokens=20")
    assert nightly.main([*config, *changed]) == 2
    assert "--recaption" in capsys.readouterr().err
    # Settings that change how fast, not what, keep the series.
    assert nightly.main([*config, *overrides(root, [], "2026-11-21", "decode.actors={min: 1, max: 2}")]) == 0
    assert len(series_dirs(fs, root)) == 1
    assert nightly.main([*config, "--recaption", *changed]) == 0
    runs = ledger(fs, root)
    assert [r["status"] for r in runs] == ["succeeded", "refused", "succeeded", "succeeded"]
    old, new = runs[0]["config_hash"], runs[-1]["config_hash"]
    assert old != new and [f"series={h}" for h in sorted({old, new})] == [d.rsplit("/", 1)[-1] for d in series_dirs(fs, root)]
    for h in (old, new):  # the new series captioned every video again; the old one is untouched
        rows = read_parquet(fs, f"{bare(root)}/captions/cams/series={h}/latest.parquet")
        assert sorted(r["video_id"] for r in rows) == sorted(videos) and all(r["config_hash"] == h for r in rows)
