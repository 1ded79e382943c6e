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

import threading
import time

import pyarrow as pa

from lvspec.config import shipped_settings
from pipeline.config import GenerationConfig, spec_config
from pipeline.decode import DECODED

STATS = ("num_cycles", "target_forwards", "draft_forwards", "accepted_exact", "accepted_loose",
         "accepted_shift", "corrections", "bonus", "rejected_anchor", "drafted")
CAPTIONED = pa.schema(
    [f for f in DECODED if f.name != "inputs"]
    + [("caption", pa.string()), ("num_tokens", pa.int32()), ("mode", pa.string()), ("target_model", pa.string()),
       ("draft_model", pa.string()), ("mean_accepted_length", pa.float64()), ("mean_draft_length", pa.float64()),
       ("finished_by", pa.string())]
    + [(name, pa.int32()) for name in STATS]
    + [("generate_ms", pa.float64()), ("batch_rows", pa.int32()), ("config_hash", pa.string()), ("job_id", pa.string())]
)

class CaptionStage:
    def __init__(self, target: str, draft: str | None, dtype: str, cache_dir: str, storage_options: dict,
                 generation: GenerationConfig, job_id: str, config_hash: str, num_cpus: float, slots: int):
        import torch
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        from lvspec import Engine, RowFeed
        from pipeline.models import resolve

        torch.set_num_threads(max(1, int(num_cpus)))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32, "float32": torch.float32,
                       "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        load = lambda uri: AutoModelForImageTextToText.from_pretrained(  # noqa: E731
            resolve(uri, cache_dir, storage_options), dtype=torch_dtype).to(device).eval()
        target_dir = resolve(target, cache_dir, storage_options)
        self.tokenizer = AutoTokenizer.from_pretrained(target_dir)
        self.target = load(target)
        self.draft = load(draft) if draft and generation.mode != "ar" else None
        self.spec = spec_config(generation, shipped_settings(target_dir))
        self.engine = Engine(self.target, self.draft, self.spec, slots=slots)
        self.fixed = {"mode": generation.mode, "target_model": target, "draft_model": draft if self.draft else None,
                      "config_hash": config_hash, "job_id": job_id}
        self.feed = RowFeed()
        self.busy_ms: dict[int, float] = {}  # per row: its share of the thread's decoding time
        threading.Thread(target=self._decode, name="lvspec-decode", daemon=True).start()

    def _decode(self) -> None:
        """The one thread that runs the engine: stream whatever the feed holds, for the actor's life.
        Each finished row is charged the decoding time since the previous one finished (time spent
        waiting for input aside), so the rows' shares add up to the replica's busy time."""
        while True:
            mark, waited = time.perf_counter(), self.feed.waited_s
            try:
                for key, result in self.engine.stream(self.feed, tokenizer=self.tokenizer):
                    now = time.perf_counter()
                    self.busy_ms[key] = (now - mark - (self.feed.waited_s - waited)) * 1e3
                    mark, waited = now, self.feed.waited_s
                    self.feed.resolve(key, result)
                return  # the feed was closed
            except Exception:
                for key, row in self.feed.in_flight():  # whoever failed, fails alone
                    start = time.perf_counter()
                    try:
                        result = self.engine.generate([row], tokenizer=self.tokenizer)[0]
                    except Exception as e:
                        result = e
                    self.busy_ms[key] = (time.perf_counter() - start) * 1e3
                    self.feed.resolve(key, result)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from safetensors.torch import load

        rows = batch.to_pylist()
        ready = [r for r in rows if r["error"] is None]
        futures = [self.feed.submit(load(r["inputs"])) for r in ready]
        for row, future in zip(ready, futures):
            try:
                res = future.result()
            except Exception as e:
                res = e
            share = self.busy_ms.pop(future.key, None)
            if isinstance(res, Exception):
                row["error"] = f"caption: {type(res).__name__}: {str(res).splitlines()[0][:300] if str(res) else ''}"
                continue
            row.update(caption=res.text, num_tokens=res.stats.num_tokens, finished_by=res.finished_by,
                       mean_accepted_length=res.stats.mean_accepted_length,
                       mean_draft_length=res.stats.mean_draft_length, generate_ms=share,
                       batch_rows=len(ready), **{k: getattr(res.stats, k) for k in STATS})
        for row in rows:
            row.pop("inputs")
            row.update(self.fixed)
        return pa.Table.from_pylist(rows, schema=CAPTIONED)
