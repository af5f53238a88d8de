"""Alert logic: turn each camera's score stream into alert open / update / close events.

Pure Python and driven by frame timestamps, so a replayed stream yields the same events.
Alert ids are UUIDv7 (time-ordered, 74 random bits): unique across cameras, restarts and
machines, so snapshots named by them are never overwritten and receivers can de-duplicate
on them. The pipeline hosts one tracker in an actor; cameras never affect each other.

A camera's state is dropped by ``expire_idle`` once it has sent no frame for
``idle_expire_s`` (wall clock), closing its open alert first, so camera ids taken from
untrusted message headers cannot grow the tracker without bound.

Frames marked ``meta["still"]`` (the image-folder source) are each their own event: one
at or above the threshold opens an alert and closes it at once; ``min_frames``,
``hysteresis`` and ``cooldown_s`` describe streams in time and do not apply.
"""

from __future__ import annotations

import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from oddeye.frames import Alert, AlertState, ScoredFrame

__all__ = ["AlertPolicy", "AlertTracker", "uuid7"]


class _Uuid7:
    """UUIDv7 (RFC 9562): 48-bit Unix milliseconds, 12-bit counter, 62 random bits.

    Within one millisecond the counter (``rand_a``, started at a random value below 2048)
    increases, so ids made by one process sort in creation order; if it overflows, the
    millisecond is borrowed from the future. The random bits make ids from different
    processes collide with probability ~2^-62 per pair in the same millisecond.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._last_ms = -1
        self._counter = 0

    def __call__(self) -> str:
        with self._lock:
            ms = int(self._clock() * 1000)
            if ms > self._last_ms:
                self._last_ms = ms
                self._counter = int.from_bytes(os.urandom(2), "big") & 0x7FF
            else:  # same millisecond (or the clock went back): keep order with the counter
                self._counter += 1
                if self._counter > 0xFFF:
                    self._last_ms += 1
                    self._counter = 0
            ms, counter = self._last_ms, self._counter
        rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
        value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | rand_b
        return str(uuid.UUID(int=value))


uuid7 = _Uuid7()
"""A new UUIDv7 string each call (``018f3c1e-7d2a-7a41-9c3e-...``)."""


@dataclass
class AlertPolicy:
    """When an alert opens, stays open and closes.

    An alert opens after ``min_frames`` consecutive frames score ≥ ``threshold`` and the
    camera is out of its ``cooldown_s`` (counted from its last close). It closes after
    ``close_frames`` consecutive frames score < ``threshold - hysteresis``; frames in
    between keep it open. While open, an ``update`` event goes out every
    ``update_interval_s`` of frame time (0 = never).

    ``threshold="auto"``: the model decides per frame (``ScoredFrame.label``, e.g. U-Flow's
    a-contrario NFA test); labelled frames count towards opening, unlabelled ones towards
    closing, and ``hysteresis`` does not apply.
    """

    threshold: float | str = 0.5
    min_frames: int = 3
    hysteresis: float = 0.1
    close_frames: int = 5
    cooldown_s: float = 10.0
    update_interval_s: float = 5.0

    def __post_init__(self) -> None:
        if self.threshold == "auto":
            pass
        elif isinstance(self.threshold, str) or not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1) or 'auto', got {self.threshold}")
        elif not 0.0 <= self.hysteresis < self.threshold:
            raise ValueError(f"hysteresis must be in [0, threshold={self.threshold}), got {self.hysteresis}")
        for name in ("min_frames", "close_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
        for name in ("cooldown_s", "update_interval_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a number ≥ 0, got {value!r}")

    @property
    def close_below(self) -> float:
        """Scores under this count towards closing an open alert (0.5 − hysteresis with ``auto``)."""
        return (0.5 if self.threshold == "auto" else self.threshold) - self.hysteresis

    def high(self, score: float, label: bool) -> bool:
        """Does this frame count towards opening an alert?"""
        return bool(label) if self.threshold == "auto" else score >= self.threshold

    def low(self, score: float, label: bool) -> bool:
        """Does this frame count towards closing an open alert?"""
        return not label if self.threshold == "auto" else score < self.close_below


class _CameraState:
    """Everything the tracker remembers about one camera."""

    __slots__ = (
        "alert_id",
        "boxes",
        "frames",
        "last_close_ts",
        "last_event_ts",
        "last_seen",
        "last_seq",
        "last_ts",
        "low_run",
        "model",
        "model_version",
        "peak",
        "run_boxes",
        "run_len",
        "run_peak",
        "run_start_seq",
        "run_start_ts",
        "snapshot",
        "started_at",
    )

    def __init__(self) -> None:
        # the current run of frames at or above the threshold (before an alert opens)
        self.run_len = 0
        self.run_start_seq = -1
        self.run_start_ts = 0.0
        self.run_peak = 0.0
        self.run_boxes: list[list[float]] | None = None
        # the open alert, if any
        self.alert_id: str | None = None
        self.started_at = 0.0
        self.peak = 0.0
        self.boxes: list[list[float]] | None = None
        self.frames = 0
        self.low_run = 0
        self.last_event_ts = 0.0
        self.snapshot: str | None = None
        # history
        self.last_close_ts: float | None = None
        self.last_ts = 0.0
        self.last_seq = -1
        self.last_seen = 0.0  # the tracker's clock (monotonic) when the camera's last frame came
        self.model = ""
        self.model_version: int | None = None


class AlertTracker:
    """Per-camera alert state machine; ``update`` one scored frame at a time.

    ``overrides`` maps camera_id to a policy that replaces ``policy`` for that camera.
    Events are new ``Alert`` objects; ``frames`` counts every frame from the first frame
    of the opening run up to the event, ``boxes`` are those of the peak frame, and
    ``model`` is the tracker's model name, or else the frames' own.

    ``idle_expire_s`` (None: never) is how long a camera may send nothing before
    ``expire_idle`` forgets it; ``clock`` (monotonic seconds) is only used for that.
    """

    def __init__(
        self,
        policy: AlertPolicy | None = None,
        model: str = "",
        overrides: dict[str, AlertPolicy] | None = None,
        idle_expire_s: float | None = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        new_id: Callable[[], str] = uuid7,
    ) -> None:
        if idle_expire_s is not None and not idle_expire_s > 0:
            raise ValueError(f"idle_expire_s must be > 0 (or None to never expire), got {idle_expire_s!r}")
        self.policy = policy if policy is not None else AlertPolicy()
        self.model = model
        self.overrides = dict(overrides or {})
        self.idle_expire_s = idle_expire_s
        self._clock = clock
        self._new_id = new_id
        self._cameras: dict[str, _CameraState] = {}

    @property
    def cameras(self) -> int:
        """How many cameras the tracker holds state for."""
        return len(self._cameras)

    def policy_for(self, camera_id: str) -> AlertPolicy:
        """The policy that applies to one camera."""
        return self.overrides.get(camera_id, self.policy)

    @property
    def open_alerts(self) -> int:
        """How many cameras have an alert open right now."""
        return sum(1 for s in self._cameras.values() if s.alert_id is not None)

    def open_alert_ids(self) -> dict[str, str]:
        """camera_id → alert_id of every open alert."""
        return {cam: s.alert_id for cam, s in self._cameras.items() if s.alert_id is not None}

    def set_snapshot(self, camera_id: str, path: str | None) -> None:
        """Remember the snapshot of a camera's open alert so its update/close events carry it too."""
        state = self._cameras.get(camera_id)
        if state is not None and state.alert_id is not None:
            state.snapshot = path

    def update_many(self, frames: Iterable[ScoredFrame]) -> list[Alert]:
        """``update`` each frame in order; all the events they cause."""
        events: list[Alert] = []
        for frame in frames:
            events.extend(self.update(frame))
        return events

    def update(self, frame: ScoredFrame) -> list[Alert]:
        """Feed one scored frame; returns the alert events it causes (usually none)."""
        policy = self.policy_for(frame.camera_id)
        state = self._cameras.get(frame.camera_id)
        if state is None:
            state = self._cameras[frame.camera_id] = _CameraState()
        score = float(frame.score)
        if math.isnan(score):  # no evidence of an anomaly: counts as a low frame
            score = 0.0
        ts = float(frame.timestamp)
        state.last_ts, state.last_seq, state.model = ts, frame.seq, frame.model
        state.model_version = frame.meta.get("model_version")
        state.last_seen = self._clock()

        if frame.meta.get("still"):
            return self._update_still(state, frame, score, ts, policy)
        if state.alert_id is not None:
            return self._update_open(state, frame, score, ts, policy)
        return self._update_closed(state, frame, score, ts, policy)

    def close_all(self) -> list[Alert]:
        """Close every open alert (at shutdown), ended at each camera's last frame time."""
        events = []
        for camera_id, state in self._cameras.items():
            if state.alert_id is not None:
                events.append(self._close(camera_id, state, state.last_ts, state.last_seq))
        return events

    def expire_idle(self, now: float | None = None, on_expire: Callable[[str], None] | None = None) -> list[Alert]:
        """Forget every camera with no frame for ``idle_expire_s``; the close events of their open alerts.

        ``now`` is on the tracker's clock (default: read it). ``on_expire(camera_id)`` is called
        for each camera dropped, e.g. to remove its metric series. Call it every few seconds.
        """
        if self.idle_expire_s is None:
            return []
        now = self._clock() if now is None else now
        events: list[Alert] = []
        for camera_id in [c for c, st in self._cameras.items() if now - st.last_seen >= self.idle_expire_s]:
            state = self._cameras.pop(camera_id)
            if state.alert_id is not None:
                events.append(self._close(camera_id, state, state.last_ts, state.last_seq))
            if on_expire is not None:
                on_expire(camera_id)
        return events

    # ------------------------------------------------------------------ internals

    def _update_still(
        self, state: _CameraState, frame: ScoredFrame, score: float, ts: float, policy: AlertPolicy
    ) -> list[Alert]:
        """A still image is its own event: open and close an alert for it when it scores ≥ threshold."""
        events = []
        if state.alert_id is not None:  # left open by stream frames of the same camera
            events.append(self._close(frame.camera_id, state, state.last_ts, frame.seq))
        state.run_len = 0
        if not policy.high(score, frame.label):
            return events
        self._open(state, frame.camera_id, frame.seq, ts, score, frame.boxes, 1)
        events.append(self._event(frame.camera_id, state, "open", None, frame.seq))
        events.append(self._close(frame.camera_id, state, ts, frame.seq))
        return events

    def _open(
        self,
        state: _CameraState,
        camera_id: str,
        start_seq: int,
        start_ts: float,
        peak: float,
        boxes: list[list[float]] | None,
        frames: int,
    ) -> None:
        state.alert_id = self._new_id()
        state.run_start_seq = start_seq
        state.started_at = start_ts
        state.peak, state.boxes = peak, boxes
        state.frames = frames
        state.low_run = 0
        state.snapshot = None
        state.run_len = 0

    def _update_closed(
        self, state: _CameraState, frame: ScoredFrame, score: float, ts: float, policy: AlertPolicy
    ) -> list[Alert]:
        if not policy.high(score, frame.label):
            state.run_len = 0
            return []
        if state.run_len == 0:
            state.run_start_seq, state.run_start_ts = frame.seq, ts
            state.run_peak, state.run_boxes = score, frame.boxes
        elif score > state.run_peak:
            state.run_peak, state.run_boxes = score, frame.boxes
        state.run_len += 1
        if state.run_len < policy.min_frames:
            return []
        if state.last_close_ts is not None and ts - state.last_close_ts < policy.cooldown_s:
            return []  # the run goes on counting; it opens once the cooldown is over
        self._open(
            state,
            frame.camera_id,
            state.run_start_seq,
            state.run_start_ts,
            state.run_peak,
            state.run_boxes,
            state.run_len,
        )
        state.last_event_ts = ts
        return [self._event(frame.camera_id, state, "open", None, frame.seq)]

    def _update_open(
        self, state: _CameraState, frame: ScoredFrame, score: float, ts: float, policy: AlertPolicy
    ) -> list[Alert]:
        state.frames += 1
        if score > state.peak:
            state.peak, state.boxes = score, frame.boxes
        if policy.low(score, frame.label):
            state.low_run += 1
            if state.low_run >= policy.close_frames:
                return [self._close(frame.camera_id, state, ts, frame.seq)]
        else:
            state.low_run = 0
        if policy.update_interval_s > 0 and ts - state.last_event_ts >= policy.update_interval_s:
            state.last_event_ts = ts
            return [self._event(frame.camera_id, state, "update", None, frame.seq)]
        return []

    def _close(self, camera_id: str, state: _CameraState, ts: float, seq: int) -> Alert:
        event = self._event(camera_id, state, "close", ts, seq)
        state.alert_id = None
        state.low_run = 0
        state.run_len = 0
        state.snapshot = None
        state.last_close_ts = ts
        return event

    def _event(self, camera_id: str, state: _CameraState, kind: AlertState, ended_at: float | None, seq: int) -> Alert:
        assert state.alert_id is not None
        return Alert(
            alert_id=state.alert_id,
            camera_id=camera_id,
            state=kind,
            started_at=state.started_at,
            ended_at=ended_at,
            peak_score=state.peak,
            frames=state.frames,
            model=self.model or state.model,
            snapshot=state.snapshot,
            seq=seq,
            boxes=None if state.boxes is None else [list(b) for b in state.boxes],
            start_seq=state.run_start_seq,
            model_version=state.model_version,
        )
