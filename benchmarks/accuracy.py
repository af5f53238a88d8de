"""Accuracy on the offline benchmark: synthesise the data if needed, fit and evaluate each model.

For every model it runs ``oddeye eval configs/bench/<model>.yaml --data DATA/images --refit``
(fitting each category afresh) and prints one table: image AUROC, pixel AUROC, AUPRO per
category and model, with fit seconds and scoring frames/s, then the per-model means.

    python benchmarks/accuracy.py [--models padim patchcore ...|all] [--data bench-data] [--out bench-out]
                                  [--set model.image_size=[128,128] ...]

``normal_over_half`` is the share of normal test images at or above 0.5 (false alerts at the
default threshold): it shows how well the held-out normalisation is calibrated.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "normal_over_half", "fit_seconds", "frames_per_s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["padim"], help="model names, or 'all' (each with a bench config)")
    ap.add_argument("--data", default="bench-data", help="benchmark data folder (written by data synth if missing)")
    ap.add_argument("--out", default="bench-out", help="checkpoints and JSON results")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--categories", nargs="+", help="only these categories")
    ap.add_argument("--keep", action="store_true", help="reuse existing checkpoints instead of fitting again")
    ap.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="config override for every eval")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from oddeye.cli import main as oddeye
    from oddeye.models.base import list_models

    data = Path(args.data)
    if not (data / "images").is_dir():
        print(f"writing the offline benchmark to {data} (seed {args.seed})", flush=True)
        if oddeye(["data", "synth", "--out", str(data), "--seed", str(args.seed)]) != 0:
            return 1
    models = list_models() if args.models == ["all"] else args.models
    configs = {m: ROOT / "configs" / "bench" / f"{m}.yaml" for m in models}
    missing = [m for m, c in configs.items() if not c.is_file()]
    if missing and args.models != ["all"]:
        print(f"no benchmark config for {missing} (expected configs/bench/<model>.yaml)", file=sys.stderr)
        return 2
    rows: list[tuple[str, str, dict]] = []
    means: dict[str, dict] = {}
    for model, cfg in configs.items():
        if not cfg.is_file():
            print(f"skipping {model}: no {cfg.relative_to(ROOT)}", file=sys.stderr)
            continue
        images = data / "images"
        targets = [images / c for c in args.categories] if args.categories else [images]
        for target in targets:
            out_json = Path(args.out) / f"accuracy-{model}-{target.name}.json"
            argv = [
                "eval",
                str(cfg),
                "--data",
                str(target),
                "--json",
                str(out_json),
                "--set",
                f"model.checkpoint={Path(args.out) / model / '{category}.pt'}",
            ]
            for override in args.set:
                argv += ["--set", override]
            if not args.keep:
                argv.append("--refit")
            print(f"{model}: oddeye {' '.join(argv)}", flush=True)
            if oddeye(argv) != 0:
                return 1
            report = json.loads(out_json.read_text())
            rows += [(model, name, rec) for name, rec in report["categories"].items()]
        recs = [r for m, _, r in rows if m == model]
        means[model] = {c: _mean([r.get(c) for r in recs]) for c in COLUMNS}

    print()
    print(
        f"# accuracy on the offline benchmark ({data}, seed {args.seed}); {platform.node()}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    head = f"| {'model':<10} | {'category':<10} | " + " | ".join(f"{c:>12}" for c in COLUMNS) + " |"
    print(head)
    print("|" + "|".join("-" * (len(p)) for p in head.split("|")[1:-1]) + "|")
    for model, name, rec in rows:
        print(f"| {model:<10} | {name:<10} | " + " | ".join(_fmt(rec.get(c)) for c in COLUMNS) + " |")
    for model, rec in means.items():
        print(f"| {model:<10} | {'**mean**':<10} | " + " | ".join(_fmt(rec.get(c)) for c in COLUMNS) + " |")
    return 0


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _fmt(v: float | None) -> str:
    if v is None:
        return f"{'—':>12}"
    return f"{v:>12.4f}" if v <= 1.0 else f"{v:>12.1f}"


if __name__ == "__main__":
    sys.exit(main())
