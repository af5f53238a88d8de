"""Console sink: alert lines and the periodic summary line."""

from __future__ import annotations

import io
from datetime import datetime

import pytest

from oddeye.frames import Alert, Frame, ScoredFrame
from oddeye.sinks.console import ConsoleSink

T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def scored(seq: int, score: float) -> ScoredFrame:
    return ScoredFrame("synthetic-0", seq, T0 + seq, score, score >= 0.5, "padim", 2.0)


def alert(state: str, ended_at: float | None = None, snapshot: str | None = None) -> Alert:
    return Alert(
        alert_id="synthetic-0-80",
        camera_id="synthetic-0",
        state=state,  # type: ignore[arg-type]
        started_at=T0 + 8,
        ended_at=ended_at,
        peak_score=0.973,
        frames=31,
        model="padim",
        snapshot=snapshot,
        seq=82,
    )


def hms(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S")


def test_alert_lines() -> None:
    out = io.StringIO()
    sink = ConsoleSink(stream=out)
    sink.write_alert(alert("open", snapshot="out/snapshots/synthetic-0/synthetic-0-80.jpg"))
    sink.write_alert(alert("close", ended_at=T0 + 14.5))
    opened, closed = out.getvalue().splitlines()
    assert opened == (
        f"ALERT OPEN  cam=synthetic-0 id=synthetic-0-80 score=0.97 started={hms(T0 + 8)} "
        "snapshot=out/snapshots/synthetic-0/synthetic-0-80.jpg"
    )
    assert closed.startswith("ALERT CLOSE cam=synthetic-0 id=synthetic-0-80 peak=0.97")
    assert "duration=6.5s" in closed and "frames=31" in closed


def test_summary_every_interval_and_on_close() -> None:
    out, clock = io.StringIO(), FakeClock()
    sink = ConsoleSink(summary_interval_s=10.0, stream=out, clock=clock)
    sink.write([scored(i, 0.1) for i in range(5)])
    clock.now += 5
    sink.write([scored(5, 0.3), scored(6, 0.9)])
    assert out.getvalue() == ""  # interval not over yet
    sink.write_alert(alert("open"))
    clock.now += 5
    sink.write([scored(7, 0.2)])  # 8 frames in 10 s, mean 1.9 / 8
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[1] == "SUMMARY frames=8 fps=0.8 mean_score=0.238 max_score=0.900 alerts_opened=1 open=1"

    clock.now += 2
    sink.write_alert(alert("close", ended_at=T0 + 20))
    sink.write([scored(8, 0.4), scored(9, 0.6)])
    sink.close()
    last = out.getvalue().splitlines()[-1]
    assert last == "SUMMARY frames=10 fps=1.0 mean_score=0.500 max_score=0.600 alerts_opened=1 open=0"
    sink.close()  # idempotent: no second final summary
    assert out.getvalue().splitlines()[-1] == last and out.getvalue().count("SUMMARY") == 2


def test_summary_with_no_frames_and_dead_letters() -> None:
    out, clock = io.StringIO(), FakeClock()
    sink = ConsoleSink(summary_interval_s=0, stream=out, clock=clock)
    bad = Frame("cam-x", 3, T0, b"not an image")
    sink.write_dead_letter(bad, "cannot decode")
    sink.write_dead_letter(bad, "cannot decode")
    sink.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "DEAD LETTER cam=cam-x seq=3 error=cannot decode"
    assert lines[1] == "SUMMARY frames=0 fps=0.0 mean_score=- max_score=- alerts_opened=0 open=0 dead_letters=2"


def test_default_stream_is_stdout_at_write_time(capsys: pytest.CaptureFixture[str]) -> None:
    sink = ConsoleSink()
    sink.write_alert(alert("open"))
    assert "ALERT OPEN  cam=synthetic-0" in capsys.readouterr().out


def test_negative_interval_rejected() -> None:
    with pytest.raises(ValueError, match="summary_interval_s"):
        ConsoleSink(summary_interval_s=-1)
