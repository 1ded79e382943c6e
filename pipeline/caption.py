"""Caption stage (GPU actors; CPU with num_gpus=0): one replica = target + draft running lvspec.

The actor holds one `lvspec.Engine` (its decode state and captured CUDA graphs are built once)
and one decoding thread that streams rows through the engine's slots continuously. Ray Data calls
the actor with batches, two at a time (`max_concurrent_calls_per_actor`): each call hands its rows
to the thread through a `RowFeed` and waits for their captions, so while one batch's last rows
decode the next batch's rows already fill the slots they free; a replica idles only when no
input is there. Rows that arrive with an error pass through; a row the engine cannot caption
gets an error of its own without failing the rows decoded beside it (after a failure the rows in
flight are retried one at a time).
"""

from __future__ import annotations

import json
import threading
import time

import pyarrow as pa

from lvspec.stats import COUNTERS
from pipeline.config import CaptionConfig, GenerationConfig, ModelConfig
from pipeline.decode import DECODED, unpack, values
from pipeline.replica import load_engine

STATS = tuple(name for name in COUNTERS if name != "num_tokens")  # a row's counters besides its length
CAPTIONED = pa.schema(
    [f for f in DECODED if f.name != "inputs"]
    + [("caption", pa.string()), ("num_tokens", pa.int32()), ("mode", pa.string()), ("target_model", pa.string()),
       ("draft_model", pa.string()), ("mean_accepted_length", pa.float64()), ("mean_draft_length", pa.float64()),
       ("finished_by", pa.string())]
    + [(name, pa.int32()) for name in STATS]
    + [("generate_ms", pa.float64()), ("batch_rows", pa.int32()), ("audit_caption", pa.string()),
       ("audit_agreement", pa.float64()), ("captioned_at", pa.float64()), ("config_hash", pa.string()),
       ("job_id", pa.string()), ("load_format", pa.string()), ("acceptance_replayed", pa.bool_()),
       ("slots", pa.int32()), ("k_costs", pa.string())]
)


def replay_key(row: dict) -> int:
    """A row's replay key: its replayed record and length follow the (video, clip, prompt), not the order
    rows arrive in (a whole video's default prompt keys on its video_id alone, as before clips)."""
    import hashlib

    key = row["video_id"]
    if (row.get("clip_index") or 0, row.get("prompt_name") or "default") != (0, "default"):
        key = f"{key}#{row['clip_index']}#{row['prompt_name']}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:7], "big")


