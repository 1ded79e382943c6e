"""Sources: one row per video from any fsspec URI, through Ray Data's own readers.

    WebDataset tar shards (<key>.mp4 + optional <key>.json)  -> ray.data.read_webdataset
    plain video files under a prefix                         -> their URIs (the decode stage reads them)
    a manifest (.parquet / .jsonl with video_id, uri)        -> ray.data.read_parquet / read_json

Every reader's rows are normalised to: video_id, source_uri, shard, video (bytes, or null when the
decode stage fetches it from source_uri), truth (the sample's .json, if any), error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.config import SourceConfig

MANIFEST_SUFFIXES = (".parquet", ".jsonl", ".json")
COLUMNS = ("video_id", "source_uri", "shard", "video", "truth", "error")


def filesystem(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of a URI (or local path) and the path inside it."""
    return fsspec.core.url_to_fs(uri, **(storage_options or {}))


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """Ray's readers and writers take pyarrow filesystems; wrap fsspec's (s3fs keeps its endpoint options)."""
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def detect_format(cfg: SourceConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    if cfg.uri.endswith(MANIFEST_SUFFIXES):
        return "manifest"
    fs, root = filesystem(cfg.uri, cfg.storage_options)
    return "webdataset" if any(p.endswith(".tar") for p in fs.find(root)) else "files"


def _rows(batch: pa.Table) -> list[dict]:
    return batch.to_pylist()


def _normalised(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("video_id", pa.string()), ("source_uri", pa.string()), ("shard", pa.string()),
        ("video", pa.binary()), ("truth", pa.string()), ("error", pa.string())]))


def _present(value) -> bool:
    """Whether a webdataset member is there (absent members of a block read back as None or NaN)."""
    return isinstance(value, (bytes, bytearray, str, dict, list))


def _from_webdataset(batch: pa.Table, fs, extensions: list[str]) -> pa.Table:
    """A tar sample -> one row; a sample without a video member becomes an error row."""
    out = []
    for r in _rows(batch):
        shard = fs.unstrip_protocol(r["__url__"])
        ext = next((e for e in extensions if _present(r.get(e))), None)
        truth = r.get("json") if _present(r.get("json")) else None
        if isinstance(truth, bytes):
            truth = truth.decode("utf-8", "replace")
        elif truth is not None:
            truth = json.dumps(truth, sort_keys=True)
        members = sorted(k for k, v in r.items() if not k.startswith("__") and k != "path" and _present(v))
        member = ext or (members[0] if members else "")
        out.append({
            "video_id": r["__key__"], "source_uri": f"{shard}#{r['__key__']}.{member}",
            "shard": shard, "video": r.get(ext) if ext else None, "truth": truth,
            "error": None if ext else f"no video member in tar sample (members: {', '.join(members) or 'none'})",
        })
    return _normalised(out)


def _from_files(batch: pa.Table, fs, root: str) -> pa.Table:
    out = []
    for r in _rows(batch):
        rel = r["path"][len(root) + 1:] if r["path"].startswith(root + "/") else r["path"]
        out.append({"video_id": rel.rsplit(".", 1)[0], "source_uri": fs.unstrip_protocol(r["path"]),
                    "shard": None, "video": None, "truth": None, "error": None})
    return _normalised(out)


def _from_manifest(batch: pa.Table) -> pa.Table:
    out = []
    for r in _rows(batch):
        vid, uri = r.get("video_id"), r.get("uri")
        error = None if vid and uri else "manifest row needs video_id and uri"
        out.append({"video_id": str(vid or uri or ""), "source_uri": uri, "shard": None, "video": None,
                    "truth": None if r.get("truth") is None else str(r["truth"]), "error": error})
    return _normalised(out)


EXAMPLES = 5  # not-taken files named in a summary
FILE_BLOCKS = 1024


@dataclass
class Source:
    """A source opened for reading: its rows (a lazy Ray Dataset) and the files under its prefix
    that are no input to this job (`not_taken`: count, by extension, a few examples)."""
    dataset: object
    not_taken: dict


