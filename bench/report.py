"""What every benchmark writes: its command, machine and date, and its block of BENCHMARKS.md."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys
from pathlib import Path

import torch

from toyworld import families


def write_markdown_section(path: Path, body: str, tag: str = "toyworld-bench",
                           title: str = "Toy world: ar / sd / lvspec") -> None:
    """Replace the generated block `tag` of a markdown file (append it under `title` the first time)."""
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n{block}\n"
    path.write_text(text)


def merge_previous(path: Path, results: list[dict]) -> list[dict]:
    """`results` plus the families of an earlier run's JSON at `path` that `results` lacks.

    Either file shape works: the benchmark's `{"families": {name: result}}` or the evaluation's
    list of results (one per family and filler entropy). One family per command is allowed.
    """
    earlier = json.loads(path.read_text()) if path.exists() else []
    if isinstance(earlier, dict):
        earlier = list(earlier["families"].values()) if "families" in earlier else [earlier]
    fresh = {r["family"] for r in results}
    kept = [r for r in earlier if r.get("family") in families.FAMILIES and r["family"] not in fresh]
    return sorted(kept + results, key=lambda r: families.FAMILIES.index(r["family"]))


def run_info(module: str, argv) -> dict:
    """Command line, machine and date of this run, for the JSON and the markdown."""
    return {"command": f"python -m {module} " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine(), "date": datetime.date.today().isoformat()}


def machine() -> str:
    """The GPU (if any) or the CPU a run used, with the library versions that matter for speed."""
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, {versions}, {platform.machine()}"
    return f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}, {versions} " \
           f"({torch.get_num_threads()} threads), CPU"
