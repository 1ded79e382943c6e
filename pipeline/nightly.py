"""Nightly incremental labeling: every run captions what no earlier run of the same dataset and the
same caption settings captioned, into a dated partition, and records itself in a ledger.

    <output.uri>/<dataset>/
        _ledger/<run_id>.start.parquet    one Parquet row when a run starts ...
        _ledger/<run_id>.end.parquet      ... and one when it ends (succeeded / failed / refused / crashed)
        _ledger/<run_id>.lease            a running run's heartbeat
        series=<config_hash>/run_date=<YYYY-MM-DD>/part-*.parquet    the captions of that night
        series=<config_hash>/latest.parquet                          one row per video: its newest row

A series is one set of caption settings (`config_hash`); a run with other settings than the
dataset's current series refuses unless asked to start a new one (`recaption`). One run at a
time: a run holds a lease it refreshes every `heartbeat_s`; a second run that finds a fresh lease
of an earlier-started run refuses, and one that finds a stale lease records that run as crashed
and goes on (its committed files count as done; partly written ones are redone).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import sources
from pipeline.config import JobConfig, config_hash, prompts
from pipeline.job import Written, committed_rows, written_of

LEDGER = pa.schema([
    ("run_id", pa.string()), ("event", pa.string()), ("status", pa.string()), ("time", pa.string()),
    ("dataset", pa.string()), ("run_date", pa.string()), ("config_hash", pa.string()), ("job_id", pa.string()),
    ("videos", pa.int64()), ("ok", pa.int64()), ("failed", pa.int64()), ("files_written", pa.int64()),
    ("message", pa.string()),
])


class Busy(RuntimeError):
    """Another run of this dataset holds a fresh lease."""


class SettingsChanged(RuntimeError):
    """The caption settings differ from the dataset's current series and no new series was asked for."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def dataset_name(cfg: JobConfig) -> str:
    """`nightly.dataset`, else the source URI's last path part (`s3://videos/shards/` -> `shards`)."""
    if cfg.nightly.dataset:
        return cfg.nightly.dataset
    name = cfg.source.uri.rstrip("/").rsplit("/", 1)[-1].split(".")[0]
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "dataset"


@dataclass
class Night:
    """One run of the nightly job: where it reads and writes."""

    cfg: JobConfig
    dataset: str
    run_date: str
    run_id: str
    config_hash: str

    @classmethod
    def plan(cls, cfg: JobConfig) -> Night:
        run_date = cfg.nightly.run_date or _now().date().isoformat()
        run_id = f"{run_date}T{_now():%H%M%S}Z-{uuid.uuid4().hex[:6]}"
        return cls(cfg, dataset_name(cfg), run_date, run_id, config_hash(cfg))

    @property
    def job_id(self) -> str:  # the rows' job_id: one per dataset and night
        return f"{self.dataset}-{self.run_date}"

    def paths(self):
        fs, root = sources.filesystem(self.cfg.output.uri, self.cfg.output.storage_options)
        base = f"{root.rstrip('/')}/{self.dataset}"
        series = f"{base}/series={self.config_hash}"
        return fs, base, f"{base}/_ledger", series, f"{series}/run_date={self.run_date}"

    # ---- ledger --------------------------------------------------------------------------------
    def record(self, event: str, status: str, message: str = "", summary: dict | None = None) -> None:
        fs, _, ledger, _, _ = self.paths()
        summary = summary or {}
        row = {"run_id": self.run_id, "event": event, "status": status, "time": _now().isoformat(),
               "dataset": self.dataset, "run_date": self.run_date, "config_hash": self.config_hash,
               "job_id": self.job_id, "videos": summary.get("videos"), "ok": summary.get("ok"),
               "failed": summary.get("failed"), "files_written": summary.get("files_written"), "message": message}
        write_event(fs, ledger, row)

    def acquire(self, recaption: bool, log) -> None:
        """Start this run in the ledger, or refuse (SettingsChanged, Busy) before any work."""
        fs, _, ledger, _, _ = self.paths()
        runs = read_ledger(fs, ledger)
        started = [r for r in runs if r["status"] != "refused"]
        if started:
            current = max(started, key=lambda r: r["start"])["config_hash"]
            if current != self.config_hash and not recaption:
                msg = (f"caption settings changed: dataset {self.dataset!r} is a series of config_hash {current}, "
                       f"this run's settings hash to {self.config_hash}. Restore the settings, or pass --recaption "
                       f"to start series {self.config_hash} (it captions every video again)")
                self.record("start", "refused", msg)  # never "running": no other run waits on it
                self.record("end", "refused", msg)
                raise SettingsChanged(msg)
        # The lease exists before the start record, so a run in the ledger as running without a
        # lease (or with a stale one) has died.
        self._lease = Lease(fs, f"{ledger}/{self.run_id}.lease", self.cfg.nightly.heartbeat_s)
        self._lease.start()
        self.record("start", "running")
        runs = read_ledger(fs, ledger)
        mine = next(r for r in runs if r["run_id"] == self.run_id)
        for other in runs:
            if other["run_id"] == self.run_id or other["status"] != "running":
                continue
            age = lease_age(fs, f"{ledger}/{other['run_id']}.lease")
            if age is not None and age < self.cfg.nightly.stale_after_s:
                if (other["start"], other["run_id"]) < (mine["start"], mine["run_id"]):
                    msg = (f"another run of dataset {self.dataset!r} is in progress (run {other['run_id']}, started "
                           f"{other['start']}, heartbeat {age:.0f} s ago); not starting")
                    self.record("end", "refused", msg)
                    self.release()
                    raise Busy(msg)
            else:  # its lease went stale (or is gone): it died without ending; its committed files stay
                stale = "no lease" if age is None else f"lease {age:.0f} s old"
                write_event(fs, ledger, {**{k: other.get(k) for k in LEDGER.names}, "event": "end", "status": "crashed",
                                         "time": _now().isoformat(),
                                         "message": f"{stale}; recorded by run {self.run_id}"})
                log(f"run {other['run_id']} ({other['run_date']}) had crashed ({stale}); its committed captions count")

    def release(self) -> None:
        lease = getattr(self, "_lease", None)
        if lease is not None:
            lease.stop()
            self._lease = None

    # ---- captions ------------------------------------------------------------------------------
    def done(self, log) -> Written:
        """What this series already holds (failed rows too, unless `nightly.retry_failed`)."""
        fs, _, _, series, _ = self.paths()
        table = committed_rows(fs, partition_files(fs, series),
                               ["video_id", "clip_index", "prompt_name", "last_clip", "error"], log)
        if table is not None and self.cfg.nightly.retry_failed:
            table = table.filter(pc.is_null(table.column("error")))
        return written_of(table, prompts(self.cfg.model))

    def write_latest(self, log) -> int:
        """Rewrite `latest.parquet`: every (video, clip, prompt) of the series once, its row from the newest night."""
        fs, _, _, series, _ = self.paths()
        newest: dict[tuple, dict] = {}
        for path in partition_files(fs, series):  # oldest night first: later rows win
            for row in committed_rows(fs, [path], log=log).to_pylist():
                newest[row["video_id"], row.get("clip_index") or 0, row.get("prompt_name") or "default"] = row
        table = pa.Table.from_pylist(list(newest.values()))
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write(fs, f"{series}/latest.parquet", sink.getvalue().to_pybytes())
        return table.num_rows


