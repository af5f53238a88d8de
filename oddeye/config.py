"""The pipeline config: one YAML file, validated before anything starts.

``load_config`` expands ``${VAR}`` / ``${VAR:-default}`` from the environment, applies
``--set a.b.c=value`` overrides, and validates every section. Errors are raised as
``ConfigError`` whose message names the field path (``sources.0.fps``) and what is
allowed there; the CLI turns them into exit status 2.
"""

from __future__ import annotations

import fnmatch
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

__all__ = ["ConfigError", "OddeyeConfig", "load_config", "parse_config"]


class ConfigError(ValueError):
    """The config cannot be used; the message names the field and the problem."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# ----------------------------------------------------------------------------- ray


class RayConfig(_Section):
    address: str | None = None
    """None starts a local Ray (the embedded default); ``auto`` or ``ray://host:port`` joins a cluster."""
    num_cpus: int | None = Field(None, ge=1)
    namespace: str | None = None
    include_dashboard: bool = False
    connect_timeout_s: float = Field(30.0, gt=0)
    """How long joining a named cluster (``address``) may take before the run fails naming the address."""
    worker_niceness: int = Field(0, ge=0, le=19)
    """Scheduling niceness of a local Ray's workers (oddeye's actors). Ray's own default is 15, which
    hands the CPU to every other process first: on a camera server shared with other work the
    actors got a few % of a core. On a cluster, start each node with ``RAY_worker_niceness=0 ray
    start ...``; actors running niced above this value say so in the log."""

    @field_validator("address", mode="before")
    @classmethod
    def _empty_is_local(cls, v: Any) -> Any:
        return None if v in ("", "local") else v


# ----------------------------------------------------------------------------- sources

DropPolicy = Literal["auto", "drop_oldest", "drop_newest", "block"]


class _SourceBase(_Section):
    drop_policy: DropPolicy = "auto"
    """What the ingest stage does when the model falls behind: live sources keep the newest frames
    (``drop_oldest``), files and topics wait (``block``). ``auto`` picks by source kind."""
    queue_size: int = Field(32, ge=1, le=10_000)
    resources: dict[str, float] = Field(default_factory=dict)
    """Ray custom resources for this source's ingest actors (e.g. ``{ingest: 1}``): places them on
    the cluster nodes that offer them."""
    max_cameras: int | None = Field(1000, ge=1)
    """Most distinct camera ids one source may carry; frames of new cameras past it are dead letters
    (a camera id from a message header must not grow state without bound)."""
    max_pixels: int | None = Field(50_000_000, ge=1)
    """Largest frame accepted, in pixels (width × height), checked from the PNG/JPEG header before
    decoding; larger frames are dead letters. None accepts any size the decoder can hold."""
    decode_workers: int | None = Field(None, ge=1, le=64)
    """Threads decoding this source's frames (order kept): more than one lets one busy source (a
    Kafka topic, a folder of JPEGs) use several cores. Default: 2 for Kafka and image folders, whose
    frames arrive encoded, else 1."""


class SyntheticSourceConfig(_SourceBase):
    type: Literal["synthetic"]
    camera_id: str = "synthetic-0"
    width: int = Field(320, ge=32, le=4096)
    height: int = Field(240, ge=32, le=4096)
    fps: float = Field(10.0, gt=0)
    num_frames: int | None = Field(600, ge=1)
    seed: int = 0
    realtime: bool = False
    anomaly_every: int = Field(100, ge=0)
    anomaly_duration: int = Field(20, ge=1)
    anomaly_kinds: list[Literal["foreign_object", "texture_defect", "wrong_motion"]] = [
        "foreign_object",
        "texture_defect",
        "wrong_motion",
    ]
    num_objects: int = Field(3, ge=0, le=50)
    encode: bool = False
    start_seq: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _duration_fits(self) -> SyntheticSourceConfig:
        if self.anomaly_every and self.anomaly_duration >= self.anomaly_every:
            raise ValueError("anomaly_duration must be smaller than anomaly_every")
        return self


