"""JSONL sink: scores, alerts and dead letters as one JSON object per line under an output folder.

Files are opened in append mode and line-buffered, so each record reaches the OS as soon
as it is written and a crash loses at most a partial last line; a rerun appends.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from oddeye.frames import Alert, Frame, ScoredFrame, to_json
from oddeye.sinks.base import Sink

__all__ = ["JsonlSink"]

SCORES_FILE = "scores.jsonl"
ALERTS_FILE = "alerts.jsonl"
DEAD_LETTERS_FILE = "dead_letters.jsonl"


def _dumps(record: dict[str, Any]) -> str:
    return to_json(record)


def _payload_bytes(image: Any) -> int:
    """Size of a frame's payload: encoded bytes, or the decoded array's bytes."""
    if isinstance(image, np.ndarray):
        return int(image.nbytes)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return len(image)
    return 0


class JsonlSink(Sink):
    """Append ``scores.jsonl``, ``alerts.jsonl`` and ``dead_letters.jsonl`` under ``out_dir``.

    Each file can be switched off. The folder is created and the files opened at
    construction, so a path that cannot be written fails there with an ``OSError`` that
    names it rather than on the first frame.
    """

    def __init__(
        self, out_dir: str | Path, scores: bool = True, alerts: bool = True, dead_letters: bool = True
    ) -> None:
        self.out_dir = Path(out_dir)
        self._lock = threading.Lock()
        self._files: dict[str, IO[str]] = {}
        self._closed = False
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(f"cannot create JSONL output folder {self.out_dir}: {exc}") from exc
        wanted = {SCORES_FILE: scores, ALERTS_FILE: alerts, DEAD_LETTERS_FILE: dead_letters}
        for name, on in wanted.items():
            if not on:
                continue
            path = self.out_dir / name
            try:
                self._files[name] = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
            except OSError as exc:
                self.close()
                raise OSError(f"cannot open {path} for appending: {exc}") from exc

    def path(self, name: str) -> Path:
        """Where one of the files lives (``scores.jsonl`` etc.)."""
        return self.out_dir / name

    def write(self, frames: Sequence[ScoredFrame]) -> None:
        if frames:
            self._write_lines(SCORES_FILE, [_dumps(f.record()) for f in frames])

    def write_alert(self, alert: Alert) -> None:
        self._write_lines(ALERTS_FILE, [_dumps(alert.record())])

    def write_dead_letter(self, frame: Frame, error: str) -> None:
        record = {
            "camera_id": frame.camera_id,
            "seq": frame.seq,
            "ts": frame.timestamp,
            "error": error,
            "origin": frame.origin,
            "payload_bytes": _payload_bytes(frame.image),
        }
        self._write_lines(DEAD_LETTERS_FILE, [_dumps(record)])

    def flush(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.flush()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            files, self._files = self._files, {}
            for f in files.values():
                f.close()

    def _write_lines(self, name: str, lines: list[str]) -> None:
        with self._lock:
            if self._closed:
                raise ValueError(f"JsonlSink({self.out_dir}) is closed")
            f = self._files.get(name)
            if f is not None:  # None: that file is switched off
                f.write("".join(line + "\n" for line in lines))
