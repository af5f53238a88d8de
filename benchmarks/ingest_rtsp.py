"""RTSP ingest: decode cost per stream at 720p and 1080p, for each decoder backend.

Starts a local GStreamer RTSP server per case (``tests/servers/rtsp_server.py``, H.264 from
x264) and reads it with ``oddeye.sources.rtsp.RtspSource``, as the ingest actor does. The
server sends in real time, so the delivered rate is at most the stream's fps; the figure
that scales is the CPU time the source spends per frame (decode + colour conversion, all
threads of this process), turned into frames/s per core. The server's encoder runs on the
same machine: on a small machine it competes with the decoder for cores.

    python benchmarks/ingest_rtsp.py [--seconds 8] [--fps 30] [--backends opencv pyav]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from oddeye.sources.rtsp import BACKENDS, RtspSource, pyav_available  # noqa: E402
from tests.servers.rtsp import rtsp_server_available, start_rtsp_server  # noqa: E402

log = logging.getLogger("benchmarks.ingest_rtsp")

SIZES = {"720p": (1280, 720), "1080p": (1920, 1080)}


@dataclass
class Result:
    backend: str
    size: str
    fps: int
    frames: int
    seconds: float
    cpu_s: float
    first_frame_s: float

    @property
    def delivered_fps(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms(self) -> float:
        return 1000.0 * self.cpu_s / self.frames if self.frames else float("nan")

    @property
    def per_core_fps(self) -> float:
        return self.frames / self.cpu_s if self.cpu_s else float("nan")


def measure(backend: str, size: str, fps: int, seconds: float) -> Result:
    width, height = SIZES[size]
    server = start_rtsp_server(width=width, height=height, fps=fps, pattern="ball")
    source = RtspSource(url=server.url, camera_id=f"bench-{size}", backend=backend, read_timeout_s=5.0)
    frames = 0
    first_frame_s = float("nan")
    t_open = time.monotonic()
    try:
        it = iter(source)
        next(it)  # connected and decoding (includes FFmpeg's stream probing)
        first_frame_s = time.monotonic() - t_open
        for _ in range(fps):  # one second of warm-up
            next(it)
        cpu0, t0 = time.process_time(), time.monotonic()
        deadline = t0 + seconds
        for frame in it:
            frames += 1
            assert frame.image.shape[:2] == (height, width)
            if time.monotonic() >= deadline:
                break
        cpu_s, wall_s = time.process_time() - cpu0, time.monotonic() - t0
    finally:
        source.close()
        server.stop()
    return Result(backend, size, fps, frames, wall_s, cpu_s, first_frame_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per case")
    p.add_argument("--fps", type=int, default=30, help="frame rate the server sends")
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=None, help="default: those installed")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("oddeye").setLevel(logging.WARNING)

    reason = rtsp_server_available()
    if reason:
        log.error("cannot start the RTSP test server: %s", reason)
        return 1
    backends = args.backends or [b for b in BACKENDS if b != "pyav" or pyav_available()]
    results = []
    for size in args.sizes:
        for backend in backends:
            log.info("measuring %s %s at %d fps for %.0f s ...", backend, size, args.fps, args.seconds)
            results.append(measure(backend, size, args.fps, args.seconds))

    cores = os.cpu_count() or 1
    header = (
        f"{'backend':<8} {'size':<6} {'sent fps':>8} {'got fps':>8} "
        f"{'CPU ms/frame':>12} {'frames/s/core':>13} {'open s':>6}"
    )
    lines = [f"RTSP ingest, H.264 over TCP, {cores} cores (server encoding on the same machine)", header]
    lines.append("-" * len(header))
    for r in results:
        lines.append(
            f"{r.backend:<8} {r.size:<6} {r.fps:>8d} {r.delivered_fps:>8.1f} {r.cpu_ms:>12.2f} "
            f"{r.per_core_fps:>13.0f} {r.first_frame_s:>6.2f}"
        )
    print("\n".join(lines))  # the table is this script's output
    return 0


if __name__ == "__main__":
    sys.exit(main())