class VideoSourceConfig(_SourceBase):
    type: Literal["video"]
    path: str
    camera_id: str | None = None
    loop: bool = False
    realtime: bool = False


class ImagesSourceConfig(_SourceBase):
    type: Literal["images"]
    path: str
    camera_id: str | None = None
    recursive: bool = False
    loop: bool = False
    alert_per_image: bool = True
    """Each image is its own event (an alert per image at or above the threshold; min_frames and
    cooldown_s do not apply). false: the folder is a stream in path order, timed by the files' mtimes."""


class KafkaSourceConfig(_SourceBase):
    """Frames from Kafka topics in oddeye's wire format (value = JPEG/PNG; key/headers camera_id, ts, seq)."""

    type: Literal["kafka"]
    bootstrap_servers: str | list[str] = "localhost:9092"
    topics: list[str] = ["frames"]
    pattern: str | None = None
    """A regex of topic names to subscribe to instead of ``topics``."""
    group_id: str = "oddeye"
    start: Literal["committed", "earliest", "latest"] = "committed"
    """Where to begin: the group's committed offsets (earliest when it has none), or the ends of the topic."""
    camera_id: str | None = None
    """Label of this source in metrics; frames keep the camera_id of their messages."""
    replicas: int = Field(1, ge=1, le=256)
    """Ingest actors in the consumer group; Kafka spreads the partitions over them."""
    max_poll_records: int = Field(100, ge=1)
    session_timeout_ms: int = Field(10_000, ge=1000)
    heartbeat_interval_ms: int = Field(3_000, ge=100)
    max_message_bytes: int = Field(20_000_000, ge=1024)
    """Larger values go to the dead-letter topic."""
    dlq_topic: str | None = "frames.dlq"
    security: dict[str, Any] = Field(default_factory=dict)
    """kafka-python security options passed through (security_protocol, sasl_mechanism, sasl_plain_username,
    sasl_plain_password, ssl_cafile, ...); never logged."""
    consumer: dict[str, Any] = Field(default_factory=dict)
    """Any other kafka-python KafkaConsumer options."""
    reconnect_initial_s: float = Field(0.5, gt=0)
    """First wait before retrying an unreachable broker; doubles (with jitter) up to ``reconnect_max_s``."""
    reconnect_max_s: float = Field(5.0, gt=0)
    """Longest wait between reconnect attempts: a broker back from an outage is found within it."""
    allow_skip: bool = False
    """Allow a lossy ``drop_policy`` (drop_oldest/drop_newest): dropped messages are then committed
    without being scored. Off by default: a topic is at-least-once and waits instead."""

    @model_validator(mode="after")
    def _no_silent_skips(self) -> KafkaSourceConfig:
        if self.drop_policy in ("drop_oldest", "drop_newest") and not self.allow_skip:
            raise ValueError(
                f"drop_policy {self.drop_policy} would commit Kafka offsets of frames that were never scored; "
                "use drop_policy: block (or auto), or set allow_skip: true to accept skipped messages"
            )
        return self


class RtspCameraConfig(_Section):
    """One camera of an RTSP source that reads several."""

    url: str
    camera_id: str | None = None
    """Default: host, port and path of the URL (never its credentials)."""


