"""Rows handed to a running `Engine.stream` from other threads, each answered through its own future.

    feed = RowFeed()
    threading.Thread(target=lambda: [feed.resolve(k, out) for k, out in engine.stream(feed)]).start()
    future = feed.submit(row)        # from any thread; future.result() is its RowOutput

The stream takes rows only when it has free slots, and waits for one only when it has nothing else
to do, so producers can keep a replica's slots full across their own batches.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future


class RowFeed:
    def __init__(self):
        self._cv = threading.Condition()
        self._rows: deque[tuple[int, dict]] = deque()
        self._taken: dict[int, dict] = {}  # handed to the stream, not yet resolved
        self._futures: dict[int, Future] = {}
        self._next = 0
        self._closed = False
        self.waited_s = 0.0  # time the stream spent waiting for rows (it had nothing to decode)

    def submit(self, row: dict) -> Future:
        with self._cv:
            if self._closed:
                raise RuntimeError("this feed is closed")
            key, self._next = self._next, self._next + 1
            future = self._futures[key] = Future()
            future.key = key  # the stream's name for this row
            self._rows.append((key, row))
            self._cv.notify_all()
        return future

    def take(self, n: int, wait: bool, timeout: float | None = None) -> list[tuple[int, dict]] | None:
        """Up to n (key, row) pairs; with `wait`, block until one comes (or `timeout` seconds pass:
        then possibly none). None: closed and empty."""
        with self._cv:
            start = time.perf_counter()
            while wait and not self._rows and not self._closed:
                left = None if timeout is None else timeout - (time.perf_counter() - start)
                if left is not None and left <= 0:
                    break
                self._cv.wait(left)
            self.waited_s += time.perf_counter() - start
            if not self._rows and self._closed:
                return None
            group = [self._rows.popleft() for _ in range(min(n, len(self._rows)))]
            self._taken.update(group)
            return group

    def resolve(self, key: int, result) -> None:
        """Answer a row: its output, or the exception it failed with."""
        with self._cv:
            self._taken.pop(key, None)
            future = self._futures.pop(key)
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    def in_flight(self) -> list[tuple[int, dict]]:
        """Rows handed to the stream and not answered (e.g. when the stream failed)."""
        with self._cv:
            return sorted(self._taken.items())

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
