"""How long each trained model's bench config takes to fit one category, and how many epochs fit its budget.

    python benchmarks/fit_budget.py                          # every gradient-trained bench config
    python benchmarks/fit_budget.py --models stfpm glass --images 80 --json R.json

Each model is built from ``configs/bench/<model>.yaml`` exactly as configured (image size, batch
size, backbone and weights), and fitted twice on ``--images`` random images (the benchmark's
training set has 80 per category): once for one unit of its schedule (an epoch, or
``--step-unit`` steps for step-scheduled models) and once for two. The difference is the cost
of one unit, the rest is the fit's fixed cost (feature caches, teacher statistics, the held-out
scoring), so a fit of N units takes about ``fixed + N * unit``. Random pixels cost what real ones
do. The table gives the configured units, the estimated fit minutes, and the most units that
fit the issue's per-category budget (3 minutes for the distillation and flow models, 5 for
anomaly synthesis and GeneralAD). Run it on a quiet machine: the timings are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from oddeye.config import load_config
from oddeye.models.base import create_model

ROOT = Path(__file__).resolve().parent.parent
BUDGET_MIN = {
    "stfpm": 3, "reverse_distillation": 3, "efficient_ad": 3,
    "fastflow": 3, "cflow": 3, "csflow": 3, "uflow": 3,
    "glass": 5, "draem": 5, "dsr": 5, "ganomaly": 5, "general_ad": 5,
}  # fmt: skip
SCHEDULE_KEYS = ("max_epochs", "epochs", "max_steps")


def _schedule_key(params: dict[str, Any]) -> str:
    for key in SCHEDULE_KEYS:
        if params.get(key):
            return key
    raise ValueError(f"no schedule ({', '.join(SCHEDULE_KEYS)}) in params {sorted(params)}")


def _fit_seconds(name: str, cfg: Any, params: dict[str, Any], images: list[torch.Tensor]) -> float:
    torch.manual_seed(0)
    model = create_model(name, image_size=cfg.model.image_size, **params)
    start = time.perf_counter()
    model.fit(images, progress=False)
    return time.perf_counter() - start


def measure(name: str, n_images: int, step_unit: int) -> dict[str, Any]:
    cfg = load_config(ROOT / "configs" / "bench" / f"{name}.yaml")
    params = dict(cfg.model.params)
    if name == "efficient_ad" and params.get("teacher_weights") and not Path(params["teacher_weights"]).exists():
        params["teacher_weights"] = None  # the teacher's weights do not change its cost
    key = _schedule_key(params)
    configured = int(params[key])
    unit = step_unit if key == "max_steps" else 1
    h, w = cfg.model.image_size
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(n_images, 3, h, w, generator=gen)
    bs = cfg.fit.batch_size
    images = [pixels[i : i + bs] for i in range(0, n_images, bs)]
    times = []
    for units in (unit, 2 * unit):
        times.append(_fit_seconds(name, cfg, {**params, key: units}, images))
        logging.info("%s: %s=%d fitted in %.1f s", name, key, units, times[-1])
    per_unit = max(times[1] - times[0], 1e-6) / unit
    fixed = max(times[0] - unit * per_unit, 0.0)
    budget_s = BUDGET_MIN[name] * 60
    fits = int((budget_s - fixed) // per_unit) if budget_s > fixed else 0
    if key == "max_steps":
        fits = fits // 10 * 10
    return {
        "model": name,
        "schedule": key,
        "configured": configured,
        "seconds_per_unit": round(per_unit, 2),
        "fixed_seconds": round(fixed, 1),
        "configured_minutes": round((fixed + configured * per_unit) / 60, 2),
        "budget_minutes": BUDGET_MIN[name],
        "units_in_budget": fits,
        "image_size": list(cfg.model.image_size),
        "batch_size": bs,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(BUDGET_MIN))
    ap.add_argument("--images", type=int, default=80, help="training images per category (the benchmark's 80)")
    ap.add_argument("--step-unit", type=int, default=20, help="steps per unit for step-scheduled models")
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("oddeye", "timm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    rows = []
    for name in args.models:
        rows.append(measure(name, args.images, args.step_unit))
        r = rows[-1]
        print(
            f"{name}: {r['seconds_per_unit']} s per {'step' if r['schedule'] == 'max_steps' else 'epoch'}, "
            f"fixed {r['fixed_seconds']} s",
            flush=True,
        )
    cpu = platform.processor() or platform.machine()
    print(f"\n{os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}, {args.images} training images per category\n")
    print("| model | size, batch | schedule | s per unit | fixed s | configured | est. min | budget min | in budget |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        size = "×".join(str(s) for s in r["image_size"])
        print(
            f"| {r['model']} | {size}, {r['batch_size']} | {r['schedule']} | {r['seconds_per_unit']} | "
            f"{r['fixed_seconds']} | {r['configured']} | {r['configured_minutes']} | {r['budget_minutes']} | "
            f"{r['units_in_budget']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
