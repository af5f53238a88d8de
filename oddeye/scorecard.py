"""The demo's closing lines: alerts and scores against the synthetic camera's ground truth."""

from __future__ import annotations

from collections.abc import Sequence

from oddeye.frames import ScoredFrame
from oddeye.sinks.base import Sink

__all__ = ["Scorecard"]


class Scorecard(Sink):
    """Compares alerts with the synthetic camera's ground truth, for the demo's closing lines."""

    def __init__(self) -> None:
        self.kinds: dict[str, dict[str, int]] = {}
        self.normal = 0
        self.normal_flagged = 0

    def write(self, frames: Sequence[ScoredFrame]) -> None:
        for f in frames:
            if f.meta.get("anomaly"):
                p = self.kinds.setdefault(f.meta.get("kind") or "?", {"frames": 0, "flagged": 0})
                p["frames"] += 1
                p["flagged"] += int(f.label)
            else:
                self.normal += 1
                self.normal_flagged += int(f.label)

    def report(self) -> str:
        lines = ["oddeye demo: injected anomalies vs. scores (frames at or above the threshold):"]
        for kind, p in self.kinds.items():
            lines.append(f"  {kind:<15} {p['flagged']:>3}/{p['frames']} frames flagged")
        if self.normal:
            lines.append(f"  {'normal':<15} {self.normal_flagged:>3}/{self.normal} frames flagged (false positives)")
        return "\n".join(lines)
