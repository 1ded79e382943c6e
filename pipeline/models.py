"""Where models come from: an HF id, a local directory, or an s3:// (any fsspec) URI.

Remote directories are copied to a local cache once per node; concurrent actors on a node wait
on a file lock instead of downloading the same weights twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

import fsspec


def resolve(uri: str, cache_dir: str = "~/.cache/lvspec/models", storage_options: dict | None = None) -> str:
    """A path or id that `from_pretrained` can load: local dirs as they are, remote dirs synced."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" not in uri:
        path = Path(uri).expanduser()
        return str(path.resolve()) if path.exists() else uri  # not a local dir: an HF hub id
    root = Path(cache_dir).expanduser() / hashlib.sha256(uri.encode()).hexdigest()[:20]
    done = root / ".complete"
    if done.exists():
        return str(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node; others wait, then reuse it
        if not done.exists():
            fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
            files = [f for f in fs.find(path) if not f.endswith("/")]
            if not files:
                raise FileNotFoundError(f"no model files under {uri}")
            for remote in files:
                local = root / os.path.relpath(remote, path)
                local.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(remote, str(local))
            done.touch()
    return str(root)
