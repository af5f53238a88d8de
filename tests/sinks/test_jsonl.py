"""JSONL sink: records round-trip through json.loads with the wire-format field names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from oddeye.frames import Alert, Frame, ScoredFrame
from oddeye.sinks.jsonl import JsonlSink

T0 = 1_700_000_000.0
SCORE_FIELDS = ["camera_id", "seq", "ts", "score", "label", "model", "latency_ms", "origin"]
ALERT_FIELDS = {"alert_id", "camera_id", "state", "started_at", "ended_at", "peak_score", "frames", "snapshot"}


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def scored(seq: int, score: float, origin: dict | None = None) -> ScoredFrame:
    return ScoredFrame("cam-1", seq, T0 + seq, score, score >= 0.5, "patchcore", 3.25, origin=origin or {})


def test_scores_alerts_and_dead_letters_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "run" / "out"  # created, parents included
    sink = JsonlSink(out)
    origin = {"topic": "frames", "partition": np.int64(2), "offset": 17}
    sink.write([scored(0, 0.125, origin), scored(1, np.float32(0.75))])
    sink.write([])
    alert = Alert("cam-1-1", "cam-1", "open", T0 + 1, None, 0.75, 3, "patchcore", "snap.jpg", 3, [[1, 2, 3, 4, 0.9]])
    sink.write_alert(alert)
    sink.write_dead_letter(Frame("cam-2", 9, T0, b"\x00" * 1234, origin={"offset": 5}), "cannot decode")
    sink.write_dead_letter(Frame("cam-2", 10, T0, np.zeros((4, 5, 3), np.uint8)), "bad shape")
    sink.close()

    scores = read(out / "scores.jsonl")
    assert [list(r) for r in scores] == [SCORE_FIELDS, SCORE_FIELDS]
    assert scores[0] == {
        "camera_id": "cam-1",
        "seq": 0,
        "ts": T0,
        "score": 0.125,
        "label": False,
        "model": "patchcore",
        "latency_ms": 3.25,
        "origin": {"topic": "frames", "partition": 2, "offset": 17},
    }
    assert scores[1]["score"] == 0.75 and scores[1]["label"] is True

    (alert_rec,) = read(out / "alerts.jsonl")
    assert set(alert_rec) >= ALERT_FIELDS
    assert alert_rec["state"] == "open" and alert_rec["alert_id"] == "cam-1-1" and alert_rec["ended_at"] is None
    assert alert_rec["snapshot"] == "snap.jpg" and alert_rec["boxes"] == [[1, 2, 3, 4, 0.9]]

    dead = read(out / "dead_letters.jsonl")
    assert dead[0] == {
        "camera_id": "cam-2",
        "seq": 9,
        "ts": T0,
        "error": "cannot decode",
        "origin": {"offset": 5},
        "payload_bytes": 1234,
    }
    assert dead[1]["payload_bytes"] == 60


def test_appends_and_flush_makes_lines_visible(tmp_path: Path) -> None:
    first = JsonlSink(tmp_path)
    first.write([scored(0, 0.1)])
    first.flush()
    assert len(read(tmp_path / "scores.jsonl")) == 1  # visible before close
    first.close()
    second = JsonlSink(tmp_path)
    second.write([scored(1, 0.2)])
    second.close()
    assert [r["seq"] for r in read(tmp_path / "scores.jsonl")] == [0, 1]


def test_switched_off_files_are_not_written(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path, scores=False, dead_letters=False)
    sink.write([scored(0, 0.1)])
    sink.write_dead_letter(Frame("c", 0, T0, b""), "x")
    sink.write_alert(Alert("c-0", "c", "close", T0, T0 + 1, 0.9, 2))
    sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alerts.jsonl"]


def test_write_after_close_raises(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path)
    sink.close()
    sink.close()
    with pytest.raises(ValueError, match="closed"):
        sink.write([scored(0, 0.1)])


def test_unwritable_directory_fails_at_construction_naming_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    target = blocker / "out"
    with pytest.raises(OSError, match=str(target)):
        JsonlSink(target)
