"""``oddeye data synth --out DIR [--seed N]``: write the offline benchmark (images and video)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

COMMAND = "data"
HELP = "datasets: `oddeye data synth --out DIR` writes the offline benchmark"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser("synth", help="write synthetic images (MVTec layout) and video scenes (ShanghaiTech layout)")
    p.add_argument("--out", required=True, help="output folder: OUT/images/<category>/, OUT/video/<scene>/")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--train", type=int, default=80, help="normal training images per category (default 80)")
    p.add_argument("--categories", nargs="+", help="only these image categories")
    p.add_argument("--no-video", action="store_true", help="skip the video scenes")


def run(args: argparse.Namespace) -> int:
    from oddeye.data.synth import SynthImageSpec, write_image_benchmark
    from oddeye.data.synth_video import write_video_benchmark

    out = Path(args.out)
    t0 = time.perf_counter()
    try:
        images = write_image_benchmark(
            out / "images",
            seed=args.seed,
            spec=SynthImageSpec(size=args.size, train=args.train),
            categories=args.categories,
        )
    except ValueError as e:
        print(f"oddeye data synth: {e}")
        return 2
    scenes = [] if args.no_video else write_video_benchmark(out / "video", seed=args.seed)
    print(
        f"oddeye data synth: {len(images)} image categories under {out / 'images'}"
        + ("" if args.no_video else f", {len(scenes)} video scenes under {out / 'video'}")
        + f" ({time.perf_counter() - t0:.1f} s)"
    )
    return 0
