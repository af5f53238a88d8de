"""Console sink: one line per alert event and a periodic summary, for people watching a run."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TextIO

from oddeye.frames import Alert, Frame, ScoredFrame
from oddeye.sinks.base import Sink

__all__ = ["ConsoleSink"]


def _clock_time(ts: float) -> str:
    """Local wall-clock time of an epoch timestamp, HH:MM:SS."""
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S")


class ConsoleSink(Sink):
    """Print alert events as they happen and a one-line summary every ``summary_interval_s``.

    The summary is written from ``write`` when the interval (wall clock) has passed, and
    once more on ``close``; ``summary_interval_s=0`` leaves only the final one. ``stream``
    defaults to whatever ``sys.stdout`` is at write time, so redirection keeps working.
    """

    def __init__(
        self,
        summary_interval_s: float = 10.0,
        stream: TextIO | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if summary_interval_s < 0:
            raise ValueError(f"summary_interval_s must be ≥ 0, got {summary_interval_s}")
        self.summary_interval_s = summary_interval_s
        self._stream = stream
        self._clock = clock
        self.frames_total = 0
        self.dead_letters = 0
        self.alerts_opened = 0
        self._open: set[str] = set()
        self._interval_start = clock()
        self._interval_frames = 0
        self._interval_sum = 0.0
        self._interval_max = float("-inf")
        self._closed = False

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    @property
    def open_alerts(self) -> int:
        return len(self._open)

    def write(self, frames: Sequence[ScoredFrame]) -> None:
        for frame in frames:
            score = float(frame.score)
            self._interval_frames += 1
            self._interval_sum += score
            self._interval_max = max(self._interval_max, score)
        self.frames_total += len(frames)
        if self.summary_interval_s > 0 and self._clock() - self._interval_start >= self.summary_interval_s:
            self._summary()

    def write_alert(self, alert: Alert) -> None:
        if alert.state == "open":
            self.alerts_opened += 1
            self._open.add(alert.alert_id)
        elif alert.state == "close":
            self._open.discard(alert.alert_id)
        self._print(self.format_alert(alert))

    def write_dead_letter(self, frame: Frame, error: str) -> None:
        self.dead_letters += 1
        if self.dead_letters == 1:  # the first one says what is wrong; the summary counts the rest
            self._print(f"DEAD LETTER cam={frame.camera_id} seq={frame.seq} error={error}")

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._summary()
        self.flush()

    @staticmethod
    def format_alert(alert: Alert) -> str:
        """The line printed for one alert event."""
        head = f"ALERT {alert.state.upper():<5} cam={alert.camera_id} id={alert.alert_id}"
        if alert.state == "open":
            line = f"{head} score={alert.peak_score:.2f} started={_clock_time(alert.started_at)}"
        else:
            end = alert.ended_at
            line = f"{head} peak={alert.peak_score:.2f} started={_clock_time(alert.started_at)}"
            if end is not None:
                line += f" ended={_clock_time(end)} duration={end - alert.started_at:.1f}s"
            line += f" frames={alert.frames}"
        if alert.snapshot:
            line += f" snapshot={alert.snapshot}"
        return line

    def _summary(self) -> None:
        now = self._clock()
        elapsed = now - self._interval_start
        n = self._interval_frames
        fps = n / elapsed if elapsed > 0 else 0.0
        mean = f"{self._interval_sum / n:.3f}" if n else "-"
        peak = f"{self._interval_max:.3f}" if n else "-"
        line = (
            f"SUMMARY frames={self.frames_total} fps={fps:.1f} mean_score={mean} max_score={peak} "
            f"alerts_opened={self.alerts_opened} open={self.open_alerts}"
        )
        if self.dead_letters:
            line += f" dead_letters={self.dead_letters}"
        self._print(line)
        self._interval_start = now
        self._interval_frames = 0
        self._interval_sum = 0.0
        self._interval_max = float("-inf")

    def _print(self, line: str) -> None:
        stream = self.stream
        stream.write(line + "\n")
        stream.flush()
