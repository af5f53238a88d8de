"""The driver loop: builds the Ray actor graph from a config, routes frame references, stops cleanly.

Data path: ingest actors (one per source) → batcher (here, references and metadata only) →
model actors (replicas, fetching pixels from the object store) → results (``results.py``:
alerts, sinks, metrics) → acknowledgements (``acks.py``: back to the sources once the
confirming sinks deliver). In-flight work is bounded at every step, and a saturated sink
stops the intake (back-pressure) instead of growing memory. Results are handled in
submission order, so every camera's frames reach the alert logic and the sinks in sequence.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from oddeye.config import KafkaSourceConfig, OddeyeConfig
from oddeye.frames import Frame
from oddeye.models.base import CheckpointError
from oddeye.pipeline.acks import AckTracker
from oddeye.pipeline.actors import (
    CameraHeadsActor,
    CheckpointStore,
    ModelActor,
    RayStartError,
    ensure_ray,
    ingest_actor_options,
    model_actor_options,
)
from oddeye.pipeline.alerts import AlertPolicy, AlertTracker
from oddeye.pipeline.batching import Batcher
from oddeye.pipeline.builders import build_sinks, build_source, camera_label, decode_workers_for, drop_policy_for
from oddeye.pipeline.camera_scoring import camera_actor_kwargs, open_model_directory
from oddeye.pipeline.ingest import IngestStats, TakeResult
from oddeye.pipeline.ingest_actor import IngestActor
from oddeye.pipeline.results import BatchOutcome, ResultHandler
from oddeye.pipeline.scoring import BatchResult
from oddeye.pipeline.telemetry import Telemetry
from oddeye.sinks.base import Sink

log = logging.getLogger(__name__)

MAX_CRASH_RETRIES = 2  # a batch whose replica crashed is scored again this often, then dead-lettered
ACK_INTERVAL_S = 0.2  # how often confirmed frames are acknowledged to their sources, even when idle
EXPIRY_INTERVAL_S = 10.0  # how often idle cameras' alert state and metric series are dropped


class PipelineError(RuntimeError):
    """The pipeline cannot start or run (a source cannot be opened, the model fails to load or died)."""


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
    error: str | None = None
    """Set when the run ended on a failure (e.g. every model replica died): the CLI exits 1."""
    placement: dict[str, Any] = field(default_factory=dict)
    """Ray node ids of the model replicas and ingest actors."""

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
    parts: list[tuple[Any, list[int]]]
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
        self._thresholds: dict[str, float | str] = {}
        self._handle_signals = False
        self._batcher: Batcher | None = None
        self._inflight: deque[_Inflight] = deque()
        self._acks: AckTracker | None = None
        self._last_ack_t = 0.0
        self._last_expiry_t = time.monotonic()
        self._ack_refs: list[Any] = []
        self._t_first_frame: float | None = None
        self._clip_resets: dict[int, dict[str, int]] = {}
        self._dead_replicas: set[int] = set()
        self._restarting: dict[int, tuple[Any, float]] = {}
        """Replicas whose actor crashed: (pending ``info`` call, deadline) while Ray restarts them."""
        self._store: Any = None
        self.results: ResultHandler | None = None

    # ------------------------------------------------------------------ control
    def stop(self, reason: str = "stopped") -> None:
        """Ask the pipeline to finish: in-flight frames are scored and written, sinks flushed."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self._stop_event.set()

    def install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM stop cleanly; a second SIGINT aborts. Installed after ``ray.init``."""
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
        try:
            ensure_ray(cfg.ray)
        except RayStartError as e:
            raise PipelineError(str(e)) from None
        if self._handle_signals:
            self._install_signal_handlers()
        checkpoint = self._checkpoint_bytes()
        cluster = ray.cluster_resources()
        cuda = cfg.model.device.startswith("cuda") or (cfg.model.device == "auto" and cluster.get("GPU", 0) > 0)
        device = cfg.model.device if cfg.model.device != "auto" else ("cuda" if cuda else "cpu")
        opts = model_actor_options(cfg.model, cuda)
        self._check_resources(opts, cluster)
        # The checkpoint travels through a named holder in the object store: model actors on other
        # nodes need not see this machine's files, and a restarted actor fetches it again.
        store_name = f"oddeye-checkpoint-{uuid.uuid4().hex[:12]}"
        namespace = ray.get_runtime_context().namespace
        # On the driver's node: a holder on a worker node would die with it, and restarted model
        # actors could not fetch their checkpoint. Hard affinity: Ray places a soft-affine actor that
        # asks for no resources (this one) on a random node (ray-project/ray#25344 fixed hard only).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._store = CheckpointStore.options(name=store_name, scheduling_strategy=here).remote(checkpoint)
        thresholds = [cfg.alerts.policy_for()["threshold"]] + [
            cfg.alerts.policy_for(c)["threshold"] for c in cfg.alerts.cameras
        ]
        numeric = [t for t in thresholds if t != "auto"]
        # Maps come back for frames that can open or keep an alert: at or above the lowest threshold
        # less the hysteresis, or (threshold: auto) labelled anomalous by the model itself.
        map_threshold = min(numeric) - cfg.alerts.hysteresis if numeric else 2.0
        labels_alert = "auto" in thresholds
        actor_cls, extra = (
            (CameraHeadsActor, camera_actor_kwargs(cfg))
            if cfg.model.scope == "camera"
            else (
                ModelActor,
                {
                    "backend": cfg.model.backend,
                    "batch_size": cfg.batching.max_batch_size,
                    "precision": cfg.model.precision,
                    "compile": cfg.model.compile,
                },
            )
        )
        self.replicas = [
            actor_cls.options(**opts).remote(
                store_name,
                namespace,
                device,
                cfg.model.num_threads,
                map_threshold=map_threshold,
                labels_alert=labels_alert,
                **extra,
            )
            for _ in range(cfg.model.replicas)
        ]
        infos = self._wait_for_replicas(opts, cluster)
        self.model_name = infos[0]["model"]
        self.is_video = bool(infos[0].get("is_video"))
        # Video models keep a clip buffer per camera, per-camera heads live where they were loaded or fitted.
        self.routes_by_camera = self.is_video or bool(infos[0].get("routes_by_camera"))
        self.image_size = tuple(infos[0]["image_size"])
        self.summary.placement["model"] = [i.get("node_id") for i in infos]
        log.info(
            "model %s on %s × %d (%d thread(s) each), input %s",
            self.model_name,
            infos[0]["device"],
            len(infos),
            infos[0].get("num_threads", 0),
            self.image_size,
        )

        self.sources: list[_Source] = []
        for i, scfg in enumerate(cfg.sources):
            label = camera_label(scfg, i)
            copies = getattr(scfg, "replicas", 1)  # Kafka: members of one consumer group share the partitions
            lossy_ok = not isinstance(scfg, KafkaSourceConfig) or scfg.allow_skip
            for k in range(copies):
                cam = label if copies == 1 else f"{label}-{k}"
                actor = IngestActor.options(**ingest_actor_options(getattr(scfg, "resources", {}))).remote(
                    functools.partial(build_source, scfg),
                    cam,
                    self.image_size,
                    drop_policy_for(scfg),
                    scfg.queue_size,
                    max_pixels=getattr(scfg, "max_pixels", None),
                    max_cameras=getattr(scfg, "max_cameras", None),
                    ack_dropped=lossy_ok,
                    decode_workers=decode_workers_for(scfg),
                )
                self.sources.append(_Source(len(self.sources), cam, actor, config_index=i))
        try:
            started = ray.get([s.actor.start.remote() for s in self.sources], timeout=cfg.model.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self._teardown_actors()
            raise PipelineError(
                f"ingest actors were not placed within {cfg.model.start_timeout_s:.0f} s: does the cluster offer "
                f"the resources of sources[*].resources? available: {_resources_text(ray.available_resources())}"
            ) from None
        errors = [
            f"sources.{s.config_index} ({s.camera_id}): {r['error']}"
            for s, r in zip(self.sources, started, strict=True)
            if not r["ok"]
        ]
        if errors:
            self._teardown_actors()
            raise PipelineError("cannot open source(s):\n  " + "\n  ".join(errors))

        self.sinks, snapshots = build_sinks(cfg.sinks, self.out_dir)
        self.sinks += self.extra_sinks
        self.want_maps = "all" if any(getattr(s, "wants_maps", False) for s in self.sinks) else "alerting"
        policy = AlertPolicy(**cfg.alerts.policy_for())
        overrides = {cam: AlertPolicy(**cfg.alerts.policy_for(cam)) for cam in cfg.alerts.cameras}
        alerts = AlertTracker(
            policy, model=self.model_name, overrides=overrides, idle_expire_s=cfg.alerts.idle_expire_s
        )
        self.results = ResultHandler(
            self.sinks, alerts, self.telemetry, self._threshold, snapshots=snapshots, fetch_image=self._fetch_image
        )
        self._acks = AckTracker(self.sinks)
        for s in self.sources:
            self.telemetry.register_camera(s.camera_id, self.model_name)
        if cfg.metrics.enabled:
            self.summary.metrics_port = self.telemetry.serve(cfg.metrics.host, cfg.metrics.port)

    def _checkpoint_bytes(self) -> bytes | None:
        """The fitted model the replicas load: ``model.checkpoint``, or with scope camera the ``model.default``
        fallback (None without one; the model directory is opened, or created, here before any replica starts)."""
        m = self.cfg.model
        if m.scope == "camera":
            try:
                open_model_directory(self.cfg)
            except (CheckpointError, ValueError) as e:
                raise PipelineError(f"model.directory: {e}") from None
            if m.on_missing != "default":
                return None
            if m.default is None or not Path(m.default).is_file():
                raise PipelineError(f"no fitted fallback model at model.default={m.default} (on_missing: default)")
            return Path(m.default).read_bytes()
        ckpt = Path(m.checkpoint)
        if not ckpt.is_file():
            raise PipelineError(
                f"no fitted model at model.checkpoint={ckpt}; fit one first with: oddeye fit CONFIG "
                "(or point model.checkpoint at an existing checkpoint with --set model.checkpoint=PATH)"
            )
        return ckpt.read_bytes()

    def _check_resources(self, opts: dict[str, Any], cluster: dict[str, float]) -> None:
        """Fail at once, naming the resource, when the cluster cannot hold the model actors at all."""
        n = self.cfg.model.replicas
        need = {"CPU": opts["num_cpus"] * n, "GPU": opts["num_gpus"] * n}
        need.update({k: v * n for k, v in (opts.get("resources") or {}).items()})
        missing = [
            f"{k}: {v:g} needed ({n} replica(s)), cluster has {cluster.get(k, 0):g}"
            for k, v in need.items()
            if v > 0 and cluster.get(k, 0) < v
        ]
        if missing:
            hint = ""
            if need["GPU"] > cluster.get("GPU", 0):
                hint = " (model.device is CUDA but the cluster has no such GPUs: use device: auto or cpu)"
            raise PipelineError(
                "the Ray cluster cannot place the model actor(s): "
                + "; ".join(missing)
                + hint
                + " — lower model.replicas/num_cpus/num_gpus/resources, or add nodes"
            )

    def _wait_for_replicas(self, opts: dict[str, Any], cluster: dict[str, float]) -> list[dict[str, Any]]:
        timeout = self.cfg.model.start_timeout_s
        try:
            return ray.get([r.info.remote() for r in self.replicas], timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            self._teardown_actors()
            raise PipelineError(
                f"the model actor(s) did not start within {timeout:.0f} s (model.start_timeout_s): "
                f"each needs CPU {opts['num_cpus']:g}, GPU {opts['num_gpus']:g}"
                + (f", {opts['resources']}" if opts.get("resources") else "")
                + f"; available now: {_resources_text(ray.available_resources())}"
            ) from None
        except ray.exceptions.RayActorError as e:
            self._teardown_actors()
            raise PipelineError(f"the model actor failed to start: {_cause(e)}") from None

    # ------------------------------------------------------------------ main loop
    def run(self) -> RunSummary:
        t_start = time.monotonic()
        try:
            self._start()
            self._loop(t_start)
        finally:
            self._finish()
        self.summary.seconds = time.monotonic() - t_start
        return self.summary

    def _loop(self, t_start: float) -> None:
        b = self.cfg.batching
        batcher = self._batcher = Batcher(b.max_batch_size, b.max_wait_ms)
        inflight = self._inflight
        per_replica = [0] * len(self.replicas)
        capacity = b.max_batch_size * len(self.replicas) * b.max_inflight_batches
        taken = 0
        last_frame_t = time.monotonic()
        take_timeout = max(0.005, min(0.1, b.max_wait_ms / 1000.0))
        acks = self._acks
        assert acks is not None and self.results is not None
        while True:
            now = time.monotonic()
            if inflight or len(batcher) or self._restarting:
                # Not idle while frames wait to be scored (a replica restarting after a node died can take
                # Ray tens of seconds to notice): the idle timeout counts from the last work, not the last frame.
                last_frame_t = now
            if self._stop_reason is None:
                if self.duration is not None and now - t_start >= self.duration:
                    self.stop("duration")
                elif self.idle_timeout is not None and now - last_frame_t >= self.idle_timeout:
                    self.stop("idle_timeout")
            stopping = self._stop_reason is not None
            saturated = acks.saturated
            self.telemetry.backpressure.set(int(saturated))
            # 1. ask sources for frames while there is room downstream (and the sinks keep up)
            if not stopping and not saturated:
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
            # 2. dispatch ready batches to live replicas with room
            self._poll_restarts()
            live = [i for i in range(len(self.replicas)) if i not in self._dead_replicas and i not in self._restarting]
            while live and batcher.ready(flush=stopping or self._all_sources_done()):
                if self.routes_by_camera:
                    # A camera always goes to the same replica: its clip buffer or its head lives there.
                    if max(per_replica[i] for i in live) >= b.max_inflight_batches:
                        break
                    groups: dict[int, list[Any]] = {}
                    for item in batcher.pop():
                        home = live[zlib.crc32(self._route_key(item[0].camera_id).encode()) % len(live)]
                        groups.setdefault(home, []).append(item)
                else:
                    replica = min(live, key=per_replica.__getitem__)
                    if per_replica[replica] >= b.max_inflight_batches:
                        break
                    groups = {replica: batcher.pop()}
                for replica, items in groups.items():
                    inflight.append(self._submit(replica, items))
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
            # 4. wait for something to finish (never spin: the driver shares the CPUs)
            refs = pending_takes + [x.ref for x in inflight if x.result is None]
            room = any(per_replica[i] < b.max_inflight_batches for i in live)
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
                    if res.frames:
                        last_frame_t = time.monotonic()
                        if self._t_first_frame is None:
                            self._t_first_frame = last_frame_t
                        taken += len(res.frames)
                        for f in res.frames:
                            f.meta["_source"] = s.index
                        batcher.add([(f, res.images, row) for row, f in enumerate(res.frames)])
                    if res.exhausted:
                        s.done = True
            for x in inflight:
                if x.result is None and x.ref in done_set:
                    x.result = self._get_score(x)
            while inflight and inflight[0].result is not None:
                x = inflight.popleft()
                per_replica[x.replica] -= 1
                if self._retry_after_crash(x, batcher):
                    continue
                if x.result.clip_resets:
                    self._clip_resets[x.replica] = x.result.clip_resets
                self._apply(self.results.handle(x.frames, x.result))
                if self._t_first_frame is not None:
                    self.summary.stream_seconds = time.monotonic() - self._t_first_frame
            if time.monotonic() - self._last_ack_t >= ACK_INTERVAL_S:
                self._send_acks()  # on a timer: an idle stream's last frames are committed too
            if time.monotonic() - self._last_expiry_t >= EXPIRY_INTERVAL_S:
                self._last_expiry_t = time.monotonic()
                self.results.expire_idle()
            if len(self._dead_replicas) == len(self.replicas):
                self.summary.error = "every model replica died and could not be restarted"
                raise PipelineError(self.summary.error)

    def _submit(self, replica: int, items: list[tuple[Frame, Any, int]]) -> _Inflight:
        """Send a batch to a model replica: light frame metadata plus (object ref, rows) per ingest chunk."""
        frames = [f for f, _, _ in items]
        parts: list[tuple[Any, list[int]]] = []
        for _, ref, row in items:
            if parts and parts[-1][0] is ref:
                parts[-1][1].append(row)
            else:
                parts.append((ref, [row]))
        light = [Frame(f.camera_id, f.seq, f.timestamp, None) for f in frames]  # type: ignore[arg-type]
        ref = self.replicas[replica].score_refs.remote(light, parts, self.want_maps)
        for f, chunk, row in items:
            f.meta["_chunk"] = (chunk, row)
        return _Inflight(ref, replica, frames, parts)

    def _route_key(self, camera_id: str) -> str:
        """What pins a camera to a replica: the camera, or with scope camera its head (a group's cameras together)."""
        if self.cfg.model.scope != "camera":
            return camera_id
        try:
            return self.cfg.model.head_key(camera_id)
        except ValueError:  # a camera in two groups: its replica reports its frames skipped
            return camera_id

    def _all_sources_done(self) -> bool:
        return all(s.done for s in self.sources)

    def _threshold(self, camera_id: str) -> float | str:
        if camera_id not in self._thresholds:
            self._thresholds[camera_id] = self.cfg.alerts.policy_for(camera_id)["threshold"]
        return self._thresholds[camera_id]

    def _fetch_image(self, frame: Frame) -> np.ndarray | None:
        """The pixels of one frame, fetched from the object store (only for alert snapshots)."""
        chunk = frame.meta.get("_chunk")
        if chunk is None:
            return None
        ref, row = chunk
        return np.array(ray.get(ref, timeout=10)[row])

    # ------------------------------------------------------------------ actor results
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
            self.summary.dead_letters += 1
            assert self.results is not None
            self.results.dead_letter(dead.frame, dead.error, dead.reason)
        return res

    def _get_score(self, x: _Inflight) -> BatchResult:
        try:
            return ray.get(x.ref)
        except ray.exceptions.RayError as e:
            cause = _cause(e)
            log.error("model replica %d failed on a batch of %d: %s", x.replica, len(x.frames), cause)
            self._check_replica(x.replica)
            return BatchResult(np.zeros(0, np.float32), None, None, 0.0, self.model_name, f"model actor died: {cause}")

    def _check_replica(self, i: int) -> None:
        """After a crash: watch (without blocking) for Ray's restart of the replica; until then it gets no batches."""
        if i in self._restarting or i in self._dead_replicas:
            return
        deadline = time.monotonic() + self.cfg.model.start_timeout_s
        self._restarting[i] = (self.replicas[i].info.remote(), deadline)

    def _poll_restarts(self) -> None:
        """A restarting replica is back when ``info`` answers; gone for good when Ray says it died or time runs out."""
        for i, (ref, deadline) in list(self._restarting.items()):
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                if time.monotonic() > deadline:
                    log.error("model replica %d did not come back within %.0f s", i, self.cfg.model.start_timeout_s)
                    del self._restarting[i]
                    self._dead_replicas.add(i)
                continue
            try:
                ray.get(ref)
            except ray.exceptions.ActorUnavailableError:  # still restarting: ask again
                if time.monotonic() < deadline:
                    self._restarting[i] = (self.replicas[i].info.remote(), deadline)
                    continue
                log.error("model replica %d did not come back within %.0f s", i, self.cfg.model.start_timeout_s)
            except ray.exceptions.RayError as e:
                log.error("model replica %d is gone for good: %s", i, _cause(e))
            else:
                log.warning("model replica %d restarted", i)
                del self._restarting[i]
                continue
            del self._restarting[i]
            self._dead_replicas.add(i)

    def _retry_after_crash(self, x: _Inflight, batcher: Batcher) -> bool:
        """A batch lost with its crashed replica is scored again elsewhere (a few times, then dead-lettered).

        A crash is an infrastructure failure, not bad data; a frame that keeps killing replicas
        still ends on the dead-letter path after ``MAX_CRASH_RETRIES``.
        """
        assert x.result is not None
        if x.result.error is None or not x.result.error.startswith("model actor died"):
            return False
        again = [f for f in x.frames if f.meta.get("_crashes", 0) < MAX_CRASH_RETRIES]
        if len(again) < len(x.frames) or len(self._dead_replicas) == len(self.replicas):
            return False
        for f in again:
            f.meta["_crashes"] = f.meta.get("_crashes", 0) + 1
        batcher.requeue([(f, *f.meta["_chunk"]) for f in again])
        log.warning("re-queued %d frame(s) of a batch lost with model replica %d", len(again), x.replica)
        return True

    def _record_ingest(self, s: _Source, stats: IngestStats) -> None:
        s.stats = stats
        t = self.telemetry
        t.add_cumulative(t.frames_ingested, (s.camera_id,), stats.ingested)
        t.add_cumulative(t.decode_errors, (s.camera_id,), stats.decode_errors)
        t.add_cumulative(t.source_reconnects, (s.camera_id,), stats.reconnects)
        t.add_dropped(s.camera_id, stats.dropped)
        t.queue_depth.labels(f"ingest:{s.camera_id}").set(stats.queue_depth)
        t.source_up.labels(s.camera_id).set(1 if stats.source_up else 0)
        t.oldest_unacked.labels(s.camera_id).set(stats.oldest_unacked_s)
        t.actor_result("ingest", True, s.camera_id)
        for partition, lag in stats.lag.items():
            t.kafka_lag.labels(s.camera_id, partition).set(lag)
        if stats.node_id:
            self.summary.placement.setdefault("ingest", {})[s.camera_id] = stats.node_id

    def _apply(self, outcome: BatchOutcome) -> None:
        """Queue finished frames for acknowledgement; route frames that failed to score to the dead-letter path."""
        assert self._acks is not None and self.results is not None
        for index, tokens in outcome.finished.items():
            self._acks.add(index, tokens)
        for index, items in outcome.dead.items():
            try:
                dead = ray.get(self.sources[index].actor.dead_letter.remote(items), timeout=60)
            except Exception as e:
                log.error(
                    "could not dead-letter %d frame(s) of %s: %s (left unacknowledged: re-delivered after a restart)",
                    len(items),
                    self.sources[index].camera_id,
                    _cause(e),
                )
                continue
            for d in dead:
                self.summary.dead_letters += 1
                self.results.dead_letter(d.frame, d.error, d.reason)

    def _send_acks(self) -> None:
        """Acknowledge, without blocking, the frames whose results the confirming sinks delivered."""
        assert self._acks is not None
        self._last_ack_t = time.monotonic()
        for index, tokens in self._acks.ready().items():
            self._ack_refs.append(self.sources[index].actor.ack.remote(tokens))
        self.telemetry.pending_acks.set(self._acks.pending)
        if len(self._ack_refs) > 64:  # forget the ones already done
            _, self._ack_refs = ray.wait(self._ack_refs, num_returns=len(self._ack_refs), timeout=0)

    # ------------------------------------------------------------------ shutdown
    def _finish(self) -> None:
        if not hasattr(self, "sources") or self.results is None:
            self._teardown_actors()
            self.telemetry.stop()
            return
        # Only an exception leaves frames between the stages; count them, never lose them silently.
        unfinished = [f for x in self._inflight for f in x.frames]
        if self._batcher is not None:
            while len(self._batcher):
                unfinished += [item[0] for item in self._batcher.pop()]
        if unfinished:
            log.error("aborted with %d frame(s) in flight; counted as dropped (aborted)", len(unfinished))
            self.summary.dropped["aborted"] = self.summary.dropped.get("aborted", 0) + len(unfinished)
            for f in unfinished:
                self.telemetry.frames_dropped.labels(f.camera_id, "aborted").inc()
        self.results.close_all()
        # Delivery of everything written so far, then the last acknowledgements.
        for sink in self.sinks:
            if getattr(sink, "acknowledges", False):
                self.results.safe(sink, "flush")
        self._send_acks()
        assert self._acks is not None
        if self._acks.pending:
            log.error(
                "delivery not confirmed: %d frame(s) left uncommitted (they will be re-delivered)", self._acks.pending
            )
        try:
            # Threaded actors run calls in any order: wait until every ack reached its source,
            # so the sources commit them before they are stopped.
            ray.get(self._ack_refs, timeout=30)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as e:
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
        for reason, n in self.results.dropped.items():
            self.summary.dropped[reason] = self.summary.dropped.get(reason, 0) + n
        for resets in self._clip_resets.values():
            for reason, n in resets.items():
                self.summary.clip_resets[reason] = self.summary.clip_resets.get(reason, 0) + n
        if self.summary.clip_resets:
            log.info("clip buffers reset: %s", self.summary.clip_resets)
        self.summary.scored = self.results.scored
        self.summary.alerts_opened = self.results.alerts_opened
        self.summary.stop_reason = self._stop_reason or ("error" if self.summary.error else "stopped")
        for sink in self.sinks:
            self.results.safe(sink, "close")
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
        actors = [s.actor for s in getattr(self, "sources", [])] + list(getattr(self, "replicas", []))
        if self._store is not None:
            actors.append(self._store)
        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                log.debug("kill failed", exc_info=True)

    def close(self) -> None:
        """Stop serving metrics (call after reading them, e.g. in tests)."""
        self.telemetry.stop()


def _resources_text(res: dict[str, float]) -> str:
    keep = {k: v for k, v in res.items() if not k.startswith("node:") and "memory" not in k}
    return ", ".join(f"{k} {v:g}" for k, v in sorted(keep.items())) or "none"


def _cause(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    tail = [ln for ln in text if ln.strip()][-1:] or [type(e).__name__]
    return tail[0]
