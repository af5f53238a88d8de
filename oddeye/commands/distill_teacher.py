"""``oddeye distill-teacher --backbone B --weights W --images DIR --out FILE``: an EfficientAd teacher.

Distils a PDN (S or M) to reproduce a backbone's patch descriptors on a folder of natural images
(see ``oddeye.models.teacher_distillation``) and writes a teacher file for EfficientAd's
``teacher_weights``. The paper trains 60 000 steps on ImageNet with a GPU; on a CPU a few hundred
to a few thousand steps on small crops give a usable teacher (``--steps``, ``--crop-size``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

COMMAND = "distill-teacher"
HELP = "distil an EfficientAd PDN teacher from a backbone on a folder of natural images"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="efficientnet_lite0", help="timm backbone (default efficientnet_lite0)")
    parser.add_argument(
        "--weights",
        help="backbone weights: offline:efficientnet_lite0, a local state_dict file, or omit for timm's download",
    )
    parser.add_argument("--layers", nargs="+", help="backbone layers to distil (default: a set with >= 384 channels)")
    parser.add_argument(
        "--images",
        required=True,
        help="folder of natural images, searched recursively, or 'bundled' for scikit-image's photos (no download)",
    )
    parser.add_argument("--out", required=True, help="teacher file to write (use it as teacher_weights)")
    parser.add_argument("--model-size", default="small", choices=["small", "medium", "S", "M"])
    parser.add_argument("--teacher-out-channels", type=int, default=384)
    parser.add_argument("--steps", type=int, default=1000, help="training steps (default 1000; the paper: 60000)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop-size", type=int, default=128, help="PDN input crop side in pixels (default 128)")
    parser.add_argument("--backbone-scale", type=float, default=2.0, help="backbone input / PDN input (default 2)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")


def run(args: argparse.Namespace) -> int:
    import torch

    from oddeye.models.components.feature_extractor import TimmFeatureExtractor, WeightsUnavailableError
    from oddeye.models.components.natural_images import NaturalImages
    from oddeye.models.components.pdn import write_teacher_file
    from oddeye.models.teacher_distillation import TeacherTarget, default_layers, distill_teacher

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    layers = args.layers or default_layers(args.backbone)
    if not layers:
        print(f"oddeye distill-teacher: no default layers for {args.backbone!r}; pass --layers", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        images = NaturalImages.bundled() if args.images == "bundled" else NaturalImages.from_folder(args.images)
        extractor = TimmFeatureExtractor(args.backbone, layers, pre_trained=args.weights is None, weights=args.weights)
        target = TeacherTarget(extractor, args.teacher_out_channels, args.backbone_scale)
        print(
            f"oddeye distill-teacher: {args.model_size} PDN, {args.teacher_out_channels} channels, from "
            f"{args.backbone} {layers} on {len(images)} images in {images.source}; {args.steps} steps on {device}",
            flush=True,
        )
        result = distill_teacher(
            target,
            images,
            model_size=args.model_size,
            crop_size=args.crop_size,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            device=device,
        )
    except (ValueError, FileNotFoundError, WeightsUnavailableError, RuntimeError) as e:
        print(f"oddeye distill-teacher: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("oddeye distill-teacher: interrupted; nothing was written", file=sys.stderr)
        return 130
    meta = {
        "backbone": args.backbone,
        "weights": args.weights,
        "layers": list(layers),
        "images": str(args.images),
        "steps": result.steps,
        "crop_size": args.crop_size,
        "backbone_scale": args.backbone_scale,
        "first_loss": result.first_loss,
        "last_loss": result.last_loss,
    }
    path = write_teacher_file(Path(args.out), result.teacher, meta)
    print(
        f"oddeye distill-teacher: wrote {path} (loss {result.first_loss:.4g} -> {result.last_loss:.4g}, "
        f"{time.perf_counter() - t0:.0f} s); use it as `teacher_weights: {path}`"
    )
    return 0
