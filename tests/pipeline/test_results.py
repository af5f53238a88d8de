"""Result handling without Ray: acks only after confirming writes, errors to the dead-letter path."""

from __future__ import annotations

import numpy as np

from oddeye.frames import Frame
from oddeye.pipeline.alerts import AlertPolicy, AlertTracker
from oddeye.pipeline.results import ResultHandler
from oddeye.pipeline.scoring import BatchResult
from oddeye.pipeline.telemetry import Telemetry
from oddeye.sinks.base import Sink


class Recorder(Sink):
    def __init__(self, acknowledges: bool = False, fail: bool = False) -> None:
        self.acknowledges = acknowledges
        self.fail = fail
        self.frames: list = []
        self.alerts: list = []
        self.dead: list = []

    def write(self, frames) -> None:  # type: ignore[no-untyped-def]
        if self.fail:
            raise OSError("disk full")
        self.frames += list(frames)

    def write_alert(self, alert) -> None:  # type: ignore[no-untyped-def]
        self.alerts.append(alert)

    def write_dead_letter(self, frame, error) -> None:  # type: ignore[no-untyped-def]
        self.dead.append((frame.seq, error))


class Snapshots:
    def __init__(self) -> None:
        self.saved: list = []

    def save(self, alert, frame):  # type: ignore[no-untyped-def]
        assert frame.image is not None and frame.anomaly_map is not None
        self.saved.append(frame.seq)
        return f"snap-{frame.seq}.jpg"


def frames(n: int, source: int = 0) -> list[Frame]:
    return [
        Frame("cam", i, 1000.0 + i, None, meta={"_token": 100 + i, "_source": source})  # type: ignore[arg-type]
        for i in range(n)
    ]


def handler(sinks: list[Sink], fetched: list[int] | None = None, snapshots: Snapshots | None = None) -> ResultHandler:
    def fetch(f: Frame) -> np.ndarray:
        if fetched is not None:
            fetched.append(f.seq)
        return np.zeros((8, 8, 3), np.uint8)

    alerts = AlertTracker(AlertPolicy(threshold=0.5, min_frames=2, cooldown_s=0.0), model="m")
    return ResultHandler(sinks, alerts, Telemetry(), lambda cam: 0.5, snapshots=snapshots, fetch_image=fetch)


def test_scored_frames_are_written_then_finished_and_pixels_fetched_only_for_a_snapshot() -> None:
    sink, fetched, snaps = Recorder(), [], Snapshots()
    h = handler([sink], fetched, snaps)
    scores = np.array([0.1, 0.2, 0.9, 0.95, 0.97], np.float32)
    maps = {i: np.full((4, 4), 200, np.uint8) for i in (2, 3, 4)}  # only alerting frames carry maps
    out = h.handle(frames(5), BatchResult(scores, maps, None, 0.01, "m"))
    assert out.finished == {0: [100, 101, 102, 103, 104]} and out.dead == {}
    assert [f.seq for f in sink.frames] == [0, 1, 2, 3, 4]
    assert all(f.image is None for f in sink.frames)  # no pixels in what sinks receive
    assert [a.state for a in sink.alerts] == ["open"]
    assert fetched == [3] and snaps.saved == [3]  # the frame that opened the alert, and only it
    assert sink.alerts[0].snapshot == "snap-3.jpg"


def test_a_model_error_sends_every_frame_to_the_dead_letter_path_not_to_acks() -> None:
    h = handler([Recorder()])
    res = BatchResult(np.zeros(0, np.float32), None, None, 0.0, "m", "ValueError: boom")
    out = h.handle(frames(3, source=2), res)
    assert out.finished == {}
    assert out.dead == {
        2: [
            (100, "ValueError: boom", "model_error"),
            (101, "ValueError: boom", "model_error"),
            (102, "ValueError: boom", "model_error"),
        ]
    }
    died = h.handle(frames(1), BatchResult(np.zeros(0, np.float32), None, None, 0.0, "m", "model actor died: x"))
    assert died.dead[0][0][2] == "model_actor_died"


def test_a_failed_write_to_a_confirming_sink_is_never_acknowledged() -> None:
    ok, failing = Recorder(), Recorder(acknowledges=True, fail=True)
    h = handler([ok, failing])
    out = h.handle(frames(2), BatchResult(np.array([0.1, 0.2], np.float32), {}, None, 0.0, "m"))
    assert out.finished == {} and out.unconfirmed == 2
    assert h.telemetry.value("oddeye_sink_errors_total", {"sink": "Recorder"}) == 1
    # a failing sink that does not confirm delivery does not hold acks back
    h2 = handler([Recorder(fail=True)])
    assert h2.handle(frames(2), BatchResult(np.array([0.1, 0.2], np.float32), {}, None, 0.0, "m")).finished == {
        0: [100, 101]
    }


def test_skipped_frames_are_counted_and_finished() -> None:
    sink = Recorder()
    h = handler([sink])
    res = BatchResult(np.array([np.nan, 0.3], np.float32), None, None, 0.0, "m", skipped={0: "clip_warmup"})
    out = h.handle(frames(2), res)
    assert out.finished == {0: [100, 101]} and [f.seq for f in sink.frames] == [1]
    assert h.dropped == {"clip_warmup": 1}


def test_frames_the_model_failed_on_are_dead_letters_and_the_rest_is_scored() -> None:
    sink = Recorder()
    h = handler([sink])
    res = BatchResult(np.array([0.1, np.nan, 0.2], np.float32), {}, None, 0.0, "m", failed={1: "ValueError: bad"})
    out = h.handle(frames(3), res)
    assert out.finished == {0: [100, 102]} and out.dead == {0: [(101, "ValueError: bad", "model_error")]}
    assert [f.seq for f in sink.frames] == [0, 2]


def test_threshold_auto_takes_the_models_own_labels() -> None:
    sink = Recorder()
    alerts = AlertTracker(AlertPolicy(threshold="auto", min_frames=1, cooldown_s=0.0), model="uflow")
    h = ResultHandler([sink], alerts, Telemetry(), lambda cam: "auto")
    res = BatchResult(np.array([0.9, 0.1], np.float32), {}, None, 0.0, "uflow", labels=np.array([False, True]))
    h.handle(frames(2), res)
    assert [f.label for f in sink.frames] == [False, True]  # the NFA test, not the score
    assert [(a.state, a.start_seq) for a in sink.alerts] == [("open", 1)]


def test_idle_cameras_expire_their_alerts_close_and_their_series_go() -> None:
    sink = Recorder()
    clock = [1000.0]
    alerts = AlertTracker(
        AlertPolicy(threshold=0.5, min_frames=1, cooldown_s=0.0), model="m", idle_expire_s=60, clock=lambda: clock[0]
    )
    h = ResultHandler([sink], alerts, Telemetry(), lambda cam: 0.5)
    h.handle(frames(1), BatchResult(np.array([0.9], np.float32), {}, None, 0.0, "m"))
    assert h.telemetry.value("oddeye_dead_letters_total", {"camera": "cam", "reason": "model_error"}) == 0
    assert [a.state for a in sink.alerts] == ["open"]
    clock[0] += 61
    h.expire_idle()
    assert [a.state for a in sink.alerts] == ["open", "close"]
    assert h.telemetry.forget_camera("cam") == 0  # its series are already gone