class CaptionStage:
    def __init__(self, model: ModelConfig, generation: GenerationConfig, caption: CaptionConfig, job_id: str,
                 config_hash: str, audit_fraction: float = 0.0):
        from lvspec import Replay, RowFeed

        # Audit twins only where captions are loosened (ar and sd captions are exact already) by the
        # pair itself (a replayed twin would replay the same acceptance).
        self.audit_fraction = audit_fraction if generation.mode == "lvspec" and not generation.replay else 0.0
        # slots=auto: at most what a replica holds, two calls of batch_size rows (and their audit twins).
        held = 2 * caption.batch_size * (2 if self.audit_fraction else 1)
        load = dict(model=model, generation=generation, num_cpus=caption.num_cpus,
                    slots=caption.slots or caption.batch_size, max_slots=held if caption.slots == "auto" else None)
        self.peers = None
        if caption.tensor_parallel > 1:  # this actor is rank 0; it starts and watches ranks 1..N-1
            from pipeline.peers import Peers

            self.peers = Peers(caption.tensor_parallel, load)
        self.engine, self.tokenizer = load_engine(**load, world=caption.tensor_parallel)
        # Benchmarks: a trained pair's acceptance replayed on (random-weight) models.
        self.replay = Replay.from_file(generation.replay, self.engine.adapter.family, generation.mode,
                                       generation.replay_lengths) if generation.replay else None
        self.static = caption.batching == "static"
        self.fixed = {"mode": generation.mode, "target_model": model.target,
                      "draft_model": model.draft if self.engine.draft is not None else None,
                      "config_hash": config_hash, "job_id": job_id, "load_format": model.load_format,
                      "acceptance_replayed": self.replay is not None}
        self.feed = RowFeed()
        # Per row: its share of the thread's decoding time (ms) and when its caption was ready (Unix time).
        self.finished: dict[int, tuple[float, float]] = {}
        threading.Thread(target=self._decode, name="lvspec-decode", daemon=True).start()

    def _decode(self) -> None:
        """The one thread that runs the engine: stream whatever the feed holds, for the actor's life.
        Each finished row is charged the decoding time since the previous one finished (time spent
        waiting for input aside), so the rows' shares add up to the replica's busy time."""
        while True:
            mark, waited = time.perf_counter(), self.feed.waited_s
            try:
                for key, result in self.engine.stream(self.feed, tokenizer=self.tokenizer, replay=self.replay,
                                                      static=self.static):
                    now = time.perf_counter()
                    self.finished[key] = ((now - mark - (self.feed.waited_s - waited)) * 1e3, time.time())
                    mark, waited = now, self.feed.waited_s
                    self.feed.resolve(key, result)
                return  # the feed was closed
            except Exception:
                if self.peers is not None:
                    self.peers.check()  # a lost peer ends this actor (Ray restarts it): never errors for rows
                for key, row in self.feed.in_flight():  # whoever failed, fails alone
                    start = time.perf_counter()
                    try:
                        result = self.engine.generate([row], tokenizer=self.tokenizer, replay=self.replay)[0]
                    except Exception as e:
                        result = e
                    self.finished[key] = ((time.perf_counter() - start) * 1e3, time.time())
                    self.feed.resolve(key, result)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from lvspec.engine import EXACT, REPLAY_KEY
        from pipeline.audit import agreement, selected

        # The processor outputs stay in the batch's Arrow memory (`unpack` views them): a row's
        # pixels are copied once, to the GPU, by the decoding thread, not under this thread's GIL.
        packed = values(batch.column("inputs"))
        rows = batch.drop_columns(["inputs"]).to_pylist()
        ready = [i for i, r in enumerate(rows) if r["error"] is None]
        futures, twins = [], []
        for i in ready:
            inputs = unpack(packed[i]) | {REPLAY_KEY: replay_key(rows[i])}
            futures.append(self.feed.submit(inputs))
            # The audit twin decodes beside it, in a slot verified strictly: the exact caption.
            audited = selected(rows[i]["video_id"], self.audit_fraction)
            twins.append(self.feed.submit({**inputs, EXACT: True}) if audited else None)
        for i, future, twin in zip(ready, futures, twins):
            row, res = rows[i], self._result(future)
            share, done_at = self.finished.pop(future.key, (None, None))
            exact = self._result(twin) if twin is not None else None
            if twin is not None:
                self.finished.pop(twin.key, None)
            if isinstance(res, Exception):
                row["error"] = f"caption: {type(res).__name__}: {str(res).splitlines()[0][:300] if str(res) else ''}"
                continue
            row.update(caption=res.text, num_tokens=res.stats.num_tokens, finished_by=res.finished_by,
                       mean_accepted_length=res.stats.mean_accepted_length,
                       mean_draft_length=res.stats.mean_draft_length, generate_ms=share, captioned_at=done_at,
                       batch_rows=len(ready), **{k: getattr(res.stats, k) for k in STATS})
            if exact is not None and not isinstance(exact, Exception):
                row.update(audit_caption=exact.text, audit_agreement=agreement(res.text, exact.text))
        costs = json.dumps(self.engine.costs.as_dict(), sort_keys=True) if self.engine.costs is not None else None
        for row in rows:
            row.update(self.fixed, slots=self.engine.state_slots, k_costs=costs)
        return pa.Table.from_pylist(rows, schema=CAPTIONED)

    @staticmethod
    def _result(future):
        try:
            return future.result()
        except Exception as e:
            return e
