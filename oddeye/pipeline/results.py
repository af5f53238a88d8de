"""Result handling: scores → alerts → sinks → metrics, for one batch at a time (no Ray here).

The driver hands each finished batch here in submission order, so every camera's frames reach
the alert logic and the sinks in sequence. What comes back says which frames are finished
(to acknowledge once the confirming sinks deliver) and which must go to the dead-letter path.
Pixels are fetched only for the snapshot of an alert that opens (``fetch_image``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from oddeye.frames import Alert, Frame, ScoredFrame
from oddeye.pipeline.alerts import AlertTracker
from oddeye.pipeline.scoring import BatchResult
from oddeye.pipeline.telemetry import Telemetry
from oddeye.sinks.base import Sink

__all__ = ["BatchOutcome", "ResultHandler"]

log = logging.getLogger(__name__)


@dataclass
class BatchOutcome:
    """What became of a batch's frames: finished (by source index → tokens) or to dead-letter."""

    finished: dict[int, list[int]] = field(default_factory=dict)
    dead: dict[int, list[tuple[int, str, str]]] = field(default_factory=dict)
    """source index → [(token, error, reason)]"""
    unconfirmed: int = 0
    """Frames written to a confirming sink that raised: never acknowledged (re-delivered after a restart)."""


class ResultHandler:
    """Turns model results into scored frames, alert events, sink writes and metrics."""

    def __init__(
        self,
        sinks: Sequence[Sink],
        alerts: AlertTracker,
        telemetry: Telemetry,
        threshold_for: Callable[[str], float | str],
        snapshots: Any = None,
        fetch_image: Callable[[Frame], np.ndarray | None] | None = None,
    ) -> None:
        self.sinks = list(sinks)
        self.alerts = alerts
        self.telemetry = telemetry
        self.threshold_for = threshold_for
        self.snapshots = snapshots
        self.fetch_image = fetch_image
        self.scored = 0
        self.alerts_opened = 0
        self.dropped: dict[str, int] = {}
        self._known: set[str] = set()
        for sink in self.sinks:
            telemetry.register_sink(type(sink).__name__)

    # ------------------------------------------------------------------ batches
    def handle(self, frames: list[Frame], res: BatchResult) -> BatchOutcome:
        out = BatchOutcome()
        t = self.telemetry
        if res.error is not None:
            t.actor_result("model", not res.error.startswith("model actor"))
            reason = "model_actor_died" if res.error.startswith("model actor") else "model_error"
            for f in frames:
                out.dead.setdefault(f.meta.get("_source", 0), []).append((f.meta["_token"], res.error, reason))
            return out
        t.actor_result("model", True)
        if res.camera_models or res.head_bytes is not None:
            t.camera_models(res.model, res.camera_models, res.swaps, res.head_bytes, res.worker, res.refits)
        skipped = res.skipped or {}
        for i, reason in skipped.items():
            # Not scored on purpose (a video model's clip still filling): counted, and finished.
            f = frames[i]
            t.frames_dropped.labels(f.camera_id, reason).inc()
            self.dropped[reason] = self.dropped.get(reason, 0) + 1
            out.finished.setdefault(f.meta.get("_source", 0), []).append(f.meta["_token"])
        for i, error in (res.failed or {}).items():
            f = frames[i]
            out.dead.setdefault(f.meta.get("_source", 0), []).append((f.meta["_token"], error, "model_error"))
        keep = [i for i in range(len(frames)) if i not in skipped and i not in (res.failed or {})]
        if not keep:
            return out
        t.batch_size.labels(res.model).observe(len(keep))
        t.inference_seconds.labels(res.model).observe(res.infer_s)
        now = time.time()
        maps = res.anomaly_maps or {}
        scored: list[ScoredFrame] = []
        for i in keep:
            f = frames[i]
            score = float(res.scores[i])
            threshold = self.threshold_for(f.camera_id)
            if threshold == "auto":  # the model decides (e.g. U-Flow's NFA test)
                label = bool(res.labels[i]) if res.labels is not None else False
            else:
                label = score >= threshold
            latency = now - f.meta.get("t_ingest", now)
            sf = ScoredFrame(
                camera_id=f.camera_id,
                seq=f.seq,
                timestamp=f.timestamp,
                score=score,
                label=label,
                model=res.model,
                latency_ms=latency * 1000.0,
                origin=f.origin,
                meta={k: v for k, v in f.meta.items() if k != "t_ingest" and not k.startswith("_")},
                image=None,
                anomaly_map=maps.get(i),
                boxes=None if res.boxes is None else res.boxes[i],
            )
            sf.meta["_frame"] = f  # for a snapshot's pixels; not part of any wire format
            if i in res.model_versions:  # scope camera: the head version, carried into alert events
                sf.meta["model_version"] = res.model_versions[i]
            scored.append(sf)
            if f.camera_id not in self._known:  # every per-camera series exists from the first frame, at 0
                self._known.add(f.camera_id)
                t.register_camera(f.camera_id, res.model)
            t.anomaly_score.labels(f.camera_id, res.model).observe(score)
            t.last_score.labels(f.camera_id, res.model).set(score)
            t.end_to_end.labels(f.camera_id).observe(latency)
            for alert in self.alerts.update(sf):
                self.emit_alert(alert, sf)
        for sf in scored:
            sf.meta.pop("_frame", None)
        failed_confirming = False
        for sink in self.sinks:
            if not self.safe(sink, "write", scored) and getattr(sink, "acknowledges", False):
                failed_confirming = True
        for sf in scored:
            t.frames_scored.labels(sf.camera_id, sf.model).inc()
        t.record_sinks(self.sinks)
        self.scored += len(scored)
        if failed_confirming:
            # Not delivered: never acknowledged, so the source delivers these frames again after a restart.
            out.unconfirmed = len(keep)
            log.error("%d frame(s) not written to a confirming sink: left unacknowledged", len(keep))
        else:
            for i in keep:
                f = frames[i]
                out.finished.setdefault(f.meta.get("_source", 0), []).append(f.meta["_token"])
        return out

    # ------------------------------------------------------------------ alerts, dead letters
    def emit_alert(self, alert: Alert, frame: ScoredFrame | None) -> None:
        if alert.state == "open":
            self.alerts_opened += 1
            if self.snapshots is not None and frame is not None:
                self._snapshot(alert, frame)
        t = self.telemetry
        t.alerts.labels(alert.camera_id, alert.model, alert.state).inc()
        t.alerts_open.labels(alert.camera_id, alert.model).set(int(alert.camera_id in self.alerts.open_alert_ids()))
        for sink in self.sinks:
            self.safe(sink, "write_alert", alert)

    def _snapshot(self, alert: Alert, sf: ScoredFrame) -> None:
        source = sf.meta.get("_frame")
        image = None
        if self.fetch_image is not None and source is not None:
            try:
                image = self.fetch_image(source)
            except Exception as e:
                log.warning("snapshot of %s/%s: frame no longer available (%s)", sf.camera_id, sf.seq, e)
        if image is None:
            return
        sf.image = image
        try:
            alert.snapshot = self.snapshots.save(alert, sf)
            self.alerts.set_snapshot(alert.camera_id, alert.snapshot)
        except Exception:
            self.telemetry.sink_errors.labels(type(self.snapshots).__name__).inc()
            log.exception("writing the snapshot of alert %s failed", alert.alert_id)
        finally:
            sf.image = None

    def dead_letter(self, frame: Frame, error: str, reason: str) -> None:
        """Record a dead letter in metrics and the sinks (the source's own DLQ already has it)."""
        self.telemetry.dead_letters.labels(frame.camera_id, reason).inc()
        log.warning("dead letter %s/%s (%s): %s", frame.camera_id, frame.seq, reason, error)
        for sink in self.sinks:
            self.safe(sink, "write_dead_letter", frame, error)

    def expire_idle(self) -> None:
        """Forget cameras idle past the alert tracker's ``idle_expire_s``: close their alerts, drop their series."""

        expired: list[str] = []
        for alert in self.alerts.expire_idle(on_expire=expired.append):
            self.emit_alert(alert, None)
        for camera_id in expired:  # after the close events, which update the camera's series once more
            self._known.discard(camera_id)
            self.telemetry.forget_camera(camera_id)

    def close_all(self) -> None:
        for alert in self.alerts.close_all():
            self.emit_alert(alert, None)

    def safe(self, sink: Sink, method: str, *args: Any) -> bool:
        """Call a sink method; an error is counted and logged, never raised. Returns success."""
        try:
            getattr(sink, method)(*args)
            return True
        except Exception:
            self.telemetry.sink_errors.labels(type(sink).__name__).inc()
            log.exception("%s.%s failed", type(sink).__name__, method)
            return False
