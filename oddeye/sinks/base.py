"""The sink interface: scored frames and alert events out."""

from __future__ import annotations

from collections.abc import Sequence

from oddeye.frames import Alert, Frame, ScoredFrame


class Sink:
    """Where results go. All methods are optional except what a sink is for.

    ``write_dead_letter`` receives frames that could not be scored (undecodable, bad
    shape) with the error, so that no input disappears without a record.
    """

    def write(self, frames: Sequence[ScoredFrame]) -> None:
        """Write a batch of scored frames."""

    def write_alert(self, alert: Alert) -> None:
        """Write one alert event (open, update or close)."""

    def write_dead_letter(self, frame: Frame, error: str) -> None:
        """Record a frame that could not be scored."""

    def flush(self) -> None:
        """Push buffered output to its destination."""

    def close(self) -> None:
        self.flush()
