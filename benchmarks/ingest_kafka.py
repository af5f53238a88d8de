"""Kafka ingest throughput: consume + decode + resize in Ray ingest actors, 1 and 2 actors in one group.

Prints one table of frames/s per (frame size, actors): JPEG frames at 720p and at the model's
size (256×256) are published to a 2-partition topic, then drained through
``IngestActor(KafkaSource)`` exactly as ``oddeye run`` hosts it (decode at model size,
acknowledgements sent back so the source commits). Timing runs from the first frame taken
to the last, so Ray start-up and the consumer-group join are excluded.

    python benchmarks/ingest_kafka.py [--frames 600] [--bootstrap HOST:PORT]

Without ``--bootstrap`` a tansu broker is started on loopback (as the tests do).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import uuid
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
MODEL_SIZE = (256, 256)


def publish(bootstrap: str, topic: str, n: int, width: int, height: int) -> float:
    """Publish ``n`` synthetic JPEG frames over 2 cameras (one per partition); returns mean value size."""
    from kafka import KafkaProducer

    from oddeye.frames import Frame, encode_frame
    from oddeye.sources.synthetic import SyntheticCamera

    cam = SyntheticCamera(width=width, height=height, num_frames=n)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_request_size=20 << 20)
    total = 0
    for frame in cam:
        f = Frame(f"cam-{frame.seq % 2}", frame.seq, frame.timestamp, frame.image)
        key, value, headers = encode_frame(f, quality=90)
        total += len(value)
        producer.send(topic, key=key, value=value, headers=headers, partition=frame.seq % 2)
    producer.flush()
    producer.close()
    return total / max(n, 1)


def drain(bootstrap: str, topic: str, n: int, actors: int) -> float:
    """Frames/s of ``actors`` ingest actors in a fresh group reading ``n`` frames."""
    import functools

    import ray

    from oddeye.pipeline.ingest_actor import IngestActor
    from oddeye.sources.kafka import KafkaSource

    group = f"bench-{uuid.uuid4().hex[:8]}"
    make = functools.partial(
        KafkaSource, bootstrap, [topic], group_id=group, session_timeout_ms=3000, heartbeat_interval_ms=500,
        max_poll_records=100, dlq_topic=None,
    )  # fmt: skip
    workers = [IngestActor.remote(make, f"bench-{i}", MODEL_SIZE, "block", 64) for i in range(actors)]
    started = ray.get([w.start.remote() for w in workers])
    if not all(s["ok"] for s in started):
        raise SystemExit(f"ingest actor failed to start: {started}")
    got, t_first, deadline = 0, None, time.monotonic() + 120
    pending = {w.take.remote(32, 0.2): w for w in workers}
    while got < n and time.monotonic() < deadline:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        for ref in done:
            w = pending.pop(ref)
            res = ray.get(ref)
            if res.frames:
                t_first = t_first or time.monotonic()
                got += len(res.frames)
                w.ack.remote([(f.camera_id, f.seq, f.origin) for f in res.frames])
            pending[w.take.remote(32, 0.2)] = w
    elapsed = time.monotonic() - (t_first or time.monotonic())
    ray.get([w.stop.remote() for w in workers])
    for w in workers:
        ray.kill(w)
    if got < n:
        raise SystemExit(f"only {got} of {n} frames arrived within 120 s")
    return got / elapsed if elapsed > 0 else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=600, help="frames per measurement (default 600)")
    ap.add_argument("--bootstrap", help="an existing broker (default: start tansu on loopback)")
    args = ap.parse_args()

    import ray

    broker = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        sys.path.insert(0, str(REPO))
        from tests.servers.kafka import start_broker

        broker = start_broker()
        bootstrap = broker.bootstrap
    try:
        ray.init(include_dashboard=False, logging_level="ERROR", configure_logging=False)
        rows = []
        for label, (w, h) in (("720p", (1280, 720)), (f"{MODEL_SIZE[1]}x{MODEL_SIZE[0]}", MODEL_SIZE[::-1])):
            topic = f"bench-{label}-{uuid.uuid4().hex[:6]}"
            if broker is not None:
                broker.create_topic(topic, 2)
            size = publish(bootstrap, topic, args.frames, w, h)
            for actors in (1, 2):
                rows.append((label, size / 1024, actors, drain(bootstrap, topic, args.frames, actors)))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if broker is not None:
            broker.stop()

    print(f"\nKafka ingest (consume + JPEG decode to {MODEL_SIZE[0]}x{MODEL_SIZE[1]}), {args.frames} frames each")
    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"{'frames':>8} | {'JPEG KB':>7} | {'actors':>6} | {'frames/s':>9}")
    print(f"{'-' * 8}-+-{'-' * 7}-+-{'-' * 6}-+-{'-' * 9}")
    for label, kb, actors, fps in rows:
        print(f"{label:>8} | {kb:7.1f} | {actors:6d} | {fps:9.1f}")


if __name__ == "__main__":
    main()
