"""The benchmarks' one timing loop: time a callable, repeat it after warm-ups, reduce the runs.

Clocks (each benchmark keeps the one it measured with before this module; which is which is said
where it is called):

- "wall": host `time.perf_counter` around the call. On a CUDA `device` the device is synchronised
  before the clock starts and after the call returns, so the time covers the GPU work the call
  queued (wall time, launch overhead and host work included). On any other device (or None) there
  is no sync: host time alone. `Timed.host_seconds` is the time until the call returned, before
  that closing sync (what queueing the work cost the host).
- "cuda": CUDA events recorded on the current stream before and after the call, then waited for:
  the GPU time between them (no device sync first: an event is stamped when the GPU reaches it).

`back_to_back` times many calls queued one after another under a single pair of events (no sync
between calls, so the host's launches overlap the GPU's work) and gives the mean GPU time a call.

Spread, as BENCHMARKS.md states it: (max - min) / median of a measurement's runs.

    python -m bench.timing    # self-check on a GPU: the clocks against each other on a matmul
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

CLOCKS = ("wall", "cuda")


@dataclass
class Timed:
    """One timed call: `seconds` by its clock; `host_seconds`, host time until the call returned
    (before the wall clock's closing sync; with the "cuda" clock, until its end event was queued);
    and the call's `result`."""
    seconds: float
    host_seconds: float
    result: Any = None

    @property
    def ms(self) -> float:
        return self.seconds * 1e3


def _is_cuda(device) -> bool:
    if device is None:
        return False
    import torch

    return torch.device(device).type == "cuda"


def measure(fn: Callable[[], Any], clock: str = "wall", device=None) -> Timed:
    """One call of `fn` timed by `clock` ("wall": perf_counter, synchronising a CUDA `device`
    before and after; "cuda": CUDA events around it, GPU time)."""
    if clock == "cuda":
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        result = fn()
        end.record()
        host = time.perf_counter() - t0
        end.synchronize()
        return Timed(start.elapsed_time(end) / 1e3, host, result)
    if clock != "wall":
        raise ValueError(f"clock {clock!r}: one of {CLOCKS}")
    sync = _is_cuda(device)
    if sync:
        import torch

        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    host = time.perf_counter() - t0
    if sync:
        torch.cuda.synchronize()
    return Timed(time.perf_counter() - t0, host, result)


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1, clock: str = "wall", device=None) -> list[Timed]:
    """`warmup` untimed calls of `fn` (no sync around them), then `repeats` calls each timed by
    `measure(fn, clock, device)`: one `Timed` per timed call, in order."""
    for _ in range(warmup):
        fn()
    return [measure(fn, clock, device) for _ in range(repeats)]


def back_to_back(fn: Callable[[], Any], repeats: int, warmup: int = 0) -> float:
    """Mean GPU seconds a call of `fn` over `repeats` calls queued back to back (CUDA events: one
    pair around them all, the device synchronised before the first and after the last), after
    `warmup` untimed calls."""
    import torch

    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats / 1e3


def median_spread(runs: list[float]) -> tuple[float, float]:
    """The median of repeated measurements and their spread, (max - min) / median (0.0 when the
    median is 0)."""
    mid = statistics.median(runs)
    return mid, (max(runs) - min(runs)) / mid if mid else 0.0


def self_check(size: int = 4096, repeats: int = 20) -> dict:
    """This module's clocks on one bf16 matmul, milliseconds a call (on a CPU: the wall clock alone).
    `back_to_back` is the GPU's time; the "cuda" clock adds the gap before one launch's kernel, the
    synchronised wall clock a sync and a launch besides: fixed costs, printed as overheads. On an
    H100 at 4096 (2026-12-06): 0.174 ms back to back (790 TFLOP/s), +14 us by events, +96 us on
    the wall clock: why stages under a millisecond are timed back to back or by events."""
    import torch

    cuda = torch.cuda.is_available()
    a = torch.randn(size, size, device="cuda" if cuda else "cpu", dtype=torch.bfloat16 if cuda else torch.float32)

    def fn():
        return a @ a

    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "size": size}
    out["wall_ms"] = median_spread([t.ms for t in timed(fn, 5, warmup=2, device=a.device)])[0]
    if cuda:
        out["back_to_back_ms"] = back_to_back(fn, repeats, warmup=2) * 1e3
        out["cuda_clock_ms"] = median_spread([t.ms for t in timed(fn, 5, warmup=1, clock="cuda")])[0]
        out["tflops_back_to_back"] = 2 * size**3 / out["back_to_back_ms"] / 1e9
        out["cuda_clock_overhead_us"] = 1e3 * (out["cuda_clock_ms"] - out["back_to_back_ms"])
        out["wall_overhead_us"] = 1e3 * (out["wall_ms"] - out["back_to_back_ms"])
    return out


if __name__ == "__main__":
    print(self_check())
