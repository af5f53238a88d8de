"""Inference speed-ups on a GPU, checked in one short run (issue 14, section 3).

    python benchmarks/cuda_check.py                          # on a CUDA machine, ~4 minutes on an H100
    python benchmarks/cuda_check.py --device cpu --size 64 --train 16 --categories brick   # smoke run

For PaDiM, PatchCore, DFM and DFKDE built from ``configs/bench/<model>.yaml`` (offline
EfficientNet-Lite0 ImageNet weights), fitted on ``oddeye data synth`` categories rendered in
memory, it prints one row per inference variant:

- ``plain``: the model as fitted (float32, contiguous);
- ``fp32``: ``prepare_for_inference(precision="float32")``: channels_last, batch norms folded;
- ``bf16`` / ``fp16``: the same with the backbone under autocast;
- ``bf16+compile``: also ``torch.compile`` of the backbone (first category, ``--compile-models``).

Each row has image AUROC on the category's test images (|ΔAUROC| against ``plain`` is the
precision check: < 0.005), frames/s at batch 32 and p50 latency at batch 1. Then a ``ModelWorker``
scoring uint8 batches of 32 serially (as a model actor does, ``max_concurrency=1``) and from
two threads (how a threaded actor with ``max_concurrency=2`` would overlap one batch's
transfer with the other's compute; on an H100 that was 12–15× slower, so actors stay serial).
Then k-center greedy (PatchCore's coreset) on the device.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models_speed import _table, _timing, bench_coreset

from oddeye.data.synth import SynthImageSpec, render_category
from oddeye.evaluation.metrics import auroc
from oddeye.frames import Frame
from oddeye.models.base import create_model
from oddeye.models.inference import prepare_for_inference

log = logging.getLogger("cuda_check")
ROOT = Path(__file__).resolve().parent.parent


def _params(name: str) -> dict[str, Any]:
    """``model.params`` of configs/bench/<name>.yaml (plain YAML: no config validation needed here)."""
    with open(ROOT / "configs" / "bench" / f"{name}.yaml") as f:
        return dict(yaml.safe_load(f)["model"]["params"])


def _tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _scores(model: torch.nn.Module, images: torch.Tensor, device: torch.device, batch: int = 32) -> np.ndarray:
    out = [model(images[i : i + batch].to(device)).score.float().cpu() for i in range(0, len(images), batch)]
    return torch.cat(out).numpy()


@torch.inference_mode()
def _speed(model: torch.nn.Module, size: int, device: torch.device, min_time: float) -> dict[str, float]:
    """frames/s at batch 32 and p50 latency (ms) at batch 1, each over ``min_time`` seconds."""
    return {
        "fps_b32": _timing(model, 32, size, device, min_time)[0],
        "p50_ms_b1": _timing(model, 1, size, device, min_time)[1],
    }


def bench_category(category: str, args: argparse.Namespace, device: torch.device, first: bool) -> list[dict[str, Any]]:
    spec = SynthImageSpec(size=args.size, train=args.train, test_good=20, test_per_defect=8)
    train, good, bad = render_category(category, spec, seed=args.seed)
    n_val = max(4, len(train) // 5)
    fit_x, val_x = _tensor(train[n_val:]), _tensor(train[:n_val])
    test_x = _tensor(good + [b[1] for b in bad])
    labels = np.r_[np.zeros(len(good)), np.ones(len(bad))]
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(args.seed)
        model = create_model(name, image_size=(args.size, args.size), **_params(name)).to(device)
        _sync(device)
        t0 = time.perf_counter()
        try:
            model.fit(fit_x.split(16), val_x.split(16), progress=False)
        except Exception as e:  # e.g. too few images for DFKDE's PCA on a smoke run
            rows.append({"category": category, "model": name, "variant": "fit", "error": f"{type(e).__name__}: {e}"})
            continue
        _sync(device)
        fit_s = time.perf_counter() - t0
        if name == "padim" and first:
            args.padim_checkpoint = str(model.save(Path(args.tmp) / "padim.pt"))
        variants: list[tuple[str, dict[str, Any] | None]] = [
            ("plain", None),
            ("fp32", {"precision": "float32"}),
            ("bf16", {"precision": "bfloat16"}),
        ]
        if device.type == "cuda":
            variants.append(("fp16", {"precision": "float16"}))
        if first and name in args.compile_models.split(","):
            variants.append(("bf16+compile", {"precision": "bfloat16", "compile": True}))
        base_auroc = None
        for label, prep in variants:
            try:
                t0 = time.perf_counter()
                if prep is not None:
                    prepare_for_inference(model, device, **prep)
                scores = _scores(model, test_x, device)
                row: dict[str, Any] = {"category": category, "model": name, "variant": label, "fit_s": fit_s}
                row["auroc"] = auroc(scores, labels)
                base_auroc = row["auroc"] if base_auroc is None else base_auroc
                row["d_auroc"] = row["auroc"] - base_auroc
                row.update(_speed(model, args.size, device, args.min_time))
                row["setup_s"] = time.perf_counter() - t0
            except Exception as e:  # one failing variant (e.g. compile) must not cost the rest of the run
                row = {"category": category, "model": name, "variant": label, "error": f"{type(e).__name__}: {e}"[:200]}
            log.info("%s", row)
            rows.append(row)
    return rows


def bench_overlap(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """A ModelWorker scoring uint8 batches of 32 serially, and from two threads."""
    from oddeye.pipeline.scoring import ModelWorker

    worker = ModelWorker(args.padim_checkpoint, str(device), num_threads=4, map_threshold=2.0)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 255, (32, args.size, args.size, 3), dtype=np.uint8) for _ in range(args.overlap_batches)]
    frames = [Frame("cam", i, float(i), None) for i in range(32)]  # type: ignore[arg-type]
    worker.score(frames, batches[0])  # warm-up

    def serial() -> None:
        for b in batches:
            assert worker.score(frames, b).error is None

    def two_threads() -> None:
        with ThreadPoolExecutor(2) as pool:
            assert all(r.error is None for r in pool.map(lambda b: worker.score(frames, b), batches))

    rows = []
    for _ in range(2):  # alternate, twice
        for label, fn in (("serial (max_concurrency=1)", serial), ("two threads", two_threads)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            s = time.perf_counter() - t0
            rows.append({"mode": label, "frames": 32 * len(batches), "s": s, "fps": 32 * len(batches) / s})
            log.info("%s", rows[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="padim,patchcore,dfm,dfkde")
    parser.add_argument("--categories", default="brick,coffee")
    parser.add_argument("--compile-models", default="padim")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--train", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-time", type=float, default=1.5)
    parser.add_argument("--overlap-batches", type=int, default=60)
    parser.add_argument("--coreset-rows", default="100000,1000000")
    parser.add_argument("--skip-coreset", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("oddeye").setLevel(logging.WARNING)
    device = torch.device(args.device)
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    info["cpu_threads"] = torch.get_num_threads()
    log.info("%s", info)
    results: dict[str, Any] = {"info": info, "models": [], "overlap": [], "coreset": []}

    def dump() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str))

    with tempfile.TemporaryDirectory() as tmp:
        args.tmp, args.padim_checkpoint = tmp, None
        for i, category in enumerate(args.categories.split(",")):
            results["models"] += bench_category(category, args, device, first=i == 0)
            dump()
        cols = ["category", "model", "variant", "fit_s", "auroc", "d_auroc", "fps_b32", "p50_ms_b1", "setup_s", "error"]
        print(_table(results["models"], cols), flush=True)
        if args.padim_checkpoint:
            results["overlap"] = bench_overlap(args, device)
            dump()
            print()
            print(_table(results["overlap"], ["mode", "frames", "s", "fps"]), flush=True)
    if not args.skip_coreset:
        for n in (int(x) for x in args.coreset_rows.split(",")):
            t0 = time.perf_counter()
            results["coreset"].append(bench_coreset(n, 1536, int(0.1 * n), device.type))
            log.info("%s", results["coreset"][-1])
            dump()
            if time.perf_counter() - t0 > 60:
                break  # the next size would not fit a short device lease
        print()
        cols = ["rows", "device", "projected_dim", "selected", "project_s", "select_s", "ms_per_selected"]
        print(_table(results["coreset"], [*cols, "cuda_peak_mb"]), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