class RtspSourceConfig(_SourceBase):
    """Live RTSP cameras: ``url`` for one, ``cameras`` for several read by the same ingest actor.

    One source entry per camera gives each its own ingest actor (and its own ``source_up``); a
    ``cameras`` list shares one actor, a reader thread per camera, and reports ``source_up`` 1
    only while every camera delivers. URLs are checked when the source starts, not here, so
    that a validation message can never echo a URL's credentials.
    """

    type: Literal["rtsp"]
    url: str | None = None
    camera_id: str | None = None
    """The camera of ``url``, and the label of this source in metrics."""
    cameras: list[RtspCameraConfig] = Field(default_factory=list)
    """More cameras for the same ingest actor (beside ``url``, if set)."""
    transport: Literal["tcp", "udp"] = "tcp"
    backend: Literal["auto", "pyav", "opencv"] = "auto"
    """Decoder: PyAV (``pip install 'oddeye[rtsp-pyav]'``, measured 20-30% less CPU per frame) or
    OpenCV's FFmpeg backend (always installed). ``auto``: PyAV when installed, else OpenCV."""
    open_timeout_s: float = Field(10.0, gt=0)
    """Give up on a connection attempt after this long (then back off and retry)."""
    read_timeout_s: float = Field(5.0, gt=0)
    """A camera with no frame for this long is down (``source_up`` 0) and is reconnected."""
    reconnect_initial_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(10.0, gt=0)
    """Reconnect backoff: doubles from ``reconnect_initial_s`` up to this, with jitter."""
    every_nth: int = Field(1, ge=1)
    """Process every Nth decoded frame."""
    max_fps: float | None = Field(None, gt=0)
    """Process at most this many frames per second (per camera)."""

    @field_validator("reconnect_max_s")
    @classmethod
    def _backoff_range(cls, v: float, info: ValidationInfo) -> float:
        if v < info.data.get("reconnect_initial_s", 0):
            raise ValueError("reconnect_max_s must be at least reconnect_initial_s")
        return v

    @model_validator(mode="after")
    def _some_camera(self) -> RtspSourceConfig:
        # Only raised when there is no URL at all, so the echoed input holds no credentials.
        if not self.url and not self.cameras:
            raise ValueError("give a camera: url (one camera) or cameras (a list of {url, camera_id})")
        return self


SourceConfig = Annotated[
    Union[  # noqa: UP007
        SyntheticSourceConfig, VideoSourceConfig, ImagesSourceConfig, KafkaSourceConfig, RtspSourceConfig
    ],
    Field(discriminator="type"),
]


# ----------------------------------------------------------------------------- fit, model, batching


