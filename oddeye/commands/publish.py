"""``oddeye publish``: put frames onto a Kafka topic in oddeye's wire format, to feed or test a deployment.

SOURCE is ``synthetic`` (the synthetic camera; endless unless ``--count``), a video file,
an image folder, or an ``rtsp://`` URL. Frames are JPEG-encoded (JPEG/PNG files pass
through unchanged) with ``oddeye.sources.kafka.encode_frame``, the same code the Kafka
source decodes with.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

COMMAND = "publish"
HELP = "publish frames (synthetic camera, video file, image folder, RTSP) to a Kafka topic"

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="synthetic | VIDEO_FILE | IMAGE_FOLDER | rtsp://...")
    p.add_argument("--topic", required=True, help="topic to publish to (e.g. frames)")
    p.add_argument("--bootstrap-servers", required=True, metavar="HOST:PORT", help="comma-separated brokers")
    p.add_argument("--rate", type=float, help="at most this many frames per second (default: as fast as possible)")
    p.add_argument("--count", type=int, help="stop after N frames (synthetic: default endless)")
    p.add_argument("--camera-id", help="camera_id of the frames (default: from the source)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality 1-100 (default 90)")
    p.add_argument("--width", type=int, default=320, help="synthetic frame width (default 320)")
    p.add_argument("--height", type=int, default=240, help="synthetic frame height (default 240)")
    p.add_argument("--seed", type=int, default=0, help="synthetic camera seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def open_source(spec: str, camera_id: str | None, count: int | None, args: argparse.Namespace) -> Any:
    """The ``Source`` named by SOURCE (raises ``SourceError`` / ``ValueError`` with the reason)."""
    from oddeye.sources.base import SourceError

    if spec == "synthetic":
        from oddeye.sources.synthetic import SyntheticCamera

        return SyntheticCamera(
            camera_id=camera_id or "synthetic-0",
            width=args.width,
            height=args.height,
            num_frames=count,
            seed=args.seed,
        )
    if spec.lower().startswith(("rtsp://", "rtsps://")):
        from oddeye.sources.rtsp import RtspSource

        return RtspSource(spec, camera_id=camera_id)
    path = Path(spec)
    if path.is_dir():
        from oddeye.sources.images import ImageFolderSource

        return ImageFolderSource(str(path), camera_id=camera_id)
    if path.is_file():
        from oddeye.sources.video import VideoFileSource

        return VideoFileSource(str(path), camera_id=camera_id)
    raise SourceError(f"SOURCE {spec!r} is not 'synthetic', an rtsp:// URL, an existing video file or image folder")


def run(args: argparse.Namespace) -> int:
    from kafka import KafkaProducer
    from kafka.errors import KafkaError
    from tqdm import tqdm

    from oddeye.frames import DecodeError, encode_frame
    from oddeye.sources.base import SourceError

    if not getattr(args, "verbose", False):
        logging.getLogger("kafka").setLevel(logging.ERROR)  # its retries are summarised by our own messages
    if not 1 <= args.quality <= 100:
        print("oddeye publish: --quality must be between 1 and 100", file=sys.stderr)
        return 2
    if args.rate is not None and args.rate <= 0:
        print("oddeye publish: --rate must be positive", file=sys.stderr)
        return 2
    if args.count is not None and args.count < 0:
        print("oddeye publish: --count must be >= 0", file=sys.stderr)
        return 2
    try:
        source = open_source(args.source, args.camera_id, args.count, args)
    except (SourceError, ValueError, OSError) as e:
        print(f"oddeye publish: {e}", file=sys.stderr)
        return 1
    servers = [s.strip() for s in args.bootstrap_servers.split(",") if s.strip()]
    try:
        producer = KafkaProducer(
            bootstrap_servers=servers,
            client_id="oddeye-publish",
            acks="all",
            linger_ms=5,
            max_request_size=20 << 20,
            bootstrap_timeout_ms=10_000,
        )
    except KafkaError as e:
        print(
            f"oddeye publish: cannot reach Kafka at {args.bootstrap_servers}: {type(e).__name__}: {e}", file=sys.stderr
        )
        source.close()
        return 1

    sent = failed = skipped = 0
    errors: list[str] = []

    def on_error(exc: BaseException) -> None:
        nonlocal failed
        failed += 1
        if len(errors) < 3:
            errors.append(f"{type(exc).__name__}: {exc}")

    bar = tqdm(total=args.count, unit="frame", disable=args.no_progress, file=sys.stderr, desc=args.topic)
    interval = 1.0 / args.rate if args.rate else 0.0
    t0 = time.monotonic()
    status = 0
    try:
        for frame in source:
            if args.count is not None and sent >= args.count:
                break
            if interval:
                delay = t0 + sent * interval - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            try:
                key, value, headers = encode_frame(frame, quality=args.quality)
            except (DecodeError, ValueError) as e:
                skipped += 1
                log.warning("skipping frame %s/%s: %s", frame.camera_id, frame.seq, e)
                continue
            producer.send(args.topic, key=key, value=value, headers=headers).add_errback(on_error)
            sent += 1
            bar.update(1)
    except KeyboardInterrupt:
        status = 130
    finally:
        bar.close()
        source.close()
        try:
            producer.flush(timeout=60)
        except KafkaError as e:
            on_error(e)
        producer.close(timeout=10)
    elapsed = time.monotonic() - t0
    delivered = sent - failed
    print(
        f"published {delivered} frame(s) to {args.topic} in {elapsed:.1f}s ({delivered / max(elapsed, 1e-9):.1f}/s)"
        + (f"; {failed} failed" if failed else "")
        + (f"; {skipped} skipped (undecodable)" if skipped else "")
    )
    if failed:
        print(f"oddeye publish: {failed} frame(s) not delivered: {'; '.join(errors)}", file=sys.stderr)
        return 1
    return status
