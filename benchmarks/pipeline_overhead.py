"""What the Ray pipeline costs on top of the bare batched model forward, on the same frames.

Prints one table: frames/s of (1) the model's batched forward alone on pre-decoded frames
in this process, and (2) the full pipeline (ingest actor → batcher → model actor →
alerts → JSONL sink) streaming the same synthetic frames, and their ratio (target ≥ 0.9).
Start-up (Ray, actors, model load) is excluded from the pipeline figure.

    python benchmarks/pipeline_overhead.py [--frames 600] [--batch 16] [--image-size 128] [--device auto]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--model", default="padim")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--replicas", type=int, default=1)
    args = ap.parse_args()

    from oddeye.config import parse_config
    from oddeye.pipeline.builders import build_source
    from oddeye.pipeline.fit import fit_from_config
    from oddeye.pipeline.ingest import prepare_frame
    from oddeye.pipeline.runner import Pipeline
    from oddeye.pipeline.scoring import ModelWorker

    size = args.image_size
    tmp = Path(tempfile.mkdtemp(prefix="oddeye-bench-"))
    raw = {
        "sources": [
            {
                "type": "synthetic",
                "camera_id": "bench",
                "width": size,
                "height": size,
                "num_frames": args.frames,
                "anomaly_every": 100,
                "anomaly_duration": 10,
                "drop_policy": "block",
                "queue_size": 4 * args.batch,
            }
        ],
        "fit": {"max_frames": 64, "stride": 4},
        "model": {
            "name": args.model,
            "device": args.device,
            "image_size": [size, size],
            "checkpoint": str(tmp / "model.pt"),
            "replicas": args.replicas,
            "params": {"backbone": "resnet18", "layers": ["layer1", "layer2", "layer3"], "pre_trained": False},
        },
        "batching": {"max_batch_size": args.batch, "max_wait_ms": 20, "max_inflight_batches": 2},
        "sinks": [{"type": "jsonl"}],
        "metrics": {"enabled": False},
    }
    cfg = parse_config(raw)
    fit_from_config(cfg, progress=False)

    # (1) bare batched forward on the same frames, decoded and sized up front
    frames = [prepare_frame(f, (size, size)) for f in build_source(cfg.sources[0])]
    worker = ModelWorker(str(cfg.model.checkpoint), args.device)
    worker.score(frames[: args.batch])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(frames), args.batch):
        worker.score(frames[i : i + args.batch])
    bare_s = time.perf_counter() - t0
    del worker

    # (2) the full pipeline on the same frames
    pipeline = Pipeline(cfg, out_dir=tmp / "out")
    summary = pipeline.run()
    pipeline.close()
    assert summary.scored == len(frames), summary

    bare_fps = len(frames) / bare_s
    pipe_fps = summary.scored / summary.stream_seconds
    dev = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    print(f"\nmachine: {platform.node()} · {os.cpu_count()} CPUs · device {dev} · torch {torch.__version__}")
    print(
        f"model {args.model} resnet18 (random weights) · input {size}×{size} · "
        f"batch {args.batch} · {len(frames)} frames\n"
    )
    print(f"| {'path':<38} | {'frames':>6} | {'seconds':>7} | {'frames/s':>8} |")
    print(f"|{'-' * 40}|{'-' * 8}|{'-' * 9}|{'-' * 10}|")
    print(f"| {'bare batched forward (one process)':<38} | {len(frames):>6} | {bare_s:>7.2f} | {bare_fps:>8.1f} |")
    print(
        f"| {'full pipeline (Ray actors + sinks)':<38} | {summary.scored:>6} | "
        f"{summary.stream_seconds:>7.2f} | {pipe_fps:>8.1f} |"
    )
    print(f"\nratio pipeline / bare: {pipe_fps / bare_fps:.2f} (target ≥ 0.9)")


if __name__ == "__main__":
    main()
