"""Fault injection on real parts: does oddeye lose a frame? Prints one table for benchmarks/RESULTS.md.

Real parts: two tansu brokers (frames + DLQ; scores sink), a GStreamer RTSP camera, and
``oddeye run`` as a user starts it (the CLI in its own process group, with its local Ray). The
model is the ``null`` benchmark model with ``fail_marker`` (it raises on marked frames) and a
fixed ``latency_ms`` per batch, which sets the pipeline's capacity so that an overload is real.

Timeline (``--quick`` shortens the outages and the overload):
  1. warm-up frames, then a **broker restart** (tansu keeps no data across restarts, so the
     restart comes after everything published so far is committed; what is measured is how
     fast the source reconnects and scores the next frame);
  2. the main stream at half capacity, with marked frames the model raises on; it goes on
     through steps 3-5, so every fault meets frames in flight;
  3. **SIGKILL** of the whole pipeline (driver and Ray), then a restart;
  4. a **Kafka-sink outage** (its broker stopped, then started again on the same port);
  5. a **camera outage** (RTSP server stopped, then started again on the same port);
  6. **poison messages**: 0 bytes, truncated JPEG, PNG bomb, wrong content-type, 10 MB, no headers;
  7. **2× overload** of the pipeline's capacity.
Then the stream drains, the pipeline is stopped with SIGTERM, and everything is counted:
published, scored (unique), dead-lettered by reason, **lost** (must be 0), duplicates, the
longest commit stall (``oddeye_oldest_unacked_seconds``), peak RSS per process kind, and the
time to reconnect after the camera and the broker come back.

    python benchmarks/chaos.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from oddeye.frames import (  # noqa: E402
    Frame,
    encode_frame,
    encode_jpeg,
)
from oddeye.models.image.null import add_fail_marker  # noqa: E402
from oddeye.models.registry import create_model  # noqa: E402
from tests.servers.kafka import free_port, start_broker  # noqa: E402
from tests.servers.rtsp import start_rtsp_server  # noqa: E402

SIZE = 96
BATCH = 8
KCAM = "kcam"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- inputs
def png_bomb() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


class Publisher:
    """Publishes frames of camera ``kcam`` (seq 0, 1, ...) at a settable rate; records what the broker acked."""

    def __init__(self, bootstrap: str, topic: str, marked_every: int) -> None:
        from kafka import KafkaProducer

        self.topic = topic
        self.producer = KafkaProducer(
            bootstrap_servers=bootstrap, linger_ms=5, acks="all", max_request_size=16 << 20, retries=10
        )
        self.marked_every = marked_every
        self.seq = 0
        self.acked: set[int] = set()
        self.acked_at: dict[int, float] = {}  # seq -> when the broker acknowledged it (monotonic)
        self.marked: set[int] = set()
        self.rng = np.random.default_rng(0)
        self.base = self.rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)

    def publish(self, n: int, rate: float, stop: threading.Event | None = None) -> None:
        """Publish ``n`` frames at ``rate`` per second (fewer if ``stop`` is set first)."""
        t0 = time.monotonic()
        for k in range(n):
            if stop is not None and stop.is_set():
                break
            seq = self.seq
            self.seq += 1
            img = np.roll(self.base, seq % SIZE, axis=1)
            if self.marked_every and seq % self.marked_every == self.marked_every // 2:
                img = add_fail_marker(img)
                self.marked.add(seq)
            key, value, headers = encode_frame(Frame(KCAM, seq, time.time(), img))
            fut = self.producer.send(self.topic, key=key, value=value, headers=headers)
            fut.add_callback(self._on_ack, seq)
            delay = t0 + (k + 1) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        self.producer.flush(60)

    def _on_ack(self, seq: int, _metadata: object) -> None:
        self.acked.add(seq)
        self.acked_at[seq] = time.monotonic()

    def poison(self) -> list[str]:
        """The six poison messages; returns their kinds."""
        jpeg = encode_jpeg(self.base, 90)
        hdr = [("camera_id", KCAM.encode()), ("ts", b"1700000000000"), ("content-type", b"image/jpeg")]
        items = [
            ("empty", b"", [*hdr, ("seq", b"900001")]),
            ("truncated_jpeg", jpeg[: len(jpeg) // 3], [*hdr, ("seq", b"900002")]),
            ("png_bomb", png_bomb(), [*hdr[:2], ("content-type", b"image/png"), ("seq", b"900003")]),
            (
                "wrong_content_type",
                b'{"not": "an image"}',
                [*hdr[:2], ("content-type", b"application/json"), ("seq", b"900004")],
            ),
            ("10MB", os.urandom(10 << 20), [*hdr, ("seq", b"900005")]),
            ("no_headers", jpeg, []),
        ]
        for _, value, headers in items:
            self.producer.send(self.topic, key=None if not headers else KCAM.encode(), value=value, headers=headers)
        self.producer.flush(60)
        return [k for k, _, _ in items]

    def close(self) -> None:
        self.producer.close(10)


# ----------------------------------------------------------------------------- watching
def descendants(root: int) -> set[str]:
    """PIDs (as strings) of every process below ``root``: only this run's processes are measured."""
    children: dict[str, list[str]] = defaultdict(list)
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                children[stat.rsplit(")", 1)[1].split()[1]].append(pid)
    out, todo = set(), [str(root)]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def tree_rss() -> dict[str, int]:
    """RSS (bytes) of this run's processes by kind: oddeye driver, Ray workers/raylet/gcs, tansu, RTSP server."""
    out: dict[str, int] = defaultdict(int)
    for pid in descendants(os.getpid()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            rss = next(
                int(line.split()[1]) * 1024
                for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("VmRSS:")
            )
        except (OSError, StopIteration, ValueError):
            continue
        if "oddeye.cli run" in cmd:
            kind = "driver"
        elif "ray::IngestActor" in cmd or "ray::ModelActor" in cmd or "default_worker.py" in cmd:
            kind = "ray workers"
        elif "raylet" in cmd or "gcs_server" in cmd:
            kind = "ray raylet+gcs"
        elif "tansu" in cmd:
            kind = "tansu (each)"
        elif "rtsp_server.py" in cmd:
            kind = "rtsp server"
        else:
            continue
        out[kind] = max(out[kind], rss) if kind == "tansu (each)" else out[kind] + rss
    return out


class Watcher(threading.Thread):
    """Scrapes /metrics and RSS once a second: the longest commit stall and peak memory."""

    def __init__(self, metrics_port: int) -> None:
        super().__init__(daemon=True)
        self.port = metrics_port
        self.max_stall = 0.0
        self.peak: dict[str, int] = defaultdict(int)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            with contextlib.suppress(Exception):
                text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2).read().decode()
                for line in text.splitlines():
                    if line.startswith("oddeye_oldest_unacked_seconds{") and 'camera="kafka:' in line:
                        self.max_stall = max(self.max_stall, float(line.rsplit(" ", 1)[1]))
            for k, v in tree_rss().items():
                self.peak[k] = max(self.peak[k], v)


