"""Speed of the distillation models (STFPM, Reverse Distillation, EfficientAd S/M) beside PatchCore.

    python benchmarks/distillation_speed.py                         # 256 px, CPU (and CUDA when present)
    python benchmarks/distillation_speed.py --size 128 --rounds 5 --json R.json

Every model is built at the same input size with random weights (speed does not depend on them)
and fitted on random images for a fixed, small number of steps (``--fit-steps``; the fit column
is seconds per training step for the trained models, and the whole fit for PatchCore). Frames/s
at batch 1 and 16 are measured in interleaved rounds (model A, model B, ..., again) and the
median is reported, so a machine shared with other jobs slows every model alike.
State size: the whole checkpoint state (weights of every network, statistics, memory bank), MB.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from typing import Any

import torch

from oddeye.models.base import AnomalyModel, create_model

log = logging.getLogger("distillation_speed")

MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "efficient_ad_s": ("efficient_ad", {"model_size": "small", "imagenet_dir": None}),
    "efficient_ad_m": ("efficient_ad", {"model_size": "medium", "imagenet_dir": None}),
    "stfpm": ("stfpm", {"backbone": "efficientnet_lite0", "layers": ["blocks.1", "blocks.2", "blocks.4"]}),
    "reverse_distillation": (
        "reverse_distillation",
        {"backbone": "efficientnet_lite0", "layers": ["blocks.1", "blocks.2", "blocks.4"]},
    ),
    "patchcore": ("patchcore", {"backbone": "efficientnet_lite0", "layers": ["blocks.2", "blocks.4"]}),
}
TRAINED = {"efficient_ad", "stfpm", "reverse_distillation"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _state_mb(model: AnomalyModel) -> float:
    return sum(v.numel() * v.element_size() for v in model.state_dict().values()) / 1e6


def build_and_fit(key: str, size: int, fit_images: int, fit_steps: int, device: torch.device) -> dict[str, Any]:
    name, params = MODELS[key]
    params = dict(params)
    if name in TRAINED:
        params["max_steps"] = fit_steps
        if name != "efficient_ad":
            params["max_epochs"] = None
    if name != "efficient_ad":
        params["pre_trained"] = False
    torch.manual_seed(0)
    model = create_model(name, image_size=(size, size), **params).to(device)
    train = torch.rand(fit_images, 3, size, size)
    val = torch.rand(8, 3, size, size)
    batch = 1 if name == "efficient_ad" else 8  # anomalib trains EfficientAd at batch size 1
    _sync(device)
    start = time.perf_counter()
    model.fit(train.split(batch), val.split(8), progress=False)
    _sync(device)
    fit_s = time.perf_counter() - start
    row: dict[str, Any] = {"model": key, "device": device.type, "size": size, "state_mb": _state_mb(model)}
    if name in TRAINED:
        row["fit_s_per_step"] = fit_s / fit_steps
        row["fit_steps"] = fit_steps
    else:
        row["fit_s"] = fit_s
        row["fit_images"] = fit_images
    row["_model"] = model
    return row


def _fps_once(model: AnomalyModel, images: torch.Tensor, device: torch.device, min_time: float) -> float:
    runs, start = 0, time.perf_counter()
    while True:
        model(images)
        runs += 1
        _sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return runs * images.shape[0] / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--fit-images", type=int, default=16)
    ap.add_argument("--fit-steps", type=int, default=4)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds (median reported)")
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds per measurement")
    ap.add_argument("--devices", default=None, help="cpu,cuda (default: cpu, and cuda when available)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("oddeye").setLevel(logging.ERROR)
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    log.info("torch %s, %d CPU threads, devices %s", torch.__version__, torch.get_num_threads(), devices)
    out = []
    for dev in devices:
        device = torch.device(dev)
        rows = []
        for key in args.models.split(","):
            row = build_and_fit(key, args.size, args.fit_images, args.fit_steps, device)
            log.info("%s on %s: fitted, state %.1f MB", key, dev, row["state_mb"])
            rows.append(row)
        for batch in args.batches:
            images = torch.rand(batch, 3, args.size, args.size, device=device)
            for row in rows:
                row["_model"](images)  # warm-up
            samples: dict[str, list[float]] = {row["model"]: [] for row in rows}
            for _ in range(args.rounds):
                for row in rows:
                    samples[row["model"]].append(_fps_once(row["_model"], images, device, args.min_time))
            for row in rows:
                row[f"fps_b{batch}"] = statistics.median(samples[row["model"]])
                log.info("%s on %s: batch %d: %.2f frames/s", row["model"], dev, batch, row[f"fps_b{batch}"])
        for row in rows:
            del row["_model"]
        ref = next((r for r in rows if r["model"] == "patchcore"), None)
        for row in rows:
            if ref is not None:
                for batch in args.batches:
                    row[f"x_patchcore_b{batch}"] = row[f"fps_b{batch}"] / ref[f"fps_b{batch}"]
        out += rows
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
