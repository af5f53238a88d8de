"""The source interface: iterate frames, acknowledge them when done, close."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from oddeye.frames import Frame


class SourceError(RuntimeError):
    """A source cannot be opened (missing file, empty folder, unreachable server)."""


class Source:
    """An iterable of ``Frame``s from one camera or feed.

    - ``ack(frame)`` marks a frame finished (scored and written, or dropped by an explicit
      policy); sources with offsets (Kafka) commit on it, others may ignore it. It may be
      called from another thread than the one iterating.
    - ``dead_letter(frame, error)`` receives inputs that cannot be scored (undecodable,
      missing headers, ...) with their original payload; a Kafka source publishes them to
      its dead-letter topic and counts their offsets as done. A source may itself yield a
      frame with ``meta["error"]`` set to send it down that path.
    - ``skipped`` counts inputs the source itself passed over (e.g. unreadable files), by
      reason, so none vanishes silently.
    - ``up`` (None: "while iterating"), ``reconnects`` and ``lag()`` report health for
      the metrics. ``live`` sources (cameras) should drop the oldest frames rather than
      block when the model falls behind.
    """

    live: bool = False

    def __init__(self) -> None:
        self.skipped: dict[str, int] = {}
        self.up: bool | None = None
        self.reconnects = 0

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def ack(self, frame: Frame) -> None:
        """Mark ``frame`` as fully processed."""

    def dead_letter(self, frame: Frame, error: str) -> None:
        """Route an input that cannot be scored to the source's dead-letter path (if it has one)."""

    def lag(self) -> dict[str, int]:
        """Messages not yet consumed, by partition label (Kafka); empty for other sources."""
        return {}

    def close(self) -> None:
        """Release files, sockets and threads."""

    def count_skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def describe(self) -> dict[str, Any]:
        """A loggable summary (never secrets)."""
        return {"type": type(self).__name__}
