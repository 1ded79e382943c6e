"""Caption stage (GPU actors; CPU with num_gpus=0): one replica = target + draft running lvspec.

The actor holds one `lvspec.Engine` with as many slots as a caption batch, so its decode state
and captured CUDA graphs are built once and reused for every batch. Rows that arrive with an
error pass through; a row the engine cannot caption gets an error of its own without failing
its batch.
"""

from __future__ import annotations

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
                 generation: GenerationConfig, job_id: str, config_hash: str, num_cpus: float, batch_size: int):
        import torch
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        from lvspec import Engine
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
        self.engine = Engine(self.target, self.draft, self.spec, slots=batch_size)
        self.fixed = {"mode": generation.mode, "target_model": target, "draft_model": draft if self.draft else None,
                      "config_hash": config_hash, "job_id": job_id}

    def _generate(self, inputs: list[dict]):
        """Generate for the batch; if the batch fails, row by row, so one bad row fails alone."""
        try:
            return self.engine.generate(inputs, tokenizer=self.tokenizer)
        except Exception:
            results = []
            for row in inputs:
                try:
                    results += self.engine.generate([row], tokenizer=self.tokenizer)
                except Exception as e:
                    results.append(e)
            return results

    def __call__(self, batch: pa.Table) -> pa.Table:
        from safetensors.torch import load

        rows = batch.to_pylist()
        ready = [r for r in rows if r["error"] is None]
        start = time.perf_counter()
        results = self._generate([load(r["inputs"]) for r in ready]) if ready else []
        share = (time.perf_counter() - start) * 1e3 / max(len(ready), 1)  # each row's share of the call
        for row, res in zip(ready, results):
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
