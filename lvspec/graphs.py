"""Capture once, replay after: the decoding stages as CUDA graphs.

A stage is a plain function of the decode state that reads and writes only the state's own
tensors, with fixed shapes and no host synchronisation. With graphs on (a CUDA device), its first
run warms it up on a side stream, then captures it; every later run replays the captured kernels
with one launch. Off (CPU, or `cuda_graphs=False`), it is simply called. One switch, one code path.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch


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
        with torch.cuda.graph(graph):
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
        with torch.cuda.graph(graph, pool=self.pool):
            stage()
        return graph
