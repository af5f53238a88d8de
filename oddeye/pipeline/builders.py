"""Build sources and sinks from their config sections (the one place that maps names to classes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from oddeye.config import (
    ImagesSourceConfig,
    KafkaSourceConfig,
    RtspSourceConfig,
    SourceConfig,
    SyntheticSourceConfig,
    VideoSourceConfig,
)
from oddeye.sinks.base import Sink
from oddeye.sources.base import Source

_SOURCE_ONLY = {
    "type", "drop_policy", "queue_size", "replicas", "resources", "max_cameras", "max_pixels", "allow_skip",
    "decode_workers",
}  # fmt: skip
"""Fields the pipeline applies around a source (ingest actor, placement, decode limits), not source arguments."""


def build_source(cfg: SourceConfig, **overrides: Any) -> Source:
    """A ``Source`` for a ``sources`` item (``overrides`` replace fields, e.g. ``anomaly_every=0``)."""
    kwargs = cfg.model_dump(exclude=_SOURCE_ONLY)
    kwargs.update(overrides)
    if isinstance(cfg, SyntheticSourceConfig):
        from oddeye.sources.synthetic import SyntheticCamera

        return SyntheticCamera(**kwargs)
    if isinstance(cfg, VideoSourceConfig):
        from oddeye.sources.video import VideoFileSource

        return VideoFileSource(**kwargs)
    if isinstance(cfg, ImagesSourceConfig):
        from oddeye.sources.images import ImageFolderSource

        return ImageFolderSource(**kwargs)
    if isinstance(cfg, KafkaSourceConfig):
        from oddeye.sources.kafka import KafkaSource

        return KafkaSource(**kwargs)
    if isinstance(cfg, RtspSourceConfig):
        from oddeye.sources.rtsp import RtspSource

        return RtspSource(**kwargs)
    raise TypeError(f"no source for config {type(cfg).__name__}")


def camera_label(cfg: SourceConfig, index: int) -> str:
    """The camera id a source will use, known before it is opened (for metrics and logs)."""
    if getattr(cfg, "camera_id", None):
        return cfg.camera_id  # type: ignore[union-attr]
    if isinstance(cfg, KafkaSourceConfig):
        return "kafka:" + (cfg.pattern or ",".join(cfg.topics))
    if isinstance(cfg, RtspSourceConfig) and cfg.url:
        from oddeye.sources.rtsp import default_camera_id

        return default_camera_id(cfg.url)  # the same id the frames carry, never with credentials
    if isinstance(cfg, RtspSourceConfig):
        return f"rtsp-{index}"
    path = getattr(cfg, "path", None)
    if path:
        p = Path(path)
        return p.stem if p.suffix else p.name
    return f"source-{index}"


def drop_policy_for(cfg: SourceConfig) -> str:
    """``auto`` resolves to ``drop_oldest`` for live sources, ``block`` for files and topics."""
    if cfg.drop_policy != "auto":
        return cfg.drop_policy
    live = isinstance(cfg, RtspSourceConfig) or getattr(cfg, "realtime", False)
    return "drop_oldest" if live else "block"


def decode_workers_for(cfg: SourceConfig) -> int:
    """Decode threads for a source's ingest actor: 2 where frames arrive encoded (Kafka, image folders)."""
    if cfg.decode_workers is not None:
        return cfg.decode_workers
    return 2 if isinstance(cfg, (KafkaSourceConfig, ImagesSourceConfig)) else 1


def build_sinks(cfgs: list[Any], out_dir: Path) -> tuple[list[Sink], Any]:
    """Sinks in config order, and the snapshot writer (or None) the runner calls when an alert opens."""
    from oddeye.sinks.console import ConsoleSink
    from oddeye.sinks.jsonl import JsonlSink
    from oddeye.sinks.snapshots import SnapshotSink

    sinks: list[Sink] = []
    snapshots = None
    for cfg in cfgs:
        kwargs = cfg.model_dump(exclude={"type"})
        if cfg.type == "console":
            sinks.append(ConsoleSink(**kwargs))
        elif cfg.type == "jsonl":
            sinks.append(JsonlSink(out_dir, **kwargs))
        elif cfg.type == "snapshots":
            snapshots = SnapshotSink(out_dir, **kwargs)
            sinks.append(snapshots)
        elif cfg.type == "kafka":
            from oddeye.sinks.kafka import KafkaSink

            sinks.append(KafkaSink(**kwargs))
        elif cfg.type == "webhook":
            from oddeye.sinks.webhook import WebhookSink

            sinks.append(WebhookSink(**kwargs))
        else:
            raise TypeError(f"no sink of type {cfg.type!r}")
    return sinks, snapshots
