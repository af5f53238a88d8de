"""The sink interface: scored frames and alert events out."""

from __future__ import annotations

from collections.abc import Sequence

from oddeye.frames import Alert, Frame, ScoredFrame


class Sink:
    """Where results go. All methods are optional except what a sink is for.

    ``write_dead_letter`` receives frames that could not be scored (undecodable, bad
    shape) with the error, so that no input disappears without a record.

    A sink that confirms delivery (``acknowledges = True``, e.g. Kafka) counts the records
    it accepts: ``mark()`` is how many it has accepted so far and ``confirmed()`` how many of
    them, from the first on, are delivered. Neither blocks; ``saturated`` is True while its
    buffer is full (the pipeline then takes no new frames: back-pressure, not loss).
    """

    acknowledges: bool = False
    wants_maps: bool = False
    """True for a sink that writes every frame's anomaly map (maps otherwise come back only for alerts)."""

    def write(self, frames: Sequence[ScoredFrame]) -> None:
        """Write a batch of scored frames."""

    def write_alert(self, alert: Alert) -> None:
        """Write one alert event (open, update or close)."""

    def write_dead_letter(self, frame: Frame, error: str) -> None:
        """Record a frame that could not be scored."""

    def mark(self) -> int:
        """Records accepted so far (confirming sinks)."""
        return 0

    def confirmed(self) -> int:
        """Records delivered so far, counted contiguously from the first (confirming sinks)."""
        return 0

    @property
    def saturated(self) -> bool:
        return False

    def flush(self) -> None:
        """Push buffered output to its destination."""

    def close(self) -> None:
        self.flush()