def _not_taken(fs, paths: list[str]) -> dict:
    by_extension: dict[str, int] = {}
    for p in paths:
        name = p.rsplit("/", 1)[-1]
        ext = name.rsplit(".", 1)[-1].lower() if "." in name else "(none)"
        by_extension[ext] = by_extension.get(ext, 0) + 1
    return {"count": len(paths), "by_extension": dict(sorted(by_extension.items())),
            "examples": [fs.unstrip_protocol(p) for p in sorted(paths)[:EXAMPLES]]}


def read(cfg: SourceConfig, max_bytes: int) -> Source:
    """The source's normalised rows (see module docstring) and what under it is not taken."""
    import ray

    fs, root = filesystem(cfg.uri, cfg.storage_options)
    # fsspec shares filesystem instances and their listings within a process: a driver that runs
    # another job (a later night) must see the source as it is now.
    fs.invalidate_cache()
    fmt = detect_format(cfg)
    arrow_fs = arrow_filesystem(fs)
    untaken: list[str] = []
    args = dict(filesystem=arrow_fs, ray_remote_args={"num_cpus": cfg.num_cpus})
    if fmt == "manifest":
        reader = ray.data.read_parquet if root.endswith(".parquet") else ray.data.read_json
        ds = reader([root], **args).map_batches(_from_manifest, batch_format="pyarrow", num_cpus=cfg.num_cpus)
    elif fmt == "webdataset":
        found = fs.find(root)
        shards = sorted(p for p in found if p.endswith(".tar"))
        untaken = [p for p in found if not p.endswith(".tar")]
        if not shards:
            raise FileNotFoundError(f"source.uri {cfg.uri!r} holds no .tar shards")
        # A block per shard at least: shards stream independently, and output commits as they finish.
        ds = ray.data.read_webdataset(shards, decoder=False, override_num_blocks=len(shards), **args).map_batches(
            _from_webdataset, fn_kwargs={"fs": fs, "extensions": cfg.video_extensions}, batch_format="pyarrow",
            num_cpus=cfg.num_cpus)
    elif fmt == "files":
        found = fs.find(root, detail=True)
        extensions = {e.lower().lstrip(".") for e in cfg.video_extensions}
        files = sorted(p for p in found if p.rsplit(".", 1)[-1].lower() in extensions)
        untaken = sorted(set(found) - set(files))
        too_big = [p for p in files if found[p].get("size", 0) > max_bytes]
        files = [p for p in files if p not in too_big]
        if not files and not too_big:
            others = ", ".join(untaken[:EXAMPLES]) or "none"
            raise FileNotFoundError(f"source.uri {cfg.uri!r} holds no video files ({', '.join(cfg.video_extensions)}); "
                                    f"{len(untaken)} other files, e.g. {others}")
        parts = []
        if files:
            # Rows name their files; the decode stage reads each (streams it, where clips are cut), so no
            # video's bytes wait in the object store. A block per file (up to FILE_BLOCKS): files stream
            # independently, and output commits as they finish.
            parts.append(ray.data.from_items([{"path": p} for p in files],
                                             override_num_blocks=min(len(files), FILE_BLOCKS)).map_batches(
                _from_files, fn_kwargs={"fs": fs, "root": root.rstrip("/")}, batch_format="pyarrow",
                num_cpus=cfg.num_cpus))
        if too_big:  # never read: one error row each
            parts.append(ray.data.from_arrow(_normalised([
                {"video_id": p[len(root) + 1:].rsplit(".", 1)[0], "source_uri": fs.unstrip_protocol(p),
                 "shard": None, "video": None, "truth": None,
                 "error": f"file is {found[p]['size']} bytes, over decode.max_bytes={max_bytes}"} for p in too_big])))
        ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    else:
        raise ValueError(f"source.format {fmt!r} unknown")
    return Source(ds.limit(cfg.limit) if cfg.limit else ds, _not_taken(fs, untaken))