def partition_files(fs, series: str) -> list[str]:
    """Parquet files of every night of a series, oldest night first."""
    fs.invalidate_cache(series)
    files = [p for p in fs.find(series) if p.endswith(".parquet") and "/run_date=" in p]
    return sorted(files, key=lambda p: (p.split("/run_date=")[1].split("/")[0], p))


def write_event(fs, ledger: str, row: dict) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist([row], schema=LEDGER), sink)
    atomic_write(fs, f"{ledger}/{row['run_id']}.{row['event']}.parquet", sink.getvalue().to_pybytes())


def atomic_write(fs, path: str, data: bytes) -> None:
    """Readers see the whole file or none of it: written aside, then moved into place (a rename
    on local disks; on object stores a put is whole anyway)."""
    folder = path.rsplit("/", 1)[0]
    fs.makedirs(folder, exist_ok=True)
    tmp = f"{folder}/.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def read_ledger(fs, ledger: str) -> list[dict]:
    """One dict per run: its start row with `start` time, and `status` from its end row if any."""
    fs.invalidate_cache(ledger)
    if not fs.exists(ledger):
        return []
    rows = []
    for path in sorted(p for p in fs.find(ledger) if p.endswith(".parquet")):
        with fs.open(path, "rb") as f:
            rows += pq.read_table(f).to_pylist()
    runs: dict[str, dict] = {}
    for row in sorted(rows, key=lambda r: (r["event"] != "start", r["time"])):
        if row["event"] == "start":
            runs[row["run_id"]] = {**row, "start": row["time"], "end": None}
        elif row["run_id"] in runs:
            runs[row["run_id"]].update({k: v for k, v in row.items() if v is not None and k != "event"},
                                       end=row["time"])
    return sorted(runs.values(), key=lambda r: (r["start"], r["run_id"]))


def lease_age(fs, path: str) -> float | None:
    try:
        with fs.open(path, "rb") as f:
            beat = datetime.datetime.fromisoformat(json.loads(f.read())["heartbeat"])
    except (FileNotFoundError, OSError, ValueError, KeyError):
        return None
    return (_now() - beat).total_seconds()


class Lease:
    """A heartbeat file refreshed from a background thread while a run is alive."""

    def __init__(self, fs, path: str, every_s: float):
        self.fs, self.path, self.every_s = fs, path, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _write(self) -> None:
        body = {"heartbeat": _now().isoformat(), "host": socket.gethostname(), "pid": os.getpid()}
        atomic_write(self.fs, self.path, json.dumps(body).encode())

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self._write()
            except Exception:  # a missed beat is retried; a run is stale only after stale_after_s
                pass

    def start(self) -> None:
        self._write()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.fs.rm(self.path)
        except FileNotFoundError:
            pass
