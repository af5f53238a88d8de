"""Throughput of every registered model: bare batched forward frames/s, latency, fit time, memory bank.

Each model is built from configs/bench/<model>.yaml when there is one (else its defaults
with a random backbone), fitted on normal images of the synthetic benchmark rendered in
memory, and timed on CPU (and CUDA when present) at batch 1, 8 and 32. One table:

    python benchmarks/throughput.py [--models padim ...] [--image-size 256] [--fit-images 64] [--seconds 5]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent


def build(name: str, image_size: int) -> torch.nn.Module:
    from oddeye.config import load_config
    from oddeye.models.base import create_model, model_params

    cfg_path = ROOT / "configs" / "bench" / f"{name}.yaml"
    if cfg_path.is_file():
        params = dict(load_config(cfg_path).model.params)
    else:
        params = {"pre_trained": False} if "pre_trained" in model_params(name) else {}
    return create_model(name, image_size=(image_size, image_size), **params)


def fit_images(n: int, size: int) -> np.ndarray:
    from oddeye.data.synth import SynthImageSpec, render_category

    train, _, _ = render_category("brick", SynthImageSpec(size=size, train=n, test_good=0, test_per_defect=0), seed=0)
    return np.stack(train)


def bank_mb(model: torch.nn.Module) -> float:
    """Size of what fitting learned: every tensor of the state_dict outside the feature extractor."""
    nbytes = sum(
        t.numel() * t.element_size() for k, t in model.state_dict().items() if not k.startswith("feature_extractor.")
    )
    return nbytes / 2**20


def time_forward(
    model: torch.nn.Module, images: torch.Tensor, batch: int, seconds: float
) -> tuple[float, float, float]:
    """frames/s, p50 and p99 batch latency (ms) over about ``seconds`` of repeated batches."""
    x = images[:batch]
    if x.shape[0] < batch:
        x = x.repeat((batch + x.shape[0] - 1) // x.shape[0], 1, 1, 1)[:batch]
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(2):
        model(x)
    sync()
    lat = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(lat) < 3:
        t0 = time.perf_counter()
        model(x)
        sync()
        lat.append(time.perf_counter() - t0)
    lat_ms = np.array(lat) * 1e3
    return batch * len(lat) / sum(lat), float(np.percentile(lat_ms, 50)), float(np.percentile(lat_ms, 99))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", help="default: every registered model")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--fit-images", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=5.0, help="timing per batch size")
    ap.add_argument("--devices", nargs="+", help="default: cpu, and cuda when available")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from oddeye.models.base import get_model_class, list_models
    from oddeye.pipeline.fit import TensorBatches

    devices = args.devices or ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    images = fit_images(args.fit_images, args.image_size)
    n_val = max(2, len(images) // 5)
    rows = []
    for name in args.models or list_models():
        if getattr(get_model_class(name), "is_video", False):
            print(f"{name}: a video model, skipped (clips, not images; see its own benchmark)", file=sys.stderr)
            continue
        for device in devices:
            dev = torch.device(device)
            model = build(name, args.image_size).to(dev)
            t0 = time.perf_counter()
            model.fit(TensorBatches(images[n_val:], 16, dev), TensorBatches(images[:n_val], 16, dev), progress=False)
            fit_s = time.perf_counter() - t0
            x = torch.from_numpy(images[:32]).permute(0, 3, 1, 2).to(dev)
            timings = {b: time_forward(model, x, b, args.seconds) for b in args.batches}
            rows.append((name, device, fit_s, bank_mb(model), timings))
            print(f"{name} on {device}: done", file=sys.stderr, flush=True)

    print(
        f"# bare forward throughput, {args.image_size}×{args.image_size}; {platform.node()}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads" + (f", {torch.cuda.get_device_name()}" if "cuda" in devices else "")
    )
    cols = [f"fps@{b}" for b in args.batches] + [f"p50/p99 ms@{b}" for b in args.batches]
    head = (
        f"| {'model':<10} | {'device':<6} | {'fit s':>7} | {'bank MB':>8} | "
        + " | ".join(f"{c:>16}" for c in cols)
        + " |"
    )
    print(head)
    print("|" + "|".join("-" * len(p) for p in head.split("|")[1:-1]) + "|")
    for name, device, fit_s, mb, t in rows:
        cells = [f"{t[b][0]:>16.1f}" for b in args.batches] + [f"{t[b][1]:>7.1f}/{t[b][2]:<8.1f}" for b in args.batches]
        print(f"| {name:<10} | {device:<6} | {fit_s:>7.1f} | {mb:>8.1f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
