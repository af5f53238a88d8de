"""The driver: builds the Ray actor graph from a config, moves frames through it, stops cleanly.

Data path: ingest actors (one per source) → batcher (here) → model actors (replicas)
→ alert logic and sinks (here). In-flight work is bounded at every step: each ingest
actor has one outstanding ``take`` and a bounded queue with its drop policy; the batcher
holds at most a few batches; each model replica has at most ``max_inflight_batches``.
Results are handled in submission order, so every camera's frames reach the alert
logic and the sinks in sequence even with several replicas.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
import time
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from oddeye.config import OddeyeConfig
from oddeye.frames import Alert, Frame, ScoredFrame
from oddeye.pipeline.actors import IngestActor, ModelActor, ensure_ray, model_actor_options
from oddeye.pipeline.alerts import AlertPolicy, AlertTracker
from oddeye.pipeline.batching import Batcher
from oddeye.pipeline.builders import build_sinks, build_source, camera_label, drop_policy_for
from oddeye.pipeline.ingest import DeadLetter, IngestStats, TakeResult
from oddeye.pipeline.scoring import BatchResult
from oddeye.pipeline.telemetry import Telemetry
from oddeye.sinks.base import Sink

log = logging.getLogger(__name__)

ACK_INTERVAL_S = 0.2  # how often finished frames are acknowledged to their sources (offset commits)


class PipelineError(RuntimeError):
    """The pipeline cannot start or run (a source cannot be opened, the model fails to load)."""


@dataclass
class RunSummary:
    """What happened in a run; every ingested frame is scored, dead-lettered or dropped."""

    stop_reason: str = ""
    ingested: int = 0
    scored: int = 0
    dead_letters: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    alerts_opened: int = 0
    clip_resets: dict[str, int] = field(default_factory=dict)
    """Video models: per-camera clip buffers restarted, by reason (seq_gap, seq_reordered, ...)."""
    per_camera: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics_port: int | None = None
    seconds: float = 0.0
    stream_seconds: float = 0.0
    """From the first frame the driver received to the last result written (excludes start-up)."""

    @property
    def frames_per_s(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Source:
    index: int
    camera_id: str
    actor: Any
    config_index: int = 0
    take_ref: Any = None
    want: int = 0
    done: bool = False
    stats: IngestStats | None = None


@dataclass
class _Inflight:
    ref: Any
    replica: int
    frames: list[Frame]
    result: BatchResult | None = None


class Pipeline:
    """Runs one config until its sources end, a limit is reached, or ``stop()`` is called."""

    def __init__(
        self,
        cfg: OddeyeConfig,
        out_dir: str | Path = "oddeye-out",
        max_frames: int | None = None,
        duration: float | None = None,
        idle_timeout: float | None = None,
        extra_sinks: Sequence[Sink] = (),
    ) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.max_frames = max_frames
        self.duration = duration
        self.idle_timeout = idle_timeout
        self.extra_sinks = list(extra_sinks)
        self.telemetry = Telemetry()
        self.summary = RunSummary()
        self._stop_reason: str | None = None
        self._stop_event = threading.Event()
        self._thresholds: dict[str, float] = {}
        self._handle_signals = False
        self._batcher: Batcher | None = None
        self._inflight: deque[_Inflight] = deque()
        self._pending_acks: dict[int, list[tuple[str, int, dict]]] = {}
        self._last_ack_t = 0.0
        self._delivery_failing = False
        self._ack_refs: list[Any] = []
        self._t_first_frame: float | None = None
        self._clip_resets: dict[int, dict[str, int]] = {}

    # ------------------------------------------------------------------ control
    def stop(self, reason: str = "stopped") -> None:
        """Ask the pipeline to finish: in-flight frames are scored and written, sinks flushed."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self._stop_event.set()

    def install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM stop cleanly; a second SIGINT aborts. Call from the main thread.

        Installed when the run starts, after ``ray.init`` (which sets handlers of its own).
        """
        self._handle_signals = True

    def _install_signal_handlers(self) -> None:

        def handler(signum: int, _frame: Any) -> None:
            if self._stop_event.is_set() and signum == signal.SIGINT:
                raise KeyboardInterrupt
            log.warning("%s received: finishing in-flight frames and flushing sinks", signal.Signals(signum).name)
            self.stop(signal.Signals(signum).name)

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    # ------------------------------------------------------------------ setup
    def _start(self) -> None:
        cfg = self.cfg
        ensure_ray(cfg.ray)
        if self._handle_signals:
            self._install_signal_handlers()
        ckpt = Path(cfg.model.checkpoint)
        if not ckpt.is_file():
            raise PipelineError(
                f"no fitted model at model.checkpoint={ckpt}; fit one first with: oddeye fit CONFIG "
                "(or point model.checkpoint at an existing checkpoint with --set model.checkpoint=PATH)"
            )
        cuda = cfg.model.device.startswith("cuda") or (
            cfg.model.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0
        )
        device = cfg.model.device if cfg.model.device != "auto" else ("cuda" if cuda else "cpu")
        opts = model_actor_options(cfg.model, cuda)
        # Ship the checkpoint through the object store: model actors on other nodes of a
        # cluster need not see this machine's files.
        ckpt_ref = ray.put(ckpt.read_bytes())
        self.replicas = [
            ModelActor.options(**opts).remote(ckpt_ref, device, cfg.model.num_threads)
            for _ in range(cfg.model.replicas)
        ]
        try:
            infos = ray.get([r.info.remote() for r in self.replicas])
        except ray.exceptions.RayActorError as e:
            raise PipelineError(f"the model actor failed to start: {_cause(e)}") from None
        self.model_name = infos[0]["model"]
        self.is_video = bool(infos[0].get("is_video"))
        self.image_size = tuple(infos[0]["image_size"])
        log.info("model %s on %s × %d, input %s", self.model_name, infos[0]["device"], len(infos), self.image_size)

        self.sources: list[_Source] = []
        for i, scfg in enumerate(cfg.sources):
            label = camera_label(scfg, i)
            copies = getattr(scfg, "replicas", 1)  # Kafka: members of one consumer group share the partitions
            for k in range(copies):
                cam = label if copies == 1 else f"{label}-{k}"
                actor = IngestActor.remote(
                    functools.partial(build_source, scfg), cam, self.image_size, drop_policy_for(scfg), scfg.queue_size
                )
                self.sources.append(_Source(len(self.sources), cam, actor, config_index=i))
        started = ray.get([s.actor.start.remote() for s in self.sources])
        errors = [
            f"sources.{s.config_index} ({s.camera_id}): {r['error']}"
            for s, r in zip(self.sources, started, strict=True)
            if not r["ok"]
        ]
        if errors:
            self._teardown_actors()
            raise PipelineError("cannot open source(s):\n  " + "\n  ".join(errors))

        self.sinks, self.snapshots = build_sinks(cfg.sinks, self.out_dir)
        self.sinks += self.extra_sinks
        policy = AlertPolicy(**cfg.alerts.policy_for())
        overrides = {cam: AlertPolicy(**cfg.alerts.policy_for(cam)) for cam in cfg.alerts.cameras}
        self.alerts = AlertTracker(policy, model=self.model_name, overrides=overrides)
        if cfg.metrics.enabled:
            self.summary.metrics_port = self.telemetry.serve(cfg.metrics.host, cfg.metrics.port)

    # ------------------------------------------------------------------ main loop
    def run(self) -> RunSummary:
        t_start = time.monotonic()
        self._start()
        b = self.cfg.batching
        batcher = self._batcher = Batcher(b.max_batch_size, b.max_wait_ms)
        inflight = self._inflight
        per_replica = [0] * len(self.replicas)
        capacity = b.max_batch_size * len(self.replicas) * b.max_inflight_batches
        taken = 0
        last_frame_t = time.monotonic()
        take_timeout = max(0.005, min(0.1, b.max_wait_ms / 1000.0))
        try:
            while True:
                now = time.monotonic()
                if self._stop_reason is None:
                    if self.duration is not None and now - t_start >= self.duration:
                        self.stop("duration")
                    elif self.idle_timeout is not None and now - last_frame_t >= self.idle_timeout:
                        self.stop("idle_timeout")
                stopping = self._stop_reason is not None
                # 1. ask sources for frames while there is room downstream
                if not stopping:
                    budget = None
                    if self.max_frames is not None:
                        budget = self.max_frames - taken - sum(s.want for s in self.sources if s.take_ref is not None)
                    for s in self.sources:
                        if s.done or s.take_ref is not None:
                            continue
                        room = capacity - len(batcher)
                        want = min(b.max_batch_size, room, budget if budget is not None else room)
                        if want <= 0:
                            break
                        s.take_ref, s.want = s.actor.take.remote(want, take_timeout), want
                        if budget is not None:
                            budget -= want
                # 2. dispatch ready batches to replicas with room
                while batcher.ready(flush=stopping or self._all_sources_done()):
                    if self.is_video:
                        # A camera always goes to the same replica: its clip buffer lives there.
                        if max(per_replica) >= b.max_inflight_batches:
                            break
                        groups: dict[int, list[Frame]] = {}
                        for f in batcher.pop():
                            groups.setdefault(zlib.crc32(f.camera_id.encode()) % len(self.replicas), []).append(f)
                    else:
                        replica = min(range(len(self.replicas)), key=per_replica.__getitem__)
                        if per_replica[replica] >= b.max_inflight_batches:
                            break
                        groups = {replica: batcher.pop()}
                    for replica, frames in groups.items():
                        inflight.append(_Inflight(self.replicas[replica].score.remote(frames), replica, frames))
                        per_replica[replica] += 1
                self.telemetry.queue_depth.labels("batcher").set(len(batcher))
                self.telemetry.queue_depth.labels("inference").set(sum(len(x.frames) for x in inflight))
                # 3. finished?
                pending_takes = [s.take_ref for s in self.sources if s.take_ref is not None]
                if not pending_takes and not inflight and not len(batcher):
                    if self._all_sources_done():
                        self.stop("sources_exhausted")
                        break
                    if stopping:
                        break
                if self.max_frames is not None and taken >= self.max_frames and not self._stop_reason:
                    self.stop("max_frames")
                # 4. wait for something to finish
                refs = pending_takes + [x.ref for x in inflight if x.result is None]
                # Wake up for the batcher's deadline only if a replica could take the batch;
                # otherwise wait for results (never spin: the driver shares the CPUs).
                room = min(per_replica) < b.max_inflight_batches
                wait_s = batcher.time_to_ready() if room else None
                timeout = 0.05 if wait_s is None else max(0.001, min(0.05, wait_s))
                done, _ = ray.wait(refs, num_returns=1, timeout=timeout) if refs else ([], [])
                if not refs:
                    self._stop_event.wait(timeout)
                if done:
                    done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                done_set = set(done)
                for s in self.sources:
                    if s.take_ref is not None and s.take_ref in done_set:
                        res = self._get_take(s)
                        for f in res.frames:
                            f.meta["_source"] = s.index
                        if res.frames:
                            last_frame_t = time.monotonic()
                            if self._t_first_frame is None:
                                self._t_first_frame = last_frame_t
                            taken += len(res.frames)
                            batcher.add(res.frames)
                        if res.exhausted:
                            s.done = True
                for x in inflight:
                    if x.result is None and x.ref in done_set:
                        x.result = self._get_score(x)
                while inflight and inflight[0].result is not None:
                    x = inflight.popleft()
                    per_replica[x.replica] -= 1
                    if x.result.clip_resets:
                        self._clip_resets[x.replica] = x.result.clip_resets
                    self._handle_result(x.frames, x.result)
                    if self._t_first_frame is not None:
                        self.summary.stream_seconds = time.monotonic() - self._t_first_frame
        finally:
            self._finish()
        self.summary.seconds = time.monotonic() - t_start
        return self.summary

    def _all_sources_done(self) -> bool:
        return all(s.done for s in self.sources)

    # ------------------------------------------------------------------ results
    def _get_take(self, s: _Source) -> TakeResult:
        ref, s.take_ref = s.take_ref, None
        try:
            res: TakeResult = ray.get(ref)
        except ray.exceptions.RayError as e:
            log.error("ingest actor for %s failed: %s", s.camera_id, _cause(e))
            self.telemetry.actor_result("ingest", False, s.camera_id)
            s.done = True
            return TakeResult([], [], s.stats or IngestStats(s.camera_id), True, str(e))
        if res.error and res.exhausted:
            log.error("source %s ended with an error: %s", s.camera_id, res.error)
        self._record_ingest(s, res.stats)
        for dead in res.dead_letters:
            self._dead_letter(dead)
        return res

    def _get_score(self, x: _Inflight) -> BatchResult:
        try:
            return ray.get(x.ref)
        except ray.exceptions.RayError as e:
            return BatchResult(None, None, None, 0.0, self.model_name, f"model actor failed: {_cause(e)}")  # type: ignore[arg-type]

    def _record_ingest(self, s: _Source, stats: IngestStats) -> None:
        s.stats = stats
        t = self.telemetry
        t.add_cumulative(t.frames_ingested, (s.camera_id,), stats.ingested)
        t.add_cumulative(t.decode_errors, (s.camera_id,), stats.decode_errors)
        t.add_cumulative(t.source_reconnects, (s.camera_id,), stats.reconnects)
        t.add_dropped(s.camera_id, stats.dropped)
        t.queue_depth.labels(f"ingest:{s.camera_id}").set(stats.queue_depth)
        t.source_up.labels(s.camera_id).set(1 if stats.source_up else 0)
        t.actor_result("ingest", True, s.camera_id)
        for partition, lag in stats.lag.items():
            t.kafka_lag.labels(s.camera_id, partition).set(lag)

    def _dead_letter(self, dead: DeadLetter) -> None:
        self.summary.dead_letters += 1
        self.telemetry.dead_letters.labels(dead.frame.camera_id, dead.reason).inc()
        log.warning("dead letter %s/%s: %s", dead.frame.camera_id, dead.frame.seq, dead.error)
        for sink in self.sinks:
            self._safe(sink, "write_dead_letter", dead.frame, dead.error)

    def _handle_result(self, frames: list[Frame], res: BatchResult) -> None:
        t = self.telemetry
        if res.error is not None:
            t.actor_result("model", not res.error.startswith("model actor failed"))
            for f in frames:
                self._dead_letter(DeadLetter(f, res.error, reason="model_error"))
            return
        t.actor_result("model", True)
        if res.skipped:
            # Not scored on purpose (a video model's clip still filling): counted, and finished.
            for i, reason in res.skipped.items():
                t.frames_dropped.labels(frames[i].camera_id, reason).inc()
                self.summary.dropped[reason] = self.summary.dropped.get(reason, 0) + 1
            self._ack([frames[i] for i in res.skipped])
            frames = [f for i, f in enumerate(frames) if i not in res.skipped]
            res = _without(res, res.skipped)
            if not frames:
                return
        t.batch_size.labels(res.model).observe(len(frames))
        t.inference_seconds.labels(res.model).observe(res.infer_s)
        now = time.time()
        scored: list[ScoredFrame] = []
        for i, f in enumerate(frames):
            latency = now - f.meta.get("t_ingest", now)
            sf = ScoredFrame(
                camera_id=f.camera_id,
                seq=f.seq,
                timestamp=f.timestamp,
                score=float(res.scores[i]),
                label=bool(res.scores[i] >= self._threshold(f.camera_id)),
                model=res.model,
                latency_ms=latency * 1000.0,
                origin=f.origin,
                meta={k: v for k, v in f.meta.items() if k != "t_ingest" and not k.startswith("_")},
                image=f.image,
                anomaly_map=None if res.anomaly_maps is None else res.anomaly_maps[i],
                boxes=None if res.boxes is None else res.boxes[i],
            )
            scored.append(sf)
            t.camera_seen(f.camera_id, res.model)
            t.anomaly_score.labels(f.camera_id, res.model).observe(sf.score)
            t.last_score.labels(f.camera_id, res.model).set(sf.score)
            t.end_to_end.labels(f.camera_id).observe(latency)
            for alert in self.alerts.update(sf):
                self._emit_alert(alert, sf)
        for sink in self.sinks:
            self._safe(sink, "write", scored)
        for f in scored:
            t.frames_scored.labels(f.camera_id, f.model).inc()
        t.record_sinks(self.sinks)
        self.summary.scored += len(scored)
        self._ack(frames)

    def _threshold(self, camera_id: str) -> float:
        if camera_id not in self._thresholds:
            self._thresholds[camera_id] = self.cfg.alerts.policy_for(camera_id)["threshold"]
        return self._thresholds[camera_id]

    def _emit_alert(self, alert: Alert, frame: ScoredFrame | None) -> None:
        if alert.state == "open":
            self.summary.alerts_opened += 1
            if self.snapshots is not None and frame is not None:
                alert.snapshot = self.snapshots.save(alert, frame)
                self.alerts.set_snapshot(alert.camera_id, alert.snapshot)
        t = self.telemetry
        t.alerts.labels(alert.camera_id, alert.model, alert.state).inc()
        t.alerts_open.labels(alert.camera_id, alert.model).set(int(alert.camera_id in self.alerts.open_alert_ids()))
        for sink in self.sinks:
            self._safe(sink, "write_alert", alert)

    def _ack(self, frames: list[Frame]) -> None:
        """Queue acknowledgements; they go out after the acknowledging sinks confirm delivery."""
        for f in frames:
            self._pending_acks.setdefault(f.meta.get("_source", 0), []).append((f.camera_id, f.seq, f.origin))
        if time.monotonic() - self._last_ack_t >= ACK_INTERVAL_S:
            self._send_acks()

    def _send_acks(self) -> None:
        """At-least-once: flush the sinks that must confirm delivery, then let sources commit."""
        self._last_ack_t = time.monotonic()
        if not self._pending_acks:
            return
        for sink in self.sinks:
            if getattr(sink, "acknowledges", False):
                try:
                    sink.flush()
                except Exception as e:
                    # Not delivered: keep the acks, so the source re-delivers these frames after a restart.
                    self.telemetry.sink_errors.labels(type(sink).__name__).inc()
                    if not self._delivery_failing:
                        log.warning(
                            "%s could not confirm delivery (%s); offsets not committed until it does",
                            type(sink).__name__,
                            e,
                        )
                    self._delivery_failing = True
                    return
        if self._delivery_failing:
            log.info("sinks confirm delivery again; committing offsets")
            self._delivery_failing = False
        pending, self._pending_acks = self._pending_acks, {}
        for index, items in pending.items():
            self._ack_refs.append(self.sources[index].actor.ack.remote(items))
        if len(self._ack_refs) > 64:  # forget the ones already done
            _, self._ack_refs = ray.wait(self._ack_refs, num_returns=len(self._ack_refs), timeout=0)

    def _safe(self, sink: Sink, method: str, *args: Any) -> None:
        try:
            getattr(sink, method)(*args)
        except Exception:
            self.telemetry.sink_errors.labels(type(sink).__name__).inc()
            log.exception("%s.%s failed", type(sink).__name__, method)

    # ------------------------------------------------------------------ shutdown
    def _finish(self) -> None:
        if not hasattr(self, "sources"):
            self.telemetry.stop()
            return
        # Only an exception leaves frames between the stages; count them, never lose them silently.
        unfinished = [f for x in self._inflight for f in x.frames]
        if self._batcher is not None:
            while len(self._batcher):
                unfinished += self._batcher.pop()
        if unfinished:
            log.error("aborted with %d frame(s) in flight; counted as dropped (aborted)", len(unfinished))
            self.summary.dropped["aborted"] = self.summary.dropped.get("aborted", 0) + len(unfinished)
            for f in unfinished:
                self.telemetry.frames_dropped.labels(f.camera_id, "aborted").inc()
        for alert in self.alerts.close_all():
            self._emit_alert(alert, None)
        self._send_acks()
        if self._pending_acks:
            log.error(
                "delivery not confirmed: %d frame(s) left uncommitted (they will be re-delivered)",
                sum(map(len, self._pending_acks.values())),
            )
        else:
            # Wait until every ack reached its source (threaded actors run calls in any order),
            # so the sources commit them before they are stopped.
            try:
                ray.get(self._ack_refs, timeout=30)
            except ray.exceptions.RayError as e:
                log.error("could not confirm acknowledgements: %s", _cause(e))
        final = []
        for s in self.sources:
            try:
                final.append(ray.get(s.actor.stop.remote(), timeout=30))
            except Exception as e:
                log.error("stopping ingest for %s: %s", s.camera_id, _cause(e))
                final.append(s.stats)
        for s, stats in zip(self.sources, final, strict=False):
            if stats is not None:
                self._record_ingest(s, stats)
                self.summary.ingested += stats.ingested
                for reason, n in stats.dropped.items():
                    self.summary.dropped[reason] = self.summary.dropped.get(reason, 0) + n
                self.summary.per_camera[s.camera_id] = {
                    "ingested": stats.ingested,
                    "dropped": dict(stats.dropped),
                    "dead_letters": stats.dead_letters,
                }
            self.telemetry.source_up.labels(s.camera_id).set(0)
        for resets in self._clip_resets.values():
            for reason, n in resets.items():
                self.summary.clip_resets[reason] = self.summary.clip_resets.get(reason, 0) + n
        if self.summary.clip_resets:
            log.info("clip buffers reset: %s", self.summary.clip_resets)
        self.summary.stop_reason = self._stop_reason or "stopped"
        for sink in self.sinks:
            self._safe(sink, "close")
        self._teardown_actors()
        log.info(
            "stopped (%s): %d ingested, %d scored, %d dead letters, dropped %s, %d alerts",
            self.summary.stop_reason,
            self.summary.ingested,
            self.summary.scored,
            self.summary.dead_letters,
            self.summary.dropped or "none",
            self.summary.alerts_opened,
        )

    def _teardown_actors(self) -> None:
        for actor in [s.actor for s in getattr(self, "sources", [])] + list(getattr(self, "replicas", [])):
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                log.debug("kill failed", exc_info=True)

    def close(self) -> None:
        """Stop serving metrics (call after reading them, e.g. in tests)."""
        self.telemetry.stop()


def _without(res: BatchResult, skipped: dict[int, str]) -> BatchResult:
    """The result restricted to the frames that were scored."""
    keep = [i for i in range(len(res.scores)) if i not in skipped]
    return BatchResult(
        scores=res.scores[keep],
        anomaly_maps=None if res.anomaly_maps is None else res.anomaly_maps[keep],
        boxes=None if res.boxes is None else [res.boxes[i] for i in keep],
        infer_s=res.infer_s,
        model=res.model,
        clip_resets=res.clip_resets,
    )


def _cause(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    tail = [ln for ln in text if ln.strip()][-1:] or [type(e).__name__]
    return tail[0]