class FitConfig(_Section):
    source: SourceConfig | None = None
    """Normal frames to learn from; defaults to the first source (with anomalies off for a synthetic one)."""
    auto: bool = False
    """``oddeye run`` fits first when ``model.checkpoint`` does not exist yet (demos, first start)."""
    max_frames: int = Field(200, ge=2)
    max_seconds: float | None = Field(None, gt=0)
    """scope camera, ``on_missing: fit``: also start a new camera's fit once its stream has run this long
    (frame timestamps; at least 2 frames kept), so a camera is learnt from its first N minutes or frames."""
    stride: int = Field(1, ge=1)
    """Keep every ``stride``-th frame of the fit source, so a fixed number of frames spans more of the scene."""
    val_fraction: float = Field(0.2, gt=0, lt=1)
    batch_size: int = Field(16, ge=1)


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class RefitConfig(_Section):
    """scope camera: scheduled refits of each camera's head from the frames it scored normal."""

    every: float | None = None
    """Seconds (or ``30m``, ``6h``, ``1d``) between a head's refits; None: never."""
    max_frames: int = Field(200, ge=4)
    """Normal-scored frames kept per camera between refits (an even sample of the period)."""
    min_frames: int = Field(20, ge=4)
    """Fewer normal frames than this at a refit's time: the refit waits for the next period."""
    val_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of the kept frames the refit does not learn from: its guard's validation frames."""
    max_alert_rate_increase: float = Field(0.0, ge=0, le=1)
    """The guard: a new head whose alert rate on the validation frames exceeds the current head's by
    more than this is rejected (logged and counted), and the current head stays."""

    @field_validator("every", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        if isinstance(v, str):
            m = _DURATION.fullmatch(v)
            if m is None:
                raise ValueError(f"every: {v!r} is not a duration; give seconds or e.g. 30m, 6h, 1d")
            v = float(m.group(1)) * _UNIT_S[m.group(2) or "s"]
        if v is not None and not float(v) > 0:
            raise ValueError("every must be > 0 seconds (or null: no scheduled refits)")
        return v


class CameraGroupConfig(_Section):
    """Cameras that share one fitted head (one scene seen by several cameras)."""

    name: str = Field(min_length=1)
    cameras: list[str] | str
    """Camera selectors: exact ids, globs (``dock-*``) or regexes (``re:^dock-[0-9]+$``); a list or one selector."""

    def selectors(self) -> list[str]:
        return [self.cameras] if isinstance(self.cameras, str) else list(self.cameras)

    def matches(self, camera_id: str) -> bool:
        return any(_selector_matches(s, camera_id) for s in self.selectors())

    @field_validator("cameras")
    @classmethod
    def _valid_selectors(cls, v: list[str] | str) -> list[str] | str:
        for s in [v] if isinstance(v, str) else v:
            if s.startswith("re:"):
                try:
                    re.compile(s[3:])
                except re.error as e:
                    raise ValueError(f"selector {s!r}: not a regular expression ({e})") from None
        if not v:
            raise ValueError("give at least one camera selector")
        return v


def _selector_matches(selector: str, camera_id: str) -> bool:
    if selector.startswith("re:"):
        return re.fullmatch(selector[3:], camera_id) is not None
    return fnmatch.fnmatchcase(camera_id, selector)


class ModelConfig(_Section):
    name: str = "padim"
    params: dict[str, Any] = Field(default_factory=dict)
    """Constructor parameters, with anomalib's names (``backbone``, ``layers``, ``n_features`` ...)."""
    checkpoint: str = "oddeye-out/model.pt"
    device: str = "auto"
    backend: Literal["torch", "onnxruntime"] = "torch"
    """``onnxruntime``: CPU model actors export the checkpoint to ONNX on load and score with ONNX Runtime
    (image models; with scope camera the shared backbone, the heads staying in torch; needs the ``export``
    extra). Falls back to torch where it cannot run."""
    precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The backbone's inference precision (autocast; heads stay float32). ``auto``: bf16 on CPUs with
    native bf16, else float32; float32 on CUDA (see ``oddeye.models.inference``)."""
    compile: bool = False
    """``torch.compile`` the backbone in each model actor (image models): 1.25–1.6× on an H100 for
    PaDiM, at ~35 s of compiling at start and again for each new batch size."""
    image_size: tuple[int, int] = (256, 256)
    replicas: int = Field(1, ge=1, le=64)
    num_threads: int | None = Field(None, ge=1)
    """Torch CPU threads in each model actor (default: all cores of its machine)."""
    num_cpus: float = Field(1.0, ge=0)
    """CPUs reserved for each model actor in Ray's scheduler."""
    num_gpus: float | None = Field(None, ge=0)
    """GPUs reserved for each model actor; default 1 when the device is CUDA, else 0."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Ray custom resources for each model actor (e.g. ``{model: 1}``): places them on the nodes that offer them."""
    max_restarts: int = Field(3, ge=0, le=100)
    """How often Ray restarts a crashed model replica; when every replica is gone for good the run
    ends with exit 1 (frames not yet scored stay uncommitted and are read again on restart)."""
    start_timeout_s: float = Field(300.0, gt=0)
    """How long model actors may take to be placed and load the checkpoint before the run fails,
    naming the resource that is missing."""
    scope: Literal["pipeline", "camera"] = "pipeline"
    """``pipeline``: one fitted model (``checkpoint``) scores every camera. ``camera``: each camera (or
    group) has its own fitted head on one shared backbone, kept in ``directory``."""
    directory: str = "oddeye-out/models"
    """scope camera: the model directory (``backbone.json``, ``backbone.pt``, ``cameras/<id>/v<N>.pt``).
    Model actors read it directly: on a cluster it must be on a shared file system."""
    on_missing: Literal["skip", "fit", "default"] | None = None
    """scope camera, a camera with no head yet: ``skip`` its frames (dropped, reason ``no_model``),
    ``fit`` a head from its first ``fit.max_frames`` frames, or score it with the ``default`` model.
    Unset: ``fit`` when ``fit.auto`` is true, else ``skip``."""
    default: str | None = None
    """scope camera: a checkpoint (a whole fitted model) for cameras with no head (``on_missing: default``)."""
    groups: list[CameraGroupConfig] = Field(default_factory=list)
    """scope camera: cameras that share one head; a camera in no group has its own."""
    head_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """How heads are stored on disk (half the bytes in 16 bits); they are scored in float32."""
    max_head_bytes: int | None = Field(None, ge=1)
    """Bytes of heads each model actor keeps loaded (least recently used unloaded first); None: no bound."""
    refresh_s: float = Field(5.0, gt=0)
    """How often model actors look for newer head versions in ``directory`` (hot swap)."""

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError(f"device {v!r} not understood; use auto, cpu, cuda or cuda:N")
        return v

    @field_validator("image_size")
    @classmethod
    def _size(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 32 or max(v) > 4096:
            raise ValueError("image_size must be two integers [height, width] between 32 and 4096")
        return v

    @model_validator(mode="after")
    def _precision_fits_device(self) -> ModelConfig:
        if self.precision == "float16" and self.device == "cpu":
            raise ValueError(
                "precision: float16 is for CUDA devices (the CPU has no fast float16 kernels); "
                "on device: cpu use bfloat16, float32 or auto"
            )
        return self

    @model_validator(mode="after")
    def _known_model(self) -> ModelConfig:
        from oddeye.models.base import list_models, model_params

        names = list_models()
        if self.name not in names:
            raise ValueError(f"unknown model {self.name!r}; registered models: {', '.join(names)}")
        allowed = set(model_params(self.name)) - {"image_size"}
        unknown = sorted(set(self.params) - allowed)
        if unknown:
            raise ValueError(
                f"params: unknown parameter(s) {', '.join(unknown)} for model {self.name!r}; "
                f"allowed: {', '.join(sorted(allowed))}"
            )
        if "image_size" in self.params:
            raise ValueError("set image_size on model, not in model.params")
        return self

    @model_validator(mode="after")
    def _camera_scope(self) -> ModelConfig:
        if self.scope != "camera":
            return self
        from oddeye.models.camera_heads import split_models

        if self.name not in split_models():
            raise ValueError(
                f"scope: camera needs a model that splits into a shared backbone and per-camera heads; "
                f"{self.name!r} does not: use one of {', '.join(split_models())}"
            )
        if self.on_missing == "default" and not self.default:
            raise ValueError("on_missing: default needs model.default, the checkpoint that scores cameras with no head")
        names = [g.name for g in self.groups]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"groups: name {', '.join(dup)} used more than once")
        for i, g in enumerate(self.groups):
            for other in self.groups[i + 1 :]:
                shared = [s for s in g.selectors() if not _is_pattern(s) and other.matches(s)]
                shared += [s for s in other.selectors() if not _is_pattern(s) and g.matches(s)]
                if shared:
                    raise ValueError(
                        f"groups: camera {shared[0]!r} matches both group {g.name!r} and group {other.name!r}"
                    )
        return self

    def head_key(self, camera_id: str) -> str:
        """The head that scores ``camera_id``: its group's (``group:<name>``) or its own; two groups is an error."""
        hits = [g.name for g in self.groups if g.matches(camera_id)]
        if len(hits) > 1:
            raise ConfigError(
                f"model.groups: camera {camera_id!r} matches both group {hits[0]!r} and group {hits[1]!r}"
            )
        return f"group:{hits[0]}" if hits else camera_id


def _is_pattern(selector: str) -> bool:
    return selector.startswith("re:") or any(c in selector for c in "*?[")


class BatchingConfig(_Section):
    max_batch_size: int = Field(8, ge=1, le=1024)
    max_wait_ms: float = Field(20.0, ge=0)
    max_inflight_batches: int = Field(2, ge=1, le=64)
    """Batches submitted to each model replica and not yet returned; bounds the pipeline's memory."""


# ----------------------------------------------------------------------------- alerts


class AlertPolicyConfig(_Section):
    threshold: float | Literal["auto"] = 0.5
    """A normalised score in (0, 1), or ``auto``: the model's own unsupervised decision per frame
    (U-Flow's a-contrario test, ``log10 NFA < 0``); only models with ``nfa_threshold`` offer it."""
    min_frames: int = Field(3, ge=1)
    hysteresis: float = Field(0.1, ge=0)
    close_frames: int = Field(5, ge=1)
    cooldown_s: float = Field(10.0, ge=0)
    update_interval_s: float = Field(5.0, ge=0)

    @model_validator(mode="after")
    def _band(self) -> AlertPolicyConfig:
        if self.threshold == "auto":
            return self  # frames alert on the model's label; the score band does not apply
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be a number in (0, 1) or 'auto', got {self.threshold}")
        if self.hysteresis >= self.threshold:
            raise ValueError("hysteresis must be smaller than threshold")
        return self


class AlertsConfig(AlertPolicyConfig):
    cameras: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per-camera overrides of any policy field, e.g. ``{gate-1: {threshold: 0.7}}``."""
    idle_expire_s: float | None = Field(3600.0, gt=0)
    """Forget a camera's alert state (closing its open alert) after this long without a frame; None: never."""

    @field_validator("cameras")
    @classmethod
    def _overrides(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for cam, fields in v.items():
            unknown = sorted(set(fields) - set(AlertPolicyConfig.model_fields))
            if unknown:
                allowed = ", ".join(AlertPolicyConfig.model_fields)
                raise ValueError(f"{cam}: unknown field(s) {', '.join(unknown)}; allowed: {allowed}")
        return v

    def policy_for(self, camera_id: str | None = None) -> dict[str, Any]:
        base = {k: getattr(self, k) for k in AlertPolicyConfig.model_fields}
        if camera_id is not None:
            base.update(self.cameras.get(camera_id, {}))
        return base


# ----------------------------------------------------------------------------- sinks


class ConsoleSinkConfig(_Section):
    type: Literal["console"]
    summary_interval_s: float = Field(10.0, gt=0)


class JsonlSinkConfig(_Section):
    type: Literal["jsonl"]
    scores: bool = True
    alerts: bool = True
    dead_letters: bool = True


class SnapshotsSinkConfig(_Section):
    type: Literal["snapshots"]
    max_per_camera: int = Field(100, ge=1)
    max_age_s: float | None = Field(None, gt=0)
    """Also delete a camera's snapshots older than this (seconds); None keeps them until the count limit."""
    quality: int = Field(90, ge=10, le=100)


class KafkaSinkConfig(_Section):
    """Scores and alert events to Kafka topics (JSON values, key = camera_id)."""

    type: Literal["kafka"]
    bootstrap_servers: str | list[str] = "localhost:9092"
    scores_topic: str | None = "oddeye.scores"
    alerts_topic: str | None = "oddeye.alerts"
    acks: Literal["all", "1", "0"] = "all"
    linger_ms: int = Field(5, ge=0)
    retries: int = Field(5, ge=0)
    security: dict[str, Any] = Field(default_factory=dict)
    """kafka-python security options (security_protocol, sasl_*, ssl_*); never logged."""
    producer: dict[str, Any] = Field(default_factory=dict)
    """Any other kafka-python KafkaProducer options."""
    buffer_records: int = Field(10_000, ge=1)
    """Records held while the broker is slow or unreachable; beyond it the pipeline stops taking frames
    (back-pressure: nothing is dropped, and offsets are committed only once results are delivered)."""
    flush_timeout_s: float = Field(10.0, gt=0)
    """How long a flush waits for the broker to acknowledge before offsets are held back."""
    connect_timeout_s: float = Field(5.0, gt=0)
    reconnect_max_s: float = Field(5.0, gt=0)
    """Longest wait between reconnect attempts, and how long deliveries may keep failing before the
    producer is replaced: results reach a broker back from an outage within about this."""


class WebhookSinkConfig(_Section):
    """Alert events POSTed as JSON."""

    type: Literal["webhook"]
    url: str
    timeout_s: float = Field(5.0, gt=0)
    max_retries: int = Field(5, ge=0)
    backoff_initial_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    queue_size: int = Field(1000, ge=1)
    hmac_secret_env: str | None = None
    """Name of the environment variable holding the HMAC-SHA256 key for the signature header."""
    bearer_token_env: str | None = None
    """Name of the environment variable holding a bearer token."""
    states: list[Literal["open", "update", "close"]] = ["open", "update", "close"]


SinkConfig = Annotated[
    Union[ConsoleSinkConfig, JsonlSinkConfig, SnapshotsSinkConfig, KafkaSinkConfig, WebhookSinkConfig],  # noqa: UP007
    Field(discriminator="type"),
]


class MetricsConfig(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    """Interface the metrics endpoint binds; 127.0.0.1 keeps it on this machine. The compose stack sets 0.0.0.0."""
    port: int = Field(9108, ge=0, le=65535)
    """Where ``/metrics`` is served; 0 picks a free port (logged at start)."""


# ----------------------------------------------------------------------------- root


class OddeyeConfig(_Section):
    ray: RayConfig = Field(default_factory=RayConfig)
    sources: list[SourceConfig] = Field(min_length=1)
    fit: FitConfig = Field(default_factory=FitConfig)
    refit: RefitConfig = Field(default_factory=RefitConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    sinks: list[SinkConfig] = Field(default_factory=lambda: [ConsoleSinkConfig(type="console")])
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)

    @model_validator(mode="after")
    def _unique_cameras(self) -> OddeyeConfig:
        ids = [s.camera_id for s in self.sources if getattr(s, "camera_id", None)]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"sources: camera_id {', '.join(dup)} used by more than one source")
        return self

    @model_validator(mode="after")
    def _camera_scope_defaults(self) -> OddeyeConfig:
        if self.model.scope == "camera":
            if self.model.on_missing is None:
                self.model.on_missing = "fit" if self.fit.auto else "skip"
            for cam in (s.camera_id for s in self.sources if getattr(s, "camera_id", None)):
                hits = [g.name for g in self.model.groups if g.matches(cam)]
                if len(hits) > 1:
                    raise ValueError(
                        f"model.groups: camera {cam!r} matches both group {hits[0]!r} and group {hits[1]!r}"
                    )
        return self

    @model_validator(mode="after")
    def _refit_needs_camera_scope(self) -> OddeyeConfig:
        if self.refit.every is not None and self.model.scope != "camera":
            raise ValueError(
                "refit.every: scheduled refits are of per-camera heads; set model.scope: camera "
                "(with one pipeline model, refit with `oddeye fit` and restart)"
            )
        return self

    @model_validator(mode="after")
    def _auto_threshold(self) -> OddeyeConfig:
        thresholds = [self.alerts.threshold] + [c.get("threshold") for c in self.alerts.cameras.values()]
        if "auto" not in thresholds:
            return self
        from oddeye.models.registry import get_model_class

        try:
            supported = bool(getattr(get_model_class(self.model.name), "nfa_threshold", False))
        except KeyError:
            return self  # the model section reports an unknown name itself
        if not supported:
            raise ValueError(
                f"alerts.threshold: auto needs a model that labels frames with its own unsupervised test "
                f"(uflow's NFA); model {self.model.name!r} has none: set a threshold in (0, 1)"
            )
        return self


# ----------------------------------------------------------------------------- loading

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(node: Any, path: str, env: typing.Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _expand(v, f"{path}.{k}" if path else str(k), env) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, f"{path}.{i}" if path else str(i), env) for i, v in enumerate(node)]
    if isinstance(node, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env and env[name] != "":
                return env[name]
            if default is not None:
                return default
            raise ConfigError(
                f"{path}: environment variable {name} is not set (write ${{{name}:-default}} to default it)"
            )

        expanded = _VAR.sub(sub, node)
        if expanded != node and _VAR.fullmatch(node):
            # A value that is exactly one ${...} takes the YAML type of what it expands to.
            try:
                return yaml.safe_load(expanded) if expanded.strip() else expanded
            except yaml.YAMLError:
                return expanded
        return expanded
    return node


def _apply_override(raw: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected PATH=VALUE, e.g. model.device=cpu")
    key, _, value_text = assignment.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment!r}: empty path")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: {where} is not an index of a list of {len(node)} item(s)")
            idx = int(part)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} is a value, not a section")


