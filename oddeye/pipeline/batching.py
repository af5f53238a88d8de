"""The batcher: gathers frames from all sources into model batches.

A batch is released when it is full (``max_batch_size``) or when its oldest frame has
waited ``max_wait_ms``, whichever comes first: full batches for throughput under load,
bounded waiting for latency when traffic is light. Frames keep their arrival order, so
each camera's frames reach the model (and the alert logic) in sequence.
"""

from __future__ import annotations

import time
from collections import deque

from oddeye.frames import Frame


class Batcher:
    def __init__(self, max_batch_size: int, max_wait_ms: float) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self._frames: deque[tuple[float, Frame]] = deque()

    def __len__(self) -> int:
        return len(self._frames)

    def add(self, frames: list[Frame], now: float | None = None) -> None:
        t = time.monotonic() if now is None else now
        self._frames.extend((t, f) for f in frames)

    def requeue(self, frames: list) -> None:
        """Put frames back at the front, ready at once (a batch whose model replica crashed)."""
        self._frames.extendleft((0.0, f) for f in reversed(frames))

    def ready(self, now: float | None = None, flush: bool = False) -> bool:
        """A batch can go: full, waited long enough, or ``flush`` (draining) with anything queued."""
        if not self._frames:
            return False
        if flush or len(self._frames) >= self.max_batch_size:
            return True
        t = time.monotonic() if now is None else now
        return t - self._frames[0][0] >= self.max_wait_s

    def time_to_ready(self, now: float | None = None) -> float | None:
        """Seconds until the oldest frame's wait runs out (None when empty)."""
        if not self._frames:
            return None
        t = time.monotonic() if now is None else now
        return max(0.0, self._frames[0][0] + self.max_wait_s - t)

    def pop(self) -> list[Frame]:
        n = min(self.max_batch_size, len(self._frames))
        return [self._frames.popleft()[1] for _ in range(n)]
