"""Decode stage (CPU actors): video bytes -> sampled frames (decord) -> the family's HF processor.

Every failure (empty, truncated, not a video, unsupported codec, no frames, missing object) becomes
the row's `error`; nothing raised here stops the job.
"""

from __future__ import annotations

import time

import pyarrow as pa

from pipeline.frames import VideoError, read_frames

DECODED = pa.schema([
    ("video_id", pa.string()), ("source_uri", pa.string()), ("shard", pa.string()), ("truth", pa.string()),
    ("error", pa.string()), ("inputs", pa.binary()), ("num_frames", pa.int32()), ("width", pa.int32()),
    ("height", pa.int32()), ("decode_ms", pa.float64()),
])


def chat_prompt(processor, prompt: str) -> str:
    """The chat-formatted text for one video and one instruction, in the family's own template."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class DecodeStage:
    def __init__(self, model_uri: str, cache_dir: str, model_storage_options: dict, prompt: str,
                 num_frames: int, fps: float | None, max_frames: int, max_side: int, max_bytes: int,
                 source_storage_options: dict):
        import torch
        from transformers import AutoProcessor

        from pipeline.models import resolve

        torch.set_num_threads(1)  # one video at a time per actor; scale with more actors
        self.processor = AutoProcessor.from_pretrained(resolve(model_uri, cache_dir, model_storage_options))
        self.text = chat_prompt(self.processor, prompt)
        self.sampling = dict(num_frames=num_frames, fps=fps, max_frames=max_frames, max_side=max_side)
        self.max_bytes = max_bytes
        self.source_options = source_storage_options

    def _fetch(self, uri: str) -> bytes:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri, **self.source_options)
        size = fs.size(path)
        if size > self.max_bytes:
            raise VideoError(f"object is {size} bytes, over decode.max_bytes={self.max_bytes}")
        with fs.open(path, "rb") as f:
            return f.read()

    def _inputs(self, data: bytes) -> tuple[bytes, int, dict]:
        from safetensors.torch import save

        if len(data) > self.max_bytes:
            raise VideoError(f"video is {len(data)} bytes, over decode.max_bytes={self.max_bytes}")
        frames, meta = read_frames(data, **self.sampling)
        features = self.processor(text=[self.text], videos=[frames], return_tensors="pt")
        tensors = {k: v.contiguous() for k, v in features.items() if hasattr(v, "contiguous")}
        return save(tensors), len(frames), meta

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for row in batch.to_pylist():
            start = time.perf_counter()
            row.update(inputs=None, num_frames=None, width=None, height=None)
            if row["error"] is None:
                try:
                    data = row["video"] if row["video"] is not None else self._fetch(row["source_uri"])
                    row["inputs"], row["num_frames"], meta = self._inputs(data)
                    row["width"], row["height"] = meta["width"], meta["height"]
                except FileNotFoundError:
                    row["error"] = f"source: object not found: {row['source_uri']}"
                except VideoError as e:
                    row["error"] = f"decode: {e}"
                except Exception as e:  # a bad video must not take the job down
                    row["error"] = f"decode: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            row["decode_ms"] = (time.perf_counter() - start) * 1e3
            row.pop("video")
            out.append(row)
        return pa.Table.from_pylist(out, schema=DECODED)