def parse_config(
    raw: Any, overrides: typing.Sequence[str] = (), env: typing.Mapping[str, str] | None = None, origin: str = "config"
) -> OddeyeConfig:
    """Validate a config given as a mapping (already parsed YAML)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections, got {type(raw).__name__}")
    raw = _expand(raw, "", os.environ if env is None else env)
    for assignment in overrides:
        _apply_override(raw, assignment)
    try:
        return OddeyeConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{origin} is not valid:\n" + _format_errors(e)) from None


def load_config(
    path: str | Path, overrides: typing.Sequence[str] = (), env: typing.Mapping[str, str] | None = None
) -> OddeyeConfig:
    """Read, expand, override and validate a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_config(raw, overrides, env, origin=str(path))


def demo_config_path() -> Path:
    """The embedded default config shipped inside the package (same file as configs/demo.yaml)."""
    return Path(__file__).with_name("demo.yaml")


# ----------------------------------------------------------------------------- error messages


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path, _cls = _resolve(OddeyeConfig, e["loc"])
        where = ".".join(path) or "(top level)"
        if e["type"] == "extra_forbidden":
            _parent, pcls = _resolve(OddeyeConfig, e["loc"][:-1])
            allowed = ", ".join(pcls.model_fields) if pcls else "?"
            lines.append(f"  {where}: unknown field {path[-1]!r} (allowed here: {allowed})")
        elif e["type"] == "union_tag_invalid":
            lines.append(f"  {where}: {e['msg']}")
        elif e["type"] == "missing":
            lines.append(f"  {where}: required field is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if _SECRET_PATH.search(where):  # a URL with credentials or a security option: never echo it
                lines.append(f"  {where}: {msg}")
            else:
                lines.append(f"  {where}: {msg} (got {_short(e.get('input'))})")
    return "\n".join(lines)


_SECRET_PATH = re.compile(r"(url|security|password|secret|token|sasl)", re.IGNORECASE)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
            continue
        if origin in (Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) == 1:
                tp = members[0]
                continue
        return tp


def _resolve(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[str], type[BaseModel] | None]:
    """Turn a pydantic error location into a user-facing path, and find the section class there.

    Discriminated-union tags that pydantic puts in the location (``sources.0.synthetic.fps``)
    are dropped from the path the user sees (``sources.0.fps``).
    """
    path: list[str] = []
    cur: Any = root
    for item in loc:
        cur = _unwrap(cur)
        origin = typing.get_origin(cur)
        if origin in (Union, types.UnionType):
            tagged = [m for m in typing.get_args(cur) if _tag(m) == item]
            if tagged:
                cur = tagged[0]
                continue
            cur = None
        path.append(str(item))
        if isinstance(cur, type) and issubclass(cur, BaseModel):
            field = cur.model_fields.get(str(item))
            cur = field.annotation if field else None
        elif origin in (list, tuple):
            cur = typing.get_args(cur)[0]
        elif origin is dict:
            cur = typing.get_args(cur)[1]
        else:
            cur = None
    cur = _unwrap(cur)
    return path, cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def _tag(tp: Any) -> str | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel) and "type" in tp.model_fields:
        args = typing.get_args(tp.model_fields["type"].annotation)
        return args[0] if args else None
    return None
