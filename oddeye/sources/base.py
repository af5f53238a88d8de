"""The source interface: iterate frames, acknowledge them when done, close."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from oddeye.frames import Frame


class SourceError(RuntimeError):
    """A source cannot be opened (missing file, empty folder, unreachable server)."""


class Source:
    """An iterable of ``Frame``s from one camera or feed.

    ``ack(frame)`` marks a frame finished (scored and written); sources with offsets
    (Kafka) commit on it, others may ignore it. ``skipped`` counts inputs the source
    itself had to pass over (e.g. unreadable files), by reason, so none vanishes
    silently. ``live`` sources (cameras) should drop the oldest frames rather than
    block when the model falls behind.
    """

    live: bool = False

    def __init__(self) -> None:
        self.skipped: dict[str, int] = {}

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def ack(self, frame: Frame) -> None:
        """Mark ``frame`` as fully processed."""

    def close(self) -> None:
        """Release files, sockets and threads."""

    def count_skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def describe(self) -> dict[str, Any]:
        """A loggable summary (never secrets)."""
        return {"type": type(self).__name__}
