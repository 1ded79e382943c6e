"""Decode stage (CPU actors): video bytes -> sampled frames (decord, or PyAV) -> the family's HF processor.

Every failure (empty, truncated, not a video, unsupported codec, no frames, missing object) becomes
the row's `error`; nothing raised here stops the job.
"""

from __future__ import annotations

import time

import pyarrow as pa

from pipeline.config import DecodeConfig, ModelConfig
from pipeline.frames import VideoError, read_frames

DECODED = pa.schema([
    ("video_id", pa.string()), ("source_uri", pa.string()), ("shard", pa.string()), ("truth", pa.string()),
    ("error", pa.string()), ("inputs", pa.binary()), ("num_frames", pa.int32()), ("width", pa.int32()),
    ("height", pa.int32()), ("decoder", pa.string()), ("decode_ms", pa.float64()),
])


def chat_prompt(processor, prompt: str) -> str:
    """The chat-formatted text for one video and one instruction, in the family's own template."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def pack(features: dict, pixel_dtype: str) -> bytes:
    """A row's processor outputs as safetensors bytes, pixels in the replica's dtype."""
    import torch
    from safetensors.torch import save

    cast = getattr(torch, pixel_dtype)
    return save({k: (v.to(cast) if k.startswith("pixel_values") else v).contiguous()
                 for k, v in features.items() if hasattr(v, "contiguous")})


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def values(column: pa.ChunkedArray) -> list[pa.Buffer | None]:
    """Each value of a binary column as a view of the column's memory (indexing a column, or
    to_pylist, copies each value: tens of MB a row for pixels)."""
    import numpy as np

    out = []
    for chunk in column.chunks:
        _, offsets, data = chunk.buffers()
        width = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        offsets = np.frombuffer(offsets, dtype=width)[chunk.offset:chunk.offset + len(chunk) + 1]
        null = chunk.is_null().to_pylist()
        out += [None if null[i] else data.slice(int(offsets[i]), int(offsets[i + 1] - offsets[i]))
                for i in range(len(chunk))]
    return out


def unpack(buf: pa.Buffer) -> dict:
    """`pack`'s tensors as views of `buf` (safetensors.torch.load copies each twice, under the GIL);
    a tensor whose bytes are not aligned for its dtype is copied once."""
    import json
    import warnings

    import torch

    view = memoryview(buf)
    size = int.from_bytes(view[:8], "little")
    header = json.loads(bytes(view[8:8 + size]))
    header.pop("__metadata__", None)
    start = 8 + size
    out = {}
    for name, spec in header.items():
        dtype = getattr(torch, _SAFETENSORS_DTYPES[spec["dtype"]])
        lo, hi = spec["data_offsets"]
        data = view[start + lo:start + hi]
        if (buf.address + start + lo) % dtype.itemsize:
            data = bytearray(data)
        with warnings.catch_warnings():  # Arrow memory is read-only; nothing writes to these tensors
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(data, dtype=dtype) if hi > lo else torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(spec["shape"])
    return out


class DecodeStage:
    """Frames of each row's video, sampled as `decode` says, through the target's processor with the
    model's prompt (`model`); `source_storage_options` open videos that rows name by URI; pixels are
    handed over in `pixel_dtype` (the replica's)."""

    def __init__(self, decode: DecodeConfig, model: ModelConfig, source_storage_options: dict,
                 pixel_dtype: str = "float32"):
        import torch
        from transformers import AutoProcessor

        from pipeline.models import resolve

        torch.set_num_threads(1)  # one video at a time per actor; scale with more actors
        self.processor = AutoProcessor.from_pretrained(resolve(model.target, model.cache_dir, model.storage_options))
        self.text = chat_prompt(self.processor, model.prompt)
        self.sampling = dict(num_frames=decode.num_frames, fps=decode.fps, max_frames=decode.max_frames,
                             max_side=decode.max_side)
        self.max_bytes = decode.max_bytes
        self.source_options = source_storage_options
        self.pixel_dtype = pixel_dtype

    def _fetch(self, uri: str) -> bytes:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri, **self.source_options)
        size = fs.size(path)
        if size > self.max_bytes:
            raise VideoError(f"object is {size} bytes, over decode.max_bytes={self.max_bytes}")
        with fs.open(path, "rb") as f:
            return f.read()

    def _inputs(self, data: bytes) -> tuple[bytes, int, dict]:
        if len(data) > self.max_bytes:
            raise VideoError(f"video is {len(data)} bytes, over decode.max_bytes={self.max_bytes}")
        frames, meta = read_frames(data, **self.sampling)
        features = self.processor(text=[self.text], videos=[frames], return_tensors="pt")
        return pack(features, self.pixel_dtype), len(frames), meta

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for row in batch.to_pylist():
            start = time.perf_counter()
            row.update(inputs=None, num_frames=None, width=None, height=None, decoder=None)
            if row["error"] is None:
                try:
                    data = row["video"] if row["video"] is not None else self._fetch(row["source_uri"])
                    row["inputs"], row["num_frames"], meta = self._inputs(data)
                    row["width"], row["height"], row["decoder"] = meta["width"], meta["height"], meta["decoder"]
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
