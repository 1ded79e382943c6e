"""Decode stage (CPU actors): a video -> its clips' sampled frames (decord, or PyAV) -> the family's HF
processor, once per prompt: one row per (video_id, clip_index, prompt_name), the video decoded once.

Every failure (empty, truncated, not a video, unsupported codec, no frames, missing object) becomes
an `error` row (per prompt, at the first clip not captioned); nothing raised here stops the job.
"""

from __future__ import annotations

import io
import time

import pyarrow as pa

from pipeline.clips import read_clips
from pipeline.config import DecodeConfig, ModelConfig, prompts
from pipeline.frames import VideoError

# decoded_frames: the frames this row's decode produced (0 where its clip's frames were decoded for
# another prompt's row); decode_ms: its share of its video's decoding time.
DECODED = pa.schema([
    ("video_id", pa.string()), ("clip_index", pa.int32()), ("prompt_name", pa.string()), ("source_uri", pa.string()),
    ("shard", pa.string()), ("truth", pa.string()), ("error", pa.string()), ("inputs", pa.binary()),
    ("start_s", pa.float64()), ("end_s", pa.float64()), ("last_clip", pa.bool_()), ("num_frames", pa.int32()),
    ("decoded_frames", pa.int32()), ("width", pa.int32()), ("height", pa.int32()), ("decoder", pa.string()),
    ("decode_ms", pa.float64()),
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
    """Each row's video cut into clips and sampled as `decode` says, through the target's processor
    with each of the model's prompts (`model`); `source_storage_options` open videos that rows name
    by URI; pixels are handed over in `pixel_dtype` (the replica's). Yields its rows a clip at a
    time, so a long video's clips leave the actor as they are made."""

    def __init__(self, decode: DecodeConfig, model: ModelConfig, source_storage_options: dict,
                 pixel_dtype: str = "float32"):
        import torch
        from transformers import AutoProcessor

        from pipeline.models import resolve

        torch.set_num_threads(1)  # one video at a time per actor; scale with more actors
        self.processor = AutoProcessor.from_pretrained(resolve(model.target, model.cache_dir, model.storage_options))
        self.texts = {name: chat_prompt(self.processor, text) for name, text in prompts(model).items()}
        self.clips = decode.clips
        self.sampling = dict(num_frames=decode.num_frames, fps=decode.fps, max_frames=decode.max_frames,
                             max_side=decode.max_side)
        self.max_bytes = decode.max_bytes
        self.batch_size = decode.batch_size
        self.source_options = source_storage_options
        self.pixel_dtype = pixel_dtype

    def _open(self, row: dict):
        """The row's video: its bytes, or a file object on its URI (streamed where clips are cut, read whole
        for the whole video)."""
        import fsspec

        data = row["video"]
        if data is None:
            fs, path = fsspec.core.url_to_fs(row["source_uri"], **self.source_options)
            size = fs.size(path)
            if size > self.max_bytes:
                raise VideoError(f"object is {size} bytes, over decode.max_bytes={self.max_bytes}")
            return fs.open(path, "rb")
        if len(data) > self.max_bytes:
            raise VideoError(f"video is {len(data)} bytes, over decode.max_bytes={self.max_bytes}")
        return io.BytesIO(data)

    def _rows(self, row: dict):
        """The rows of one source row: each clip once per prompt, then (if decoding failed) an error row
        per prompt at the first clip not made."""
        base = {k: v for k, v in row.items() if k != "video"} | dict(
            inputs=None, clip_index=0, start_s=None, end_s=None, last_clip=True, num_frames=None, decoded_frames=0,
            width=None, height=None, decoder=None)
        mark, index = time.perf_counter(), 0
        if row["error"] is None:
            try:
                with self._open(row) as source:
                    for clip in read_clips(source, self.clips, **self.sampling):
                        made = [(name, pack(self.processor(text=[text], videos=[clip.frames], return_tensors="pt"),
                                            self.pixel_dtype)) for name, text in self.texts.items()]
                        now = time.perf_counter()
                        for n, (name, inputs) in enumerate(made):
                            yield base | dict(
                                clip_index=clip.index, prompt_name=name, inputs=inputs, start_s=clip.start_s,
                                end_s=clip.end_s, last_clip=clip.last, num_frames=len(clip.frames),
                                decoded_frames=len(clip.frames) if n == 0 else 0, width=clip.meta["width"],
                                height=clip.meta["height"], decoder=clip.meta["decoder"],
                                decode_ms=(now - mark) * 1e3 / len(made))
                        mark, index = now, clip.index + 1
                return
            except FileNotFoundError:
                base["error"] = f"source: object not found: {row['source_uri']}"
            except VideoError as e:
                base["error"] = f"decode: {e}"
            except Exception as e:  # a bad video must not take the job down
                base["error"] = f"decode: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        for name in self.texts:
            yield base | dict(clip_index=index, prompt_name=name,
                              decode_ms=(time.perf_counter() - mark) * 1e3 / len(self.texts))

    def __call__(self, batch: pa.Table):
        out = []
        for row in batch.to_pylist():
            for made in self._rows(row):
                out.append(made)
                if len(out) >= self.batch_size:
                    yield pa.Table.from_pylist(out, schema=DECODED)
                    out = []
        if out:
            yield pa.Table.from_pylist(out, schema=DECODED)
