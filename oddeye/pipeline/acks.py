"""Acknowledgements: a finished frame goes back to its source only once delivery is confirmed.

At-least-once: a Kafka offset may be committed only after every frame at or below it has been
scored and written to the sinks that confirm delivery (``acknowledges = True``). Writes are
asynchronous: after writing a batch, the tracker notes each confirming sink's ``mark()`` (how
many records it had accepted); the frames are released once every such sink's ``confirmed()``
(how many of its records are delivered, in order) has reached that mark. Nothing here blocks:
an outage only makes frames wait, and ``saturated`` tells the loop to stop taking new ones.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from oddeye.sinks.base import Sink

__all__ = ["AckTracker"]


@dataclass
class _Waiting:
    marks: tuple[int, ...]
    source: int
    tokens: list[int]
    since: float


class AckTracker:
    """Frames (as source index + ingest tokens) waiting for confirming sinks, in write order."""

    def __init__(self, sinks: Sequence[Sink], max_pending: int = 50_000) -> None:
        self.sinks = [s for s in sinks if getattr(s, "acknowledges", False)]
        self.max_pending = max_pending
        self._waiting: deque[_Waiting] = deque()
        self._pending = 0

    def add(self, source: int, tokens: list[int]) -> None:
        """Frames whose results were just written to every sink (call right after the writes)."""
        if not tokens:
            return
        marks = tuple(s.mark() for s in self.sinks)
        self._waiting.append(_Waiting(marks, source, list(tokens), time.monotonic()))
        self._pending += len(tokens)

    def ready(self) -> dict[int, list[int]]:
        """Pop the frames whose writes every confirming sink has delivered, grouped by source."""
        out: dict[int, list[int]] = {}
        if not self._waiting:
            return out
        confirmed = tuple(s.confirmed() for s in self.sinks)
        while self._waiting and all(m <= c for m, c in zip(self._waiting[0].marks, confirmed, strict=True)):
            w = self._waiting.popleft()
            out.setdefault(w.source, []).extend(w.tokens)
            self._pending -= len(w.tokens)
        return out

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def saturated(self) -> bool:
        """Too many frames wait for confirmation (a sink is down): take no new frames."""
        return self._pending >= self.max_pending or any(getattr(s, "saturated", False) for s in self.sinks)

    def oldest_wait_s(self) -> float:
        return time.monotonic() - self._waiting[0].since if self._waiting else 0.0
