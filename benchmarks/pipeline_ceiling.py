"""The pipeline's own ceiling: frames/s with a no-op model against the JPEG-decode-only limit.

Runs the registered ``null`` model (scores nothing; a benchmark tool) on 256² JPEG frames from
1, 4 and 16 cameras (image-folder sources over the same files), and measures in the same run,
on the same cores, how fast the machine decodes those JPEGs with nothing else to do (one decode
process per core). Also reports what passes through the driver: pickled bytes of the ingest and
model results per frame (pixels travel by object-store reference and must not appear here) and
driver CPU µs per frame, and the seconds outside the stream (start-up: Ray, actors; and shut-down).

    python benchmarks/pipeline_ceiling.py [--frames 400] [--cameras 1 4 16] [--size 256] [--busy N]
                                          [--decode-workers 1 2] [--worker-niceness 0 15]

``--busy N`` adds N single-threaded CPU-bound processes beside the run (a busy camera server):
the pipeline's frames/s should fall no further than the CPU share it loses, N/(N + cores).
``--worker-niceness`` compares ``ray.worker_niceness`` values (0, oddeye's default; 15, Ray's).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _spin(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x += 1


def _decode_all(paths: list[str]) -> int:
    import cv2

    cv2.setNumThreads(1)
    n = 0
    for p in paths:
        data = np.frombuffer(Path(p).read_bytes(), np.uint8)
        img = cv2.imdecode(data, cv2.IMREAD_COLOR)
        n += img is not None
    return n


def decode_limit(paths: list[str], repeat: int) -> float:
    """Frames/s decoding ``paths`` × ``repeat`` with one process per core (the decode-only limit)."""
    cores = os.cpu_count() or 1
    work = [paths * repeat][0]
    chunks = [work[i::cores] for i in range(cores)]
    with mp.get_context("spawn").Pool(cores) as pool:
        pool.map(_decode_all, [paths[:4]] * cores)  # warm-up: imports
        t = time.perf_counter()
        n = sum(pool.map(_decode_all, chunks))
        return n / (time.perf_counter() - t)


def make_frames(folder: Path, n: int, size: int) -> list[str]:
    from oddeye.frames import encode_jpeg
    from oddeye.sources.synthetic import SyntheticCamera

    folder.mkdir(parents=True, exist_ok=True)
    cam = SyntheticCamera(camera_id="c", width=size, height=size, num_frames=n, anomaly_every=0)
    paths = []
    for i, f in enumerate(cam):
        p = folder / f"{i:05d}.jpg"
        p.write_bytes(encode_jpeg(f.image, 90))
        paths.append(str(p))
    return paths


def run_pipeline(
    folder: Path,
    checkpoint: Path,
    cameras: int,
    size: int,
    batch: int,
    decode_workers: int | None = None,
    worker_niceness: int = 0,
) -> dict[str, float]:
    from oddeye.config import parse_config
    from oddeye.pipeline import runner as runner_mod
    from oddeye.pipeline.runner import Pipeline

    raw = {
        "sources": [
            {
                "type": "images",
                "path": str(folder),
                "camera_id": f"cam-{i:02d}",
                "queue_size": 2 * batch,
                "decode_workers": decode_workers,
            }
            for i in range(cameras)
        ],
        "model": {"name": "null", "image_size": [size, size], "device": "cpu", "checkpoint": str(checkpoint)},
        "batching": {"max_batch_size": batch, "max_wait_ms": 10, "max_inflight_batches": 2},
        "sinks": [],
        "metrics": {"enabled": False},
        "ray": {"worker_niceness": worker_niceness},
    }
    cfg = parse_config(raw)
    driver_bytes = [0]
    orig_take, orig_score = runner_mod.Pipeline._get_take, runner_mod.Pipeline._get_score

    def take(self, s):  # type: ignore[no-untyped-def]
        res = orig_take(self, s)
        driver_bytes[0] += len(pickle.dumps(res))
        return res

    def score(self, x):  # type: ignore[no-untyped-def]
        res = orig_score(self, x)
        driver_bytes[0] += len(pickle.dumps(res)) + len(pickle.dumps(x.parts))
        return res

    runner_mod.Pipeline._get_take, runner_mod.Pipeline._get_score = take, score
    try:
        wall0 = time.perf_counter()
        pipe = Pipeline(cfg, out_dir=folder.parent / "out")
        cpu0 = time.process_time()
        summary = pipe.run()
        cpu = time.process_time() - cpu0
        wall = time.perf_counter() - wall0
        pipe.close()
    finally:
        runner_mod.Pipeline._get_take, runner_mod.Pipeline._get_score = orig_take, orig_score
    n = max(1, summary.scored)
    return {
        "scored": summary.scored,
        "fps": summary.scored / max(summary.stream_seconds, 1e-9),
        "bytes_per_frame": driver_bytes[0] / n,
        "driver_us_per_frame": 1e6 * cpu / n,
        "start_s": wall - summary.stream_seconds,
    }


def _measure(
    args: argparse.Namespace, tmp: Path, ckpt: Path, cams: int, workers: int | None, nice: int
) -> dict[str, float]:
    import ray

    hogs = [mp.get_context("spawn").Process(target=_spin, args=(time.time() + 3600,)) for _ in range(args.busy)]
    for h in hogs:
        h.start()
    try:
        return run_pipeline(tmp / "frames", ckpt, cams, args.size, args.batch, workers, nice)
    except Exception as e:  # a row that cannot run (actors starved at start-up) is a result too
        return {"error": f"{type(e).__name__}: {str(e)[:120]}"}
    finally:
        for h in hogs:
            h.kill()
        if ray.is_initialized():
            ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=400, help="JPEG files (each camera reads all of them)")
    ap.add_argument("--cameras", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--busy", type=int, default=0, help="CPU-bound competing processes during the pipeline runs")
    ap.add_argument(
        "--decode-workers", type=int, nargs="+", default=[0], help="decode threads per source to compare (0: default)"
    )
    ap.add_argument("--worker-niceness", type=int, nargs="+", default=[0], help="ray.worker_niceness values to compare")
    args = ap.parse_args()

    import torch

    from oddeye.models.registry import create_model

    tmp = Path(tempfile.mkdtemp(prefix="oddeye-ceiling-"))
    paths = make_frames(tmp / "frames", args.frames, args.size)
    model = create_model("null", image_size=[args.size, args.size])
    model.fit([torch.rand(4, 3, args.size, args.size)], progress=False)
    ckpt = model.save(tmp / "null.pt")

    rows = []
    for cams in args.cameras:
        limit = decode_limit(paths, cams)
        for workers in args.decode_workers:
            for nice in args.worker_niceness:
                rows.append((cams, workers, nice, limit, _measure(args, tmp, ckpt, cams, workers or None, nice)))

    busy = f" · {args.busy} competing CPU-bound process(es)" if args.busy else ""
    print(
        f"machine: {platform.node()} · {os.cpu_count()} CPU · torch {torch.__version__} · {args.size}² JPEG q90{busy}"
    )
    print(
        "| cameras | decode threads per source | worker niceness | frames | decode-only limit (fps) "
        "| pipeline, null model (fps) | ratio | driver bytes/frame | driver CPU µs/frame | start+stop s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for cams, workers, nice, limit, r in rows:
        if "error" in r:
            print(f"| {cams} | {workers or 'default (2)'} | {nice} | – | {limit:.0f} | {r['error']} | | | | |")
            continue
        print(
            f"| {cams} | {workers or 'default (2)'} | {nice} | {r['scored']} | {limit:.0f} | {r['fps']:.0f} "
            f"| {r['fps'] / limit:.2f} | "
            f"{r['bytes_per_frame']:.0f} | {r['driver_us_per_frame']:.0f} | {r['start_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
