"""Alert logic on scripted score sequences: opening, hysteresis, closing, cooldown, updates."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from oddeye.frames import Alert, ScoredFrame
from oddeye.pipeline.alerts import AlertPolicy, AlertTracker, uuid7
from oddeye.sinks.snapshots import SnapshotSink

T0 = 1_700_000_000.0
UUID7 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def frame(cam: str, seq: int, score: float, fps: float = 1.0, boxes: list[list[float]] | None = None) -> ScoredFrame:
    """Frame ``seq`` of a camera at ``fps`` frames per second."""
    return ScoredFrame(
        camera_id=cam,
        seq=seq,
        timestamp=T0 + seq / fps,
        score=score,
        label=score >= 0.5,
        model="m",
        latency_ms=1.0,
        boxes=boxes,
    )


def feed(tracker: AlertTracker, scores: list[float], cam: str = "cam", start: int = 0, fps: float = 1.0):
    """Feed scores as consecutive frames; a list of (seq, events) for frames that caused events."""
    out = []
    for i, s in enumerate(scores):
        events = tracker.update(frame(cam, start + i, s, fps))
        if events:
            out.append((start + i, events))
    return out


def only(events: list[tuple[int, list[Alert]]], state: str) -> list[Alert]:
    return [a for _, evs in events for a in evs if a.state == state]


POLICY = AlertPolicy(threshold=0.5, min_frames=3, hysteresis=0.1, close_frames=2, cooldown_s=10.0, update_interval_s=0)


def test_normal_stretch_never_opens() -> None:
    tracker = AlertTracker(POLICY)
    assert feed(tracker, [0.1, 0.49, 0.3, 0.49, 0.2] * 20) == []
    assert tracker.open_alerts == 0


def test_run_of_min_frames_opens_on_last_frame_of_run() -> None:
    tracker = AlertTracker(POLICY, model="patchcore")
    events = feed(tracker, [0.1, 0.2, 0.6, 0.9, 0.5, 0.7])
    assert len(events) == 1
    seq, (alert,) = events[0]
    assert seq == 4  # third consecutive frame ≥ threshold (0.5 counts)
    assert alert.state == "open"
    assert alert.start_seq == 2 and UUID7.fullmatch(alert.alert_id)
    assert alert.started_at == T0 + 2
    assert alert.ended_at is None
    assert alert.peak_score == pytest.approx(0.9)
    assert alert.frames == 3
    assert alert.model == "patchcore"
    assert alert.seq == 4
    assert tracker.open_alerts == 1


def test_run_one_short_does_not_open() -> None:
    tracker = AlertTracker(POLICY)
    assert feed(tracker, [0.9, 0.9, 0.1, 0.9, 0.9, 0.2, 0.9, 0.9]) == []
    assert tracker.open_alerts == 0


def test_hysteresis_band_keeps_alert_open_and_resets_close_count() -> None:
    tracker = AlertTracker(POLICY)
    # open at seq 2; then 0.45 is in the band [0.4, 0.5): never closes; a lone low frame
    # followed by a band frame resets the close counter
    events = feed(tracker, [0.9, 0.9, 0.9, 0.45, 0.42, 0.3, 0.45, 0.3, 0.41, 0.45])
    assert [a.state for _, evs in events for a in evs] == ["open"]
    assert tracker.open_alerts == 1


def test_close_after_close_frames_low_frames() -> None:
    tracker = AlertTracker(POLICY)
    scores = [0.1, 0.8, 0.95, 0.7, 0.45, 0.3, 0.2, 0.1]
    events = feed(tracker, scores)
    states = [(seq, a.state) for seq, evs in events for a in evs]
    assert states == [(3, "open"), (6, "close")]
    close = only(events, "close")[0]
    assert close.start_seq == 1 and close.alert_id == only(events, "open")[0].alert_id
    assert close.started_at == T0 + 1
    assert close.ended_at == T0 + 6
    assert close.peak_score == pytest.approx(0.95)
    assert close.frames == 6  # seqs 1..6: the opening run and every frame after it
    assert close.seq == 6
    assert tracker.open_alerts == 0


def test_peak_boxes_travel_with_the_alert() -> None:
    tracker = AlertTracker(POLICY)
    box_a, box_b = [[1.0, 2.0, 3.0, 4.0, 0.6]], [[5.0, 6.0, 7.0, 8.0, 0.99]]
    tracker.update(frame("cam", 0, 0.6, boxes=box_a))
    tracker.update(frame("cam", 1, 0.99, boxes=box_b))
    (opened,) = tracker.update(frame("cam", 2, 0.7, boxes=box_a))
    assert opened.boxes == box_b
    tracker.update(frame("cam", 3, 0.1))
    (closed,) = tracker.update(frame("cam", 4, 0.1))
    assert closed.boxes == box_b


def test_cooldown_suppresses_reopen_then_allows_it() -> None:
    tracker = AlertTracker(POLICY)  # cooldown 10 s at 1 frame/s
    events = feed(tracker, [0.9, 0.9, 0.9, 0.1, 0.1])  # open at 2, close at 4 (t = T0 + 4)
    assert [a.state for _, evs in events for a in evs] == ["open", "close"]
    # a high run at seqs 5..7 is within the cooldown: no alert
    assert feed(tracker, [0.9, 0.9, 0.9, 0.1], start=5) == []
    # a run that reaches min_frames at seq 14 (t - close = 10 s) opens
    later = feed(tracker, [0.1] * 3 + [0.9, 0.9, 0.9], start=9)
    assert [(seq, a.state, a.start_seq) for seq, evs in later for a in evs] == [(14, "open", 12)]


def test_run_through_end_of_cooldown_opens_when_cooldown_ends() -> None:
    tracker = AlertTracker(POLICY)
    feed(tracker, [0.9, 0.9, 0.9, 0.1, 0.1])  # closed at t = T0 + 4, cooldown until T0 + 14
    events = feed(tracker, [0.9] * 12, start=5)  # one long run, seqs 5..16
    assert [(seq, a.state) for seq, evs in events for a in evs] == [(14, "open")]
    opened = only(events, "open")[0]
    assert opened.start_seq == 5
    assert opened.started_at == T0 + 5
    assert opened.frames == 10


def test_update_events_every_interval_of_frame_time() -> None:
    policy = AlertPolicy(min_frames=2, close_frames=2, update_interval_s=2.0)
    tracker = AlertTracker(policy)
    events = feed(tracker, [0.9] * 10, fps=2.0)  # frames every 0.5 s; opens at seq 1 (t = 0.5)
    states = [(seq, a.state) for seq, evs in events for a in evs]
    assert states == [(1, "open"), (5, "update"), (9, "update")]
    updates = only(events, "update")
    assert [u.frames for u in updates] == [6, 10]
    opened = only(events, "open")[0]
    assert all(u.ended_at is None and u.alert_id == opened.alert_id and u.start_seq == 0 for u in updates)


def test_zero_update_interval_means_no_updates() -> None:
    tracker = AlertTracker(POLICY)
    events = feed(tracker, [0.9] * 100)
    assert [a.state for _, evs in events for a in evs] == ["open"]


def test_interleaved_cameras_are_independent() -> None:
    tracker = AlertTracker(POLICY)
    a_scores = [0.9, 0.9, 0.9, 0.9, 0.1, 0.1]
    b_scores = [0.9, 0.1, 0.9, 0.9, 0.2, 0.9]
    events: list[tuple[str, int, str]] = []
    for seq, (sa, sb) in enumerate(zip(a_scores, b_scores, strict=True)):
        for cam, s in (("a", sa), ("b", sb)):
            events += [(a.camera_id, a.seq, a.state) for a in tracker.update(frame(cam, seq, s))]
    assert events == [("a", 2, "open"), ("a", 5, "close")]
    assert tracker.open_alerts == 0


def test_per_camera_override() -> None:
    strict = AlertPolicy(threshold=0.8, min_frames=1, hysteresis=0.0, close_frames=1, cooldown_s=0, update_interval_s=0)
    tracker = AlertTracker(POLICY, overrides={"door": strict})
    scores = [0.7, 0.85, 0.7, 0.7, 0.7]
    door = feed(tracker, scores, cam="door")
    hall = feed(tracker, scores, cam="hall")
    assert [(seq, a.state) for seq, evs in door for a in evs] == [(1, "open"), (2, "close")]
    assert [(seq, a.state) for seq, evs in hall for a in evs] == [(2, "open")]
    assert tracker.policy_for("door") is strict and tracker.policy_for("hall") is POLICY


def test_close_all_closes_every_open_alert_at_last_seen_time() -> None:
    tracker = AlertTracker(POLICY)
    feed(tracker, [0.9] * 4, cam="a")
    feed(tracker, [0.9] * 6, cam="b")
    feed(tracker, [0.9, 0.1], cam="c")
    tracker.set_snapshot("a", "/tmp/a.jpg")
    closed = {a.camera_id: a for a in tracker.close_all()}
    assert set(closed) == {"a", "b"}
    assert all(a.state == "close" for a in closed.values())
    assert closed["a"].ended_at == T0 + 3 and closed["a"].frames == 4 and closed["a"].snapshot == "/tmp/a.jpg"
    assert closed["b"].ended_at == T0 + 5 and closed["b"].seq == 5
    assert tracker.open_alerts == 0
    assert tracker.close_all() == []


def test_replay_yields_same_events_with_new_unique_ids() -> None:
    scores = [0.1, 0.9, 0.9, 0.9, 0.1, 0.1, 0.1] * 3

    def events() -> list[Alert]:
        tracker = AlertTracker(AlertPolicy(close_frames=2, cooldown_s=0, update_interval_s=1))
        return [a for _, evs in feed(tracker, scores) for a in evs]

    first, second = events(), events()  # e.g. before and after a restart: seq starts at 0 again
    strip = [(a.start_seq, a.seq, a.state) for a in first]
    assert strip == [(a.start_seq, a.seq, a.state) for a in second]
    assert [a.start_seq for a in first if a.state == "open"] == [1, 8, 15]
    opened = [a.alert_id for a in first + second if a.state == "open"]
    assert len(set(opened)) == 6  # the old ids were camera-start_seq: equal across restarts


def test_nan_score_counts_as_low() -> None:
    tracker = AlertTracker(POLICY)
    assert feed(tracker, [0.9, 0.9, float("nan"), 0.9]) == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.0}, "threshold"),
        ({"hysteresis": -0.1}, "hysteresis"),
        ({"threshold": 0.3, "hysteresis": 0.3}, "hysteresis"),
        ({"min_frames": 0}, "min_frames"),
        ({"close_frames": 0}, "close_frames"),
        ({"min_frames": 2.5}, "min_frames"),
        ({"cooldown_s": -1}, "cooldown_s"),
        ({"update_interval_s": -0.5}, "update_interval_s"),
    ],
)
def test_invalid_policy_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        AlertPolicy(**kwargs)


# --------------------------------------------------------------------------- ids, idle expiry, stills


def test_uuid7_ids_are_unique_time_ordered_and_valid() -> None:
    ids = [uuid7() for _ in range(5000)]
    assert len(set(ids)) == 5000 and ids == sorted(ids)  # ordered within one process, even in one millisecond
    u = uuid.UUID(ids[0])
    assert u.version == 7 and u.variant == uuid.RFC_4122 and UUID7.fullmatch(ids[0])
    assert abs((u.int >> 80) / 1000 - time.time()) < 5  # the first 48 bits are Unix milliseconds


def test_snapshots_named_by_alert_id_never_overwrite_across_restarts(tmp_path: Path) -> None:
    paths = []
    for _restart in range(2):
        tracker = AlertTracker(POLICY)
        sink = SnapshotSink(tmp_path)
        for i, s in enumerate([0.9, 0.9, 0.9]):
            f = frame("cam", i, s)
            f.image = np.zeros((8, 8, 3), np.uint8)
            for alert in tracker.update(f):
                paths.append(sink.save(alert, f))
    assert len(paths) == 2 and paths[0] != paths[1]
    assert all(Path(p).is_file() for p in paths)


def test_idle_cameras_expire_closing_their_alerts_first() -> None:
    clock = [0.0]
    tracker = AlertTracker(POLICY, idle_expire_s=60, clock=lambda: clock[0])
    feed(tracker, [0.9, 0.9, 0.9], cam="gone")  # opens an alert, then the camera goes silent
    feed(tracker, [0.1], cam="quiet")
    for i in range(1000):  # untrusted ids that each send one frame
        tracker.update(frame(f"spoof-{i}", 0, 0.1))
    assert tracker.cameras == 1002
    clock[0] = 30.0
    feed(tracker, [0.1], cam="live", start=0)
    assert tracker.expire_idle() == [] and tracker.cameras == 1003
    clock[0] = 61.0
    forgotten: list[str] = []
    events = tracker.expire_idle(on_expire=forgotten.append)
    assert [(a.camera_id, a.state, a.ended_at) for a in events] == [("gone", "close", T0 + 2)]
    assert tracker.cameras == 1 and set(forgotten) == {"gone", "quiet"} | {f"spoof-{i}" for i in range(1000)}
    assert tracker.open_alert_ids() == {}
    with pytest.raises(ValueError, match="idle_expire_s"):
        AlertTracker(POLICY, idle_expire_s=0)


def test_each_still_image_is_its_own_event() -> None:
    policy = AlertPolicy(threshold=0.5, min_frames=3, hysteresis=0.1, close_frames=5, cooldown_s=2.0)
    tracker = AlertTracker(policy)
    scores = [0.1, 0.2] + [0.9] * 24 + [0.1] * 3 + [0.8]  # 24 defective images in a row, one more later
    events = []
    for i, s in enumerate(scores):
        f = frame("line-3", i, s, fps=200.0)  # all 30 images within 0.15 s: the cooldown would swallow them
        f.meta["still"] = True
        events += tracker.update(f)
    opened = [a for a in events if a.state == "open"]
    assert len(opened) == 25 and len({a.alert_id for a in opened}) == 25
    assert [a.start_seq for a in opened] == [*range(2, 26), 29]
    assert [a.state for a in events[:2]] == ["open", "close"] and events[1].frames == 1
    assert tracker.open_alerts == 0
    # as a stream, the same scores open one alert only
    stream = AlertTracker(policy)
    streamed = [a for i, s in enumerate(scores) for a in stream.update(frame("line-3", i, s, fps=200.0))]
    assert [a.state for a in streamed] == ["open"]
