"""Scoring speed and state size of GLASS, DRAEM, DSR and GANomaly at their benchmark settings.

    python benchmarks/synthesis_speed.py [--models glass draem dsr ganomaly] [--min-time 3] [--json OUT]

Each model is built from ``configs/bench/<model>.yaml`` (parameters and image size; weights are
random unless the config names offline ones, which does not change speed) and scores random
images at batch 1 and 16. Rows: frames/s, the checkpoint's state size in MB (a frozen backbone
counted apart), and for GLASS the ratio of its frames/s to the bare backbone's forward pass:
GLASS at inference is one backbone pass, a linear adaptor and a small discriminator.
Fit seconds per category come from ``oddeye eval`` (benchmarks/accuracy.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from oddeye.models.base import AnomalyModel, create_model

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("synthesis_speed")


def _timed(fn: Any, images: torch.Tensor, min_time: float) -> float:
    """Frames per second of ``fn(images)`` over at least ``min_time`` seconds (after a warm-up)."""
    with torch.no_grad():
        fn(images)
        runs, start = 0, time.perf_counter()
        while True:
            fn(images)
            runs += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                return runs * images.shape[0] / elapsed


def _state_mb(model: AnomalyModel) -> tuple[float, float]:
    """(state outside a frozen backbone, frozen backbone) in MB."""
    head = backbone = 0
    for key, value in model.state_dict().items():
        size = value.numel() * value.element_size()
        if key.startswith("feature_extractor."):
            backbone += size
        else:
            head += size
    return head / 1e6, backbone / 1e6


def bench(name: str, min_time: float) -> dict[str, Any]:
    cfg = yaml.safe_load((ROOT / "configs" / "bench" / f"{name}.yaml").read_text())["model"]
    params = dict(cfg.get("params") or {})
    model = create_model(name, image_size=cfg["image_size"], **params)
    model.eval()
    model.fitted = True  # speed only: the normaliser's defaults are fine
    size = tuple(cfg["image_size"])
    row: dict[str, Any] = {"model": name, "image_size": list(size)}
    row["state_mb"], row["backbone_mb"] = (round(v, 2) for v in _state_mb(model))
    for batch in (1, 16):
        images = torch.rand(batch, 3, *size)
        row[f"fps_b{batch}"] = round(_timed(model, images, min_time), 2)
        if name == "glass":
            bare = _timed(model.feature_extractor, images, min_time)
            row[f"backbone_fps_b{batch}"] = round(bare, 2)
            row[f"glass_vs_backbone_b{batch}"] = round(row[f"fps_b{batch}"] / bare, 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["glass", "draem", "dsr", "ganomaly"])
    ap.add_argument("--min-time", type=float, default=3.0, help="seconds of scoring per measurement")
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rows = []
    for name in args.models:
        row = bench(name, args.min_time)
        log.info("%s", row)
        rows.append(row)
    cols = ["model", "image_size", "fps_b1", "fps_b16", "state_mb", "backbone_mb"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    for row in rows:
        if "glass_vs_backbone_b1" in row:
            print(
                f"GLASS / bare backbone frames/s: batch 1 {row['glass_vs_backbone_b1']}, "
                f"batch 16 {row['glass_vs_backbone_b16']}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
