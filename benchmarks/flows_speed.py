"""Speed of the normalizing-flow models (issue 16), and FastFlow against its bare backbone.

    python benchmarks/flows_speed.py --fit-images 32 --steps 4 --json flows_speed.json

Rows as in ``models_speed.py`` (fit seconds on N random 256×256 images, fitted state outside
the backbone in MB, frames/s at batch 1 and 16), with ResNet-18 (random weights: speed does
not depend on them) and each model's anomalib defaults except the training length
(``--steps`` gradient steps: a full fit's time is epochs × that). A last row times the bare
ResNet-18 feature pass of FastFlow's layers, and prints FastFlow's frames/s over it: flows are
inference-light, so the ratio should be close to 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

import torch

from oddeye.models.base import create_model
from oddeye.models.components import TimmFeatureExtractor

try:  # run as a script (benchmarks/ on sys.path) or as a module from the repository root
    from models_speed import _fitted_state_mb, _frames_per_second, _table
except ImportError:
    from benchmarks.models_speed import _fitted_state_mb, _frames_per_second, _table

MODELS: dict[str, dict[str, Any]] = {
    "fastflow": {"backbone": "resnet18"},
    "cflow": {"backbone": "resnet18", "layers": ["layer2", "layer3", "layer4"]},
    "csflow": {"backbone": "resnet18", "layer": "layer3"},  # stride 16: 256 px is a multiple of 64
    "uflow": {"backbone": "resnet18"},
}


def bench(name: str, params: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    size = args.size
    model = create_model(
        name, pre_trained=False, image_size=(size, size), max_epochs=None, max_steps=args.steps, **params
    )
    train = torch.rand(args.fit_images, 3, size, size)
    val = torch.rand(max(4, args.fit_images // 4), 3, size, size)
    start = time.perf_counter()
    model.fit(train.split(args.fit_batch), val.split(args.fit_batch), progress=False)
    row = {"model": name, "fit_images": args.fit_images, "steps": args.steps, "fit_s": time.perf_counter() - start}
    row["state_mb"] = _fitted_state_mb(model)
    for batch in (1, 16):
        row[f"fps_b{batch}"] = _frames_per_second(model, batch, size, torch.device("cpu"), args.min_time)
    return row


class _Bare(torch.nn.Module):
    """The backbone pass alone, shaped like a model for ``_frames_per_second``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = TimmFeatureExtractor("resnet18", ["layer1", "layer2", "layer3"], pre_trained=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.features(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--fit-images", type=int, default=32)
    parser.add_argument("--fit-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="gradient steps (image batches) per fit")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--min-time", type=float, default=3.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for name in args.models.split(","):
        rows.append(bench(name, MODELS[name], args))
        print(json.dumps(rows[-1]), flush=True)  # a row as soon as it is measured: long runs on a busy machine
    bare = {"model": "resnet18 layers 1-3 (bare)"}
    for batch in (1, 16):
        bare[f"fps_b{batch}"] = _frames_per_second(_Bare().eval(), batch, args.size, torch.device("cpu"), args.min_time)
    rows.append(bare)
    print(json.dumps(bare), flush=True)
    print(_table(rows, ["model", "fit_images", "steps", "fit_s", "state_mb", "fps_b1", "fps_b16"]))
    ff = next((r for r in rows if r["model"] == "fastflow"), None)
    if ff is not None:
        for batch in (1, 16):
            print(
                f"fastflow / bare backbone frames/s at batch {batch}: {ff[f'fps_b{batch}'] / bare[f'fps_b{batch}']:.2f}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
