"""Capture once, replay after: the decoding stages as CUDA graphs.

A stage is a plain function of the decode state that reads and writes only the state's own
tensors, with fixed shapes and no host synchronisation. With graphs on (a CUDA device), its first
run warms it up on a side stream, then captures it; every later run replays the captured kernels
with one launch. Off (CPU, or `cuda_graphs=False`), it is simply called. One switch, one code path.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Hashable

import torch


@contextlib.contextmanager
def _no_collection():
    """No cyclic garbage collection while a graph is captured: a collected CUDA graph (an old
    state's, an engine's that a traceback kept) is destroyed then, which a capture does not permit,
    and the capture fails ("operation failed due to a previous error during capture")."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Stages:
    """Captured stages of one decode state, by key. `snapshot` returns a function that restores the
    state's small tensors: the warm-up run really executes, and must leave no trace."""

    def __init__(self, enabled: bool, snapshot: Callable[[], Callable[[], None]]):
        self.enabled = enabled
        self.snapshot = snapshot
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        # Stages share one memory pool: whatever one stage hands to the next lives in the state's own
        # tensors, so a stage's scratch memory may be reused by any other.
        self.pool = torch.cuda.graph_pool_handle() if enabled else None

    def run(self, key: Hashable, stage: Callable[[], None]) -> None:
        if not self.enabled:
            stage()
            return
        self.capture(key, stage)
        self.graphs[key].replay()

    def capture(self, key: Hashable, stage: Callable[[], None]) -> None:
        """Capture `stage` under `key` now (if graphs are on and it is not captured yet)."""
        if self.enabled and key not in self.graphs:
            self.graphs[key] = self._capture(stage)

    @staticmethod
    def seconds(fn: Callable[[], None], reps: int = 5) -> float:
        """GPU seconds per replay of `fn` captured on its own (a throwaway graph; `fn` runs once
        eagerly first, so it must be harmless to run)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with _no_collection(), torch.cuda.graph(graph):
            fn()
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps / 1e3

    def _capture(self, stage: Callable[[], None]) -> torch.cuda.CUDAGraph:
        restore = self.snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            stage()  # warm-up: lazy initialisation (cuBLAS handles, kernels) outside the capture
        torch.cuda.current_stream().wait_stream(side)
        restore()
        graph = torch.cuda.CUDAGraph()
        with _no_collection(), torch.cuda.graph(graph, pool=self.pool):
            stage()
        return graph


class PromptGraphs:
    """A group's prompt forwards (both models' prompts, their keys into the caches, the first
    tokens) captured once per input shapes and replayed: an eager prompt forward costs about as
    much host time to launch as the GPU spends on it, time the decoding loop (same thread) waits.

    `run(fn, rows, index)` copies the rows' tensors and the slots into the graph's static copies,
    replays, and returns the graph's own outputs, overwritten by the next run (the caller places
    them first). Mode "cuda": CUDA graphs, in a memory pool of their own (they replay beside the
    decoding stages, on another stream); a function that cannot be captured runs eagerly, with a
    warning. Mode "static" (CPU): the same static copies and fixed outputs, `fn` re-run (what tests
    check the plumbing with). Off: `fn` runs on the rows. Groups of more than `max_rows` rows run
    eagerly (their launch cost is shared by many rows; their graphs would hold much memory)."""

    def __init__(self, mode: str, max_rows: int = 4):
        self.mode, self.max_rows = mode, max_rows
        self.captured: dict[Hashable, tuple | None] = {}
        self.pool = torch.cuda.graph_pool_handle() if mode == "cuda" else None
        self.replays = self.eager = 0
        self.failures: list[str] = []

    def summary(self) -> dict:
        """What ran how: shapes captured, groups replayed, groups run eagerly, capture failures."""
        return {"mode": self.mode, "shapes": sum(e is not None for e in self.captured.values()),
                "replays": self.replays, "eager": self.eager, "failures": list(self.failures)}

    @staticmethod
    def key(rows: list[dict]) -> tuple:
        return tuple(tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(r.items()) if isinstance(v, torch.Tensor))
                     for r in rows)

    def run(self, fn: Callable, rows: list[dict], index: torch.Tensor, enabled: bool = True):
        """`enabled` False: `fn` runs eagerly this time (the captures are kept)."""
        if not enabled or self.mode == "off" or len(rows) > self.max_rows:
            self.eager += 1
            return fn(rows, index)
        key = self.key(rows)
        if key not in self.captured:
            self.captured[key] = self._capture(fn, rows, index)
        entry = self.captured[key]
        if entry is None:
            self.eager += 1
            return fn(rows, index)
        self.replays += 1
        replay, static_rows, static_index, out = entry
        for static, row in zip(static_rows, rows):
            for k, v in row.items():
                if isinstance(v, torch.Tensor):
                    static[k].copy_(v)
        static_index.copy_(index)
        replay()
        return out

    def _capture(self, fn: Callable, rows: list[dict], index: torch.Tensor) -> tuple | None:
        static_rows = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in r.items()} for r in rows]
        static_index = index.clone()
        if self.mode == "static":
            out = fn(static_rows, static_index)
            return (lambda: _copy_into(out, fn(static_rows, static_index))), static_rows, static_index, out
        # Captured on a side stream (capture needs a non-default stream), ordered after and before
        # the caller's; replayed on the caller's.
        caller, side = torch.cuda.current_stream(), torch.cuda.Stream()
        side.wait_stream(caller)
        try:
            with torch.cuda.stream(side):
                fn(static_rows, static_index)  # warm-up (lazy initialisation); writes only the slots being filled
                graph = torch.cuda.CUDAGraph()
                with _no_collection(), torch.cuda.graph(graph, pool=self.pool, stream=side,
                                                        capture_error_mode="thread_local"):
                    out = fn(static_rows, static_index)
        except RuntimeError as e:
            import warnings

            self.failures.append(f"{len(rows)} rows: {e}"[:300])
            warnings.warn(f"lvspec: a prompt forward could not be captured, it runs eagerly: {e}", stacklevel=2)
            return None
        finally:
            caller.wait_stream(side)
        return graph.replay, static_rows, static_index, out


def _copy_into(fixed, fresh) -> None:
    """Copy every tensor of `fresh` into the same place in `fixed` (tensors, dataclasses, tuples)."""
    if isinstance(fixed, torch.Tensor):
        fixed.copy_(fresh)
    elif isinstance(fixed, (tuple, list)):
        for a, b in zip(fixed, fresh):
            _copy_into(a, b)
    elif hasattr(fixed, "__dataclass_fields__"):
        for name in fixed.__dataclass_fields__:
            _copy_into(getattr(fixed, name), getattr(fresh, name))