# ----------------------------------------------------------------------------- the pipeline
class Oddeye:
    def __init__(self, config: Path, out: Path) -> None:
        self.config, self.out = config, out
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    def start(self) -> None:
        self.runs += 1
        logf = open(self.out / f"run{self.runs}.log", "w")  # noqa: SIM115 (kept open for the child)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "oddeye.cli", "run", str(self.config), "--out", str(self.out)],
            cwd=self.out, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def kill(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(60)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(300)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9


def lines(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


class ScoreLog:
    """``scores.jsonl`` read as it grows: each call parses only the lines written since the last one
    (the waits poll several times a second, and the file reaches tens of thousands of lines)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._seqs: dict[str, Counter] = defaultdict(Counter)

    def _update(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        self._offset += end
        for line in data[:end].splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                r = json.loads(line)
                self._seqs[r["camera_id"]][r["seq"]] += 1

    def seqs(self, camera: str) -> Counter:
        """How often each seq of ``camera`` was scored."""
        self._update()
        return self._seqs[camera]

    def count(self, camera: str) -> int:
        """Score records of a camera (an RTSP camera's seq starts again at 0 when the pipeline restarts)."""
        return sum(self.seqs(camera).values())


def wait_for(what: str, cond, timeout_s: float, every: float = 1.0, odd: Oddeye | None = None) -> float:  # type: ignore[no-untyped-def]
    """Wait until ``cond()``; fails at once when the pipeline process ``odd`` has exited (see its log)."""
    t0 = time.monotonic()
    while not cond():
        if odd is not None and odd.proc is not None and odd.proc.poll() is not None:
            raise RuntimeError(
                f"oddeye run exited with {odd.proc.returncode} while waiting for {what}; "
                f"see {odd.out}/run{odd.runs}.log"
            )
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every)
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 s outages, 60 s overload (about 6 minutes in all)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--capacity", type=float, default=40.0, help="pipeline capacity, frames/s (null model latency)")
    args = ap.parse_args()
    outage_s, overload_s = (10, 60) if args.quick else (30, 300)
    capacity = args.capacity
    base_rate = capacity / 2 - 5  # the RTSP camera adds 5 fps
    work = Path(args.out or tempfile.mkdtemp(prefix="oddeye-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    out.mkdir(exist_ok=True)
    log(f"chaos run in {work}; capacity {capacity:.0f} fps, outages {outage_s} s, overload {overload_s} s")

    src_port, sink_port, metrics_port = free_port(), free_port(), free_port()
    broker = start_broker(src_port)
    sink_broker = start_broker(sink_port)
    for b in (broker,):
        b.create_topic("frames", 2)
        b.create_topic("frames.dlq", 1)
    sink_broker.create_topic("oddeye.scores", 1)
    camera = start_rtsp_server(width=160, height=120, fps=5)
    cam_port = camera.port

    model = create_model("null", image_size=[SIZE, SIZE], fail_marker=True, latency_ms=1000.0 * BATCH / capacity)
    model.fit([torch.rand(4, 3, SIZE, SIZE)], progress=False)
    ckpt = model.save(work / "null.pt")
    cfg = {
        "ray": {"num_cpus": 2},
        "sources": [
            {"type": "kafka", "bootstrap_servers": broker.bootstrap, "topics": ["frames"], "group_id": "chaos",
             "dlq_topic": "frames.dlq", "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000,
             "max_poll_records": 50, "queue_size": 64, "reconnect_max_s": 2.0, "max_message_bytes": 8_000_000},
            {"type": "rtsp", "url": camera.url, "camera_id": "rtsp-cam", "reconnect_max_s": 2.0,
             "open_timeout_s": 3.0, "read_timeout_s": 2.0, "queue_size": 16},
        ],
        "model": {"name": "null", "image_size": [SIZE, SIZE], "device": "cpu", "checkpoint": str(ckpt)},
        "batching": {"max_batch_size": BATCH, "max_wait_ms": 50},
        "alerts": {"threshold": 0.9},
        "sinks": [
            {"type": "jsonl"},
            {"type": "kafka", "bootstrap_servers": sink_broker.bootstrap, "alerts_topic": None, "buffer_records": 500,
             "connect_timeout_s": 1.0, "reconnect_max_s": 2.0},
        ],
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
    }  # fmt: skip
    config = work / "chaos.yaml"
    config.write_text(yaml.safe_dump(cfg))

    pub = Publisher(broker.bootstrap, "frames", marked_every=500)
    scores = ScoreLog(out / "scores.jsonl")
    odd = Oddeye(config, out)
    watcher = Watcher(metrics_port)
    watcher.start()
    results: dict[str, object] = {}
    try:
        odd.start()
        # 1. warm-up, then a broker restart once everything so far is committed
        pub.publish(100, base_rate)
        wait_for("warm-up scored", lambda: len(scores.seqs(KCAM)) >= 100, 600, odd=odd)
        time.sleep(3)  # commits go out within a second
        pub.close()
        log("broker restart")
        broker.stop()
        time.sleep(3)
        broker = start_broker(src_port)
        broker.create_topic("frames", 2)
        broker.create_topic("frames.dlq", 1)
        warm = pub.seq
        acked_before, marked_before = set(pub.acked), set(pub.marked)
        pub = Publisher(broker.bootstrap, "frames", marked_every=500)
        pub.seq, pub.acked, pub.marked = warm, acked_before, marked_before
        stream_stop = threading.Event()
        stream = threading.Thread(target=pub.publish, args=(10**9, base_rate, stream_stop), daemon=True)
        stream.start()
        wait_for(
            "a frame scored after the broker restart",
            lambda: max(scores.seqs(KCAM), default=-1) >= warm,
            300,
            0.2,
            odd,
        )
        # from the restarted broker acknowledging the first new frame to that frame's score
        results["broker_reconnect_s"] = time.monotonic() - pub.acked_at.get(warm, time.monotonic())
        log(f"source back {results['broker_reconnect_s']:.1f} s after the broker took the first new frame")
        # 3. SIGKILL of the whole pipeline, then a restart
        time.sleep(10)
        log("SIGKILL pipeline")
        odd.kill()
        t_kill = time.monotonic()
        n_before = scores.count(KCAM)
        odd.start()
        wait_for("scores after the restart", lambda: scores.count(KCAM) > n_before, 600, 0.5, odd)
        results["restart_s"] = time.monotonic() - t_kill
        log(f"pipeline scoring again {results['restart_s']:.1f} s after the SIGKILL (restart, Ray start, model load)")
        # 4. Kafka-sink outage
        time.sleep(15)
        log(f"sink outage {outage_s} s")
        sink_broker.stop()
        time.sleep(outage_s)
        sink_broker = start_broker(sink_port)
        sink_broker.create_topic("oddeye.scores", 1)
        # 5. camera outage
        log(f"camera outage {outage_s} s")
        camera.stop()
        time.sleep(outage_s)
        n_rtsp = scores.count("rtsp-cam")  # frames read before the outage are scored by now
        camera = start_rtsp_server(port=cam_port, width=160, height=120, fps=5)
        t_cam = time.monotonic()
        wait_for(
            "RTSP frames after the camera returned",
            lambda: scores.count("rtsp-cam") > n_rtsp + 2,
            300,
            0.2,
            odd,
        )
        results["camera_reconnect_s"] = time.monotonic() - t_cam
        log(f"camera back {results['camera_reconnect_s']:.1f} s after the server")
        stream_stop.set()
        stream.join()
        # 6. poison messages
        poison = pub.poison()
        # 7. 2x overload
        log(f"overload: {2 * capacity - 5:.0f} fps for {overload_s} s")
        pub.publish(int((2 * capacity - 5) * overload_s), 2 * capacity - 5)
        # drain
        expected = pub.acked - pub.marked
        wait_for("every published frame scored", lambda: expected <= scores.seqs(KCAM).keys(), 3600, 2.0, odd)
        time.sleep(3)
        results["exit_code"] = odd.terminate()
    finally:
        watcher.stop.set()
        if odd.proc is not None and odd.proc.poll() is None:
            odd.kill()
        pub.close()

    # ---------------------------------------------------------------- counting
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        "frames.dlq",
        bootstrap_servers=broker.bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
        max_partition_fetch_bytes=16 << 20,
        fetch_max_bytes=64 << 20,
    )
    dlq = list(consumer)
    consumer.close()
    seqs = Counter(scores.seqs(KCAM))  # the pipeline has stopped: final
    dead = lines(out / "dead_letters.jsonl")
    reasons = Counter()
    dead_seqs = set()
    for d in dead:
        err = d["error"]
        reason = ("marked frame" if "marked" in err else "max_pixels" if "max_pixels" in err else
                  "too large" if "bytes" in err and "max" in err else "header" if "header" in err or "camera" in err
                  else "decode")  # fmt: skip
        reasons[reason] += 1
        if d["camera_id"] == KCAM:
            dead_seqs.add(d["seq"])
    published = pub.acked
    lost = sorted(published - set(seqs) - dead_seqs)
    duplicates = sum(seqs.values()) - len(seqs)
    dlq_poison = sum(1 for m in dlq if int(dict(m.headers).get("seq", b"0") or 0) >= 900_000 or not m.headers
                     or dict(m.headers).get("camera_id") is None)  # fmt: skip
    for b in (broker, sink_broker):
        b.stop()
    camera.stop()

    print()
    print(
        f"machine: {os.uname().nodename} · {os.cpu_count()} CPU · outages {outage_s} s · overload {overload_s} s "
        f"at 2× a capacity of {capacity:.0f} fps · pipeline runs: {odd.runs} · exit {results.get('exit_code')}"
    )
    print(
        "| published (Kafka) | scored (unique) | dead-lettered | lost | duplicates | max commit stall (s) "
        "| RTSP frames scored | broker reconnect (s) | camera reconnect (s) | SIGKILL to scoring again (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    by_reason = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
    rtsp_n = scores.count("rtsp-cam")
    broker_s = results.get("broker_reconnect_s", float("nan"))
    camera_s = results.get("camera_reconnect_s", float("nan"))
    print(
        f"| {len(published)} | {len(seqs)} | {sum(reasons.values())} ({by_reason}) | **{len(lost)}** | {duplicates} "
        f"| {watcher.max_stall:.1f} | {rtsp_n} | {broker_s:.1f} | {camera_s:.1f} "
        f"| {results.get('restart_s', float('nan')):.1f} |"
    )
    print()
    print(
        f"poison messages sent: {len(poison)} ({', '.join(poison)}); in the DLQ topic: {dlq_poison}; "
        f"marked frames: {len(pub.marked & published)}, in the DLQ topic: "
        f"{sum(1 for m in dlq if dict(m.headers).get('error', b'').find(b'marked') >= 0)}"
    )
    print("peak RSS: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in sorted(watcher.peak.items())))
    if lost:
        print(f"LOST seqs (first 20): {lost[:20]}")


if __name__ == "__main__":
    main()
